"""Graceful overload: past capacity a pipeline sheds whole assets, and the rest keep whole windows.

The controller is driven with explicit fills and times; the pipeline runs the real committed
bundle with its worker stepped by the test (offers at 1.1 x what the worker takes, a fake clock),
so nothing here depends on the machine's speed.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import orjson
import pytest

from floorline.edge.config.model import parse_config
from floorline.edge.daemon.inbox import Inbox
from floorline.edge.daemon.pipeline import Pipeline
from floorline.edge.daemon.shedding import (
    GAP,
    GROW_S,
    HIGH,
    HOLD_S,
    LOW,
    Controller,
    Shedder,
    key_hash,
)
from floorline.edge.messages import Inbound
from floorline.edge.stream.window import Window
from tests.daemon_harness import EXAMPLE, config_text, running
from tests.mqtt_broker import wait_until
from tests.test_pipeline_fuzz import MODEL  # the example bundle, loaded once

WINDOW, HOP = 64, 32  # the example bundle's window; the benchmark's per-sample hop


def _controller(keys: int) -> tuple[Controller, list[int]]:
    c = Controller()
    hashes = sorted(key_hash(f"asset-{i}") for i in range(keys))
    for h in hashes:
        c.know(h)
    return c, hashes


# -- the controller ----------------------------------------------------------------------------


def test_nothing_is_shed_below_high_water_however_long_it_stays():
    c, _ = _controller(50)
    for i in range(1000):
        assert c.update(HIGH - 0.01 if i % 2 else LOW, i * 0.1) == 0
    assert (c.threshold, c.shed()) == (0, 0)


def test_the_shed_set_grows_while_the_fill_rises_above_high_water_and_holds_while_it_falls():
    c, hashes = _controller(50)
    assert c.update(HIGH, 0.0) == 1  # one asset, then twice as many per step while it rises
    assert c.update(HIGH, GROW_S) == 2  # not falling (a stalled worker): grow
    assert c.update(HIGH + 0.1, 2 * GROW_S) == 4
    assert c.shed() == 7
    assert c.threshold == hashes[7]  # the seven smallest hashes: a stable choice
    assert c.update(HIGH + 0.05, 3 * GROW_S) == 0  # falling: what is shed drains the inbox
    assert c.update(HIGH + 0.06, 4 * GROW_S) == 1  # rising again: from one step
    assert c.shed() == 8
    for _ in range(40):
        c.update(1.0, 5.0)
    assert c.shed() == 50  # at most every asset, never past the end


def test_the_shed_set_shrinks_only_below_low_water_and_at_most_once_per_hold_period():
    c, hashes = _controller(50)
    c.update(HIGH, 0.0)
    c.update(HIGH + 0.1, 0.1)
    c.update(HIGH + 0.2, 0.2)
    assert c.shed() == 7
    # Between the marks: hysteresis, whatever the time.
    between = (0.4, 0.2, HIGH - 0.01, LOW + 0.01)
    assert [c.update(f, 10.0 + i) for i, f in enumerate(between)] == [0] * 4
    assert c.shed() == 7
    # Below low water: one asset back, then not again within HOLD_S of that change.
    assert c.update(0.0, 20.0) == -1
    assert c.update(0.0, 20.0 + HOLD_S / 2) == 0
    assert c.update(0.0, 20.0 + HOLD_S) == -2  # still below: the step doubles
    assert c.shed() == 4
    assert c.threshold == hashes[4]  # the first four stay shed: the last ones in resume first
    assert c.update(0.3, 30.0) == 0  # back between the marks: the doubling starts over
    assert c.update(0.0, 31.0) == -1
    for i in range(10):
        c.update(0.0, 40.0 + i * HOLD_S)
    assert (c.shed(), c.threshold) == (0, 0)


def test_the_same_assets_stay_shed_while_it_holds_and_new_assets_do_not_move_them():
    c, _ = _controller(50)
    for t in (0.0, 0.1, 0.2):
        c.update(0.9, t)
    shed_before = {i for i in range(50) if key_hash(f"asset-{i}") < c.threshold}
    assert len(shed_before) == 7
    for i in range(50, 100):  # fifty more assets appear while it holds
        c.know(key_hash(f"asset-{i}"))
    shed_after = {i for i in range(50) if key_hash(f"asset-{i}") < c.threshold}
    assert shed_after == shed_before
    assert key_hash("asset-7") == key_hash("asset-7")  # CRC-32: the same in every process


def test_many_assets_are_shed_in_steps_of_a_sixty_fourth():
    c, _ = _controller(6400)
    assert c.update(HIGH, 0.0) == 100
    assert c.update(HIGH, 1.0) == 200


# -- the shedder: markers where gaps start -----------------------------------------------------


def _item(topic: str, n: int = 0) -> Inbound:
    return Inbound(topic, b"x%d" % n, float(n), None)


def test_a_shed_gap_starts_with_one_marker_and_messages_without_an_asset_are_never_shed():
    inbox: Inbox[Inbound] = Inbox(100)
    shedder = Shedder(inbox, -2, max_count=100, max_bytes=1 << 20, clock=lambda: 0.0)
    assert not shedder.engaged()  # empty: not even a look at the topics
    inbox.put_many([_item("plant/filler/v")] * 60)
    assert shedder.engaged()  # above low water: topics are looked at
    topics = [f"plant/a{i}/v" for i in range(8)] + ["nolevels"]
    kept, shed = shedder.split([_item(t) for t in topics])
    assert (len(kept), shed) == (9, [])  # level 0: every topic seen, none shed
    shedder.controller.update(0.9, 0.0)  # grows by one asset
    victim = min(topics[:8], key=lambda t: key_hash(t.split("/")[1]))
    kept, shed = shedder.split([_item(t, n) for n, t in enumerate(topics * 2)])
    assert shed == [victim.split("/")[1]] * 2
    markers = [m for m in kept if m.token is GAP]
    assert [(m.topic, m.payload) for m in markers] == [(victim, b"")]  # one per gap, no payload
    assert kept.index(markers[0]) == topics.index(victim)  # in order, where the gap starts
    assert sum(1 for m in kept if m.topic == "nolevels") == 2
    kept, shed = shedder.split([_item(victim)])
    assert (kept, len(shed)) == ([], 1)  # the gap goes on: no second marker


def test_a_marker_the_inbox_refuses_is_tried_again_with_the_next_shed_message():
    inbox: Inbox[Inbound] = Inbox(10)
    shedder = Shedder(inbox, None, max_count=10, max_bytes=1 << 20, clock=lambda: 0.0)
    shedder.controller.know(key_hash("t"))
    shedder.controller.update(0.9, 0.0)
    kept, _shed = shedder.split([_item("t")])
    assert [m.token for m in kept] == [GAP]
    messages, failed = shedder.unmark(kept)
    assert (messages, failed) == ([], {"t"})
    kept, _ = shedder.split([_item("t")])
    assert [m.token for m in kept] == [GAP]


def test_input_after_a_pause_with_the_inbox_drained_resumes_every_asset_and_forgets_them():
    # The benchmark found it: a stream that stopped while assets were shed left the threshold
    # up, and the next stream's (new) assets started out shed, at a tenth of capacity.
    now = [0.0]
    inbox: Inbox[Inbound] = Inbox(100)
    shedder = Shedder(inbox, -2, max_count=100, max_bytes=1 << 20, clock=lambda: now[0])
    old = [f"plant/old{i}/v" for i in range(50)]
    inbox.put_many([_item("plant/filler/v")] * 90)
    for step in range(8):  # overloaded and rising: the shed set grows
        now[0] = step * GROW_S
        assert shedder.engaged()
        shedder.split([_item(t) for t in old])
        shedder.controller.update(0.9 + step / 100, now[0])
    assert shedder.controller.shed() > 10
    inbox.get_many(100)  # the worker drains; the stream stops
    now[0] += HOLD_S / 2
    assert shedder.engaged()  # input again after half a hold period: still shedding
    now[0] += HOLD_S
    assert not shedder.engaged()  # after a pause of a hold period: over
    assert (shedder.controller.threshold, shedder.controller.known()) == (0, 0)
    new = [_item(f"plant/new{i}/v") for i in range(50)]
    assert shedder.split(new) == (new, [])


def test_a_pause_with_the_inbox_still_full_keeps_shedding():
    now = [0.0]
    inbox: Inbox[Inbound] = Inbox(100)
    shedder = Shedder(inbox, -2, max_count=100, max_bytes=1 << 20, clock=lambda: now[0])
    inbox.put_many([_item("plant/filler/v")] * 90)  # a stalled worker: nothing is taken
    assert shedder.engaged()
    shedder.split([_item(f"plant/a{i}/v") for i in range(50)])
    shedder.controller.update(0.95, 0.0)
    shed = shedder.controller.shed()
    now[0] = 3 * HOLD_S
    assert shedder.engaged()
    assert shedder.controller.shed() >= shed > 0


# -- a pipeline at 1.1 x capacity -------------------------------------------------------------


def _pipeline(overload: str, *, payload_asset: bool = False, seq: bool = False,
              inbox_size: int = 1000) -> Pipeline:
    # Without SEQ neither timestamps nor sequence numbers: only the shed markers can keep gaps
    # out of windows. With it, the windower itself notices every lost message (as in the
    # benchmark): that is what makes dropping single messages so costly.
    decoder = "{type: json, asset: asset}" if payload_asset else "{type: json}"
    if seq:
        decoder = "{type: json, sequence: seq}"
    asset = "{payload: true}" if payload_asset else "{topic_segment: -2}"
    config = parse_config(f"""
gateway: {{id: overload}}
state_dir: /tmp/floorline-overload-unused
limits: {{inbox_size: {inbox_size}, overload: {overload}}}
pipelines:
  - name: p
    subscribe: ["plant/+/vibration"]
    bundle: "{EXAMPLE}"
    decoder: {decoder}
    asset: {asset}
    window: {{hop: {HOP}}}
    batch: {{max_batch: 32, max_wait_ms: 10000}}
""")
    return Pipeline(config.pipelines[0], gateway="overload", topics=config.topics,
                    limits=config.limits, model=MODEL, submit=lambda _: None, restore=False)


def _record_windows(pipeline: Pipeline) -> list[Window]:
    windows: list[Window] = []
    infer = pipeline._infer

    def recording(batch: list[Window]) -> None:
        windows.extend(batch)
        infer(batch)

    pipeline._infer = recording  # type: ignore[method-assign]
    return windows


def _payload(asset: int, i: int, *, payload_asset: bool, seq: bool = False) -> bytes:
    # accel_x counts the asset's samples, accel_y names the asset: a window is whole when its
    # accel_x runs i, i+1, ... i+63 (exact in float32).
    body: dict[str, object] = {"accel_x": float(i), "accel_y": float(asset), "accel_z": 0.0}
    if payload_asset:
        body["asset"] = f"a{asset}"
    if seq:
        body["seq"] = i
    return orjson.dumps(body)


def _overload(pipeline: Pipeline, topic: Callable[[int], str], *, assets: int, samples: int,
              over: float, payload_asset: bool = False, seq: bool = False,
              rate: float = 10_000.0, read: int = 10) -> None:
    """Offer ASSETS x SAMPLES per-sample messages, round robin, OVER x as fast as the worker takes.

    A fake clock runs at RATE messages a second; the worker's turns are taken here, between
    offers, so the outcome is the same on any machine.
    """
    now = [0.0]
    if pipeline.shedder is not None:
        pipeline.shedder.clock = lambda: now[0]
    budget = 0.0
    stream = ((a, i) for i in range(samples) for a in range(assets))
    while chunk := list(itertools.islice(stream, read)):
        pipeline.offer_many([
            Inbound(topic(a), _payload(a, i, payload_asset=payload_asset, seq=seq), now[0], None)
            for a, i in chunk
        ])
        now[0] += len(chunk) / rate
        budget += len(chunk) / over
        while budget >= 1 and not pipeline.inbox.empty():
            before = pipeline._taken
            pipeline._turn(None)
            budget -= pipeline._taken - before
    pipeline.start()
    pipeline.stop(drain_all=True)  # the rest, and the last partial batch


def _check_whole(windows: list[Window]) -> dict[float, int]:
    """Every window is one asset's consecutive samples; windows per asset."""
    per_asset: dict[float, int] = defaultdict(int)
    for w in windows:
        xs, ys = w.values[:, 0], w.values[:, 1]
        assert len(set(ys.tolist())) == 1, f"window {w.asset} mixes assets"
        assert np.array_equal(xs, xs[0] + np.arange(WINDOW)), (
            f"window of {w.asset} spans a gap: samples {xs[0]:.0f}..{xs[-1]:.0f} not consecutive")
        per_asset[float(ys[0])] += 1
    return per_asset


ASSETS, SAMPLES = 50, 1536
OFFERED = ASSETS * ((SAMPLES - WINDOW) // HOP + 1)  # windows with nothing lost


@pytest.mark.parametrize("overload", ["shed_assets", "drop_newest"])
def test_at_one_point_one_times_capacity_most_windows_are_still_predicted(overload, caplog):
    # The benchmark's per-sample stream: 50 assets, sequence numbers, windows of 64, hop 32.
    pipeline = _pipeline(overload, seq=True)
    windows = _record_windows(pipeline)
    with caplog.at_level(logging.INFO, logger="floorline.edge.daemon.pipeline"):
        _overload(pipeline, lambda a: f"plant/a{a}/vibration", assets=ASSETS, samples=SAMPLES,
                  over=1.1, seq=True)
    c = pipeline.counters
    received = ASSETS * SAMPLES
    # Every message counted once: taken by the worker, shed, or dropped at the hard bound.
    assert c["received"] == received
    assert pipeline._taken + c["shed"] + c["dropped_inbox_full"] == received
    assert pipeline.health() == (received, 0, 0)  # shed input is input, never a dead letter
    assert c["windows"] == c["predictions"] == len(windows)
    if overload == "drop_newest":
        # Without shedding each drop breaks a window of the asset it hit: the cliff.
        assert c["shed"] == 0
        assert len(windows) < 0.5 * OFFERED
        return
    assert sum(pipeline.stats()["window_resets"].values()) == 0  # type: ignore[union-attr]
    whole = _check_whole(windows)
    assert len(windows) >= 0.85 * OFFERED, f"{len(windows)} of {OFFERED} windows predicted"
    assert len(whole) == ASSETS  # no asset shed throughout: kept and shed in turn as it adapts
    # Shed by the asset, in long runs: the gaps average more than a window of samples.
    assert c["shed"] > 0
    assert c["shed_gaps"] > 0
    assert c["shed"] / c["shed_gaps"] > 2 * WINDOW
    assert c["dropped_inbox_full"] == 0  # the hard bound was never reached
    lines = [r.getMessage() for r in caplog.records if "shedding" in r.getMessage()]
    assert lines
    assert "pipeline p: overloaded (inbox" in lines[0]
    assert len(lines) <= 2  # rate-limited: one line per 10 s at most (this test takes less)


def test_without_sequence_numbers_or_time_no_window_spans_a_shed_gap():
    # Nothing in the input shows a gap: only the marker the shedder queues where it starts.
    pipeline = _pipeline("shed_assets")
    windows = _record_windows(pipeline)
    _overload(pipeline, lambda a: f"plant/a{a}/vibration", assets=ASSETS, samples=SAMPLES,
              over=1.2)
    c = pipeline.counters
    assert c["shed_gaps"] > 0
    _check_whole(windows)
    assert len(windows) >= 0.75 * OFFERED  # of 1 / 1.2 = 83 % at best


def test_assets_named_in_the_payload_are_shed_by_topic_and_never_mix_across_its_gap():
    # Ten topics of five assets each: a shed topic takes its five assets with it.
    pipeline = _pipeline("shed_assets", payload_asset=True)
    windows = _record_windows(pipeline)
    _overload(pipeline, lambda a: f"plant/line{a % 10}/vibration", assets=ASSETS,
              samples=SAMPLES, over=1.2, payload_asset=True)
    c = pipeline.counters
    assert c["shed"] > 0
    assert pipeline._taken + c["shed"] + c["dropped_inbox_full"] == ASSETS * SAMPLES
    _check_whole(windows)
    assert len(windows) >= 0.7 * OFFERED  # coarser: five assets per step


def test_a_stalled_worker_sheds_everything_past_high_water_and_resumes_with_fresh_windows():
    pipeline = _pipeline("shed_assets", inbox_size=200)
    windows = _record_windows(pipeline)
    now = [0.0]
    assert pipeline.shedder is not None
    pipeline.shedder.clock = lambda: now[0]
    topics = [f"plant/a{a}/vibration" for a in range(5)]
    sent = 0
    for i in range(WINDOW + 10):  # the worker does not run: the inbox fills, then assets shed
        pipeline.offer_many([Inbound(t, _payload(a, i, payload_asset=False), now[0], None)
                             for a, t in enumerate(topics)])
        now[0] += GROW_S
        sent += len(topics)
    assert pipeline.stats()["shed_assets"] == 5
    assert pipeline.counters["shed"] > 0
    while not pipeline.inbox.empty():  # the worker catches up
        pipeline._turn(None)
    for i in range(WINDOW + 10, 4 * WINDOW):  # then input at a pace it keeps up with
        now[0] += HOLD_S
        pipeline.offer_many([Inbound(t, _payload(a, i, payload_asset=False), now[0], None)
                             for a, t in enumerate(topics)])
        sent += len(topics)
        if not pipeline.inbox.empty():
            pipeline._turn(None)
    pipeline.start()
    pipeline.stop(drain_all=True)
    assert pipeline.stats()["shed_assets"] == 0
    per_asset = _check_whole(windows)  # nothing from before a gap in a window after it
    assert sorted(per_asset) == [0.0, 1.0, 2.0, 3.0, 4.0]  # every asset predicted again
    c = pipeline.counters
    assert pipeline._taken + c["shed"] + c["dropped_inbox_full"] == sent


def test_a_durable_pipeline_never_sheds():
    config = parse_config(config_text_durable())
    pipeline = Pipeline(config.pipelines[0], gateway="overload", topics=config.topics,
                        limits=config.limits, model=MODEL, submit=lambda _: None,
                        release=lambda _: None, restore=False)
    assert pipeline.shedder is None
    pipeline.offer_many([Inbound("plant/a/vibration", b"{}", 0.0, (i + 1, 1))
                         for i in range(30)])
    assert (pipeline.counters["dropped_inbox_full"], pipeline.counters["shed"]) == (20, 0)


def config_text_durable() -> str:
    return f"""
gateway: {{id: overload}}
state_dir: /tmp/floorline-overload-unused
broker: {{clean_start: false, session_expiry_s: 3600, client_id: overload-test}}
limits: {{inbox_size: 10}}
pipelines:
  - name: p
    subscribe: ["plant/+/vibration"]
    bundle: "{EXAMPLE}"
    decoder: {{type: json, sequence: seq}}
    ack: durable
"""


# -- the daemon against the real broker --------------------------------------------------------


def test_the_daemon_sheds_whole_assets_from_the_broker_and_reports_it(
    mosquitto, mqtt_client, unique_topic
):
    # The worker is held on its first message while the broker delivers more than the inbox
    # holds; the shedder's clock advances a control period per offer, so it reacts the same on
    # any machine. Then the worker goes on and the stream continues at a pace it keeps up with.
    pipeline_yaml = f"""
  - name: vibration
    subscribe: ["{unique_topic}/+/vibration"]
    qos: 1
    bundle: "{EXAMPLE}"
    decoder: {{type: json}}
    window: {{hop: {HOP}}}
    batch: {{max_batch: 8, max_wait_ms: 5}}
"""
    probe = mqtt_client(mosquitto)
    text = config_text(mosquitto, pipeline_yaml, extra="limits: {inbox_size: 100}\n")
    assets = 4
    with running(text) as daemon:
        pipeline = daemon.pipelines[0]
        assert pipeline.shedder is not None
        ticks = itertools.count()
        pipeline.shedder.clock = lambda: next(ticks) * HOLD_S
        windows = _record_windows(pipeline)
        gate = threading.Event()
        handle = pipeline._handle

        def held(topic: str, payload: bytes, received: float) -> None:
            gate.wait(30)
            handle(topic, payload, received)

        pipeline._handle = held  # type: ignore[method-assign]
        first = 3 * WINDOW
        for i in range(first):
            for a in range(assets):
                probe.publish(f"{unique_topic}/a{a}/vibration",
                              _payload(a, i, payload_asset=False), qos=1)
        wait_until(lambda: pipeline.counters["received"] == assets * first, 20, "all offered")
        assert pipeline.counters["shed"] > 0
        assert pipeline.stats()["shed_assets"] > 0
        gate.set()
        wait_until(pipeline.inbox.empty, 20, "inbox drained")
        for i in range(first, first + 3 * WINDOW):
            for a in range(assets):
                probe.publish(f"{unique_topic}/a{a}/vibration",
                              _payload(a, i, payload_asset=False), qos=1)
            if i % 8 == 7:  # 32 messages at a time, under high water, into an emptied inbox
                offered = assets * (i + 1)
                wait_until(lambda n=offered: pipeline.counters["received"] == n and  # type: ignore[misc]
                           pipeline.inbox.empty(), 20, "the worker caught up")
        total = assets * (first + 3 * WINDOW)
        wait_until(lambda: pipeline.counters["received"] == total, 20, "all offered")
        wait_until(pipeline.inbox.empty, 20, "inbox drained")
        stats = daemon.stats()["pipelines"]["vibration"]  # type: ignore[index]
    assert stats["shed"] == pipeline.counters["shed"]
    assert pipeline.stats()["shed_assets"] == 0  # resumed
    c = pipeline.counters
    assert pipeline._taken + c["shed"] + c["dropped_inbox_full"] == total
    per_asset = _check_whole(windows)
    assert len(per_asset) == assets  # every asset predicted again after its gap
