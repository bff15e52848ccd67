"""The example bundle, end to end: synthetic vibration → Keras model → Floorline bundle.

This is the flow a Floorline user follows with their own model, run on data the product makes
itself so the example is reproducible anywhere:

1. seeded datasets from :func:`floorline.edge.demo.signals.make_dataset`: training, validation,
   a held-out parity set and a separate calibration set, 64-sample windows of 3 accelerometer
   axes in g;
2. per-feature normalization (mean, std) from the training set: the model takes normalized
   windows, and the gateway normalizes raw samples with the manifest's mean and std;
3. a tiny Conv1D classifier trained deterministically, reported on the held-out set;
4. WORK/pdm.keras, WORK/calibration.npz and WORK/parity.npz (raw windows in g under ``x``,
   labels under ``y``) and WORK/card.yaml (pdm_card.yaml plus the normalization);
5. ``floorline-convert keras`` on them, in-process: float TFLite, ONNX and int8 TFLite, each
   checked for parity against the Keras model, written to OUT as a self-tested bundle.

Regenerate the bundle shipped in the repository with ``make example-bundle``, which runs::

    python -m floorline.converter.examples.pdm --out edge/models/pdm-classifier

Same seed, same data, same weights (TensorFlow op determinism is on). TensorFlow is needed, as for
any conversion (``pip install 'floorline[convert]'``).
"""

from __future__ import annotations

import argparse
import importlib.resources
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from numpy.typing import NDArray

from floorline.edge.demo.signals import CONDITIONS, FEATURES, make_dataset

log = logging.getLogger(__name__)

WINDOW = 64
"""Samples per model input window (64 ms at the signals' 1 kHz)."""

TRAIN_PER_CLASS = 2000
VALIDATION_PER_CLASS = 250
PARITY_PER_CLASS = 250
CALIBRATION_PER_CLASS = 64
DEFAULT_EPOCHS = 12
BATCH_SIZE = 64
LEARNING_RATE = 3e-3

MIN_ACCURACY = 0.95
"""Held-out accuracy below which no bundle is written: the example must stay a good example."""

CARD_TEMPLATE = "pdm_card.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m floorline.converter.examples.pdm",
        description="Train the example vibration classifier and convert it into a bundle.",
    )
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(".work/pdm"),
        help="directory for the model, card and data files (default .work/pdm)",
    )
    parser.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help=f"default {DEFAULT_EPOCHS}"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for data and training (0)")
    parser.add_argument(
        "--targets",
        default="tflite,onnx,tflite-int8",
        help="converter targets (default: what the committed bundle holds)",
    )
    return parser


Split = tuple[NDArray[np.float32], NDArray[np.int64]]


def build_datasets(seed: int) -> dict[str, Split]:
    """Train, validation, parity and calibration windows (raw, in g) with labels."""
    sizes = {
        "train": TRAIN_PER_CLASS,
        "validation": VALIDATION_PER_CLASS,
        "parity": PARITY_PER_CLASS,
        "calibration": CALIBRATION_PER_CLASS,
    }
    # One independent stream per split, so resizing one split leaves the others unchanged.
    streams = np.random.SeedSequence(seed).spawn(len(sizes))
    return {
        name: make_dataset(per_class, WINDOW, np.random.default_rng(stream))
        for (name, per_class), stream in zip(sizes.items(), streams, strict=True)
    }


def normalization(x: NDArray[np.float32]) -> tuple[list[float], list[float]]:
    """Per-feature mean and std over every sample of X, rounded to what the card stores."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    # Rounded so the model trains on exactly the numbers the card (and so the gateway) uses.
    mean = [float(f"{v:.6g}") for v in flat.mean(axis=0)]
    std = [float(f"{v:.6g}") for v in flat.std(axis=0)]
    return mean, std


def normalize(x: NDArray[np.float32], mean: list[float], std: list[float]) -> NDArray[np.float32]:
    """(x - mean) / std in float32, as the gateway does (``stream.normalization``)."""
    out: NDArray[np.float32] = (
        (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    ).astype(np.float32)
    return out


def build_model(keras: Any) -> Any:
    """The classifier: three small convolutions, global average pooling, softmax (~6k params)."""
    layers = keras.layers
    inputs = keras.Input(shape=(WINDOW, len(FEATURES)), name="window")
    # Kernel 7 at 1 kHz spans a resonance cycle or two; the stride halves the time axis before
    # the wider layers, keeping the model small enough for a microcontroller-class gateway.
    h = layers.Conv1D(16, 7, activation="relu", name="conv1")(inputs)
    h = layers.Conv1D(32, 5, strides=2, activation="relu", name="conv2")(h)
    h = layers.Conv1D(32, 3, activation="relu", name="conv3")(h)
    h = layers.GlobalAveragePooling1D(name="pool")(h)
    outputs = layers.Dense(len(CONDITIONS), activation="softmax", name="condition")(h)
    return keras.Model(inputs, outputs, name="pdm_classifier")


def confusion_matrix(y_true: NDArray[np.int64], y_pred: NDArray[np.int64]) -> NDArray[np.int64]:
    """Counts of (actual, predicted) label pairs."""
    n = len(CONDITIONS)
    matrix: NDArray[np.int64] = np.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n)
    return matrix


def format_confusion(matrix: NDArray[np.int64]) -> str:
    """The confusion matrix as a text table, actual labels down, predicted across."""
    names = [c.value for c in CONDITIONS]
    width = max(len(name) for name in names)
    corner = "actual / predicted"
    width = max(width, len(corner))
    lines = [f"{corner:<{width}}  " + "  ".join(f"{n:>{width}}" for n in names)]
    lines += [
        f"{name:<{width}}  " + "  ".join(f"{count:>{width}d}" for count in row)
        for name, row in zip(names, matrix, strict=True)
    ]
    return "\n".join(lines)


def write_card(path: Path, mean: list[float], std: list[float]) -> None:
    """WORK/card.yaml: the packaged card template plus the computed normalization."""
    template = importlib.resources.files("floorline.converter.examples").joinpath(CARD_TEMPLATE)
    card = yaml.safe_load(template.read_text(encoding="utf-8"))
    # The template and the signal generator must agree, or the bundle would mislabel classes.
    expected_features = [{"name": name, "unit": unit} for name, unit in FEATURES]
    if card.get("features") != expected_features or card.get("window") != WINDOW:
        raise ValueError(f"{CARD_TEMPLATE}: features/window differ from the demo's signals")
    if card.get("labels") != [c.value for c in CONDITIONS]:
        raise ValueError(f"{CARD_TEMPLATE}: labels differ from signals.CONDITIONS")
    card["normalization"] = {"mean": mean, "std": std}
    path.write_text(yaml.safe_dump(card, sort_keys=False), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Train, save and convert the example model; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.epochs < 1:
        print("pdm: --epochs must be >= 1", file=sys.stderr)
        return 2
    started = time.perf_counter()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)

    data = build_datasets(args.seed)
    x_train, y_train = data["train"]
    mean, std = normalization(x_train)
    log.info(
        "data: %s windows of %d x %d (train/validation/parity/calibration %s); mean %s std %s",
        sum(len(y) for _, y in data.values()),
        WINDOW,
        len(FEATURES),
        "/".join(str(len(y)) for _, y in data.values()),
        mean,
        std,
    )

    from floorline.converter.tensorflow_import import import_tensorflow  # noqa: PLC0415 - slow, on demand

    tf, keras = import_tensorflow()
    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    model = build_model(keras)
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    log.info("model: %d parameters", model.count_params())
    x_val, y_val = data["validation"]
    fit_started = time.perf_counter()
    model.fit(
        normalize(x_train, mean, std),
        y_train,
        validation_data=(normalize(x_val, mean, std), y_val),
        epochs=args.epochs,
        batch_size=BATCH_SIZE,
        shuffle=True,
        verbose=1 if sys.stdout.isatty() else 2,
    )
    fit_seconds = time.perf_counter() - fit_started

    x_parity, y_parity = data["parity"]
    scores = model.predict(normalize(x_parity, mean, std), batch_size=256, verbose=0)
    predicted = np.argmax(scores, axis=1).astype(np.int64)
    accuracy = float(np.mean(predicted == y_parity))
    print(f"\nheld-out accuracy: {accuracy:.4f} on {len(y_parity)} windows")
    print(format_confusion(confusion_matrix(y_parity, predicted)))
    print(f"training took {fit_seconds:.1f} s ({args.epochs} epochs)")
    if accuracy < MIN_ACCURACY:
        log.error("held-out accuracy %.4f is below %.2f; not converting", accuracy, MIN_ACCURACY)
        return 1

    model_path = work / "pdm.keras"
    card_path = work / "card.yaml"
    calibration_path = work / "calibration.npz"
    parity_path = work / "parity.npz"
    model.save(model_path)
    for path, (x, y) in ((calibration_path, data["calibration"]), (parity_path, data["parity"])):
        # Raw windows in g: the converter normalizes them with the card, as a gateway will.
        np.savez(path, x=x, y=y)
    write_card(card_path, mean, std)
    log.info("wrote %s, %s, %s and %s", model_path, card_path, calibration_path, parity_path)

    from floorline.converter.cli import main as convert  # noqa: PLC0415 - imports the converter stack

    status = convert(
        [
            "keras",
            str(model_path),
            "--card",
            str(card_path),
            "--calibration",
            str(calibration_path),
            "--parity-data",
            str(parity_path),
            "--targets",
            args.targets,
            "--out",
            str(args.out),
            "--force",
        ]
    )
    print(f"total {time.perf_counter() - started:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
