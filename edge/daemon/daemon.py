"""The gateway daemon: wires the stages, connects, switches configurations, reports state.

Start-up order matters: every bundle is verified and self-tested before the daemon connects, so a
gateway with a bad bundle never announces itself online. Shutdown is the reverse: workers drain,
the offline state is published, and only then does the connection close.

A configuration runs as a *generation* of pipelines (``generation``). ``apply`` builds the next
generation beside the running one (bundles verified, self-tested), then switches atomically:
incoming messages are held for the moment of the switch (``routing``), the old workers finish
every message they accepted, windows in progress move to the new pipelines when their input is
unchanged, and the held messages go to the new generation. No message is processed by both
generations or by neither.

Prediction counters (``seq``) never go backwards for an asset: each batch's next counters are
committed with its predictions in the outbox (``Predictions``), and every generation's pipelines
are seeded from there before they start, at start-up and at each switch, whether their windows
were carried over or dropped (``_seed_seqs``, ``floorline.edge.stream.window``).

Everything the gateway sends goes through ``send``: the publisher, its outbox for QoS ≥ 1, then
the connection. Two messages cannot: the last will (the broker publishes it) and the final
offline state, written while the connection closes. The retained state and fleet reports skip
the outbox (``keep=False``): each is replaced by the next.

Health: a monitor thread checks every ``health_period_s`` that each pipeline's worker thread
runs and makes progress when it has input (``stall_s``), and that the MQTT network thread runs
and turns while connected. On a problem the retained state becomes ``degraded`` with the reason
(``state``), and ``online`` again should it clear. ``on_fatal`` (``floorline run`` sets it) is
called once the problem has lasted ``fatal_after_s``: a dead thread never comes back, and only a
restart brings the gateway back to work.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

from floorline.edge.bundle.store import BundleStore, parse_ref
from floorline.edge.capture.service import CaptureService
from floorline.edge.config import check_fit
from floorline.edge.config.model import Config, PipelineConfig
from floorline.edge.daemon.acks import AckTracker
from floorline.edge.daemon.generation import ApplyResult, Generation, carry_over
from floorline.edge.daemon.journal import WindowJournal
from floorline.edge.daemon.models import close_model, load_model, load_shadow
from floorline.edge.daemon.pipeline import Pipeline
from floorline.edge.daemon.routing import Handler, Router
from floorline.edge.daemon.sparkplug_node import EdgeNodes
from floorline.edge.daemon.state import bundle_info, state_document
from floorline.edge.daemon.workers import WorkerPipeline
from floorline.edge.delivery.outbox import Outbox
from floorline.edge.delivery.publisher import Publisher
from floorline.edge.errors import FloorlineError
from floorline.edge.messages import Outbound
from floorline.edge.mqtt.transport import MqttTransport, SessionOptions, Will
from floorline.edge.service.metrics import BundleInfo, Metrics
from floorline.edge.service.sdnotify import network_problem, workers_problem
from floorline.edge.stream.encode import dead_letter

__all__ = ["ApplyResult", "Daemon", "Generation"]

log = logging.getLogger(__name__)

HEALTH_PERIOD_S = 1.0
"""How often the monitor looks at the worker and network threads."""
STALL_S = 30.0
"""A worker with input queued and no progress for this long, or a connected network thread
without a turn for this long, is stalled (well above one batch's inference)."""


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
        self.router = Router(self.acks, self._on_unroutable)
        self.publisher: Publisher | None = None
        self.journal: WindowJournal | None = None
        self.journal_error: str | None = None
        self.store: BundleStore | None = None
        self.sparkplug: EdgeNodes | None = None
        """Sparkplug edge nodes of ``sparkplug`` outputs: own connections (docs/sparkplug.md)."""
        self._apply_lock = threading.Lock()
        self._extra_subscriptions: list[str] = []
        self.capture = CaptureService(self.state_dir, self.gateway,
                                      topic=config.topics.capture_label)
        """Data capture: the store and the label command (``floorline.edge.capture``)."""
        self.metrics = Metrics(self.stats, bundles=self._bundle_info, gateway=self.gateway)
        self.health_period_s = HEALTH_PERIOD_S
        self.stall_s = STALL_S
        self.health: str | None = None
        """Why the gateway is degraded (a dead or stalled thread), or None while it is healthy."""
        self.unhealthy_since: float | None = None
        self.fatal_after_s: float | None = None
        self.on_fatal: Callable[[str], None] | None = None
        """Called on the monitor thread, every period, once a problem lasted ``fatal_after_s``."""
        self._monitor = threading.Thread(target=self._watch, name="health", daemon=True)

    @property
    def gen(self) -> Generation | None:
        """The running generation."""
        return self.router.generation

    @property
    def pipelines(self) -> list[Pipeline]:
        """The running generation's pipelines."""
        gen = self.router.generation
        return gen.pipelines if gen else []

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
        self.sparkplug = EdgeNodes(self.config.broker, self.config.client_id(), self.state_dir,
                                   self.config.outbox, self.gateway)
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
        built: list[Pipeline] = []
        try:
            for index, pc in enumerate(config.pipelines):
                with config.building(index):  # errors name the file, line and pipeline
                    built.append(self._build_pipeline(config, pc, restore=restore))
        except BaseException:
            Generation(config, built).close()
            raise
        return Generation(config, built)

    def _build_pipeline(self, config: Config, pc: PipelineConfig, *, restore: bool) -> Pipeline:
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
        shadow = None
        try:
            check_fit(pc, model.bundle.manifest)  # what `floorline check` refuses, run refuses
            shadow = load_shadow(config, pc, self.store)  # a candidate beside it (`shadow`)
            if pc.workers > 1:  # stages in worker processes, started with the generation
                return WorkerPipeline(config, pc, model, self.send, self.metrics.observe_batch,
                                      self.state_dir, config.fleet.store_max_bytes)
            pipeline = Pipeline(
                pc,
                gateway=self.gateway,
                topics=config.topics,
                limits=config.limits,
                model=model,
                submit=self.send,
                release=self.acks.release,
                journal=self.journal,
                restore=restore,
                observe=self.metrics.observe_batch,
                shadow=shadow,
                report=self._send_report,
                sessions=self.sparkplug,
            )
        except BaseException:
            close_model(shadow)
            model.backend.close()
            model.bundle.close()
            raise
        pipeline.capture = self.capture.policy(  # None without `capture:`
            pc.capture, pipeline=pc.name, manifest=model.bundle.manifest,
            sha256=model.artifact.sha256, labels=pc.labels, thresholds=pc.thresholds)
        return pipeline

    def _route_labels(self, gen: Generation) -> None:
        """Route the label command of GEN, a generation that runs, if a pipeline captures.

        Only for a generation that runs (``load``; ``apply`` after the switch, before it
        subscribes): a refused configuration changes no route. A topic changed by a reload is
        added; the previous one stays routed until a restart (docs/monitoring.md).
        """
        label_topic = gen.config.topics.capture_label.format(gateway=self.gateway)
        captures = any(getattr(p, "capture", None) is not None for p in gen.pipelines)
        if captures and label_topic not in self._extra_subscriptions:
            self.capture.topic = label_topic
            self.add_route(label_topic, self.capture.on_label)

    def load(self, config: Config | None = None) -> None:
        """Open the state directory, then verify and build the pipelines (no network yet)."""
        if self.publisher is None:
            self._open_state()
        self.router.generation = self.build(config or self.config)
        self.config = self.router.generation.config
        self._route_labels(self.router.generation)
        self._seed_seqs(self.router.generation)

    def start(self) -> None:
        """Load (if not yet), start the workers, then connect."""
        if self.router.generation is None:
            self.load()
        gen = self.router.generation
        assert gen is not None  # noqa: S101
        assert self.publisher is not None  # noqa: S101
        gen.start()
        self.transport = MqttTransport(
            self.config.broker,
            self.config.client_id(),
            on_message=self._on_message,
            subscriptions=list(self._subscriptions(gen).items()),
            will=Will(self._state_topic, self._state_payload("offline", "connection lost")),
            on_connect=self._announce,
            session=SessionOptions(
                # Always manual: receipt-mode messages are acknowledged on arrival (routing),
                # durable ones when safe; one mode of paho for every configuration a push brings.
                manual_ack=True,
                # MQTT 5 flow control: never more unacknowledged input than an inbox holds.
                receive_maximum=min(self.config.limits.inbox_size, 65535),
                max_packet_bytes=self.config.limits.max_packet_bytes,
            ),
            on_published=self.publisher.on_published,
            on_messages=self.router.on_messages,
        )
        self.acks.ack = self.transport.ack
        self.publisher.attach(self.transport)
        self.transport.start()
        if self.sparkplug is not None:
            self.sparkplug.start()
        self._monitor.start()

    def _subscriptions(self, gen: Generation) -> dict[str, int]:
        subs = gen.subscriptions()
        for topic_filter in self._extra_subscriptions:
            subs.setdefault(topic_filter, 1)
        return subs

    def add_route(self, topic_filter: str, handler: Handler, *, subscribe: bool = True) -> None:
        """Send messages matching TOPIC_FILTER to HANDLER(topic, payload) (before start).

        With SUBSCRIBE false the route only dispatches; the caller subscribes when it needs to.
        """
        self.router.add_route(topic_filter, handler)
        if subscribe:
            self._extra_subscriptions.append(topic_filter)

    def collect_bundles(self, keep: set[str] | None = None) -> None:
        """Let the bundle store drop bundles neither running nor in KEEP, if over its size."""
        if self.store is None:
            return
        refs = [p.config.bundle for p in self.pipelines]
        refs += [p.config.shadow.bundle for p in self.pipelines if p.config.shadow is not None]
        running = {parse_ref(str(ref)) for ref in refs}
        self.store.collect({d for d in running if d} | (keep or set()))

    # -- the one publish path ---------------------------------------------------------------

    def send(self, messages: Sequence[Outbound], *, keep: bool = True) -> None:
        """Send MESSAGES, in order: QoS ≥ 1 through the outbox, QoS 0 at once if connected.

        Everything the gateway publishes goes through here (predictions, dead letters, state,
        stats, fleet reports). KEEP false: not through the outbox (see ``Publisher.submit``).
        Before the daemon is loaded there is nowhere to send: dropped.
        """
        if self.publisher is not None:
            self.publisher.submit(messages, keep=keep)

    def _send_report(self, messages: Sequence[Outbound]) -> None:
        # Retained reports a pipeline publishes (its shadow's): each replaced by the next, so
        # not through the outbox, as the state document.
        self.send(messages, keep=False)

    def _announce(self) -> None:
        # Runs at every (re)connect: the retained state must say online (or degraded) again.
        assert self.publisher is not None  # noqa: S101
        self.publisher.on_connected()
        self._send_state()

    def _send_state(self) -> None:
        # Retained, QoS 1, not kept in the outbox: every (re)connect announces a fresh one.
        health = self.health
        payload = self._state_payload("degraded" if health else "online", health)
        self.send([Outbound(self._state_topic, payload, 1, True)], keep=False)

    def _on_message(
        self, topic: str, payload: bytes, received: float, mid: int = 0, qos: int = 0
    ) -> None:
        self.router.on_messages([(topic, payload, mid, qos)], received)

    def _on_unroutable(self, topic: str, payload: bytes) -> None:
        self.unroutable["unroutable"] += 1
        dlq = self.config.topics.dead_letter.format(gateway=self.gateway, pipeline="_unrouted")
        self.send([Outbound(dlq, dead_letter("_unrouted", "unroutable", topic, len(payload)))])

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
            # Worker processes (``workers: N``) load before the switch: a failure refuses it.
            reason = new.prepare()
            if reason is not None:
                new.discard()
                log.warning("configuration refused, the running one stays: %s", reason)
                return ApplyResult(ok=False, reason=reason)
            old = self.router.generation
            carried: list[str] = []
            with self.router.holding() as held:
                if old is not None:
                    for p in old.pipelines:
                        p.stop(drain_all=True)  # every accepted message is finished by `old`
                    carried = carry_over(old, new, self.journal)
                # After `old` stopped: every prediction it made has its counter in the outbox.
                self._seed_seqs(new)
                self.router.generation = new
                self.config = new.config
                new.start()
                self._route_labels(new)
                if self.transport is not None:
                    self.transport.set_subscriptions(list(self._subscriptions(new).items()))
            if old is not None:
                self._clear_drift_topics(old, new)
                old.close()
            if self.transport is not None and self.transport.connected.is_set():
                self._send_state()
            log.info("configuration applied; %d held messages passed on; windows carried: %s",
                     len(held), ", ".join(carried) or "none")
            return ApplyResult(ok=True, carried_over=tuple(carried))

    def _clear_drift_topics(self, old: Generation, new: Generation) -> None:
        """Clear the retained drift measures OLD published where NEW will not (an empty message).

        A pipeline removed, its drift turned off or ``topics.drift`` changed: the last measures
        would stay on the broker, read by dashboards as current (``workers: N`` too: the reader's
        monitor publishes the pipeline's measures).
        """
        def topics(gen: Generation) -> set[str]:
            return {str(drift.stats_topic) for p in gen.pipelines
                    if (drift := getattr(p, "drift", None)) is not None}

        gone = topics(old) - topics(new)
        if gone:
            self.send([Outbound(topic, b"", 1, True) for topic in sorted(gone)])

    def _seed_seqs(self, gen: Generation) -> None:
        """Start GEN's window counters where the outbox says this gateway's predictions are."""
        if self.publisher is None:
            return
        for p in gen.pipelines:
            floors = self.publisher.outbox.next_seqs(p.name)
            if floors:
                p.seed_seqs(floors)

    def _bundle_info(self) -> list[BundleInfo]:
        return bundle_info(self.pipelines)

    # -- health -----------------------------------------------------------------------------

    def problem(self, max_age_s: float | None = None) -> str | None:
        """What is wrong now: a dead or stalled worker or network thread; None if nothing.

        MAX_AGE_S (default ``stall_s``): how long without progress is a stall.
        """
        age = self.stall_s if max_age_s is None else max_age_s
        return workers_problem(self.pipelines, age) or network_problem(self.transport, age)

    def _watch(self) -> None:
        while not self._stopped.wait(self.health_period_s):
            try:
                reason = self.problem()
            except Exception:  # a broken check must not end the monitor
                log.exception("health check failed")
                continue
            if self._stopped.is_set():
                return  # stopping: threads end on purpose
            now = time.monotonic()
            if reason != self.health:
                if reason is None:
                    log.info("healthy again")
                    self.unhealthy_since = None
                else:
                    log.error("degraded: %s", reason)
                    if self.unhealthy_since is None:
                        self.unhealthy_since = now
                self.health = reason
                self._send_state()
            if (reason is not None and self.on_fatal is not None
                    and self.fatal_after_s is not None and self.unhealthy_since is not None
                    and now - self.unhealthy_since >= self.fatal_after_s):
                self.on_fatal(reason)  # every period until acted on: it must be idempotent

    # -- state ------------------------------------------------------------------------------

    def _state_payload(self, state: str, reason: str | None = None) -> bytes:
        return state_document(self.gateway, state, self.pipelines, reason)

    def stats(self) -> dict[str, object]:
        """Per-pipeline counters, connection, outbox and journal facts."""
        t = self.transport
        pub = self.publisher
        outbox = pub.outbox if pub else None
        return {
            "connected": bool(t and t.connected.is_set()),
            "connects": t.connects if t else 0,
            "last_error": t.last_error if t else None,
            "health": self.health,
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
            "capture": self.capture.stats(),
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
        if self.router.generation is not None:
            self.router.generation.close()
        self.capture.close()  # after the workers: their last windows are written
        log.info("stopped (%s)", reason)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop() has run, or TIMEOUT passed."""
        return self._stopped.wait(timeout)
