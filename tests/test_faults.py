"""Fault tests: broker and daemon killed mid-stream, outbox limits, broken state directories.

The test broker persists with ``autosave_on_changes`` (tests/mosquitto/common.conf): mosquitto
acknowledges QoS 1 before writing to disk, and with its default persistence a SIGKILL loses
acknowledged messages. Every wait here is bounded.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from floorline.edge.config.model import parse_config
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
from tests.mqtt_broker import wait_until
from tests.test_daemon import expected_outputs

DURABLE_BROKER = "clean_start: false, session_expiry_s: 3600, keepalive: 5"

FLOORLINE = [sys.executable, "-m", "floorline.edge"]


def durable_config(broker, prefix: str, state_dir: Path, *, blocks: bool, client_id: str) -> str:
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
    return text.replace(
        "keepalive: 10,", f"{DURABLE_BROKER}, client_id: {client_id},"
    )


@pytest.mark.slow
def test_broker_killed_ten_times_loses_and_duplicates_no_window(mosquitto, unique_topic, tmp_path):
    assets = {f"pump-{i}": asset_samples(64 * 40, seed=20 + i) for i in range(3)}
    collector = Collector(mosquitto, "floorline/gw-test/pred/#")
    plant = ReliablePublisher(mosquitto)
    cfg = durable_config(mosquitto, unique_topic, tmp_path / "state", blocks=True,
                         client_id="gw-kill-broker")
    rng = random.Random(7)  # noqa: S311 - kill timing, not cryptography
    kills = 0
    stop = threading.Event()

    def killer() -> None:
        nonlocal kills
        while kills < 10 and not stop.is_set():
            # Each kill hits a live connection mid-stream, at a random moment.
            wait_until(lambda: daemon.stats()["connected"], 20, "daemon reconnected")
            time.sleep(rng.uniform(0.2, 0.6))
            mosquitto.kill()
            time.sleep(rng.uniform(0.05, 0.3))
            mosquitto.restart()
            kills += 1

    with running(cfg) as daemon:
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        for k in range(40):
            for asset, samples in assets.items():
                plant.publish(f"{unique_topic}/{asset}/vibration",
                              block_payload(samples[64 * k: 64 * (k + 1)], 64 * k, 100.0))
        thread.join(60)
        stop.set()
        assert kills >= 10
        wait_until(lambda: len(first_occurrences(collector.bodies())) == 3
                   and all(len(v) == 40 for v in first_occurrences(collector.bodies()).values()),
                   120, "every window's prediction")
        wait_until(lambda: daemon.stats()["connected"], 20, "daemon reconnected")
        stats = daemon.stats()
    collector.close()
    plant.close()
    per_asset = first_occurrences(collector.bodies())
    for asset, preds in per_asset.items():
        assert [p["seq"] for p in preds] == list(range(40)), asset  # exactly once, in order
        expected = expected_outputs(assets[asset], "litert", "model.tflite")[::2]  # hop 64
        for p, want in zip(preds, expected, strict=True):
            assert p["score"] == pytest.approx(float(want.max()), abs=1e-6)
    assert stats["connects"] >= 11  # the first connection and one after every kill


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


@pytest.mark.skipif(shutil.which("mount") is None, reason="needs mount(8)")
def test_full_disk_degrades_to_memory_without_losing_predictions(mosquitto, mqtt_client,
                                                                 unique_topic, tmp_path):
    state = tmp_path / "tiny"
    state.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(state)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
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
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


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
    assert stats["pipelines"]["vibration"]["dropped_inbox_full"] > 0  # bounded, counted


def _simple(prefix: str) -> str:
    return f"""
  - name: vibration
    subscribe: ["{prefix}/+/vibration"]
    bundle: "{EXAMPLE}"
    decoder: {{type: json, samples: samples, timestamp: ts, sequence: seq}}
    batch: {{max_batch: 8, max_wait_ms: 5}}
"""
