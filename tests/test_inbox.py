"""The pipeline inbox: bounded, FIFO, no lost wake-ups between producers and the consumer."""

from __future__ import annotations

import contextlib
import queue
import threading

import pytest

from edge.inbox import Inbox


def test_fifo_bound_and_timeouts():
    box: Inbox[int] = Inbox(2)
    box.put_nowait(1)
    box.put_nowait(2)
    with pytest.raises(queue.Full):
        box.put_nowait(3)
    assert box.qsize() == 2
    assert [box.get(0.1), box.get(0.1)] == [1, 2]
    assert box.empty()
    with pytest.raises(queue.Empty):
        box.get(0.05)


def test_two_producers_one_consumer_lose_nothing_and_keep_each_producers_order():
    box: Inbox[tuple[int, int]] = Inbox(1_000_000)
    n = 50_000

    def produce(who: int) -> None:
        for i in range(n):
            box.put_nowait((who, i))

    got: list[tuple[int, int]] = []

    def consume() -> None:
        with contextlib.suppress(queue.Empty):  # a second of silence: the producers are done
            while len(got) < 2 * n:
                got.append(box.get(1.0))

    consumer = threading.Thread(target=consume)
    consumer.start()
    producers = [threading.Thread(target=produce, args=(w,)) for w in (0, 1)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    consumer.join(30)
    assert len(got) == 2 * n
    for who in (0, 1):
        assert [i for w, i in got if w == who] == list(range(n))
