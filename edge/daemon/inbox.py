"""A pipeline's bounded inbox: many producers (paho's thread), one consumer (the worker).

``queue.Queue`` takes a lock and notifies a condition on every put and get, about 10 µs per
message on a small CPU. A deque's append and popleft are atomic under the GIL, so only a worker
that ran dry has to wait, on an Event the producer sets. Same interface as the subset of
``queue.Queue`` the pipeline uses, and the same exceptions.

Bounded by a count and, with WEIGH, by weight (bytes): a count alone lets large messages take
any amount of memory (20,000 messages of 256 KiB are 5 GiB). The weight held is what producers
added minus what the consumer took, each counter written by one side only, so no lock is needed.
An item is admitted only if it fits the weight still free; one heavier than the whole bound never
is. The pipeline keeps such items away in the first place: it refuses any payload over a quarter
of its byte bound on arrival (``Pipeline.max_payload``), so no one message can crowd out the rest.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Inbox(Generic[T]):
    """Bounded FIFO for a single consumer thread."""

    def __init__(
        self, maxsize: int, max_weight: int | None = None, weigh: Callable[[T], int] | None = None
    ) -> None:
        self._items: deque[T] = deque()
        self._max = maxsize
        self._max_weight = max_weight if weigh is not None else None
        self._weigh = weigh
        self._added = 0  # weight put, by producers (paho's thread) only
        self._taken = 0  # weight got, by the consumer only
        self._got = 0  # items got, by the consumer only
        self._ready = threading.Event()

    def weight(self) -> int:
        """Weight held now (0 without WEIGH)."""
        return self._added - self._taken

    def got(self) -> int:
        """Items the consumer has taken in all (the rate it drains at, for overload control)."""
        return self._got

    def _admit(self, items: list[T]) -> int:
        """How many of ITEMS, from the first, fit under both bounds; counts their weight in."""
        n = max(0, min(len(items), self._max - len(self._items)))
        if self._max_weight is None or self._weigh is None or n == 0:
            return n
        free = self._max_weight - (self._added - self._taken)
        weigh = self._weigh
        added = 0
        fit = 0
        for item in items[:n]:
            w = weigh(item)
            if added + w > free:
                break
            added += w
            fit += 1
        self._added += added
        return fit

    def put_nowait(self, item: T) -> None:
        """Append ITEM, or raise queue.Full at a bound (never blocks)."""
        if not self._admit([item]):
            raise queue.Full
        self._items.append(item)
        if not self._ready.is_set():
            self._ready.set()

    put = put_nowait

    def put_many(self, items: list[T]) -> list[T]:
        """Append ITEMS up to the bounds; return those that did not fit (never blocks)."""
        fit = self._admit(items)
        if fit == len(items):
            self._items.extend(items)
            rest: list[T] = []
        else:
            self._items.extend(items[:fit])
            rest = items[fit:]
        if fit and not self._ready.is_set():
            self._ready.set()
        return rest

    def _took(self, items: list[T]) -> None:
        if self._weigh is not None:
            self._taken += sum(map(self._weigh, items))

    def get(self, timeout: float | None = None) -> T:
        """The oldest item; wait up to TIMEOUT for one, else raise queue.Empty. One consumer."""
        items = self.get_many(1, timeout)
        if not items:
            raise queue.Empty
        return items[0]

    def get_many(self, limit: int, timeout: float | None = None) -> list[T]:
        """Up to LIMIT of the oldest items; wait up to TIMEOUT for one, else []. One consumer."""
        items = self._items
        if not items:
            self._ready.clear()
            # An item appended between the failed look and the clear did not set the event
            # again; this second look finds it.
            if not items and not self._ready.wait(timeout):
                return []
        popleft = items.popleft
        got = [popleft() for _ in range(min(limit, len(items)))]
        self._got += len(got)
        self._took(got)
        return got

    def qsize(self) -> int:
        """Items waiting."""
        return len(self._items)

    def empty(self) -> bool:
        """Whether nothing waits."""
        return not self._items
