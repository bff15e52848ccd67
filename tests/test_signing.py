"""Ed25519 keys and detached manifest signatures."""

from __future__ import annotations

import base64
import json
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x448
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floorline.edge.bundle.signing import (
    Signature,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    parse_public_key,
    sign,
    verify,
)
from floorline.edge.errors import SignatureError

DATA = b'{"name": "vibration-demo"}\n'


def _raw_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


# --- key generation ----------------------------------------------------------------------------


def test_keygen_writes_private_key_readable_only_by_owner(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path / "signer")
    assert private == tmp_path / "signer.key"
    assert public == tmp_path / "signer.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_keygen_private_and_public_key_belong_together(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path / "signer")
    signature = sign(DATA, load_private_key(private))
    assert verify(DATA, signature, [load_public_key(public)]) == signature.key_id


def test_keygen_refuses_to_overwrite_existing_key(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path / "signer")
    before = (private.read_bytes(), public.read_bytes())
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_keypair(tmp_path / "signer")
    assert (private.read_bytes(), public.read_bytes()) == before


def test_keygen_refuses_when_only_public_key_exists(tmp_path: Path) -> None:
    (tmp_path / "signer.pub").write_text("someone else's key\n")
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path / "signer")
    assert not (tmp_path / "signer.key").exists()
    assert (tmp_path / "signer.pub").read_text() == "someone else's key\n"


def test_keygen_overwrite_replaces_key(tmp_path: Path) -> None:
    private, _ = generate_keypair(tmp_path / "signer")
    before = private.read_bytes()
    private, _ = generate_keypair(tmp_path / "signer", overwrite=True)
    assert private.read_bytes() != before
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


# --- sign / verify -----------------------------------------------------------------------------


def test_sign_verify_round_trip_returns_key_id() -> None:
    key = Ed25519PrivateKey.generate()
    signature = sign(DATA, key)
    assert signature.key_id == key_id(key.public_key())
    assert len(signature.key_id) == 16
    assert re.fullmatch("[0-9a-f]{16}", signature.key_id)
    assert verify(DATA, signature, [key.public_key()]) == signature.key_id


def test_signature_file_round_trip() -> None:
    signature = sign(DATA, Ed25519PrivateKey.generate())
    parsed = Signature.from_bytes(signature.to_bytes())
    assert parsed == signature
    assert json.loads(signature.to_bytes())["algorithm"] == "ed25519"


def test_verify_finds_signer_among_several_trusted_keys() -> None:
    signer = Ed25519PrivateKey.generate()
    others = [Ed25519PrivateKey.generate().public_key() for _ in range(3)]
    signature = sign(DATA, signer)
    assert verify(DATA, signature, [*others, signer.public_key()]) == signature.key_id


def test_wrong_key_is_not_trusted() -> None:
    signer = Ed25519PrivateKey.generate()
    stranger = Ed25519PrivateKey.generate().public_key()
    signature = sign(DATA, signer)
    with pytest.raises(SignatureError, match="not trusted") as info:
        verify(DATA, signature, [stranger])
    assert signature.key_id in str(info.value)
    assert key_id(stranger) in str(info.value)


def test_changed_data_does_not_verify() -> None:
    key = Ed25519PrivateKey.generate()
    signature = sign(DATA, key)
    with pytest.raises(SignatureError, match="does not verify"):
        verify(DATA.replace(b"demo", b"evil"), signature, [key.public_key()])


def test_tampered_signature_bytes_do_not_verify() -> None:
    key = Ed25519PrivateKey.generate()
    good = sign(DATA, key)
    flipped = bytes([good.signature[0] ^ 1]) + good.signature[1:]
    with pytest.raises(SignatureError, match="does not verify"):
        verify(DATA, Signature(good.key_id, flipped), [key.public_key()])


def test_truncated_signature_does_not_verify() -> None:
    key = Ed25519PrivateKey.generate()
    good = sign(DATA, key)
    with pytest.raises(SignatureError):
        verify(DATA, Signature(good.key_id, good.signature[:10]), [key.public_key()])


def test_no_trusted_keys_is_an_error() -> None:
    signature = sign(DATA, Ed25519PrivateKey.generate())
    with pytest.raises(SignatureError, match="no trusted public keys"):
        verify(DATA, signature, [])


def test_origin_prefixes_verify_error() -> None:
    signature = sign(DATA, Ed25519PrivateKey.generate())
    with pytest.raises(SignatureError, match=r"^b/manifest\.sig: "):
        verify(DATA, signature, [], origin="b/manifest.sig")


# --- public key formats ------------------------------------------------------------------------


def test_base64_raw_public_key_is_accepted(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "signer.b64"
    path.write_text(f"  {_raw_b64(key)}\n")
    loaded = load_public_key(path)
    assert key_id(loaded) == key_id(key.public_key())
    assert verify(DATA, sign(DATA, key), [loaded]) == key_id(key.public_key())


def test_pem_and_base64_forms_give_same_key_id() -> None:
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert key_id(parse_public_key(pem.decode())) == key_id(parse_public_key(_raw_b64(key)))


def _x448_public_pem() -> bytes:
    return (
        x448.X448PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"not a key at all\n", id="text"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe\x80garbage", id="not utf-8"),
        pytest.param(base64.b64encode(b"\x01" * 31) + b"\n", id="31 bytes base64"),
        pytest.param(base64.b64encode(b"\x01" * 33) + b"\n", id="33 bytes base64"),
        pytest.param(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", id="bad pem"),
        pytest.param(_x448_public_pem(), id="x448 pem"),
    ],
)
def test_garbage_public_key_file_is_a_signature_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "trusted.pub"
    path.write_bytes(content)
    with pytest.raises(SignatureError) as info:
        load_public_key(path)
    assert str(path) in str(info.value)


def test_missing_public_key_file_is_a_signature_error(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match="cannot read public key"):
        load_public_key(tmp_path / "absent.pub")


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"garbage\n", id="text"),
        pytest.param(
            x448.X448PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            id="x448 private key",
        ),
        pytest.param(
            Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
            id="encrypted",
        ),
    ],
)
def test_garbage_private_key_file_is_a_signature_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "signer.key"
    path.write_bytes(content)
    with pytest.raises(SignatureError):
        load_private_key(path)


def test_missing_private_key_file_is_a_signature_error(tmp_path: Path) -> None:
    with pytest.raises(SignatureError):
        load_private_key(tmp_path / "absent.key")


# --- malformed manifest.sig --------------------------------------------------------------------

_SIG_B64 = base64.b64encode(b"\x00" * 64).decode()


def _sig_doc(**fields: object) -> bytes:
    doc: dict[str, object] = {"algorithm": "ed25519", "key_id": "0" * 16, "signature": _SIG_B64}
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="not json"),
        pytest.param(b"\xff\xfe", id="not utf-8"),
        pytest.param(b"[]", id="json list"),
        pytest.param(b"null", id="json null"),
        pytest.param(_sig_doc(algorithm="rsa"), id="wrong algorithm"),
        pytest.param(_sig_doc(algorithm=None), id="no algorithm"),
        pytest.param(_sig_doc(key_id=None), id="no key id"),
        pytest.param(_sig_doc(signature=None), id="no signature"),
        pytest.param(_sig_doc(signature="not base64!"), id="signature not base64"),
        pytest.param(_sig_doc(signature="AAA"), id="signature bad padding"),
        pytest.param(_sig_doc(signature="\u00e9\u00e9\u00e9\u00e9"), id="signature non-ascii"),
    ],
)
def test_malformed_signature_file_is_a_signature_error(data: bytes) -> None:
    with pytest.raises(SignatureError, match=r"^bundle/manifest\.sig: "):
        Signature.from_bytes(data, origin="bundle/manifest.sig")
