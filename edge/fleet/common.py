"""What every ``floorline fleet`` command shares: broker options, a connection, retained views.

Exit codes (``floorline fleet …``), the same for every command so a script can act on them:

- 0: done; every gateway concerned is healthy and at its target,
- 1: some gateway rejected or rolled back a document (or a local check failed: nothing was
  published),
- 2: usage: a wrong option or argument (named in the message),
- 3: some gateway is offline, not reporting, or gave no verdict in time,
- 4: the broker could not be reached (or refused the login).

When 1 and 3 both apply, 1 wins.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from floorline.edge.config.model import BrokerConfig
from floorline.edge.config.starter import parse_broker
from floorline.edge.errors import ConfigError, FloorlineError
from floorline.edge.mqtt.transport import MqttTransport

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_MISSING = 3
EXIT_BROKER = 4

FAILED_RESULTS = ("rejected", "rolled_back")
VERDICTS = ("applied", "rejected", "rolled_back")
RESERVED = frozenset({"bundles", "groups", "selectors", "rollouts"})
"""Second topic levels under floorline/ that are not gateway ids."""

_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PASSWORD_ENV = "FLOORLINE_FLEET_PASSWORD"  # noqa: S105 - the name of a variable, not a secret


class _Stdout:
    """Whatever sys.stdout is when printed to (a default argument binds the object once)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


STDOUT: Any = _Stdout()


class UsageError(FloorlineError):
    """A wrong option or argument: exit code 2."""


class BrokerUnreachableError(FloorlineError):
    """The broker did not accept the connection: exit code 4."""


def check_name(value: str, what: str) -> str:
    """VALUE as a topic level (gateway id, group, deployment); UsageError naming WHAT."""
    if not _SLUG.fullmatch(value or "") or value in RESERVED:
        raise UsageError(f"{what} {value!r}: use letters, digits, '.', '_' or '-' (max 64), "
                         "no '/', '+' or '#'"
                         + (f"; {value!r} is reserved" if value in RESERVED else ""))
    return value


def check_level(value: str, what: str) -> str:
    """VALUE as one topic level naming a gateway or group: not empty, no '/', '+' or '#'."""
    if not value or any(c in value for c in "/+#\0") or value in RESERVED:
        raise UsageError(f"{what} {value!r}: not a usable topic level (empty, '/', '+', '#'"
                         f"{' or reserved' if value in RESERVED else ''})")
    return value


def parse_pairs(text: str, what: str) -> dict[str, str]:
    """``key=value,key=value``; an empty text is the empty selector (it matches every gateway)."""
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise UsageError(f"{what} {text!r}: expected key=value[,key=value...]")
        check_name(key, f"{what} key")
        pairs[key] = value
    return pairs


def selector_slug(selector: dict[str, str]) -> str:
    """A stable topic level for a selector: the same selector always lands on the same topic."""
    if not selector:
        return "all"
    text = "-".join(f"{k}-{v}" for k, v in sorted(selector.items()))
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-._")
    if not slug or len(slug) > 48 or not _SLUG.fullmatch(slug):
        digest = base64.b32encode(json.dumps(selector, sort_keys=True).encode()).decode()
        slug = "sel-" + re.sub(r"[^A-Za-z0-9]", "", digest).lower()[:12]
    return slug


def matches(selector: dict[str, str], attributes: dict[str, Any]) -> bool:
    """Whether ATTRIBUTES satisfy SELECTOR (every key equal, as strings)."""
    return all(str(attributes.get(k)) == str(v) for k, v in selector.items())


def broker_config(
    address: str,
    protocol: str = "3.1.1",
    *,
    tls: bool = False,
    ca: Path | None = None,
    cert: Path | None = None,
    cert_key: Path | None = None,
    insecure: bool = False,
    username: str | None = None,
    password_file: Path | None = None,
    password_env: str | None = None,
) -> BrokerConfig:
    """A BrokerConfig from the command line's broker options; UsageError naming the option."""
    try:
        host, port = parse_broker(address)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    if (cert is None) != (cert_key is None):
        raise UsageError("--cert and --cert-key go together (the client certificate and its key)")
    for flag, path in (("--ca", ca), ("--cert", cert), ("--cert-key", cert_key),
                       ("--password-file", password_file)):
        if path is not None and not path.is_file():
            raise UsageError(f"{flag} {path}: no such file")
    if (password_file or password_env) and not username:
        raise UsageError("a password needs --username")
    use_tls = tls or insecure or any(p is not None for p in (ca, cert, cert_key))
    options: dict[str, Any] = {"host": host, "port": port, "protocol": protocol,
                               "username": username, "password_file": password_file,
                               "password_env": password_env}
    if use_tls:
        options["tls"] = {"ca_file": ca, "cert_file": cert, "key_file": cert_key,
                          "insecure": insecure}
    try:
        broker = BrokerConfig.model_validate(options)
        broker.credentials()
    except ValidationError as exc:
        raise UsageError(f"broker options: {exc.errors()[0]['msg']}") from exc
    except ConfigError as exc:
        raise UsageError(str(exc).replace("broker.password_file", "--password-file")
                         .replace("broker.password_env", "--password-env")) from exc
    return broker


def password_from_command_line(password: str) -> str:
    """Make --password usable through the environment; return the variable's name."""
    os.environ[PASSWORD_ENV] = password
    return PASSWORD_ENV


def connect(
    broker: BrokerConfig,
    name: str,
    handler: Callable[..., None] | None = None,
    subs: list[tuple[str, int]] | None = None,
    timeout: float = 10.0,
) -> MqttTransport:
    """A started transport; BrokerUnreachableError at the broker's first refusal or TIMEOUT."""
    client_id = f"floorline-{name}-{uuid.uuid4().hex[:10]}"
    t = MqttTransport(broker, client_id, handler or (lambda *_: None), subs or [])
    t.start()
    deadline = time.monotonic() + timeout
    # The first failure is the answer (a wrong password does not get better by retrying).
    while not t.connected.is_set() and t.last_error is None and time.monotonic() < deadline:
        t.connected.wait(0.05)
    if not t.connected.is_set():
        why = t.last_error or f"no answer within {timeout:g} s"
        t.stop()
        tls = " (TLS)" if broker.tls is not None else ""
        raise BrokerUnreachableError(f"cannot connect to the broker at {broker.host}:{broker.port}"
                                f"{tls}: {why}")
    return t


class Collector:
    """A live copy of the retained (and later) messages on some topic filters.

    ``start()`` returns once the retained burst is complete: after the SUBACK a marker message
    is published to a topic of this client's own, and the broker delivers it after every
    retained message queued before it; where the marker cannot come back (an ACL), the burst
    counts as complete after QUIET_S seconds without a new message. CAP_S bounds the wait.
    """

    def __init__(self, broker: BrokerConfig, filters: Iterable[str], name: str = "status",
                 on_message: Callable[[str, bytes], None] | None = None) -> None:
        self.broker = broker
        self.filters = list(filters)
        self.name = name
        self.docs: dict[str, bytes] = {}
        self.changes = 0
        self.complete = False
        self._hooks: list[Callable[[str, bytes], None]] = [on_message] if on_message else []
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._marker = f"floorline-operator/{uuid.uuid4().hex}/sync"
        self._marker_seen = threading.Event()
        self.transport: MqttTransport | None = None

    def _on_message(self, topic: str, payload: bytes, *meta: object) -> None:
        del meta
        if topic == self._marker:
            self._marker_seen.set()
            return
        with self._lock:
            if payload:
                self.docs[topic] = payload
            else:
                self.docs.pop(topic, None)
            self.changes += 1
            self._last = time.monotonic()
        for hook in self._hooks:
            hook(topic, payload)

    def start(self, *, quiet_s: float = 0.5, cap_s: float = 10.0,
              connect_timeout: float = 10.0) -> Collector:
        """Connect, subscribe and wait for the retained burst (see the class)."""
        subs = [(f, 1) for f in self.filters] + [(self._marker, 1)]
        self.transport = connect(self.broker, self.name, self._on_message, subs,
                                 timeout=connect_timeout)
        start = time.monotonic()
        self.transport.subscribed.wait(max(0.1, cap_s))
        self.transport.publish(self._marker, b"1", 1, False)
        with self._lock:
            self._last = time.monotonic()
        while time.monotonic() - start < cap_s:
            if self._marker_seen.wait(0.02):
                break
            with self._lock:
                if time.monotonic() - self._last >= quiet_s:
                    break
        self.complete = True
        return self

    def add_hook(self, hook: Callable[[str, bytes], None]) -> None:
        """Also call HOOK(topic, payload) for every message from now on (network thread)."""
        self._hooks.append(hook)

    def get(self, topic: str) -> bytes | None:
        """The current document on TOPIC."""
        with self._lock:
            return self.docs.get(topic)

    def snapshot(self) -> dict[str, bytes]:
        """The current documents, by topic."""
        with self._lock:
            return dict(self.docs)

    def stop(self) -> None:
        """Disconnect."""
        if self.transport is not None:
            self.transport.stop()
            self.transport = None

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def gateway_docs(docs: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """``floorline/{gw}/state`` and ``…/reported`` documents, parsed, by gateway id."""
    out: dict[str, dict[str, Any]] = {}
    for topic, payload in docs.items():
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != "floorline" or parts[1] in RESERVED:
            continue
        if parts[2] not in ("state", "reported"):
            continue
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if isinstance(body, dict):
            out.setdefault(parts[1], {})[parts[2]] = (
                clean_reported(body) if parts[2] == "reported" else body)
    return out


def clean_reported(body: dict[str, Any]) -> dict[str, Any]:
    """BODY with every field the operator commands read in the shape they expect.

    A reported document is written by a gateway, or by anyone who may publish on its topic: a
    field of the wrong type (a list of attributes, a history that is a number) is dropped
    rather than crash ``status``, ``push --wait`` or a rollout.
    """
    rep = dict(body)
    attrs = rep.get("attributes")
    rep["attributes"] = ({str(k): v if isinstance(v, (str, int, float, bool)) else str(v)
                          for k, v in attrs.items()} if isinstance(attrs, dict) else {})
    history = rep.get("history")
    rep["history"] = ([h for h in history if isinstance(h, dict)]
                      if isinstance(history, list) else [])
    bundles = rep.get("bundles")
    rep["bundles"] = ([b for b in bundles if isinstance(b, dict)]
                      if isinstance(bundles, list) else [])
    health = rep.get("health")
    health = dict(health) if isinstance(health, dict) else {}
    pipelines = health.get("pipelines")
    health["pipelines"] = ({str(k): v for k, v in pipelines.items() if isinstance(v, dict)}
                           if isinstance(pipelines, dict) else {})
    if not isinstance(health.get("ts"), (int, float)) or isinstance(health.get("ts"), bool):
        health.pop("ts", None)
    rep["health"] = health
    if not isinstance(rep.get("probation"), dict):
        rep["probation"] = None
    groups = rep.get("groups")
    if groups is not None and not isinstance(groups, list):
        rep.pop("groups")
    if not isinstance(rep.get("ts"), (int, float)) or isinstance(rep.get("ts"), bool):
        rep.pop("ts", None)
    return rep


def verdict(reported: dict[str, Any], version: int) -> str | None:
    """A gateway's verdict on VERSION: applied, rejected, rolled_back, pending, or None (none yet).

    The last history entry with that version decides; while the probation names it, pending.
    """
    probation = reported.get("probation") or {}
    if isinstance(probation, dict) and probation.get("version") == version:
        return "pending"
    for entry in reversed(reported.get("history") or []):
        if isinstance(entry, dict) and entry.get("version") == version:
            result = str(entry.get("result"))
            if result in VERDICTS:
                return result
    return None


def superseded_by(reported: dict[str, Any], version: int) -> int | None:
    """A newer version the gateway took up, so that it will never judge VERSION; else None.

    A gateway ignores, quietly, a document not newer than the highest it has seen: a push made
    with an older version (an operator's clock behind another's, ``--version``) or a rollout
    resumed after a newer push would otherwise be waited for until the timeout. Only what
    moves the highest seen counts: the running version, a probation, an applied or rolled
    back document.
    """
    if verdict(reported, version) is not None:
        return None
    newer = [v for v in (reported.get("running_version"),
                         (reported.get("probation") or {}).get("version"))
             if isinstance(v, int) and not isinstance(v, bool) and v > version]
    newer += [e["version"] for e in reported.get("history") or []
              if isinstance(e, dict) and e.get("result") in ("applied", "rolled_back")
              and isinstance(e.get("version"), int) and not isinstance(e["version"], bool)
              and e["version"] > version]
    return max(newer) if newer else None


def verdict_reason(reported: dict[str, Any], version: int) -> str:
    """The reason of the history entry that holds the verdict on VERSION ('' if none)."""
    for entry in reversed(reported.get("history") or []):
        if isinstance(entry, dict) and entry.get("version") == version:
            return str(entry.get("reason") or "")
    return ""


def read_envelope(data: bytes) -> dict[str, Any] | None:
    """The payload of a desired-state envelope, unverified (the operator reads its own)."""
    try:
        outer = json.loads(data)
        payload = json.loads(base64.b64decode(str(outer["payload"]), validate=True))
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    return payload if isinstance(payload, dict) else None


def groups_of(reported: dict[str, Any]) -> list[str] | None:
    """The groups a gateway reports (``groups``, or a comma-separated ``groups`` attribute)."""
    groups = reported.get("groups")
    if isinstance(groups, list):
        return [str(g) for g in groups]
    attr = (reported.get("attributes") or {}).get("groups")
    if isinstance(attr, str):
        return [g.strip() for g in attr.split(",") if g.strip()]
    return None


def now_ms() -> int:
    """A document version: the current time in milliseconds."""
    return int(time.time() * 1000)
