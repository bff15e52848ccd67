"""Parity: every artifact, run by the gateway's own backends, against the source model.

Tolerances by default:
- float32 artifacts (TFLite float32, ONNX): max absolute error <= 1e-4, or 2e-6 of the largest
  output where outputs are large (a regressor's hundreds of hours);
- weight- or fully-quantized artifacts (float16, dynamic, int8): for classifiers, top-1 agreement
  with the source >= 99 %; for regression and anomaly models, max absolute error <= 5 % of the
  source outputs' range on the parity set (or the user's --quantized-atol);
- every head of a model is held to its own bound, from its own outputs; an autoencoder's
  reconstruction is also scored as the gateway will, and its verdicts (anomalous or not) must
  agree as classifications do.
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
from floorline.edge.backends import Backend, BackendOptions
from floorline.edge.bundle.manifest import (
    ArtifactFormat,
    Head,
    HeadParity,
    ParityReport,
    Quantization,
    Task,
    Tolerance,
)
from floorline.edge.cli import table as text_table
from floorline.edge.stream.heads import HeadLayout, reconstruction_scores

_BATCH = 64
_RANGE_FRACTION = 0.05
_RELATIVE = 2e-6
"""float32 bound's part relative to the outputs' size: ~16 float32 steps. A tree ensemble
summing leaves in float32 on the gateway differs from scikit-learn's float64 by a few steps of the
value: 3e-5 at values near 200, 5e-3 near 16,700. Outputs near 1 are unaffected."""


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
        scale = float(np.max(np.abs(source_outputs))) if source_outputs.size else 0.0
        if not np.isfinite(scale):
            scale = 0.0
        return Tolerance(max_abs_error=max(policy.atol, _RELATIVE * scale))
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
    scales = [spec.quant.scale for spec in backend.output_specs if spec.quant is not None]
    if scales:
        return max(2.0 * max(scales), 1e-4)
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


@dataclass(frozen=True)
class HeadCheck:
    """One head's measured parity and whether it met its bound."""

    parity: HeadParity
    tolerance: Tolerance
    passed: bool


def _within(tolerance: Tolerance, max_err: float, agreement: float | None) -> bool:
    if tolerance.max_abs_error is not None and not max_err <= tolerance.max_abs_error:
        return False
    return tolerance.min_agreement is None or (
        agreement is not None and agreement >= tolerance.min_agreement
    )


def _max_err(diff: NDArray[np.float64]) -> float:
    # NaN or infinity from the artifact is the worst error, never a pass.
    return float(diff.max()) if diff.size and np.isfinite(diff).all() else float("inf")


def measure_head(
    head: Head,
    got: NDArray[np.float32],
    expected: NDArray[np.float32],
    tolerance: Tolerance,
    inputs: NDArray[np.float32],
) -> HeadCheck:
    """Compare one head's outputs (GOT) with the source model's (EXPECTED) on INPUTS."""
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    max_err = _max_err(diff)
    agreement = agreeing = None
    if head.task is Task.CLASSIFICATION:
        agreeing = int(np.sum(got.argmax(-1) == expected.argmax(-1)))
        agreement = agreeing / len(got)
    score_err = verdicts = None
    if head.score is not None:
        # An autoencoder is judged by what the gateway makes of it too: scores and verdicts.
        ours, _ = reconstruction_scores(inputs, got, head.score.metric)
        theirs, _ = reconstruction_scores(inputs, expected, head.score.metric)
        score_err = _max_err(np.abs(ours.astype(np.float64) - theirs))
        limit = head.score.threshold
        verdicts = float(np.mean((ours >= limit) == (theirs >= limit)))
        agreement = verdicts
    passed = _within(tolerance, max_err, agreement)
    return HeadCheck(
        HeadParity(
            max_abs_error=max_err,
            top1_agreement=agreement if head.task is Task.CLASSIFICATION else None,
            agreeing=agreeing,
            score_max_abs_error=score_err,
            verdict_agreement=verdicts,
        ),
        tolerance,
        passed,
    )


def measure(
    name: str,
    got: NDArray[np.float32],
    source_outputs: NDArray[np.float32],
    heads: list[Head],
    tolerances: list[Tolerance],
    inputs: NDArray[np.float32],
) -> ParityReport:
    """Compare an artifact's outputs (joined heads) with the source model's, head by head."""
    layout = HeadLayout(heads)
    checks = [
        measure_head(head, g, e, tol, inputs)
        for head, g, e, tol in zip(
            heads, layout.split(got), layout.split(source_outputs), tolerances, strict=True
        )
    ]
    diff = np.abs(got.astype(np.float64) - source_outputs.astype(np.float64))
    mean_err = float(diff.mean()) if np.isfinite(diff).all() else float("inf")
    first_class = next((c for h, c in zip(heads, checks, strict=True)
                        if h.task is Task.CLASSIFICATION), None)
    detailed = len(heads) > 1 or any(h.score is not None for h in heads)
    return ParityReport(
        backend=name,
        samples=len(got),
        max_abs_error=max(c.parity.max_abs_error for c in checks),
        mean_abs_error=mean_err,
        top1_agreement=first_class.parity.top1_agreement if first_class else None,
        tolerance=checks[0].tolerance,
        passed=all(c.passed for c in checks),
        heads={h.name: c.parity for h, c in zip(heads, checks, strict=True)} if detailed else None,
    )


def head_tolerances(
    policy: ParityPolicy,
    quantization: Quantization,
    heads: list[Head],
    source_outputs: NDArray[np.float32],
) -> list[Tolerance]:
    """Each head's bound, from its own outputs' range (a RUL in hours and a probability differ)."""
    parts = HeadLayout(heads).split(source_outputs)
    bounds = []
    for head, part in zip(heads, parts, strict=True):
        bound = tolerance_for(policy, quantization, head.task, part)
        if head.score is not None:
            # What the gateway decides from a reconstruction must agree as classifications do.
            bound = Tolerance(max_abs_error=bound.max_abs_error, min_agreement=policy.min_agreement)
        bounds.append(bound)
    return bounds


def check_artifact(
    path: Path,
    fmt: ArtifactFormat,
    inputs: NDArray[np.float32],
    source_outputs: NDArray[np.float32],
    heads: list[Head],
    tolerances: list[Tolerance],
    outputs: tuple[str, ...] = (),
) -> tuple[ParityReport, Backend]:
    """Load PATH on FMT's gateway backend, run INPUTS, and compare; return the open backend too."""
    name = backend_name(fmt)
    backend = backends.create(name, path, BackendOptions(outputs=outputs))
    got = run_batched(backend, inputs, f"parity {path.name}")
    report = measure(f"{name} ({backend.runtime})", got, source_outputs, heads, tolerances, inputs)
    return report, backend


def _agreement(rep: ParityReport, head: HeadParity | None) -> str:
    if head is not None and head.verdict_agreement is not None:
        same = round(head.verdict_agreement * rep.samples)
        return f"verdicts {same}/{rep.samples}"
    agreement = head.top1_agreement if head is not None else rep.top1_agreement
    if agreement is None:
        return "-"
    return f"{round(agreement * rep.samples)}/{rep.samples}"


def format_table(rows: list[tuple[str, str, ParityReport]]) -> str:
    """A plain-text parity table: artifact, quantization, head, errors, agreement, verdict.

    Agreement is a count of windows ("254/256"). A model with several heads, or one scored on the
    gateway, gets a line per head; the bound shown is the first head's.
    """
    header = ("artifact", "quant", "head", "max abs err", "agreement", "bound", "result")
    lines = []
    for file, quant, rep in rows:
        bound = (
            f"err <= {rep.tolerance.max_abs_error:.0e}"
            if rep.tolerance.max_abs_error is not None
            else f"agree >= {rep.tolerance.min_agreement:.1%}"
        )
        verdict = "ok" if rep.passed else "FAIL"
        if not rep.heads:
            lines.append((file, quant, "-", f"{rep.max_abs_error:.2e}", _agreement(rep, None),
                          bound, verdict))
            continue
        for i, (name, head) in enumerate(rep.heads.items()):
            err = f"{head.max_abs_error:.2e}"
            if head.score_max_abs_error is not None:
                err += f" (score {head.score_max_abs_error:.1e})"
            lines.append((file if i == 0 else "", quant if i == 0 else "", name, err,
                          _agreement(rep, head), bound if i == 0 else "",
                          verdict if i == 0 else ""))
    return text_table.render(header, lines)
