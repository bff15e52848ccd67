"""The pipeline inbox: bounded, FIFO, no lost wake-ups between producers and the consumer."""

from __future__ import annotations

import contextlib
import queue
import threading

import pytest

from floorline.edge.daemon.inbox import Inbox
from floorline.edge.messages import Inbound


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


def test_weight_bound_drops_what_does_not_fit_and_frees_what_is_taken():
    box: Inbox[bytes] = Inbox(100, max_weight=1000, weigh=len)
    assert box.put_many([b"a" * 400, b"b" * 400, b"c" * 400, b"d" * 10]) == [b"c" * 400, b"d" * 10]
    assert box.weight() == 800
    with pytest.raises(queue.Full):
        box.put_nowait(b"e" * 300)
    box.put_nowait(b"f" * 200)
    assert box.weight() == 1000
    assert box.get_many(2, 0.1) == [b"a" * 400, b"b" * 400]
    assert box.weight() == 200
    assert box.put_many([b"g" * 800]) == []
    assert [len(x) for x in box.get_many(10, 0.1)] == [200, 800]
    assert box.weight() == 0


def test_an_item_heavier_than_the_whole_bound_is_never_admitted_even_when_empty():
    # It once was, so one giant message took the whole byte budget while good ones dropped.
    box: Inbox[bytes] = Inbox(100, max_weight=100, weigh=len)
    assert box.put_many([b"x" * 500]) == [b"x" * 500]
    with pytest.raises(queue.Full):
        box.put_nowait(b"x" * 101)
    assert (box.empty(), box.weight()) == (True, 0)
    assert box.put_many([b"y" * 100]) == []  # exactly the bound fits
    assert box.weight() == 100


def test_the_count_bound_holds_with_a_weight_bound_too():
    box: Inbox[bytes] = Inbox(2, max_weight=10_000, weigh=len)
    assert box.put_many([b"1", b"2", b"3"]) == [b"3"]


@pytest.mark.parametrize(("ack", "dropped"), [("receipt", 6), ("durable", 0)])
def test_a_receipt_pipeline_bounds_its_inbox_by_bytes_and_a_durable_one_does_not(ack, dropped):
    from floorline.edge.config.model import parse_config  # noqa: PLC0415 - the pipeline's own setup, once
    from floorline.edge.daemon.pipeline import Pipeline  # noqa: PLC0415
    from tests.daemon_harness import EXAMPLE  # noqa: PLC0415
    from tests.test_pipeline_fuzz import MODEL  # noqa: PLC0415 - the loaded example bundle

    config = parse_config(f"""
gateway: {{id: inbox}}
state_dir: /tmp/floorline-inbox-unused
broker: {{clean_start: false, session_expiry_s: 3600, client_id: inbox-test}}
limits: {{inbox_bytes: 4096}}
pipelines:
  - name: p
    subscribe: ["plant/+/vibration"]
    bundle: "{EXAMPLE}"
    decoder: {{type: json, sequence: seq}}
    ack: {ack}
""")
    pipeline = Pipeline(config.pipelines[0], gateway="inbox", topics=config.topics,
                        limits=config.limits, model=MODEL, submit=lambda _: None,
                        release=lambda _: None, restore=False)
    # Ten messages of 872 + 128 bytes: four fit in 4096 bytes (the worker is not started).
    token = (1, 1) if ack == "durable" else None
    pipeline.offer_many([Inbound("plant/a/vibration", b"x" * 872, 0.0, token)] * 10)
    assert pipeline.counters["dropped_inbox_full"] == dropped
    assert pipeline.inbox.qsize() == 10 - dropped
