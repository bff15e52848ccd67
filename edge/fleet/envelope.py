"""Signed desired-state documents for fleet pushes.

An envelope carries a payload (canonical JSON) and an ed25519 signature over the payload's exact
bytes, so no re-serialisation can change what was signed::

    {"payload": "<base64 of the canonical JSON>", "key_id": "…", "signature": "<base64>"}

The payload says who it is for (one gateway, a group, or a selector over the gateways'
attributes), a version that only ever increases, when it was issued and when it expires, the
configuration and the bundles (by sha256) it needs, and optionally the name of the deployment
(push or rollout) it belongs to. A gateway checks, in this order: the signature against its
operator keys, the target, the expiry, and that the version is newer than any it has seen
(remembered on disk, so a restart does not reopen replay).

Precedence: the highest version wins whatever its scope; on equal versions a gateway document
beats a group document, which beats a selector document (``scope_rank``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from floorline.edge.bundle.signing import Signature, sign, verify
from floorline.edge.errors import FloorlineError

SCOPES = ("selector", "group", "gateway")
"""Target kinds, lowest precedence first (on equal versions)."""


class EnvelopeError(FloorlineError):
    """A desired-state document that must not be applied; ``reason`` is a short code.

    ``version``, ``target`` and ``deployment`` are the payload's when they could be read, even
    if the check failed (an expired or misaddressed document), else None (``""``). They are
    only as trustworthy as the signature: for ``bad_signature`` they are what the document
    claims.
    """

    def __init__(self, reason: str, detail: str, *, version: int | None = None,
                 target: dict[str, Any] | None = None, deployment: str = "") -> None:
        self.reason = reason
        self.version = version
        self.target = target
        self.deployment = deployment
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class Desired:
    """A verified desired state."""

    version: int
    target: dict[str, Any]
    issued_at: dt.datetime
    expires_at: dt.datetime
    config: dict[str, Any]
    bundles: list[str]
    signed_by: str
    deployment: str = ""

    @property
    def scope(self) -> str:
        """``gateway``, ``group`` or ``selector``."""
        return scope_of(self.target)

    @property
    def rank(self) -> int:
        """Precedence among documents of equal version (higher wins)."""
        return scope_rank(self.target)


def scope_of(target: Mapping[str, Any]) -> str:
    """The kind of TARGET: ``gateway``, ``group`` or ``selector`` (``""`` if none)."""
    return next((s for s in reversed(SCOPES) if s in target), "")


def scope_rank(target: Mapping[str, Any] | None) -> int:
    """TARGET's precedence on equal versions: gateway 3 > group 2 > selector 1 (0: unknown)."""
    scope = scope_of(target or {})
    return SCOPES.index(scope) + 1 if scope else 0


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def seal(
    *,
    key: Ed25519PrivateKey,
    version: int,
    target: Mapping[str, Any],
    config: dict[str, Any],
    bundles: list[str],
    ttl: dt.timedelta = dt.timedelta(days=7),
    now: dt.datetime | None = None,
    deployment: str = "",
) -> bytes:
    """Build and sign an envelope (the operator side).

    TARGET: ``{"gateway": ID}``, ``{"group": NAME}`` or ``{"selector": {ATTRIBUTE: VALUE}}``.
    DEPLOYMENT names the push or rollout (left out of the payload when empty).
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    body: dict[str, Any] = {
        "version": version,
        "target": dict(target),
        "issued_at": now.isoformat(timespec="seconds"),
        "expires_at": (now + ttl).isoformat(timespec="seconds"),
        "config": config,
        "bundles": sorted(set(bundles)),
    }
    if deployment:
        body["deployment"] = deployment
    payload = _canonical(body)
    sig = sign(payload, key)
    return _canonical(
        {
            "payload": base64.b64encode(payload).decode(),
            "key_id": sig.key_id,
            "signature": base64.b64encode(sig.signature).decode(),
        }
    )


def _parse_target(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise TypeError("target must be an object")
    kinds = [k for k in SCOPES if k in raw]
    if len(kinds) != 1 or len(raw) != 1:
        raise ValueError(f"target must name exactly one of gateway, group, selector: {raw}")
    (kind,) = kinds
    if kind == "selector":
        selector = raw[kind]
        if not isinstance(selector, dict) or not all(
                isinstance(v, str) for v in selector.values()):
            raise ValueError(f"a selector maps attribute names to strings: {selector}")
        return {"selector": {str(k): v for k, v in selector.items()}}
    return {kind: str(raw[kind])}


def _claimed(payload: bytes) -> tuple[int | None, dict[str, Any] | None, str]:
    """The version, target and deployment a payload claims, as far as they can be read."""
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return None, None, ""
    if not isinstance(doc, dict):
        return None, None, ""
    raw, target = doc.get("version"), doc.get("target")
    try:
        version = int(raw) if isinstance(raw, int | str) else None
    except ValueError:
        version = None
    return (version, dict(target) if isinstance(target, dict) else None,
            str(doc.get("deployment") or ""))


def peek(data: bytes) -> tuple[int | None, dict[str, Any] | None]:
    """The version and target an envelope claims, unverified (to order documents only)."""
    try:
        outer = json.loads(data)
        payload = base64.b64decode(str(outer["payload"]), validate=True)
    except (ValueError, KeyError, TypeError, RecursionError, binascii.Error):
        return None, None
    version, target, _ = _claimed(payload)
    return version, target


def matches(target: Mapping[str, Any], *, gateway: str, groups: list[str],
            attributes: Mapping[str, str]) -> bool:
    """Whether TARGET addresses this gateway (its id, groups and attributes)."""
    if "gateway" in target:
        return bool(target["gateway"] == gateway)
    if "group" in target:
        return target["group"] in groups
    if "selector" in target:
        selector = target["selector"]
        return isinstance(selector, Mapping) and all(
            attributes.get(k) == v for k, v in selector.items()
        )
    return False


def open_envelope(
    data: bytes,
    *,
    operator_keys: list[Ed25519PublicKey],
    gateway: str,
    groups: list[str],
    attributes: Mapping[str, str] | None = None,
    now: dt.datetime | None = None,
    max_clock_skew: dt.timedelta = dt.timedelta(minutes=5),
) -> Desired:
    """Verify an envelope for this gateway; raise EnvelopeError with a reason code otherwise.

    Reasons: malformed, unsigned, bad_signature, wrong_target, expired, not_yet_valid.
    A selector target matches when every attribute it names equals the gateway's (ATTRIBUTES).
    The version check against what was seen is the caller's (it owns the persisted counter).
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        outer = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise EnvelopeError("malformed", str(exc)[:200]) from exc
    if not isinstance(outer, dict):
        raise EnvelopeError("malformed", "an envelope is a JSON object")
    payload: bytes | None = None
    problem = ""
    try:
        payload = base64.b64decode(str(outer["payload"]), validate=True)
    except (ValueError, KeyError, binascii.Error) as exc:
        problem = str(exc)[:200]
    version, claimed_target, deployment = (
        _claimed(payload) if payload is not None else (None, None, ""))
    if "signature" not in outer or "key_id" not in outer:
        raise EnvelopeError("unsigned", "no signature", version=version, target=claimed_target,
                            deployment=deployment)
    if payload is None:
        raise EnvelopeError("malformed", problem)
    try:
        signature = Signature(
            key_id=str(outer["key_id"]),
            signature=base64.b64decode(str(outer["signature"]), validate=True),
        )
    except (ValueError, binascii.Error) as exc:
        raise EnvelopeError("malformed", str(exc)[:200], version=version,
                            target=claimed_target, deployment=deployment) from exc
    try:
        signer = verify(payload, signature, operator_keys, origin="desired state")
    except FloorlineError as exc:
        raise EnvelopeError("bad_signature", str(exc), version=version,
                            target=claimed_target, deployment=deployment) from exc
    try:
        doc = json.loads(payload)
        desired = Desired(
            version=int(doc["version"]),
            target=_parse_target(doc["target"]),
            issued_at=dt.datetime.fromisoformat(doc["issued_at"]),
            expires_at=dt.datetime.fromisoformat(doc["expires_at"]),
            config=dict(doc["config"]),
            bundles=[str(b) for b in doc["bundles"]],
            signed_by=signer,
            deployment=str(doc.get("deployment") or ""),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EnvelopeError("malformed", f"payload: {exc}", version=version,
                            target=claimed_target, deployment=deployment) from exc
    if desired.issued_at.tzinfo is None or desired.expires_at.tzinfo is None:
        raise EnvelopeError("malformed", "payload: issued_at and expires_at need a time zone",
                            version=version, target=claimed_target, deployment=deployment)
    version, claimed_target, deployment = desired.version, desired.target, desired.deployment
    if not matches(desired.target, gateway=gateway, groups=groups, attributes=attributes or {}):
        raise EnvelopeError("wrong_target", f"addressed to {desired.target}", version=version,
                            target=claimed_target, deployment=deployment)
    if desired.expires_at <= now:
        raise EnvelopeError("expired", f"expired at {desired.expires_at.isoformat()}",
                            version=version, target=claimed_target,
                            deployment=deployment)
    if desired.issued_at > now + max_clock_skew:
        raise EnvelopeError("not_yet_valid", f"issued in the future ({desired.issued_at})",
                            version=version, target=claimed_target,
                            deployment=deployment)
    return desired
