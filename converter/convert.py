"""One conversion, start to finish: source → artifacts → parity → golden → signed bundle.

Nothing lands at the output path unless every artifact passed parity: all work happens in a
staging directory beside it, renamed into place at the end
(``floorline.edge.bundle.bundle.commit``). The finished
bundle is then opened and self-tested exactly as a gateway would, as the last check.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from numpy.typing import NDArray

from floorline.converter import data, drift_summary
from floorline.converter.card import ModelCard
from floorline.converter.errors import (
    CalibrationDataError,
    ConversionError,
    ModelCardError,
    ParityError,
)
from floorline.converter.onnx_export import DEFAULT_OPSET, export_onnx
from floorline.converter.outputs import match_outputs
from floorline.converter.parity import (
    ParityPolicy,
    check_artifact,
    format_table,
    head_tolerances,
    selftest_atol,
)
from floorline.converter.progress import step
from floorline.converter.specs import build_specs, finish_heads
from floorline.converter.tflite_export import IntegerIO, export_tflite
from floorline.edge import __version__
from floorline.edge.backends.base import join_outputs
from floorline.edge.bundle import selftest
from floorline.edge.bundle.archive import pack
from floorline.edge.bundle.bundle import (
    GOLDEN_FILE,
    Bundle,
    Golden,
    commit,
    describe_artifact,
    staging_dir,
)
from floorline.edge.bundle.hashing import sha256_file
from floorline.edge.bundle.manifest import (
    FEATURES_SCHEMA,
    SCHEMA_VERSION,
    Artifact,
    ArtifactFormat,
    GoldenInfo,
    InputSpec,
    Manifest,
    ParityReport,
    Quantization,
    SourceFormat,
    SourceInfo,
)
from floorline.edge.stream.normalization import model_input

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One artifact the converter can produce."""

    file: str
    format: ArtifactFormat
    quantization: Quantization


TARGETS: dict[str, Target] = {
    "tflite": Target("model.tflite", "tflite", "float32"),
    "tflite-fp16": Target("model.fp16.tflite", "tflite", "float16"),
    "tflite-dynamic": Target("model.dynamic.tflite", "tflite", "dynamic"),
    "tflite-int8": Target("model.int8.tflite", "tflite", "int8"),
    "onnx": Target("model.onnx", "onnx", "float32"),
}
"""Target names accepted by --targets, in manifest order (float TFLite first: the default)."""

_SYNTHETIC_PARITY_SAMPLES = 256
PARITY_WINDOWS = 256
"""Windows held out of the calibration data for parity when it has enough (see ``_split``)."""
_FEW_WINDOWS = 100

SourceKind = Literal["keras", "sklearn"]


class Source(Protocol):
    """A loaded source model: a Keras model (converter.source) or a scikit-learn one."""

    path: Path
    sha256: str
    input_shape: tuple[int | None, ...]
    output_shapes: list[tuple[int | None, ...]]
    output_names: list[str]
    normalization: tuple[list[float], list[float]] | None
    notes: list[str]

    @property
    def format(self) -> str:
        """The manifest's source format: keras, h5, savedmodel or sklearn."""
        ...

    def predict(self, x: NDArray[np.float32]) -> list[NDArray[np.float32]]:
        """The source model's outputs for model inputs X, one array per head."""
        ...


@dataclass
class ConvertRequest:
    """Everything a conversion needs; the CLI builds one from flags."""

    source: Path
    out: Path
    card: ModelCard
    targets: list[str] = field(default_factory=lambda: ["tflite", "onnx"])
    calibration: Path | None = None
    parity_data: Path | None = None
    reference_data: list[Path] = field(default_factory=list)
    """Windows of the plant's normal operation, the drift reference's only data (empty: the
    calibration and parity data make it, as before)."""
    no_reference: bool = False
    """Write no drift reference (``--no-reference``)."""
    opset: int = DEFAULT_OPSET
    integer_io: IntegerIO = "int8"
    policy: ParityPolicy = field(default_factory=ParityPolicy)
    signing_key: Ed25519PrivateKey | None = None
    pack: bool = False
    force: bool = False
    seed: int = 0
    golden_samples: int = 16
    max_parity_samples: int = 2000
    max_calibration_samples: int = 500
    kind: SourceKind = "keras"
    loaded: Any = None
    """The source already loaded from ``source`` (the CLI loads a scikit-learn model early)."""


@dataclass
class ConvertResult:
    """What a conversion wrote and measured."""

    bundle: Path
    archive: Path | None
    parity_table: str
    selftests: list[selftest.SelfTestReport]
    seconds: dict[str, float] = field(default_factory=dict)
    """Per target: export plus parity check, in seconds."""
    parity: dict[str, ParityReport] = field(default_factory=dict)
    """Per target: its parity report."""


def check_targets(names: list[str], kind: SourceKind = "keras") -> list[str]:
    """NAMES in manifest order, or ConversionError naming --targets."""
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise ConversionError(
            f"--targets: unknown target(s) {', '.join(unknown)}; choose from "
            f"{', '.join(TARGETS)} or 'all'"
        )
    if not names:
        raise ConversionError("--targets: no targets to convert to")
    if kind == "sklearn" and names != ["onnx"]:
        raise ConversionError(
            "--targets: a scikit-learn model converts to onnx only (TFLite has no tree or "
            "estimator ops); use --targets onnx"
        )
    return [n for n in TARGETS if n in names]


def _split(
    inputs: NDArray[np.float32], rng: np.random.Generator, say: Callable[[str], None]
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    # Calibration file only: hold out PARITY_WINDOWS (or a fifth, if more) for parity, so int8
    # is not judged on its own data, as long as as many remain to calibrate with. With less
    # data, parity runs on all of it: weaker (int8 saw it), but 25 windows would make one
    # disagreement a 4 % drop and the verdict a coin toss.
    n = len(inputs)
    order = rng.permutation(n)
    cut = max(PARITY_WINDOWS, n // 5)
    if n - cut >= PARITY_WINDOWS:
        say(f"parity: no --parity-data; holding out {cut} of {n} calibration windows")
        return inputs[order[cut:]], inputs[order[:cut]]
    say(
        f"parity: no --parity-data and only {n} calibration windows (fewer than "
        f"{2 * PARITY_WINDOWS}); checking parity on all of them, which also calibrate int8: "
        "pass --parity-data with held-out windows for an independent check"
    )
    return inputs, inputs


def _prepare_data(
    req: ConvertRequest, spec: InputSpec, rng: np.random.Generator, say: Callable[[str], None]
) -> tuple[NDArray[np.float32] | None, NDArray[np.float32]]:
    # With a feature stage these are raw windows (the caller computes the model's inputs), so the
    # golden file can hold what a gateway's windows hold.
    read = data.load_windows if spec.preprocessing is not None else data.load_inputs
    calibration = (
        read(req.calibration, spec, origin="calibration data") if req.calibration else None
    )
    if req.parity_data:
        parity = read(req.parity_data, spec, origin="parity data")
    elif calibration is not None:
        calibration, parity = _split(calibration, rng, say)
    else:
        shape = (_SYNTHETIC_PARITY_SAMPLES, *(d for d in spec.shape[1:] if d is not None))
        parity = rng.standard_normal(shape).astype(np.float32)
        say(
            "parity: no --parity-data or --calibration; using seeded N(0,1) inputs "
            "(real held-out data gives a more meaningful check)"
        )
    if "tflite-int8" in req.targets and calibration is None:
        raise CalibrationDataError("target tflite-int8 needs representative data: --calibration")
    if calibration is not None and len(calibration) > req.max_calibration_samples:
        calibration = calibration[rng.permutation(len(calibration))[: req.max_calibration_samples]]
    if len(parity) > req.max_parity_samples:
        parity = parity[rng.permutation(len(parity))[: req.max_parity_samples]]
    if len(parity) < _FEW_WINDOWS:
        say(
            f"warning: parity on only {len(parity)} windows: one disagreement costs "
            f"{100 / len(parity):.1f} % of agreement; {PARITY_WINDOWS} or more give a verdict "
            "that does not depend on --seed"
        )
    return calibration, parity


def _export(
    target: Target,
    source: Any,
    staging: Path,
    calibration: NDArray[np.float32] | None,
    req: ConvertRequest,
) -> tuple[int | None, int | None]:
    """Write one artifact; return (ONNX opset, quantized weight tensors) as known."""
    path = staging / target.file
    if target.format == "onnx":
        if req.kind == "sklearn":
            return source.export_onnx(path, opset=req.opset), None
        return export_onnx(source, path, opset=req.opset), None
    info = export_tflite(
        source, target.quantization, path, calibration=calibration, integer_io=req.integer_io
    )
    return None, info.quantized_tensors


def _check_feature_names(source: Any, spec: InputSpec) -> None:
    # A model fitted on a DataFrame of features knows their order: it must be the stage's, or
    # every column would feed the wrong input and parity (same features both sides) could not tell.
    known = getattr(source, "feature_names", None)
    stage = spec.preprocessing
    if stage is None or not known or list(known) == stage.names:
        return
    diff = next(
        (f"column {i} is {a!r}, the stage's {b!r}"
         for i, (a, b) in enumerate(zip(known, stage.names, strict=False)) if a != b),
        f"{len(known)} columns for {len(stage.names)} features",
    )
    raise ModelCardError(
        f"card preprocessing: the model was fitted on features in another order ({diff}); "
        "train on the columns of features.feature_names(stage, channels), in that order"
    )


def load(req: ConvertRequest) -> Any:
    """The source model REQ names, loaded by the loader of its kind."""
    if req.loaded is not None:
        return req.loaded
    if req.kind == "sklearn":
        from floorline.converter.sklearn_source import load_sklearn  # noqa: PLC0415

        return load_sklearn(req.source)
    from floorline.converter.source import load_source  # noqa: PLC0415 - imports TensorFlow

    return load_source(req.source)


def convert(req: ConvertRequest, say: Callable[[str], None] = print) -> ConvertResult:
    """Run a conversion; raise a ConversionError subclass (and write nothing) on any failure."""
    targets = check_targets(req.targets, req.kind)
    if req.out.exists() and not req.force:
        raise ConversionError(f"--out: {req.out} exists; use --force to replace it")
    rng = np.random.default_rng(req.seed)
    with step("loading the model", say):
        source: Source = load(req)
    for note in source.notes:
        say(f"note: {note}")
    input_spec, drafts = build_specs(
        req.card, source.input_shape, source.output_shapes, source.output_names,
        source.normalization,
    )
    _check_feature_names(source, input_spec)
    calibration, parity_inputs = _prepare_data(req, input_spec, rng, say)
    reference_data = drift_summary.load_reference_data(req, input_spec, say)
    windows = parity_inputs  # what a gateway's windows hold: raw with a feature stage
    if input_spec.preprocessing is not None:
        with step(f"features of {len(parity_inputs)} parity windows", say):
            parity_inputs = model_input(windows, input_spec)
            if calibration is not None:
                calibration = model_input(calibration, input_spec)
    with step(f"source model on {len(parity_inputs)} parity windows", say):
        source_parts = source.predict(parity_inputs)
    needs_calibration_scores = any(d.metric and d.threshold is None for d in drafts)
    heads = finish_heads(
        drafts,
        calibration,
        source.predict(calibration)
        if needs_calibration_scores and calibration is not None
        else None,
    )
    for head in heads:
        if head.score is not None and head.score.percentile is not None:
            say(
                f"{head.name}: anomaly threshold {head.score.threshold:.6g} = "
                f"p{head.score.percentile:g} of {head.score.metric} on the calibration data"
            )
    source_outputs = join_outputs(source_parts)
    golden_idx = np.sort(
        rng.choice(len(parity_inputs), min(req.golden_samples, len(parity_inputs)), replace=False)
    )
    # Golden inputs are the windows (raw with a stage): the gateway's self-test runs the stage too.
    golden = Golden(inputs=windows[golden_idx], source_outputs=source_outputs[golden_idx])
    golden_model_inputs = parity_inputs[golden_idx]

    artifacts: list[Artifact] = []
    rows: list[tuple[str, str, ParityReport]] = []
    seconds: dict[str, float] = {}
    with staging_dir(req.out) as staging:
        for name in targets:
            target = TARGETS[name]
            with step(f"exporting {name} → {target.file}", say) as export_timer:
                opset, quantized = _export(target, source, staging, calibration, req)
            if quantized == 0 and target.quantization != "float32":
                say(
                    f"warning: {name}: no weight tensor was quantized (TFLite leaves tensors "
                    "under 1024 values as float): this artifact is float32 in all but name"
                )
            outputs = match_outputs(
                staging / target.file, target.format, heads, parity_inputs, source_parts
            )
            tolerances = head_tolerances(req.policy, target.quantization, heads, source_outputs)
            with step(f"parity {name}", say) as parity_timer:
                report, backend = check_artifact(
                    staging / target.file,
                    target.format,
                    parity_inputs,
                    source_outputs,
                    heads,
                    tolerances,
                    tuple(outputs or ()),
                )
            try:
                golden.expected[target.file] = backend.infer(golden_model_inputs)
                atol = selftest_atol(target.quantization, backend)
            finally:
                backend.close()
            rows.append((target.file, target.quantization, report))
            seconds[name] = export_timer.elapsed + parity_timer.elapsed
            artifacts.append(
                describe_artifact(
                    staging,
                    target.file,
                    format=target.format,
                    quantization=target.quantization,
                    opset=opset,
                    selftest_atol=atol,
                    parity=report,
                    outputs=outputs,
                    quantized_tensors=quantized if target.quantization != "float32" else None,
                )
            )
        table = format_table(rows)
        failed = [file for file, _, rep in rows if not rep.passed]
        if failed:
            raise ParityError(
                f"parity failed for {', '.join(failed)}; no bundle was written.\n{table}"
            )
        golden.save(staging / GOLDEN_FILE)
        fmt: SourceFormat = source.format  # type: ignore[assignment]
        reference = drift_summary.reference(reference_data, input_spec, heads, source, say)
        # Schema 3 only for what a schema 2 gateway cannot read: the rest stays readable by all.
        newer = input_spec.preprocessing is not None or reference is not None
        manifest = Manifest(
            schema_version=FEATURES_SCHEMA if newer else SCHEMA_VERSION,
            name=req.card.name,
            version=req.card.version,
            task=heads[0].task,
            description=req.card.description,
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            converter_version=__version__,
            source=SourceInfo(format=fmt, name=req.source.name, sha256=source.sha256),
            input=input_spec,
            outputs=heads,
            artifacts=artifacts,
            golden=GoldenInfo(
                file=GOLDEN_FILE,
                sha256=sha256_file(staging / GOLDEN_FILE),
                samples=len(golden.inputs),
            ),
            reference=reference,
        )
        commit(staging, req.out, manifest, signing_key=req.signing_key, overwrite=req.force)

    try:
        with step("gateway self-test of the bundle", say):
            reports = _verify_as_gateway(req)
    except Exception:
        # The converter's own bundle failing the gateway's checks is a bug; never leave it behind.
        shutil.rmtree(req.out, ignore_errors=True)
        raise
    archive = pack(req.out, req.out.with_name(req.out.name + ".tar")) if req.pack else None
    return ConvertResult(
        bundle=req.out,
        archive=archive,
        parity_table=table,
        selftests=reports,
        seconds=seconds,
        parity={name: rep for name, (_, _, rep) in zip(targets, rows, strict=True)},
    )


def _verify_as_gateway(req: ConvertRequest) -> list[selftest.SelfTestReport]:
    trusted = [req.signing_key.public_key()] if req.signing_key else None
    reports = []
    with Bundle.open(req.out, trusted_keys=trusted, require_signature=bool(trusted)) as bundle:
        for art in bundle.manifest.artifacts:
            loaded = selftest.load(bundle, artifact=art.file)
            loaded.backend.close()
            reports.append(loaded.selftest)
    return reports
