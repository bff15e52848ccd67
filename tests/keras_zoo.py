"""The Keras model shapes plants train, small and seeded, for the converter's shape tests.

Recurrent classifiers (SimpleRNN, GRU, LSTM, Bidirectional, stacked), autoencoders whose output is
the input window, a two-head model, models with a leading Normalization or Rescaling layer, and the
ones the converter must refuse (integer input, masking, normalization mid-graph). Each trains in a
few seconds on synthetic windows; each maker returns the saved ``.keras`` path and raw data.

The classifiers are trained to clear margins on purpose: a quantized copy's top-1 agreement is
only meaningful when the source model is not guessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WINDOW = 32
FEATURES = 3
CLASSES = 3
# Raw feature ranges of very different scales, for the preprocessing-layer models.
RAW_LOW = np.array([0.0, 0.0, -50.0], dtype=np.float32)
RAW_HIGH = np.array([1.0, 1000.0, 50.0], dtype=np.float32)


@dataclass
class Made:
    path: Path
    x: np.ndarray
    y: np.ndarray


def windows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows (n, 32, 3) around 0; class 0 noise, 1 a ramp on feature 0, 2 a sine on feature 1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    t = np.linspace(0, 1, WINDOW, dtype=np.float32)
    x = rng.normal(0, 0.4, (n, WINDOW, FEATURES)).astype(np.float32)
    x[y == 1, :, 0] += 3 * t - 0.5
    x[y == 2, :, 1] += 1.5 * np.sin(2 * np.pi * 3 * t)
    return x.astype(np.float32), y


def raw_windows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``windows`` mapped to raw units: features in 0..1, 0..1000 and -50..50."""
    x, y = windows(n, seed)
    unit = np.clip((x + 2.0) / 4.0, 0.0, 1.0)
    return (RAW_LOW + unit * (RAW_HIGH - RAW_LOW)).astype(np.float32), y


def _keras() -> Any:
    import keras  # noqa: PLC0415 - TensorFlow loads only in tests that need it

    return keras


def _fit_classifier(model: Any, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
    keras = _keras()
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)


def _recurrent(trunk: Callable[[Any, Any], Any], name: str, directory: Path, seed: int) -> Made:
    keras = _keras()
    keras.utils.set_random_seed(seed)
    x, y = windows(640, seed)
    inp = keras.Input((WINDOW, FEATURES))
    out = keras.layers.Dense(CLASSES, activation="softmax", name="fault")(trunk(keras, inp))
    model = keras.Model(inp, out)
    _fit_classifier(model, x, y, epochs=4)
    path = directory / f"{name}.keras"
    model.save(path)
    return Made(path, x, y)


def make_simple_rnn(directory: Path) -> Made:
    return _recurrent(lambda k, i: k.layers.SimpleRNN(8)(i), "simple_rnn", directory, 21)


def make_gru(directory: Path) -> Made:
    return _recurrent(lambda k, i: k.layers.GRU(8)(i), "gru", directory, 22)


def make_lstm(directory: Path) -> Made:
    return _recurrent(lambda k, i: k.layers.LSTM(8)(i), "lstm", directory, 23)


def make_bidirectional_lstm(directory: Path) -> Made:
    return _recurrent(
        lambda k, i: k.layers.Bidirectional(k.layers.LSTM(6))(i),
        "bidirectional_lstm",
        directory,
        24,
    )


def make_stacked_gru(directory: Path) -> Made:
    def trunk(k: Any, i: Any) -> Any:
        return k.layers.GRU(6)(k.layers.GRU(8, return_sequences=True)(i))

    return _recurrent(trunk, "stacked_gru", directory, 25)


RECURRENT: dict[str, Callable[[Path], Made]] = {
    "simple_rnn": make_simple_rnn,
    "gru": make_gru,
    "lstm": make_lstm,
    "bidirectional_lstm": make_bidirectional_lstm,
    "stacked_gru": make_stacked_gru,
}


def make_dense_autoencoder(directory: Path) -> Made:
    keras = _keras()
    keras.utils.set_random_seed(31)
    x, y = windows(512, 31)
    inp = keras.Input((WINDOW, FEATURES))
    h = keras.layers.Flatten()(inp)
    h = keras.layers.Dense(12, activation="relu")(h)
    h = keras.layers.Dense(WINDOW * FEATURES)(h)
    out = keras.layers.Reshape((WINDOW, FEATURES), name="reconstruction")(h)
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x, x, epochs=3, batch_size=32, verbose=0)
    path = directory / "dense_autoencoder.keras"
    model.save(path)
    return Made(path, x, y)


def make_lstm_autoencoder(directory: Path) -> Made:
    keras = _keras()
    keras.utils.set_random_seed(32)
    x, y = windows(384, 32)
    inp = keras.Input((WINDOW, FEATURES))
    h = keras.layers.LSTM(8)(inp)
    h = keras.layers.RepeatVector(WINDOW)(h)
    h = keras.layers.LSTM(8, return_sequences=True)(h)
    out = keras.layers.TimeDistributed(keras.layers.Dense(FEATURES), name="reconstruction")(h)
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x, x, epochs=2, batch_size=32, verbose=0)
    path = directory / "lstm_autoencoder.keras"
    model.save(path)
    return Made(path, x, y)


def rul(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A remaining-useful-life target: shorter for faults, shorter still for bigger signals."""
    return (100.0 - 30.0 * y - 5.0 * np.abs(x).mean(axis=(1, 2))).astype(np.float32)[:, None]


def make_two_head(directory: Path) -> Made:
    """Fault class (softmax over 3 labels) and remaining useful life (1 value), in that order."""
    keras = _keras()
    keras.utils.set_random_seed(41)
    x, y = windows(640, 41)
    inp = keras.Input((WINDOW, FEATURES))
    h = keras.layers.Conv1D(8, 5, activation="relu")(inp)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.Dense(16, activation="relu")(h)
    fault = keras.layers.Dense(CLASSES, activation="softmax", name="fault")(h)
    life = keras.layers.Dense(1, name="rul")(h)
    model = keras.Model(inp, [fault, life])
    model.compile(
        keras.optimizers.Adam(0.01),
        ["sparse_categorical_crossentropy", "mse"],
        loss_weights=[1.0, 0.001],
    )
    model.fit(x, [y, rul(x, y)], epochs=4, batch_size=32, verbose=0)
    path = directory / "two_head.keras"
    model.save(path)
    return Made(path, x, y)


def _preprocessed(first: Any, name: str, directory: Path, seed: int) -> Made:
    keras = _keras()
    keras.utils.set_random_seed(seed)
    x, y = raw_windows(640, seed)
    if isinstance(first, keras.layers.Normalization):
        first.adapt(x.reshape(-1, FEATURES))
    inp = keras.Input((WINDOW, FEATURES))
    h = first(inp)
    h = keras.layers.Conv1D(8, 5, activation="relu")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    out = keras.layers.Dense(CLASSES, activation="softmax", name="fault")(h)
    model = keras.Model(inp, out)
    _fit_classifier(model, x, y, epochs=4)
    path = directory / f"{name}.keras"
    model.save(path)
    return Made(path, x, y)


def make_normalized(directory: Path) -> Made:
    """A classifier whose first layer is a Normalization adapted on raw data."""
    return _preprocessed(_keras().layers.Normalization(axis=-1), "normalized", directory, 51)


def make_rescaled(directory: Path) -> Made:
    """A classifier whose first layer is a per-feature Rescaling to about -1..1."""
    span = RAW_HIGH - RAW_LOW
    scale = (2.0 / span).tolist()
    offset = (-1.0 - 2.0 * RAW_LOW / span).tolist()
    layer = _keras().layers.Rescaling(scale=scale, offset=offset)
    return _preprocessed(layer, "rescaled", directory, 52)


def _untrained(model: Any, name: str, directory: Path, seed: int) -> Made:
    x, y = windows(64, seed)
    path = directory / f"{name}.keras"
    model.save(path)
    return Made(path, x, y)


def make_integer_input(directory: Path) -> Made:
    keras = _keras()
    keras.utils.set_random_seed(61)
    inp = keras.Input((WINDOW, FEATURES), dtype="uint8")
    h = keras.layers.Flatten()(inp)
    out = keras.layers.Dense(CLASSES, activation="softmax")(h)
    return _untrained(keras.Model(inp, out), "integer_input", directory, 61)


def make_masking(directory: Path) -> Made:
    keras = _keras()
    keras.utils.set_random_seed(62)
    inp = keras.Input((WINDOW, FEATURES))
    h = keras.layers.Masking(mask_value=0.0)(inp)
    h = keras.layers.LSTM(4)(h)
    out = keras.layers.Dense(CLASSES, activation="softmax")(h)
    return _untrained(keras.Model(inp, out), "masking", directory, 62)


def make_mid_graph_normalization(directory: Path) -> Made:
    keras = _keras()
    keras.utils.set_random_seed(63)
    inp = keras.Input((WINDOW, FEATURES))
    h = keras.layers.Dense(4)(inp)
    norm = keras.layers.Normalization(axis=-1, mean=[0.0] * 4, variance=[2.0] * 4)
    h = keras.layers.Flatten()(norm(h))
    out = keras.layers.Dense(CLASSES, activation="softmax")(h)
    return _untrained(keras.Model(inp, out), "mid_normalization", directory, 63)


def make_fixed_batch(directory: Path) -> Made:
    keras = _keras()
    keras.utils.set_random_seed(64)
    inp = keras.Input((WINDOW, FEATURES), batch_size=4)
    h = keras.layers.Conv1D(4, 3, activation="relu")(inp)
    h = keras.layers.GlobalAveragePooling1D()(h)
    out = keras.layers.Dense(CLASSES, activation="softmax")(h)
    return _untrained(keras.Model(inp, out), "fixed_batch", directory, 64)
