"""Prediction ``seq`` never goes backwards for an asset (issue 14, finding 7).

Consumers de-duplicate by (gateway, pipeline, asset, seq) (docs/consuming.md). A counter that
starts over (after a restart in ``ack: receipt`` mode, a SIGKILL, or a configuration switch whose
input changed, a rollback included) makes such a consumer drop new predictions as repeats. Real
mosquitto, in-process daemons, and subprocess daemons where a SIGKILL is needed.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from floorline.edge.config.model import parse_config
from floorline.edge.decoders.base import Samples
from floorline.edge.delivery.outbox import Outbox, OutboxConfig
from floorline.edge.messages import Outbound
from floorline.edge.stream.window import WindowConfig, Windower
from tests.daemon_harness import (
    Collector,
    ReliablePublisher,
    asset_samples,
    config_text,
    first_occurrences,
    publish_stream,
    running,
    sample_payload,
    vibration_pipeline,
)
from tests.mqtt_broker import wait_until
from tests.test_faults import durable_config, run_daemon_process

PRED = "floorline/gw-test/pred/#"


def seqs_of(messages: list[Any]) -> list[int]:
    return [orjson.loads(m.payload)["seq"] for m in messages]


def new_windows(probe: Any, since: float, n: int, timeout: float = 20.0) -> list[int]:
    """The seqs of the first N predictions of windows starting at SINCE or later.

    Resends of older windows (at least once: the outbox resends what was in flight at a kill)
    are left out: they are repeats, and keep their numbers.
    """
    def fresh() -> list[dict[str, Any]]:
        bodies = [orjson.loads(m.payload) for m in probe.messages if "/pred/" in m.topic]
        return [b for b in bodies if b["window"]["start"] >= since - 1e-9]

    wait_until(lambda: len(fresh()) >= n, timeout, f"{n} new windows")
    return [b["seq"] for b in fresh()[:n]]


def stop_process(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# -- the windower and the outbox on their own ---------------------------------------------------


def test_a_seeded_asset_starts_at_its_floor_and_a_journaled_one_replays() -> None:
    def push(w: Windower, asset: str, first: int, n: int) -> list[int]:
        values = np.arange(n, dtype=np.float32).reshape(n, 1)
        return [x.index for x in w.push(asset, Samples(values, None, first, asset), 0.0)]

    w = Windower(4, 1, WindowConfig(max_seq_gap=1))
    w.seed({"a": 10})
    assert push(w, "a", 0, 8) == [10, 11]  # a new asset: from its floor
    assert push(w, "b", 0, 4) == [0]  # no floor: from 0
    # A journaled state (ack: durable) rebuilds published windows with their numbers ...
    state = w.export_state("b")
    assert state is not None
    w2 = Windower(4, 1, WindowConfig(max_seq_gap=1))
    w2.import_state("b", state)
    w2.seed({"b": 3})
    assert push(w2, "b", 4, 4) == [1]
    # ... resets included: the replay sees the gaps the first run saw.
    assert push(w2, "b", 100, 4) == [2]
    w2.forget("b")
    assert push(w2, "b", 0, 4) == [3]  # a retired asset that comes back goes on


def test_outbox_stores_counters_with_the_batch_and_only_raises_them(tmp_path: Path) -> None:
    from floorline.edge.delivery.outbox import SeqMarks  # noqa: PLC0415 - new in this change

    path = tmp_path / "outbox.sqlite"
    with Outbox(path, OutboxConfig()) as box:
        box.put_many([Outbound("t/a", b"x", 1)], SeqMarks("p", {"a": 5, "b": 2}))
        box.put_many([], SeqMarks("p", {"a": 3}))  # lower: ignored
        box.put_many([], SeqMarks("q", {"a": 1}))  # QoS 0 batch: the counters alone
        assert box.next_seqs("p") == {"a": 5, "b": 2}  # exact while running
    with Outbox(path, OutboxConfig()) as box:
        # After a restart: a reservation past every number used, never below.
        after = box.next_seqs("p")
        assert after.keys() == {"a", "b"}
        assert 5 <= after["a"] <= 5 + 1024
        assert 2 <= after["b"] <= 2 + 1024
        assert 1 <= box.next_seqs("q")["a"] <= 1 + 1024
        assert box.depth() == 1
        box.put_many([], SeqMarks("p", {"a": after["a"] + 1}))
    with Outbox(path, OutboxConfig()) as box:
        assert box.next_seqs("p")["a"] > after["a"]  # passed: reserved again


# -- a gateway restart in `ack: receipt` mode ---------------------------------------------------


def test_seq_goes_on_after_a_restart_in_receipt_mode(mosquitto, mqtt_client, unique_topic,
                                                     tmp_path):
    cfg = config_text(mosquitto, vibration_pipeline(unique_topic), state_dir=tmp_path / "state")
    samples = asset_samples(256, seed=71)
    topic = f"{unique_topic}/pump-s/vibration"
    probe = mqtt_client(mosquitto)
    probe.subscribe(PRED, qos=1)
    with running(cfg):
        publish_stream(probe, topic, samples[:128], t0=20.0)
        first = seqs_of(probe.wait_for(3, PRED, timeout=15))
    probe.clear()
    with running(cfg):
        publish_stream(probe, topic, samples[128:], t0=20.0, first_seq=128)
        second = new_windows(probe, 20.128, 3)
    assert first == [0, 1, 2]
    # The restarted gateway held no samples (receipt mode): new windows, higher numbers (the
    # outbox reserves numbers, so some may be skipped: a gap is allowed, a repeat is not).
    assert second == list(range(second[0], second[0] + 3))
    assert second[0] > first[-1]


# -- a gateway SIGKILLed -------------------------------------------------------------------------


@pytest.mark.slow
def test_seq_goes_on_after_a_sigkill(mosquitto, mqtt_client, unique_topic, tmp_path):
    text = config_text(mosquitto, vibration_pipeline(unique_topic), state_dir=tmp_path / "state")
    text = text.replace("keepalive: 10,", "keepalive: 10, client_id: gw-seq-kill,")
    config = tmp_path / "gw.yaml"
    config.write_text(text)
    samples = asset_samples(256, seed=72)
    topic = f"{unique_topic}/pump-k/vibration"
    probe = mqtt_client(mosquitto)
    probe.subscribe(PRED, qos=1)
    proc = run_daemon_process(config)
    try:
        wait_until(lambda: mosquitto.count_log("gw-seq-kill") > 0, 20, "daemon connected")
        time.sleep(0.5)  # the daemon subscribes right after CONNACK
        publish_stream(probe, topic, samples[:128], t0=30.0)
        first = seqs_of(probe.wait_for(3, PRED, timeout=20))
        connects = mosquitto.count_log("New client connected.*gw-seq-kill")
        proc.kill()  # SIGKILL: no drain, no clean close of the outbox
        proc.wait(10)
        probe.clear()
        proc = run_daemon_process(config)
        wait_until(lambda: mosquitto.count_log("New client connected.*gw-seq-kill") > connects,
                   20, "daemon reconnected")
        time.sleep(0.5)
        publish_stream(probe, topic, samples[128:], t0=30.0, first_seq=128)
        second = new_windows(probe, 30.128, 3)
    finally:
        stop_process(proc)
    assert first == [0, 1, 2]
    assert second == list(range(second[0], second[0] + 3))
    assert second[0] > first[-1]


# -- configuration switches: an input change, then a rollback ----------------------------------


def test_seq_goes_on_across_an_input_change_and_a_rollback(mosquitto, mqtt_client,
                                                           unique_topic, tmp_path):
    cfg_a = config_text(mosquitto, vibration_pipeline(unique_topic), state_dir=tmp_path / "s")
    # Another window configuration: the pipeline's input changed, its windows are dropped.
    cfg_b = cfg_a.replace("max_gap_s: 0.05", "max_gap_s: 0.06")
    assert cfg_b != cfg_a
    samples = asset_samples(128 * 3 + 40, seed=73)
    topic = f"{unique_topic}/pump-c/vibration"
    probe = mqtt_client(mosquitto)
    probe.subscribe(PRED, qos=1)
    got: list[int] = []
    with running(cfg_a) as daemon:
        for phase, cfg in enumerate((None, cfg_b, cfg_a)):
            if cfg is not None:
                result = daemon.apply(parse_config(cfg))
                assert (result.ok, result.carried_over) == (True, ())
            start = 128 * phase
            # 40 samples more than three windows' worth: a partial window dropped at each switch.
            n = 128 + (40 if phase < 2 else 0)
            publish_stream(probe, topic, samples[start : start + n], t0=40.0, first_seq=start)
            got = seqs_of(probe.wait_for(3 * (phase + 1), PRED, timeout=15))
    # Strictly increasing across both switches: no new window repeats an earlier number.
    assert got == sorted(set(got)), got
    assert len(got) == 9


# -- ack: durable: a crash after an input change still de-duplicates -----------------------------


@pytest.mark.slow
def test_durable_replay_after_an_input_change_and_a_crash_deduplicates(
    mosquitto, mqtt_client, unique_topic, tmp_path
):
    config = tmp_path / "gw.yaml"
    text_a = durable_config(mosquitto, unique_topic, tmp_path / "state", blocks=False,
                            client_id="gw-seq-durable")
    text_b = text_a.replace("max_gap_s: 0.05", "max_gap_s: 0.06")
    assert text_b != text_a
    config.write_text(text_a)
    n_a, n = 320, 960
    samples = asset_samples(n, seed=74)
    topic = f"{unique_topic}/pump-d/vibration"
    collector = Collector(mosquitto, "floorline/gw-test/pred/#")
    states = mqtt_client(mosquitto)
    states.subscribe("floorline/gw-test/state", qos=1)
    plant = ReliablePublisher(mosquitto)
    proc = run_daemon_process(config)
    try:
        wait_until(lambda: mosquitto.count_log("gw-seq-durable") > 0, 20, "daemon connected")
        time.sleep(0.5)
        for i in range(n_a):
            plant.publish(topic, sample_payload(60.0 + i / 1000, i, samples[i]))
        wait_until(lambda: len(collector.bodies()) >= (n_a - 64) // 32 + 1, 30, "phase A")
        # Reload with another window configuration (SIGHUP): the windows start afresh.
        config.write_text(text_b)
        before = len(states.messages)
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(states.messages) > before, 20, "reload applied")
        for i in range(n_a, n):
            if i == n_a + 300:
                proc.kill()  # mid-stream: predictions committed after the last journal save
                proc.wait(10)
            if i == n_a + 380:
                proc = run_daemon_process(config)  # the input since waits in the session
            plant.publish(topic, sample_payload(60.0 + i / 1000, i, samples[i]))
        windows = (n_a - 64) // 32 + 1 + (n - n_a - 64) // 32 + 1
        wait_until(lambda: len({w["window"]["start"] for w in collector.bodies()}) >= windows,
                   60, "every window predicted")
        time.sleep(1.0)  # any late repeat
    finally:
        stop_process(proc)
    collector.close()
    plant.close()
    bodies = collector.bodies()
    starts = {round(b["window"]["start"], 6) for b in bodies}
    assert len(starts) == windows
    # De-duplicated by (asset, seq), the consumer keeps exactly one prediction per window ...
    kept = first_occurrences(bodies)["pump-d"]
    assert sorted(round(b["window"]["start"], 6) for b in kept) == sorted(starts)
    # ... and every repeat the crash caused carries the number of its first publication.
    by_seq: dict[int, set[float]] = {}
    for b in bodies:
        by_seq.setdefault(b["seq"], set()).add(round(b["window"]["start"], 6))
    assert all(len(s) == 1 for s in by_seq.values())
