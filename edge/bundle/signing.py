"""Ed25519 keys and detached signatures for bundle manifests (and, later, fleet documents).

Private keys are PEM (PKCS#8) files written with mode 0600; public keys are PEM files or the raw
32-byte key in base64 on one line, which fits in a YAML config. A key id is the first 16 hex digits
of the sha256 of the raw public key, so reports can say who signed without printing the key.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from floorline.edge.bundle.hashing import sha256_bytes
from floorline.edge.errors import SignatureError

ALGORITHM = "ed25519"


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short, stable identifier of a public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_bytes(raw)[:16]


def generate_keypair(prefix: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write PREFIX.key (private, 0600) and PREFIX.pub (public); return both paths."""
    private_path = prefix.with_name(prefix.name + ".key")
    public_path = prefix.with_name(prefix.name + ".pub")
    for path in (private_path, public_path):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Create with 0600 from the start: a chmod after writing leaves a window where others can read.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(private_path, flags, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an unencrypted PEM ed25519 private key."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: cannot read an ed25519 private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: is not an ed25519 private key")
    return key


def parse_public_key(text: str, *, origin: str = "public key") -> Ed25519PublicKey:
    """Parse a PEM public key or a base64 raw 32-byte key."""
    stripped = text.strip()
    try:
        if stripped.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(stripped.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise SignatureError(f"{origin}: is not an ed25519 public key")
            return key
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(stripped, validate=True))
    except (ValueError, binascii.Error) as exc:
        raise SignatureError(f"{origin}: not a PEM or base64 ed25519 public key: {exc}") from exc


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a public key file (PEM or base64 raw)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SignatureError(f"{path}: cannot read public key: {exc}") from exc
    return parse_public_key(text, origin=str(path))


def load_public_keys(entries: list[str]) -> list[Ed25519PublicKey]:
    """Keys from config entries: each a key file path (PEM or base64) or an inline base64 key."""
    return [
        load_public_key(Path(e)) if Path(e).exists() else parse_public_key(e, origin="config")
        for e in entries
    ]


@dataclass(frozen=True)
class Signature:
    """A detached ed25519 signature with the id of the key that made it."""

    key_id: str
    signature: bytes

    def to_bytes(self) -> bytes:
        """The manifest.sig file contents."""
        doc = {
            "algorithm": ALGORITHM,
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode(),
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, origin: str = "signature") -> Signature:
        """Parse a manifest.sig file."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("algorithm") != ALGORITHM:
                raise SignatureError(f"{origin}: algorithm must be {ALGORITHM!r}")
            sig = base64.b64decode(str(doc["signature"]), validate=True)
            return cls(key_id=str(doc["key_id"]), signature=sig)
        except (ValueError, RecursionError, KeyError) as exc:  # JSON, UTF-8, base64, non-ASCII
            raise SignatureError(f"{origin}: malformed signature file: {exc}") from exc


def sign(data: bytes, key: Ed25519PrivateKey) -> Signature:
    """Sign bytes."""
    return Signature(key_id=key_id(key.public_key()), signature=key.sign(data))


def verify(
    data: bytes,
    signature: Signature,
    trusted: list[Ed25519PublicKey],
    *,
    origin: str = "signature",
) -> str:
    """Check a signature against trusted keys; return the signer's key id, or raise."""
    if not trusted:
        raise SignatureError(f"{origin}: no trusted public keys are configured to verify it")
    for key in trusted:
        if key_id(key) != signature.key_id:
            continue
        try:
            key.verify(signature.signature, data)
        except InvalidSignature as exc:
            raise SignatureError(
                f"{origin}: signature by key {signature.key_id} does not verify: "
                "the signed content was changed"
            ) from exc
        return signature.key_id
    known = ", ".join(key_id(k) for k in trusted)
    raise SignatureError(
        f"{origin}: signed by key {signature.key_id}, which is not trusted (trusted: {known})"
    )
