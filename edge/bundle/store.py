"""A gateway's content-addressed bundle store: verified bundle archives by sha256, size-limited.

Fleet pushes deliver bundles as tar archives on ``floorline/bundles/{sha256}``. The store keeps
each archive that matched its address, unpacked and verified, under ``<root>/<sha256>/``, so a
config can name a bundle as ``sha256:<hex>`` and a restart finds it again. Bundles no config in
use refers to are removed, least recently used first, when the store is over its size limit.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from floorline.edge.bundle import archive
from floorline.edge.bundle.hashing import sha256_bytes
from floorline.edge.errors import BundleError, IntegrityError

log = logging.getLogger(__name__)

PREFIX = "sha256:"


def parse_ref(ref: str) -> str | None:
    """The hex digest of a 'sha256:<hex>' bundle reference, or None for a path."""
    if not ref.startswith(PREFIX):
        return None
    digest = ref[len(PREFIX):]
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise BundleError(f"{ref!r} is not a sha256 bundle reference")
    return digest


class BundleStore:
    """Bundles by sha256 under ROOT."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where bundle DIGEST lives (it may not exist)."""
        return self.root / digest

    def has(self, digest: str) -> bool:
        """Whether the bundle is stored."""
        return (self.root / digest / "manifest.json").is_file()

    def add(self, digest: str, data: bytes) -> Path:
        """Store archive DATA under DIGEST after checking that DATA hashes to it."""
        actual = sha256_bytes(data)
        if actual != digest:
            raise IntegrityError(
                f"bundle published as {digest[:12]}… hashes to {actual[:12]}…: refused"
            )
        dest = self.path(digest)
        if self.has(digest):
            return dest
        if dest.exists():
            shutil.rmtree(dest)  # an earlier, interrupted unpack
        archive.unpack(data, dest)
        return dest

    def discard(self, digest: str) -> None:
        """Remove a stored bundle (it failed verification: it must not be tried again)."""
        shutil.rmtree(self.path(digest), ignore_errors=True)

    def touch(self, digest: str) -> None:
        """Mark a bundle as used now (for least-recently-used collection)."""
        p = self.path(digest)
        if p.exists():
            now = time.time()
            os.utime(p, (now, now))

    def collect(self, keep: set[str]) -> list[str]:
        """Remove least recently used bundles not in KEEP until the store fits; return them."""
        entries = [p for p in self.root.iterdir() if p.is_dir()]
        sizes = {p: sum(f.stat().st_size for f in p.iterdir() if f.is_file()) for p in entries}
        total = sum(sizes.values())
        removed = []
        for p in sorted(entries, key=lambda e: e.stat().st_mtime):
            if total <= self.max_bytes:
                break
            if p.name in keep:
                continue
            shutil.rmtree(p, ignore_errors=True)
            total -= sizes[p]
            removed.append(p.name)
        if removed:
            log.info("bundle store: removed %d unused bundles", len(removed))
        return removed
