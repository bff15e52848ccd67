"""Signed desired-state documents for fleet pushes.

An envelope carries a payload (canonical JSON) and an ed25519 signature over the payload's exact
bytes, so no re-serialisation can change what was signed::

    {"payload": "<base64 of the canonical JSON>", "key_id": "…", "signature": "<base64>"}

The payload says who it is for (one gateway or a group), a version that only ever increases,
when it was issued and when it expires, the configuration and the bundles (by sha256) it needs.
A gateway checks, in this order: the signature against its operator keys, the target, the expiry,
and that the version is newer than any it has seen (remembered on disk, so a restart does not
reopen replay).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from floorline.edge.bundle.signing import Signature, sign, verify
from floorline.edge.errors import FloorlineError


class EnvelopeError(FloorlineError):
    """A desired-state document that must not be applied; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class Desired:
    """A verified desired state."""

    version: int
    target: dict[str, str]
    issued_at: dt.datetime
    expires_at: dt.datetime
    config: dict[str, Any]
    bundles: list[str]
    signed_by: str


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def seal(
    *,
    key: Ed25519PrivateKey,
    version: int,
    target: dict[str, str],
    config: dict[str, Any],
    bundles: list[str],
    ttl: dt.timedelta = dt.timedelta(days=7),
    now: dt.datetime | None = None,
) -> bytes:
    """Build and sign an envelope (the operator side)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    payload = _canonical(
        {
            "version": version,
            "target": target,
            "issued_at": now.isoformat(timespec="seconds"),
            "expires_at": (now + ttl).isoformat(timespec="seconds"),
            "config": config,
            "bundles": sorted(set(bundles)),
        }
    )
    sig = sign(payload, key)
    return _canonical(
        {
            "payload": base64.b64encode(payload).decode(),
            "key_id": sig.key_id,
            "signature": base64.b64encode(sig.signature).decode(),
        }
    )


def open_envelope(
    data: bytes,
    *,
    operator_keys: list[Ed25519PublicKey],
    gateway: str,
    groups: list[str],
    now: dt.datetime | None = None,
    max_clock_skew: dt.timedelta = dt.timedelta(minutes=5),
) -> Desired:
    """Verify an envelope for this gateway; raise EnvelopeError with a reason code otherwise.

    Reasons: malformed, unsigned, bad_signature, wrong_target, expired, not_yet_valid.
    The version check against what was seen is the caller's (it owns the persisted counter).
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        outer = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise EnvelopeError("malformed", str(exc)[:200]) from exc
    if not isinstance(outer, dict):
        raise EnvelopeError("malformed", "an envelope is a JSON object")
    if "signature" not in outer or "key_id" not in outer:
        raise EnvelopeError("unsigned", "no signature")
    try:
        payload = base64.b64decode(str(outer["payload"]), validate=True)
        signature = Signature(
            key_id=str(outer["key_id"]),
            signature=base64.b64decode(str(outer["signature"]), validate=True),
        )
    except (ValueError, KeyError, binascii.Error) as exc:
        raise EnvelopeError("malformed", str(exc)[:200]) from exc
    try:
        signer = verify(payload, signature, operator_keys, origin="desired state")
    except FloorlineError as exc:
        raise EnvelopeError("bad_signature", str(exc)) from exc
    try:
        doc = json.loads(payload)
        desired = Desired(
            version=int(doc["version"]),
            target={str(k): str(v) for k, v in dict(doc["target"]).items()},
            issued_at=dt.datetime.fromisoformat(doc["issued_at"]),
            expires_at=dt.datetime.fromisoformat(doc["expires_at"]),
            config=dict(doc["config"]),
            bundles=[str(b) for b in doc["bundles"]],
            signed_by=signer,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise EnvelopeError("malformed", f"payload: {exc}") from exc
    target_ok = desired.target.get("gateway") == gateway or (
        "group" in desired.target and desired.target["group"] in groups
    )
    if not target_ok:
        raise EnvelopeError("wrong_target", f"addressed to {desired.target}")
    if desired.expires_at <= now:
        raise EnvelopeError("expired", f"expired at {desired.expires_at.isoformat()}")
    if desired.issued_at > now + max_clock_skew:
        raise EnvelopeError("not_yet_valid", f"issued in the future ({desired.issued_at})")
    return desired
