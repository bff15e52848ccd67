"""The converter's model zoo: every shape plants train, through ``convert()`` to every target.

    .venv/bin/python -m tests.zoo [--out DIR] [--json FILE] [NAME ...]   # prints the table

Each model of ``tests.keras_zoo`` and ``tests.sklearn_zoo`` is converted once per target it
supports (a bundle per target, so one target's failure does not hide the others'), with the
issue's bounds: float32 max error <= 1e-5 (2e-6 of the output's size for large regression
outputs), quantized classifiers >= 99 % top-1 agreement, on >= 256 held-out windows. Every
bundle is then opened as a gateway opens it (hashes, golden self-test on the gateway's own
runtime) and its parity windows are turned into prediction messages by the gateway's code
(``HeadLayout`` and ``PredictionEncoder``), checked to carry every head. ``tests/test_zoo.py``
runs this and asserts every cell passes; the table in the issue note comes from ``main``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from floorline.converter.card import ModelCard
from floorline.converter.convert import TARGETS, ConvertRequest, convert
from floorline.converter.errors import ConversionError
from floorline.converter.parity import ParityPolicy
from floorline.edge.bundle import selftest
from floorline.edge.bundle.bundle import Bundle
from floorline.edge.stream.encode import PredictionEncoder
from floorline.edge.stream.heads import HeadLayout
from floorline.edge.stream.window import Window

PARITY_WINDOWS = 320
KERAS_TARGETS = list(TARGETS)
FEATURES = [{"name": n, "unit": u} for n, u in (("accel_x", "g"), ("accel_y", "g"),
                                                 ("temp", "degC"))]
LABELS = ["normal", "ramp", "sine"]


@dataclass(frozen=True)
class Model:
    """One zoo entry: how to make it and the card that describes it."""

    name: str
    kind: str  # keras | sklearn
    make: Callable[[Path], tuple[Path, np.ndarray, np.ndarray]]
    """Writes the model under the directory; returns (path, calibration, parity) raw inputs."""
    card: dict[str, Any]
    shape: str
    """What the table calls it."""


@dataclass
class Row:
    """One cell of the table: a model converted to one target."""

    model: str
    shape: str
    target: str
    ok: bool
    max_error: float | None
    agreement: str
    seconds: float
    detail: str = ""


def _keras(maker: str, raw: bool = False) -> Callable[[Path], tuple[Path, np.ndarray, np.ndarray]]:
    def make(root: Path) -> tuple[Path, np.ndarray, np.ndarray]:
        from tests import keras_zoo  # noqa: PLC0415 - imports TensorFlow

        made = getattr(keras_zoo, f"make_{maker}")(root)
        fresh = keras_zoo.raw_windows if raw else keras_zoo.windows
        return made.path, made.x, fresh(PARITY_WINDOWS, 977)[0]

    return make


def _sklearn(maker: str) -> Callable[[Path], tuple[Path, np.ndarray, np.ndarray]]:
    def make(root: Path) -> tuple[Path, np.ndarray, np.ndarray]:
        from tests import sklearn_zoo  # noqa: PLC0415

        path = sklearn_zoo.save(sklearn_zoo.ZOO[maker].make(), root, maker)
        x, _, _ = sklearn_zoo.features(600, 3)
        return path, x.astype(np.float32), sklearn_zoo.held_out(PARITY_WINDOWS, 99)

    return make


_CLASSIFIER = {"task": "classification", "features": FEATURES, "labels": LABELS}
_AUTOENCODER = {"task": "anomaly", "features": FEATURES, "score": {"percentile": 99.0}}
_SKL_FEATURES = ["rms_g", "peak_g", "crest_factor", "kurtosis", "temperature_c", "dominant_hz"]
_SKL_STATES = ["bearing_wear", "imbalance", "normal"]  # sklearn's classes_, sorted

ZOO: list[Model] = [
    Model("simple_rnn", "keras", _keras("simple_rnn"), _CLASSIFIER, "SimpleRNN classifier"),
    Model("gru", "keras", _keras("gru"), _CLASSIFIER, "GRU classifier"),
    Model("lstm", "keras", _keras("lstm"), _CLASSIFIER, "LSTM classifier"),
    Model("bidirectional_lstm", "keras", _keras("bidirectional_lstm"), _CLASSIFIER,
          "Bidirectional LSTM classifier"),
    Model("stacked_gru", "keras", _keras("stacked_gru"), _CLASSIFIER, "stacked GRU classifier"),
    Model("dense_autoencoder", "keras", _keras("dense_autoencoder"), _AUTOENCODER,
          "dense autoencoder (score on gateway)"),
    Model("lstm_autoencoder", "keras", _keras("lstm_autoencoder"), _AUTOENCODER,
          "LSTM autoencoder (score on gateway)"),
    Model("two_head", "keras", _keras("two_head"), {
        "features": FEATURES,
        "outputs": [
            {"name": "fault", "task": "classification", "labels": LABELS},
            {"name": "rul", "task": "regression", "units": ["h"]},
        ],
    }, "two heads: fault class + RUL"),
    Model("normalized", "keras", _keras("normalized", raw=True), _CLASSIFIER,
          "Normalization layer (folded)"),
    Model("rescaled", "keras", _keras("rescaled", raw=True), _CLASSIFIER,
          "Rescaling layer (folded)"),
    Model("sk_rf_classifier", "sklearn", _sklearn("rf_classifier"),
          {"task": "classification", "features": _SKL_FEATURES, "labels": _SKL_STATES},
          "RandomForestClassifier"),
    Model("sk_hgb_regressor", "sklearn", _sklearn("hgb_regressor"),
          {"task": "regression", "features": _SKL_FEATURES, "units": ["%"]},
          "HistGradientBoostingRegressor"),
    Model("sk_logistic", "sklearn", _sklearn("logistic"),
          {"task": "classification", "features": _SKL_FEATURES, "labels": _SKL_STATES},
          "StandardScaler + LogisticRegression"),
    Model("sk_scaler_gb", "sklearn", _sklearn("scaler_gb_classifier"),
          {"task": "classification", "features": _SKL_FEATURES, "labels": _SKL_STATES},
          "StandardScaler + GradientBoostingClassifier"),
    Model("sk_pca_iforest", "sklearn", _sklearn("scaler_pca_iforest"),
          {"task": "anomaly", "features": _SKL_FEATURES, "thresholds": {"anomaly": 0.0}},
          "StandardScaler + PCA + IsolationForest"),
    Model("sk_pca", "sklearn", _sklearn("scaler_pca"),
          {"task": "regression", "features": _SKL_FEATURES}, "StandardScaler + PCA"),
]


def _agreement(report: Any) -> str:
    heads = report.heads or {}
    verdicts = next((h.verdict_agreement for h in heads.values()
                     if h.verdict_agreement is not None), None)
    share = report.top1_agreement if verdicts is None else verdicts
    if share is None:
        return "-"
    what = "verdicts " if verdicts is not None else ""
    return f"{what}{round(share * report.samples)}/{report.samples}"


def gateway_messages(bundle_dir: Path, parity: np.ndarray) -> list[dict[str, Any]]:
    """Open BUNDLE_DIR as a gateway does and encode its first parity windows as predictions."""
    from floorline.edge.stream.normalization import normalize  # noqa: PLC0415

    with Bundle.open(bundle_dir) as bundle:
        loaded = selftest.load(bundle)
        try:
            x = normalize(parity[:8], bundle.manifest.input)
            values = HeadLayout(bundle.manifest).values(x, loaded.backend.infer(x))
        finally:
            loaded.backend.close()
        encoder = PredictionEncoder(
            gateway="zoo", pipeline="p", manifest=bundle.manifest, artifact=loaded.artifact,
            topic_template="t/{asset}",
        )
        windows = [Window("a", np.zeros(1), 0.0, 1.0, 1.0, i) for i in range(len(x))]
        payloads = encoder.encode_batch(windows, values, inference_ms=1.0, now=2.0)
        docs = [orjson.loads(p) for p in payloads]
        heads = bundle.manifest.heads
        for doc in docs:
            fields = doc["heads"] if len(heads) > 1 else {heads[0].name: doc}
            assert set(fields) == {h.name for h in heads}
        return docs


def convert_one(model: Model, target: str, source: Path, calibration: np.ndarray,
                parity: np.ndarray, work: Path) -> Row:
    """Convert SOURCE to one TARGET, then run the bundle as a gateway; one table cell."""
    np.save(work / "calibration.npy", calibration)
    np.save(work / "parity.npy", parity)
    out = work / f"{model.name}-{target}"
    card = ModelCard.model_validate({"name": model.name.replace("_", "-"), **model.card})
    request = ConvertRequest(
        source=source, out=out, card=card, targets=[target],
        calibration=work / "calibration.npy", parity_data=work / "parity.npy",
        policy=ParityPolicy(atol=1e-5), force=True, kind=model.kind,  # type: ignore[arg-type]
    )
    start = time.monotonic()
    try:
        result = convert(request, say=lambda _m: None)
    except ConversionError as exc:
        return Row(model.name, model.shape, target, False, None, "-",
                   time.monotonic() - start, str(exc).splitlines()[0])
    report = result.parity[target]
    gateway_messages(out, parity)
    with Bundle.open(out) as bundle:
        quantized = bundle.manifest.artifacts[0].quantized_tensors
    note = "nothing quantized (said so)" if quantized == 0 else ""
    return Row(model.name, model.shape, target, report.passed, report.max_abs_error,
               _agreement(report), result.seconds[target], note)


def run(names: list[str] | None, work: Path) -> list[Row]:
    """Every cell for the zoo models NAMES (all when None)."""
    rows = []
    for model in ZOO:
        if names and model.name not in names:
            continue
        directory = work / model.name
        directory.mkdir(parents=True, exist_ok=True)
        source, calibration, parity = model.make(directory)
        targets = ["onnx"] if model.kind == "sklearn" else KERAS_TARGETS
        rows.extend(convert_one(model, t, source, calibration, parity, directory)
                    for t in targets)
    return rows


def table(rows: list[Row]) -> str:
    """The markdown table of the issue note: shape x target."""
    lines = ["| model | target | result | max abs err | agreement | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        err = "-" if r.max_error is None or math.isnan(r.max_error) else f"{r.max_error:.1e}"
        verdict = ("ok" + (f", {r.detail}" if r.detail else "")) if r.ok else f"FAIL: {r.detail}"
        lines.append(f"| {r.shape} | {r.target} | {verdict} | {err} | {r.agreement} | "
                     f"{r.seconds:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the zoo table; exit 1 if any cell failed."""
    parser = argparse.ArgumentParser(prog="python -m tests.zoo")
    parser.add_argument("names", nargs="*", help="zoo models (default: all)")
    parser.add_argument("--out", type=Path, help="keep the bundles here")
    parser.add_argument("--json", type=Path, help="also write the cells here (tests/test_zoo.py)")
    args = parser.parse_args(argv)
    work = args.out or Path(tempfile.mkdtemp(prefix="floorline-zoo-"))
    rows = run(args.names or None, work)
    print(table(rows))
    if args.json is not None:
        # Written whole, then renamed: a reader never sees half a table.
        part = args.json.with_suffix(".part")
        part.write_bytes(orjson.dumps([asdict(r) for r in rows]))
        part.replace(args.json)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
