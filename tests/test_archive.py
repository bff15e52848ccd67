"""Bundle archives: reproducible packing, and unpacking that trusts nothing in the tar."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from floorline.edge.bundle.archive import ArchiveLimits, pack, unpack
from floorline.edge.errors import BundleError, UnsafeArchiveError

Member = tuple[tarfile.TarInfo, bytes | None]


def _reg(name: str, data: bytes = b"payload") -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, None


def _tar(*members: Member, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _size_lies_upward() -> bytes:
    """Header promises 4096 bytes; the archive ends after 10."""
    full = _tar(_reg("model.tflite", b"x" * 4096))
    return full[: 512 + 10]


def _size_lies_downward() -> bytes:
    """Header says 3 bytes, then far more data follows than any limit allows."""
    info, _ = _reg("model.tflite", b"abc")
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    return header + b"A" * 4096 + b"\x00" * 1024


def _compressed(compress: Callable[[bytes], bytes]) -> bytes:
    return compress(_tar(_reg("model.tflite", b"abc" * 100_000)))


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _truncated(compress: Callable[[bytes], bytes], fraction: float = 0.5) -> bytes:
    data = _compressed(compress)
    return data[: int(len(data) * fraction)]


def _flipped(compress: Callable[[bytes], bytes]) -> bytes:
    data = bytearray(_compressed(compress))
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


HOSTILE: list[tuple[str, Callable[[], bytes], ArchiveLimits | None]] = [
    ("absolute path", lambda: _tar(_reg("/etc/cron.d/x")), None),
    ("absolute dotdot", lambda: _tar(_reg("/../x")), None),
    ("parent dir", lambda: _tar(_reg("../x")), None),
    ("parent after dir", lambda: _tar(_reg("a/../../x")), None),
    ("dot-slash parent", lambda: _tar(_reg("./../x")), None),
    ("nested file", lambda: _tar(_reg("sub/file")), None),
    ("backslash", lambda: _tar(_reg("..\\x")), None),
    ("just dot", lambda: _tar(_reg(".")), None),
    ("hidden file", lambda: _tar(_reg(".bashrc")), None),
    ("trailing newline", lambda: _tar(_reg("model.tflite\n")), None),
    ("name too long", lambda: _tar(_reg("a" * 129)), None),
    ("symlink", lambda: _tar(_special("model.tflite", tarfile.SYMTYPE, "/etc/passwd")), None),
    (
        "symlink then write through it",
        lambda: _tar(_special("link", tarfile.SYMTYPE, "/tmp"), _reg("link/x")),
        None,
    ),
    (
        "hardlink outside",
        lambda: _tar(_special("model.tflite", tarfile.LNKTYPE, "../../etc/passwd")),
        None,
    ),
    (
        "hardlink to member",
        lambda: _tar(_reg("a"), _special("b", tarfile.LNKTYPE, "a")),
        None,
    ),
    ("character device", lambda: _tar(_special("null", tarfile.CHRTYPE)), None),
    ("block device", lambda: _tar(_special("sda", tarfile.BLKTYPE)), None),
    ("fifo", lambda: _tar(_special("pipe", tarfile.FIFOTYPE)), None),
    ("directory member", lambda: _tar(_special("sub", tarfile.DIRTYPE)), None),
    ("directory after file", lambda: _tar(_reg("a"), _special("sub", tarfile.DIRTYPE)), None),
    ("duplicate member", lambda: _tar(_reg("a", b"1"), _reg("a", b"2")), None),
    ("duplicate via dot-slash", lambda: _tar(_reg("a", b"1"), _reg("./a", b"2")), None),
    (
        "too many members",
        lambda: _tar(*(_reg(f"f{i}") for i in range(4))),
        ArchiveLimits(max_members=3),
    ),
    (
        "file over max_file_bytes",
        lambda: _tar(_reg("big", b"x" * 11)),
        ArchiveLimits(max_file_bytes=10),
    ),
    (
        "total over max_total_bytes",
        lambda: _tar(_reg("a", b"x" * 10), _reg("b", b"y" * 10)),
        ArchiveLimits(max_file_bytes=10, max_total_bytes=15),
    ),
    ("header size lies upward", _size_lies_upward, None),
    ("not a tar", lambda: b"this is not a tar archive\n" * 64, None),
    ("zero bytes", lambda: b"", None),
    ("random bytes", lambda: bytes(range(256)) * 8, None),
    ("gzip of garbage", lambda: gzip.compress(b"not a tar" * 100, mtime=0), None),
    ("empty tar", _tar, None),
    ("truncated tar.gz", lambda: _truncated(_gzip), None),
    ("tar.gz cut in first header", lambda: _truncated(_gzip, 0.1), None),
    ("truncated tar.xz", lambda: _truncated(lzma.compress), None),
    ("corrupt tar.xz", lambda: _flipped(lzma.compress), None),
    ("truncated tar.bz2", lambda: _truncated(bz2.compress), None),
    ("good member then traversal", lambda: _tar(_reg("ok"), _reg("../x")), None),
]


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(
    ("build", "limits"),
    [pytest.param(build, limits, id=case) for case, build, limits in HOSTILE],
)
def test_hostile_archive_is_refused_and_leaves_nothing(
    tmp_path: Path, build: Callable[[], bytes], limits: ArchiveLimits | None
) -> None:
    parent = tmp_path / "a" / "b" / "bundles"
    dest = parent / "demo"
    with pytest.raises(UnsafeArchiveError):
        unpack(build(), dest, limits)
    assert not dest.exists()
    assert list(parent.iterdir()) == []  # no staging dir left behind
    assert _snapshot(tmp_path) == {"a", "a/b", "a/b/bundles"}  # nothing escaped either


@pytest.mark.parametrize(
    ("build", "limits"),
    [pytest.param(build, limits, id=case) for case, build, limits in HOSTILE[:12]],
)
def test_hostile_archive_file_on_disk_is_refused(
    tmp_path: Path, build: Callable[[], bytes], limits: ArchiveLimits | None
) -> None:
    source = tmp_path / "in" / "bundle.tar"
    source.parent.mkdir()
    source.write_bytes(build())
    dest = tmp_path / "out" / "demo"
    with pytest.raises(UnsafeArchiveError, match=str(source)):
        unpack(source, dest, limits)
    assert list(dest.parent.iterdir()) == []


def test_unsafe_archive_error_is_a_bundle_error() -> None:
    assert issubclass(UnsafeArchiveError, BundleError)


def test_header_size_lying_downward_never_writes_past_the_header_size(tmp_path: Path) -> None:
    dest = tmp_path / "demo"
    try:
        unpack(_size_lies_downward(), dest, ArchiveLimits(max_file_bytes=100))
    except UnsafeArchiveError:
        assert not dest.exists()
    else:
        assert [p.name for p in dest.iterdir()] == ["model.tflite"]
        assert (dest / "model.tflite").read_bytes() == b"A" * 3
    assert {p.name for p in tmp_path.iterdir()} <= {"demo"}


def test_missing_archive_file_is_an_unsafe_archive_error(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchiveError, match="not a readable tar"):
        unpack(tmp_path / "absent.tar", tmp_path / "out" / "demo")
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_destination_is_left_alone(tmp_path: Path) -> None:
    dest = tmp_path / "demo"
    dest.mkdir()
    (dest / "keep").write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        unpack(_tar(_reg("keep", b"theirs")), dest)
    assert (dest / "keep").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


# --- what is accepted --------------------------------------------------------------------------


def test_dot_slash_prefix_is_accepted(tmp_path: Path) -> None:
    data = _tar(_reg("./model.tflite", b"weights"), _reg("golden.npz", b"g"))
    dest = unpack(data, tmp_path / "d")
    assert sorted(p.name for p in dest.iterdir()) == ["golden.npz", "model.tflite"]
    assert (dest / "model.tflite").read_bytes() == b"weights"


def test_members_exactly_at_the_limits_are_accepted(tmp_path: Path) -> None:
    limits = ArchiveLimits(max_members=2, max_file_bytes=10, max_total_bytes=20)
    dest = unpack(_tar(_reg("a", b"x" * 10), _reg("b", b"y" * 10)), tmp_path / "d", limits)
    assert (dest / "a").read_bytes() == b"x" * 10
    assert (dest / "b").read_bytes() == b"y" * 10


@pytest.mark.parametrize(
    "fmt",
    [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
    ids=["ustar", "gnu", "pax"],
)
def test_plain_tar_formats_are_accepted(tmp_path: Path, fmt: int) -> None:
    dest = unpack(_tar(_reg("model.onnx", b"\x00\x01"), fmt=fmt), tmp_path / "d")
    assert (dest / "model.onnx").read_bytes() == b"\x00\x01"


def test_gzipped_tar_is_accepted(tmp_path: Path) -> None:
    data = gzip.compress(_tar(_reg("model.tflite", b"w" * 100)), mtime=0)
    dest = unpack(data, tmp_path / "d")
    assert (dest / "model.tflite").read_bytes() == b"w" * 100


# --- pack --------------------------------------------------------------------------------------


def _bundle_like_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "manifest.json").write_bytes(b'{"name": "demo"}\n')
    (root / "model.tflite").write_bytes(bytes(range(256)) * 40)
    (root / "golden.npz").write_bytes(b"\x93NUMPY" + b"\x00" * 100)
    return root


def test_pack_is_byte_reproducible(tmp_path: Path) -> None:
    src = _bundle_like_dir(tmp_path / "src")
    first = pack(src, tmp_path / "a.tar").read_bytes()
    second = pack(src, tmp_path / "b.tar").read_bytes()
    assert first == second


def test_pack_ignores_mtime_mode_and_creation_order(tmp_path: Path) -> None:
    one = _bundle_like_dir(tmp_path / "one")
    two = tmp_path / "two"
    two.mkdir()
    for name in sorted((p.name for p in one.iterdir()), reverse=True):
        (two / name).write_bytes((one / name).read_bytes())
        os.utime(two / name, (1_000_000, 1_000_000))
        (two / name).chmod(0o600)
    assert pack(one, tmp_path / "1.tar").read_bytes() == pack(two, tmp_path / "2.tar").read_bytes()


def test_pack_unpack_round_trip_preserves_contents(tmp_path: Path) -> None:
    src = _bundle_like_dir(tmp_path / "src")
    archive_path = pack(src, tmp_path / "bundle.tar")
    dest = unpack(archive_path, tmp_path / "out" / "bundle")
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == {
        p.name: p.read_bytes() for p in src.iterdir()
    }
    assert list((tmp_path / "out").iterdir()) == [dest]


def test_pack_skips_hidden_files_and_directories(tmp_path: Path) -> None:
    src = _bundle_like_dir(tmp_path / "src")
    (src / ".DS_Store").write_bytes(b"junk")
    (src / "sub").mkdir()
    archive_path = pack(src, tmp_path / "bundle.tar")
    with tarfile.open(archive_path) as tar:
        names = tar.getnames()
    assert names == ["golden.npz", "manifest.json", "model.tflite"]


def test_pack_leaves_no_temp_file(tmp_path: Path) -> None:
    src = _bundle_like_dir(tmp_path / "src")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    pack(src, out_dir / "bundle.tar")
    assert [p.name for p in out_dir.iterdir()] == ["bundle.tar"]


def test_pack_of_empty_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsafeArchiveError, match="nothing to pack"):
        pack(tmp_path / "empty", tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


# --- property: whatever the name, nothing lands outside DEST -----------------------------------

_NAME_PARTS = st.sampled_from(["..", ".", "/", "./", "../", "a", "model.tflite", "\\", "\n", "~"])
_NAMES = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=140),
    st.lists(_NAME_PARTS, min_size=1, max_size=6).map("".join),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=_NAMES, data=st.binary(max_size=64))
def test_unpack_never_writes_outside_dest(name: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        parent = Path(tmp) / "parent"
        parent.mkdir()
        dest = parent / "dest"
        try:
            archive_bytes = _tar(_reg(name, data))
        except (ValueError, UnicodeError, tarfile.TarError):
            return  # tarfile itself cannot encode this name; nothing to unpack
        try:
            unpack(archive_bytes, dest)
        except UnsafeArchiveError:
            assert not dest.exists()
            assert list(parent.iterdir()) == []
        else:
            assert [p.name for p in parent.iterdir()] == ["dest"]
            written = list(dest.iterdir())
            assert len(written) == 1
            (only,) = written
            assert only.is_file()
            assert not only.is_symlink()
            assert only.parent == dest
            assert only.read_bytes() == data
        assert [p.name for p in Path(tmp).iterdir()] == ["parent"]


def test_a_tar_bundle_is_named_by_its_archive_path_in_reports_and_errors(tmp_path):
    # Not the temporary directory it was unpacked to: an operator looks for the file they gave.
    import shutil  # noqa: PLC0415

    from floorline.edge.bundle.archive import pack  # noqa: PLC0415
    from floorline.edge.bundle.bundle import Bundle  # noqa: PLC0415
    from floorline.edge.bundle.report import describe  # noqa: PLC0415
    from floorline.edge.errors import IntegrityError  # noqa: PLC0415
    from tests.daemon_harness import EXAMPLE  # noqa: PLC0415

    good = pack(EXAMPLE, tmp_path / "good.tar")
    with Bundle.open(good) as bundle:
        assert f"path       {good}" in describe(bundle)
    work = tmp_path / "bad"
    shutil.copytree(EXAMPLE, work)
    with (work / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    bad = pack(work, tmp_path / "bad.tar")
    with pytest.raises(IntegrityError) as info:
        Bundle.open(bad)
    assert str(bad) in str(info.value)
    assert "floorline-bundle-" not in str(info.value)
