"""Small real Keras models for the converter tests, trained in seconds on separable data.

They are trained (not left at random initialisation) because a random classifier's outputs are
near-uniform, and top-1 agreement of a quantized copy would then measure noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

WINDOW = 32
FEATURES = 3
CLASSES = ("steady", "drift", "oscillation")


@dataclass
class Made:
    path: Path
    x: np.ndarray
    y: np.ndarray


def conv_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows (n, 32, 3) in raw units; class 0 noise, 1 a ramp, 2 a sine on one axis."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    t = np.linspace(0, 1, WINDOW, dtype=np.float32)
    x = rng.normal(0, 0.5, (n, WINDOW, FEATURES)).astype(np.float32) + 10.0
    x[y == 1, :, 0] += 3 * t
    x[y == 2, :, 1] += 1.5 * np.sin(2 * np.pi * 4 * t)
    return x.astype(np.float32), y


def dense_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample rows (n, 8) and a smooth non-linear target."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 8)).astype(np.float32)
    y = (x[:, :4].sum(1) * 0.5 + np.sin(x[:, 4]) - 0.3 * x[:, 5] ** 2).astype(np.float32)
    return x, y[:, None]


def make_conv_classifier(directory: Path) -> Made:
    import keras  # noqa: PLC0415

    keras.utils.set_random_seed(7)
    x, y = conv_data(1200, seed=1)
    mean, std = x.reshape(-1, FEATURES).mean(0), x.reshape(-1, FEATURES).std(0)
    inp = keras.Input((WINDOW, FEATURES))
    h = keras.layers.Conv1D(8, 5, activation="relu")(inp)
    h = keras.layers.Conv1D(8, 3, strides=2, activation="relu")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    out = keras.layers.Dense(len(CLASSES), activation="softmax")(h)
    model = keras.Model(inp, out)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit((x - mean) / std, y, epochs=8, batch_size=64, verbose=0)
    path = directory / "conv.keras"
    model.save(path)
    np.save(directory / "conv_norm.npy", np.stack([mean, std]))
    return Made(path, x, y)


def make_dense_regressor(directory: Path) -> Made:
    import keras  # noqa: PLC0415

    keras.utils.set_random_seed(11)
    x, y = dense_data(1500, seed=2)
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu")(inp)
    out = keras.layers.Dense(1)(h)
    model = keras.Model(inp, out)
    model.compile("adam", "mse")
    model.fit(x, y, epochs=10, batch_size=64, verbose=0)
    path = directory / "dense.keras"
    model.save(path)
    return Made(path, x, y)
