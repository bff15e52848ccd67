"""Batcher: batches bounded by size and by the oldest item's wait, driven by a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from floorline.edge.stream.batch import BatchConfig, Batcher


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _batcher(max_batch: int, max_wait_s: float) -> tuple[Batcher[int], FakeClock]:
    clock = FakeClock()
    return Batcher(max_batch, max_wait_s, clock=clock), clock


def test_full_batch_is_returned_by_the_add_that_fills_it() -> None:
    batcher, _ = _batcher(3, 10.0)
    assert batcher.add(1) is None
    assert batcher.add(2) is None
    assert batcher.add(3) == [1, 2, 3]
    assert len(batcher) == 0
    assert batcher.timeout() is None


def test_batch_is_due_once_its_oldest_item_waited_max_wait() -> None:
    batcher, clock = _batcher(10, 0.5)
    batcher.add(1)
    clock.now += 0.3
    batcher.add(2)
    clock.now += 0.1
    assert batcher.take_due() is None
    clock.now += 0.1
    assert batcher.take_due() == [1, 2]
    assert batcher.take_due() is None


def test_timeout_counts_down_from_the_oldest_item() -> None:
    batcher, clock = _batcher(10, 0.5)
    assert batcher.timeout() is None
    batcher.add(1)
    assert batcher.timeout() == pytest.approx(0.5)
    clock.now += 0.2
    batcher.add(2)  # a newer item does not push the deadline out
    assert batcher.timeout() == pytest.approx(0.3)
    clock.now += 1.0
    assert batcher.timeout() == 0.0


def test_zero_wait_makes_every_item_due_at_once() -> None:
    batcher, _ = _batcher(10, 0.0)
    batcher.add(1)
    assert batcher.timeout() == 0.0
    assert batcher.take_due() == [1]


def test_drain_returns_everything_pending_now() -> None:
    batcher, _ = _batcher(10, 60.0)
    assert batcher.drain() == []
    batcher.add(1)
    batcher.add(2)
    assert len(batcher) == 2
    assert batcher.drain() == [1, 2]
    assert len(batcher) == 0
    assert batcher.timeout() is None


def test_after_a_full_batch_the_next_item_starts_a_new_deadline() -> None:
    batcher, clock = _batcher(2, 1.0)
    batcher.add(1)
    clock.now += 0.9
    assert batcher.add(2) == [1, 2]
    batcher.add(3)
    assert batcher.timeout() == pytest.approx(1.0)


def test_invalid_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(0, 1.0)
    with pytest.raises(ValueError, match="max_wait_s"):
        Batcher(1, -1.0)
    with pytest.raises(ValueError, match="max_wait_s"):
        Batcher(1, float("nan"))


def test_batch_config_bounds_and_defaults() -> None:
    config = BatchConfig()
    assert (config.max_batch, config.max_wait_ms, config.max_wait_s) == (32, 5, 0.005)
    bad_configs = [
        {"max_batch": 0},
        {"max_batch": 1025},
        {"max_wait_ms": -1},
        {"max_wait_ms": 10001},
        {"max_wait": 5},
    ]
    for bad in bad_configs:
        with pytest.raises(ValidationError):
            BatchConfig.model_validate(bad)


_STEPS = st.lists(
    st.one_of(st.just(("add", 0.0)), st.tuples(st.just("advance"), st.floats(0.0, 0.3))),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6), st.sampled_from([0.0, 0.05, 0.1, 0.25]), _STEPS)
def test_batches_are_bounded_ordered_complete_and_never_late(
    max_batch: int, max_wait: float, steps: list[tuple[str, float]]
) -> None:
    batcher, clock = _batcher(max_batch, max_wait)
    added_at: dict[int, float] = {}
    emitted: list[int] = []

    def emit(batch: list[int] | None) -> None:
        if batch is None:
            return
        assert 1 <= len(batch) <= max_batch
        for item in batch:
            # 1e-9: the clock's float arithmetic, not scheduling slack.
            assert clock.now - added_at[item] <= max_wait + 1e-9
        emitted.extend(batch)

    def advance(dt: float) -> None:
        """The worker's loop: sleep no longer than timeout(), then collect what is due."""
        end = clock.now + dt
        timeout = batcher.timeout()
        if timeout is not None and clock.now + timeout <= end:
            clock.now += timeout
            due = batcher.take_due()
            assert due is not None  # polling at timeout() always finds the batch due
            emit(due)
        clock.now = end
        emit(batcher.take_due())

    for item, (op, dt) in enumerate(steps):
        if op == "add":
            added_at[item] = clock.now
            emit(batcher.add(item))
        else:
            advance(dt)
        assert len(batcher) < max_batch
    rest = batcher.drain()
    assert len(rest) < max_batch
    emitted.extend(rest)
    assert emitted == sorted(added_at)
