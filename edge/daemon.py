"""The gateway daemon: loads every pipeline's bundle, connects, routes messages, reports state.

Start-up order matters: every bundle is verified and self-tested before the daemon connects, so a
gateway with a bad bundle never announces itself online. Shutdown is the reverse: workers drain,
the offline state is published, and only then does the connection close.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import orjson

from edge import __version__, selftest
from edge.backends import BackendOptions
from edge.bundle import Bundle
from edge.config import Config, PipelineConfig
from edge.encode import dead_letter
from edge.journal import WindowJournal
from edge.outbox import Outbox
from edge.pipeline import Pipeline
from edge.publisher import Publisher
from edge.signing import load_public_key, parse_public_key
from edge.topics import matches, shared_subscription_filter
from edge.transport import MqttTransport, SessionOptions, Will

log = logging.getLogger(__name__)

_ROUTE_CACHE_LIMIT = 100_000


def trusted_keys(config: Config) -> list[object]:
    """The public keys a config trusts, read from files or inline base64."""
    keys: list[object] = []
    for entry in config.trust.trusted_keys:
        path = Path(entry)
        keys.append(load_public_key(path) if path.exists() else parse_public_key(entry))
    return keys


def load_model(config: Config, pipeline: PipelineConfig) -> selftest.LoadedModel:
    """Open, verify and self-test a pipeline's bundle on its configured backend."""
    keys = trusted_keys(config)
    bundle = Bundle.open(
        pipeline.bundle,
        trusted_keys=keys or None,  # type: ignore[arg-type]
        require_signature=config.trust.require_signature,
    )
    try:
        return selftest.load(
            bundle,
            backend=None if pipeline.backend == "auto" else pipeline.backend,
            artifact=pipeline.artifact,
            options=BackendOptions(threads=pipeline.threads, interpreter=pipeline.interpreter),
        )
    except BaseException:
        bundle.close()
        raise


class AckTracker:
    """Acknowledges an input message once every durable pipeline it went to released it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders: dict[int, int] = {}
        self.transport: MqttTransport | None = None

    def hold(self, mid: int, count: int) -> None:
        """Paho's thread: MID is now owed by COUNT pipelines."""
        with self._lock:
            self._holders[mid] = count

    def release(self, tokens: list[tuple[int, int]]) -> None:
        """Worker threads: these pipelines are done with TOKENS (mid, qos), in arrival order."""
        ready = []
        with self._lock:
            for mid, qos in tokens:
                left = self._holders.get(mid, 1) - 1
                if left <= 0:
                    self._holders.pop(mid, None)
                    ready.append((mid, qos))
                else:
                    self._holders[mid] = left
        if self.transport is not None:
            for mid, qos in ready:
                self.transport.ack(mid, qos)

    def owed(self) -> int:
        """Messages not yet acknowledged."""
        with self._lock:
            return len(self._holders)


class Daemon:
    """Everything ``floorline run`` runs, startable and stoppable from tests."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.gateway = config.gateway.id
        self.pipelines: list[Pipeline] = []
        self._routes: dict[str, tuple[Pipeline, ...]] = {}
        self._filters: list[tuple[str, Pipeline]] = []
        self.unroutable = Counter[str]()
        self._state_topic = config.topics.state.format(gateway=self.gateway)
        self._stopped = threading.Event()
        self.transport: MqttTransport | None = None
        self.started_at = time.monotonic()
        self.state_dir = config.resolved_state_dir()
        self.acks = AckTracker()
        self._manual_ack = any(p.ack == "durable" for p in config.pipelines)
        self.publisher: Publisher | None = None
        self.journal: WindowJournal | None = None
        self.journal_error: str | None = None

    # -- start-up ---------------------------------------------------------------------------

    def load(self) -> None:
        """Verify and self-test every bundle and build the pipelines (no network yet)."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # Not fatal: the outbox degrades to memory (and says so); predictions keep flowing.
            log.warning("state directory %s unusable: %s", self.state_dir, exc)
        outbox = Outbox(self.state_dir / "outbox.sqlite", self.config.outbox)
        if outbox.degraded_reason:
            log.warning("outbox in memory: %s", outbox.degraded_reason)
        if outbox.moved_aside is not None:
            log.warning("outbox was corrupt; moved to %s and started empty", outbox.moved_aside)
        if outbox.depth():
            log.info("outbox holds %d undelivered messages from before; resending", outbox.depth())
        self.publisher = Publisher(outbox)
        if self._manual_ack:
            try:
                self.journal = WindowJournal(self.state_dir / "windows.sqlite")
            except (OSError, sqlite3.Error) as exc:
                self.journal_error = f"window journal unavailable: {exc}"
                log.error(  # noqa: TRY400 - the reason is in the message
                    "%s; durable pipelines acknowledge without it", self.journal_error
                )
        for pc in self.config.pipelines:
            model = load_model(self.config, pc)
            log.info(
                "pipeline %s: %s %s (%s) on %s, self-test max err %.2g",
                pc.name,
                model.bundle.manifest.name,
                model.bundle.manifest.version,
                model.artifact.file,
                model.backend.runtime,
                model.selftest.max_abs_error,
            )
            pipeline = Pipeline(
                pc,
                gateway=self.gateway,
                topics=self.config.topics,
                limits=self.config.limits,
                model=model,
                submit=self.publisher.submit,
                release=self.acks.release,
                journal=self.journal,
            )
            self.pipelines.append(pipeline)
            self._filters.extend((shared_subscription_filter(f), pipeline) for f in pc.subscribe)

    def start(self) -> None:
        """Load (if not yet), start the workers, then connect."""
        if not self.pipelines:
            self.load()
        for p in self.pipelines:
            p.start()
        assert self.publisher is not None  # noqa: S101 - load() made it
        subs: dict[str, int] = {}
        for p in self.pipelines:
            for f in p.config.subscribe:
                subs[f] = max(subs.get(f, 0), p.config.qos)
        self.transport = MqttTransport(
            self.config.broker,
            self.config.client_id(),
            on_message=self._on_message,
            subscriptions=list(subs.items()),
            will=Will(self._state_topic, self._state_payload("offline", "connection lost")),
            on_connect=self._announce,
            session=SessionOptions(
                manual_ack=self._manual_ack,
                # MQTT 5 flow control: never more unacknowledged input than an inbox holds.
                receive_maximum=min(self.config.limits.inbox_size, 65535),
                max_packet_bytes=self.config.limits.max_packet_bytes,
            ),
            on_published=self.publisher.on_published,
        )
        self.acks.transport = self.transport
        self.publisher.attach(self.transport)
        self.transport.start()

    def _announce(self) -> None:
        # Runs on paho's thread at every (re)connect: the retained state must say online again.
        assert self.transport is not None  # noqa: S101
        assert self.publisher is not None  # noqa: S101
        self.transport.publish(self._state_topic, self._state_payload("online"), 1, True)
        self.publisher.on_connected()

    # -- routing (paho's thread) -----------------------------------------------------------

    def _on_message(
        self, topic: str, payload: bytes, received: float, mid: int = 0, qos: int = 0
    ) -> None:
        targets = self._routes.get(topic)
        if targets is None:
            targets = tuple(p for f, p in self._filters if matches(f, topic))
            if len(self._routes) < _ROUTE_CACHE_LIMIT:
                self._routes[topic] = targets
        owed = self._manual_ack and qos > 0
        if not targets:
            self.unroutable["unroutable"] += 1
            dlq = self.config.topics.dead_letter.format(gateway=self.gateway, pipeline="_unrouted")
            report = dead_letter("_unrouted", "unroutable", topic, len(payload))
            if self.publisher is not None:
                self.publisher.submit([(dlq, report, 0, False)])
            if owed and self.transport is not None:
                self.transport.ack(mid, qos)
            return
        token = None
        if owed:
            durable = sum(1 for p in targets if p.config.ack == "durable")
            if durable:
                self.acks.hold(mid, durable)
                token = (mid, qos)
            elif self.transport is not None:
                self.transport.ack(mid, qos)  # only receipt-mode pipelines want it
        for pipeline in targets:
            pipeline.offer(topic, payload, received, token if pipeline.config.ack == "durable"
                           else None)

    # -- state ------------------------------------------------------------------------------

    def _state_payload(self, state: str, reason: str | None = None) -> bytes:
        doc: dict[str, object] = {
            "state": state,
            "gateway": self.gateway,
            "floorline": __version__,
            "ts": time.time(),
            "pipelines": [
                {
                    "name": p.name,
                    "model": p.model.bundle.manifest.name,
                    "version": p.model.bundle.manifest.version,
                    "artifact": p.model.artifact.file,
                    "sha256": p.model.artifact.sha256,
                    "runtime": p.model.backend.runtime,
                }
                for p in self.pipelines
            ],
        }
        if reason:
            doc["reason"] = reason
        return orjson.dumps(doc)

    def stats(self) -> dict[str, object]:
        """Per-pipeline counters, connection, outbox and journal facts."""
        t = self.transport
        pub = self.publisher
        outbox = pub.outbox if pub else None
        return {
            "connected": bool(t and t.connected.is_set()),
            "connects": t.connects if t else 0,
            "last_error": t.last_error if t else None,
            "unroutable": self.unroutable["unroutable"],
            "unacknowledged_input": self.acks.owed(),
            "outbox": {
                "mode": outbox.mode,
                "depth": outbox.depth(),
                "bytes": outbox.pending_bytes(),
                "dropped": dict(outbox.dropped),
                "degraded_reason": outbox.degraded_reason,
                "moved_aside": str(outbox.moved_aside) if outbox.moved_aside else None,
            } if outbox else None,
            "published": pub.published if pub else 0,
            "delivered": pub.delivered if pub else 0,
            "journal_error": self.journal.error if self.journal else self.journal_error,
            "pipelines": {p.name: p.stats() for p in self.pipelines},
        }

    # -- shutdown ---------------------------------------------------------------------------

    def stop(self, reason: str = "shutdown") -> None:
        """Drain the workers, publish the offline state, disconnect. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        deadline = time.monotonic() + self.config.limits.drain_timeout_s
        # 1. Workers finish what is queued and commit their last predictions to the outbox.
        for p in self.pipelines:
            p.stop()
        # 2. Deliver what the broker will take before the deadline; the rest stays on disk.
        if self.publisher is not None:
            if self.transport is not None and self.transport.connected.is_set():
                self.publisher.wait_empty(max(0.0, deadline - time.monotonic()))
            left = self.publisher.outbox.depth()
            if left:
                log.info("%d messages stay in the outbox for the next start", left)
        # 3. Offline state, then disconnect.
        if self.transport is not None:
            final = [(self._state_topic, self._state_payload("offline", reason), 1, True)]
            self.transport.stop(final=final)
        if self.publisher is not None:
            self.publisher.stop()
        if self.journal is not None:
            self.journal.close()
        for p in self.pipelines:
            p.model.backend.close()
            p.model.bundle.close()
        log.info("stopped (%s)", reason)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop() has run, or TIMEOUT passed."""
        return self._stopped.wait(timeout)
