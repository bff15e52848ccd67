"""Bundle trust and model loading: which keys a config trusts, and a pipeline's verified model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from floorline.edge.backends import BackendOptions
from floorline.edge.bundle import selftest
from floorline.edge.bundle.bundle import Bundle
from floorline.edge.bundle.store import BundleStore, parse_ref
from floorline.edge.config.model import Config, PipelineConfig
from floorline.edge.errors import BundleError

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
    keys = trusted_keys(config)
    path = Path(pipeline.bundle)
    require = config.trust.require_signature
    digest = parse_ref(str(pipeline.bundle))
    if digest is not None:
        if store is None or not store.has(digest):
            raise BundleError(
                f"pipeline {pipeline.name}: bundle {digest[:12]}… is not in the store"
            )
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
            backend=None if pipeline.backend == "auto" else pipeline.backend,
            artifact=pipeline.artifact,
            options=BackendOptions(threads=pipeline.threads, interpreter=pipeline.interpreter),
        )
    except BaseException:
        bundle.close()
        raise
