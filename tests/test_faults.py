"""Fault tests: broker and daemon killed mid-stream, outbox limits, broken state directories.

The test broker persists after every change (tests/mosquitto/common.conf), but mosquitto sends
the PUBACK before it saves: a SIGKILL can lose messages it had acknowledged. The broker-kill
test therefore accounts losses to the side that made them (``kill_broker_mid_stream``, also run
against nats-server in tests/test_interop.py): floorline must lose nothing the broker delivered
or it produced, and what the broker lost is reported. Every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from floorline.edge.config.model import parse_config
from floorline.edge.daemon.daemon import Daemon
from floorline.edge.messages import Outbound
from tests.daemon_harness import (
    EXAMPLE,
    Collector,
    ReliablePublisher,
    asset_samples,
    block_payload,
    config_text,
    first_occurrences,
    running,
    sample_payload,
)
from tests.mqtt_broker import Broker, Message, ProbeFactory, wait_until
from tests.test_daemon import expected_outputs

DURABLE_BROKER = "clean_start: false, session_expiry_s: 3600, keepalive: 5"
DURABLE_BROKER_311 = "protocol: '3.1.1', clean_start: false, keepalive: 5"

FLOORLINE = [sys.executable, "-m", "floorline.edge"]


def durable_config(broker: Broker, prefix: str, state_dir: Path, *, blocks: bool,
                   client_id: str) -> str:
    """An ``ack: durable`` gateway on BROKER's newest MQTT version, with a persistent session."""
    decoder = (
        "{type: json, samples: samples, timestamp: ts, sequence: seq}"
        if blocks else "{type: json, timestamp: ts, sequence: seq}"
    )
    hop = 64 if blocks else 32
    pipeline = f"""
  - name: vibration
    subscribe: ["{prefix}/+/vibration"]
    qos: 1
    ack: durable
    bundle: "{EXAMPLE}"
    decoder: {decoder}
    window: {{hop: {hop}, max_gap_s: 0.05}}
    batch: {{max_batch: 16, max_wait_ms: 5}}
    output: {{qos: 1}}
"""
    text = config_text(broker, pipeline, state_dir=state_dir)
    session = DURABLE_BROKER if broker.max_protocol == "5" else DURABLE_BROKER_311
    return text.replace("keepalive: 10,", f"{session}, client_id: {client_id},")


# -- the broker killed mid-stream ---------------------------------------------------------------
#
# Losses are accounted to the side that made them. In-process taps record what the broker
# delivered to the daemon (at the router, before any floorline stage) and the predictions the
# daemon committed to its outbox. Floorline must turn exactly the delivered input into exactly
# one prediction per window and get every one acknowledged by the broker (an empty outbox).
# What the plant had acknowledged but the broker never delivered, and what floorline had
# acknowledged but the broker never passed on to the subscriber, are the broker's losses: the
# caller decides what a broker may lose (mosquitto: acknowledged-but-unsaved messages; a broker
# that stores before it acknowledges: nothing).

KILL_ASSETS = 3
KILL_BLOCKS = 40  # per asset; a block is 64 samples, exactly one window (hop 64)
KILL_T0 = 100.0


@dataclass
class Tap:
    """What crossed floorline's two edges during a run, recorded in-process."""

    delivered: list[tuple[str, bytes]] = field(default_factory=list)
    """(topic, payload) as the broker delivered them to the daemon, in order, repeats included."""
    produced: list[dict[str, Any]] = field(default_factory=list)
    """Predictions the daemon committed to its outbox, in order."""
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextlib.contextmanager
def tapped(config: str) -> Iterator[tuple[Daemon, Tap]]:
    """``running`` with taps on the daemon's input (the router) and output (``Daemon.send``)."""
    daemon = Daemon(parse_config(config))
    tap = Tap()
    route = daemon.router.on_messages
    send = daemon.send

    def delivered(batch: list[tuple[str, bytes, int, int]], received: float) -> None:
        with tap.lock:
            tap.delivered.extend((topic, bytes(payload)) for topic, payload, _, _ in batch)
        route(batch, received)

    def sent(messages: Sequence[Outbound], *, keep: bool = True) -> None:
        preds = [orjson.loads(m.payload) for m in messages if "/pred/" in m.topic]
        with tap.lock:
            tap.produced.extend(preds)
        send(messages, keep=keep)

    # Instance attributes: start() hands these to the transport and the pipelines.
    daemon.router.on_messages = delivered  # type: ignore[method-assign]
    daemon.send = sent  # type: ignore[method-assign]
    daemon.start()
    try:
        assert daemon.transport is not None
        wait_until(daemon.transport.connected.is_set, 10, "daemon connected")
        wait_until(daemon.transport.subscribed.is_set, 10, "daemon subscribed")
        yield daemon, tap
    finally:
        daemon.stop()


@dataclass(frozen=True)
class KillAccount:
    """Who lost what in one broker-kill run; blocks are (asset, first sample seq)."""

    kills: int
    acknowledged: frozenset[tuple[str, int]]
    """Blocks the plant published and got a PUBACK for."""
    lost_input: tuple[tuple[str, int], ...]
    """Acknowledged to the plant, never delivered to the daemon: the broker lost them."""
    late_input: tuple[tuple[str, int], ...]
    """Delivered only after a newer block of the same asset (the window drops them as seen)."""
    redelivered: int
    """Deliveries of a block the daemon already had."""
    produced: int
    """Predictions floorline committed and the broker acknowledged."""
    lost_output: tuple[tuple[str, int], ...]
    """Predictions acknowledged to floorline, never delivered to the subscriber: (asset, seq)."""
    out_of_order_output: int
    """Predictions that reached the subscriber after a newer one of the same asset."""

    def summary(self, broker: str) -> str:
        """One line for the terminal summary."""
        return (
            f"{broker}: {self.kills} kills; input {len(self.acknowledged)} blocks acknowledged, "
            f"{len(self.lost_input)} lost, {len(self.late_input)} delivered out of order, "
            f"{self.redelivered} redelivered; predictions {self.produced} acknowledged, "
            f"{len(self.lost_output)} lost, {self.out_of_order_output} out of order; "
            f"floorline lost 0"
        )


def expected_from_delivered(delivered: list[tuple[str, bytes]]) -> dict[str, list[int]]:
    """Per asset, the blocks (first seq) that make a window, replaying DELIVERED in order.

    A block is one whole window (64 samples, hop 64). The window drops samples whose sequence
    number it has already passed (a redelivery), so a block delivered after a newer one of the
    same asset makes no window; every other block makes exactly one.
    """
    last: dict[str, int] = {}
    windows: dict[str, list[int]] = {}
    for topic, payload in delivered:
        asset = topic.split("/")[-2]
        first = orjson.loads(payload)["samples"][0]["seq"]
        if first > last.get(asset, -1):
            last[asset] = first + 63
            windows.setdefault(asset, []).append(first)
    return windows


def kill_broker_mid_stream(broker: Broker, prefix: str, state_dir: Path,
                           probe: ProbeFactory, *, catch_up_s: float) -> KillAccount:
    """Stream blocks through a durable daemon while BROKER is SIGKILLed ten times.

    Asserts what floorline is responsible for and returns the broker's part for the caller.
    CATCH_UP_S bounds the wait for what the broker still holds after the last kill (messages
    it will deliver again); what has not arrived by then counts as lost by the broker.
    """
    assets = {f"pump-{i}": asset_samples(64 * KILL_BLOCKS, seed=20 + i)
              for i in range(KILL_ASSETS)}
    # A persistent session: the broker keeps what arrives while the subscriber reconnects.
    collector = probe(broker, protocol="3.1.1", persistent=True, keepalive=5)
    collector.subscribe("floorline/gw-test/pred/#", qos=1)
    plant = ReliablePublisher(broker)  # publishes until acknowledged, across restarts
    cfg = durable_config(broker, prefix, state_dir, blocks=True, client_id="gw-kill-broker")
    rng = random.Random(7)  # noqa: S311 - kill timing, not cryptography
    acknowledged: set[tuple[str, int]] = set()
    failed: list[BaseException] = []

    def feed() -> None:
        try:
            for k in range(KILL_BLOCKS):
                for asset, samples in assets.items():
                    plant.publish(f"{prefix}/{asset}/vibration",
                                  block_payload(samples[64 * k: 64 * (k + 1)], 64 * k, KILL_T0))
                    acknowledged.add((asset, 64 * k))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            failed.append(exc)

    kills = 0
    with tapped(cfg) as (daemon, tap):
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        # The kills run on the test's own thread: a broker it starts dies with the test process
        # (PR_SET_PDEATHSIG), however the test ends.
        while kills < 10:
            # Each kill hits a live connection mid-stream, at a random moment.
            wait_until(lambda: daemon.stats()["connected"], 20, "daemon reconnected")
            time.sleep(rng.uniform(0.2, 0.6))
            broker.kill()
            time.sleep(rng.uniform(0.05, 0.3))
            broker.start()
            kills += 1
        feeder.join(60)
        if failed:
            raise failed[0]
        assert not feeder.is_alive(), "the plant did not get its stream acknowledged"
        wait_until(lambda: daemon.stats()["connected"], 20, "daemon reconnected")

        def blocks(delivered: list[tuple[str, bytes]]) -> set[tuple[str, int]]:
            return {(topic.split("/")[-2], orjson.loads(payload)["samples"][0]["seq"])
                    for topic, payload in delivered}

        def all_delivered() -> bool:
            with tap.lock:
                return blocks(tap.delivered) >= acknowledged

        with contextlib.suppress(TimeoutError):  # a broker that lost some never gets there
            wait_until(all_delivered, catch_up_s, "every acknowledged block delivered")
        # Floorline's part: every delivered block became a window, every window a prediction,
        # and the broker acknowledged every prediction (the outbox is empty). Taken in one
        # moment, so a late redelivery cannot fall between the two records.
        snapshot: list[tuple[list[tuple[str, bytes]], list[dict[str, Any]], dict[str, Any]]] = []

        def settled() -> bool:
            stats = daemon.stats()
            with tap.lock:
                want = sum(len(v) for v in expected_from_delivered(tap.delivered).values())
                if len(tap.produced) != want or stats["outbox"]["depth"] != 0:
                    return False
                snapshot.append((list(tap.delivered), list(tap.produced), stats))
            return True

        with contextlib.suppress(TimeoutError):  # the assertions below say what is missing
            wait_until(settled, 30, "a prediction for every delivered window, all acknowledged")
        if not snapshot:
            stats = daemon.stats()
            with tap.lock:
                snapshot.append((list(tap.delivered), list(tap.produced), stats))
        delivered, produced, stats = snapshot[0]
        seen_blocks = blocks(delivered)
    plant.close()

    assert stats["outbox"]["depth"] == 0, "predictions the broker has not acknowledged"
    pipeline = stats["pipelines"]["vibration"]
    assert pipeline.get("dropped_inbox_full", 0) == 0
    assert not pipeline["dead_letters"]
    assert stats["connects"] >= 11  # the first connection and one after every kill
    expected = expected_from_delivered(delivered)
    by_asset: dict[str, list[dict[str, Any]]] = {}
    for p in produced:
        by_asset.setdefault(p["asset"], []).append(p)
    assert set(by_asset) == set(expected)
    for asset, preds in by_asset.items():
        # Exactly one prediction per window, in order, numbered without gaps or repeats.
        assert [p["seq"] for p in preds] == list(range(len(expected[asset]))), asset
        starts = [round((p["window"]["start"] - KILL_T0) * 1000) for p in preds]
        assert starts == expected[asset], asset
        scores = expected_outputs(assets[asset], "litert", "model.tflite")[::2]  # hop 64
        for p, first in zip(preds, expected[asset], strict=True):
            assert p["score"] == pytest.approx(float(scores[first // 64].max()), abs=1e-6)

    # The broker's part, for the caller to judge: whatever the subscriber has by now. The
    # subscriber gets a bounded while for messages the broker still holds for it.
    made = {(p["asset"], p["seq"]) for p in produced}
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: made <= {_key(m) for m in collector.messages}, catch_up_s,
                   "the subscriber to catch up")
    received = [_key(m) for m in collector.messages]
    assert set(received) <= made  # nothing the subscriber got came from anywhere else
    late = [(a, s) for a, s in seen_blocks if s not in expected[a]]
    last_seq: dict[str, int] = {}
    out_of_order = 0
    for asset, seq in dict.fromkeys(received):  # first arrivals, in order
        out_of_order += seq < last_seq.get(asset, -1)
        last_seq[asset] = max(seq, last_seq.get(asset, -1))
    return KillAccount(
        kills=kills,
        acknowledged=frozenset(acknowledged),
        lost_input=tuple(sorted(acknowledged - seen_blocks)),
        late_input=tuple(sorted(late)),
        redelivered=len(delivered) - len(seen_blocks),
        produced=len(made),
        lost_output=tuple(sorted(made - set(received))),
        out_of_order_output=out_of_order,
    )


def _key(message: Message) -> tuple[str, int]:
    body = orjson.loads(message.payload)
    return body["asset"], body["seq"]


@pytest.mark.slow
def test_mosquitto_killed_ten_times_floorline_loses_no_delivered_window(
    mosquitto, mqtt_client, unique_topic, tmp_path, broker_losses
):
    # Mosquitto resends what was in flight as soon as a client reconnects: a short catch-up.
    account = kill_broker_mid_stream(mosquitto, unique_topic, tmp_path / "state", mqtt_client,
                                     catch_up_s=5)
    broker_losses(account.summary("mosquitto"))
    # Mosquitto acknowledges before it saves: a SIGKILL may lose acknowledged messages, in and
    # out (README, "Never losing a prediction"). It resends in order and never reorders.
    assert not account.late_input
    assert account.out_of_order_output == 0
    # Most of the stream must have gone through, or the run proved little.
    assert len(account.lost_input) < len(account.acknowledged) // 4


def run_daemon_process(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([*FLOORLINE, "run", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_daemon_killed_and_restarted_gives_the_uninterrupted_predictions(
    mosquitto, unique_topic, tmp_path
):
    n = 640
    assets = {"pump-a": asset_samples(n, seed=31), "pump-b": asset_samples(n, seed=32)}
    collector = Collector(mosquitto, "floorline/gw-test/pred/#")
    plant = ReliablePublisher(mosquitto)
    config = tmp_path / "gw.yaml"
    config.write_text(durable_config(mosquitto, unique_topic, tmp_path / "state", blocks=False,
                                     client_id="gw-kill-daemon"))
    proc = run_daemon_process(config)
    try:
        wait_until(lambda: mosquitto.count_log("gw-kill-daemon") > 0, 20, "daemon connected")
        time.sleep(0.5)  # the daemon subscribes right after CONNACK
        for i in range(n):
            if i == 250:
                proc.kill()  # mid-stream: windows half full, batches and acks in flight
                proc.wait(10)
            if i == 330:
                proc = run_daemon_process(config)  # messages 250..329 wait in the session
            for asset, samples in assets.items():
                plant.publish(f"{unique_topic}/{asset}/vibration",
                              sample_payload(500.0 + i / 1000, i, samples[i]))
        windows = (n - 64) // 32 + 1
        wait_until(lambda: sum(len(v) for v in first_occurrences(collector.bodies()).values())
                   >= 2 * windows, 60, "all predictions")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    collector.close()
    plant.close()
    per_asset = first_occurrences(collector.bodies())
    for asset, samples in assets.items():
        preds = per_asset[asset]
        assert sorted(p["seq"] for p in preds) == list(range(windows)), asset
        expected = expected_outputs(samples, "litert", "model.tflite")
        for p in preds:
            assert p["score"] == pytest.approx(float(expected[p["seq"]].max()), abs=1e-6)
            assert p["window"]["start"] == pytest.approx(500.0 + p["seq"] * 0.032)


def test_outbox_cap_drops_the_oldest_while_the_broker_is_down(mosquitto, mqtt_client,
                                                             unique_topic, tmp_path):
    text = config_text(mosquitto, f"""
  - name: vibration
    subscribe: ["{unique_topic}/+/vibration"]
    bundle: "{EXAMPLE}"
    decoder: {{type: json, samples: samples, timestamp: ts, sequence: seq}}
    batch: {{max_batch: 1, max_wait_ms: 0}}
""", state_dir=tmp_path / "state", extra="outbox: {max_bytes: 20000}\n")
    samples = asset_samples(64 * 60, seed=40)
    with running(text) as daemon:
        mosquitto.stop()
        wait_until(lambda: not daemon.stats()["connected"], 10, "daemon noticed")
        # Input as if it had arrived just before the outage (the router is the entry point).
        for k in range(60):
            daemon._on_message(f"{unique_topic}/pump-o/vibration",
                               block_payload(samples[64 * k: 64 * (k + 1)], 64 * k, 9.0), 0.0)
        pipeline = daemon.pipelines[0]
        wait_until(lambda: pipeline.counters["predictions"] == 60, 20, "60 predictions")
        stats = daemon.stats()
        assert stats["outbox"]["dropped"]["max_bytes"] > 0
        assert stats["outbox"]["bytes"] <= 20000
        kept = stats["outbox"]["depth"]
        assert 0 < kept < 60
        mosquitto.start()
        probe = mqtt_client(mosquitto)
        probe.subscribe("floorline/gw-test/pred/#", qos=1)
        wait_until(lambda: daemon.stats()["outbox"]["depth"] == 0, 20, "outbox delivered")
    seqs = sorted(orjson.loads(m.payload)["seq"] for m in probe.messages)
    # The newest survived: exactly the last `kept` windows, in full.
    assert seqs == list(range(60 - kept, 60))


def test_outbox_survives_a_restart_and_is_delivered_next_time(mosquitto, mqtt_client,
                                                              unique_topic, tmp_path):
    state = tmp_path / "state"
    pipeline = f"""
  - name: vibration
    subscribe: ["{unique_topic}/+/vibration"]
    bundle: "{EXAMPLE}"
    decoder: {{type: json, samples: samples, timestamp: ts, sequence: seq}}
"""
    text = config_text(mosquitto, pipeline, state_dir=state, extra="limits: {drain_timeout_s: 1}\n")
    samples = asset_samples(64 * 5, seed=41)
    with running(text) as daemon:
        mosquitto.stop()
        wait_until(lambda: not daemon.stats()["connected"], 10, "daemon noticed")
        for k in range(5):
            daemon._on_message(f"{unique_topic}/pump-r/vibration",
                               block_payload(samples[64 * k: 64 * (k + 1)], 64 * k, 3.0), 0.0)
        wait_until(lambda: daemon.stats()["outbox"]["depth"] == 5, 10, "5 held")
    # Stopped with the broker still down: the five predictions wait on disk.
    mosquitto.start()
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    with running(text):
        msgs = probe.wait_for(5, timeout=20)
    assert sorted(orjson.loads(m.payload)["seq"] for m in msgs) == [0, 1, 2, 3, 4]


def test_corrupt_outbox_file_is_moved_aside_and_reported(mosquitto, mqtt_client, unique_topic,
                                                        tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "outbox.sqlite").write_bytes(b"this is not a database" * 100)
    text = config_text(mosquitto, _simple(unique_topic), state_dir=state)
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    with running(text) as daemon:
        moved = daemon.stats()["outbox"]["moved_aside"]
        daemon._on_message(f"{unique_topic}/pump-c/vibration",
                           block_payload(asset_samples(64, 42), 0, 1.0), 0.0)
        probe.wait_for(1, timeout=10)
    assert moved is not None
    assert Path(moved).exists()
    assert daemon.stats()["outbox"]["mode"] == "disk"


def test_unusable_state_directory_degrades_to_memory_and_keeps_predicting(
    mosquitto, mqtt_client, unique_topic
):
    # /proc refuses new directories even to root: an honest unwritable state directory.
    text = config_text(mosquitto, _simple(unique_topic), state_dir=Path("/proc/floorline-test"))
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    with running(text) as daemon:
        daemon._on_message(f"{unique_topic}/pump-m/vibration",
                           block_payload(asset_samples(64, 43), 0, 1.0), 0.0)
        probe.wait_for(1, timeout=10)
        outbox = daemon.stats()["outbox"]
    assert outbox["mode"] == "memory"
    assert outbox["degraded_reason"]


def test_full_disk_degrades_to_memory_without_losing_predictions(mosquitto, mqtt_client,
                                                                 unique_topic, tiny_disk):
    state = tiny_disk("64k")
    text = config_text(mosquitto, _simple(unique_topic), state_dir=state)
    with running(text) as daemon:
        mosquitto.stop()
        wait_until(lambda: not daemon.stats()["connected"], 10, "daemon noticed")
        samples = asset_samples(64 * 200, seed=44)
        for k in range(200):
            daemon._on_message(f"{unique_topic}/pump-f/vibration",
                               block_payload(samples[64 * k: 64 * (k + 1)], 64 * k, 1.0), 0.0)
        wait_until(lambda: daemon.pipelines[0].counters["predictions"] == 200, 30, "done")
        outbox = daemon.stats()["outbox"]
        assert outbox["mode"] == "memory"
        assert "full" in outbox["degraded_reason"]
        mosquitto.start()
        probe = mqtt_client(mosquitto)
        probe.subscribe("floorline/gw-test/pred/#", qos=1)
        wait_until(lambda: daemon.stats()["outbox"]["depth"] == 0, 30, "delivered")
    seqs = sorted({orjson.loads(m.payload)["seq"] for m in probe.messages})
    assert seqs == list(range(200))


def test_a_slow_model_never_starves_the_network_thread(mosquitto, mqtt_client, unique_topic):
    text = config_text(mosquitto, _simple(unique_topic)).replace("keepalive: 10", "keepalive: 5")
    text = text.replace("limits:", "limits:") + ""
    cfg = parse_config(text)
    cfg.limits.inbox_size = 50
    probe = mqtt_client(mosquitto)
    with running(cfg) as daemon:
        backend = daemon.pipelines[0].model.backend
        real = backend.infer

        def slow(batch: np.ndarray) -> np.ndarray:
            time.sleep(0.5)  # a model far too slow for its stream
            return real(batch)

        backend.infer = slow  # type: ignore[method-assign]
        block = block_payload(asset_samples(64, 45), 0, 1.0)
        deadline = time.monotonic() + 12  # more than two keepalive periods
        k = 0
        while time.monotonic() < deadline:
            probe.publish(f"{unique_topic}/pump-{k % 7}/vibration", block, qos=0)
            k += 1
            time.sleep(0.005)
        stats = daemon.stats()
    assert stats["connects"] == 1  # never dropped: keepalive answered throughout
    pipe = stats["pipelines"]["vibration"]
    assert pipe["dropped_inbox_full"] + pipe["shed"] > 0  # bounded (assets shed first), counted


def _simple(prefix: str) -> str:
    return f"""
  - name: vibration
    subscribe: ["{prefix}/+/vibration"]
    bundle: "{EXAMPLE}"
    decoder: {{type: json, samples: samples, timestamp: ts, sequence: seq}}
    batch: {{max_batch: 8, max_wait_ms: 5}}
"""
