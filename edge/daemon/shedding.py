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

When: on arrival, from the inbox fill (the larger of its count and byte shares). Below
:data:`LOW` with nothing shed, nothing is looked at: two reads of the inbox per network read.
Above :data:`HIGH` the shed set grows, at most every :data:`GROW_S`, doubling its step while the
fill still rises (the inbox holds ~0.1 s of a fast stream, so it must react within that); it holds
while the fill falls or stays between the marks (hysteresis); below :data:`LOW` it shrinks, at most
once per :data:`HOLD_S` so a resumed asset has time for whole windows before any other change.
Input after a pause of a hold period or more, with the inbox drained, ends the overload: every
asset resumes at once, and the keys are forgotten so a stream after a pause never starts out shed
and streams that ended never dilute the steps.

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
import time
import zlib
from collections.abc import Callable

from floorline.edge.daemon.inbox import Inbox
from floorline.edge.messages import Inbound, Token
from floorline.edge.mqtt.topics import topic_level

__all__ = ["GAP", "GROW_S", "HIGH", "HOLD_S", "LOW", "Controller", "Shedder", "key_hash"]

HIGH = 0.75
"""Inbox fill (0..1) above which more assets are shed while it still rises. High, so a burst the
inbox can absorb sheds nothing; a quarter of the inbox is left to react in (in a simulation at
1.5 x capacity nothing reached the hard bound, at 2 x 2 % of the messages did)."""
LOW = 0.125
"""Inbox fill below which shed assets resume; between the marks nothing changes."""
GROW_S = 0.025
"""The fastest the shed set grows: a quarter of what the default inbox holds of a fast stream."""
HOLD_S = 1.0
"""The least time between a change and the next shrink."""

GAP: Token = (-1, 0)
"""The token of a gap marker; compared by identity (a real token is a fresh (mid, qos))."""

NEVER = 1 << 32
"""Above every CRC-32: the hash of a message without an asset key, which is never shed."""

_MAX_DOUBLINGS = 16
_CACHE_LIMIT = 100_000  # topics remembered, as the router's cache; beyond, hashed afresh
_inbound = tuple.__new__  # as in the router: a named tuple's own __new__ costs more


def key_hash(key: str) -> int:
    """The stable hash that orders assets for shedding (the same in every run and process)."""
    return zlib.crc32(key.encode())


class Controller:
    """Which keys are shed, from the inbox fill over time; no I/O, no clock of its own.

    Keys hashing below ``threshold`` are shed. Not thread-safe: one caller (paho's thread).
    """

    def __init__(self) -> None:
        self._hashes: list[int] = []  # every known key's hash, sorted, distinct
        self.threshold = 0
        """Keys hashing below it are shed (0: none)."""
        self._prev = 0.0  # the fill at the previous update
        self.changed = -float("inf")
        """When the threshold last moved (or the controller was reset)."""
        self._grows = 0  # consecutive grows (the step doubles with each)
        self._shrinks = 0  # consecutive shrinks

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

    def update(self, fill: float, now: float) -> int:
        """Take the inbox FILL (0..1) at NOW (seconds); return the change in keys shed."""
        prev, self._prev = self._prev, fill
        if fill >= HIGH:
            self._shrinks = 0
            if fill < prev:  # what is shed already drains the inbox: wait and see
                self._grows = 0
                return 0
            moved = self._move(self._step(self._grows), now)
            if moved:
                self._grows = min(self._grows + 1, _MAX_DOUBLINGS)
            return moved
        self._grows = 0
        if fill > LOW or not self.threshold:
            self._shrinks = 0
            return 0
        if now - self.changed < HOLD_S:
            return 0
        moved = self._move(-self._step(self._shrinks), now)
        self._shrinks = min(self._shrinks + 1, _MAX_DOUBLINGS)
        return moved

    def reset(self, now: float) -> None:
        """Shed nothing and forget every key (they are known again as they arrive)."""
        self._hashes = []
        self.threshold = 0
        self.changed = now
        self._grows = self._shrinks = 0

    def _step(self, doublings: int) -> int:
        # One asset, or 1/64 of them when there are many, doubled per consecutive step.
        return max(1, len(self._hashes) >> 6) << doublings

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
        self._offered = -float("inf")  # the last offer seen while engaged

    def fill(self) -> float:
        """The inbox fill: the larger of its count and byte shares (0..1)."""
        inbox = self._inbox
        return max(inbox.qsize() * self._per_count, inbox.weight() * self._per_byte)

    def engaged(self) -> bool:
        """Before an offer: whether to ``split`` it (the fill is above LOW, or keys are shed).

        Updates the controller, at most every GROW_S.
        """
        inbox = self._inbox
        count, weight = inbox.qsize(), inbox.weight()
        if count < self._low_count and weight < self._low_bytes and not self.controller.threshold:
            return False  # the common case: two reads of the inbox, no clock, no lookup
        fill = max(count * self._per_count, weight * self._per_byte)
        now = self.clock()
        quiet, self._offered = now - self._offered >= HOLD_S, now
        if quiet and fill < LOW:
            # The first input after a pause of a hold period or more, with the inbox drained:
            # the overload is over. Resume every asset at once rather than one step per hold
            # period, and forget the keys, so a stream after a pause (new assets, say) does not
            # start out shed and streams that ended do not dilute the steps.
            self.reset()
            return False
        if now >= self._tick_at:
            self._tick_at = now + GROW_S
            if self.controller.update(fill, now) < 0:  # resumed keys: a new gap needs a marker
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
        return kept, shed

    def unmark(self, rest: list[Inbound]) -> tuple[list[Inbound], set[str]]:
        """Of REST (what the inbox refused), the messages, and the keys whose marker was refused.

        Those keys' gaps are not marked: they are plain drops, and their next shed message tries
        again.
        """
        messages: list[Inbound] = []
        failed: set[str] = set()
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
