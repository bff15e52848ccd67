"""The gateway daemon: loads every pipeline's bundle, connects, routes messages, reports state.

Start-up order matters: every bundle is verified and self-tested before the daemon connects, so a
gateway with a bad bundle never announces itself online. Shutdown is the reverse: workers drain,
the offline state is published, and only then does the connection close.

A configuration runs as a *generation* of pipelines. ``apply`` builds the next generation beside
the running one (bundles verified, self-tested), then switches atomically: incoming messages are
held for the moment of the switch, the old workers finish every message they accepted, windows in
progress move to the new pipelines when their input is unchanged, and the held messages go to the
new generation. No message is processed by both generations or by neither.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from floorline.edge import __version__
from floorline.edge.backends import BackendOptions
from floorline.edge.bundle import selftest
from floorline.edge.bundle.bundle import Bundle
from floorline.edge.bundle.store import BundleStore, parse_ref
from floorline.edge.config.model import Config, PipelineConfig
from floorline.edge.daemon.journal import WindowJournal
from floorline.edge.daemon.pipeline import Pipeline, Token
from floorline.edge.delivery.outbox import Outbox
from floorline.edge.delivery.publisher import Publisher
from floorline.edge.errors import BundleError, FloorlineError
from floorline.edge.mqtt.reader import Publish
from floorline.edge.mqtt.topics import matches, shared_subscription_filter
from floorline.edge.mqtt.transport import MqttTransport, SessionOptions, Will
from floorline.edge.service.metrics import BundleInfo, Metrics
from floorline.edge.stream.encode import dead_letter

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)

_ROUTE_CACHE_LIMIT = 100_000
_UNSEEN = object()


def trusted_keys(config: Config) -> list[Ed25519PublicKey]:
    """The public keys a config trusts, read from files or inline base64."""
    if not config.trust.trusted_keys:
        return []
    # Imported only when keys are configured: cryptography costs ~8 MB of resident memory.
    from floorline.edge.bundle.signing import load_public_keys  # noqa: PLC0415

    return load_public_keys(config.trust.trusted_keys)


def load_model(
    config: Config, pipeline: PipelineConfig, store: BundleStore | None = None
) -> selftest.LoadedModel:
    """Open, verify and self-test a pipeline's bundle on its configured backend.

    A bundle named ``sha256:<hex>`` comes from the fleet's bundle STORE and must be signed.
    """
    keys = trusted_keys(config)
    path = Path(pipeline.bundle)
    require = config.trust.require_signature
    digest = parse_ref(str(pipeline.bundle))
    if digest is not None:
        if store is None or not store.has(digest):
            raise BundleError(
                f"pipeline {pipeline.name}: bundle {digest[:12]}… is not in the store"
            )
        path = store.path(digest)
        store.touch(digest)
        require = True  # what arrives over the network runs only if signed by a trusted key
    try:
        bundle = Bundle.open(path, trusted_keys=keys or None, require_signature=require)
    except BundleError:
        if digest is not None and store is not None:
            store.discard(digest)  # arrived intact but does not verify: never try it again
        raise
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


@dataclass
class Generation:
    """The pipelines of one configuration and the routing table to them."""

    config: Config
    pipelines: list[Pipeline]
    filters: list[tuple[str, Pipeline]] = field(default_factory=list)
    routes: dict[str, tuple[Pipeline, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.filters = [
            (shared_subscription_filter(f), p) for p in self.pipelines for f in p.config.subscribe
        ]

    def subscriptions(self) -> dict[str, int]:
        """Topic filter → QoS for every pipeline."""
        subs: dict[str, int] = {}
        for p in self.pipelines:
            for f in p.config.subscribe:
                subs[f] = max(subs.get(f, 0), p.config.qos)
        return subs

    def close(self) -> None:
        """Release the models (after the workers stopped)."""
        for p in self.pipelines:
            p.model.backend.close()
            p.model.bundle.close()


@dataclass(frozen=True)
class ApplyResult:
    """What happened to one configuration change."""

    ok: bool
    reason: str = ""
    carried_over: tuple[str, ...] = ()


def _same_input(old: Pipeline, new: Pipeline) -> bool:
    # A partial window can continue only into a pipeline that cuts and reads samples the same way.
    a, b = old.model.bundle.manifest.input, new.model.bundle.manifest.input
    return (
        old.name == new.name
        and a.window == b.window
        and [f.name for f in a.features] == [f.name for f in b.features]
        and old.config.window == new.config.window
        and old.config.decoder == new.config.decoder
    )


class Daemon:
    """Everything ``floorline run`` runs, startable and stoppable from tests."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.gateway = config.gateway.id
        self.unroutable = Counter[str]()
        self._state_topic = config.topics.state.format(gateway=self.gateway)
        self._stopped = threading.Event()
        self.transport: MqttTransport | None = None
        self.started_at = time.monotonic()
        self.state_dir = config.resolved_state_dir()
        self.acks = AckTracker()
        self.publisher: Publisher | None = None
        self.journal: WindowJournal | None = None
        self.journal_error: str | None = None
        self.store: BundleStore | None = None
        self.gen: Generation | None = None
        # Held while routing a message and while switching generations; on_message holds it for
        # a dict lookup and a few enqueues, so paho's thread never waits long.
        self._route_lock = threading.Lock()
        self._holding: list[tuple[str, bytes, float, int, int]] | None = None
        self._apply_lock = threading.Lock()
        self._extra_routes: list[tuple[str, object]] = []  # (filter, handler) e.g. the fleet agent
        self._extra_subscriptions: list[str] = []
        # Topic → handler of an extra route (None: none), so sensor topics pay one dict lookup.
        self._extra_cache: dict[str, object] = {}
        self.metrics = Metrics(self.stats, bundles=self._bundle_info, gateway=self.gateway)

    @property
    def pipelines(self) -> list[Pipeline]:
        """The running generation's pipelines."""
        return self.gen.pipelines if self.gen else []

    # -- start-up ---------------------------------------------------------------------------

    def _open_state(self) -> None:
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
        try:
            self.journal = WindowJournal(self.state_dir / "windows.sqlite")
        except (OSError, sqlite3.Error) as exc:
            self.journal_error = f"window journal unavailable: {exc}"
            if any(p.ack == "durable" for p in self.config.pipelines):
                log.error(  # noqa: TRY400 - the reason is in the message
                    "%s; durable pipelines acknowledge without it", self.journal_error
                )
        try:
            self.store = BundleStore(self.state_dir / "bundles", self.config.fleet.store_max_bytes)
        except OSError as exc:
            log.warning("bundle store unavailable (%s): fleet bundles cannot be received", exc)

    def build(self, config: Config, *, restore: bool = True) -> Generation:
        """Verify, self-test and construct CONFIG's pipelines (not started). Raises on failure."""
        assert self.publisher is not None  # noqa: S101 - _open_state made it
        built: list[Pipeline] = []
        try:
            for pc in config.pipelines:
                model = load_model(config, pc, self.store)
                log.info(
                    "pipeline %s: %s %s (%s) on %s, self-test max err %.2g",
                    pc.name,
                    model.bundle.manifest.name,
                    model.bundle.manifest.version,
                    model.artifact.file,
                    model.backend.runtime,
                    model.selftest.max_abs_error,
                )
                built.append(
                    Pipeline(
                        pc,
                        gateway=self.gateway,
                        topics=config.topics,
                        limits=config.limits,
                        model=model,
                        submit=self.publisher.submit,
                        release=self.acks.release,
                        journal=self.journal,
                        restore=restore,
                        observe=self.metrics.observe_batch,
                    )
                )
        except BaseException:
            Generation(config, built).close()
            raise
        return Generation(config, built)

    def load(self, config: Config | None = None) -> None:
        """Open the state directory, then verify and build the pipelines (no network yet)."""
        if self.publisher is None:
            self._open_state()
        self.gen = self.build(config or self.config)
        self.config = self.gen.config

    def start(self) -> None:
        """Load (if not yet), start the workers, then connect."""
        if self.gen is None:
            self.load()
        assert self.gen is not None  # noqa: S101
        assert self.publisher is not None  # noqa: S101
        for p in self.gen.pipelines:
            p.start()
        subs = self.gen.subscriptions()
        for topic_filter in self._extra_subscriptions:
            subs.setdefault(topic_filter, 1)
        self.transport = MqttTransport(
            self.config.broker,
            self.config.client_id(),
            on_message=self._on_message,
            subscriptions=list(subs.items()),
            will=Will(self._state_topic, self._state_payload("offline", "connection lost")),
            on_connect=self._announce,
            session=SessionOptions(
                # Always manual: receipt-mode messages are acknowledged on arrival below, durable
                # ones when safe; one mode of paho for every configuration a push may bring.
                manual_ack=True,
                # MQTT 5 flow control: never more unacknowledged input than an inbox holds.
                receive_maximum=min(self.config.limits.inbox_size, 65535),
                max_packet_bytes=self.config.limits.max_packet_bytes,
            ),
            on_published=self.publisher.on_published,
            on_messages=self._on_messages,
        )
        self.acks.transport = self.transport
        self.publisher.attach(self.transport)
        self.transport.start()

    def add_route(self, topic_filter: str, handler: object, *, subscribe: bool = True) -> None:
        """Send messages matching TOPIC_FILTER to HANDLER(topic, payload) (before start).

        With SUBSCRIBE false the route only dispatches; the caller subscribes when it needs to.
        """
        self._extra_routes.append((topic_filter, handler))
        if subscribe:
            self._extra_subscriptions.append(topic_filter)

    def collect_bundles(self, keep: set[str] | None = None) -> None:
        """Let the bundle store drop bundles neither running nor in KEEP, if over its size."""
        if self.store is None:
            return
        running = {parse_ref(str(p.config.bundle)) for p in self.pipelines}
        self.store.collect({d for d in running if d} | (keep or set()))

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
        self._on_messages([(topic, payload, mid, qos)], received)

    def _on_messages(self, batch: list[Publish], received: float) -> None:
        # One read's messages: the lock is taken once, and each pipeline gets its share as one
        # list. Extra routes (fleet documents) are rare and handled one by one, in order.
        if self._extra_routes:
            plain: list[Publish] = []
            for message in batch:
                handler = self._extra_route(message[0])
                if handler is None:
                    plain.append(message)
                    continue
                self._route_locked(plain, received)
                plain = []
                topic, payload, mid, qos = message
                handler(topic, payload)  # type: ignore[operator]
                if qos > 0 and self.transport is not None:
                    self.transport.ack(mid, qos)
            batch = plain
        self._route_locked(batch, received)

    def _extra_route(self, topic: str) -> object | None:
        handler = self._extra_cache.get(topic, _UNSEEN)
        if handler is _UNSEEN:
            handler = next((h for f, h in self._extra_routes if matches(f, topic)), None)
            if len(self._extra_cache) < _ROUTE_CACHE_LIMIT:
                self._extra_cache[topic] = handler
        return handler

    def _route_locked(self, batch: list[Publish], received: float) -> None:
        if not batch:
            return
        with self._route_lock:
            if self._holding is not None:
                # A generation switch is under way: keep the messages, in order, for the next one.
                self._holding.extend((t, p, received, m, q) for t, p, m, q in batch)
                return
            self._route(batch, received)

    def _targets(self, gen: Generation, topic: str) -> tuple[Pipeline, ...]:
        targets = tuple(p for f, p in gen.filters if matches(f, topic))
        if len(gen.routes) < _ROUTE_CACHE_LIMIT:
            gen.routes[topic] = targets
        return targets

    def _route(self, batch: list[Publish], received: float) -> None:
        gen = self.gen
        routes = gen.routes if gen is not None else {}
        offers: dict[Pipeline, list[tuple[str, bytes, float, Token]]] = {}
        for topic, payload, mid, qos in batch:
            targets = routes.get(topic)
            if targets is None:
                targets = self._targets(gen, topic) if gen is not None else ()
            if not targets:
                self._unroutable(topic, payload, mid, qos)
                continue
            token: Token = None
            if qos > 0:
                durable = sum(1 for p in targets if p.durable)
                if durable:
                    self.acks.hold(mid, durable)
                    token = (mid, qos)
                elif self.transport is not None:
                    self.transport.ack(mid, qos)  # receipt mode: acknowledged on arrival
            for pipeline in targets:
                items = offers.get(pipeline)
                if items is None:
                    items = offers[pipeline] = []
                items.append((topic, payload, received, token if pipeline.durable else None))
        for pipeline, items in offers.items():
            pipeline.offer_many(items)

    def _unroutable(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        self.unroutable["unroutable"] += 1
        dlq = self.config.topics.dead_letter.format(gateway=self.gateway, pipeline="_unrouted")
        report = dead_letter("_unrouted", "unroutable", topic, len(payload))
        if self.publisher is not None:
            self.publisher.submit([(dlq, report, 0, False)])
        if qos > 0 and self.transport is not None:
            self.transport.ack(mid, qos)

    # -- configuration changes ----------------------------------------------------------------

    def apply(self, config: Config) -> ApplyResult:
        """Switch to CONFIG's pipelines atomically; on any failure keep the running ones.

        Everything that can fail (bundle verification, self-tests, construction) happens before
        the switch, with the old generation still serving.
        """
        with self._apply_lock:
            try:
                new = self.build(config, restore=False)
            except FloorlineError as exc:
                log.warning("configuration refused, the running one stays: %s", exc)
                return ApplyResult(ok=False, reason=str(exc))
            old = self.gen
            with self._route_lock:
                self._holding = []
            carried: list[str] = []
            try:
                if old is not None:
                    for p in old.pipelines:
                        p.stop(drain_all=True)  # every accepted message is finished by `old`
                    carried = self._carry_over(old, new)
                self.gen = new
                self.config = new.config
                for p in new.pipelines:
                    p.start()
                if self.transport is not None:
                    subs = new.subscriptions()
                    for topic_filter in self._extra_subscriptions:
                        subs.setdefault(topic_filter, 1)
                    self.transport.set_subscriptions(list(subs.items()))
            finally:
                with self._route_lock:
                    held, self._holding = self._holding or [], None
                    for topic, payload, received, mid, qos in held:
                        self._route([(topic, payload, mid, qos)], received)
            if old is not None:
                old.close()
            if self.transport is not None and self.transport.connected.is_set():
                self.transport.publish(self._state_topic, self._state_payload("online"), 1, True)
            log.info("configuration applied; %d held messages passed on; windows carried: %s",
                     len(held), ", ".join(carried) or "none")
            return ApplyResult(ok=True, carried_over=tuple(carried))

    def _carry_over(self, old: Generation, new: Generation) -> list[str]:
        carried = []
        previous = {p.name: p for p in old.pipelines}
        for p in new.pipelines:
            before = previous.get(p.name)
            if before is not None and _same_input(before, p):
                p.adopt_windows(before)
                carried.append(p.name)
            elif self.journal is not None:
                self.journal.forget(p.name)  # saved windows of another shape must not come back
        return carried

    def _bundle_info(self) -> list[BundleInfo]:
        return [
            {
                "pipeline": p.name,
                "name": p.model.bundle.manifest.name,
                "version": p.model.bundle.manifest.version,
                "sha256": p.model.artifact.sha256,
                "artifact": p.model.artifact.file,
                "runtime": p.model.backend.runtime,
            }
            for p in self.pipelines
        ]

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
        if self.gen is not None:
            self.gen.close()
        log.info("stopped (%s)", reason)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop() has run, or TIMEOUT passed."""
        return self._stopped.wait(timeout)
