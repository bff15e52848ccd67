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

    def qsize(self) -> int:
        """Items waiting."""
        return len(self._items)

    def empty(self) -> bool:
        """Whether nothing waits."""
        return not self._items
