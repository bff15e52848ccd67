"""Model bundles: write one atomically, open one only after every hash and signature verifies.

A bundle is a flat directory (or a tar of one, see ``floorline.edge.bundle.archive``)::

    manifest.json    the contract (floorline.edge.bundle.manifest.Manifest), canonical JSON
    manifest.sig     optional ed25519 signature over the exact manifest bytes
    golden.npz       seeded inputs, the source model's outputs and each artifact's own outputs
    model*.tflite    artifacts, each listed in the manifest with its sha256
    model*.onnx

The manifest carries the sha256 of every other file, so one signature over the manifest covers the
whole bundle. A file the manifest does not list is refused too: what a gateway runs is exactly what
was signed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from floorline.edge.bundle import archive
from floorline.edge.bundle.hashing import sha256_bytes, sha256_file
from floorline.edge.bundle.manifest import Artifact, Manifest
from floorline.edge.errors import BundleError, IntegrityError, ManifestError, SignatureError

if TYPE_CHECKING:
    # cryptography costs ~8 MB of resident memory; a gateway without signed bundles or a fleet
    # never loads it (floorline.edge.bundle.signing is imported where a signature is actually
    # checked or made).
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
GOLDEN_FILE = "golden.npz"

_INPUTS = "inputs"
_SOURCE_OUTPUTS = "source_outputs"
_EXPECTED = "expected:"


@dataclass(frozen=True)
class Golden:
    """Inputs fixed at conversion time and the outputs a correct runtime must reproduce.

    ``inputs`` are model inputs (already normalized). ``source_outputs`` came from the source model;
    ``expected[file]`` from that artifact on the converter's runtime, the reference a gateway's
    self-test compares with, because a quantized artifact is not expected to match the source.
    """

    inputs: NDArray[np.float32]
    source_outputs: NDArray[np.float32]
    expected: dict[str, NDArray[np.float32]] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """Write golden.npz (uncompressed, so its bytes are the same on every run)."""
        arrays: dict[str, NDArray[np.float32]] = {
            _INPUTS: self.inputs,
            _SOURCE_OUTPUTS: self.source_outputs,
        }
        arrays.update({_EXPECTED + name: out for name, out in self.expected.items()})
        with path.open("wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path) -> Golden:
        """Read golden.npz without ever unpickling."""
        try:
            with np.load(path, allow_pickle=False) as npz:
                inputs = np.asarray(npz[_INPUTS], dtype=np.float32)
                source = np.asarray(npz[_SOURCE_OUTPUTS], dtype=np.float32)
                expected = {
                    key.removeprefix(_EXPECTED): np.asarray(npz[key], dtype=np.float32)
                    for key in npz.files
                    if key.startswith(_EXPECTED)
                }
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise BundleError(f"{path}: unreadable golden data: {exc}") from exc
        if inputs.ndim == 0 or source.ndim == 0:
            raise BundleError(f"{path}: golden inputs and outputs must be arrays, not scalars")
        if len(inputs) != len(source):
            raise BundleError(f"{path}: {len(inputs)} inputs but {len(source)} outputs")
        return cls(inputs=inputs, source_outputs=source, expected=expected)


class Bundle:
    """An opened, verified bundle. Construct with :meth:`open`; nothing unverified is exposed."""

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        manifest_sha256: str,
        signed_by: str | None,
        golden: Golden,
        owned_dir: Path | None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.signed_by = signed_by
        self.golden = golden
        self._owned_dir = owned_dir
        self.source = path
        """What was opened: the bundle directory, or the archive ``path`` was unpacked from."""

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        trusted_keys: list[Ed25519PublicKey] | None = None,
        require_signature: bool = False,
        limits: archive.ArchiveLimits | None = None,
    ) -> Bundle:
        """Open a bundle directory or tar file and verify it completely.

        Raises ManifestError, IntegrityError or SignatureError (all BundleError) when anything does
        not verify. A signature that is present is always checked when keys are given; with
        ``require_signature`` a missing signature or an empty key list is an error too.
        """
        path = Path(path)
        if path.is_file():
            workdir = Path(tempfile.mkdtemp(prefix="floorline-bundle-"))
            try:
                unpacked = archive.unpack(path, workdir / "bundle", limits)
                bundle = cls._open_dir(unpacked, trusted_keys, require_signature, owned=workdir)
            except BundleError as exc:
                shutil.rmtree(workdir, ignore_errors=True)
                # Name the archive the user gave, not the temporary directory it was unpacked to.
                raise type(exc)(str(exc).replace(str(workdir / "bundle"), str(path))) from exc
            except BaseException:
                shutil.rmtree(workdir, ignore_errors=True)
                raise
            bundle.source = path
            return bundle
        if not path.is_dir():
            raise BundleError(f"{path}: no such bundle directory or archive")
        return cls._open_dir(path, trusted_keys, require_signature, owned=None)

    @classmethod
    def _open_dir(
        cls,
        path: Path,
        trusted_keys: list[Ed25519PublicKey] | None,
        require_signature: bool,
        owned: Path | None,
    ) -> Bundle:
        manifest_path = path / MANIFEST_FILE
        try:
            manifest_bytes = manifest_path.read_bytes()
        except OSError as exc:
            raise ManifestError(f"{path}: no readable {MANIFEST_FILE}: {exc.strerror}") from exc

        signed_by = _check_signature(path, manifest_bytes, trusted_keys, require_signature)
        manifest = Manifest.from_bytes(manifest_bytes, origin=str(manifest_path))

        listed = {a.file: a.sha256 for a in manifest.artifacts}
        listed[manifest.golden.file] = manifest.golden.sha256
        present = {p.name for p in path.iterdir()} - {MANIFEST_FILE, SIGNATURE_FILE}
        if extra := sorted(present - listed.keys()):
            raise IntegrityError(f"{path}: files not listed in the manifest: {', '.join(extra)}")
        for name, expected in listed.items():
            file_path = path / name
            if not file_path.is_file() or file_path.is_symlink():
                raise IntegrityError(f"{path}: {name} is listed in the manifest but missing")
            actual = sha256_file(file_path)
            if actual != expected:
                raise IntegrityError(
                    f"{path}: {name} has sha256 {actual[:12]}…, manifest says {expected[:12]}…: "
                    "the file was changed after conversion"
                )
        golden = Golden.load(path / manifest.golden.file)
        return cls(
            path=path,
            manifest=manifest,
            manifest_sha256=sha256_bytes(manifest_bytes),
            signed_by=signed_by,
            golden=golden,
            owned_dir=owned,
        )

    def artifact(self, file: str | None = None, *, fmt: str | None = None) -> Artifact:
        """The artifact named FILE, or the first (float before quantized) of format FMT."""
        for art in self.manifest.artifacts:
            if (file is None or art.file == file) and (fmt is None or art.format == fmt):
                return art
        wanted = file or f"a {fmt} artifact"
        have = ", ".join(a.file for a in self.manifest.artifacts)
        raise BundleError(f"bundle {self.manifest.name} has no {wanted} (it has: {have})")

    def artifact_path(self, artifact: Artifact) -> Path:
        """Where an artifact's verified file lies."""
        return self.path / artifact.file

    def close(self) -> None:
        """Remove the unpacked copy if this bundle was opened from an archive."""
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None

    def __enter__(self) -> Bundle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_signature(
    path: Path,
    manifest_bytes: bytes,
    trusted_keys: list[Ed25519PublicKey] | None,
    require_signature: bool,
) -> str | None:
    sig_path = path / SIGNATURE_FILE
    if not sig_path.exists():
        if require_signature:
            raise SignatureError(f"{path}: unsigned bundle, and a signature is required")
        return None
    from floorline.edge.bundle.signing import Signature, verify  # noqa: PLC0415 - see the TYPE_CHECKING note

    try:
        sig_bytes = sig_path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"{sig_path}: unreadable: {exc.strerror}") from exc
    signature = Signature.from_bytes(sig_bytes, origin=str(sig_path))
    if not trusted_keys:
        if require_signature:
            raise SignatureError(f"{path}: a signature is required but no trusted keys are set")
        # Signed, but this caller trusts nobody in particular: the hashes still protect content.
        return None
    return verify(manifest_bytes, signature, trusted_keys, origin=str(sig_path))


@contextmanager
def staging_dir(dest: Path) -> Iterator[Path]:
    """A scratch directory beside DEST (same file system, so the final rename is atomic).

    It is removed when the block ends unless :func:`commit` renamed it to DEST.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def commit(
    staging: Path,
    dest: Path,
    manifest: Manifest,
    *,
    signing_key: Ed25519PrivateKey | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the manifest (and signature) into STAGING, check it, and rename STAGING to DEST.

    The manifest's hashes are recomputed from the staged files rather than trusted, so a bug in a
    caller cannot produce a bundle that its own gateway would refuse.
    """
    listed = {a.file for a in manifest.artifacts} | {manifest.golden.file}
    if extra := sorted({p.name for p in staging.iterdir()} - listed):
        raise IntegrityError(f"staged files not listed in the manifest: {', '.join(extra)}")
    for art in manifest.artifacts:
        actual = sha256_file(staging / art.file)
        if actual != art.sha256:
            raise IntegrityError(f"staged {art.file} does not match its manifest entry")
    if sha256_file(staging / manifest.golden.file) != manifest.golden.sha256:
        raise IntegrityError("staged golden data does not match its manifest entry")
    manifest_bytes = manifest.to_bytes()
    (staging / MANIFEST_FILE).write_bytes(manifest_bytes)
    if signing_key is not None:
        from floorline.edge.bundle.signing import sign  # noqa: PLC0415 - see the TYPE_CHECKING note

        (staging / SIGNATURE_FILE).write_bytes(sign(manifest_bytes, signing_key).to_bytes())
    return install(staging, dest, overwrite=overwrite)


def install(staging: Path, dest: Path, *, overwrite: bool = False) -> Path:
    """Make the complete bundle directory STAGING appear at DEST at once (fsynced first).

    With OVERWRITE an existing DEST is replaced: moved aside, STAGING renamed in, then removed,
    so a reader sees the old bundle or the new one, never a mix.
    """
    # mkdtemp made the staging directory 0700; a bundle is read by an unprivileged service user.
    staging.chmod(0o755)
    _fsync_tree(staging)
    if dest.exists():
        if not overwrite:
            raise FileExistsError(f"{dest} exists (use --force to replace it)")
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(dest)
    return dest


def _fsync_tree(directory: Path) -> None:
    # A bundle that survives a power cut half-written would be refused anyway, but fsync makes the
    # rename mean "complete" rather than "complete unless the power went".
    for path in directory.iterdir():
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe_artifact(staging: Path, file: str, **fields: object) -> Artifact:
    """Build a manifest Artifact entry for a staged file, hashing it."""
    path = staging / file
    return Artifact.model_validate(
        {"file": file, "sha256": sha256_file(path), "size": path.stat().st_size, **fields}
    )
