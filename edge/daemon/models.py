"""Bundle trust and model loading: which keys a config trusts, and a pipeline's verified models.

A pipeline's primary model (``bundle``) and its shadow (``shadow.bundle``) are loaded the same
way and obey the same trust rules: signatures as ``trust`` says, and a ``sha256:<hex>`` reference
comes from the fleet's bundle store and must be signed by a trusted key.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from floorline.edge.backends import BackendOptions
from floorline.edge.bundle import selftest
from floorline.edge.bundle.bundle import Bundle
from floorline.edge.bundle.store import BundleStore, parse_ref
from floorline.edge.config.model import Config, PipelineConfig
from floorline.edge.errors import BackendError, BundleError, FloorlineError, SelfTestError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def trusted_keys(config: Config) -> list[Ed25519PublicKey]:
    """The public keys a config trusts, read from files or inline base64."""
    if not config.trust.trusted_keys:
        return []
    # Imported only when keys are configured: cryptography costs ~8 MB of resident memory.
    from floorline.edge.bundle.signing import load_public_keys  # noqa: PLC0415

    return load_public_keys(config.trust.trusted_keys)


def load_model(
    config: Config, pipeline: PipelineConfig, store: BundleStore | None = None
) -> selftest.LoadedModel:
    """Open, verify and self-test a pipeline's bundle on its configured backend.

    A bundle named ``sha256:<hex>`` comes from the fleet's bundle STORE and must be signed.
    """
    return _load(
        config, pipeline.bundle, store, what=f"pipeline {pipeline.name}: bundle",
        backend=pipeline.backend, artifact=pipeline.artifact,
        options=BackendOptions(threads=pipeline.threads, interpreter=pipeline.interpreter),
    )


def load_shadow(
    config: Config, pipeline: PipelineConfig, store: BundleStore | None = None
) -> selftest.LoadedModel | None:
    """The pipeline's shadow model (``shadow``), verified and self-tested; None without one.

    Loaded as the primary is (``load_model``: the same trust rules, the same store). Errors
    start with the key they are about (``shadow.bundle``, ``shadow.artifact`` or
    ``shadow.backend``), so ``Config.pipeline_error`` reports them at its line.
    """
    shadow = pipeline.shadow
    if shadow is None:
        return None
    try:
        return _load(
            config, shadow.bundle, store, what="bundle",
            backend=shadow.backend, artifact=shadow.artifact,
            options=BackendOptions(threads=shadow.threads, interpreter=shadow.interpreter),
        )
    except FloorlineError as exc:
        key = "shadow.bundle"
        if isinstance(exc, (BackendError, SelfTestError)):
            key = "shadow.artifact" if shadow.artifact else "shadow.backend"
        try:
            error = type(exc)(f"{key}: {exc}")
        except TypeError:  # an error class with another signature
            error = BundleError(f"{key}: {exc}")
        raise error from exc


def close_model(model: selftest.LoadedModel | None) -> None:
    """Release MODEL's runtime and bundle (both, whatever the first raises); None: nothing."""
    if model is None:
        return
    try:
        model.backend.close()
    finally:
        model.bundle.close()


def _load(
    config: Config, ref: Path, store: BundleStore | None, *, what: str, backend: str,
    artifact: str | None, options: BackendOptions,
) -> selftest.LoadedModel:
    keys = trusted_keys(config)
    path = Path(ref)
    require = config.trust.require_signature
    digest = parse_ref(str(ref))
    if digest is not None:
        if store is None or not store.has(digest):
            raise BundleError(f"{what} {digest[:12]}… is not in the store")
        path = store.path(digest)
        store.touch(digest)
        require = True  # what arrives over the network runs only if signed by a trusted key
    try:
        bundle = Bundle.open(path, trusted_keys=keys or None, require_signature=require)
    except BundleError:
        if digest is not None and store is not None:
            store.discard(digest)  # arrived intact but does not verify: never try it again
        raise
    try:
        return selftest.load(
            bundle,
            backend=None if backend == "auto" else backend,
            artifact=artifact,
            options=options,
        )
    except BaseException:
        bundle.close()
        raise
