"""Bundle integrity: what opens verifies completely, what does not verify never opens."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from floorline.edge.bundle import archive
from floorline.edge.bundle.bundle import (
    GOLDEN_FILE,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    Bundle,
    Golden,
    commit,
    staging_dir,
)
from floorline.edge.bundle.hashing import sha256_bytes
from floorline.edge.bundle.manifest import Manifest
from floorline.edge.bundle.signing import key_id
from floorline.edge.errors import BundleError, IntegrityError, ManifestError, SignatureError
from tests.bundle_factory import (
    ARTIFACT_FILE,
    LABELS,
    SAMPLES,
    make_bundle,
    manifest_for,
    stage_files,
)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def pub(key: Ed25519PrivateKey) -> Ed25519PublicKey:
    return key.public_key()


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundles" / "demo")


@pytest.fixture
def signed_dir(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    return make_bundle(tmp_path / "bundles" / "signed", signing_key=key)


def _staging_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _rewrite_manifest(bundle: Path, **update: object) -> None:
    path = bundle / MANIFEST_FILE
    manifest = Manifest.from_bytes(path.read_bytes())
    raw = manifest.model_dump(mode="json")
    raw.update(update)
    path.write_bytes(Manifest.model_validate(raw).to_bytes())


# --- valid bundles open ------------------------------------------------------------------------


def test_valid_bundle_directory_opens(bundle_dir: Path) -> None:
    with Bundle.open(bundle_dir) as bundle:
        assert bundle.path == bundle_dir
        assert bundle.manifest.heads[0].labels == LABELS
        assert bundle.signed_by is None
        assert bundle.manifest_sha256 == sha256_bytes((bundle_dir / MANIFEST_FILE).read_bytes())
        assert bundle.golden.inputs.shape == (SAMPLES, 8, 3)
        assert bundle.golden.source_outputs.shape == (SAMPLES, 2)
        assert set(bundle.golden.expected) == {ARTIFACT_FILE}
        assert bundle.artifact_path(bundle.artifact(fmt="tflite")) == bundle_dir / ARTIFACT_FILE
    assert bundle_dir.is_dir()  # closing a directory bundle never deletes it


def test_committed_bundle_holds_exactly_the_expected_files(bundle_dir: Path) -> None:
    names = sorted(p.name for p in bundle_dir.iterdir())
    assert names == sorted([ARTIFACT_FILE, GOLDEN_FILE, MANIFEST_FILE])
    assert _staging_leftovers(bundle_dir.parent) == []


def test_packed_bundle_opens_and_cleans_temp_dir_on_close(bundle_dir: Path, tmp_path: Path) -> None:
    tar = archive.pack(bundle_dir, tmp_path / "demo.tar")
    bundle = Bundle.open(tar)
    workdir = bundle.path.parent
    assert workdir.is_dir()
    assert not bundle.path.is_relative_to(bundle_dir)
    assert (bundle.path / ARTIFACT_FILE).read_bytes() == (bundle_dir / ARTIFACT_FILE).read_bytes()
    assert bundle.manifest_sha256 == sha256_bytes((bundle_dir / MANIFEST_FILE).read_bytes())
    bundle.close()
    assert not workdir.exists()
    bundle.close()  # idempotent


def test_packed_bundle_context_manager_removes_temp_dir(bundle_dir: Path, tmp_path: Path) -> None:
    tar = archive.pack(bundle_dir, tmp_path / "demo.tar")
    with Bundle.open(tar) as bundle:
        workdir = bundle.path.parent
    assert not workdir.exists()


def test_failed_open_of_packed_bundle_leaves_no_temp_dir(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _flip_byte(bundle_dir / ARTIFACT_FILE)
    tar = archive.pack(bundle_dir, tmp_path / "demo.tar")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(IntegrityError):
        Bundle.open(tar)
    assert list(scratch.iterdir()) == []


def test_missing_path_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such bundle"):
        Bundle.open(tmp_path / "absent")


def test_non_tar_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "demo.tar"
    path.write_bytes(b"definitely not a tar archive" * 40)
    with pytest.raises(BundleError):
        Bundle.open(path)


# --- integrity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [ARTIFACT_FILE, GOLDEN_FILE])
def test_flipped_byte_is_an_integrity_error_naming_the_file(bundle_dir: Path, name: str) -> None:
    _flip_byte(bundle_dir / name)
    with pytest.raises(IntegrityError, match="changed after conversion") as info:
        Bundle.open(bundle_dir)
    assert name in str(info.value)


def test_flipped_byte_in_packed_bundle_is_an_integrity_error(
    bundle_dir: Path, tmp_path: Path
) -> None:
    _flip_byte(bundle_dir / ARTIFACT_FILE, offset=0)
    tar = archive.pack(bundle_dir, tmp_path / "demo.tar")
    with pytest.raises(IntegrityError, match=ARTIFACT_FILE):
        Bundle.open(tar)


def test_appended_byte_is_an_integrity_error(bundle_dir: Path) -> None:
    with (bundle_dir / ARTIFACT_FILE).open("ab") as fh:
        fh.write(b"\x00")
    with pytest.raises(IntegrityError, match=ARTIFACT_FILE):
        Bundle.open(bundle_dir)


@pytest.mark.parametrize("name", [ARTIFACT_FILE, GOLDEN_FILE])
def test_missing_listed_file_is_an_integrity_error(bundle_dir: Path, name: str) -> None:
    (bundle_dir / name).unlink()
    with pytest.raises(IntegrityError, match=f"{name} is listed in the manifest but missing"):
        Bundle.open(bundle_dir)


def test_listed_file_replaced_by_directory_is_an_integrity_error(bundle_dir: Path) -> None:
    (bundle_dir / ARTIFACT_FILE).unlink()
    (bundle_dir / ARTIFACT_FILE).mkdir()
    with pytest.raises(IntegrityError, match="missing"):
        Bundle.open(bundle_dir)


def test_listed_file_replaced_by_symlink_is_refused_even_with_matching_hash(
    bundle_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.tflite"
    outside.write_bytes((bundle_dir / ARTIFACT_FILE).read_bytes())
    (bundle_dir / ARTIFACT_FILE).unlink()
    (bundle_dir / ARTIFACT_FILE).symlink_to(outside)
    with pytest.raises(IntegrityError, match=ARTIFACT_FILE):
        Bundle.open(bundle_dir)


@pytest.mark.parametrize("name", ["notes.txt", ".DS_Store", "model_int8.tflite"])
def test_extra_unlisted_file_is_an_integrity_error(bundle_dir: Path, name: str) -> None:
    (bundle_dir / name).write_bytes(b"extra")
    with pytest.raises(IntegrityError, match="not listed in the manifest") as info:
        Bundle.open(bundle_dir)
    assert name in str(info.value)


def test_extra_unlisted_directory_is_an_integrity_error(bundle_dir: Path) -> None:
    (bundle_dir / "sub").mkdir()
    with pytest.raises(IntegrityError, match="sub"):
        Bundle.open(bundle_dir)


def test_missing_manifest_is_a_manifest_error(bundle_dir: Path) -> None:
    (bundle_dir / MANIFEST_FILE).unlink()
    with pytest.raises(ManifestError, match=MANIFEST_FILE):
        Bundle.open(bundle_dir)


def test_invalid_manifest_is_a_manifest_error(bundle_dir: Path) -> None:
    (bundle_dir / MANIFEST_FILE).write_bytes(b"[]")
    with pytest.raises(ManifestError):
        Bundle.open(bundle_dir)


def test_edited_manifest_whose_hash_no_longer_matches_is_an_integrity_error(
    bundle_dir: Path,
) -> None:
    raw = Manifest.from_bytes((bundle_dir / MANIFEST_FILE).read_bytes()).model_dump(mode="json")
    raw["artifacts"][0]["sha256"] = "f" * 64
    (bundle_dir / MANIFEST_FILE).write_bytes(Manifest.model_validate(raw).to_bytes())
    with pytest.raises(IntegrityError, match=ARTIFACT_FILE):
        Bundle.open(bundle_dir)


def test_edited_manifest_listing_a_replaced_artifact_needs_a_signature_to_catch(
    bundle_dir: Path,
) -> None:
    """Unsigned bundles are protected against corruption only, not against a consistent rewrite."""
    new_model = b"\x42" * 300
    (bundle_dir / ARTIFACT_FILE).write_bytes(new_model)
    raw = Manifest.from_bytes((bundle_dir / MANIFEST_FILE).read_bytes()).model_dump(mode="json")
    raw["artifacts"][0].update(sha256=sha256_bytes(new_model), size=len(new_model))
    (bundle_dir / MANIFEST_FILE).write_bytes(Manifest.model_validate(raw).to_bytes())
    with Bundle.open(bundle_dir) as bundle:
        assert bundle.signed_by is None
    with pytest.raises(SignatureError, match="unsigned"):
        Bundle.open(bundle_dir, require_signature=True)


# --- signatures --------------------------------------------------------------------------------


def test_signed_bundle_with_right_key_reports_signer(
    signed_dir: Path, pub: Ed25519PublicKey
) -> None:
    with Bundle.open(signed_dir, trusted_keys=[pub], require_signature=True) as bundle:
        assert bundle.signed_by == key_id(pub)


def test_signed_packed_bundle_with_right_key_reports_signer(
    signed_dir: Path, pub: Ed25519PublicKey, tmp_path: Path
) -> None:
    tar = archive.pack(signed_dir, tmp_path / "signed.tar")
    with Bundle.open(tar, trusted_keys=[pub], require_signature=True) as bundle:
        assert bundle.signed_by == key_id(pub)


def test_signed_bundle_is_checked_when_keys_given_without_requirement(
    signed_dir: Path, pub: Ed25519PublicKey
) -> None:
    with Bundle.open(signed_dir, trusted_keys=[pub]) as bundle:
        assert bundle.signed_by == key_id(pub)


def test_signed_bundle_without_keys_opens_unverified(signed_dir: Path) -> None:
    with Bundle.open(signed_dir) as bundle:
        assert bundle.signed_by is None


def test_edited_manifest_of_signed_bundle_is_a_signature_error(
    signed_dir: Path, pub: Ed25519PublicKey
) -> None:
    _rewrite_manifest(signed_dir, version="1.0.1")
    with pytest.raises(SignatureError, match="does not verify"):
        Bundle.open(signed_dir, trusted_keys=[pub])


def test_whitespace_edit_of_signed_manifest_is_a_signature_error(
    signed_dir: Path, pub: Ed25519PublicKey
) -> None:
    path = signed_dir / MANIFEST_FILE
    path.write_bytes(path.read_bytes() + b"\n")
    with pytest.raises(SignatureError):
        Bundle.open(signed_dir, trusted_keys=[pub], require_signature=True)


def test_resigned_by_another_key_is_not_trusted(tmp_path: Path, pub: Ed25519PublicKey) -> None:
    other = make_bundle(tmp_path / "other", signing_key=Ed25519PrivateKey.generate())
    with pytest.raises(SignatureError, match="not trusted"):
        Bundle.open(other, trusted_keys=[pub], require_signature=True)


def test_signed_bundle_and_wrong_trusted_key_is_a_signature_error(signed_dir: Path) -> None:
    stranger = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(SignatureError, match="not trusted"):
        Bundle.open(signed_dir, trusted_keys=[stranger])


def test_require_signature_on_unsigned_bundle_is_a_signature_error(
    bundle_dir: Path, pub: Ed25519PublicKey
) -> None:
    with pytest.raises(SignatureError, match="unsigned bundle"):
        Bundle.open(bundle_dir, trusted_keys=[pub], require_signature=True)


def test_require_signature_without_trusted_keys_is_a_signature_error(signed_dir: Path) -> None:
    with pytest.raises(SignatureError, match="no trusted keys"):
        Bundle.open(signed_dir, require_signature=True)


def test_removed_signature_with_requirement_is_a_signature_error(
    signed_dir: Path, pub: Ed25519PublicKey
) -> None:
    (signed_dir / SIGNATURE_FILE).unlink()
    with pytest.raises(SignatureError, match="unsigned"):
        Bundle.open(signed_dir, trusted_keys=[pub], require_signature=True)


def test_malformed_signature_file_is_a_signature_error(
    signed_dir: Path, pub: Ed25519PublicKey
) -> None:
    (signed_dir / SIGNATURE_FILE).write_bytes(b"not json")
    with pytest.raises(SignatureError, match="malformed"):
        Bundle.open(signed_dir, trusted_keys=[pub])


def test_signature_moved_to_another_bundle_does_not_verify(
    tmp_path: Path, key: Ed25519PrivateKey, pub: Ed25519PublicKey
) -> None:
    first = make_bundle(tmp_path / "first", signing_key=key)
    second = make_bundle(tmp_path / "second", version="2.0.0")
    (second / SIGNATURE_FILE).write_bytes((first / SIGNATURE_FILE).read_bytes())
    with pytest.raises(SignatureError, match="does not verify"):
        Bundle.open(second, trusted_keys=[pub])


# --- commit ------------------------------------------------------------------------------------


def _wrong_artifact_sha(staging: Path, manifest: Manifest) -> Manifest:
    raw = manifest.model_dump(mode="json")
    raw["artifacts"][0]["sha256"] = "e" * 64
    return Manifest.model_validate(raw)


def _golden_changed_after_hashing(staging: Path, manifest: Manifest) -> Manifest:
    _flip_byte(staging / GOLDEN_FILE)
    return manifest


def _convert(
    dest: Path,
    *,
    overwrite: bool = False,
    tamper: Callable[[Path, Manifest], Manifest] | None = None,
    crash: bool = False,
    **overrides: object,
) -> Path:
    """What a converter does: stage files, describe them, commit; any step may raise."""
    with staging_dir(dest) as staging:
        assert staging.parent == dest.parent
        stage_files(staging, seed=1)
        if crash:
            raise RuntimeError("converter crashed")
        manifest = manifest_for(staging, **overrides)
        if tamper is not None:
            manifest = tamper(staging, manifest)
        return commit(staging, dest, manifest, overwrite=overwrite)


def test_commit_refuses_to_overwrite_and_leaves_no_staging(bundle_dir: Path) -> None:
    before = {p.name: p.read_bytes() for p in bundle_dir.iterdir()}
    with pytest.raises(FileExistsError):
        _convert(bundle_dir, version="2.0.0")
    assert {p.name: p.read_bytes() for p in bundle_dir.iterdir()} == before
    assert _staging_leftovers(bundle_dir.parent) == []


def test_commit_overwrite_replaces_bundle_and_leaves_nothing_behind(bundle_dir: Path) -> None:
    _convert(bundle_dir, overwrite=True, version="2.0.0")
    with Bundle.open(bundle_dir) as bundle:
        assert bundle.manifest.version == "2.0.0"
    assert _staging_leftovers(bundle_dir.parent) == []
    assert sorted(p.name for p in bundle_dir.parent.iterdir()) == [bundle_dir.name]


def test_successful_commit_leaves_no_staging(tmp_path: Path) -> None:
    dest = _convert(tmp_path / "bundles" / "demo")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["demo"]


def test_exception_inside_staging_block_leaves_nothing_behind(tmp_path: Path) -> None:
    dest = tmp_path / "bundles" / "demo"
    with pytest.raises(RuntimeError, match="converter crashed"):
        _convert(dest, crash=True)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_staging_dir_without_commit_is_removed(tmp_path: Path) -> None:
    dest = tmp_path / "demo"
    with staging_dir(dest) as staging:
        stage_files(staging)
    assert not staging.exists()
    assert list(tmp_path.iterdir()) == []


def test_commit_recomputes_artifact_hash(tmp_path: Path) -> None:
    dest = tmp_path / "bundles" / "demo"
    with pytest.raises(IntegrityError, match=ARTIFACT_FILE):
        _convert(dest, tamper=_wrong_artifact_sha)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_commit_recomputes_golden_hash(tmp_path: Path) -> None:
    dest = tmp_path / "bundles" / "demo"
    with pytest.raises(IntegrityError, match="golden"):
        _convert(dest, tamper=_golden_changed_after_hashing)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_commit_signs_exact_manifest_bytes(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    dest = tmp_path / "demo"
    with staging_dir(dest) as staging:
        stage_files(staging)
        manifest = manifest_for(staging)
        commit(staging, dest, manifest, signing_key=key)
    assert (dest / MANIFEST_FILE).read_bytes() == manifest.to_bytes()
    assert (dest / SIGNATURE_FILE).is_file()


# --- golden data is never unpickled ------------------------------------------------------------


class _Exploit:
    """Unpickling this creates a directory: proof that pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def _npz(**arrays: object) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def test_golden_with_pickled_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = np.empty(1, dtype=object)
    payload[0] = _Exploit(marker)
    bad = _npz(inputs=payload, source_outputs=np.zeros((1, 2), np.float32))
    bundle = make_bundle(tmp_path / "demo", golden_bytes=bad)
    with pytest.raises(BundleError, match="unreadable golden data") as info:
        Bundle.open(bundle)
    assert type(info.value) is BundleError  # got past the integrity check to the loader
    assert not marker.exists()


@pytest.mark.parametrize(
    "golden_bytes",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"PK\x03\x04" + b"\x00" * 60, id="broken zip"),
        pytest.param(_npz(inputs=np.zeros((4, 8, 3), np.float32))[:200], id="truncated npz"),
        pytest.param(b"just some text", id="not npz"),
        pytest.param(_npz(inputs=np.zeros((4, 8, 3), np.float32)), id="no source outputs"),
        pytest.param(
            _npz(inputs=np.float32(1.0), source_outputs=np.float32(1.0)), id="scalar arrays"
        ),
        pytest.param(
            _npz(inputs=np.zeros((4, 8, 3), np.float32), source_outputs=np.zeros((3, 2))),
            id="sample count mismatch",
        ),
        pytest.param(
            _npz(inputs=np.array(["a", "b"]), source_outputs=np.zeros((2, 2))), id="strings"
        ),
    ],
)
def test_unreadable_golden_data_is_a_bundle_error(tmp_path: Path, golden_bytes: bytes) -> None:
    bundle = make_bundle(tmp_path / "demo", golden_bytes=golden_bytes)
    with pytest.raises(BundleError) as info:
        Bundle.open(bundle)
    assert type(info.value) is BundleError
    assert GOLDEN_FILE in str(info.value)


def test_golden_save_is_byte_reproducible(tmp_path: Path) -> None:
    golden = Golden(
        inputs=np.ones((2, 8, 3), np.float32),
        source_outputs=np.zeros((2, 2), np.float32),
        expected={ARTIFACT_FILE: np.zeros((2, 2), np.float32)},
    )
    golden.save(tmp_path / "a.npz")
    golden.save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    loaded = Golden.load(tmp_path / "a.npz")
    np.testing.assert_array_equal(loaded.inputs, golden.inputs)
    assert set(loaded.expected) == {ARTIFACT_FILE}
