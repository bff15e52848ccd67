"""Graceful overload for ``ack: receipt`` pipelines: shed whole assets, never single samples.

Dropping the newest message when the inbox is full spreads the loss over every asset, and each
lost per-sample message empties its asset's window: a 2 % overload lost 84 % of the windows.
Shedding instead drops *all* the messages of a few assets for a while, so the others keep whole
windows: at 1.1 times capacity about 1 asset in 11 is shed and the rest are predicted as usual.

Which assets: those whose key hashes (CRC-32, stable across runs) below a threshold. The
:class:`Controller` moves the threshold from one known key's hash to another's, so each step
sheds or resumes whole assets, and an asset stays shed (or kept) for as long as the threshold
holds. The key is the asset of the pipeline's ``asset.topic_segment``; for assets named in the
payload it is the topic (the network thread does not decode), so a topic carrying several assets
sheds them together.

How many: just the excess, from two rates measured while the inbox is above :data:`LOW` (or
assets are shed), every :data:`TICK_S`, each averaged over :data:`RATE_S`: the messages offered,
and the messages the worker takes while it has input (its capacity; a tick counts only if the
inbox held a tick's worth at both ends). Shed is the share ``1 - taken / offered`` of the known
assets, plus :data:`MARGIN`, plus what drains the backlog above :data:`TARGET` within
:data:`DRAIN_S` (minus what refills it, below). Neither rate depends on what is shed, so the
estimate does not ratchet: a worker that ran dry took only what it was given, which counts only
if higher, and an inbox that stays dry for :data:`SETTLE_S` while assets are shed resumes one
asset, then twice as many per period while it stays dry; the backlog that lets in measures the
worker again.

When: shedding starts once the backlog's *pressure* reaches :data:`START` (or :data:`TARGET`
within :data:`EPISODE_S` of the last shedding): the larger of the inbox fill (its count and byte
shares) and the backlog's age (queued over the worker's rate) against :data:`MAX_AGE_S`, so a
slower stream is not left seconds behind in a large inbox. A burst the inbox absorbs sheds
nothing. The shed count grows once the estimate is :data:`GROW_BAND` assets above it, and only
with a backlog; it shrinks once the estimate is :data:`SHRINK_BAND` below it, at most once per
:data:`SETTLE_S` (hysteresis: each change costs the windows in progress of the assets it moves,
and the rates are noisy). The assets counted are those seen since the overload began (nothing
shed and no look for :data:`RATE_S`): streams that ended must not dilute the share.

Past :data:`HIGH` it looks at every offer, never shrinks, and, when the estimate asks for no more
(the rates are not measured yet, for the first half of :data:`RATE_S`, or the inbox fills faster
than a second's averages show: a burst read after the process was held up), grows in doubling
steps, one per :data:`TICK_S`, while the fill still rises. What such a burst sheds comes back by
the dry rule above. A sudden overload of 2 x or more may reach the hard bound before the rates
are measured; up to 1.5 x nothing does (tests/test_overload.py).
Input after a pause of :data:`HOLD_S` or more, with the inbox drained,
ends the overload: every asset resumes at once, and the keys are forgotten so a stream after a
pause never starts out shed and streams that ended never dilute the steps.

No window spans a shed gap: the first shed message of each gap enters the inbox as a marker (its
payload left out, its token :data:`GAP`), after the asset's last kept message; the worker then
starts that asset's window afresh, whether or not the stream carries sequence numbers or time.
At the gap's start, not at the resume: nothing has to watch for resumed assets afterwards, and
an asset that never comes back costs nothing.
When even the marker does not fit the inbox (the hard bound, the last resort) the message is a
plain drop (``dropped_inbox_full``), as without shedding, and the next shed message tries again.
"""

from __future__ import annotations

import bisect
import math
import time
import zlib
from collections.abc import Callable

from floorline.edge.daemon.inbox import Inbox
from floorline.edge.messages import Inbound, Token
from floorline.edge.mqtt.topics import topic_level

__all__ = [
    "DRAIN_S", "EPISODE_S", "GAP", "GROW_BAND", "HIGH", "HOLD_S", "LOW", "MARGIN", "MAX_AGE_S",
    "RATE_S", "SETTLE_S", "SHRINK_BAND", "START", "TARGET", "TICK_S", "Controller", "Shedder",
    "key_hash",
]

LOW = 0.125
"""Inbox fill below which, with nothing shed, nothing is measured (two reads of the inbox)."""
TARGET = 0.25
"""The pressure the controller steers the backlog toward while it sheds: a backlog keeps the
worker busy, so its rate is its capacity; small, so it adds little latency (~30 ms of a fast
stream at the default limits)."""
START = 0.5
"""The pressure at which shedding starts: a burst of up to half the inbox sheds nothing."""
HIGH = 0.75
"""Inbox fill above which the controller looks at every offer, never shrinks the shed set, and,
when the rates are not known yet or ask for no more, grows it in doubling steps (one per TICK_S)
while the fill still rises (a quarter of the inbox is left to react in)."""
TICK_S = 0.025
"""How often the rates are sampled and the shed count is reconsidered while engaged."""
RATE_S = 1.0
"""The time constant of the two rates' exponential averages (a plain average over the first
RATE_S): the worker takes its input in runs and batches and shares the GIL, so a tick's count is
noisy; the backlog term covers what a change of load does before the rates follow it. After a
gap of as long without a look, both are measured afresh."""
DRAIN_S = 1.0
"""A backlog above TARGET is shed within about this long (the queue term's gain)."""
EPISODE_S = 10.0
"""For this long after assets were last shed the overload is taken to go on: shedding starts again
at TARGET, not START (a stream just past capacity sheds one or two assets, not ten)."""
MARGIN = 0.01
"""Shed this much more than the measured excess, so an exact estimate still drains the inbox."""
MAX_AGE_S = 1.0
"""A backlog this old (queued / the worker's rate) is at pressure START, whatever its fill."""
SETTLE_S = 0.5
"""The least time between a change and a shrink: a shed set that overshot comes back within it,
and one that fits is not moved back and forth by noise."""
GROW_BAND = 1.0
"""The shed count grows once the estimate is this many assets above it (hysteresis: a change
costs the windows in progress of the assets it moves, and the estimate is noisy)."""
SHRINK_BAND = 1.5
"""The shed count shrinks once the estimate is this many assets below it."""
HOLD_S = 1.0
"""A pause in the input this long, with the inbox drained, ends the overload."""

GAP: Token = (-1, 0)
"""The token of a gap marker; compared by identity (a real token is a fresh (mid, qos))."""

NEVER = 1 << 32
"""Above every CRC-32: the hash of a message without an asset key, which is never shed."""

_MAX_DOUBLINGS = 16
_MIN_SAMPLES = 4
_MAX_PRESSURE = 16.0  # a stalled worker's backlog is infinitely old; this is old enough
_CACHE_LIMIT = 100_000  # topics remembered, as the router's cache; beyond, hashed afresh
_inbound = tuple.__new__  # as in the router: a named tuple's own __new__ costs more


def key_hash(key: str) -> int:
    """The stable hash that orders assets for shedding (the same in every run and process)."""
    return zlib.crc32(key.encode())


class Controller:
    """Which keys are shed, from the offered and taken rates and the backlog; no I/O, no clock.

    Keys hashing below ``threshold`` are shed. Not thread-safe: one caller (paho's thread).
    """

    def __init__(self) -> None:
        self._hashes: list[int] = []  # every known key's hash, sorted, distinct
        self.threshold = 0
        """Keys hashing below it are shed (0: none)."""
        self.changed = -float("inf")
        """When the threshold last moved (or the controller was reset)."""
        self.offered_rate = 0.0
        """Messages offered per second (exponential average; 0: not measured yet)."""
        self.taken_rate = 0.0
        """Messages the worker takes per second while it has input: its capacity."""
        self.wanted = 0.0
        """The shed count the last estimate asked for (keys, fractional; for tests and logs)."""
        self._at = -float("inf")  # the last sample: when, and the counts then
        self._offered = 0
        self._taken = 0
        self._queued = 0
        self._primed = False  # both rates have a sample since the last restart
        self._samples = 0  # ticks measured since the last restart
        self._measured = False  # and have been measured long enough to decide on
        self._since = 0.0  # when measuring restarted
        self._mu_since = 0.0  # when measuring the worker busy restarted
        self._per_pressure = 0.0  # messages queued per unit of pressure, last seen
        self._shed_at = -float("inf")  # when assets were last seen shed (EPISODE_S)
        self._wet_at = -float("inf")  # when the worker was last seen busy (a tick's worth queued)
        self._probes = 0  # consecutive dry shrinks (the step doubles with each)
        self._prev = 0.0  # the fill at the previous look (the doubling fallback)
        self._grows = 0  # consecutive fallback grows (the step doubles with each)

    def know(self, h: int) -> None:
        """Count a key's hash H among the assets that can be shed."""
        hashes = self._hashes
        i = bisect.bisect_left(hashes, h)
        if i == len(hashes) or hashes[i] != h:
            hashes.insert(i, h)

    def known(self) -> int:
        """Keys known."""
        return len(self._hashes)

    def shed(self) -> int:
        """Known keys shed now."""
        return bisect.bisect_left(self._hashes, self.threshold)

    def update(self, now: float, fill: float, queued: int, offered: int, taken: int) -> int:
        """Look at NOW (seconds); return the change in keys shed.

        FILL: the inbox's fill (0..1); QUEUED: messages in it; OFFERED, TAKEN: messages offered
        to the pipeline and taken by its worker, in all (counters that only grow).
        """
        dt = now - self._at
        if dt > RATE_S:  # the first look, or the first in a while: measure afresh from here
            self._sample(now, queued, offered, taken)
            self._measured = self._primed = False
            self._since = self._wet_at = now
            self._samples = 0
            self._probes = 0
        elif dt >= TICK_S:
            self._measure(now, queued, offered, taken)
            self._sample(now, queued, offered, taken)
        if fill >= HIGH:
            # Past HIGH: grow as the estimate says, and if it says nothing more (the inbox fills
            # faster than a second's averages show: a burst read after the process was held up,
            # a worker stalled), by doubling steps while the fill still rises; never shrink.
            moved = self._steer(now, fill, queued, grow_only=True) if self._measured else 0
            return moved or self._fallback(fill, now)
        self._prev = fill
        self._grows = 0
        return self._steer(now, fill, queued) if self._measured else 0

    def fresh(self, now: float) -> bool:
        """Whether a look at NOW would start measuring afresh (none for longer than RATE_S)."""
        return now - self._at > RATE_S

    def forget(self) -> None:
        """Forget every key (nothing may be shed): they are known again as they arrive."""
        self._hashes = []

    def _sample(self, now: float, queued: int, offered: int, taken: int) -> None:
        self._at, self._queued, self._offered, self._taken = now, queued, offered, taken

    def _measure(self, now: float, queued: int, offered: int, taken: int) -> None:
        dt = now - self._at
        lam = (offered - self._offered) / dt
        mu = (taken - self._taken) / dt
        # The worker's rate is its capacity only if it had input all along: a tick's worth
        # queued at both ends. Run dry, it took what came, a lower bound (an over-shed inbox
        # runs dry, and what it takes then must not ratchet the estimate down).
        busy = min(queued, self._queued) >= max(taken - self._taken, 1)
        decay = 1.0 - math.exp(-dt / RATE_S)
        if busy:
            if now - self._wet_at > RATE_S:  # busy again after a while: measure it afresh
                self._mu_since = now - dt
            self._wet_at = now
            self._probes = 0
        self._samples += 1
        if not self._primed:
            self.offered_rate, self.taken_rate = lam, mu
            self._primed = True
            return
        # Decided on only after half of RATE_S (and _MIN_SAMPLES ticks): the reader catching up
        # on what the socket held while the process waited takes the GIL from the worker, so
        # the first tenth of a second of a burst shows it offered six times what the worker
        # takes; the inbox absorbs that, and past HIGH, before then, the doubling steps act.
        self._measured = now - self._since >= RATE_S / 2 and self._samples >= _MIN_SAMPLES
        # Over the first RATE_S, the plain average since the restart: a first tick's count is
        # not given the weight of a whole time constant.
        self.offered_rate += max(decay, dt / (now - self._since)) * (lam - self.offered_rate)
        if busy:
            # Afresh, but a tick the worker lost to a stall must not decide: at least a tenth
            # of RATE_S counts as averaged over.
            since = min(self._mu_since, now - RATE_S / 10)
            self.taken_rate += max(decay, dt / (now - since)) * (mu - self.taken_rate)
        elif mu > self.taken_rate:  # dry: a lower bound, followed only up
            self.taken_rate += decay * (mu - self.taken_rate)

    def _steer(self, now: float, fill: float, queued: int, *, grow_only: bool = False) -> int:
        offered, taken = self.offered_rate, self.taken_rate
        age = queued / taken if taken > 0 else (MAX_AGE_S * _MAX_PRESSURE if queued else 0.0)
        pressure = min(max(fill, START * age / MAX_AGE_S), _MAX_PRESSURE)
        if queued and pressure > 0:
            self._per_pressure = queued / pressure
        n = self.shed()
        if n:
            self._shed_at = now
        start = TARGET if now - self._shed_at <= EPISODE_S else START
        if offered <= 0 or (n == 0 and pressure < start):
            self.wanted = 0.0
            return 0
        excess = 1.0 - taken / offered
        backlog = self._per_pressure * (pressure - TARGET) / (offered * DRAIN_S)
        want = self.wanted = (excess + backlog + MARGIN) * len(self._hashes)
        if grow_only:
            return self._move(max(round(want), n + 1) - n, now) if want > n + GROW_BAND else 0
        if n and now - max(self._wet_at, self.changed) >= SETTLE_S:
            # Run dry for a settle period while shedding: one asset resumes, then twice as many
            # each period it stays dry, whatever the estimate (dry, the worker's rate is only a
            # lower bound); the backlog that lets in measures the worker again. So an overshoot
            # comes back within a few periods, and an under-estimate never keeps assets shed.
            step = 1 << self._probes
            self._probes = min(self._probes + 1, _MAX_DOUBLINGS)
            return self._move(min(n - step, max(math.ceil(want), 0)) - n, now)
        if want > n + GROW_BAND and pressure >= TARGET / 2:
            # Grow as soon as that much more is wanted (the inbox is bounded), but only with a
            # backlog, the worker's rate measured busy: an inbox near dry needs no more shed.
            return self._move(max(round(want), n + 1) - n, now)
        if want < n - SHRINK_BAND and now - self.changed >= SETTLE_S:
            return self._move(max(math.ceil(want), 0) - n, now)
        return 0

    def _fallback(self, fill: float, now: float) -> int:
        # Past HIGH, no rate or none that says more: while the fill still rises, grow the shed
        # set in doubling steps (the inbox holds ~0.1 s of a fast stream).
        prev, self._prev = self._prev, fill
        if fill < prev:
            self._grows = 0
            return 0
        if now - self.changed < TICK_S:  # one step per tick, even looked at every offer
            return 0
        step = max(1, len(self._hashes) >> 6) << self._grows
        moved = self._move(step, now)
        if moved:
            self._grows = min(self._grows + 1, _MAX_DOUBLINGS)
        return moved

    def reset(self, now: float) -> None:
        """Shed nothing and forget every key (they are known again as they arrive)."""
        self._hashes = []
        self.threshold = 0
        self.changed = now
        self._grows = 0
        self._at = self._shed_at = -float("inf")
        self._measured = self._primed = False
        self.wanted = 0.0

    def _move(self, step: int, now: float) -> int:
        hashes = self._hashes
        before = self.shed()
        after = min(max(before + step, 0), len(hashes))
        if after == before:
            return 0
        # 0 when none is shed (not the smallest hash): "threshold 0" is the cheap idle test.
        self.threshold = 0 if after == 0 else hashes[after] if after < len(hashes) else NEVER
        self.changed = now
        return after - before


class Shedder:
    """A pipeline's shedding on arrival (paho's thread): the controller and the keys' cache."""

    def __init__(self, inbox: Inbox[Inbound], segment: int | None, *, max_count: int,
                 max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        """SEGMENT: the topic level naming the asset (``asset.topic_segment``); None: by topic."""
        self.controller = Controller()
        self.clock = clock
        """Where time comes from; tests drive it."""
        self._inbox = inbox
        self._segment = segment
        self._per_count = 1.0 / max_count
        self._per_byte = 1.0 / max_bytes
        self._low_count = LOW * max_count
        self._low_bytes = LOW * max_bytes
        self._keys: dict[str, tuple[str | None, int]] = {}  # topic -> (key, hash)
        self._gapped: dict[str, int] = {}  # key -> hash: its gap is marked, it has not resumed
        self._tick_at = -float("inf")
        self._last_offer = -float("inf")  # the last offer seen while engaged
        # Messages shed, and refused by the inbox as it sheds: with what the inbox took in (got
        # by the worker or queued), every message offered, counted without a look at each offer.
        self._shed = 0
        self._refused = 0

    def fill(self) -> float:
        """The inbox fill: the larger of its count and byte shares (0..1)."""
        inbox = self._inbox
        return max(inbox.qsize() * self._per_count, inbox.weight() * self._per_byte)

    def engaged(self) -> bool:
        """Before an offer: whether to ``split`` it (the fill is above LOW, or keys are shed).

        Updates the controller every TICK_S, and at every offer above HIGH.
        """
        inbox = self._inbox
        count, weight = inbox.qsize(), inbox.weight()
        if count < self._low_count and weight < self._low_bytes and not self.controller.threshold:
            return False  # the common case: two reads of the inbox, no clock, no lookup
        fill = max(count * self._per_count, weight * self._per_byte)
        now = self.clock()
        quiet, self._last_offer = now - self._last_offer >= HOLD_S, now
        if quiet and fill < LOW:
            # The first input after a pause of a hold period or more, with the inbox drained:
            # the overload is over. Resume every asset at once rather than one step per hold
            # period, and forget the keys, so a stream after a pause (new assets, say) does not
            # start out shed and streams that ended do not dilute the steps.
            self.reset()
            return False
        if now >= self._tick_at or fill >= HIGH:
            self._tick_at = now + TICK_S
            if not self.controller.threshold and self.controller.fresh(now):
                # An overload starts (nothing shed, no look for a while): the assets it counts
                # in are those that arrive from now on, not every one ever seen. The shed share
                # is a count of assets, and streams that ended would dilute it.
                self._keys.clear()
                self.controller.forget()
            taken = inbox.got()  # once: the worker takes on meanwhile
            offered = taken + count + self._shed + self._refused
            moved = self.controller.update(now, fill, count, offered, taken)
            if moved < 0:  # resumed keys: a new gap needs a marker
                threshold = self.controller.threshold
                self._gapped = {k: h for k, h in self._gapped.items() if h < threshold}
        return True

    def reset(self) -> None:
        """Shed nothing; forget the keys and their gaps."""
        self.controller.reset(self.clock())
        self._keys.clear()
        self._gapped.clear()

    def _key(self, topic: str) -> tuple[str | None, int]:
        key = topic if self._segment is None else topic_level(topic, self._segment)
        entry = (key, NEVER if key is None else key_hash(key))
        if key is not None:
            self.controller.know(entry[1])
        if len(self._keys) < _CACHE_LIMIT:
            self._keys[topic] = entry
        return entry

    def split(self, items: list[Inbound]) -> tuple[list[Inbound], list[str]]:
        """ITEMS to queue, in order, with a gap marker where a key's shed gap starts; shed keys.

        The second list has the key of every shed message (markers included), in order.
        """
        keys = self._keys
        threshold = self.controller.threshold
        gapped = self._gapped
        kept: list[Inbound] = []
        shed: list[str] = []
        for item in items:
            topic = item[0]
            entry = keys.get(topic)
            if entry is None:
                entry = self._key(topic)
            key, h = entry
            if h >= threshold or key is None:
                kept.append(item)
                continue
            shed.append(key)
            if key not in gapped:
                gapped[key] = h
                kept.append(_inbound(Inbound, (topic, b"", item[2], GAP)))
        self._shed += len(shed)
        return kept, shed

    def unmark(self, rest: list[Inbound]) -> tuple[list[Inbound], set[str]]:
        """Of REST (what the inbox refused), the messages, and the keys whose marker was refused.

        Those keys' gaps are not marked: they are plain drops, and their next shed message tries
        again.
        """
        messages: list[Inbound] = []
        failed: set[str] = set()
        self._refused += len(rest)
        for item in rest:
            if item[3] is GAP:
                key = (self._keys.get(item[0]) or self._key(item[0]))[0]
                if key is not None:
                    failed.add(key)
                    self._gapped.pop(key, None)
            else:
                messages.append(item)
        return messages, failed

    def shedding(self) -> tuple[int, int]:
        """(assets shed, assets known) now."""
        return self.controller.shed(), self.controller.known()
