"""``workers: N``: a pipeline's stages in N processes (docs/workers.md), real mosquitto."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest

from floorline.edge.config.model import parse_config
from floorline.edge.daemon import workers as workers_module
from floorline.edge.daemon.workers import WorkerPipeline
from floorline.edge.delivery.outbox import SeqMarks
from floorline.edge.delivery.publisher import Predictions
from floorline.edge.errors import ConfigError
from floorline.edge.messages import Outbound
from tests.daemon_harness import (
    EXAMPLE,
    asset_samples,
    config_text,
    running,
    sample_payload,
)
from tests.mqtt_broker import wait_until

ASSETS = 10
SAMPLES = 192  # per asset and stream: 5 windows of 64 at hop 32 per-sample, 3 block windows
BLOCK = 32


VIB, BLK = ("vib",), ("blk",)
BOTH = ("vib", "blk")


def _pipelines(prefix: str, workers: int, which: tuple[str, ...] = BOTH) -> str:
    """Per-sample JSON (vib) and binary blocks (blk), or only those WHICH names.

    Each pipeline with N > 1 workers spawns N processes in a test (its daemon runs threads):
    a test that needs one stream runs one pipeline.
    """
    text = {"vib": f"""
  - name: vib
    subscribe: ["{prefix}/+/vibration"]
    bundle: "{EXAMPLE}"
    backend: litert
    decoder: {{type: json, timestamp: ts, sequence: seq}}
    asset: {{topic_segment: -2}}
    window: {{hop: 32}}
    batch: {{max_batch: 8, max_wait_ms: 5}}
    output: {{qos: 1}}
    workers: {workers}
""", "blk": f"""
  - name: blk
    subscribe: ["{prefix}/+/block"]
    bundle: "{EXAMPLE}"
    backend: litert
    decoder: {{type: binary, header: timestamp_sequence, sample_interval_ms: 1.0}}
    asset: {{topic_segment: -2}}
    batch: {{max_batch: 8, max_wait_ms: 5}}
    output: {{qos: 1}}
    workers: {workers}
"""}
    return "".join(text[name] for name in which)


def _block(samples: np.ndarray, first: int, t0: float) -> bytes:
    head = struct.pack("<dQ", t0 + first / 1000.0, first)
    return head + np.asarray(samples[first:first + BLOCK], dtype="<f4").tobytes()


def _feed(probe: Any, prefix: str, start: int, stop: int, t0: float = 5.0,
          which: tuple[str, ...] = BOTH) -> None:
    """Samples START..STOP of every asset, on the WHICH streams, assets interleaved."""
    data = [asset_samples(SAMPLES * 2, seed=100 + a) for a in range(ASSETS)]
    for i in range(start, stop):
        for a in range(ASSETS):
            if "vib" in which:
                probe.publish(f"{prefix}/m{a}/vibration",
                              sample_payload(t0 + i / 1000, i, data[a][i]), qos=1)
            if "blk" in which and i % BLOCK == 0:
                probe.publish(f"{prefix}/m{a}/block", _block(data[a], i, t0), qos=1)


def _by_asset(messages: list[Any], pipeline: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for m in messages:
        if f"/pred/{pipeline}/" in m.topic:
            body = orjson.loads(m.payload)
            out.setdefault(body["asset"], []).append(body)
    return out


def _rounded(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 4)  # a batch of another size may differ in the last bits
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return v


def _values(body: dict[str, Any]) -> tuple[Any, ...]:
    # What the model said about which window, without timings and batch sizes.
    skip = {"latency_ms", "ts", "inference_ms", "gateway", "received", "batch"}
    return tuple(sorted((k, orjson.dumps(_rounded(v))) for k, v in body.items()
                        if k not in skip))


def _run(mosquitto: Any, mqtt_client: Any, prefix: str, workers: int) -> dict[str, Any]:
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    probe.subscribe("floorline/gw-test/dlq/#", qos=1)
    per_sample = ASSETS * ((SAMPLES - 64) // 32 + 1)
    blocks = ASSETS * (SAMPLES // 64)
    with running(config_text(mosquitto, _pipelines(prefix, workers))) as daemon:
        if workers > 1:
            assert all(isinstance(p, WorkerPipeline) for p in daemon.pipelines)
        _feed(probe, prefix, 0, SAMPLES)
        probe.wait_for(per_sample + blocks, "floorline/gw-test/pred/#", timeout=60)
        time.sleep(0.3)  # nothing more may come
        stats = daemon.stats()
        problem = daemon.problem()
    messages = probe.messages
    assert not [m for m in messages if "/dlq/" in m.topic]
    assert problem is None
    return {"vib": _by_asset(messages, "vib"), "blk": _by_asset(messages, "blk"),
            "stats": stats, "count": len([m for m in messages if "/pred/" in m.topic])}


def _check_order(preds: dict[str, list[dict[str, Any]]], per_asset: int) -> None:
    assert len(preds) == ASSETS
    for asset, bodies in preds.items():
        seqs = [b["seq"] for b in bodies]
        assert seqs == list(range(per_asset)), (asset, seqs)  # complete, in order, once each
        starts = [b["window"]["start"] for b in bodies]
        assert starts == sorted(starts), (asset, starts)
        assert len(set(starts)) == len(starts), (asset, starts)


def test_two_workers_predict_every_asset_in_order_as_one_does(mosquitto, mqtt_client,
                                                              unique_topic):
    two = _run(mosquitto, mqtt_client, unique_topic + "/w2", 2)
    one = _run(mosquitto, mqtt_client, unique_topic + "/w1", 1)
    _check_order(two["vib"], (SAMPLES - 64) // 32 + 1)
    _check_order(two["blk"], SAMPLES // 64)
    for name in ("vib", "blk"):
        assert {a: [_values(b) for b in bodies] for a, bodies in two[name].items()} == \
               {a: [_values(b) for b in bodies] for a, bodies in one[name].items()}
    assert two["count"] == one["count"]
    stats = two["stats"]["pipelines"]["vib"]
    assert stats["received"] == ASSETS * SAMPLES
    assert stats["decoded"] == ASSETS * SAMPLES  # summed over the workers' reports
    assert len(stats["workers"]) == 2
    # Both workers took a share (10 assets by crc32: never all on one).
    assert all(w["alive"] for w in stats["workers"])


def _prefix_config(mosquitto: Any, prefix: str, workers: int, state: Path,
                   which: tuple[str, ...] = BOTH) -> str:
    return config_text(mosquitto, _pipelines(prefix, workers, which), state_dir=state)


def test_a_killed_worker_makes_the_daemon_degraded(mosquitto, mqtt_client, unique_topic):
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    probe.subscribe("floorline/gw-test/state", qos=1)
    state = Path(tempfile.mkdtemp(prefix="floorline-workers-"))
    with running(_prefix_config(mosquitto, unique_topic, 2, state, VIB)) as daemon:
        daemon.health_period_s = 0.1
        _feed(probe, unique_topic, 0, 64, which=VIB)
        probe.wait_for(ASSETS, "floorline/gw-test/pred/vib/+", timeout=30)
        vib = daemon.pipelines[0]
        assert isinstance(vib, WorkerPipeline)
        victim = vib.stats()["workers"][1]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: daemon.problem() is not None, 10, "problem reported")
        problem = daemon.problem()
        assert problem is not None
        assert "died: signal 9" in problem
        assert str(victim) in problem
        wait_until(lambda: daemon.health is not None, 10, "degraded")

        def degraded() -> bool:
            docs = [orjson.loads(m.payload) for m in probe.messages if m.topic.endswith("state")]
            return any(d.get("state") == "degraded" for d in docs)

        wait_until(degraded, 10, "degraded state published")
        # The other worker's assets go on; the dead one's are counted, not silently lost.
        probe.clear()
        _feed(probe, unique_topic, 64, 128, which=VIB)
        wait_until(lambda: any("/pred/vib/" in m.topic for m in probe.messages), 20,
                   "predictions from the live worker")
        stats = vib.stats()
        assert stats["dropped_worker_dead"] > 0
        survivors = {orjson.loads(m.payload)["asset"] for m in probe.messages
                     if "/pred/vib/" in m.topic}
        dead = {a for a in (f"m{i}" for i in range(ASSETS)) if vib._owner(a) == 1}
        assert survivors
        assert not survivors & dead


def test_reload_with_workers_carries_windows_and_seq(mosquitto, mqtt_client, unique_topic):
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/vib/#", qos=1)
    state = Path(tempfile.mkdtemp(prefix="floorline-workers-"))
    with running(_prefix_config(mosquitto, unique_topic, 1, state, VIB)) as daemon:
        _feed(probe, unique_topic, 0, 80, which=VIB)  # 1 window each, 48 samples of the next
        probe.wait_for(ASSETS, timeout=30)
        # 1 -> 2 workers, then 2 -> 3: each push builds new worker processes (spawned here).
        for workers, start, stop in ((2, 80, 144), (3, 144, SAMPLES)):
            result = daemon.apply(parse_config(_prefix_config(mosquitto, unique_topic, workers,
                                                              state, VIB)))
            assert result.ok, result.reason
            assert "vib" in result.carried_over
            vib = daemon.pipelines[0]
            assert isinstance(vib, WorkerPipeline)
            assert vib.start_method == "spawn"
            assert len(vib.stats()["workers"]) == workers
            _feed(probe, unique_topic, start, stop, which=VIB)
        per_asset = (SAMPLES - 64) // 32 + 1
        probe.wait_for(ASSETS * per_asset, timeout=60)
        time.sleep(0.3)
        assert daemon.problem() is None
    _check_order(_by_asset(probe.messages, "vib"), per_asset)


def test_a_reload_whose_workers_cannot_load_is_refused(mosquitto, mqtt_client, unique_topic,
                                                       monkeypatch):
    """Workers load before the switch: one that is not ready refuses the configuration."""
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/vib/#", qos=1)
    state = Path(tempfile.mkdtemp(prefix="floorline-workers-"))
    with running(_prefix_config(mosquitto, unique_topic, 2, state, VIB)) as daemon:
        before = [w["pid"] for w in daemon.pipelines[0].stats()["workers"]]
        monkeypatch.setattr(workers_module, "READY_S", 0.0)  # no spawned worker is that quick
        result = daemon.apply(parse_config(_prefix_config(mosquitto, unique_topic, 3, state,
                                                          VIB)))
        assert not result.ok
        assert "not ready within 0 s" in result.reason
        vib = daemon.pipelines[0]
        assert [w["pid"] for w in vib.stats()["workers"]] == before  # the old ones serve on
        _feed(probe, unique_topic, 0, 64, which=VIB)
        probe.wait_for(ASSETS, timeout=30)
        assert daemon.problem() is None


def test_seq_goes_on_across_a_restart_with_workers(mosquitto, mqtt_client, unique_topic):
    """The workers' windowers are seeded from the outbox: a restart never reuses a seq."""
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/blk/#", qos=1)
    state = Path(tempfile.mkdtemp(prefix="floorline-workers-"))
    for round_, (start, stop) in enumerate(((0, 64), (64, 128))):
        with running(_prefix_config(mosquitto, unique_topic, 2, state, BLK)):
            _feed(probe, unique_topic, start, stop, which=BLK)
            probe.wait_for(ASSETS * (round_ + 1), "floorline/gw-test/pred/blk/+", timeout=30)
    preds = _by_asset(probe.messages, "blk")
    assert len(preds) == ASSETS
    for asset, bodies in preds.items():
        seqs = [b["seq"] for b in bodies]
        # Strictly increasing, never reused: after a restart the outbox's floor (it reserves
        # ahead, so the second run may skip numbers, as with one worker).
        assert len(seqs) == 2, (asset, seqs)
        assert seqs[0] == 0 < seqs[1], (asset, seqs)


def test_floorline_run_forks_spawns_on_reload_and_workers_die_with_it(
    mosquitto, mqtt_client, unique_topic, tmp_path
):
    """The production path: `floorline run` forks its workers (no other thread runs yet); a
    SIGHUP reload spawns the next generation's; SIGKILLed, the daemon takes its workers along."""
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/blk/#", qos=1)
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(_prefix_config(mosquitto, unique_topic, 2, tmp_path / "state", BLK))
    log = tmp_path / "err.log"
    exe = Path(sys.executable).with_name("floorline")
    with log.open("w") as err:
        proc = subprocess.Popen([str(exe), "run", "--config", str(cfg)], stderr=err)

    def children() -> list[str]:
        # Worker processes only: spawning also starts multiprocessing's resource tracker.
        pids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        out = []
        for c in pids:
            with contextlib.suppress(OSError):  # one that just ended
                if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes():
                    out.append(c)
        return out

    try:
        wait_until(lambda: "worker processes (fork)" in log.read_text() or proc.poll() is not None,
                   60, "workers forked")
        wait_until(lambda: "connected" in log.read_text(), 30, "daemon connected")
        time.sleep(0.5)  # subscribed
        assert proc.poll() is None
        assert len(children()) == 2  # one pipeline, two workers
        _feed(probe, unique_topic, 0, 96, which=BLK)
        probe.wait_for(ASSETS, timeout=60)
        cfg.write_text(cfg.read_text().replace("workers: 2", "workers: 3"))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "worker processes (spawn)" in log.read_text(), 60, "reload spawned")
        wait_until(lambda: len(children()) == 3, 30, "old workers reaped, new ones running")
        _feed(probe, unique_topic, 96, SAMPLES, which=BLK)
        probe.wait_for(ASSETS * (SAMPLES // 64), timeout=60)
        workers = children()
    finally:
        proc.kill()  # no drain: the workers must notice on their own
        proc.wait(30)
    _check_order(_by_asset(probe.messages, "blk"), SAMPLES // 64)
    wait_until(lambda: not any(Path(f"/proc/{c}").exists() for c in workers), 15,
               "workers gone with the daemon")


BASE = f"""gateway: {{id: g}}
broker: {{host: 127.0.0.1, port: 1883}}
pipelines:
  - name: v
    subscribe: ["p/+/v"]
    qos: 1
    bundle: "{EXAMPLE}"
    decoder: {{type: json, timestamp: ts, sequence: seq}}
"""


@pytest.mark.parametrize(("extra", "words"), [
    ("    workers: 2\n    ack: durable\n", "workers: 2: ack: durable needs workers: 1"),
    ("    workers: 2\n    threads: 2\n", "workers: 2: threads: > 1 needs workers: 1"),
    ("    workers: 3\n    shadow: {bundle: '" + str(EXAMPLE) + "'}\n",
     "workers: 3: shadow: needs workers: 1"),
    ("    workers: 2\n    capture: {}\n", "capture: needs workers: 1"),
    ("    workers: 9\n", "workers"),
    ("    workers: 0\n", "workers"),
])
def test_config_refuses_what_workers_cannot_run(extra, words):
    assert parse_config(BASE).pipelines[0].workers == 1  # the default
    with pytest.raises(ConfigError, match=re.escape(words)):
        parse_config(BASE + extra)
    # The same keys with one worker are fine (the durable one only needs its own rules).
    if "durable" not in extra:
        one = re.sub(r"workers: \d", "workers: 1", extra)
        assert parse_config(BASE + one).pipelines[0].workers == 1


def test_config_refuses_assets_named_in_payloads():
    text = f"""gateway: {{id: g}}
broker: {{host: 127.0.0.1, port: 1883}}
pipelines:
  - name: v
    subscribe: ["p/v"]
    bundle: "{EXAMPLE}"
    decoder: {{type: json, timestamp: ts, sequence: seq, asset: id}}
    asset: {{payload: true}}
    workers: 2
"""
    with pytest.raises(ConfigError, match=re.escape("asset.payload: true needs workers: 1")):
        parse_config(text)
    assert parse_config(text.replace("workers: 2", "workers: 1")).pipelines[0].workers == 1


def test_a_frame_goes_out_in_order_in_runs_the_first_storing_every_seq():
    """The worker's frame (columns + seq marks) and the reader's submits of it, without processes:
    every message in order, runs of at most _SUBMIT, and the first run carries every counter the
    frames advanced (stored before any of their predictions can be published)."""
    sink = workers_module.Sink(None)
    first = [Outbound(f"pred/a/{i}", b"%d" % i, 1) for i in range(50)]
    sink(Predictions(first, SeqMarks("p", {"a": 50})))
    sink([Outbound("dlq/p", b"bad", 0)])  # a dead letter between two batches
    second = [Outbound(f"pred/b/{i}", b"%d" % i, 1) for i in range(40)]
    sink(Predictions(second, SeqMarks("p", {"a": 51, "b": 40})))
    frame_one = ("turn", *sink.take(), {"taken": 1}, {})
    assert not sink.pending()
    sink(Predictions([Outbound("pred/c/0", b"0", 1)], SeqMarks("p", {"c": 1})))
    frame_two = ("turn", *sink.take(), {"taken": 2}, {})

    submitted: list[Any] = []
    reader = SimpleNamespace(sink=submitted.append, name="p", _metrics_observe=None)
    WorkerPipeline._deliver(reader, [frame_one, frame_two])  # type: ignore[arg-type]

    flat = [m for run in submitted for m in run]
    assert flat == [*first, Outbound("dlq/p", b"bad", 0), *second, Outbound("pred/c/0", b"0", 1)]
    assert all(isinstance(m, Outbound) for m in flat)
    assert [len(run) for run in submitted] == [64, len(flat) - 64]
    assert isinstance(submitted[0], Predictions)
    assert submitted[0].marks == SeqMarks("p", {"a": 51, "b": 40, "c": 1})
    assert not any(isinstance(run, Predictions) for run in submitted[1:])
