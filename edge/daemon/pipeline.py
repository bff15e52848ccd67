"""One pipeline at run time: a bounded inbox and a worker thread that runs every stage.

The worker decodes, windows, batches, infers, encodes and publishes. It owns every stage object,
so none needs a lock. Paho's thread touches only ``offer_many`` (an enqueue and two counters) and
``refuse_too_large``. A bad message is dead-lettered with a bounded reason and never stops the
worker; a failed inference fails each window of its batch visibly, the same way. So does anything
unexpected (a bug, a plugin raising what it should not): the message, or each window of the
batch, is dead-lettered ``internal_error``, counted (``internal_errors``), logged (rate-limited)
and the worker carries on. Should the worker thread end anyway, ``failure`` says so and the
daemon reports itself ``degraded`` (``floorline.edge.daemon.daemon``).

Size: a message over ``max_payload`` never enters the inbox: the router refuses it on arrival
(``too_large``). For an ``ack: receipt`` pipeline ``max_payload`` is ``limits.max_payload_bytes``
capped at a quarter of ``limits.inbox_bytes`` (less the per-message overhead), so no single
message can take more than a quarter of the inbox's byte budget and crowd out good input.

Acknowledgements (``ack: durable``): a message is released for acknowledgement only when what it
contributed is safe. The worker holds the messages it processed until no window is waiting in
the batcher (every window so far is predicted and its prediction committed to the outbox), then
saves the touched assets' partial windows to the journal and releases the messages, in arrival
order. Releases therefore lag by at most ``max_wait_ms`` plus one inference.

Shadow (``shadow``): a candidate model beside the pipeline's runs on the same windows after each
batch's predictions were submitted, and is compared and reported (``daemon.shadow``). Whatever it
does, the pipeline's own predictions, dead letters and acknowledgements stay as they were.

Overload (``ack: receipt``, ``limits.overload: shed_assets``): when the inbox fills, whole assets
are shed on arrival rather than single messages of every asset (``floorline.edge.daemon.shedding``),
counted ``shed``; a marker in the inbox tells the worker where a shed gap starts, and that asset's
window starts afresh there. The inbox's bounds stay as the last resort (``dropped_inbox_full``).

Counting input: ``received`` counts every message offered (queued, shed, dropped or refused) on
arrival; the worker dead-letters it later. ``health`` gives the counts a probation compares,
taken so that the dead letters between any two readings are never more than the input between
them (issue 14, finding 5).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

from floorline.edge.bundle.selftest import LoadedModel
from floorline.edge.capture.policy import Capture
from floorline.edge.config.model import LimitsConfig, PipelineConfig, TopicsConfig
from floorline.edge.daemon.inbox import Inbox
from floorline.edge.daemon.journal import WindowJournal
from floorline.edge.daemon.models import close_model
from floorline.edge.daemon.shadow import ShadowRunner
from floorline.edge.daemon.shedding import GAP, Shedder
from floorline.edge.decoders import make_decoder
from floorline.edge.delivery.outbox import SeqMarks
from floorline.edge.delivery.publisher import Predictions
from floorline.edge.errors import BackendError, ConfigError, DecodeError
from floorline.edge.messages import Inbound, Outbound
from floorline.edge.mqtt.topics import topic_level
from floorline.edge.outputs import OutputContext, make_output
from floorline.edge.stream.batch import Batcher
from floorline.edge.stream.drift import make_monitor
from floorline.edge.stream.encode import dead_letter
from floorline.edge.stream.heads import HeadLayout
from floorline.edge.stream.normalization import model_input
from floorline.edge.stream.window import Window, Windower

log = logging.getLogger(__name__)

Submit = Callable[[Sequence[Outbound]], None]
"""Hand messages to the gateway's one publish path (the outbox for QoS ≥ 1)."""

Release = Callable[[list[tuple[int, int]]], None]

_POLL_S = 0.1
_ITEM_OVERHEAD = 128  # bytes counted per queued message besides its payload
_RUN = 64  # messages the worker takes from its inbox at once
_SETTLE_EVERY = 256  # messages; bounds how many a worker holds unacknowledged in a busy stream
_MAX_SHARE = 4  # a receipt pipeline's message takes at most 1/_MAX_SHARE of its inbox_bytes
_LOG_EVERY_S = 10.0  # drops and internal errors are logged at most this often per pipeline
_DEATH_MAX = 120  # characters of the exception that ended a worker, for the state document


def max_payload(limits: LimitsConfig, *, durable: bool) -> int:
    """The largest payload a pipeline accepts.

    ``max_payload_bytes``, and for ``ack: receipt`` at most a quarter of ``inbox_bytes`` (less
    the per-message overhead).
    """
    if durable:  # no byte bound on its inbox (see Pipeline.__init__)
        return limits.max_payload_bytes
    return min(limits.max_payload_bytes, limits.inbox_bytes // _MAX_SHARE - _ITEM_OVERHEAD)


def _queued_bytes(item: Inbound) -> int:
    # The payload plus what holding it costs (its tuple, the bytes object's header), roughly.
    return len(item.payload) + _ITEM_OVERHEAD


class Pipeline:
    """A configured stream from subscriptions to predictions."""

    def __init__(
        self,
        config: PipelineConfig,
        *,
        gateway: str,
        topics: TopicsConfig,
        limits: LimitsConfig,
        model: LoadedModel,
        submit: Submit,
        release: Release | None = None,
        journal: WindowJournal | None = None,
        restore: bool = True,
        observe: Callable[[str, int, float, list[float]], None] | None = None,
        shadow: LoadedModel | None = None,
        report: Submit | None = None,
        sessions: object = None,
    ) -> None:
        """SHADOW: the loaded ``shadow`` model (``models.load_shadow``), needed when configured.

        REPORT: where its retained reports go (the daemon's publish path without the outbox);
        default SUBMIT.
        """
        self.config = config
        self.name = config.name
        self.model = model
        manifest = model.bundle.manifest
        self._spec = manifest.input
        self._flat_input = len(self._spec.shape) == 2
        self._heads = HeadLayout(manifest)
        self._submit = submit
        self._observe = observe
        self._release = release
        self._durable = config.ack == "durable"
        self.durable = self._durable
        self._journal = journal if self._durable else None
        self.max_payload = max_payload(limits, durable=self._durable)
        """Larger payloads are refused on arrival (``refuse_too_large``), never queued."""
        if self.max_payload < limits.max_payload_bytes:
            log.info("pipeline %s: payloads over %d bytes refused (a quarter of inbox_bytes %d, "
                     "below max_payload_bytes %d)", config.name, self.max_payload,
                     limits.inbox_bytes, limits.max_payload_bytes)
        self._drain_s = limits.drain_timeout_s
        self._dlq_topic = topics.dead_letter.format(gateway=gateway, pipeline=config.name)
        # The byte bound is for `ack: receipt` pipelines. A durable one keeps the count bound
        # alone: with MQTT 5 its count is the broker's receive maximum, so the broker holds
        # what the inbox cannot, and a byte bound would drop (and so lose) acknowledged input.
        self.inbox: Inbox[Inbound] = Inbox(
            limits.inbox_size, None if self._durable else limits.inbox_bytes, _queued_bytes
        )
        self.shedder: Shedder | None = None
        """Sheds whole assets when the inbox fills (``ack: receipt`` with ``shed_assets``)."""
        if not self._durable and limits.overload == "shed_assets":
            # Durable pipelines never shed: that would lose input the broker would redeliver,
            # and with MQTT 5 the broker's receive maximum holds it back before the inbox fills.
            self.shedder = Shedder(self.inbox, config.asset.topic_segment,
                                   max_count=limits.inbox_size, max_bytes=limits.inbox_bytes)
        features = [f.name for f in self._spec.features]
        # SUBMIT: a decoder may answer on the one publish path (Sparkplug B rebirth requests).
        self._decoder = make_decoder(config.decoder, features, config.name, submit)
        self._windower = Windower(self._spec.window, len(features), config.window)
        self._batcher: Batcher[Window] = Batcher(
            config.batch.max_batch, config.batch.max_wait_ms / 1000.0
        )
        # Input drift against the bundle's reference summary (None: off, or no summary).
        # With workers: N the reader's is the pipeline's one; each worker process's only counts
        # (floorline.edge.daemon.workers).
        self.drift = make_monitor(config.drift, manifest, gateway=gateway, pipeline=config.name,
                                  stats_topic=topics.drift, alert_topic=topics.alerts)
        self.output = make_output(
            config.output,
            OutputContext(
                gateway=gateway,
                pipeline=config.name,
                prediction_topic=topics.predictions,
                manifest=manifest,
                artifact=model.artifact,
                labels=config.labels,
                thresholds=config.thresholds,
                sessions=sessions,
                drift=self.drift.flagged if self.drift is not None else None,
            ),
        )
        self.shadow: ShadowRunner | None = None
        """The shadow model run beside this pipeline's, if ``shadow`` is configured."""
        if config.shadow is not None:
            if shadow is None:
                raise ConfigError("shadow: configured, but no shadow model was loaded")
            try:
                self.shadow = ShadowRunner(
                    config.shadow, shadow, model, gateway=gateway, pipeline=config.name,
                    labels=config.labels, thresholds=config.thresholds, submit=submit,
                    report=report or submit,
                )
            except BaseException:
                self.output.close()
                raise
        self._segment = config.asset.topic_segment
        self._assets: dict[str, str | None] = {}
        # Assets named in payloads are shed by topic: topic -> shed gaps so far, and asset ->
        # (topic, gaps) when it was last fed, so each asset starts afresh after its topic's gap.
        self._gaps: dict[str, int] = {}
        self._fed: dict[str, tuple[str, int]] = {}
        self._max_fed = 2 * config.window.max_assets
        self._held: list[tuple[int, int]] = []  # processed, not yet released (durable)
        self._touched: set[str] = set()
        self._capture: Capture | None = None
        # Written by paho's thread only: received, shed, dropped_inbox_full. The rest by the
        # worker.
        self.counters: Counter[str] = Counter()
        self.dead_letters: Counter[str] = Counter()
        # The worker's side of ``health``: messages taken from the inbox, messages it
        # dead-lettered, windows whose inference failed; published together, between messages.
        self._taken = 0
        self._dead = 0
        self._failed = 0
        self._tally = (0, 0, 0)
        self.last_progress = time.monotonic()
        self.death: str | None = None
        """What ended the worker thread, if an exception did."""
        self._drops_logged = 0  # paho's thread
        self._drop_log_at = 0.0  # paho's thread
        self._sheds_logged = 0  # paho's thread
        self._shed_log_at = 0.0  # paho's thread
        self._shedding = False  # paho's thread: whether assets were shed at the last offer
        self._errors_unlogged = 0  # worker
        self._error_log_at = 0.0  # worker
        self._stop = threading.Event()
        self._drain_all = False
        self._thread = threading.Thread(target=self._main, name=f"pipeline-{self.name}",
                                        daemon=True)
        if self._journal is not None and restore:
            self._restore()

    def _restore(self) -> None:
        assert self._journal is not None  # noqa: S101
        restored = sum(self._import(a, b) for a, b in self._journal.load(self.name).items())
        if restored:
            log.info("pipeline %s: restored %d assets' windows from the journal",
                     self.name, restored)
        self.counters["restored_assets"] = restored

    def _import(self, asset: str, blob: bytes) -> bool:
        try:
            self._windower.import_state(asset, blob)
        except ValueError:
            # The bundle's window changed since: old buffers cannot continue.
            log.warning("pipeline %s: journal state for %s no longer fits; dropped",
                        self.name, asset)
            return False
        return True

    # -- paho's thread ----------------------------------------------------------------------

    def offer(self, message: Inbound) -> None:
        """Enqueue a message; when the inbox is full, drop it and count (never block paho)."""
        self.offer_many([message])

    def offer_many(self, items: list[Inbound]) -> None:
        """Enqueue ITEMS in order; those the inbox cannot hold are dropped and counted.

        The caller (the router) has refused payloads over ``max_payload`` already.
        """
        self.counters["received"] += len(items)
        shedder = self.shedder
        if shedder is not None and shedder.engaged():
            self._offer_shedding(shedder, items)
            return
        rest = self.inbox.put_many(items)
        if rest:
            self._dropped(rest)

    def _offer_shedding(self, shedder: Shedder, items: list[Inbound]) -> None:
        """Queue ITEMS but those of the assets shed now, with a marker where a gap starts."""
        kept, shed = shedder.split(items)
        rest = self.inbox.put_many(kept) if kept else []
        unmarked = 0
        if rest:  # the hard bound: messages and markers refused
            rest, failed = shedder.unmark(rest)
            if failed:  # gaps without a marker are plain drops, as without shedding
                unmarked = sum(1 for key in shed if key in failed)
        if shed:
            self.counters["shed"] += len(shed) - unmarked
        if rest or unmarked:
            self._dropped(rest, unmarked)
        shedding = shedder.controller.threshold > 0
        if shedding or self._shedding:
            self._log_shedding(shedder, shedding)

    def _log_shedding(self, shedder: Shedder, shedding: bool) -> None:
        # On paho's thread: one line per interval at most, as for drops.
        was, self._shedding = self._shedding, shedding
        now = time.monotonic()
        if now < self._shed_log_at:
            return
        total = self.counters["shed"]
        if shedding:
            assets, known = shedder.shedding()
            log.warning(
                "pipeline %s: overloaded (inbox %d%% full); shedding %d of %d assets whole, "
                "%d messages shed since the last report, %d in all", self.name,
                round(shedder.fill() * 100), assets, known, total - self._sheds_logged, total,
            )
        elif was:
            log.info("pipeline %s: no longer shedding; %d messages shed in all", self.name, total)
        else:
            return
        self._sheds_logged = total
        self._shed_log_at = now + _LOG_EVERY_S

    def _dropped(self, rest: list[Inbound], more: int = 0) -> None:
        """REST did not fit the inbox (and MORE messages not queued were dropped with them)."""
        dropped = self.counters["dropped_inbox_full"] + len(rest) + more
        self.counters["dropped_inbox_full"] = dropped
        tokens = [m.token for m in rest if m.token is not None]
        if tokens and self._release is not None:
            self._release(tokens)  # dropped by policy: holding them would stall the stream
        now = time.monotonic()
        if now >= self._drop_log_at:  # on paho's thread: one line per interval, not per message
            log.warning(
                "pipeline %s: inbox full (%d messages, %d bytes queued); %d messages dropped "
                "since the last report, %d in all", self.name, self.inbox.qsize(),
                self.inbox.weight(), dropped - self._drops_logged, dropped,
            )
            self._drops_logged = dropped
            self._drop_log_at = now + _LOG_EVERY_S

    def refuse_too_large(self, topic: str, size: int) -> None:
        """A message of SIZE bytes over ``max_payload`` arrived: dead-letter it, never queue it.

        On paho's thread, before any inbox; its acknowledgement is the caller's (the router).
        """
        self.counters["received"] += 1
        self._reject("too_large", topic, size, f"over {self.max_payload} bytes")

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (and put the capture bounds in force: a running pipeline's)."""
        if self._capture is not None:
            self._capture.activate()
        self._thread.start()

    def stop(self, *, drain_all: bool = False) -> None:
        """Finish queued messages (up to the drain timeout), flush the last batch, stop.

        With DRAIN_ALL every queued message is processed whatever it takes (a generation switch:
        nothing the old pipeline accepted may be left behind).
        """
        self._drain_all = drain_all
        self._stop.set()
        if not self._thread.is_alive():
            return
        self._thread.join(None if drain_all else self._drain_s + 2.0)
        if self._thread.is_alive():
            log.warning("pipeline %s did not drain within %.1fs", self.name, self._drain_s)

    def is_alive(self) -> bool:
        """Whether the worker thread runs."""
        return self._thread.is_alive()

    def failure(self) -> str | None:
        """Why the worker thread ended though nobody stopped it.

        None while it runs, once it was stopped, and before it started.
        """
        t = self._thread
        if t.ident is None or t.is_alive() or self._stop.is_set():
            return None
        return f"pipeline {self.name}: worker thread died ({self.death or 'no exception'})"

    # -- worker thread ----------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # recorded for failure(); the thread ends
            # Exceptions are caught per message and per batch below; this is what got past
            # them (SystemExit, MemoryError, a bug in the loop itself).
            self.death = f"{type(exc).__name__}: {exc}"[:_DEATH_MAX]
            log.critical("pipeline %s: worker thread died: %s", self.name, self.death,
                         exc_info=exc)

    def _run(self) -> None:
        deadline: float | None = None
        while True:
            if self._stop.is_set() and deadline is None:
                deadline = time.monotonic() + self._drain_s
            try:
                if not self._turn(deadline):
                    break
            except Exception as exc:  # noqa: BLE001 - counted and logged; the worker carries on
                self._internal_error(exc, None, 0)
                self._stop.wait(_POLL_S)  # never a busy loop, should it fail every turn
            self.last_progress = time.monotonic()
            if deadline is not None and not self._drain_all and time.monotonic() > deadline:
                log.warning("pipeline %s: drain deadline reached, %d queued messages left",
                            self.name, self.inbox.qsize())
                break
        rest = self._batcher.drain()
        if rest:
            self._infer(rest)
        self._settle()
        self._tally = (self._taken, self._dead, self._failed)
        if self.shadow is not None:
            self.shadow.publish(running=False)

    def _turn(self, deadline: float | None) -> bool:
        """One turn of the worker loop; False once stopping and nothing is left to take."""
        timeout = self._batcher.timeout()
        wait = _POLL_S if timeout is None else min(timeout, _POLL_S)
        # A run of messages at a time: the checks below are per run, not per message.
        # Bounded, so a window that is due waits at most one run.
        items = self.inbox.get_many(_RUN, timeout=wait)
        if items:
            held = self._held
            self._taken += len(items)
            for topic, payload, received, token in items:
                if token is GAP:  # not a message: a shed gap starts here (daemon.shedding)
                    self._taken -= 1
                    self._after_gap(topic)
                    continue
                try:
                    self._handle(topic, payload, received)
                except Exception as exc:  # noqa: BLE001 - this message only: dead-lettered
                    self._internal_error(exc, topic, len(payload))
                if token is not None:
                    held.append(token)
            # Every message taken is handled: a consistent reading for ``health`` (published
            # only where no message is half-handled).
            self._tally = (self._taken, self._dead, self._failed)
            if self.inbox.empty() or len(held) >= _SETTLE_EVERY:
                self._settle()
        elif deadline is not None:
            return False
        due = self._batcher.take_due()
        if due:
            self._infer(due)
            self._settle()
            self._tally = (self._taken, self._dead, self._failed)
        if self.shadow is not None:
            self.shadow.maybe_report(time.monotonic())
        return True

    # -- a worker process's loop (``workers: N``, floorline.edge.daemon.workers) -------------

    def batch_timeout(self) -> float | None:
        """Seconds until the batcher's oldest window is due (None: nothing waits)."""
        return self._batcher.timeout()

    def process(self, items: list[Inbound]) -> None:
        """Handle ITEMS as the worker thread does (receipt mode: no tokens, no gap markers)."""
        self._taken += len(items)
        for topic, payload, received, _token in items:
            try:
                self._handle(topic, payload, received)
            except Exception as exc:  # noqa: BLE001, PERF203 - this message only: dead-lettered
                self._internal_error(exc, topic, len(payload))
        self._tally = (self._taken, self._dead, self._failed)
        self.last_progress = time.monotonic()

    def tick(self) -> None:
        """Infer the batch that is due, if any."""
        due = self._batcher.take_due()
        if due:
            self._infer(due)
            self._tally = (self._taken, self._dead, self._failed)

    def flush(self) -> None:
        """Infer whatever waits in the batcher (stopping)."""
        rest = self._batcher.drain()
        if rest:
            self._infer(rest)
        self._tally = (self._taken, self._dead, self._failed)

    def snapshot(self) -> dict[str, object]:
        """What a worker process reports: its counters and windower facts."""
        return {
            "taken": self._taken,
            "tally": self._tally,
            "counters": dict(self.counters),
            "dead_letters": dict(self.dead_letters),
            "pending_samples": sum(self._windower.pending().values()),
            "window_resets": dict(self._windower.resets),
            "duplicates": self._windower.duplicates,
        }

    def _settle(self) -> None:
        """Release held messages once nothing they contributed can still be lost."""
        if not self._held or len(self._batcher):
            return  # windows still waiting for their batch: their messages are not safe yet
        if self._journal is not None and self._touched:
            try:
                states = {a: s for a in self._touched if (s := self._windower.export_state(a))}
                saved = self._journal.save(self.name, states)
            except Exception as exc:  # noqa: BLE001 - as a refused write: counted, released
                self._internal_error(exc, None, 0)
                saved = False
            if not saved:
                self.counters["journal_errors"] += 1
        self._touched.clear()
        held, self._held = self._held, []  # released once, even if releasing fails half-way
        self.counters["released"] += len(held)
        if self._release is not None:
            self._release(held)

    def _internal_error(self, exc: Exception, topic: str | None, size: int) -> None:
        """Something unexpected failed on TOPIC's message (None: on no one message)."""
        self.counters["internal_errors"] += 1
        now = time.monotonic()
        if now >= self._error_log_at:
            log.error(
                "pipeline %s: unexpected error (%d more since the last report); the worker "
                "carries on", self.name, self._errors_unlogged, exc_info=exc,
            )
            self._errors_unlogged = 0
            self._error_log_at = now + _LOG_EVERY_S
        else:
            self._errors_unlogged += 1
        if topic is None:
            return
        try:
            self._reject("internal_error", topic, size, f"{type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001 - the publish path itself failed: counted above
            log.debug("pipeline %s: cannot dead-letter an internal error", self.name)

    def window_states(self) -> dict[str, bytes]:
        """Every asset's partial window, as the journal stores it (call once the worker stopped)."""
        states = {a: self._windower.export_state(a) for a in self._windower.assets()}
        return {a: s for a, s in states.items() if s is not None}

    def adopt_windows(self, states: dict[str, bytes]) -> None:
        """Continue partial windows STATES (from a stopped pipeline with the same input)."""
        for asset, state in states.items():
            self._windower.import_state(asset, state)
            self._touched.add(asset)

    def seed_seqs(self, floors: dict[str, int]) -> None:
        """Never number a new window below FLOORS[asset] (before start; ``Windower.seed``)."""
        self._windower.seed(floors)

    def _asset_of(self, topic: str) -> str | None:
        if topic in self._assets:
            return self._assets[topic]
        asset = None if self._segment is None else topic_level(topic, self._segment)
        if len(self._assets) < 100_000:  # a cache, bounded against floods of distinct topics
            self._assets[topic] = asset
        return asset

    def _after_gap(self, topic: str) -> None:
        """TOPIC's messages were shed from here on: its asset's window starts afresh."""
        self.counters["shed_gaps"] += 1
        if self._segment is None:  # the assets are in the payloads: see each one's next message
            self._gaps[topic] = self._gaps.get(topic, 0) + 1
            return
        asset = self._asset_of(topic)
        if asset is not None:
            self._windower.forget(asset)  # its window counter goes on (Windower.forget)

    def _gapped(self, topic: str, asset: str) -> None:
        """ASSET from TOPIC, a topic that had a shed gap: start afresh if it is its first since."""
        gaps = self._gaps.get(topic)
        if gaps is None:
            return
        mark = (topic, gaps)
        if self._fed.get(asset) != mark:
            # Not seen on TOPIC since its last gap (or not since tracking began): start afresh.
            if len(self._fed) >= self._max_fed:  # bounded; forgetting costs a partial window
                self._fed.clear()
            self._fed[asset] = mark
            self._windower.forget(asset)

    def _handle(self, topic: str, payload: bytes, received: float) -> None:
        size = len(payload)
        try:
            samples = self._decoder.decode(payload, topic)
            if samples is None:  # understood, but no samples in it (e.g. a birth certificate)
                self.counters["control"] += 1
                return
            if self._segment is None:
                asset = samples.asset
                if self._gaps and asset:
                    self._gapped(topic, asset)
            else:
                asset = self._asset_of(topic)
            windows = self._windower.push(asset, samples, received) if asset else None
        except DecodeError as exc:
            self._reject(exc.reason, topic, size, exc.detail)
            return
        if windows is None or asset is None:
            self._reject("bad_asset", topic, size, "no asset key in topic or payload")
            return
        self.counters["decoded"] += 1
        if self._durable:
            self._touched.add(asset)
        for window in windows:
            self.counters["windows"] += 1
            batch = self._batcher.add(window)
            if batch:
                self._infer(batch)

    def _infer(self, batch: list[Window]) -> None:
        try:
            self._infer_batch(batch)
        except Exception as exc:  # noqa: BLE001 - fails this batch's windows visibly, only them
            self._internal_error(exc, None, 0)
            try:
                for w in batch:
                    self._reject("internal_error", f"window:{w.asset}", 0, type(exc).__name__,
                                 window=True)
            except Exception:  # noqa: BLE001 - the publish path itself failed: counted above
                log.debug("pipeline %s: cannot dead-letter an internal error", self.name)

    def _infer_batch(self, batch: list[Window]) -> None:
        raw = np.stack([w.values for w in batch])
        x = raw.reshape(len(batch), -1) if self._flat_input else raw
        x = model_input(x, self._spec)  # the bundle's feature stage, if any, then its normalization
        start = time.perf_counter()
        try:
            out = self.model.backend.infer(x)
        except BackendError as exc:
            for w in batch:
                self._reject("inference_failed", f"window:{w.asset}", 0, str(exc), window=True)
            return
        inference_ms = (time.perf_counter() - start) * 1e3
        # Autoencoder heads become scores here, against the inputs they reconstruct.
        out = self._heads.values(x, out)
        self.counters["batches"] += 1
        self.counters["batched_windows"] += len(batch)
        now = time.monotonic()
        drift = self.drift.observe(batch, raw, out, now) if self.drift is not None else None
        if self._observe is not None:
            # Once per batch: metrics cost nothing per message.
            self._observe(self.name, len(batch), inference_ms / 1e3,
                          [now - w.received for w in batch])
        messages = self.output.messages(batch, out, inference_ms=inference_ms, now=now)
        # One outbox transaction for the whole batch: committed before anything is released.
        # With each asset's next seq, stored in that same transaction (issue 14, finding 7).
        marks = SeqMarks(self.name, {w.asset: w.index + 1 for w in batch})
        self._submit(Predictions(messages, marks))
        if drift:  # the drift stats message, and alerts (never raises: stream.drift)
            self._submit(drift)
        self.counters["predictions"] += len(batch)  # an output may send them its own way
        if self.capture is not None:  # raw windows for retraining; never blocks, never raises
            self.capture.offer(batch, out)
        if self.shadow is not None:
            # After the primary's predictions are submitted; never raises (counted in there).
            self.shadow.run(batch, raw, out, inference_ms)

    def _reject(self, reason: str, topic: str, size: int, detail: str, *,
                window: bool = False) -> None:
        """Dead-letter a message (on TOPIC), or with WINDOW a window (pseudo-topic window:ASSET)."""
        self.dead_letters[reason] += 1
        if window:
            self._failed += 1
        elif reason != "too_large":  # refused on paho's thread: counted by health() itself
            self._dead += 1
        log.debug("pipeline %s: dead letter %s from %s (%d bytes)", self.name, reason, topic, size)
        report = dead_letter(self.name, reason, topic, size, detail)
        self._submit([Outbound(self._dlq_topic, report)])

    def health(self) -> tuple[int, int, int]:
        """(messages received, messages dead-lettered, windows whose inference failed).

        For a probation's dead-letter share: the messages counted as received are those the
        worker took from the inbox (all handled) plus those dropped or refused on arrival, so the
        dead letters between any two readings never outnumber the input between them, whatever
        was still queued at the first (a switch hands held messages to the new pipeline, a busy
        one has a backlog). Window failures (``inference_failed``, a batch's ``internal_error``)
        are counted apart: a message may complete several windows.
        """
        taken, dead, failed = self._tally
        refused = self.dead_letters["too_large"]  # paho's thread: received and refused at once
        # Also on arrival, never dead letters: shed and dropped messages count as input only.
        dropped = self.counters["dropped_inbox_full"] + self.counters["shed"]
        return taken + refused + dropped, dead + refused, failed

    def close_shadow(self) -> None:
        """Release the shadow model, if any (after the worker stopped)."""
        if self.shadow is not None:
            close_model(self.shadow.model)

    @property
    def capture(self) -> Capture | None:
        """Data capture (``floorline.edge.capture``), set by the daemon with ``capture:``."""
        return self._capture

    @capture.setter
    def capture(self, capture: Capture | None) -> None:
        # A drift alert (the pipeline's, or an asset's with per_asset) keeps the windows around
        # it, as a prediction alert does: reasons before_drift, drift, after_drift.
        self._capture = capture
        if self.drift is not None:
            self.drift.on_drift = (partial(capture.mark, "drift")
                                   if capture is not None and capture.config.drift else None)
            if capture is not None:
                # A drift mark is about the last window_s; an asset back after longer is not.
                capture.expire_s = self.drift.config.window_s

    def stats(self) -> dict[str, object]:
        """Counters for state reports and tests."""
        pending = self._windower.pending()
        out: dict[str, object] = {
            **self.counters,
            "dead_letters": dict(self.dead_letters),
            "queued": self.inbox.qsize(),
            "pending_samples": sum(pending.values()),
            "window_resets": dict(self._windower.resets),
            "duplicates": self._windower.duplicates,
        }
        if self.shedder is not None:
            out["shed_assets"] = self.shedder.shedding()[0]
        if self.drift is not None:
            out["drift"] = self.drift.document
        if self.shadow is not None:
            out.update(self.shadow.counters())
            out["shadow"] = self.shadow.document()
        if self.capture is not None:
            out.update(self.capture.counters())
        return out
