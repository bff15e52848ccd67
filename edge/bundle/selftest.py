"""Golden self-test: does this runtime, on this machine, reproduce the artifact's outputs.

Every bundle carries golden inputs with two references: what the source model said, and what each
artifact said on the converter's runtime. A gateway compares with the artifact's own reference
(a quantized artifact is not meant to equal the source) within the artifact's ``selftest_atol``,
and reports the distance to the source model alongside for information.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from floorline.edge import backends
from floorline.edge.backends import Backend, BackendOptions
from floorline.edge.bundle.bundle import Bundle
from floorline.edge.bundle.manifest import Artifact, Task
from floorline.edge.errors import BundleError, SelfTestError


@dataclass(frozen=True)
class SelfTestReport:
    """Outcome of running one artifact on the golden inputs."""

    artifact: str
    backend: str
    runtime: str
    samples: int
    max_abs_error: float
    """Against the artifact's own expected outputs; this decides pass or fail."""
    atol: float
    max_abs_error_source: float
    """Against the source model's outputs; informative."""
    top1_agreement_source: float | None
    passed: bool

    def raise_for_failure(self) -> None:
        """Raise SelfTestError if the test failed."""
        if not self.passed:
            raise SelfTestError(
                f"{self.artifact} on {self.runtime}: golden outputs differ by "
                f"{self.max_abs_error:.3g} (allowed {self.atol:.3g}); this runtime does not "
                "reproduce the converted model"
            )


def run(backend: Backend, bundle: Bundle, artifact: Artifact) -> SelfTestReport:
    """Run the golden inputs through BACKEND and compare."""
    golden = bundle.golden
    expected = golden.expected.get(artifact.file)
    if expected is None:
        raise BundleError(f"golden data has no expected outputs for {artifact.file}")
    got = backend.infer(golden.inputs)
    if got.shape != expected.shape:
        raise SelfTestError(
            f"{artifact.file}: output shape {got.shape}, golden expects {expected.shape}"
        )
    err = float(np.max(np.abs(got - expected)))
    err_source = float(np.max(np.abs(got - golden.source_outputs)))
    agreement = None
    if bundle.manifest.task is Task.CLASSIFICATION:
        agreement = float(np.mean(got.argmax(-1) == golden.source_outputs.argmax(-1)))
    return SelfTestReport(
        artifact=artifact.file,
        backend=backend.name,
        runtime=backend.runtime,
        samples=len(golden.inputs),
        max_abs_error=err,
        atol=artifact.selftest_atol,
        max_abs_error_source=err_source,
        top1_agreement_source=agreement,
        # NaN compares false, so a model producing NaN fails here as it should.
        passed=bool(err <= artifact.selftest_atol),
    )


@dataclass
class LoadedModel:
    """A backend running a bundle's artifact, warmed up and self-tested."""

    bundle: Bundle
    artifact: Artifact
    backend: Backend
    selftest: SelfTestReport


def load(
    bundle: Bundle,
    *,
    backend: str | None = None,
    artifact: str | None = None,
    prefer: tuple[str, ...] = ("litert", "onnx"),
    options: BackendOptions | None = None,
) -> LoadedModel:
    """Pick an artifact and backend, load it, and pass the golden self-test or raise.

    With neither BACKEND nor ARTIFACT given, the first artifact (in manifest order) that a
    preferred backend runs is used. The self-test doubles as warm-up: the first inference
    allocates the runtime's buffers, so it should not happen on live data.
    """
    if artifact is not None:
        chosen = bundle.artifact(artifact)
    elif backend is not None:
        fmt = backends.BACKENDS[backend].format if backend in backends.BACKENDS else None
        chosen = bundle.artifact(fmt=fmt) if fmt else bundle.artifact()
    else:
        formats = [backends.BACKENDS[n].format for n in prefer if n in backends.BACKENDS]
        candidates = [a for f in formats for a in bundle.manifest.artifacts if a.format == f]
        chosen = candidates[0] if candidates else bundle.artifact()
    name = backend or backends.backend_for_format(chosen.format, prefer)
    instance = backends.create(name, Path(bundle.artifact_path(chosen)), options)
    try:
        report = run(instance, bundle, chosen)
        report.raise_for_failure()
    except BaseException:
        instance.close()
        raise
    return LoadedModel(bundle=bundle, artifact=chosen, backend=instance, selftest=report)
