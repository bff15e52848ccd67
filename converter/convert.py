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

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from numpy.typing import NDArray

from floorline.converter import data
from floorline.converter.card import ModelCard, build_specs
from floorline.converter.errors import CalibrationDataError, ConversionError, ParityError
from floorline.converter.onnx_export import DEFAULT_OPSET, export_onnx
from floorline.converter.parity import ParityPolicy, check_artifact, format_table, selftest_atol
from floorline.converter.parity import tolerance_for as parity_tolerance
from floorline.converter.source import SourceModel, load_source
from floorline.converter.tflite_export import IntegerIO, export_tflite
from floorline.edge import __version__
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
    SCHEMA_VERSION,
    Artifact,
    ArtifactFormat,
    GoldenInfo,
    InputSpec,
    Manifest,
    ParityReport,
    Quantization,
    SourceInfo,
)

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


@dataclass
class ConvertRequest:
    """Everything a conversion needs; the CLI builds one from flags."""

    source: Path
    out: Path
    card: ModelCard
    targets: list[str] = field(default_factory=lambda: ["tflite", "onnx"])
    calibration: Path | None = None
    parity_data: Path | None = None
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


@dataclass
class ConvertResult:
    """What a conversion wrote and measured."""

    bundle: Path
    archive: Path | None
    parity_table: str
    selftests: list[selftest.SelfTestReport]


def _check_targets(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise ConversionError(
            f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)} or 'all'"
        )
    if not names:
        raise ConversionError("no targets to convert to")
    return [n for n in TARGETS if n in names]


def _split(
    inputs: NDArray[np.float32], rng: np.random.Generator
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    # Calibration file only: hold out a fifth for parity, so int8 is not judged on its own data.
    order = rng.permutation(len(inputs))
    cut = max(1, len(inputs) // 5)
    return inputs[order[cut:]], inputs[order[:cut]]


def _prepare_data(
    req: ConvertRequest, spec: InputSpec, rng: np.random.Generator, say: Callable[[str], None]
) -> tuple[NDArray[np.float32] | None, NDArray[np.float32]]:
    calibration = (
        data.load_inputs(req.calibration, spec, origin="calibration data")
        if req.calibration
        else None
    )
    if req.parity_data:
        parity = data.load_inputs(req.parity_data, spec, origin="parity data")
    elif calibration is not None and len(calibration) >= 2:
        calibration, parity = _split(calibration, rng)
        say(f"parity: no --parity-data; holding out {len(parity)} calibration inputs")
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
    return calibration, parity


def _export(
    name: str,
    target: Target,
    source: SourceModel,
    staging: Path,
    calibration: NDArray[np.float32] | None,
    req: ConvertRequest,
) -> int | None:
    path = staging / target.file
    if target.format == "onnx":
        return export_onnx(source, path, opset=req.opset)
    export_tflite(
        source,
        target.quantization,
        path,
        calibration=calibration,
        integer_io=req.integer_io,
    )
    del name
    return None


def convert(req: ConvertRequest, say: Callable[[str], None] = print) -> ConvertResult:
    """Run a conversion; raise a ConversionError subclass (and write nothing) on any failure."""
    targets = _check_targets(req.targets)
    if req.out.exists() and not req.force:
        raise ConversionError(f"{req.out} exists; use --force to replace it")
    rng = np.random.default_rng(req.seed)
    source = load_source(req.source)
    input_spec, output_spec = build_specs(req.card, source.input_shape, source.output_shape)
    calibration, parity_inputs = _prepare_data(req, input_spec, rng, say)
    source_outputs = source.predict(parity_inputs)
    golden_idx = np.sort(
        rng.choice(len(parity_inputs), min(req.golden_samples, len(parity_inputs)), replace=False)
    )
    golden = Golden(
        inputs=parity_inputs[golden_idx],
        source_outputs=source_outputs[golden_idx],
    )

    artifacts: list[Artifact] = []
    rows: list[tuple[str, str, ParityReport]] = []
    with staging_dir(req.out) as staging:
        for name in targets:
            target = TARGETS[name]
            say(f"exporting {name} → {target.file}")
            opset = _export(name, target, source, staging, calibration, req)
            tolerance = parity_tolerance(
                req.policy, target.quantization, req.card.task, source_outputs
            )
            report, backend = check_artifact(
                staging / target.file,
                target.format,
                parity_inputs,
                source_outputs,
                req.card.task,
                tolerance,
            )
            try:
                golden.expected[target.file] = backend.infer(golden.inputs)
                atol = selftest_atol(target.quantization, backend)
            finally:
                backend.close()
            rows.append((target.file, target.quantization, report))
            artifacts.append(
                describe_artifact(
                    staging,
                    target.file,
                    format=target.format,
                    quantization=target.quantization,
                    opset=opset,
                    selftest_atol=atol,
                    parity=report,
                )
            )
        table = format_table(rows)
        failed = [file for file, _, rep in rows if not rep.passed]
        if failed:
            raise ParityError(
                f"parity failed for {', '.join(failed)}; no bundle was written.\n{table}"
            )
        golden.save(staging / GOLDEN_FILE)
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            name=req.card.name,
            version=req.card.version,
            task=req.card.task,
            description=req.card.description,
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            converter_version=__version__,
            source=SourceInfo(format=source.format, name=req.source.name, sha256=source.sha256),
            input=input_spec,
            output=output_spec,
            artifacts=artifacts,
            golden=GoldenInfo(
                file=GOLDEN_FILE,
                sha256=sha256_file(staging / GOLDEN_FILE),
                samples=len(golden.inputs),
            ),
        )
        commit(staging, req.out, manifest, signing_key=req.signing_key, overwrite=req.force)

    try:
        reports = _verify_as_gateway(req)
    except Exception:
        # The converter's own bundle failing the gateway's checks is a bug; never leave it behind.
        shutil.rmtree(req.out, ignore_errors=True)
        raise
    archive = pack(req.out, req.out.with_name(req.out.name + ".tar")) if req.pack else None
    return ConvertResult(bundle=req.out, archive=archive, parity_table=table, selftests=reports)


def _verify_as_gateway(req: ConvertRequest) -> list[selftest.SelfTestReport]:
    trusted = [req.signing_key.public_key()] if req.signing_key else None
    reports = []
    with Bundle.open(req.out, trusted_keys=trusted, require_signature=bool(trusted)) as bundle:
        for art in bundle.manifest.artifacts:
            loaded = selftest.load(bundle, artifact=art.file)
            loaded.backend.close()
            reports.append(loaded.selftest)
    return reports
