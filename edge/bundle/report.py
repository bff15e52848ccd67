"""Human-readable summaries of a verified bundle, shared by both CLIs."""

from __future__ import annotations

from floorline.edge.bundle.bundle import Bundle
from floorline.edge.bundle.manifest import Head


def _head_line(head: Head) -> str:
    line = f"output     {head.name}: {head.task.value}, shape {head.shape}"
    if head.labels:
        line += f"; labels {head.labels}"
    if head.units:
        line += f"; units {head.units}"
    if head.thresholds:
        line += f"; thresholds {head.thresholds}"
    if head.score is not None:
        how = f" (p{head.score.percentile:g} of calibration)" if head.score.percentile else ""
        line += f"; reconstruction {head.score.metric}, threshold {head.score.threshold:.4g}{how}"
    return line


def describe(bundle: Bundle) -> str:
    """A multi-line summary: identity, verification, input/output contract, artifacts."""
    m = bundle.manifest
    inp = m.input
    signed = f"signed by key {bundle.signed_by} (verified)" if bundle.signed_by else "not verified"
    if bundle.signed_by is None and (bundle.path / "manifest.sig").exists():
        signed = "signed, signature not checked (pass --trust KEY)"
    elif bundle.signed_by is None:
        signed = "unsigned"
    features = ", ".join(f"{f.name}[{f.unit}]" if f.unit else f.name for f in inp.features)
    lines = [
        f"bundle     {m.name} {m.version} ({m.task.value})",
        f"path       {bundle.source}",
        f"manifest   sha256 {bundle.manifest_sha256}; {signed}; all file hashes verified",
        f"created    {m.created_at} by floorline-convert {m.converter_version}",
        f"source     {m.source.name} ({m.source.format}, sha256 {m.source.sha256[:16]}…)",
        f"input      shape {inp.shape} {inp.dtype}; window {inp.window}; features {features}",
        *(
            [
                f"features   {len(inp.preprocessing.names)} computed at "
                f"{inp.preprocessing.sample_rate:g} Hz by "
                + ", ".join(b.type for b in inp.preprocessing.blocks)
                + f"; the model takes {inp.model_shape}"
            ]
            if inp.preprocessing is not None
            else []
        ),
        "normalize  "
        + (
            f"mean {inp.normalization.mean} std {inp.normalization.std}"
            if inp.normalization
            else "none"
        ),
        *(_head_line(h) for h in m.heads),
        f"golden     {m.golden.samples} samples",
        "artifacts:",
    ]
    for a in m.artifacts:
        parity = "no parity record"
        if a.parity:
            p = a.parity
            agree = "" if p.top1_agreement is None else f", top-1 {p.top1_agreement:.2%}"
            verdict = "passed" if p.passed else "FAILED"
            parity = f"parity {verdict}: max err {p.max_abs_error:.2e}{agree} on {p.samples}"
        if a.quantized_tensors == 0 and a.quantization != "float32":
            parity += "; no weight was quantized"
        opset = f" opset {a.opset}" if a.opset else ""
        lines.append(
            f"  {a.file:<22} {a.format}{opset} {a.quantization:<8} {a.size:>9,} B  "
            f"sha256 {a.sha256[:12]}…  {parity}"
        )
    return "\n".join(lines)
