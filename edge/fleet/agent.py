"""The gateway's fleet agent: signed desired state in, verified bundles, atomic apply, rollback.

Topics (retained): ``floorline/{gateway}/desired``, ``floorline/groups/{group}/desired`` and
``floorline/selectors/{name}/desired`` carry signed envelopes (``floorline.edge.fleet.envelope``);
``floorline/bundles/{sha256}`` carries bundle archives; the agent reports on
``floorline/{gateway}/reported``.

Which document wins: the highest version, whatever its scope; on equal versions a gateway
document beats a group document, which beats a selector document. A selector document applies
only when every attribute it names equals this gateway's (``fleet.attributes`` plus the automatic
``floorline``, ``runtimes`` and ``machine``); others are ignored without a trace. A document that
is not newer than the highest seen is ignored quietly too (logged at debug level): it is the
retained copy of something already applied, rolled back or superseded, and comes back at every
connect.

For each desired document, in order: verify the signature, target, expiry and that its version
is newer than any seen; fetch the bundles it names from their topics and check their sha256 and
signature; build the new pipelines and self-test them; write a probation marker and the version
seen to disk; switch atomically (``Daemon.apply``); then watch a probation period. If inference
fails or too much input is dead-lettered during probation, the previous configuration is applied
again. Only a configuration that passed its probation becomes the last-known-good, kept on disk:
a restart (after a crash, too) comes up with it. A probation that did not finish (a stop, a
crash, a power cut) is not a pass: the next start finds the marker, runs the last-known-good (or
the local file) and records ``rolled_back`` ("the gateway restarted during probation of version
V"). Every outcome is recorded, with its reason, in an apply history kept on disk, and reported.
``config: {}`` in a document means: run the local file's configuration.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from floorline.edge.bundle.signing import load_public_keys
from floorline.edge.bundle.store import PREFIX, parse_ref
from floorline.edge.config.model import Config
from floorline.edge.daemon.daemon import Daemon
from floorline.edge.errors import FloorlineError
from floorline.edge.fleet.envelope import (
    Desired,
    EnvelopeError,
    open_envelope,
    peek,
    scope_rank,
)
from floorline.edge.messages import Outbound

log = logging.getLogger(__name__)

BUNDLE_TOPIC = "floorline/bundles/{sha256}"
SELECTOR_TOPIC = "floorline/selectors/+/desired"
_SETTLE_S = 0.1
"""After a document arrives, how long to wait for more (the retained burst at a connect), so
the highest version is handled first."""


@dataclass
class ApplyRecord:
    """One line of the apply history."""

    version: int | None
    result: str  # applied | rejected | rolled_back | local_reload
    reason: str
    ts: float
    deployment: str = ""


class _InterruptedError(Exception):
    """The agent is stopping: leave the document unfinished (never promote, never reject)."""


class FleetState:
    """What survives a restart (``<state_dir>/fleet/``).

    The highest version seen, the last-known-good desired state, the probation under way and
    the apply history.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._seen = self.dir / "seen.json"
        self._lkg = self.dir / "last-known-good.json"
        self._probation = self.dir / "probation.json"
        self._history = self.dir / "history.json"

    def seen(self) -> tuple[int, int]:
        """The highest (version, scope rank) ever accepted for processing; (0, 0) if none.

        Files written before scopes existed hold only the version: ranked highest, so nothing
        of that version is taken again.
        """
        try:
            data = json.loads(self._seen.read_text())
            return int(data["version"]), int(data.get("rank", 3))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return 0, 0

    def highest_seen(self) -> int:
        """The highest desired version ever accepted for processing."""
        return self.seen()[0]

    def see(self, version: int, rank: int = 3) -> None:
        """Remember (VERSION, RANK) durably before acting on it (replay protection)."""
        _write_atomic(self._seen, {"version": version, "rank": rank})

    def last_known_good(self) -> dict[str, Any] | None:
        """The desired state that last passed probation.

        Keys: version, config, bundles, deployment, signed_by.
        """
        try:
            data = json.loads(self._lkg.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def keep(self, desired: dict[str, Any]) -> None:
        """Make DESIRED the last-known-good."""
        _write_atomic(self._lkg, desired)

    def probation(self) -> dict[str, Any] | None:
        """The probation marker left by a switch whose probation has not ended, or None.

        A marker that cannot be read is still a probation that did not end (version unknown).
        """
        try:
            text = self._probation.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def begin_probation(self, marker: dict[str, Any]) -> None:
        """Write the probation marker (before the switch)."""
        _write_atomic(self._probation, marker)

    def end_probation(self) -> None:
        """Remove the probation marker (once the verdict is recorded)."""
        self._probation.unlink(missing_ok=True)
        _sync_dir(self.dir)

    def history(self) -> list[ApplyRecord]:
        """The apply history kept on disk, oldest first."""
        try:
            rows = json.loads(self._history.read_text())["history"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        if not isinstance(rows, list):
            return []
        return [r for r in (_history_row(row) for row in rows) if r is not None]

    def save_history(self, records: list[ApplyRecord]) -> None:
        """Replace the apply history kept on disk."""
        _write_atomic(self._history, {"history": [asdict(r) for r in records]})


def _write_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as fh:
        json.dump(doc, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    _sync_dir(path.parent)


def _sync_dir(directory: Path) -> None:
    # The rename or unlink is durable only once the directory is.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the file itself was synced
    finally:
        os.close(fd)


def operator_keys(config: Config) -> list[Ed25519PublicKey]:
    """The operator public keys the local config trusts."""
    return load_public_keys(config.fleet.operator_keys)


def gateway_attributes(configured: Mapping[str, str]) -> dict[str, str]:
    """The gateway's attributes: CONFIGURED (``fleet.attributes``) over the automatic ones.

    Automatic: ``floorline`` (package version), ``runtimes`` (installed backends,
    comma-separated) and ``machine`` (``platform.machine()``).
    """
    from floorline.edge import __version__  # noqa: PLC0415 - the package imports this module
    from floorline.edge.backends import BACKENDS, installed  # noqa: PLC0415

    auto = {
        "floorline": __version__,
        "runtimes": ",".join(sorted(name for name in BACKENDS if installed(name))),
        "machine": platform.machine(),
    }
    return {**auto, **configured}


class FleetAgent:
    """Runs beside the daemon; one thread applies desired states one at a time."""

    def __init__(self, daemon: Daemon, base: Config) -> None:
        self.daemon = daemon
        self.base = base  # the local file's config: what a push is merged onto
        self.fc = base.fleet
        self.gateway = base.gateway.id
        self.state = FleetState(daemon.state_dir / "fleet")
        self.keys = operator_keys(base)
        self.attributes = gateway_attributes(self.fc.attributes)
        self.history: deque[ApplyRecord] = deque(self.state.history(), maxlen=self.fc.history)
        self.running_version: int | None = None
        self.deployment = ""
        """The running desired document's deployment (reported only while one runs)."""
        self.signed_by: str | None = None
        """The key id that signed the running desired document."""
        self.config_source = "local"
        self.probation: dict[str, Any] | None = None
        """``{"version": V, "until": epoch seconds}`` while a probation runs."""
        self.lkg: dict[str, Any] | None = None
        self._pending: dict[str, bytes] = {}  # topic → latest document, not yet handled
        self._pending_cv = threading.Condition()
        self._bundles: dict[str, bytes] = {}
        self._bundle_cv = threading.Condition()
        self._history_lock = threading.Lock()
        self._last_report = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-agent", daemon=True)
        self.desired_topics = [f"floorline/{self.gateway}/desired"] + [
            f"floorline/groups/{g}/desired" for g in self.fc.groups
        ] + [SELECTOR_TOPIC]
        self.reported_topic = f"floorline/{self.gateway}/reported"
        for t in self.desired_topics:
            daemon.add_route(t, self._on_desired)
        # Bundle topics are subscribed one by one while fetching: a retained archive for every
        # bundle ever pushed must not land on every gateway at each connect.
        daemon.add_route(BUNDLE_TOPIC.format(sha256="+"), self._on_bundle, subscribe=False)

    # -- start-up: come up on the last-known-good ---------------------------------------------

    def startup_config(self) -> Config:
        """The config to start with: the last-known-good push merged on the local file, if any.

        A probation that did not finish before the last stop is settled first: its config is
        not used (recorded as ``rolled_back``). If the last-known-good no longer loads (a bundle
        vanished from the store), the local file is used and the history says so.
        """
        self._settle_probation()
        lkg = self.state.last_known_good()
        if lkg is None:
            return self.base
        try:
            config = self.base.with_desired(lkg["config"], "last-known-good")
            self._run_as(lkg)
        except (FloorlineError, KeyError, TypeError, ValueError) as exc:
            self._run_as(None)
            self.record(_int_or_none(lkg.get("version")), "rejected",
                        f"last-known-good unusable: {exc}",
                        deployment=str(lkg.get("deployment") or ""))
            return self.base
        self.lkg = lkg
        return config

    def _settle_probation(self) -> None:
        marker = self.state.probation()
        if marker is None:
            return
        version = _int_or_none(marker.get("version"))
        deployment = str(marker.get("deployment") or "")
        if version is not None:
            rank = _int_or_none(marker.get("rank")) or 3
            if (version, rank) > self.state.seen():
                self.state.see(version, rank)  # never taken up again from the retained copy
        lkg = self.state.last_known_good()
        if version is not None and lkg is not None and lkg.get("version") == version:
            # It passed and was kept; only the marker's removal was cut short.
            if not any(r.version == version and r.result == "applied" for r in self.history):
                self.record(version, "applied", "passed probation", deployment=deployment)
        else:
            what = f"version {version}" if version is not None else "an unknown version"
            self.record(version, "rolled_back",
                        f"the gateway restarted during probation of {what}",
                        deployment=deployment)
        self.state.end_probation()

    def _run_as(self, doc: Mapping[str, Any] | None) -> None:
        """Say that DOC runs (a desired state as kept); None: the local file runs."""
        if doc is None:
            self.running_version, self.deployment, self.signed_by = None, "", None
            self.config_source = "local"
            return
        self.running_version = int(doc["version"])
        self.deployment = str(doc.get("deployment") or "")
        signer = doc.get("signed_by")
        self.signed_by = str(signer) if signer else None
        # `config: {}` runs the local file's configuration.
        self.config_source = "fleet" if doc.get("config") else "local"

    def start(self) -> None:
        """Start applying (after the daemon started)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step; a probation under way stays unfinished (not a pass)."""
        self._stop.set()
        with self._pending_cv:
            self._pending_cv.notify_all()
        self._thread.join(5)

    # -- paho's thread --------------------------------------------------------------------

    def _on_desired(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        with self._pending_cv:
            # Retained topics: only the latest document on a topic matters.
            self._pending[topic] = payload
            self._pending_cv.notify_all()

    def _on_bundle(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained bundle: keep waiting for the archive (or time out)
        digest = topic.rsplit("/", 1)[-1]
        with self._bundle_cv:
            self._bundles[digest] = payload
            self._bundle_cv.notify_all()

    # -- agent thread ---------------------------------------------------------------------

    def _run(self) -> None:
        self._report_safely()
        while not self._stop.is_set():
            for doc in self._take(0.2):
                if self._stop.is_set():
                    break  # retained: handled again at the next start
                try:
                    self.handle(doc)
                except Exception:  # the agent must survive anything a document does
                    log.exception("fleet: unexpected error while applying a desired state")
                self._report_safely()
            self._report_if_due()

    def _take(self, timeout: float) -> list[bytes]:
        """The documents that arrived, highest (version, scope) first; [] after TIMEOUT."""
        with self._pending_cv:
            if not self._pending and not self._pending_cv.wait_for(
                    lambda: bool(self._pending) or self._stop.is_set(), timeout):
                return []
            for _ in range(10):  # let a burst of retained documents arrive (at most 1 s)
                count = len(self._pending)
                self._pending_cv.wait(_SETTLE_S)
                if len(self._pending) == count or self._stop.is_set():
                    break
            docs = list(self._pending.values())
            self._pending.clear()

        def order(data: bytes) -> tuple[int, int]:
            version, target = peek(data)
            return (version if version is not None else -1, scope_rank(target))

        return sorted(docs, key=order, reverse=True)

    def _report_if_due(self) -> None:
        if time.monotonic() - self._last_report >= self.fc.report_interval_s:
            self._report_safely()

    def _report_safely(self) -> None:
        try:
            self.report()
        except Exception:  # a report that cannot go out must not end the agent
            log.exception("fleet: could not publish the reported state")

    def handle(self, data: bytes) -> None:
        """Verify and apply one desired-state document (agent thread)."""
        seen = self.state.seen()
        try:
            desired = open_envelope(
                data,
                operator_keys=self.keys,
                gateway=self.gateway,
                groups=list(self.fc.groups),
                attributes=self.attributes,
                max_clock_skew=_seconds(self.fc.max_clock_skew_s),
            )
        except EnvelopeError as exc:
            self._refused(exc, seen)
            return
        key = (desired.version, desired.rank)
        if key <= seen:
            log.debug("fleet: version %s (%s document) ignored: not newer than %s, the "
                      "highest seen", desired.version, desired.scope, seen[0])
            return
        try:
            self._fetch(desired)
            config = self.base.with_desired(desired.config, f"desired version {desired.version}")
        except _InterruptedError:
            return  # nothing changed and nothing remembered: taken up again at the next start
        except FloorlineError as exc:
            self.state.see(*key)
            self.record(desired.version, "rejected", str(exc), deployment=desired.deployment)
            return
        self._switch(desired, config)

    def _refused(self, exc: EnvelopeError, seen: tuple[int, int]) -> None:
        if exc.reason == "wrong_target" and exc.target is not None and "selector" in exc.target:
            log.debug("fleet: version %s ignored: its selector %s does not match this gateway",
                      exc.version, exc.target["selector"])
            return
        if exc.version is not None and (exc.version, scope_rank(exc.target)) <= seen:
            log.debug("fleet: version %s ignored (%s): not newer than %s, the highest seen",
                      exc.version, exc.reason, seen[0])
            return
        if exc.reason == "expired" and exc.version is not None:
            # Authentic and for this gateway, only too old: never worth looking at again.
            self.state.see(exc.version, scope_rank(exc.target))
        self.record(exc.version, "rejected", str(exc), deployment=exc.deployment)

    def _switch(self, desired: Desired, config: Config) -> None:
        version, deployment = desired.version, desired.deployment
        until = time.time() + self.fc.probation_s
        # The marker first: should the process end before the verdict, the next start knows
        # this version never passed (and never takes its retained copy up again).
        self.state.begin_probation({"version": version, "rank": desired.rank,
                                    "deployment": deployment, "until": until})
        self.state.see(version, desired.rank)
        previous = self.daemon.config
        was = (self.running_version, self.deployment, self.signed_by, self.config_source)
        result = self.daemon.apply(config)
        if not result.ok:
            self.record(version, "rejected", result.reason, deployment=deployment)
            self.state.end_probation()
            return
        kept = {
            "version": version,
            "config": desired.config,
            "bundles": desired.bundles,
            "deployment": deployment,
            "signed_by": desired.signed_by,
        }
        self._run_as(kept)
        self.probation = {"version": version, "until": until}
        self._report_safely()
        try:
            verdict = self._probation()
        except _InterruptedError:
            log.warning("fleet: probation of version %s interrupted by a stop: not promoted; "
                        "the next start runs the last-known-good", version)
            return  # the marker stays; `probation` stays reported: the verdict is pending
        self.probation = None
        if verdict is not None:
            back = self.daemon.apply(previous)
            self.running_version, self.deployment, self.signed_by, self.config_source = was
            how = "" if back.ok else f"; rollback also failed: {back.reason}"
            self.record(version, "rolled_back", verdict + how, deployment=deployment)
            self.state.end_probation()
            return
        self.lkg = kept
        self.state.keep(kept)
        self.state.end_probation()
        self.daemon.collect_bundles({d for b in desired.bundles if (d := _digest(b))})
        self.record(version, "applied", "passed probation", deployment=deployment)

    def _fetch(self, desired: Desired) -> None:
        store = self.daemon.store
        needed = []
        for ref in desired.bundles:
            digest = parse_ref(ref if ref.startswith(PREFIX) else PREFIX + ref)
            if digest is None:
                continue
            if store is None:
                raise FloorlineError("no bundle store: the state directory is unusable")
            if not store.has(digest):
                needed.append(digest)
        if not needed:
            return
        transport = self.daemon.transport
        assert transport is not None  # noqa: S101
        topics = [BUNDLE_TOPIC.format(sha256=d) for d in needed]
        for topic in topics:
            transport.add_subscription(topic, 1)
        deadline = time.monotonic() + self.fc.bundle_fetch_timeout_s
        try:
            with self._bundle_cv:
                while True:
                    missing = [d for d in needed if d not in self._bundles]
                    if not missing:
                        break
                    if self._stop.is_set():
                        raise _InterruptedError
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise FloorlineError(
                            f"bundles not received within {self.fc.bundle_fetch_timeout_s:g} s: "
                            + ", ".join(m[:12] + "…" for m in missing)
                        )
                    self._bundle_cv.wait(min(left, 0.5))
                payloads = {d: self._bundles.pop(d) for d in needed}
        finally:
            for topic in topics:
                transport.remove_subscription(topic)
        assert store is not None  # noqa: S101
        for digest, payload in payloads.items():
            store.add(digest, payload)  # raises IntegrityError if the bytes do not match

    def _probation(self) -> str | None:
        """Watch the new pipelines; return why to roll back, or None if they are healthy.

        Raises _InterruptedError when the agent or the daemon stops first: an unfinished
        probation is not a pass.
        """
        fc = self.fc
        start = {p.name: _health(p) for p in self.daemon.pipelines}
        deadline = time.monotonic() + fc.probation_s
        while time.monotonic() < deadline:
            if self._stop.wait(min(0.2, max(0.0, deadline - time.monotonic()))) or (
                    self.daemon.wait(0)):
                raise _InterruptedError
            for p in self.daemon.pipelines:
                received, dead, failed = (
                    now - then for now, then in zip(_health(p), start.get(p.name, (0, 0, 0)),
                                                    strict=True)
                )
                if failed > fc.max_inference_failures:
                    return f"pipeline {p.name}: {failed} inference failures during probation"
                if received >= fc.min_probation_messages and dead / received > (
                    fc.max_dead_letter_ratio
                ):
                    return (
                        f"pipeline {p.name}: {dead} of {received} messages dead-lettered "
                        "during probation"
                    )
            self._report_if_due()
        if self._stop.is_set() or self.daemon.wait(0):
            raise _InterruptedError
        return None

    # -- reporting --------------------------------------------------------------------------

    def record(self, version: int | None, result: str, reason: str, *,
               deployment: str | None = None) -> None:
        """Log an apply outcome and add it to the history (kept on disk and reported).

        DEPLOYMENT defaults to the running document's (a local reload, say).
        """
        if deployment is None:
            deployment = self.deployment if self.running_version is not None else ""
        log.log(logging.INFO if result in ("applied", "local_reload") else logging.WARNING,
                "fleet: version %s %s: %s", version, result, reason)
        with self._history_lock:
            self.history.append(ApplyRecord(version, result, reason[:300], time.time(),
                                            deployment))
            try:
                self.state.save_history(list(self.history))
            except OSError as exc:
                log.warning("fleet: cannot keep the apply history on disk: %s", exc)

    def report(self) -> None:
        """Publish the retained reported state."""
        t = self.daemon.transport
        if t is None:
            return
        self._last_report = time.monotonic()
        stats = self.daemon.stats()
        running = self.running_version is not None
        now = time.time()
        doc = {
            "gateway": self.gateway,
            "ts": now,
            "running_version": self.running_version,
            "config_source": self.config_source,
            "deployment": self.deployment if running else "",
            "signed_by": self.signed_by if running else None,
            "attributes": self.attributes,
            # So an operator can resolve a group's members (fleet rollout --group).
            "groups": list(self.fc.groups),
            "probation": self.probation,
            "bundles": [
                {
                    "pipeline": p.name,
                    "name": p.model.bundle.manifest.name,
                    "version": p.model.bundle.manifest.version,
                    "sha256": p.model.artifact.sha256,
                    "artifact": p.model.artifact.file,
                    "ref": str(p.config.bundle),
                }
                for p in self.daemon.pipelines
            ],
            "history": [asdict(r) for r in list(self.history)],
            "health": {
                "ts": now,
                "connected": stats["connected"],
                "pipelines": {
                    p.name: {
                        "received": p.counters["received"],
                        "predictions": p.counters["predictions"],
                        "dead_letters": sum(p.dead_letters.values()),
                    }
                    for p in self.daemon.pipelines
                },
            },
        }
        # Retained and replaced by the next report: not through the outbox, where it would wait
        # behind a backlog of predictions (the operator needs a rollback reported promptly).
        self.daemon.send([Outbound(self.reported_topic, orjson.dumps(doc), 1, True)], keep=False)


def _history_row(row: object) -> ApplyRecord | None:
    if not isinstance(row, dict):
        return None
    try:
        return ApplyRecord(
            version=_int_or_none(row.get("version")),
            result=str(row["result"]),
            reason=str(row.get("reason", "")),
            ts=float(row.get("ts", 0.0)),
            deployment=str(row.get("deployment") or ""),
        )
    except (KeyError, TypeError, ValueError):
        return None


def _int_or_none(value: object) -> int | None:
    try:
        return int(value) if isinstance(value, int | str | float) else None
    except ValueError:
        return None


def _digest(ref: str) -> str | None:
    return parse_ref(ref if ref.startswith(PREFIX) else PREFIX + ref)


def _health(p: Any) -> tuple[int, int, int]:
    # (received, dead-lettered, failed windows), consistent between readings: counting arrivals
    # and dead letters apart let a switch's handed-over backlog show 387 dead of 250 received.
    health: tuple[int, int, int] = p.health()
    return health


def _seconds(value: float) -> Any:
    import datetime as dt  # noqa: PLC0415

    return dt.timedelta(seconds=value)
