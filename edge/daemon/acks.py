"""Acknowledgement of input messages that several pipelines hold (``ack: durable``)."""

from __future__ import annotations

import threading
from collections.abc import Callable

Ack = Callable[[int, int], None]
"""Acknowledge input message (mid, qos) to the broker."""


class AckTracker:
    """Acknowledges an input message once every durable pipeline it went to released it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders: dict[int, int] = {}
        self.ack: Ack | None = None
        """Set once connected; until then nothing can be owed."""

    def hold(self, mid: int, count: int) -> None:
        """Paho's thread: MID is now owed by COUNT pipelines."""
        with self._lock:
            self._holders[mid] = count

    def release(self, tokens: list[tuple[int, int]]) -> None:
        """Worker threads: these pipelines are done with TOKENS (mid, qos), in arrival order."""
        ready = []
        with self._lock:
            for mid, qos in tokens:
                left = self._holders.get(mid, 1) - 1
                if left <= 0:
                    self._holders.pop(mid, None)
                    ready.append((mid, qos))
                else:
                    self._holders[mid] = left
        if self.ack is not None:
            for mid, qos in ready:
                self.ack(mid, qos)

    def owed(self) -> int:
        """Messages not yet acknowledged."""
        with self._lock:
            return len(self._holders)
