"""Parity: every artifact, run by the gateway's own backends, against the source model.

Tolerances by default:
- float32 artifacts (TFLite float32, ONNX): max absolute error <= 1e-4;
- weight- or fully-quantized artifacts (float16, dynamic, int8): for classifiers, top-1 agreement
  with the source >= 99 %; for regression and anomaly models, max absolute error <= 5 % of the
  source outputs' range on the parity set (or the user's --quantized-atol).
float16 counts as quantized: its weights lose precision, so a 1e-4 bound would reject every fp16
artifact while the classifications it makes are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from floorline.converter.progress import Progress
from floorline.edge import backends
from floorline.edge.backends import Backend
from floorline.edge.bundle.manifest import (
    ArtifactFormat,
    ParityReport,
    Quantization,
    Task,
    Tolerance,
)
from floorline.edge.cli import table as text_table

_BATCH = 64
_RANGE_FRACTION = 0.05


@dataclass(frozen=True)
class ParityPolicy:
    """User-settable parity bounds (see the module docstring for the defaults)."""

    atol: float = 1e-4
    min_agreement: float = 0.99
    quantized_atol: float | None = None


def tolerance_for(
    policy: ParityPolicy,
    quantization: Quantization,
    task: Task,
    source_outputs: NDArray[np.float32],
) -> Tolerance:
    """The bounds one artifact must meet."""
    if quantization == "float32":
        return Tolerance(max_abs_error=policy.atol)
    if task is Task.CLASSIFICATION:
        return Tolerance(min_agreement=policy.min_agreement)
    if policy.quantized_atol is not None:
        return Tolerance(max_abs_error=policy.quantized_atol)
    spread = float(np.ptp(source_outputs)) if source_outputs.size else 0.0
    return Tolerance(max_abs_error=max(spread * _RANGE_FRACTION, policy.atol))


def selftest_atol(quantization: Quantization, backend: Backend) -> float:
    """How far a gateway's runtime may drift from this artifact's golden outputs.

    Float kernels differ between CPUs only in summation order (~1e-6); fp16 weights may run in fp16
    arithmetic on ARM; hybrid (dynamic) kernels quantize activations on the fly; integer outputs may
    round one step either way.
    """
    out_quant = backend.output_spec.quant
    if out_quant is not None:
        return max(2.0 * out_quant.scale, 1e-4)
    return {"float32": 1e-4, "float16": 5e-3, "dynamic": 1e-2, "int8": 1e-2}[quantization]


def backend_name(fmt: ArtifactFormat) -> str:
    """The gateway backend that runs FMT: LiteRT for TFLite, ONNX Runtime for ONNX."""
    return backends.backend_for_format(fmt)


def run_batched(
    backend: Backend, inputs: NDArray[np.float32], label: str | None = None
) -> NDArray[np.float32]:
    """BACKEND's outputs for INPUTS, in pipeline-sized batches, with a progress bar if LABEL."""
    parts = []
    with Progress(label or "", len(inputs)) if label else _NoProgress() as bar:
        for i in range(0, len(inputs), _BATCH):
            chunk = inputs[i : i + _BATCH]
            parts.append(backend.infer(chunk))
            bar.advance(len(chunk))
    return np.concatenate(parts)


class _NoProgress:
    def advance(self, steps: int = 1) -> None:
        del steps

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *args: object) -> None:
        del args


def measure(
    name: str,
    got: NDArray[np.float32],
    source_outputs: NDArray[np.float32],
    task: Task,
    tolerance: Tolerance,
) -> ParityReport:
    """Compare an artifact's outputs with the source model's and decide pass or fail."""
    diff = np.abs(got.astype(np.float64) - source_outputs.astype(np.float64))
    max_err = float(diff.max()) if np.isfinite(diff).all() else float("inf")
    mean_err = float(diff.mean()) if np.isfinite(diff).all() else float("inf")
    agreement = None
    if task is Task.CLASSIFICATION:
        agreement = float(np.mean(got.argmax(-1) == source_outputs.argmax(-1)))
    passed = True
    if tolerance.max_abs_error is not None and not max_err <= tolerance.max_abs_error:
        passed = False
    if tolerance.min_agreement is not None and not (
        agreement is not None and agreement >= tolerance.min_agreement
    ):
        passed = False
    return ParityReport(
        backend=name,
        samples=len(got),
        max_abs_error=max_err,
        mean_abs_error=mean_err,
        top1_agreement=agreement,
        tolerance=tolerance,
        passed=passed,
    )


def check_artifact(
    path: Path,
    fmt: ArtifactFormat,
    inputs: NDArray[np.float32],
    source_outputs: NDArray[np.float32],
    task: Task,
    tolerance: Tolerance,
) -> tuple[ParityReport, Backend]:
    """Load PATH on FMT's gateway backend, run INPUTS, and compare; return the open backend too."""
    name = backend_name(fmt)
    backend = backends.create(name, path)
    got = run_batched(backend, inputs, f"parity {path.name}")
    report = measure(f"{name} ({backend.runtime})", got, source_outputs, task, tolerance)
    return report, backend


def format_table(rows: list[tuple[str, str, ParityReport]]) -> str:
    """A plain-text parity table: artifact, quantization, errors, agreement, bound, verdict."""
    header = ("artifact", "quant", "max abs err", "mean abs err", "top-1 agree", "bound", "result")
    lines = []
    for file, quant, rep in rows:
        bound = (
            f"err <= {rep.tolerance.max_abs_error:.0e}"
            if rep.tolerance.max_abs_error is not None
            else f"agree >= {rep.tolerance.min_agreement:.1%}"
        )
        agree = "-" if rep.top1_agreement is None else f"{rep.top1_agreement:.2%}"
        lines.append(
            (
                file,
                quant,
                f"{rep.max_abs_error:.2e}",
                f"{rep.mean_abs_error:.2e}",
                agree,
                bound,
                "ok" if rep.passed else "FAIL",
            )
        )
    return text_table.render(header, lines)
