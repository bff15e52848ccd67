"""The daemon end to end against a real mosquitto: sensor messages in, predictions out."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from floorline.edge.backends import create
from floorline.edge.bundle.bundle import Bundle
from floorline.edge.config.model import parse_config
from floorline.edge.daemon.daemon import Daemon
from floorline.edge.demo.signals import Condition
from floorline.edge.stream.normalization import normalize
from tests.daemon_harness import (
    EXAMPLE,
    TEMP_ANOMALY,
    asset_samples,
    config_text,
    publish_stream,
    running,
    sample_payload,
    vibration_pipeline,
)
from tests.mqtt_broker import wait_until

WINDOW, HOP = 64, 32


def expected_outputs(samples: np.ndarray, backend: str, artifact: str) -> np.ndarray:
    """What the bundle says for every window of SAMPLES, computed directly on the backend."""
    with Bundle.open(EXAMPLE) as bundle:
        starts = range(0, len(samples) - WINDOW + 1, HOP)
        x = np.stack([samples[s : s + WINDOW] for s in starts])
        runner = create(backend, bundle.path / artifact)
        out = runner.infer(normalize(x, bundle.manifest.input))
        runner.close()
    return out


@pytest.mark.parametrize(("backend", "artifact"), [("litert", "model.tflite"),
                                                   ("onnx", "model.onnx")])
def test_predictions_equal_direct_backend_inference_per_asset(
    mosquitto, mqtt_client, unique_topic, backend, artifact
):
    prefix = unique_topic
    streams = {
        "pump-a": asset_samples(256, seed=1),
        "pump-b": asset_samples(256, seed=2, condition=Condition.IMBALANCE),
    }
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    cfg = config_text(mosquitto, vibration_pipeline(prefix, backend=backend))
    with running(cfg):
        # Interleave the two assets message by message: their windows must not mix.
        for i in range(256):
            for n, (asset, samples) in enumerate(streams.items()):
                probe.publish(f"{prefix}/{asset}/vibration",
                              sample_payload(1000.0 * (n + 1) + i / 1000, i, samples[i]), qos=1)
        msgs = probe.wait_for(2 * 7, "floorline/gw-test/pred/vibration/+", timeout=20)
    by_asset: dict[str, list[dict]] = {}
    for m in msgs:
        body = orjson.loads(m.payload)
        assert m.qos == 1  # QoS 1 predictions
        by_asset.setdefault(body["asset"], []).append(body)
    assert set(by_asset) == set(streams)
    for n, (asset, samples) in enumerate(streams.items()):
        got = sorted(by_asset[asset], key=lambda b: b["seq"])
        assert [b["seq"] for b in got] == list(range(7))  # (256 - 64) / 32 + 1 windows
        expected = expected_outputs(samples, backend, artifact)
        with Bundle.open(EXAMPLE) as bundle:
            labels = bundle.manifest.heads[0].labels
        for body, want in zip(got, expected, strict=True):
            scores = np.array([body["scores"][label] for label in labels])
            assert np.abs(scores - want).max() <= 1e-6
            assert body["label"] == labels[int(want.argmax())]
            # Window times come from this asset's own clock (1000 s apart per asset).
            assert body["window"]["start"] == pytest.approx(1000.0 * (n + 1) + body["seq"] * 0.032)
            assert body["window"]["end"] - body["window"]["start"] == pytest.approx(0.063)
            assert body["model"]["artifact"] == artifact
            assert body["model"]["name"] == "pdm-classifier"
            assert body["gateway"] == "gw-test"
            assert body["latency_ms"]["end_to_end"] >= body["latency_ms"]["inference"]


def test_a_gap_in_timestamps_resets_the_window(mosquitto, mqtt_client, unique_topic):
    samples = asset_samples(200, seed=3)
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    topic = f"{unique_topic}/pump-g/vibration"
    with running(config_text(mosquitto, vibration_pipeline(unique_topic))) as daemon:
        publish_stream(probe, topic, samples[:80], t0=50.0)  # one window (0-63), 16 more held
        # 200 ms later: never mix the 16 held samples with what follows.
        publish_stream(probe, topic, samples[80:144], t0=50.2, first_seq=80)
        msgs = probe.wait_for(2, "floorline/gw-test/pred/vibration/+", timeout=15)
        pipeline = daemon.pipelines[0]
        wait_until(lambda: pipeline.counters["decoded"] >= 144, 10, "all decoded")
        assert pipeline.counters["windows"] == 2
    starts = sorted(orjson.loads(m.payload)["window"]["start"] for m in msgs)
    assert starts[0] == pytest.approx(50.0)
    assert starts[1] == pytest.approx(50.2 + 0.080)  # the first sample after the gap


def test_batches_never_exceed_max_batch(mosquitto, mqtt_client, unique_topic):
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    pipeline = vibration_pipeline(unique_topic, max_batch=4, max_wait_ms=50).replace(
        "decoder: {type: json, timestamp: ts, sequence: seq}",
        "decoder: {type: json, samples: samples, timestamp: ts, sequence: seq}",
    )
    with running(config_text(mosquitto, pipeline)):
        # 10 assets, one whole window per message: 10 windows arrive within a few ms.
        for a in range(10):
            block = asset_samples(WINDOW, seed=10 + a)
            body = {"samples": [
                {"ts": 7.0 + i / 1000, "seq": i, "accel_x": float(r[0]),
                 "accel_y": float(r[1]), "accel_z": float(r[2])}
                for i, r in enumerate(block)
            ]}
            probe.publish(f"{unique_topic}/pump-{a}/vibration", orjson.dumps(body), qos=1)
        msgs = probe.wait_for(10, "floorline/gw-test/pred/vibration/+", timeout=15)
    batches = [orjson.loads(m.payload)["batch"] for m in msgs]
    assert max(batches) <= 4
    assert max(batches) > 1  # windows from different assets really were batched together


def test_a_lone_window_waits_about_max_wait_ms_not_longer(mosquitto, mqtt_client, unique_topic):
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    max_wait_ms = 300
    pipeline = vibration_pipeline(unique_topic, max_batch=32, max_wait_ms=max_wait_ms)
    with running(config_text(mosquitto, pipeline)):
        publish_stream(probe, f"{unique_topic}/pump-w/vibration", asset_samples(64, 5), t0=1.0)
        (msg,) = probe.wait_for(1, "floorline/gw-test/pred/vibration/+", timeout=10)
    body = orjson.loads(msg.payload)
    assert body["batch"] == 1
    # It waited for company up to max_wait_ms, then went alone. The upper margin is generous:
    # this asserts the batcher's bound, not the machine's speed.
    assert max_wait_ms * 0.95 <= body["latency_ms"]["end_to_end"] <= max_wait_ms + 700


def test_bad_input_is_dead_lettered_by_reason_while_good_traffic_continues(
    mosquitto, mqtt_client, unique_topic
):
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    probe.subscribe("floorline/gw-test/dlq/#", qos=1)
    binary = f"""
  - name: blocks
    subscribe: ["{unique_topic}/+/block"]
    bundle: "{EXAMPLE}"
    decoder: {{type: binary}}
    window: {{}}
"""
    cfg = config_text(
        mosquitto, vibration_pipeline(unique_topic) + binary,
        extra="limits: {max_payload_bytes: 2048}\n",
    )
    bad = {
        "malformed": b'{"ts": 1.0, "seq": ',
        "missing_field": b'{"ts": 1.0, "seq": 1, "accel_x": 0.1, "accel_y": 0.2}',
        "extra_field": b'{"ts": 1.0, "seq": 1, "accel_x": 0.1, "accel_y": 0.2, "accel_z": 0.3,'
                       b' "rpm": 1500}',
        "non_numeric": b'{"ts": 1.0, "seq": 1, "accel_x": "0.1", "accel_y": 0.2, "accel_z": 0.3}',
        "non_finite": b'{"ts": 1.0, "seq": 1, "accel_x": 1e400, "accel_y": 0.2, "accel_z": 0.3}',
        "too_large": b'{"pad": "' + b"x" * 4096 + b'"}',
    }
    samples = asset_samples(128, seed=8)
    topic = f"{unique_topic}/pump-d/vibration"
    with running(cfg) as daemon:
        for i in range(128):
            if i % 20 == 5 and bad:
                _, payload = bad.popitem()
                probe.publish(f"{unique_topic}/pump-x/vibration", payload, qos=1)
            probe.publish(topic, sample_payload(3.0 + i / 1000, i, samples[i]), qos=1)
        while bad:
            _, payload = bad.popitem()
            probe.publish(f"{unique_topic}/pump-x/vibration", payload, qos=1)
        probe.publish(f"{unique_topic}/pump-y/block", b"\x00" * 5, qos=1)  # not 12-byte rows
        probe.publish(f"{unique_topic}/pump-y/block", struct.pack("<3f", 0, float("nan"), 1),
                      qos=1)
        dlq = probe.wait_for(8, "floorline/gw-test/dlq/#", timeout=15)
        preds = probe.wait_for(3, "floorline/gw-test/pred/vibration/+", timeout=15)
        stats = daemon.stats()
    reasons = sorted(orjson.loads(m.payload)["reason"] for m in dlq)
    assert reasons == sorted(["malformed", "missing_field", "extra_field", "non_numeric",
                              "non_finite", "too_large", "wrong_length", "non_finite"])
    for m in dlq:
        body = orjson.loads(m.payload)
        assert set(body) == {"pipeline", "reason", "topic", "size", "detail", "ts"}
        assert len(m.payload) < 700  # bounded: never the offending payload itself
    assert {orjson.loads(m.payload)["seq"] for m in preds} == {0, 1, 2}
    assert stats["pipelines"]["vibration"]["dead_letters"]["too_large"] == 1


def test_unroutable_topics_are_counted_and_reported(mosquitto, mqtt_client, unique_topic):
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/dlq/#", qos=1)
    with running(config_text(mosquitto, vibration_pipeline(unique_topic))) as daemon:
        # The broker only forwards subscribed topics; a message matching no pipeline can still
        # arrive (overlapping or shared subscriptions), so feed the router directly.
        daemon._on_message("somewhere/else", b"12345", 0.0)
        (msg,) = probe.wait_for(1, "floorline/gw-test/dlq/_unrouted", timeout=10)
        assert daemon.stats()["unroutable"] == 1
    body = orjson.loads(msg.payload)
    assert (body["reason"], body["topic"], body["size"]) == ("unroutable", "somewhere/else", 5)


def test_two_pipelines_with_different_bundles_and_backends(mosquitto, mqtt_client, unique_topic):
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    temperature = f"""
  - name: temperature
    subscribe: ["{unique_topic}/+/temperature"]
    bundle: "{TEMP_ANOMALY}"
    backend: onnx
    decoder: {{type: json, timestamp: ts}}
    window: {{hop: 16, max_seq_gap: null}}
"""
    cfg = config_text(mosquitto, vibration_pipeline(unique_topic, backend="litert") + temperature)
    with running(cfg) as daemon:
        runtimes = {p.name: p.model.backend.runtime for p in daemon.pipelines}
        publish_stream(probe, f"{unique_topic}/pump-t/vibration", asset_samples(64, 4), t0=9.0)
        for i in range(16):
            temp = 40.0 + (8.0 if i == 9 else 0.0)  # a spike: anomalous
            probe.publish(f"{unique_topic}/pump-t/temperature",
                          orjson.dumps({"ts": 9.0 + i, "temperature_c": temp}), qos=1)
        vib = probe.wait_for(1, "floorline/gw-test/pred/vibration/+", timeout=10)
        tmp = probe.wait_for(1, "floorline/gw-test/pred/temperature/+", timeout=10)
    assert runtimes["vibration"].startswith("ai_edge_litert")
    assert runtimes["temperature"].startswith("onnxruntime")
    assert orjson.loads(vib[0].payload)["model"]["name"] == "pdm-classifier"
    anomaly = orjson.loads(tmp[0].payload)
    assert anomaly["model"]["name"] == "temp-anomaly"
    assert anomaly["anomaly"]["threshold"] == 0.5
    assert anomaly["anomaly"]["anomalous"] is True
    assert anomaly["anomaly"]["score"] >= 0.5


def test_retained_state_is_online_then_offline_after_stop(mosquitto, mqtt_client, unique_topic):
    cfg = config_text(mosquitto, vibration_pipeline(unique_topic))
    with running(cfg):
        probe = mqtt_client(mosquitto)
        probe.subscribe("floorline/gw-test/state", qos=1)
        (online,) = probe.wait_for(1, timeout=10)
    assert online.retain
    state = orjson.loads(online.payload)
    assert state["state"] == "online"
    assert state["pipelines"][0]["model"] == "pdm-classifier"
    wait_until(lambda: len(probe.messages) >= 2, 10, "offline state")
    offline = orjson.loads(probe.messages[1].payload)
    assert (offline["state"], offline["reason"]) == ("offline", "shutdown")
    late = mqtt_client(mosquitto)
    late.subscribe("floorline/gw-test/state", qos=1)
    (retained,) = late.wait_for(1, timeout=10)
    assert orjson.loads(retained.payload)["state"] == "offline"


def test_mqtt5_maximum_packet_size_keeps_giant_messages_off_the_gateway(
    mosquitto, mqtt_client, unique_topic
):
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/dlq/#", qos=1)
    cfg = config_text(
        mosquitto, vibration_pipeline(unique_topic),
        extra="limits: {max_payload_bytes: 1024, max_packet_bytes: 4096}\n",
    ).replace("keepalive: 10,", "keepalive: 10, protocol: '5',")
    with running(cfg) as daemon:
        topic = f"{unique_topic}/pump-z/vibration"
        probe.publish(topic, b"x" * 100_000, qos=1)  # over the packet size: never delivered
        probe.publish(topic, b"y" * 2_000, qos=1)  # over the payload limit: dead-lettered
        (dlq,) = probe.wait_for(1, "floorline/gw-test/dlq/#", timeout=10)
        pipeline = daemon.pipelines[0]
        assert pipeline.counters["received"] == 1
        assert daemon.stats()["connects"] == 1  # the broker dropped the giant, not the client
    body = orjson.loads(dlq.payload)
    assert (body["reason"], body["size"]) == ("too_large", 2000)


# -- oversize input: refused on arrival, before any inbox ----------------------------------------


def _offline_daemon(tmp_path, pipelines: str, limits: str = "") -> Daemon:
    """A loaded daemon (pipelines built, workers not started, no connection) whose publish path
    and acknowledgements are recorded in ``daemon.sent`` and ``daemon.acked``."""
    daemon = Daemon(parse_config(
        f"gateway: {{id: gw-test}}\nstate_dir: '{tmp_path / 'state'}'\n"
        "broker: {clean_start: false, session_expiry_s: 3600, client_id: gw-offline}\n"
        f"{limits}pipelines:\n{pipelines}"
    ))
    daemon.load()
    assert daemon.publisher is not None
    daemon.sent = []  # type: ignore[attr-defined]
    daemon.acked = []  # type: ignore[attr-defined]
    daemon.publisher.submit = lambda messages, **_: daemon.sent.extend(messages)
    daemon.acks.ack = lambda mid, _qos: daemon.acked.append(mid)
    return daemon


def _json_pipeline(name: str, topic: str, ack: str = "receipt") -> str:
    return f"""
  - name: {name}
    subscribe: ["{topic}"]
    qos: 1
    ack: {ack}
    bundle: "{EXAMPLE}"
    decoder: {{type: json, timestamp: ts, sequence: seq}}
"""


@pytest.mark.parametrize("ack", ["receipt", "durable"])
def test_a_giant_message_is_dead_lettered_on_arrival_and_crowds_out_nothing(tmp_path, ack):
    # MQTT 3.1.1 negotiates no maximum packet size: whatever the broker takes reaches the router.
    daemon = _offline_daemon(tmp_path, _json_pipeline("vibration", "plant/+/vibration", ack))
    try:
        topic = "plant/pump-a/vibration"
        samples = asset_samples(200, seed=3)
        giant = b'{"pad": "' + b"x" * (16 << 20) + b'"}'
        good = [(topic, sample_payload(1.0 + i / 1000, i, row), 100 + i, 1)
                for i, row in enumerate(samples)]
        daemon.router.on_messages([*good[:100], (topic, giant, 7, 1), *good[100:]], 0.0)
        pipeline = daemon.pipelines[0]
        assert pipeline.inbox.qsize() == len(good)  # every good message queued, the giant not
        assert pipeline.counters["dropped_inbox_full"] == 0
        (report,) = daemon.sent
        body = orjson.loads(report.payload)
        assert (body["reason"], body["topic"], body["size"]) == ("too_large", topic, len(giant))
        assert report.topic == "floorline/gw-test/dlq/vibration"
        assert len(report.payload) < 700  # never the payload
        assert 7 in daemon.acked  # its QoS 1 input is acknowledged at once, in both modes
        assert (pipeline.counters["received"], pipeline.dead_letters["too_large"]) == (201, 1)
    finally:
        daemon.stop()


def test_no_single_message_may_take_more_than_a_quarter_of_a_receipt_inbox(tmp_path):
    daemon = _offline_daemon(
        tmp_path,
        _json_pipeline("receipt", "plant/+/vibration")
        + _json_pipeline("durable", "plant/+/durable", "durable"),
        limits="limits: {inbox_bytes: 4096, max_payload_bytes: 65536}\n",
    )
    try:
        receipt, durable = daemon.pipelines
        assert receipt.max_payload == 4096 // 4 - 128  # a quarter, less the per-message overhead
        assert durable.max_payload == 65536  # no byte bound on a durable inbox (MQTT 5 flow)
        daemon.router.on_messages([
            ("plant/a/vibration", b"x" * 897, 1, 1),  # one byte over the share
            ("plant/a/vibration", b"y" * 896, 2, 1),  # exactly the share
            ("plant/a/durable", b"z" * 2000, 3, 1),  # over the receipt share, fits durable
            ("plant/a/durable", b"w" * 65537, 4, 1),
        ], 0.0)
        assert [m.payload[:1] for m in receipt.inbox.get_many(10, 0)] == [b"y"]
        assert [m.payload[:1] for m in durable.inbox.get_many(10, 0)] == [b"z"]
        reports = [orjson.loads(m.payload) for m in daemon.sent]
        assert [(r["pipeline"], r["reason"], r["size"]) for r in reports] == [
            ("receipt", "too_large", 897), ("durable", "too_large", 65537)]
        assert reports[0]["detail"] == "over 896 bytes"
        assert daemon.acked == [1, 2, 4]  # 3 waits for its durable pipeline
    finally:
        daemon.stop()


def test_messages_dropped_by_a_full_inbox_are_logged_at_most_once_per_interval(tmp_path, caplog):
    daemon = _offline_daemon(tmp_path, _json_pipeline("vibration", "plant/+/vibration"),
                             limits="limits: {inbox_size: 10}\n")
    try:
        batch = [("plant/a/vibration", b"{}", 0, 0)] * 10
        with caplog.at_level("WARNING", logger="floorline.edge.daemon.pipeline"):
            for _ in range(4):
                daemon.router.on_messages(batch, 0.0)  # the first fills the inbox
        assert daemon.pipelines[0].counters["dropped_inbox_full"] == 30
        (record,) = [r for r in caplog.records if "inbox full" in r.getMessage()]
        assert "vibration" in record.getMessage()
        assert "10 messages dropped since the last report, 10 in all" in record.getMessage()
    finally:
        daemon.stop()


# -- sequence numbers beyond int64 ---------------------------------------------------------------


def _durable(cfg: str) -> str:
    pipeline = cfg.replace("    qos: 1\n", "    qos: 1\n    ack: durable\n", 1)
    return pipeline.replace("keepalive: 10,", "keepalive: 10, clean_start: false, "
                            "session_expiry_s: 3600, client_id: gw-durable-u64,")


def test_durable_sequences_past_int64_and_the_wrap_are_journaled_acknowledged_and_resumed(
    mosquitto, mqtt_client, unique_topic, tmp_path
):
    # Once: the window state could not be packed, the worker died at its first journal write,
    # the daemon stayed online with input unacknowledged, and each restart died again.
    cfg = _durable(config_text(mosquitto, vibration_pipeline(unique_topic),
                               state_dir=tmp_path / "state"))
    first = 2**64 - 40  # crosses 2**64 - 1 → 0 at sample 40
    samples = asset_samples(128, seed=64)
    topic = f"{unique_topic}/pump-u/vibration"
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)

    def publish(indices: range) -> None:
        for i in indices:
            probe.publish(topic, sample_payload(5.0 + i / 1000, (first + i) % 2**64, samples[i]),
                          qos=1)

    with running(cfg) as daemon:
        publish(range(80))
        probe.wait_for(1, "floorline/gw-test/pred/#", timeout=15)
        wait_until(lambda: daemon.stats()["unacknowledged_input"] == 0, 10, "all acknowledged")
        assert daemon.pipelines[0].is_alive()
    with running(cfg) as daemon:
        assert daemon.pipelines[0].counters["restored_assets"] == 1
        publish(range(80, 128))
        preds = probe.wait_for(3, "floorline/gw-test/pred/#", timeout=15)
        wait_until(lambda: daemon.stats()["unacknowledged_input"] == 0, 10, "all acknowledged")
        stats = daemon.pipelines[0].stats()
    assert [orjson.loads(m.payload)["seq"] for m in preds] == [0, 1, 2]
    assert sum(stats["window_resets"].values()) == 0  # one stream across the restart and the wrap
    assert stats["dead_letters"] == {}


def test_a_reload_carries_windows_whose_sequences_are_past_int64(
    mosquitto, mqtt_client, unique_topic
):
    # Once: exporting the windows for the switch raised, and SIGHUP made the daemon exit 1.
    cfg = config_text(mosquitto, vibration_pipeline(unique_topic))
    samples = asset_samples(64, seed=65)
    topic = f"{unique_topic}/pump-r/vibration"
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    with running(cfg) as daemon:
        publish_stream(probe, topic, samples[:40], t0=7.0, first_seq=2**63 - 20)
        wait_until(lambda: daemon.pipelines[0].counters["decoded"] == 40, 10, "40 decoded")
        result = daemon.apply(parse_config(cfg))
        assert (result.ok, result.carried_over) == (True, ("vibration",))
        for i in range(40, 64):
            seq = 2**63 - 20 + i
            probe.publish(topic, sample_payload(7.0 + seq / 1000.0, seq, samples[i]), qos=1)
        (pred,) = probe.wait_for(1, "floorline/gw-test/pred/#", timeout=15)
    assert orjson.loads(pred.payload)["seq"] == 0  # the first window, across the switch


# -- unexpected errors in a worker ---------------------------------------------------------------


def test_an_unexpected_error_in_a_worker_is_dead_lettered_counted_and_the_stream_continues(
    mosquitto, mqtt_client, unique_topic
):
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    probe.subscribe("floorline/gw-test/dlq/#", qos=1)
    samples = asset_samples(128, seed=66)
    with running(config_text(mosquitto, vibration_pipeline(unique_topic))) as daemon:
        pipeline = daemon.pipelines[0]
        decode = pipeline._decoder.decode
        infer = pipeline.model.backend.infer
        failed_batches: list[int] = []

        def flaky_decode(payload: bytes, topic: str = "") -> object:
            if b"boom" in payload:
                raise RuntimeError("injected: not a DecodeError")
            return decode(payload, topic)

        def flaky_infer(x: np.ndarray) -> np.ndarray:
            if not failed_batches:
                failed_batches.append(len(x))
                raise ValueError("injected: not a BackendError")
            return infer(x)

        pipeline._decoder.decode = flaky_decode  # type: ignore[method-assign]
        pipeline.model.backend.infer = flaky_infer  # type: ignore[method-assign]
        for i, row in enumerate(samples):
            if i % 40 == 3:
                probe.publish(f"{unique_topic}/pump-x/vibration", b'{"boom": %d}' % i, qos=1)
            probe.publish(f"{unique_topic}/pump-e/vibration",
                          sample_payload(11.0 + i / 1000, i, row), qos=1)
        wait_until(lambda: pipeline.counters["windows"] == 3 and not pipeline._batcher.timeout(),
                   15, "three windows through the batcher")
        wait_until(lambda: pipeline.counters["predictions"] + pipeline.dead_letters[
            "internal_error"] == 3 + 4 and pipeline.inbox.empty(), 10, "every window accounted")
        assert pipeline.is_alive()
        assert daemon.problem() is None
        stats = pipeline.stats()
    (lost,) = failed_batches
    assert stats["internal_errors"] == 4 + 1  # four messages, one batch
    assert stats["dead_letters"] == {"internal_error": 4 + lost}
    assert stats["predictions"] == 3 - lost >= 1  # the stream went on after the failed batch
    dlq = probe.wait_for(4 + lost, "floorline/gw-test/dlq/#", timeout=10)
    bodies = [orjson.loads(m.payload) for m in dlq]
    assert {b["reason"] for b in bodies} == {"internal_error"}
    messages = [b for b in bodies if b["size"]]
    assert [b["topic"] for b in messages] == [f"{unique_topic}/pump-x/vibration"] * 4
    assert all("RuntimeError" in b["detail"] for b in messages)
