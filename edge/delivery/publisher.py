"""Publishing through the outbox: nothing with QoS ≥ 1 is lost to a broker outage or a crash.

Workers ``submit`` messages. QoS 1/2 messages are committed to the outbox first, then a flusher
thread publishes them in outbox order, at most ``max_inflight`` unacknowledged at a time, and
deletes each when the broker's PUBACK arrives. While disconnected, messages accumulate in the
outbox (bounded by bytes and age there); after a reconnect the flusher continues in order. A
daemon restart resends whatever the outbox still holds.

Paho resends its own unacknowledged messages after a reconnect, so rows already handed to paho
are not handed over again, and nothing newer is sent until those resends are acknowledged: paho
resends from its network thread while this one could already be sending newer rows, and the
broker would then see them out of order. (If paho's resends are not acknowledged within
``resync_timeout`` they are handed over again, from the outbox, in order.) The mapping from
paho's message id to outbox row lives here, updated only on the flusher thread (paho calls
``on_published`` with its own locks held, so that callback only appends to a queue).

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
from typing import Any, Protocol

from floorline.edge.delivery.outbox import Outbox, SeqMarks
from floorline.edge.messages import Outbound

log = logging.getLogger(__name__)


_EXPIRE_EVERY_S = 60.0
# Acknowledged rows are deleted from the outbox together, not one transaction per PUBACK: when
# this many are due, or this long after the first. A crash in between resends them (at least
# once, as any crash between PUBACK and delete would).
_DELETE_EVERY = 64
_DELETE_AFTER_S = 0.02


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


class Publisher:
    """Owns the outbox and the flusher thread."""

    def __init__(self, outbox: Outbox, max_inflight: int = 100) -> None:
        self.outbox = outbox
        self._transport: _Transport | None = None
        self._max_inflight = max_inflight
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._acked: collections.deque[int] = collections.deque()
        self._inflight: dict[int, int] = {}  # paho mid → outbox id; flusher thread only
        self._handed: set[int] = set()  # outbox ids paho holds; flusher thread only
        self._early: dict[int, float] = {}  # PUBACKs seen before their mid was recorded
        self._done: list[int] = []  # acknowledged outbox ids not yet deleted; flusher thread only
        self._done_since = 0.0
        self._cursor = 0
        self._resync_until: float | None = None
        self.resync_timeout = 5.0
        self._last_expire = time.monotonic()
        self.published = 0
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
        if durable or marks is not None:
            # Before any QoS 0 send below: a prediction's counter is stored before it can arrive.
            self.outbox.put_many(durable, marks)
        t = self._transport
        for topic, payload, qos, retain in messages:
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

    def on_published(self, mid: int) -> None:
        """Paho's PUBACK callback (network thread, paho locks held): only queue the id."""
        # Every PUBACK wakes the flusher: waking it only in bulk was measured cheaper, but it
        # made flush turns longer, and a long turn that straddles a reconnect can send a new
        # message ahead of paho's resends of older ones (tests/test_faults.py caught it).
        self._acked.append(mid)
        self._wake.set()

    def on_connected(self) -> None:
        """After a (re)connect: let paho's resends land, then continue in outbox order."""
        self._cursor = 0
        self._resync_until = time.monotonic() + self.resync_timeout
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
            self._settle_acks()
            self._delete_done(force=True)
        self.outbox.close()

    # -- flusher thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(_DELETE_AFTER_S if self._acked or self._done else 0.2)
            self._wake.clear()
            try:
                self._settle_acks()
                self._delete_done(force=False)
                self._flush()
                now = time.monotonic()
                if now - self._last_expire > _EXPIRE_EVERY_S:
                    self._last_expire = now
                    self.outbox.expire()
            except Exception:  # the flusher must outlive any one bad turn
                log.exception("publisher: flush failed; retrying")
                self._stop.wait(1.0)

    def _settle_acks(self) -> None:
        while self._acked:
            mid = self._acked.popleft()
            row = self._inflight.pop(mid, None)
            if row is None:
                self._early[mid] = time.monotonic()
                continue
            self._handed.discard(row)
            self._mark_done(row)
        if self._early:
            # An early PUBACK is matched within microseconds; an old one must never match a
            # later message that reuses the id (ids wrap at 65535).
            cutoff = time.monotonic() - 5.0
            self._early = {m: t for m, t in self._early.items() if t > cutoff}

    def _mark_done(self, row: int) -> None:
        if not self._done:
            self._done_since = time.monotonic()
        self._done.append(row)
        self.delivered += 1

    def _delete_done(self, *, force: bool) -> None:
        done = self._done
        if done and (
            force
            or len(done) >= _DELETE_EVERY
            or time.monotonic() - self._done_since >= _DELETE_AFTER_S
        ):
            self._done = []
            self.outbox.ack_many(done)

    def _flush(self) -> None:
        t = self._transport
        if t is None or not t.connected.is_set():
            return
        if self._resync_until is not None:
            # Reading from the start again: acknowledged rows must be gone by then.
            self._delete_done(force=True)
            if self._handed and time.monotonic() < self._resync_until:
                return  # paho is resending older messages; newer ones must not overtake them
            if self._handed:
                log.warning("publisher: %d resends unacknowledged after reconnect; resending "
                            "them from the outbox", len(self._handed))
                self._handed.clear()
                self._inflight.clear()
            self._resync_until = None
        room = self._max_inflight - len(self._inflight)
        while room > 0 and t.connected.is_set():
            # Rows paho already holds (it resends them itself after a reconnect) are skipped.
            rows = self.outbox.after(self._cursor, room + len(self._handed))
            if not rows:
                return
            for row in rows:
                if row.id in self._handed:
                    self._cursor = row.id
                    continue
                if room <= 0 or self._resync_until is not None or not t.connected.is_set():
                    # Full, or the connection dropped or came back during this turn. Paho
                    # resends older messages only after its CONNACK handling; a row sent in
                    # between would overtake them. So stop here and resync first.
                    return
                mid = t.publish_tracked(row.topic, row.payload, row.qos, row.retain)
                if mid is None:
                    return  # paho's queue is full; this row and the rest go next turn
                self._cursor = row.id
                self.published += 1
                room -= 1
                if self._early.pop(mid, None) is not None:
                    self._mark_done(row.id)
                else:
                    self._handed.add(row.id)
                    self._inflight[mid] = row.id
