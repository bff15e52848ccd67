"""A pipeline's bounded inbox: many producers (paho's thread), one consumer (the worker).

``queue.Queue`` takes a lock and notifies a condition on every put and get, about 10 µs per
message on a small CPU. A deque's append and popleft are atomic under the GIL, so only a worker
that ran dry has to wait, on an Event the producer sets. Same interface as the subset of
``queue.Queue`` the pipeline uses, and the same exceptions.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Inbox(Generic[T]):
    """Bounded FIFO for a single consumer thread."""

    def __init__(self, maxsize: int) -> None:
        self._items: deque[T] = deque()
        self._max = maxsize
        self._ready = threading.Event()

    def put_nowait(self, item: T) -> None:
        """Append ITEM, or raise queue.Full at the bound (never blocks)."""
        if len(self._items) >= self._max:
            raise queue.Full
        self._items.append(item)
        if not self._ready.is_set():
            self._ready.set()

    put = put_nowait

    def put_many(self, items: list[T]) -> list[T]:
        """Append ITEMS up to the bound; return those that did not fit (never blocks)."""
        room = self._max - len(self._items)
        if room >= len(items):
            self._items.extend(items)
            rest: list[T] = []
        else:
            self._items.extend(items[: max(room, 0)])
            rest = items[max(room, 0) :]
        if not self._ready.is_set():
            self._ready.set()
        return rest

    def get(self, timeout: float | None = None) -> T:
        """The oldest item; wait up to TIMEOUT for one, else raise queue.Empty. One consumer."""
        try:
            return self._items.popleft()
        except IndexError:
            pass
        self._ready.clear()
        # An item appended between the failed popleft and the clear did not set the event
        # again; this second look finds it.
        if self._items:
            return self._items.popleft()
        if not self._ready.wait(timeout):
            raise queue.Empty
        return self._items.popleft()

    def get_many(self, limit: int, timeout: float | None = None) -> list[T]:
        """Up to LIMIT of the oldest items; wait up to TIMEOUT for one, else []. One consumer."""
        items = self._items
        if not items:
            self._ready.clear()
            # As in get(): an item appended before the clear is found by this second look.
            if not items and not self._ready.wait(timeout):
                return []
        popleft = items.popleft
        return [popleft() for _ in range(min(limit, len(items)))]

    def qsize(self) -> int:
        """Items waiting."""
        return len(self._items)

    def empty(self) -> bool:
        """Whether nothing waits."""
        return not self._items
