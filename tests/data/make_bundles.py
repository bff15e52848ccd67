"""Regenerate the small bundles committed under tests/data (needs the convert extra).

    .venv/bin/python -m tests.data.make_bundles [NAME ...]   # names: see MAKERS below

With no name, all are rebuilt. temp-anomaly is a schema 1 bundle (made by floorline 0.1.0's
converter): rebuilding it makes it schema 2, and the gateway's reading of schema 1 is then tested
by the example bundle edge/models/pdm-classifier only.

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


def make_temp_anomaly() -> int:
    """Train and convert temp-anomaly; returns the converter's exit code."""
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


VIB_WINDOW = 32
FEATURES_ARG = "accel_x:g,accel_y:g,accel_z:g"


def vibration_windows(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Simulated (n, 32, 3) accelerometer windows in g and their condition index."""
    from floorline.edge.demo.signals import make_dataset  # noqa: PLC0415

    return make_dataset(per_class, VIB_WINDOW, np.random.default_rng(seed))


def make_pump_heads() -> int:
    """pump-heads: one model, two heads: the fault class (4 labels) and the window's RMS in g."""
    import keras  # noqa: PLC0415

    from floorline.converter.cli import main as convert  # noqa: PLC0415
    from floorline.edge.demo.signals import CONDITIONS  # noqa: PLC0415

    keras.utils.set_random_seed(5)
    x, y = vibration_windows(300, seed=11)
    mean, std = x.reshape(-1, 3).mean(0), x.reshape(-1, 3).std(0)
    rms = np.sqrt((x**2).mean(axis=(1, 2)))[:, None].astype(np.float32)
    inp = keras.Input((VIB_WINDOW, 3))
    h = keras.layers.Conv1D(8, 5, activation="relu")(inp)
    h = keras.layers.GlobalAveragePooling1D()(h)
    fault = keras.layers.Dense(len(CONDITIONS), activation="softmax", name="fault")(h)
    level = keras.layers.Dense(1, name="rms")(keras.layers.Dense(8, activation="relu")(h))
    model = keras.Model(inp, [fault, level])
    model.compile("adam", ["sparse_categorical_crossentropy", "mse"])
    model.fit((x - mean) / std, [y, rms], epochs=8, batch_size=64, verbose=0)
    work = HERE / ".work"
    work.mkdir(exist_ok=True)
    model.save(work / "pump.keras")
    np.save(work / "pump_calib.npy", x[:600])
    np.save(work / "pump_parity.npy", vibration_windows(80, seed=12)[0])
    card = work / "pump_card.yaml"
    card.write_text(
        "name: pump-heads\nversion: 0.1.0\n"
        "description: fault class and vibration RMS from one 32-sample window (test bundle)\n"
        f"normalization: {{mean: {mean.tolist()}, std: {std.tolist()}}}\n"
        "outputs:\n"
        f"  - {{name: fault, task: classification, labels: {[c.value for c in CONDITIONS]}}}\n"
        "  - {name: rms, task: regression, units: [g]}\n"
    )
    return convert(
        [
            "keras", str(work / "pump.keras"), "--out", str(HERE / "pump-heads"), "--force",
            "--card", str(card), "--features", FEATURES_ARG, "--targets", "tflite,onnx",
            "--calibration", str(work / "pump_calib.npy"),
            "--parity-data", str(work / "pump_parity.npy"),
        ]
    )


def make_vib_autoencoder() -> int:
    """vib-autoencoder: a dense autoencoder of healthy windows, threshold p99 of healthy data."""
    import keras  # noqa: PLC0415

    from floorline.converter.cli import main as convert  # noqa: PLC0415

    keras.utils.set_random_seed(6)
    x, y = vibration_windows(600, seed=13)
    healthy = x[y == 0]
    mean, std = healthy.reshape(-1, 3).mean(0), healthy.reshape(-1, 3).std(0)
    inp = keras.Input((VIB_WINDOW, 3))
    h = keras.layers.Flatten()(inp)
    h = keras.layers.Dense(16, activation="relu")(h)
    h = keras.layers.Dense(VIB_WINDOW * 3)(h)
    model = keras.Model(inp, keras.layers.Reshape((VIB_WINDOW, 3))(h))
    model.compile("adam", "mse")
    xn = (healthy - mean) / std
    model.fit(xn, xn, epochs=30, batch_size=32, verbose=0)
    work = HERE / ".work"
    work.mkdir(exist_ok=True)
    model.save(work / "ae.keras")
    np.save(work / "ae_calib.npy", healthy)
    return convert(
        [
            "keras", str(work / "ae.keras"), "--out", str(HERE / "vib-autoencoder"), "--force",
            "--name", "vib-autoencoder", "--model-version", "0.1.0", "--task", "anomaly",
            "--features", FEATURES_ARG,
            # "=": a first value "-0.1,…" would read as an option otherwise.
            "--norm-mean=" + ",".join(map(str, mean.tolist())),
            "--norm-std=" + ",".join(map(str, std.tolist())),
            "--score-metric", "mse", "--score-percentile", "99",
            "--targets", "tflite,onnx", "--calibration", str(work / "ae_calib.npy"),
        ]
    )


def make_vib_lstm() -> int:
    """vib-lstm: an LSTM classifier of 32-sample windows, float and int8 TFLite and ONNX."""
    import keras  # noqa: PLC0415

    from floorline.converter.cli import main as convert  # noqa: PLC0415
    from floorline.edge.demo.signals import CONDITIONS  # noqa: PLC0415

    keras.utils.set_random_seed(7)
    x, y = vibration_windows(300, seed=14)
    mean, std = x.reshape(-1, 3).mean(0), x.reshape(-1, 3).std(0)
    inp = keras.Input((VIB_WINDOW, 3))
    h = keras.layers.LSTM(12)(inp)
    out = keras.layers.Dense(len(CONDITIONS), activation="softmax")(h)
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit((x - mean) / std, y, epochs=10, batch_size=64, verbose=0)
    work = HERE / ".work"
    work.mkdir(exist_ok=True)
    model.save(work / "lstm.keras")
    np.save(work / "lstm_calib.npy", x)
    np.save(work / "lstm_parity.npy", vibration_windows(80, seed=15)[0])
    return convert(
        [
            "keras", str(work / "lstm.keras"), "--out", str(HERE / "vib-lstm"), "--force",
            "--name", "vib-lstm", "--model-version", "0.1.0", "--task", "classification",
            "--features", FEATURES_ARG, "--labels", ",".join(c.value for c in CONDITIONS),
            # "=": a first value "-0.1,…" would read as an option otherwise.
            "--norm-mean=" + ",".join(map(str, mean.tolist())),
            "--norm-std=" + ",".join(map(str, std.tolist())),
            "--targets", "tflite,tflite-int8,onnx",
            "--calibration", str(work / "lstm_calib.npy"),
            "--parity-data", str(work / "lstm_parity.npy"),
        ]
    )


MAKERS = {
    "temp-anomaly": make_temp_anomaly,
    "pump-heads": make_pump_heads,
    "vib-autoencoder": make_vib_autoencoder,
    "vib-lstm": make_vib_lstm,
}


def main(argv: list[str] | None = None) -> int:
    """Rebuild the named bundles (all without names); the first failing exit code, or 0."""
    names = argv if argv is not None else sys.argv[1:]
    for name in names or list(MAKERS):
        if name not in MAKERS:
            print(f"unknown bundle {name!r}; choose from {', '.join(MAKERS)}", file=sys.stderr)
            return 2
        code = MAKERS[name]()
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
