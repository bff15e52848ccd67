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

Retraining with windows captured on a gateway (``floorline capture export``, docs/monitoring.md)::

    python -m floorline.converter.examples.pdm --out pdm-1.1 --extra-data pump07.npz \
        --reference-data plant-normal.npz --targets onnx

``--extra-data`` adds each file's labelled windows (``x`` raw windows, ``y`` label names; windows
without a label are left out) to the synthetic sets: a label the example model does not have
becomes a new class after the four trained ones, and the card's version goes up a minor step. Per
label, the captured windows are split in time order: the first 70 % train, the next 15 %
validate, the last 15 % join the held-out (parity) set the accuracy is reported on, so
overlapping neighbours of a training window are never used to judge it. Training oversamples them
to the synthetic sets' per-class size.

``--reference-data`` hands the converter windows of the plant in normal operation
(``floorline-convert --reference-data``): the bundle's drift reference is made of them alone,
while calibration and parity keep the synthetic sets. A reference drawn from balanced synthetic
classes (three quarters of them faults, from many random machines) reads a healthy plant as
drifting, so without ``--reference-data`` the bundle gets none (``--no-reference``), as the
committed one.

``--quick`` trains a smaller version (fewer windows, fewer epochs, ONNX only) in seconds, for the
closed-loop walk's short form and its test (``floorline.converter.examples.closed_loop``).
"""

from __future__ import annotations

import argparse
import importlib.resources
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from numpy.typing import NDArray

from floorline.converter.drift_summary import MIN_REFERENCE_WINDOWS
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


@dataclass(frozen=True)
class Sizes:
    """Windows per class of each synthetic split, and the epochs."""

    train: int = TRAIN_PER_CLASS
    validation: int = VALIDATION_PER_CLASS
    parity: int = PARITY_PER_CLASS
    calibration: int = CALIBRATION_PER_CLASS
    epochs: int = DEFAULT_EPOCHS


FULL = Sizes()
QUICK = Sizes(train=800, validation=100, parity=100, calibration=32, epochs=8)
"""``--quick``: seconds of training instead of a minute, for the closed-loop walk's short form."""
QUICK_TARGETS = "onnx"

MIN_ACCURACY = 0.95
"""Held-out accuracy below which no bundle is written: the example must stay a good example."""
QUICK_MIN_ACCURACY = 0.90
"""The same floor for ``--quick``: 40 % of the data and fewer epochs land at 0.95-0.97, too
close to MIN_ACCURACY for a walk that must not fail on the luck of one held-out set."""

CARD_TEMPLATE = "pdm_card.yaml"

EXTRA_SPLIT = (0.70, 0.15)
"""Shares of each label's captured windows (in time order) for training and validation; the
rest is held out with the parity set."""


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
        "--epochs", type=int, help=f"default {FULL.epochs} ({QUICK.epochs} with --quick)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for data and training (0)")
    parser.add_argument(
        "--targets",
        help="converter targets (default: what the committed bundle holds, tflite,onnx,"
        f"tflite-int8; with --quick: {QUICK_TARGETS})",
    )
    parser.add_argument(
        "--extra-data",
        type=Path,
        action="append",
        default=[],
        metavar="NPZ",
        help="labelled windows captured on a gateway (floorline capture export: x, y); a new "
        "label becomes a new class. Repeat for several files",
    )
    parser.add_argument(
        "--reference-data",
        type=Path,
        action="append",
        default=[],
        metavar="NPZ",
        help="windows of the plant in normal operation (e.g. a capture export): the bundle's "
        "drift reference (default: none). Repeat for several",
    )
    parser.add_argument(
        "--version", help="the bundle's version (default: the card's; a minor step up with "
        "--extra-data)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small and fast: {QUICK.train} training windows per class, {QUICK.epochs} epochs, "
        f"targets {QUICK_TARGETS}",
    )
    return parser


class ExtraDataError(ValueError):
    """An --extra-data or --reference-data file that cannot be used; the message says why."""


@dataclass
class Extra:
    """Captured labelled windows, split for training, validation and the held-out set."""

    labels: list[str]
    """Every class: the trained ones, then each new name (sorted)."""
    splits: dict[str, Split]
    counts: dict[str, int]
    """Windows used per label name."""
    ignored: int
    """Windows without a label."""


def _load_npz(path: Path, keys: tuple[str, ...]) -> dict[str, NDArray[Any]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise ExtraDataError(
                    f"{path}: no array {missing[0]!r} (it holds {npz.files}); a "
                    "`floorline capture export` file has x and y"
                )
            return {k: np.asarray(npz[k]) for k in (*keys, "end") if k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        if isinstance(exc, ExtraDataError):
            raise
        raise ExtraDataError(f"{path}: cannot read as .npz: {exc}") from exc


def _check_windows(path: Path, x: NDArray[Any]) -> None:
    expected = (WINDOW, len(FEATURES))
    if x.ndim != 3 or x.shape[1:] != expected:
        raise ExtraDataError(
            f"{path}: windows of shape {tuple(x.shape[1:])}, the example model takes "
            f"{expected} ({WINDOW} samples of {', '.join(n for n, _ in FEATURES)}); export the "
            "pipeline that runs it (floorline capture export --pipeline NAME)"
        )
    if x.dtype.kind != "f" or not np.isfinite(x).all():
        raise ExtraDataError(f"{path}: x must hold finite floats (raw windows in g)")


def load_extra(paths: list[Path]) -> Extra:
    """The labelled windows of PATHS, split per label in time order (``EXTRA_SPLIT``)."""
    trained = [c.value for c in CONDITIONS]
    by_label: dict[str, list[NDArray[np.float32]]] = {}
    ignored = 0
    for path in paths:
        arrays = _load_npz(path, ("x", "y"))
        x, y = arrays["x"], arrays["y"]
        _check_windows(path, x)
        if y.shape != (len(x),) or y.dtype.kind not in "US":
            raise ExtraDataError(f"{path}: y must hold one label name (a string) per window")
        names = y.astype(str)
        end = arrays.get("end")
        if end is not None and end.shape == (len(x),) and np.isfinite(end).all():
            order = np.argsort(end, kind="stable")  # time order, whatever the file's order
            x, names = x[order], names[order]
        ignored += int(np.sum(names == ""))
        for name in sorted(set(names.tolist()) - {""}):
            by_label.setdefault(name, []).append(x[names == name].astype(np.float32))
    if not by_label:
        raise ExtraDataError(
            f"no labelled windows in {', '.join(map(str, paths))} ({ignored} without a label): "
            "label them first (floorline/<gateway>/capture/label) and export with --labelled"
        )
    labels = trained + sorted(set(by_label) - set(trained))
    parts: dict[str, tuple[list[NDArray[np.float32]], list[NDArray[np.int64]]]] = {
        name: ([], []) for name in ("train", "validation", "parity")
    }
    counts: dict[str, int] = {}
    for name in sorted(by_label):
        x = np.concatenate(by_label[name])
        n = len(x)
        counts[name] = n
        cut_train = round(n * EXTRA_SPLIT[0])
        cut_val = round(n * (EXTRA_SPLIT[0] + EXTRA_SPLIT[1]))
        if cut_train < 1 or cut_val <= cut_train or cut_val >= n:
            raise ExtraDataError(
                f"label {name!r}: {n} windows are too few to train and hold some out (need 7 "
                "or more)"
            )
        code = labels.index(name)
        for split, piece in (("train", x[:cut_train]), ("validation", x[cut_train:cut_val]),
                             ("parity", x[cut_val:])):
            parts[split][0].append(piece)
            parts[split][1].append(np.full(len(piece), code, dtype=np.int64))
    splits = {k: (np.concatenate(xs), np.concatenate(ys)) for k, (xs, ys) in parts.items()}
    return Extra(labels, splits, counts, ignored)


def load_reference(paths: list[Path]) -> NDArray[np.float32]:
    """The windows of PATHS (their ``x``), checked to fit the example model."""
    windows = []
    for path in paths:
        x = _load_npz(path, ("x",))["x"]
        _check_windows(path, x)
        windows.append(x.astype(np.float32))
    reference = np.concatenate(windows)
    if len(reference) < MIN_REFERENCE_WINDOWS:
        raise ExtraDataError(
            f"{', '.join(map(str, paths))}: {len(reference)} windows, too few for a drift "
            f"reference (the converter needs at least {MIN_REFERENCE_WINDOWS})"
        )
    return reference


def add_extra(data: dict[str, Split], extra: Extra, per_class: int, seed: int) -> dict[str, Split]:
    """DATA with EXTRA's windows added; training oversamples each captured label to PER_CLASS.

    Calibration gets a share of the captured training windows, so an int8 model's ranges
    cover the new class too.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(len(data) + 1)[-1])
    out = dict(data)
    x_extra, y_extra = extra.splits["train"]
    picks = []
    for code in np.unique(y_extra):
        idx = np.flatnonzero(y_extra == code)
        reps = max(1, per_class // len(idx))
        picks.append(np.tile(idx, reps))
    train_idx = np.concatenate(picks)
    calib = rng.permutation(len(y_extra))[: max(1, len(data["calibration"][1]) // 4)]
    for split, (xs, ys) in (
        ("train", (x_extra[train_idx], y_extra[train_idx])),
        ("validation", extra.splits["validation"]),
        ("parity", extra.splits["parity"]),
        ("calibration", (x_extra[calib], y_extra[calib])),
    ):
        x0, y0 = out[split]
        out[split] = (np.concatenate([x0, xs]), np.concatenate([y0, ys]))
    return out


def bump_minor(version: str) -> str:
    """'1.0.0' -> '1.1.0'; a version that is not MAJOR.MINOR.PATCH gets '-retrained'."""
    parts = version.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        return f"{parts[0]}.{int(parts[1]) + 1}.0"
    return f"{version}-retrained"


Split = tuple[NDArray[np.float32], NDArray[np.int64]]


def build_datasets(seed: int, size: Sizes = FULL) -> dict[str, Split]:
    """Train, validation, parity and calibration windows (raw, in g) with labels."""
    sizes = {
        "train": size.train,
        "validation": size.validation,
        "parity": size.parity,
        "calibration": size.calibration,
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


def build_model(keras: Any, classes: int = len(CONDITIONS)) -> Any:
    """The classifier: three small convolutions, global average pooling, softmax (~6k params)."""
    layers = keras.layers
    inputs = keras.Input(shape=(WINDOW, len(FEATURES)), name="window")
    # Kernel 7 at 1 kHz spans a resonance cycle or two; the stride halves the time axis before
    # the wider layers, keeping the model small enough for a microcontroller-class gateway.
    h = layers.Conv1D(16, 7, activation="relu", name="conv1")(inputs)
    h = layers.Conv1D(32, 5, strides=2, activation="relu", name="conv2")(h)
    h = layers.Conv1D(32, 3, activation="relu", name="conv3")(h)
    h = layers.GlobalAveragePooling1D(name="pool")(h)
    outputs = layers.Dense(classes, activation="softmax", name="condition")(h)
    return keras.Model(inputs, outputs, name="pdm_classifier")


def confusion_matrix(
    y_true: NDArray[np.int64], y_pred: NDArray[np.int64], classes: int = len(CONDITIONS)
) -> NDArray[np.int64]:
    """Counts of (actual, predicted) label pairs."""
    n = classes
    matrix: NDArray[np.int64] = np.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n)
    return matrix


def format_confusion(matrix: NDArray[np.int64], names: list[str] | None = None) -> str:
    """The confusion matrix as a text table, actual labels down, predicted across."""
    names = names or [c.value for c in CONDITIONS]
    width = max(len(name) for name in names)
    corner = "actual / predicted"
    width = max(width, len(corner))
    lines = [f"{corner:<{width}}  " + "  ".join(f"{n:>{width}}" for n in names)]
    lines += [
        f"{name:<{width}}  " + "  ".join(f"{count:>{width}d}" for count in row)
        for name, row in zip(names, matrix, strict=True)
    ]
    return "\n".join(lines)


def write_card(
    path: Path,
    mean: list[float],
    std: list[float],
    *,
    extra: Extra | None = None,
    version: str | None = None,
) -> dict[str, Any]:
    """WORK/card.yaml: the packaged card template plus the computed normalization.

    With EXTRA, its labels (the new classes appended) and a note of what was added; the version
    is VERSION, or a minor step up from the template's with EXTRA. Returns the card.
    """
    template = importlib.resources.files("floorline.converter.examples").joinpath(CARD_TEMPLATE)
    card = yaml.safe_load(template.read_text(encoding="utf-8"))
    # The template and the signal generator must agree, or the bundle would mislabel classes.
    expected_features = [{"name": name, "unit": unit} for name, unit in FEATURES]
    if card.get("features") != expected_features or card.get("window") != WINDOW:
        raise ValueError(f"{CARD_TEMPLATE}: features/window differ from the demo's signals")
    if card.get("labels") != [c.value for c in CONDITIONS]:
        raise ValueError(f"{CARD_TEMPLATE}: labels differ from signals.CONDITIONS")
    if extra is not None:
        card["labels"] = list(extra.labels)
        added = ", ".join(f"{name}: {n}" for name, n in sorted(extra.counts.items()))
        card["description"] = (
            f"{card['description']} Retrained with windows captured on a gateway ({added})."
        )
    if version is not None:
        card["version"] = version
    elif extra is not None:
        card["version"] = bump_minor(str(card["version"]))
    card["normalization"] = {"mean": mean, "std": std}
    path.write_text(yaml.safe_dump(card, sort_keys=False), encoding="utf-8")
    return dict(card)


def main(argv: list[str] | None = None) -> int:
    """Train, save and convert the example model; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    size = QUICK if args.quick else FULL
    epochs = args.epochs if args.epochs is not None else size.epochs
    if epochs < 1:
        print("pdm: --epochs must be >= 1", file=sys.stderr)
        return 2
    targets = args.targets or (QUICK_TARGETS if args.quick else "tflite,onnx,tflite-int8")
    started = time.perf_counter()
    try:
        extra = load_extra(args.extra_data) if args.extra_data else None
        # Checked here, before any training, for the example's own message; the converter
        # reads the files themselves.
        reference = load_reference(args.reference_data) if args.reference_data else None
    except ExtraDataError as exc:
        print(f"pdm: {exc}", file=sys.stderr)
        return 2
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    data = build_datasets(args.seed, size)
    labels = extra.labels if extra is not None else [c.value for c in CONDITIONS]
    if extra is not None:
        new = [name for name in labels if name not in {c.value for c in CONDITIONS}]
        print(
            "extra data: "
            + ", ".join(f"{name} {n} windows" for name, n in sorted(extra.counts.items()))
            + f" ({extra.ignored} without a label left out); classes {labels}"
            + (f", new: {new}" if new else "")
        )
        data = add_extra(data, extra, size.train, args.seed)
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
    model = build_model(keras, len(labels))
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
        epochs=epochs,
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
    if extra is not None:
        for code, name in enumerate(labels):
            rows = y_parity == code
            if rows.any():
                print(f"  {name}: {float(np.mean(predicted[rows] == code)):.4f} on {rows.sum()}")
    print(format_confusion(confusion_matrix(y_parity, predicted, len(labels)), labels))
    print(f"training took {fit_seconds:.1f} s ({epochs} epochs)")
    floor = QUICK_MIN_ACCURACY if args.quick else MIN_ACCURACY
    if accuracy < floor:
        log.error("held-out accuracy %.4f is below %.2f; not converting", accuracy, floor)
        return 1

    model_path = work / "pdm.keras"
    card_path = work / "card.yaml"
    calibration_path = work / "calibration.npz"
    parity_path = work / "parity.npz"
    model.save(model_path)
    for path, (x, y) in ((calibration_path, data["calibration"]), (parity_path, data["parity"])):
        # Raw windows in g: the converter normalizes them with the card, as a gateway will.
        np.savez(path, x=x, y=y)
    data_files = ["--calibration", str(calibration_path), "--parity-data", str(parity_path)]
    if reference is not None:
        # The plant's own normal operation: what the gateway's drift detection compares with.
        for path in args.reference_data:
            data_files += ["--reference-data", str(path)]
        log.info("drift reference: %d windows of %s", len(reference),
                 ", ".join(map(str, args.reference_data)))
    else:
        # The synthetic sets are balanced classes, three quarters faults: not a plant's normal.
        data_files.append("--no-reference")
    card = write_card(card_path, mean, std, extra=extra, version=args.version)
    log.info("wrote %s, %s, %s and %s", model_path, card_path, calibration_path, parity_path)
    print(f"card: {card['name']} {card['version']}, labels {card['labels']}")

    from floorline.converter.cli import main as convert  # noqa: PLC0415 - imports the converter stack

    status = convert(
        [
            "keras",
            str(model_path),
            "--card",
            str(card_path),
            *data_files,
            "--targets",
            targets,
            "--out",
            str(args.out),
            "--force",
        ]
    )
    print(f"total {time.perf_counter() - started:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
