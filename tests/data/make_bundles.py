"""Regenerate the small bundles committed under tests/data (needs the convert extra).

    .venv/bin/python -m tests.data.make_bundles

temp-anomaly: an anomaly model on 16-sample windows of one temperature feature, scoring how far a
window departs from a slow first-order drift; exported to ONNX and float TFLite. It exists so the
daemon tests can run two pipelines with different bundles and backends in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WINDOW = 16


def temperature_windows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw windows (n, 16, 1) in degC and an anomaly target in [0, 1] (spikes and steps)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(25, 60, (n, 1, 1))
    drift = rng.normal(0, 0.05, (n, 1, 1)) * np.arange(WINDOW)[None, :, None]
    x = base + drift + rng.normal(0, 0.05, (n, WINDOW, 1))
    y = np.zeros((n, 1))
    spikes = rng.random(n) < 0.5
    where = rng.integers(0, WINDOW, n)
    size = rng.uniform(1.0, 6.0, n)
    x[spikes, where[spikes], 0] += size[spikes]
    y[spikes, 0] = np.clip(size[spikes] / 3.0, 0, 1)
    return x.astype(np.float32), y.astype(np.float32)


def main() -> int:
    """Train and convert; returns the converter's exit code."""
    import keras  # noqa: PLC0415 - TensorFlow only here

    from floorline.converter.cli import main as convert  # noqa: PLC0415

    keras.utils.set_random_seed(3)
    x, y = temperature_windows(4000, seed=1)
    mean, std = float(x.mean()), float(x.std())
    # Differences make the score independent of the absolute temperature level.
    inp = keras.Input((WINDOW, 1))
    h = keras.layers.Conv1D(8, 3, activation="relu")(inp)
    h = keras.layers.GlobalMaxPooling1D()(h)
    out = keras.layers.Dense(1, activation="sigmoid")(h)
    model = keras.Model(inp, out)
    model.compile("adam", "mse")
    model.fit((x - mean) / std, y, epochs=6, batch_size=64, verbose=0)
    work = HERE / ".work"
    work.mkdir(exist_ok=True)
    model.save(work / "temp.keras")
    px, _ = temperature_windows(300, seed=2)
    np.save(work / "parity.npy", px)
    return convert(
        [
            "keras", str(work / "temp.keras"), "--out", str(HERE / "temp-anomaly"), "--force",
            "--name", "temp-anomaly", "--model-version", "0.1.0", "--task", "anomaly",
            "--features", "temperature_c:degC", "--norm-mean", str(mean), "--norm-std", str(std),
            "--threshold", "anomaly=0.5", "--targets", "onnx,tflite",
            "--parity-data", str(work / "parity.npy"),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
