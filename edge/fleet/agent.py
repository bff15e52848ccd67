"""The gateway's fleet agent: signed desired state in, verified bundles, atomic apply, rollback.

Topics (retained): ``floorline/{gateway}/desired`` and ``floorline/groups/{group}/desired``
carry signed envelopes (``floorline.edge.fleet.envelope``); ``floorline/bundles/{sha256}`` carries
bundle
archives; the agent reports on ``floorline/{gateway}/reported``.

For each desired document, in order: verify the signature, target, expiry and that its version
is newer than any seen (the highest version is remembered on disk first, so neither a restart
nor a replay can bring an old document back); fetch the bundles it names from their topics and
check their sha256 and signature; build the new pipelines and self-test them; switch atomically
(``Daemon.apply``); then watch a probation period. If inference fails or too much input is
dead-lettered during probation, the previous configuration is applied again. A configuration
that passed probation becomes the last-known-good, kept on disk: a restart (after a crash, too)
comes up with it. Every outcome is reported, with its reason.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
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
from floorline.edge.fleet.envelope import Desired, EnvelopeError, open_envelope
from floorline.edge.messages import Outbound

log = logging.getLogger(__name__)

BUNDLE_TOPIC = "floorline/bundles/{sha256}"


@dataclass
class ApplyRecord:
    """One line of the apply history."""

    version: int | None
    result: str  # applied | rejected | rolled_back | local_reload
    reason: str
    ts: float


class FleetState:
    """What survives a restart: the highest version seen, and the last-known-good desired state."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._seen = self.dir / "seen.json"
        self._lkg = self.dir / "last-known-good.json"

    def highest_seen(self) -> int:
        """The highest desired version ever accepted for processing."""
        try:
            return int(json.loads(self._seen.read_text())["version"])
        except (OSError, ValueError, KeyError):
            return 0

    def see(self, version: int) -> None:
        """Remember VERSION durably before acting on it (replay protection across restarts)."""
        _write_atomic(self._seen, {"version": version})

    def last_known_good(self) -> dict[str, Any] | None:
        """The desired state (version, config, bundles) that last passed probation."""
        try:
            data = json.loads(self._lkg.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def keep(self, desired: dict[str, Any]) -> None:
        """Make DESIRED the last-known-good."""
        _write_atomic(self._lkg, desired)


def _write_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as fh:
        json.dump(doc, fh)
        fh.flush()
        import os  # noqa: PLC0415 - fsync only here

        os.fsync(fh.fileno())
    tmp.replace(path)


def operator_keys(config: Config) -> list[Ed25519PublicKey]:
    """The operator public keys the local config trusts."""
    return load_public_keys(config.fleet.operator_keys)


class FleetAgent:
    """Runs beside the daemon; one thread applies desired states one at a time."""

    def __init__(self, daemon: Daemon, base: Config) -> None:
        self.daemon = daemon
        self.base = base  # the local file's config: what a push is merged onto
        self.fc = base.fleet
        self.gateway = base.gateway.id
        self.state = FleetState(daemon.state_dir / "fleet")
        self.keys = operator_keys(base)
        self.history: deque[ApplyRecord] = deque(maxlen=self.fc.history)
        self.running_version: int | None = None
        self.config_source = "local"
        self.lkg: dict[str, Any] | None = None
        self._docs: queue.Queue[bytes] = queue.Queue(maxsize=16)
        self._bundles: dict[str, bytes] = {}
        self._bundle_cv = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-agent", daemon=True)
        self.desired_topics = [f"floorline/{self.gateway}/desired"] + [
            f"floorline/groups/{g}/desired" for g in self.fc.groups
        ]
        self.reported_topic = f"floorline/{self.gateway}/reported"
        for t in self.desired_topics:
            daemon.add_route(t, self._on_desired)
        # Bundle topics are subscribed one by one while fetching: a retained archive for every
        # bundle ever pushed must not land on every gateway at each connect.
        daemon.add_route(BUNDLE_TOPIC.format(sha256="+"), self._on_bundle, subscribe=False)

    # -- start-up: come up on the last-known-good ---------------------------------------------

    def startup_config(self) -> Config:
        """The config to start with: the last-known-good push merged on the local file, if any.

        If the last-known-good no longer loads (a bundle vanished from the store), the local
        file is used and the history says so.
        """
        lkg = self.state.last_known_good()
        if lkg is None:
            return self.base
        try:
            config = self.base.with_desired(lkg["config"], "last-known-good")
        except (FloorlineError, KeyError) as exc:
            self.record(lkg.get("version"), "rejected", f"last-known-good unusable: {exc}")
            return self.base
        self.lkg = lkg
        self.running_version = int(lkg["version"])
        self.config_source = "fleet"
        return config

    def start(self) -> None:
        """Start applying (after the daemon started)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step."""
        self._stop.set()
        self._thread.join(5)

    # -- paho's thread --------------------------------------------------------------------

    def _on_desired(self, topic: str, payload: bytes) -> None:
        del topic
        if not payload:
            return  # a cleared retained message
        try:
            self._docs.put_nowait(payload)
        except queue.Full:
            log.warning("fleet: desired-state queue full; a document was dropped")

    def _on_bundle(self, topic: str, payload: bytes) -> None:
        digest = topic.rsplit("/", 1)[-1]
        with self._bundle_cv:
            self._bundles[digest] = payload
            self._bundle_cv.notify_all()

    # -- agent thread ---------------------------------------------------------------------

    def _run(self) -> None:
        self._report_safely()
        while not self._stop.is_set():
            try:
                doc = self._docs.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.handle(doc)
            except Exception:  # the agent must survive anything a document does
                log.exception("fleet: unexpected error while applying a desired state")
            self._report_safely()

    def _report_safely(self) -> None:
        try:
            self.report()
        except Exception:  # a report that cannot go out must not end the agent
            log.exception("fleet: could not publish the reported state")

    def handle(self, data: bytes) -> None:
        """Verify and apply one desired-state document (agent thread)."""
        try:
            desired = open_envelope(
                data,
                operator_keys=self.keys,
                gateway=self.gateway,
                groups=list(self.fc.groups),
                max_clock_skew=_seconds(self.fc.max_clock_skew_s),
            )
        except EnvelopeError as exc:
            self.record(None, "rejected", str(exc))
            return
        seen = self.state.highest_seen()
        if desired.version <= seen:
            if desired.version != self.running_version:
                self.record(desired.version, "rejected",
                             f"replay: version {desired.version} is not newer than {seen}")
            return  # the retained copy of what runs (or ran) comes back at every connect
        self.state.see(desired.version)
        try:
            self._fetch(desired)
            config = self.base.with_desired(desired.config, f"desired version {desired.version}")
        except FloorlineError as exc:
            self.record(desired.version, "rejected", str(exc))
            return
        previous = self.daemon.config
        result = self.daemon.apply(config)
        if not result.ok:
            self.record(desired.version, "rejected", result.reason)
            return
        self.running_version = desired.version
        self.config_source = "fleet"
        self.report()
        verdict = self._probation()
        if verdict is not None:
            back = self.daemon.apply(previous)
            self.running_version = int(self.lkg["version"]) if self.lkg else None
            self.config_source = "fleet" if self.lkg else "local"
            how = "" if back.ok else f"; rollback also failed: {back.reason}"
            self.record(desired.version, "rolled_back", verdict + how)
            return
        self.lkg = {
            "version": desired.version,
            "config": desired.config,
            "bundles": desired.bundles,
        }
        self.state.keep(self.lkg)
        self.daemon.collect_bundles({d for b in desired.bundles if (d := _digest(b))})
        self.record(desired.version, "applied", "passed probation")

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
        """Watch the new pipelines; return why to roll back, or None if they are healthy."""
        fc = self.fc
        start = {p.name: _health(p) for p in self.daemon.pipelines}
        deadline = time.monotonic() + fc.probation_s
        while time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
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
        return None

    # -- reporting --------------------------------------------------------------------------

    def record(self, version: int | None, result: str, reason: str) -> None:
        """Log an apply outcome and add it to the reported history."""
        log.log(logging.INFO if result == "applied" else logging.WARNING,
                "fleet: version %s %s: %s", version, result, reason)
        self.history.append(ApplyRecord(version, result, reason[:300], time.time()))

    def report(self) -> None:
        """Publish the retained reported state."""
        t = self.daemon.transport
        if t is None:
            return
        stats = self.daemon.stats()
        doc = {
            "gateway": self.gateway,
            "ts": time.time(),
            "running_version": self.running_version,
            "config_source": self.config_source,
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
            "history": [asdict(r) for r in self.history],
            "health": {
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


def _digest(ref: str) -> str | None:
    return parse_ref(ref if ref.startswith(PREFIX) else PREFIX + ref)


def _health(p: Any) -> tuple[int, int, int]:
    dead = sum(p.dead_letters.values())
    return p.counters["received"], dead, p.dead_letters.get("inference_failed", 0)


def _seconds(value: float) -> Any:
    import datetime as dt  # noqa: PLC0415

    return dt.timedelta(seconds=value)
