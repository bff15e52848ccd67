"""Publishing through the outbox: nothing with QoS ≥ 1 is lost to a broker outage or a crash.

Workers ``submit`` messages. QoS 1/2 messages are committed to the outbox first (one transaction
per submit, with the predictions' counters), then handed to paho in outbox id order, at most
``max_inflight`` unacknowledged at a time, and deleted when the broker's PUBACK arrives. While
disconnected, messages accumulate in the outbox (bounded by bytes and age there); after a
reconnect they go on in order. A daemon restart resends whatever the outbox still holds.

Who hands rows to paho. When nothing older waits (every earlier row handed over, no resync after
a reconnect, connected, room in flight), the submitting thread hands its own rows to paho right
after the commit, the QoS 0 messages of the same submit in their places: a prediction goes from
the worker to the network thread, which writes the whole run in one turn (one hand-off, nothing
read back). Otherwise the submit only wakes the flusher thread, which reads rows back from the
outbox (``after``) in id order: a backlog, a reconnect, a full window. What keeps the order:
every hand-over happens under ``_lock``, and only of the rows right after ``_cursor``; whichever
thread comes first hands over the oldest rows, and the other finds them handed.

Paho resends its own unacknowledged messages after a reconnect, so rows already handed to paho
are not handed over again, and nothing newer is handed over until those resends are acknowledged:
paho queues its resends on the network thread, and a newer row queued first would overtake them.
(If paho's resends are not acknowledged within ``resync_timeout`` they are handed over again,
from the outbox, in order.) Hand-overs are queued inside the transport's ``publishing()``, during
which no new connection can begin: a run that saw the connection up, and no connection newer than
the last resync (``_connects``, which ``on_connected`` raises before ``connected`` is set), lies
entirely ahead of whatever paho resends after the next reconnect.

Threads. Paho calls ``on_published`` and ``on_connected`` on its network thread with its own locks
held: they only append to ``_acked`` and count ``_connects``, never taking ``_lock`` (whose holders
call into paho). Everything else about the hand-over (``_inflight``, ``_handed``, ``_cursor``,
``_resync_until``, ``_done``, the counters) is read and written only with ``_lock`` held, by a
submitting thread or the flusher. Only the flusher thread deletes acknowledged rows and begins a
resync (which reads the outbox from the start), so the two never interleave. A thread records a
message id in the same hold of ``_lock`` as it publishes, and PUBACKs are matched under ``_lock``:
no PUBACK is seen before its row is known (so none is kept for later, where it could match a
reused id).

Delivery is at least once: a crash between the broker's PUBACK and the outbox delete resends a
message. Predictions carry (asset, seq) for consumers to de-duplicate; a pipeline submits them as
``Predictions``, which carry the assets' next ``seq`` into the same outbox transaction.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from floorline.edge.delivery.outbox import Outbox, OutMessage, SeqMarks
from floorline.edge.messages import Outbound

log = logging.getLogger(__name__)


_EXPIRE_EVERY_S = 60.0
# Acknowledged rows are deleted from the outbox together, not one transaction per PUBACK: when
# this many are due, or this long after the first. A crash in between resends them (at least
# once, as any crash between PUBACK and delete would).
_DELETE_EVERY = 64
_DELETE_AFTER_S = 0.02
_IDLE_S = 0.2  # the flusher's nap with nothing in flight (a submit or a connect wakes it)


class Predictions(list[Outbound]):
    """One batch's prediction messages, and the counters they advance (``marks``).

    A plain list to everything on the way (``Daemon.send``, taps in tests); the publisher stores
    ``marks`` in the outbox transaction that stores the messages, QoS 0 ones included (then the
    counters alone), so a prediction's ``seq`` is never used again after a restart.
    """

    __slots__ = ("marks",)

    def __init__(self, messages: Sequence[Outbound], marks: SeqMarks) -> None:
        super().__init__(messages)
        self.marks = marks


class _Transport(Protocol):
    connected: threading.Event

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> Any: ...

    def publish_tracked(self, topic: str, payload: bytes, qos: int, retain: bool) -> int | None: ...

    def publishing(self) -> AbstractContextManager[bool]: ...


class Publisher:
    """Owns the outbox and the flusher thread."""

    def __init__(self, outbox: Outbox, max_inflight: int = 100) -> None:
        self.outbox = outbox
        self._transport: _Transport | None = None
        self._max_inflight = max_inflight
        self._wake = threading.Event()
        self._stop = threading.Event()
        # Written by paho's network thread without _lock: PUBACKs, and connections made.
        self._acked: collections.deque[int] = collections.deque()
        self._connects = 0
        # The hand-over's state: _lock held for every read and write (see the module docstring).
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # paho mid → outbox id
        self._handed: set[int] = set()  # outbox ids paho holds (it resends them itself)
        self._cursor = 0  # every pending row up to this id is handed over (or skipped)
        self._resynced = 0  # _connects when the last resync began
        self._resync_until: float | None = None
        self._done: list[int] = []  # acknowledged outbox ids not yet deleted
        self._done_since = 0.0
        self._hungry = False  # the flusher waits for PUBACKs (room, resends): wake it on each
        self.resync_timeout = 5.0
        self._last_expire = time.monotonic()
        self.published = 0
        """QoS ≥ 1 outbox rows handed to paho (again after a resync timeout)."""
        self.published_direct = 0
        """Of those, handed by the submitting thread itself (no flusher turn)."""
        self.delivered = 0
        self.dropped_qos0 = 0
        self.refused = 0
        """QoS ≥ 1 messages sent with ``keep=False`` that the connection's queue had no room for
        (the broker stopped acknowledging): lost, and said so in the log."""
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def attach(self, transport: _Transport) -> None:
        """Use TRANSPORT and start flushing."""
        self._transport = transport
        self._thread.start()

    # -- any thread ---------------------------------------------------------------------

    def submit(self, messages: Sequence[Outbound], *, keep: bool = True) -> None:
        """Send MESSAGES: QoS 0 at once (dropped while disconnected), QoS ≥ 1 via the outbox.

        When nothing older waits in the outbox, the calling thread hands the messages to the
        connection itself, in their order, QoS 0 ones included; otherwise the QoS ≥ 1 ones wait
        for the flusher and QoS 0 ones go at once (ahead of them).

        With KEEP false, QoS ≥ 1 messages skip the outbox and go to the connection's own queue
        (resent after a reconnect, not after a restart): for a retained state that the next
        connection replaces anyway, outbox space and a resend after a restart would be waste.
        That queue is bounded (the transport's: 1000 unacknowledged messages); one refused there
        is counted in ``refused`` and logged.

        ``Predictions`` also store their counters, in the same transaction as their messages.

        Any thread; nothing here writes to the network (the transport's network thread does).
        """
        durable = [m for m in messages if m.qos > 0] if keep else []
        marks = messages.marks if isinstance(messages, Predictions) else None
        ids: list[int] = []
        if durable or marks is not None:
            # Before any QoS 0 send below: a prediction's counter is stored before it can arrive.
            ids = self.outbox.put_many(durable, marks)
        t = self._transport
        start = 0
        if durable and t is not None and len(ids) == len(durable):
            start = self._hand_over(t, messages, ids)
            if start == len(messages):
                return
        for topic, payload, qos, retain in messages[start:] if start else messages:
            if qos == 0:
                if t is not None and t.connected.is_set():
                    t.publish(topic, payload, 0, retain)
                else:
                    self.dropped_qos0 += 1
            elif not keep and t is not None and (
                t.publish_tracked(topic, payload, qos, retain) is None
            ):
                self.refused += 1
                log.warning("publisher: the connection's queue is full (the broker is not "
                            "acknowledging); message to %s dropped", topic)
        if durable:
            self._wake.set()

    def _hand_over(self, t: _Transport, messages: Sequence[Outbound], ids: list[int]) -> int:
        """Hand MESSAGES (their QoS ≥ 1 ones just put as IDS) to paho now if nothing older waits.

        Rows another thread committed just before (it has not reached this point yet) are
        handed over first, in id order; that thread then finds them handed. Returns how many of
        MESSAGES were handed over, from the first: all of them, none (the flusher's turn: a
        backlog, a resync, no connection, no room), or those before one paho's full queue
        refused.
        """
        with self._lock:
            self._settle_acks()
            older = self._older(ids)
            if older is None:
                return 0
            with t.publishing() as up:
                # Read after `up`: a connection made since the check above counts here.
                if not up or self._connects != self._resynced:
                    return 0
                for row in older:
                    mid = t.publish_tracked(row.topic, row.payload, row.qos, row.retain)
                    if mid is None:
                        return 0  # paho's queue is full: the flusher takes it from here
                    self._track(mid, row.id)
                    self.published_direct += 1
                mine = iter(ids)
                for i, (topic, payload, qos, retain) in enumerate(messages):
                    if qos == 0:
                        t.publish(topic, payload, 0, retain)
                        continue
                    mid = t.publish_tracked(topic, payload, qos, retain)
                    if mid is None:
                        return i
                    self._track(mid, next(mine))
                    self.published_direct += 1
                return len(messages)

    def _older(self, ids: list[int]) -> list[OutMessage] | None:
        """The rows to hand over ahead of IDS (``_lock`` held); None if it is not our turn.

        None: a resync is due or running, there is no room for all, IDS were handed over already
        (by the flusher or another submit), or what lies between ``_cursor`` and them is more than
        fits (a backlog: the flusher's).
        """
        room = self._max_inflight - len(self._inflight) - len(ids)
        if self._resync_until is not None or self._connects != self._resynced or room < 0:
            return None
        if ids[0] == self._cursor + 1:
            return []
        if ids[0] <= self._cursor:
            return None
        rows = self.outbox.after(self._cursor, room + 1)
        older = [row for row in rows if row.id < ids[0]]
        return older if len(older) < len(rows) else None

    def on_published(self, mid: int) -> None:
        """Paho's PUBACK callback (network thread, paho locks held): only queue the id.

        Paho also reports its QoS 0 messages here, once written; their ids match no row.
        """
        self._acked.append(mid)
        if self._hungry:
            self._wake.set()

    def on_connected(self) -> None:
        """After a (re)connect, before ``connected`` is set: let paho's resends land first.

        Network thread, paho locks held: counts the connection and wakes the flusher, which
        begins the resync. Until it has, no thread hands a row over.
        """
        self._connects += 1
        self._hungry = True  # the resync waits for PUBACKs of paho's resends
        self._wake.set()

    def wait_empty(self, timeout: float) -> bool:
        """Block until the outbox is empty (all delivered) or TIMEOUT passed."""
        deadline = time.monotonic() + timeout
        while self.outbox.depth() > 0:
            if time.monotonic() >= deadline:
                return False
            self._wake.set()
            time.sleep(0.01)
        return True

    def stop(self) -> None:
        """Stop the flusher; undelivered messages stay in the outbox for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if not self._thread.is_alive():
            with self._lock:
                self._settle_acks()
                done = self._take_done(force=True)
            self.outbox.ack_many(done)
        self.outbox.close()

    # -- with _lock held ------------------------------------------------------------------

    def _track(self, mid: int, row: int) -> None:
        self._inflight[mid] = row
        self._handed.add(row)
        self._cursor = row
        self.published += 1

    def _settle_acks(self) -> None:
        acked, inflight = self._acked, self._inflight
        while acked:
            row = inflight.pop(acked.popleft(), None)
            if row is None:
                continue  # a QoS 0 message's, a keep=False one's, or from before a resync
            self._handed.discard(row)
            if not self._done:
                self._done_since = time.monotonic()
            self._done.append(row)
            self.delivered += 1

    def _take_done(self, *, force: bool) -> list[int]:
        """The acknowledged rows to delete now (all with FORCE, else when enough are due)."""
        done = self._done
        if done and (
            force
            or len(done) >= _DELETE_EVERY
            or time.monotonic() - self._done_since >= _DELETE_AFTER_S
        ):
            self._done = []
            return done
        return []

    # -- flusher thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self._acked or self._done or self._inflight
            self._wake.wait(_DELETE_AFTER_S if busy else _IDLE_S)
            self._wake.clear()
            try:
                with self._lock:
                    self._settle_acks()
                    self._flush()
                    done = self._take_done(force=False)
                # Outside the lock: submitting threads need not wait for a delete.
                self.outbox.ack_many(done)
                now = time.monotonic()
                if now - self._last_expire > _EXPIRE_EVERY_S:
                    self._last_expire = now
                    self.outbox.expire()
            except Exception:  # the flusher must outlive any one bad turn
                log.exception("publisher: flush failed; retrying")
                self._stop.wait(1.0)

    def _flush(self) -> None:
        """Hand over what follows ``_cursor``, in id order (``_lock`` held, flusher thread)."""
        t = self._transport
        if t is None or not t.connected.is_set():
            return
        if self._connects != self._resynced:
            # A new connection: read from the start again, skipping what paho holds.
            self._resynced = self._connects
            self._cursor = 0
            self._resync_until = time.monotonic() + self.resync_timeout
        if self._resync_until is not None:
            # Reading from the start again: acknowledged rows must be gone by then.
            self.outbox.ack_many(self._take_done(force=True))
            if self._handed and time.monotonic() < self._resync_until:
                self._hungry = True
                return  # paho is resending older messages; newer ones must not overtake them
            if self._handed:
                log.warning("publisher: %d resends unacknowledged after reconnect; resending "
                            "them from the outbox", len(self._handed))
                self._handed.clear()
                self._inflight.clear()
            self._resync_until = None
        self._hungry = True  # until it finds nothing more to hand over
        room = self._max_inflight - len(self._inflight)
        while room > 0:
            # Rows paho already holds (it resends them itself after a reconnect) are skipped.
            rows = self.outbox.after(self._cursor, room + len(self._handed))
            if not rows:
                self._hungry = False
                return
            with t.publishing() as up:
                if not up or self._connects != self._resynced:
                    return  # the connection dropped or came back: resync first, next turn
                for row in rows:
                    if row.id in self._handed:
                        self._cursor = row.id
                        continue
                    if room <= 0:
                        return
                    mid = t.publish_tracked(row.topic, row.payload, row.qos, row.retain)
                    if mid is None:
                        return  # paho's queue is full; this row and the rest go next turn
                    self._track(mid, row.id)
                    room -= 1
