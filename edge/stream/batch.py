"""Size- and time-bounded batching of windows: the third pipeline stage.

Windows from all of a pipeline's assets are inferred together: a batch is released as soon as it
holds ``max_batch`` items, or once its oldest item has waited ``max_wait_s``, whichever comes first.
The batcher is pure: it never sleeps and never starts a timer. The caller (the pipeline's worker)
waits for its next message at most :meth:`Batcher.timeout` seconds and then calls
:meth:`Batcher.take_due`, which bounds every item's wait by ``max_wait_s`` plus the caller's own
scheduling delay. The clock is injected so tests drive time by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BatchConfig", "Batcher"]

T = TypeVar("T")


class BatchConfig(BaseModel):
    """How windows are grouped into inference calls."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_batch: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="Windows per inference call at most; a full batch is inferred at once.",
    )
    max_wait_ms: float = Field(
        default=5,
        ge=0,
        le=10000,
        description="Longest a window waits for others to fill its batch (milliseconds); 0 infers "
        "every window as soon as the worker has nothing else queued.",
    )

    @property
    def max_wait_s(self) -> float:
        """``max_wait_ms`` in seconds, as :class:`Batcher` takes it."""
        return self.max_wait_ms / 1000.0


class Batcher(Generic[T]):
    """Collects items into batches of at most ``max_batch``, released by size or by age.

    Every batch holds the items in the order they were added, and every added item is in exactly
    one batch. Not thread-safe: one worker owns it.
    """

    def __init__(
        self, max_batch: int, max_wait_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not max_wait_s >= 0:  # also refuses NaN
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._max_batch = max_batch
        self._max_wait = max_wait_s
        self._clock = clock
        self._items: list[T] = []
        # When the pending batch is due: set by its oldest item, as the whole batch leaves at once.
        self._deadline = 0.0

    def add(self, item: T) -> list[T] | None:
        """Queue ITEM; return the batch it completes (``max_batch`` items), else None."""
        items = self._items
        if not items:
            self._deadline = self._clock() + self._max_wait
        items.append(item)
        if len(items) >= self._max_batch:
            return self._take()
        return None

    def timeout(self) -> float | None:
        """Seconds until the pending batch is due (0 if it is overdue); None when nothing waits."""
        if not self._items:
            return None
        return max(0.0, self._deadline - self._clock())

    def take_due(self) -> list[T] | None:
        """The pending batch if its oldest item has waited ``max_wait_s`` or more, else None."""
        if self._items and self._clock() >= self._deadline:
            return self._take()
        return None

    def drain(self) -> list[T]:
        """Everything pending, due or not (shutdown); an empty list when nothing waits."""
        return self._take()

    def __len__(self) -> int:
        """Items pending."""
        return len(self._items)

    def _take(self) -> list[T]:
        batch, self._items = self._items, []
        return batch
