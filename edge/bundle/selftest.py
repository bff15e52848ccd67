"""Golden self-test: does this runtime, on this machine, reproduce the artifact's outputs.

Every bundle carries golden inputs with two references: what the source model said, and what each
artifact said on the converter's runtime. A gateway compares with the artifact's own reference
(a quantized artifact is not meant to equal the source) within the artifact's ``selftest_atol``,
and reports the distance to the source model alongside for information.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from floorline.edge import backends
from floorline.edge.backends import Backend, BackendOptions
from floorline.edge.bundle.bundle import Bundle
from floorline.edge.bundle.manifest import Artifact
from floorline.edge.errors import BackendError, BundleError, RuntimeMissingError, SelfTestError
from floorline.edge.stream.heads import HeadLayout
from floorline.edge.stream.normalization import model_input

AUTO_PREFER: tuple[str, ...] = tuple(backends.BACKENDS)  # plugin rank order
"""The backends ``backend: auto`` tries, in order (see ``auto_order``)."""


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
    _check_input(backend, bundle, artifact)
    _check_heads(backend, bundle, artifact)
    spec = bundle.manifest.input
    # With a feature stage the golden inputs are raw windows: the gateway's own feature code runs
    # on them, so the self-test checks the features as well as the model. Without one they are
    # the model's inputs already (normalized), as schema 1 and 2 bundles always held.
    inputs = model_input(golden.inputs, spec) if spec.preprocessing is not None else golden.inputs
    got = backend.infer(inputs)
    _check_width(got, bundle, artifact)
    if got.shape != expected.shape:
        raise SelfTestError(
            f"{artifact.file}: output shape {got.shape}, golden expects {expected.shape}"
        )
    err = float(np.max(np.abs(got - expected)))
    err_source = float(np.max(np.abs(got - golden.source_outputs)))
    agreement = None
    layout = HeadLayout(bundle.manifest)
    ours, theirs = layout.first_classifier(got), layout.first_classifier(golden.source_outputs)
    if ours is not None and theirs is not None:
        agreement = float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))
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


def _check_input(backend: Backend, bundle: Bundle, artifact: Artifact) -> None:
    # Golden inputs fit the model whatever the manifest says; the pipeline's windows are shaped
    # by the manifest, and would fail every batch.
    spec = bundle.manifest.input
    want = tuple(spec.model_shape[1:])
    have = tuple(backend.input_spec.shape[1:])
    fits = len(have) == len(want) and all(
        h is None or h == w for h, w in zip(have, want, strict=True)
    )
    if not fits:
        raise BackendError(
            f"{artifact.file}: the model takes inputs {('n', *have)}, but the manifest's input "
            f"is {('n', *want)}"
        )
    windows = tuple(spec.shape[1:]) if spec.preprocessing is not None else want
    if tuple(bundle.golden.inputs.shape[1:]) != windows:
        raise BundleError(
            f"golden inputs are {bundle.golden.inputs.shape}, but the manifest's input is "
            f"{('n', *windows)}"
        )


def _check_heads(backend: Backend, bundle: Bundle, artifact: Artifact) -> None:
    # The golden data is the converter's word only; the heads must fit what the model returns,
    # or every window would fail (or be cut wrongly) in the pipeline.
    # A plugin backend written before output_specs existed is checked by the row width alone.
    specs = getattr(backend, "output_specs", ())
    for head, spec in zip(bundle.manifest.heads, specs, strict=False):
        dims = [d for d in spec.shape[1:] if d is not None]
        if len(dims) == len(spec.shape) - 1:
            size = int(np.prod(dims, dtype=np.int64))
            if size != head.size:
                raise BackendError(
                    f"{artifact.file}: output tensor {spec.name} has {size} values per window "
                    f"{tuple(dims)}, but head {head.name} has {head.size} {head.shape[1:]}"
                )


def _check_width(got: np.ndarray, bundle: Bundle, artifact: Artifact) -> None:
    heads = bundle.manifest.heads
    width = int(np.prod(got.shape[1:], dtype=np.int64)) if got.ndim > 1 else 1
    total = sum(h.size for h in heads)
    if width != total:
        raise SelfTestError(
            f"{artifact.file}: the model returns {width} values per window, but the manifest's "
            f"heads ({', '.join(f'{h.name}: {h.size}' for h in heads)}) add up to {total}"
        )


@dataclass
class LoadedModel:
    """A backend running a bundle's artifact, warmed up and self-tested."""

    bundle: Bundle
    artifact: Artifact
    backend: Backend
    selftest: SelfTestReport


def auto_order(bundle: Bundle, prefer: tuple[str, ...] = AUTO_PREFER) -> list[tuple[Artifact, str]]:
    """Every (artifact, backend) pair ``backend: auto`` considers, best first.

    The order: backends as in PREFER (LiteRT, then ONNX Runtime); for one backend, float32
    artifacts before quantized ones (they reproduce the source model most closely); then manifest
    order. Artifacts no backend in PREFER runs are left out.
    """
    ranked = []
    for index, art in enumerate(bundle.manifest.artifacts):
        for rank, name in enumerate(prefer):
            info = backends.BACKENDS.get(name)
            if info is not None and info.format == art.format:
                ranked.append(((rank, art.quantization != "float32", index), art, name))
                break
    return [(art, name) for _, art, name in sorted(ranked, key=lambda r: r[0])]


def choose_auto(
    bundle: Bundle,
    prefer: tuple[str, ...] = AUTO_PREFER,
    options: BackendOptions | None = None,
) -> tuple[Artifact, str]:
    """The first of ``auto_order`` whose runtime is installed, or RuntimeMissingError.

    The error names the extras that would make one of the bundle's artifacts runnable.
    """
    pairs = auto_order(bundle, prefer)
    for art, name in pairs:
        if backends.installed(name, options):
            return art, name
    if not pairs:
        formats = ", ".join(sorted({a.format for a in bundle.manifest.artifacts}))
        raise BackendError(
            f"bundle {bundle.manifest.name}: no backend of {', '.join(prefer)} runs its "
            f"artifacts ({formats})"
        )
    runs = {name: [a.file for a, n in pairs if n == name] for _, name in pairs}
    which = "; ".join(f"{name} runs {', '.join(files)}" for name, files in runs.items())
    hints = " or ".join(f"'floorline[{backends.BACKENDS[n].extra}]'" for n in runs)
    raise RuntimeMissingError(
        f"bundle {bundle.manifest.name}: no runtime for its artifacts is installed ({which}): "
        f"pip install {hints}"
    )


def load(
    bundle: Bundle,
    *,
    backend: str | None = None,
    artifact: str | None = None,
    prefer: tuple[str, ...] = AUTO_PREFER,
    options: BackendOptions | None = None,
) -> LoadedModel:
    """Pick an artifact and backend, load it, and pass the golden self-test or raise.

    With neither BACKEND nor ARTIFACT given (``backend: auto``), the first artifact of
    ``auto_order`` whose runtime is installed is used (``choose_auto``). A named BACKEND or
    ARTIFACT is used as named: a missing runtime raises RuntimeMissingError, and an artifact the
    backend cannot run raises BackendError saying so. The self-test doubles as warm-up: the
    first inference allocates the runtime's buffers, so it should not happen on live data.
    """
    if artifact is not None:
        chosen = bundle.artifact(artifact)
        name = backend or backends.backend_for_format(chosen.format, prefer)
    elif backend is not None:
        fmt = backends.BACKENDS[backend].format if backend in backends.BACKENDS else None
        chosen = bundle.artifact(fmt=fmt) if fmt else bundle.artifact()
        name = backend
    else:
        chosen, name = choose_auto(bundle, prefer, options)
    info = backends.BACKENDS.get(name)
    if info is not None and info.format != chosen.format:
        # Caught here: the runtime's own complaint would be a parse error about the file.
        raise BackendError(
            f"artifact {chosen.file} is {chosen.format}; backend {name} runs {info.format} "
            "artifacts"
        )
    # The artifact names its heads' tensors (schema 2); the backend returns them in head order.
    options = dataclasses.replace(options or BackendOptions(), outputs=tuple(chosen.outputs or ()))
    instance = backends.create(name, Path(bundle.artifact_path(chosen)), options)
    try:
        report = run(instance, bundle, chosen)
        report.raise_for_failure()
    except BaseException:
        instance.close()
        raise
    return LoadedModel(bundle=bundle, artifact=chosen, backend=instance, selftest=report)
