"""A pipeline run by N worker processes (``workers: N``, N > 1; docs/workers.md).

The daemon process (the *reader*) keeps the MQTT connection, routing, the outbox and the
publisher. A ``WorkerPipeline`` is a ``Pipeline`` whose stages run in N child processes instead
of a thread: each message goes to the worker ``crc32(asset) % N`` (the asset from the topic, so
one asset always meets the same worker, windower and socket), in runs of up to ``_RUN``
messages per hand-off of the worker's sender thread (pickled as columns). A worker decodes,
windows, batches, infers and encodes as the thread does, and sends back one frame per turn:
what the pipeline submitted (finished predictions and dead letters, as columns of topics and
payload bytes; each asset's next seq) plus a counter snapshot. One results thread in the reader
takes the frames of all workers that arrived together and hands them to ``Daemon.send`` in
order, in runs of up to ``_SUBMIT`` messages (one outbox transaction and one publish run each).
So the reader stays the only writer of the outbox and its seq table, an asset's predictions
keep their order, and the reader's work per message is that of MQTT and the outbox, not of a
hand-off per message or per batch (docs/workers.md, "Throughput").

How children start: forked after the bundle is loaded when the reader runs no other thread (a
fork copies the loaded model, shared until written); otherwise (a reload, a fleet push, an
in-process test) spawned: a fresh interpreter that loads and self-tests the bundle again, ~1-2 s
and a full model's memory per worker. A fork from a process whose threads run could inherit a
lock another thread held (stdio buffers, a runtime's pool) and hang; a spawn cannot.

Refused with ``workers > 1`` (``PipelineConfig``): ``ack: durable``, ``asset.payload``, ``shadow``,
``threads > 1``, sparkplug decoders and outputs. Overload: a full per-worker queue drops the
newest messages (``dropped_inbox_full``); assets are not shed whole.

Drift detection (``drift``, floorline.edge.stream.drift): the pipeline has one monitor, the
reader's. A worker's monitor only counts its windows' bins and sends the count deltas up in its
report's snapshot (``"drift"``, per time bucket, only when it counted any); the reader's monitor
adds them, judges, publishes the stats and alerts. Its verdict (the pipeline's flag, the drifting
assets with ``per_asset``) goes down to each worker in a small ``_DRIFT`` message, before the next
input run, whenever it changed: predictions are flagged one hand-off after the evaluation.

A worker that dies (killed, crashed) makes ``failure`` say so and the daemon ``degraded``; what it
held (its queue, its socket, its partial windows) is lost, as a crash loses them in receipt mode,
and later messages of its assets are dropped and counted (``dropped_worker_dead``) until a restart.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from itertools import repeat
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from pathlib import Path
from typing import Any

from floorline.edge.config.model import Config, PipelineConfig
from floorline.edge.daemon.inbox import Inbox
from floorline.edge.daemon.pipeline import Pipeline, Submit, _queued_bytes
from floorline.edge.delivery.outbox import SeqMarks
from floorline.edge.delivery.publisher import Predictions
from floorline.edge.errors import FloorlineError
from floorline.edge.messages import Inbound, Outbound
from floorline.edge.stream.drift import Verdict

log = logging.getLogger(__name__)

_RUN = 256  # messages the sender takes from a worker's queue per hand-off
_LINGER_S = 0.002  # a run shorter than _RUN waits this long for more (added latency, at most)
_HEARTBEAT_S = 1.0  # an idle worker reports at least this often
_STALL_S = 30.0  # a worker with input outstanding and no report for this long is stalled
_STOP = b"STOP"
_IN = "in"  # a frame of input: (_IN, topics, payloads, received)
_DRIFT = "drift"  # the reader's drift verdict, when it changed: (_DRIFT, (drifting, assets))
_MERGE = 512  # messages the reader takes at most in one go (frames that arrived together)
_SUBMIT = 64  # messages per submit: one outbox transaction and one publish run each
_NEW: Any = tuple.__new__
"""``_NEW(Outbound, row)`` builds a named tuple in C: what ``Outbound._make`` calls, no frame."""
READY_S = 120.0
"""How long a worker may take to load its pipeline (a spawned one loads the bundle again)."""

_PARENT_ENDS: list[Connection] = []
"""The reader's ends of every live worker's socket: a forked child closes its copies, so each
worker sees end-of-file when the reader dies (and then exits)."""


class Sink:
    """Where a pipeline's messages go: the daemon's ``send`` here, a frame in a worker.

    A worker's frame is flat: every message of a turn in submit order, as columns (topics,
    payloads, QoS, retain: pickled as four lists, not one object per message), and each asset's
    latest next ``seq`` over the turn's batches. The reader commits and publishes what frames
    bring in runs of up to ``_SUBMIT`` messages, however many batches made them.
    """

    def __init__(self, target: Submit | None) -> None:
        self.target = target
        self.topics: list[str] = []
        self.payloads: list[bytes] = []
        self.qos: list[int] = []
        self.retain: list[bool] = []
        self.marks: dict[str, int] | None = None
        """Asset → next seq over the frame's ``Predictions``; None when it carries none."""
        self.batches: list[tuple[str, int, float, list[float]]] = []

    def __call__(self, messages: Sequence[Outbound]) -> None:
        """Submit MESSAGES (a batch's ``Predictions`` keep their seq marks)."""
        if self.target is not None:
            self.target(messages)
            return
        for topic, payload, qos, retain in messages:
            self.topics.append(topic)
            self.payloads.append(payload)
            self.qos.append(qos)
            self.retain.append(retain)
        if isinstance(messages, Predictions):
            if self.marks is None:
                self.marks = {}
            # Later batches carry higher numbers: the last one per asset is the frame's.
            self.marks.update(messages.marks.next_seq)

    def take(self) -> tuple[list[str], list[bytes], list[int], list[bool],
                            dict[str, int] | None, list[tuple[str, int, float, list[float]]]]:
        """The frame's columns, marks and batch metrics; the sink starts a new frame."""
        out = (self.topics, self.payloads, self.qos, self.retain, self.marks, self.batches)
        self.topics, self.payloads, self.qos, self.retain = [], [], [], []
        self.marks, self.batches = None, []
        return out

    def pending(self) -> bool:
        """Whether the frame holds anything to send."""
        return bool(self.topics or self.marks is not None or self.batches)

    def observe(self, name: str, size: int, seconds: float, e2e: list[float]) -> None:
        """A batch's metrics, sent back with the frame (``Metrics.observe_batch`` in the reader)."""
        self.batches.append((name, size, seconds, e2e))


def build_template(config: Config, pc: PipelineConfig, model: Any, sink: Sink,
                   cls: type[Pipeline]) -> Pipeline:
    """The pipeline object every worker runs a copy of (receipt mode: no journal, no acks)."""
    return cls(pc, gateway=config.gateway.id, topics=config.topics, limits=config.limits,
               model=model, submit=sink, observe=sink.observe, restore=False)


class _Worker:
    """The reader's view of one worker process."""

    def __init__(self, index: int, limits_size: int, limits_bytes: int) -> None:
        self.index = index
        self.queue: Inbox[Inbound] = Inbox(limits_size, limits_bytes, _queued_bytes)
        self.process: Any = None
        self.conn: Connection | None = None
        self.sent = 0  # messages handed to the socket
        self.taken = 0  # messages the worker reported handled
        self.last_report = time.monotonic()
        self.snapshot: dict[str, Any] = {}
        self.states: dict[str, bytes] = {}
        self.done = threading.Event()
        self.death: str | None = None
        self.stopping = False
        self.send_lock = threading.Lock()
        self.verdict_sent = 0  # the version of the reader's drift verdict this worker was sent

    def outstanding(self) -> int:
        return self.queue.qsize() + self.sent - self.taken


class WorkerPipeline(Pipeline):
    """A pipeline whose stages run in ``config.workers`` processes (see the module docstring)."""

    def __init__(self, config: Config, pc: PipelineConfig, model: Any, send: Submit,
                 observe: Any, state_dir: Path, store_max_bytes: int) -> None:
        self.sink = Sink(send)
        """Where the pipeline's messages go: the reader's publish path, or in a worker process
        the frame being collected for the reader."""
        super().__init__(pc, gateway=config.gateway.id, topics=config.topics,
                         limits=config.limits, model=model, submit=self.sink,
                         observe=self.sink.observe, restore=False)
        self._full_config = config
        self._index = next(i for i, p in enumerate(config.pipelines) if p.name == pc.name)
        self._metrics_observe = observe
        self._state_dir = state_dir
        self._store_max = store_max_bytes
        n = pc.workers
        self._workers = [_Worker(i, max(1, config.limits.inbox_size // n),
                                 max(1, config.limits.inbox_bytes // n)) for i in range(n)]
        self._parts: dict[str, int] = {}
        self._floors: dict[str, int] = {}
        self._adopted: dict[str, bytes] = {}
        self._started = False
        self._ready = False
        self._stopped = False
        self._verdict: Verdict = (False, frozenset())
        self._verdict_version = 0  # bumped by the results thread, read by the senders
        self._senders: list[threading.Thread] = []
        self._readers: list[threading.Thread] = []
        self.start_method = ""
        """fork or spawn, once started."""

    # -- partition --------------------------------------------------------------------------

    def _part(self, topic: str) -> int:
        part = self._parts.get(topic)
        if part is None:
            asset = self._asset_of(topic)
            part = self._owner(asset) if asset else 0
            if len(self._parts) < 100_000:
                self._parts[topic] = part
        return part

    def _owner(self, asset: str) -> int:
        return zlib.crc32(asset.encode()) % len(self._workers)

    # -- paho's thread ----------------------------------------------------------------------

    def offer_many(self, items: list[Inbound]) -> None:
        """Queue ITEMS for their assets' workers; what a full queue cannot hold is dropped."""
        self.counters["received"] += len(items)
        workers = self._workers
        split: list[list[Inbound]] = [[] for _ in workers]
        parts, find = self._parts, self._part
        for item in items:
            n = parts.get(item[0])  # inline: one dict look-up per message, no call
            split[find(item[0]) if n is None else n].append(item)
        for w, part in zip(workers, split, strict=True):
            if not part:
                continue
            if w.death is not None:
                self.counters["dropped_worker_dead"] += len(part)
                continue
            rest = w.queue.put_many(part)
            if rest:
                self._dropped(rest)

    # -- lifecycle --------------------------------------------------------------------------

    def seed_seqs(self, floors: dict[str, int]) -> None:
        """Never number a new window below FLOORS[asset]: sent to every worker as it starts."""
        self._floors.update(floors)

    def adopt_windows(self, states: dict[str, bytes]) -> None:
        """Continue partial windows STATES: each sent to its asset's worker as it starts."""
        self._adopted.update(states)

    def launch(self) -> None:
        """Start the worker processes: forked when no other thread runs here, else spawned.

        ``Generation.start`` launches every pipeline's processes before it starts any thread.
        """
        if self.start_method:
            return
        fork = threading.active_count() == 1
        self.start_method = "fork" if fork else "spawn"
        ctx: Any = multiprocessing.get_context(self.start_method)
        for w in self._workers:
            parent, child = ctx.Pipe(duplex=True)
            if fork:
                target: Any = _fork_main
                args: tuple[Any, ...] = (self, child, parent)
            else:
                target = _spawn_main
                args = (self._full_config, self._index, self._state_dir, self._store_max, child)
            proc = ctx.Process(target=target, args=args, name=f"floorline-{self.name}-{w.index}",
                               daemon=False)
            proc.start()
            child.close()
            w.process, w.conn = proc, parent
            _PARENT_ENDS.append(parent)
        log.info("pipeline %s: %d worker processes (%s): %s", self.name, len(self._workers),
                 self.start_method, ", ".join(str(w.process.pid) for w in self._workers))

    def wait_ready(self, timeout: float | None = None) -> str | None:
        """Wait until every worker loaded its pipeline; why one did not, or None.

        A spawned worker loads and self-tests the bundle itself: a reload waits for this before
        it switches, so a worker that cannot load refuses the configuration, the old one serving.
        """
        if self._ready:
            return None
        self.launch()
        timeout = READY_S if timeout is None else timeout
        deadline = time.monotonic() + timeout
        for w in self._workers:
            conn = w.conn
            assert conn is not None  # noqa: S101
            try:
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    return (f"pipeline {self.name}: worker {w.index} (pid {w.process.pid}) not "
                            f"ready within {timeout:g} s")
                conn.recv_bytes()  # the "ready" frame
            except (EOFError, OSError):
                w.process.join(5.0)
                return (f"pipeline {self.name}: worker {w.index} (pid {w.process.pid}) ended "
                        f"while loading its pipeline (exit {w.process.exitcode}); see its log")
            w.last_report = time.monotonic()
        self._ready = True
        return None

    def start(self) -> None:
        """Launch the processes (if not yet), then the threads that feed them and read them."""
        reason = self.wait_ready()
        if reason is not None:
            raise FloorlineError(reason)
        for w in self._workers:
            assert w.conn is not None  # noqa: S101
            states = {a: s for a, s in self._adopted.items() if self._owner(a) == w.index}
            w.conn.send_bytes(pickle.dumps(("setup", self._floors, states), protocol=5))
        for w in self._workers:
            t = threading.Thread(target=self._send_loop, args=(w,), daemon=True,
                                 name=f"pipeline-{self.name}-send-{w.index}")
            t.start()
            self._senders.append(t)
        t = threading.Thread(target=self._result_loop, daemon=True,
                             name=f"pipeline-{self.name}-results")
        t.start()
        self._readers.append(t)
        self._started = True

    def _send_loop(self, w: _Worker) -> None:
        conn = w.conn
        assert conn is not None  # noqa: S101
        while True:
            items = w.queue.get_many(_RUN, timeout=0.1)
            if 0 < len(items) < _RUN and not w.stopping:
                # A short run: let the network thread's next reads join it. Each hand-off wakes
                # this thread, the worker and its reply: one per read would cost the reader
                # more than the messages' own work (docs/workers.md).
                time.sleep(_LINGER_S)
                items += w.queue.get_many(_RUN - len(items), timeout=0)
            if w.verdict_sent != self._verdict_version and w.death is None:
                self._send_verdict(w, conn)  # before the run: its predictions are flagged by it
            if items:
                # Columns, not one pickled Inbound per message: (topics, payloads, received).
                # Topics repeat, and pickle writes each shared str once per frame.
                topics, payloads, received, _tokens = zip(*items, strict=True)
                try:
                    with w.send_lock:
                        conn.send_bytes(pickle.dumps((_IN, topics, payloads, received),
                                                     protocol=5))
                        w.sent += len(items)
                except (OSError, ValueError):
                    self.counters["dropped_worker_dead"] += len(items)
            elif w.stopping or w.death is not None:
                break
        if w.death is None:
            with contextlib.suppress(OSError, ValueError):
                conn.send_bytes(_STOP)

    def _send_verdict(self, w: _Worker, conn: Connection) -> None:
        """The reader's drift verdict to W (its own assets of the drifting ones), on W's sender.

        Sent by the sender thread, never by the results thread: that one must keep reading, or
        a worker blocked writing its report would never read this.
        """
        version, (drifting, assets) = self._verdict_version, self._verdict
        mine = frozenset(a for a in assets if self._owner(a) == w.index)
        try:
            with w.send_lock:
                conn.send_bytes(pickle.dumps((_DRIFT, (drifting, mine)), protocol=5))
        except (OSError, ValueError):
            return  # its death is seen by the results thread
        w.verdict_sent = version

    def _judge_drift(self, frames: list[tuple[Any, ...]]) -> None:
        """Add FRAMES' drift counts to the pipeline's monitor; send what it says; new verdict."""
        drift = self.drift
        if drift is None:
            return
        out: list[Outbound] = []
        for frame in frames:
            counts = frame[-2].pop("drift", None)  # the snapshot's
            if counts:
                out += drift.merge(counts, time.monotonic())
        if not out:  # no evaluation: the verdict is unchanged
            return
        self.sink(out)  # after the frames' predictions: the stats message, alerts
        verdict = drift.verdict()
        if verdict != self._verdict:
            self._verdict = verdict
            self._verdict_version += 1

    def _result_loop(self) -> None:
        """Every worker's frames, on one thread: what arrived together goes out together.

        One thread for all workers, not one each: fewer threads taking turns at the reader's
        GIL, and frames from several workers committed and published in one run.
        """
        live = {w.conn: w for w in self._workers if w.conn is not None}
        while live:
            got: list[tuple[Connection, list[tuple[Any, ...]]]] = []
            ended: list[Connection] = []
            held = 0
            for conn in wait_any(list(live), timeout=_HEARTBEAT_S):
                assert isinstance(conn, Connection)  # noqa: S101
                frames: list[tuple[Any, ...]] = []
                try:
                    # Frames that arrived meanwhile go with the first: bounded, so the outbox's
                    # in-memory tail still holds them when the publisher reads them back.
                    while True:
                        frames.append(pickle.loads(conn.recv_bytes()))  # noqa: S301 - our child
                        held += len(frames[-1][1])
                        if held >= _MERGE or not conn.poll(0):
                            break
                except (EOFError, OSError):
                    ended.append(conn)  # after what was read is sent: it came before the end
                got.append((conn, frames))
            everything = [f for _, frames in got for f in frames]
            if everything:
                self._deliver(everything)
                self._judge_drift(everything)
            for conn, frames in got:
                w = live[conn]
                for kind, *_columns, snapshot, states in frames:
                    w.snapshot = snapshot
                    w.taken = snapshot["taken"]
                    w.last_report = time.monotonic()
                    self.last_progress = w.last_report
                    if kind == "final":
                        w.states = states
                        w.done.set()
            for conn in ended:
                w = live[conn]
                if not w.done.is_set():
                    self._died(w)
            for conn, _frames in got:
                if live[conn].done.is_set():  # its final frame, or its end
                    del live[conn]

    def _died(self, w: _Worker) -> None:
        """W's socket ended without its final frame: the process died (or was killed)."""
        w.process.join(1.0)
        code = w.process.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit {code}"
        w.death = f"worker {w.index} (pid {w.process.pid}) died: {how}"
        lost = w.outstanding()
        # Killed by stop() after its drain deadline: said there already, not a crash.
        level = logging.WARNING if self._stopped else logging.CRITICAL
        log.log(level, "pipeline %s: %s; %d messages it held are lost", self.name, w.death, lost)
        self.counters["lost_worker_dead"] += lost
        w.done.set()

    def _deliver(self, frames: list[tuple[Any, ...]]) -> None:
        """FRAMES' messages, in order, to the publish path in runs; their batch metrics."""
        if len(frames) == 1:
            _kind, topics, payloads, qos, retain, marks, batches = frames[0][:7]
        else:
            topics, payloads, qos, retain, marks, batches = [], [], [], [], None, []
            for frame in frames:
                topics += frame[1]
                payloads += frame[2]
                qos += frame[3]
                retain += frame[4]
                if frame[5] is not None:
                    marks = {**marks, **frame[5]} if marks is not None else frame[5]
                batches += frame[6]
        messages: list[Outbound] = list(map(_NEW, repeat(Outbound),
                                            zip(topics, payloads, qos, retain, strict=True)))
        # In runs the publisher can hand to the connection at once (within its in-flight
        # window); the first carries every counter the frames advanced, so no seq can be
        # published before it is stored (a number skipped after a crash is allowed, a repeat
        # is not).
        for at in range(0, max(len(messages), 1), _SUBMIT):
            run = messages[at:at + _SUBMIT]
            if marks is not None:
                self.sink(Predictions(run, SeqMarks(self.name, marks)))
                marks = None
            elif run:
                self.sink(run)
        if self._metrics_observe is not None:
            for batch in batches:
                self._metrics_observe(*batch)

    def stop(self, *, drain_all: bool = False) -> None:
        """Workers finish what they were sent, flush their last batch and exit; then reaped."""
        if self._stopped:
            return
        self._stopped = True
        if not self.start_method:
            return
        if not self._started:  # launched for a switch that did not happen: nothing to drain
            for w in self._workers:
                w.process.kill()
                w.process.join(5.0)
                if w.conn is not None:
                    with contextlib.suppress(ValueError):
                        _PARENT_ENDS.remove(w.conn)
                    w.conn.close()
            return
        for w in self._workers:
            w.stopping = True
        deadline = None if drain_all else time.monotonic() + self._drain_s + 2.0
        for w in self._workers:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not w.done.wait(left):
                log.warning("pipeline %s: worker %d did not drain within %.1fs; killed",
                            self.name, w.index, self._drain_s)
        for w in self._workers:
            proc = w.process
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
            for t in (*self._senders, *self._readers):
                t.join(1.0)
            if w.conn is not None:
                with contextlib.suppress(ValueError):
                    _PARENT_ENDS.remove(w.conn)
                w.conn.close()

    def is_alive(self) -> bool:
        """Whether every worker process runs."""
        return self._started and all(w.process.is_alive() for w in self._workers)

    def failure(self) -> str | None:
        """A worker that died, or one with input outstanding and no report for 30 s."""
        if not self._started or self._stopped:
            return None
        now = time.monotonic()
        for w in self._workers:
            if w.death is not None:
                return f"pipeline {self.name}: {w.death}"
            if now - w.last_report > _STALL_S and w.outstanding() > 0:
                return (f"pipeline {self.name}: worker {w.index} (pid {w.process.pid}) stalled "
                        f"(input queued, no report for {_STALL_S:g} s)")
        return None

    def window_states(self) -> dict[str, bytes]:
        """Every worker's partial windows, as the last frame of each brought them (after stop)."""
        out: dict[str, bytes] = {}
        for w in self._workers:
            out.update(w.states)
        return out

    # -- reports ----------------------------------------------------------------------------

    def health(self) -> tuple[int, int, int]:
        """As ``Pipeline.health``, summed over the workers' last reports."""
        taken = dead = failed = 0
        for w in self._workers:
            t, d, f = w.snapshot.get("tally", (0, 0, 0))
            taken, dead, failed = taken + t, dead + d, failed + f
        refused = self.dead_letters["too_large"]
        dropped = (self.counters["dropped_inbox_full"] + self.counters["shed"]
                   + self.counters["dropped_worker_dead"])
        return taken + refused + dropped, dead + refused, failed

    def stats(self) -> dict[str, object]:
        """The reader's counters plus every worker's last reported ones."""
        counters: Counter[str] = Counter(self.counters)
        dead_letters: Counter[str] = Counter(self.dead_letters)
        resets: Counter[str] = Counter()
        pending = duplicates = 0
        per_worker = []
        for w in self._workers:
            snap = w.snapshot
            counters.update(snap.get("counters", {}))
            dead_letters.update(snap.get("dead_letters", {}))
            resets.update(snap.get("window_resets", {}))
            pending += snap.get("pending_samples", 0)
            duplicates += snap.get("duplicates", 0)
            per_worker.append({"pid": w.process.pid if w.process else None,
                               "alive": bool(w.process and w.process.is_alive()),
                               "queued": w.outstanding(), "death": w.death})
        return {
            **counters,
            "dead_letters": dict(dead_letters),
            "queued": sum(w.outstanding() for w in self._workers),
            "pending_samples": pending,
            "window_resets": dict(resets),
            "duplicates": duplicates,
            "workers": per_worker,
            # The pipeline's one monitor, fed by every worker's counts (as with one process).
            **({"drift": self.drift.document} if self.drift is not None else {}),
        }


# -- the child's side -----------------------------------------------------------------------


def _fork_main(template: WorkerPipeline, conn: Connection, parent: Connection) -> None:
    # The reader's ends of this and earlier workers' sockets: closed here, so that each worker
    # sees end-of-file once the reader is gone.
    parent.close()
    for other in _PARENT_ENDS:
        with contextlib.suppress(OSError):
            os.close(other.fileno())
    # This process's copy of the sink (the decoder and the pipeline hold it): collect, not send.
    sink = template.sink
    sink.target = None
    sink.take()
    _serve(template, sink, conn)


def _spawn_main(config: Config, index: int, state_dir: Path, store_max: int,
                conn: Connection) -> None:
    from floorline.edge.bundle.store import BundleStore  # noqa: PLC0415
    from floorline.edge.daemon.models import load_model  # noqa: PLC0415

    pc = config.pipelines[index]
    store = None
    with contextlib.suppress(OSError):
        store = BundleStore(state_dir / "bundles", store_max)
    model = load_model(config, pc, store)
    sink = Sink(None)
    _serve(build_template(config, pc, model, sink, Pipeline), sink, conn)


def _serve(pipeline: Pipeline, sink: Sink, conn: Connection) -> None:
    """The worker loop: the pipeline's stages on what the reader sends; reports after each turn."""
    # The reader drives shutdown (Ctrl-C and systemd's SIGTERM reach the whole group).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if pipeline.drift is not None:
        pipeline.drift.as_worker()  # counts up to the reader, flags from its verdict
    _report(conn, "ready", pipeline, sink, {})
    last = 0.0
    while True:
        timeout = pipeline.batch_timeout()
        wait = _HEARTBEAT_S if timeout is None else min(timeout, _HEARTBEAT_S)
        stop = False
        try:
            if conn.poll(wait):
                data = conn.recv_bytes()
                if data == _STOP:
                    stop = True
                else:
                    msg = pickle.loads(data)  # noqa: S301 - from the reader that forked us
                    if msg[0] == _IN:  # (_IN, topics, payloads, received)
                        pipeline.process(list(map(_NEW, repeat(Inbound), zip(
                            msg[1], msg[2], msg[3], repeat(None), strict=False))))
                    elif msg[0] == _DRIFT:  # the reader's verdict, (drifting, assets)
                        if pipeline.drift is not None:
                            pipeline.drift.set_verdict(msg[1])
                    else:  # ("setup", floors, states)
                        # Pipeline's own: a forked WorkerPipeline overrides them for the reader.
                        Pipeline.seed_seqs(pipeline, msg[1])
                        Pipeline.adopt_windows(pipeline, msg[2])
        except (EOFError, OSError):
            os._exit(0)  # the reader is gone: nothing to report to
        pipeline.tick()
        if stop:
            pipeline.flush()
            _report(conn, "final", pipeline, sink, Pipeline.window_states(pipeline))
            break
        now = time.monotonic()
        if sink.pending() or now - last >= _HEARTBEAT_S:
            _report(conn, "turn", pipeline, sink, {})
            last = now
    conn.close()
    os._exit(0)  # no finalizers: the reader's sqlite handles and threads are not ours


def _report(conn: Connection, kind: str, pipeline: Pipeline, sink: Sink,
            states: dict[str, bytes]) -> None:
    snapshot = pipeline.snapshot()
    if pipeline.drift is not None:
        counts = pipeline.drift.take_counts()  # numpy arrays, only when it counted windows
        if counts:
            snapshot["drift"] = counts
    frame = (kind, *sink.take(), snapshot, states)
    try:
        conn.send_bytes(pickle.dumps(frame, protocol=5))
    except OSError:
        os._exit(0)
