"""Packing a bundle directory into one tar file, and unpacking one without trusting it.

Bundles travel between machines (and, with the fleet, over MQTT), so an archive is hostile until
proven otherwise. A bundle is flat, which makes the rule simple: every member must be a regular file
with a plain name. Absolute paths, ``..``, any separator, links, devices and FIFOs are refused
before a byte is written, and sizes are counted while copying rather than trusted from headers.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from floorline.edge.errors import UnsafeArchiveError

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_COPY_CHUNK = 1 << 20
# A corrupt tar, or a truncated or corrupt compressed stream, which tarfile does not map.
_CORRUPT: tuple[type[Exception], ...] = (tarfile.TarError, EOFError, zlib.error)
with contextlib.suppress(ImportError):  # Python built without lzma cannot open .xz at all
    import lzma

    _CORRUPT += (lzma.LZMAError,)
_UNREADABLE: tuple[type[Exception], ...] = (OSError, *_CORRUPT)  # or a missing file


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what unpacking may write, so a hostile archive cannot fill a gateway's disk."""

    max_members: int = 32
    max_file_bytes: int = 256 * 1024 * 1024
    max_total_bytes: int = 512 * 1024 * 1024


def pack(bundle_dir: Path, out: Path) -> Path:
    """Write the files of a bundle directory as one reproducible tar (sorted, zeroed metadata)."""
    files = sorted(p for p in bundle_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UnsafeArchiveError(f"{bundle_dir}: nothing to pack")
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            info = tarfile.TarInfo(path.name)
            info.size = path.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    tmp.replace(out)
    return out


def _check_member(member: tarfile.TarInfo, origin: str) -> str:
    name = member.name.removeprefix("./")
    if not member.isreg():
        kind = "link" if (member.issym() or member.islnk()) else "non-regular member"
        raise UnsafeArchiveError(f"{origin}: refusing {kind} {member.name!r}")
    if not _PLAIN_NAME.fullmatch(name):
        raise UnsafeArchiveError(
            f"{origin}: refusing member {member.name!r}: bundle members must be plain file names "
            "(no directories, absolute paths or '..')"
        )
    return name


def unpack(archive: Path | bytes, dest: Path, limits: ArchiveLimits | None = None) -> Path:
    """Extract a bundle archive into a new directory DEST, atomically; return DEST.

    Everything is checked before anything lands at DEST: on any error DEST does not exist.
    """
    limits = limits or ArchiveLimits()
    origin = "bundle archive" if isinstance(archive, bytes) else str(archive)
    if dest.exists():
        raise FileExistsError(f"{dest} exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=dest.parent))
    try:
        source = io.BytesIO(archive) if isinstance(archive, bytes) else archive
        try:
            with tarfile.open(
                fileobj=source if isinstance(source, io.BytesIO) else None,
                name=None if isinstance(source, io.BytesIO) else source,
                mode="r:*",
            ) as tar:
                _extract_all(tar, staging, limits, origin)
        except _UNREADABLE as exc:
            raise UnsafeArchiveError(f"{origin}: not a readable tar archive: {exc}") from exc
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _extract_all(tar: tarfile.TarFile, staging: Path, limits: ArchiveLimits, origin: str) -> None:
    total = 0
    seen: set[str] = set()
    count = 0
    try:
        # Iterate instead of getmembers(): a tar with millions of headers is refused early.
        for member in tar:
            count += 1
            if count > limits.max_members:
                raise UnsafeArchiveError(f"{origin}: more than {limits.max_members} members")
            name = _check_member(member, origin)
            if name in seen:
                raise UnsafeArchiveError(f"{origin}: member {name!r} appears twice")
            seen.add(name)
            if member.size > limits.max_file_bytes:
                raise UnsafeArchiveError(
                    f"{origin}: {name} is {member.size} bytes, over {limits.max_file_bytes}"
                )
            fh = tar.extractfile(member)
            if fh is None:
                raise UnsafeArchiveError(f"{origin}: cannot read member {name!r}")
            written = 0
            with fh, (staging / name).open("xb") as out:
                while chunk := fh.read(_COPY_CHUNK):
                    written += len(chunk)
                    total += len(chunk)
                    if written > limits.max_file_bytes or total > limits.max_total_bytes:
                        raise UnsafeArchiveError(
                            f"{origin}: unpacked size exceeds the limit "
                            f"({limits.max_total_bytes} bytes in all)"
                        )
                    out.write(chunk)
    except _CORRUPT as exc:
        raise UnsafeArchiveError(f"{origin}: corrupt tar archive: {exc}") from exc
    if not seen:
        raise UnsafeArchiveError(f"{origin}: archive is empty")
