"""The Sparkplug B input decoder: births, aliases, seq, deaths, rebirth requests, hostile input.

Payloads are built here with the generated protobuf module directly (``sparkplug_b_pb2``), never
with ``floorline.edge.sparkplug.payload``: the encoder under test does not check itself. The
daemon tests run the real gateway against mosquitto with the committed pdm-classifier bundle.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from floorline.edge.config.model import parse_config
from floorline.edge.decoders import REASONS, make_decoder
from floorline.edge.decoders.sparkplug import SparkplugDecoder, SparkplugDecoderConfig
from floorline.edge.errors import ConfigError, DecodeError
from floorline.edge.messages import Outbound
from floorline.edge.sparkplug import sparkplug_b_pb2 as pb
from tests.daemon_harness import EXAMPLE, asset_samples, config_text, running

FEATURES = ("accel_x", "accel_y", "accel_z")
DOUBLE, FLOAT, INT16, INT32, INT64, STRING, BOOLEAN = 10, 9, 2, 3, 4, 12, 11
T0 = 1_700_000_000_000  # ms


# --- payloads, built from the proto directly ------------------------------------------------------


def _metric(p: pb.Payload, name: str | None, alias: int | None, datatype: int | None,
            value: Any, ts: int | None = None) -> None:
    m = p.metrics.add()
    if name is not None:
        m.name = name
    if alias is not None:
        m.alias = alias
    if datatype is not None:
        m.datatype = datatype
    if ts is not None:
        m.timestamp = ts
    if value is None:
        m.is_null = True
    elif isinstance(value, bool):
        m.boolean_value = value
    elif isinstance(value, str):
        m.string_value = value
    elif isinstance(value, int):
        if datatype in (INT64, 8, 13):
            m.long_value = value & (2**64 - 1)
        else:
            m.int_value = value & (2**32 - 1)
    elif datatype == FLOAT:
        m.float_value = value
    else:
        m.double_value = value


def nbirth(seq: int = 0, bdseq: int = 0, extra: Sequence[tuple[str, int, int, Any]] = ()) -> bytes:
    p = pb.Payload(timestamp=T0, seq=seq)
    _metric(p, "bdSeq", None, INT64, bdseq)
    _metric(p, "Node Control/Rebirth", 0, BOOLEAN, False)
    for name, alias, datatype, value in extra:
        _metric(p, name, alias, datatype, value)
    return p.SerializeToString()


def dbirth(seq: int, base: int = 10, datatype: int = DOUBLE,
           values: Sequence[Any] = (0.0, 0.0, 0.0)) -> bytes:
    """A DBIRTH announcing the three features as aliases BASE, BASE+1, BASE+2 (+ a status)."""
    p = pb.Payload(timestamp=T0, seq=seq)
    for i, (name, value) in enumerate(zip(FEATURES, values, strict=True)):
        _metric(p, name, base + i, datatype, value)
    _metric(p, "Status", base + 3, STRING, "running")
    return p.SerializeToString()


def ddata(seq: int, row: Sequence[float], ts: int, base: int = 10, datatype: int | None = None,
          aliases: Sequence[int] | None = None) -> bytes:
    p = pb.Payload(timestamp=ts, seq=seq)
    for i, value in enumerate(row):
        alias = base + i if aliases is None else aliases[i]
        _metric(p, None, alias, datatype, float(value) if datatype is None else value, ts)
    return p.SerializeToString()


def ndeath(bdseq: int) -> bytes:
    p = pb.Payload(timestamp=T0)
    _metric(p, "bdSeq", None, INT64, bdseq)
    return p.SerializeToString()


def topic(kind: str, device: str | None = None, node: str = "n1", group: str = "g") -> str:
    return f"spBv1.0/{group}/{kind}/{node}" + (f"/{device}" if device else "")


class Sent:
    """The decoder's publish path, recorded."""

    def __init__(self) -> None:
        self.messages: list[Outbound] = []

    def __call__(self, messages: Sequence[Outbound]) -> None:
        self.messages.extend(messages)

    def rebirths(self) -> list[str]:
        out = []
        for m in self.messages:
            body = pb.Payload.FromString(m.payload)
            assert [(x.name, x.datatype, x.boolean_value) for x in body.metrics] == [
                ("Node Control/Rebirth", BOOLEAN, True)]
            assert (m.qos, m.retain) == (0, False)
            out.append(m.topic)
        return out


def decoder(**options: Any) -> tuple[SparkplugDecoder, Sent, list[float]]:
    sent = Sent()
    dec = make_decoder(SparkplugDecoderConfig(**options), FEATURES, "p", sent)
    assert isinstance(dec, SparkplugDecoder)
    clock = [100.0]
    dec.clock = lambda: clock[0]
    return dec, sent, clock


def reason(dec: SparkplugDecoder, payload: bytes, t: str) -> str:
    with pytest.raises(DecodeError) as info:
        dec.decode(payload, t)
    assert info.value.reason in REASONS
    assert len(info.value.detail) < 200
    return info.value.reason


def born(**options: Any) -> tuple[SparkplugDecoder, Sent, list[float]]:
    dec, sent, clock = decoder(**options)
    assert dec.decode(nbirth(seq=0), topic("NBIRTH")) is None
    assert dec.decode(dbirth(seq=1), topic("DBIRTH", "d1")) is None
    return dec, sent, clock


# --- the decoder in-process ----------------------------------------------------------------------


def test_births_then_data_by_alias_become_samples_with_timestamps_and_asset() -> None:
    dec, sent, _ = born()
    s = dec.decode(ddata(2, [0.5, -1.25, 2.0], T0 + 7), topic("DDATA", "d1"))
    assert s is not None
    assert s.asset == "n1.d1"
    assert s.values.tolist() == [[0.5, -1.25, 2.0]]
    assert s.timestamps is not None
    assert s.timestamps.tolist() == [(T0 + 7) / 1000]
    s2 = dec.decode(ddata(3, [1.0, 2.0, 3.0], T0 + 8), topic("DDATA", "d1"))
    assert s2 is not None
    assert s2.first_seq == s.first_seq + 1  # consecutive: the windower sees no gap
    assert sent.messages == []


def test_report_by_exception_carries_the_other_features_forward_from_the_birth() -> None:
    dec, _, _ = decoder()
    dec.decode(nbirth(), topic("NBIRTH"))
    dec.decode(dbirth(1, values=(1.0, 2.0, 3.0)), topic("DBIRTH", "d1"))
    s = dec.decode(ddata(2, [9.0], T0 + 1, base=11), topic("DDATA", "d1"))  # accel_y only
    assert s is not None
    assert s.values.tolist() == [[1.0, 9.0, 3.0]]


def test_data_by_name_a_metric_map_and_integer_types_with_their_sign() -> None:
    dec, _, _ = decoder(metrics={"accel_x": "Vib/X", "accel_y": "Vib/Y", "accel_z": "Vib/Z"})
    dec.decode(nbirth(), topic("NBIRTH"))
    p = pb.Payload(timestamp=T0, seq=1)
    _metric(p, "Vib/X", 1, INT16, 0)
    _metric(p, "Vib/Y", 2, INT32, 0)
    _metric(p, "Vib/Z", 3, INT64, 0)
    dec.decode(p.SerializeToString(), topic("DBIRTH", "d1"))
    q = pb.Payload(timestamp=T0, seq=2)
    _metric(q, "Vib/X", None, None, -3, T0 + 1)  # by name, two's complement in uint32
    _metric(q, None, 2, None, -70000, T0 + 1)
    _metric(q, None, 3, INT64, -(2**40), T0 + 1)  # (datatype only picks long_value here)
    s = dec.decode(q.SerializeToString(), topic("DDATA", "d1"))
    assert s is not None
    assert s.values.tolist() == [[-3.0, -70000.0, float(np.float32(-(2**40)))]]


def test_several_values_per_metric_are_a_block_of_samples() -> None:
    dec, _, _ = born()
    p = pb.Payload(timestamp=T0, seq=2)
    for k in range(4):
        for i in range(3):
            _metric(p, None, 10 + i, None, float(10 * k + i), T0 + k)
    s = dec.decode(p.SerializeToString(), topic("DDATA", "d1"))
    assert s is not None
    assert s.values.tolist() == [[10.0 * k, 10.0 * k + 1, 10.0 * k + 2] for k in range(4)]
    assert s.timestamps is not None
    assert s.timestamps.tolist() == [(T0 + k) / 1000 for k in range(4)]


def test_unknown_alias_is_dead_lettered_and_asks_one_rebirth_per_interval() -> None:
    dec, sent, clock = born(rebirth_interval_s=10)
    for i in range(50):  # a flood
        assert reason(dec, ddata(2 + i, [1, 2, 3], T0, base=90), topic("DDATA", "d1")) == \
            "sparkplug_unknown_alias"
    assert sent.rebirths() == ["spBv1.0/g/NCMD/n1"]
    clock[0] += 9.9
    reason(dec, ddata(52, [1, 2, 3], T0, base=90), topic("DDATA", "d1"))
    assert len(sent.messages) == 1
    clock[0] += 0.2
    reason(dec, ddata(53, [1, 2, 3], T0, base=90), topic("DDATA", "d1"))
    assert sent.rebirths() == ["spBv1.0/g/NCMD/n1"] * 2
    # Known aliases still decode meanwhile.
    assert dec.decode(ddata(54, [1, 2, 3], T0 + 5), topic("DDATA", "d1")) is not None


def test_many_nodes_asking_at_once_are_bounded_by_the_global_rate() -> None:
    dec, sent, clock = decoder()
    for i in range(100):  # data from 100 nodes never born
        assert reason(dec, ddata(0, [1, 2, 3], T0), topic("NDATA", node=f"x{i}")) == \
            "sparkplug_no_birth"
    assert len(sent.messages) == 10  # _REBIRTH_BURST
    clock[0] += 1.0
    for i in range(10, 30):
        reason(dec, ddata(1, [1, 2, 3], T0), topic("NDATA", node=f"x{i}"))
    assert len(sent.messages) == 20


def test_rebirth_false_sends_nothing() -> None:
    dec, sent, _ = decoder(rebirth=False)
    reason(dec, ddata(0, [1, 2, 3], T0), topic("DDATA", "d1"))
    assert sent.messages == []


def test_a_seq_gap_is_dead_lettered_asks_a_rebirth_and_restarts_the_windows() -> None:
    dec, sent, _ = born()
    a = dec.decode(ddata(2, [1, 2, 3], T0 + 1), topic("DDATA", "d1"))
    assert reason(dec, ddata(5, [1, 2, 3], T0 + 2), topic("DDATA", "d1")) == "sparkplug_seq_gap"
    assert sent.rebirths() == ["spBv1.0/g/NCMD/n1"]
    b = dec.decode(ddata(6, [1, 2, 3], T0 + 3), topic("DDATA", "d1"))  # in step again
    assert a is not None
    assert b is not None
    assert b.first_seq is not None
    assert a.first_seq is not None
    assert b.first_seq > a.first_seq + 1  # a step left out: the windower starts afresh


def test_seq_wraps_from_255_to_0_without_a_gap() -> None:
    dec, sent, _ = decoder()
    dec.decode(nbirth(seq=250), topic("NBIRTH"))
    dec.decode(dbirth(seq=251), topic("DBIRTH", "d1"))
    seqs = [*range(252, 256), *range(10)]
    out = [dec.decode(ddata(s, [1, 2, 3], T0 + i), topic("DDATA", "d1"))
           for i, s in enumerate(seqs)]
    assert all(s is not None for s in out)
    firsts = [s.first_seq for s in out if s is not None]
    assert firsts == list(range(firsts[0], firsts[0] + len(seqs)))
    assert sent.messages == []


def test_ndeath_clears_the_aliases_and_a_stale_will_is_ignored() -> None:
    dec, sent, _ = born()
    assert dec.decode(ndeath(bdseq=7), topic("NDEATH")) is None  # not this session's (bdSeq 0)
    assert dec.decode(ddata(2, [1, 2, 3], T0), topic("DDATA", "d1")) is not None
    assert dec.decode(ndeath(bdseq=0), topic("NDEATH")) is None
    assert reason(dec, ddata(3, [1, 2, 3], T0), topic("DDATA", "d1")) == "sparkplug_no_birth"
    assert sent.rebirths() == ["spBv1.0/g/NCMD/n1"]


def test_ddeath_clears_the_device_and_a_new_nbirth_clears_all_devices() -> None:
    dec, _, _ = born()
    p = pb.Payload(timestamp=T0, seq=2)
    dec.decode(p.SerializeToString(), topic("DDEATH", "d1"))
    assert reason(dec, ddata(3, [1, 2, 3], T0), topic("DDATA", "d1")) == "sparkplug_no_birth"
    dec.decode(dbirth(4), topic("DBIRTH", "d1"))
    assert dec.decode(ddata(5, [1, 2, 3], T0), topic("DDATA", "d1")) is not None
    dec.decode(nbirth(seq=0, bdseq=1), topic("NBIRTH"))
    assert reason(dec, ddata(1, [1, 2, 3], T0), topic("DDATA", "d1")) == "sparkplug_no_birth"


def test_control_messages_and_node_data_without_features_return_none() -> None:
    dec, _, _ = born()
    assert dec.decode(b"\x00garbage", topic("NCMD")) is None
    assert dec.decode(b"ONLINE", "spBv1.0/STATE/scada") is None
    p = pb.Payload(timestamp=T0, seq=2)
    _metric(p, None, 13, None, "stopped")  # the status only
    p.metrics[0].ClearField("string_value")
    p.metrics[0].string_value = "stopped"
    assert dec.decode(p.SerializeToString(), topic("DDATA", "d1")) is None


def test_hostile_payloads_are_dead_lettered_by_reason() -> None:
    dec, _, _ = born()
    good = ddata(2, [1, 2, 3], T0)
    cases = {
        "random": (random.Random(1).randbytes(200), "sparkplug_bad_payload"),  # noqa: S311
        "truncated": (good[:-3], "sparkplug_bad_payload"),
    }
    for name, (payload, want) in cases.items():
        assert reason(dec, payload, topic("DDATA", "d1")) == want, name
    assert reason(dec, good, "spBv1.0/g/DDATA/n1") == "sparkplug_bad_topic"
    assert reason(dec, good, "plant/line/pump") == "sparkplug_bad_topic"
    no_seq = pb.Payload(timestamp=T0)
    assert reason(dec, no_seq.SerializeToString(), topic("DDATA", "d1")) == \
        "sparkplug_bad_payload"
    # A string where the birth said Double; a Double datatype sent in int_value.
    s = pb.Payload(timestamp=T0, seq=2)
    _metric(s, None, 10, None, "1.5")
    assert reason(dec, s.SerializeToString(), topic("DDATA", "d1")) == "sparkplug_wrong_type"
    i = pb.Payload(timestamp=T0, seq=3)
    _metric(i, None, 10, INT32, 5)
    assert reason(dec, i.SerializeToString(), topic("DDATA", "d1")) == "sparkplug_wrong_type"
    huge = pb.Payload(timestamp=T0, seq=4)
    for k in range(10_001):
        huge.metrics.add(alias=10 + k % 3, double_value=1.0)
    assert reason(dec, huge.SerializeToString(), topic("DDATA", "d1")) == \
        "sparkplug_bad_payload"
    nan = ddata(5, [float("nan"), 1, 2], T0)
    assert reason(dec, nan, topic("DDATA", "d1")) == "non_finite"
    assert dec.decode(ddata(6, [1, 2, 3], T0), topic("DDATA", "d1")) is not None  # still going


def test_a_feature_born_with_a_string_datatype_is_a_wrong_type_on_data() -> None:
    dec, _, _ = decoder()
    dec.decode(nbirth(), topic("NBIRTH"))
    dec.decode(dbirth(1, datatype=STRING, values=("a", "b", "c")), topic("DBIRTH", "d1"))
    p = pb.Payload(timestamp=T0, seq=2)
    _metric(p, None, 10, None, "x")
    assert reason(dec, p.SerializeToString(), topic("DDATA", "d1")) == "sparkplug_wrong_type"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["NDATA", "DDATA", "DBIRTH", "NBIRTH", "DDEATH"]))
def test_any_bytes_give_samples_none_or_a_decode_error(payload: bytes, kind: str) -> None:
    dec, _, _ = born()
    error: DecodeError | None = None
    try:
        dec.decode(payload, topic(kind, "d1" if kind.startswith("D") else None))
    except DecodeError as exc:
        error = exc
    assert error is None or error.reason in REASONS


def test_config_errors_are_one_line() -> None:
    bad = {
        "{asset: '{node}'}": "lacks {device}",
        "{asset: '{node}.{device}.{line}'}": "uses {line}",
        "{node_asset: '{device}'}": "uses {device}",
        "{metrics: {accel_x: ''}}": "metric name is empty",
        "{rebirth_interval_s: 0}": "rebirth_interval_s",
        "{rebirth: maybe}": "rebirth",
    }
    for options, want in bad.items():
        text = _config("{type: sparkplug, " + options[1:]) + "    asset: {payload: true}\n"
        with pytest.raises(ConfigError) as info:
            parse_config(text)
        message = str(info.value)
        assert want in message, message
        lines = message.strip().splitlines()
        assert len(lines) == 2, message  # "invalid config:" and one line: where, what, why
        assert "decoder." in lines[1], message
    with pytest.raises(ConfigError, match="'speed' is not a feature of the model"):
        make_decoder(SparkplugDecoderConfig(metrics={"speed": "Speed"}), FEATURES)


def _config(decoder: str) -> str:
    return f"""gateway: {{id: gw}}
pipelines:
  - name: p
    subscribe: ["spBv1.0/g/#"]
    bundle: "{EXAMPLE}"
    decoder: {decoder}
"""


def test_a_pipeline_config_needs_asset_payload_and_refuses_durable_ack() -> None:
    base = _config("{type: sparkplug}")
    with pytest.raises(ConfigError, match=r"asset: \{payload: true\}"):
        parse_config(base)
    config = parse_config(base + "    asset: {payload: true}\n")
    assert config.pipelines[0].decoder.type == "sparkplug"
    with pytest.raises(ConfigError, match="ack: durable needs sequence numbers"):
        parse_config(base + "    asset: {payload: true}\n    ack: durable\n")


def test_a_round_robin_shared_subscription_is_refused_unless_sticky() -> None:
    # Births would reach one gateway and data another: every DDATA elsewhere is no_birth.
    shared = _config("{type: sparkplug}").replace('"spBv1.0/g/#"', '"$share/gws/spBv1.0/g/#"')
    shared += "    asset: {payload: true}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(shared)
    message = str(info.value)
    assert len(message.strip().splitlines()) == 2, message  # "invalid config:" and one line
    assert "round-robin shared subscription" in message
    assert "births would reach one gateway and data another" in message
    assert "share_dispatch: sticky" in message
    config = parse_config(shared + "    share_dispatch: sticky\n")
    assert config.pipelines[0].spanning_reason() is not None
    assert "sparkplug" in (config.pipelines[0].spanning_reason() or "")
    parse_config(_config("{type: sparkplug}") + "    asset: {payload: true}\n")  # no $share: ok


# --- the daemon against mosquitto --------------------------------------------------------------


def _pipeline(group: str, **decoder: Any) -> str:
    options = ", ".join(f"{k}: {v}" for k, v in {"type": "sparkplug", **decoder}.items())
    return f"""
  - name: spb
    subscribe: ["spBv1.0/{group}/#"]
    qos: 1
    bundle: "{EXAMPLE}"
    backend: litert
    decoder: {{{options}}}
    asset: {{payload: true}}
    window: {{max_gap_s: 1.0}}
    batch: {{max_batch: 8, max_wait_ms: 5}}
"""


def _group(unique_topic: str) -> str:
    return "g-" + unique_topic.rsplit("-", 1)[-1]


def test_daemon_predicts_from_sparkplug_births_and_ddata(mosquitto, mqtt_client, unique_topic):
    group = _group(unique_topic)
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    probe.subscribe(f"spBv1.0/{group}/NCMD/#", qos=1)
    samples = {d: asset_samples(128, seed=i) for i, d in enumerate(("pump-1", "pump-2"))}
    with running(config_text(mosquitto, _pipeline(group))) as daemon:
        seq = 0
        probe.publish(topic("NBIRTH", group=group, node="edge-a"), nbirth(seq=0), qos=1)
        for i, device in enumerate(samples):
            seq += 1
            probe.publish(topic("DBIRTH", device, "edge-a", group),
                          dbirth(seq, base=100 * (i + 1)), qos=1)
        for k in range(128):
            for i, (device, rows) in enumerate(samples.items()):
                seq = (seq + 1) % 256  # wraps several times over 256 messages
                probe.publish(topic("DDATA", device, "edge-a", group),
                              ddata(seq, rows[k], T0 + k, base=100 * (i + 1)), qos=1)
        preds = probe.wait_for(4, "floorline/gw-test/pred/spb/+", timeout=20)
        stats = daemon.stats()["pipelines"]["spb"]
    assets = sorted(m.topic.rsplit("/", 1)[-1] for m in preds)
    assert assets == ["edge-a.pump-1", "edge-a.pump-1", "edge-a.pump-2", "edge-a.pump-2"]
    assert all(orjson.loads(m.payload)["label"] for m in preds)
    assert stats["dead_letters"] == {}
    assert stats["control"] == 3
    assert [m for m in probe.messages if "/NCMD/" in m.topic] == []


def test_daemon_dead_letters_hostile_sparkplug_asks_one_rebirth_and_keeps_predicting(
    mosquitto, mqtt_client, unique_topic
):
    group = _group(unique_topic)
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    probe.subscribe("floorline/gw-test/dlq/#", qos=1)
    probe.subscribe(f"spBv1.0/{group}/NCMD/#", qos=1)
    rows = asset_samples(64, seed=3)
    node = "edge-b"
    with running(config_text(mosquitto, _pipeline(group, rebirth_interval_s=60))):
        # Data from a node whose birth this gateway never saw (it started later): a flood.
        for s in range(20):
            probe.publish(topic("DDATA", "pump", node, group), ddata(s, rows[0], T0), qos=1)
        dlq = probe.wait_for(20, "floorline/gw-test/dlq/#", timeout=15)
        ncmd = probe.wait_for(1, f"spBv1.0/{group}/NCMD/#", timeout=5)
        # The node answers with its births; then hostile payloads, one with a wrong type, data.
        probe.publish(topic("NBIRTH", group=group, node=node), nbirth(seq=0, bdseq=1), qos=1)
        probe.publish(topic("DBIRTH", "pump", node, group), dbirth(1), qos=1)
        probe.publish(topic("DDATA", "pump", node, group), b"\xff" * 64, qos=1)
        probe.publish(topic("DDATA", "pump", node, group), ddata(2, rows[0], T0)[:-5], qos=1)
        wrong = pb.Payload(timestamp=T0, seq=2)
        _metric(wrong, None, 10, None, "loud")
        probe.publish(topic("DDATA", "pump", node, group), wrong.SerializeToString(), qos=1)
        for k in range(64):
            probe.publish(topic("DDATA", "pump", node, group),
                          ddata((3 + k) % 256, rows[k], T0 + k), qos=1)
        preds = probe.wait_for(1, "floorline/gw-test/pred/spb/+", timeout=15)
        dlq = probe.wait_for(23, "floorline/gw-test/dlq/#", timeout=10)
    reasons = [orjson.loads(m.payload)["reason"] for m in dlq]
    assert reasons.count("sparkplug_no_birth") == 20
    assert reasons.count("sparkplug_bad_payload") == 2
    assert reasons.count("sparkplug_wrong_type") == 1
    assert [m.topic for m in ncmd] == [f"spBv1.0/{group}/NCMD/{node}"]
    body = pb.Payload.FromString(ncmd[0].payload)
    assert [(m.name, m.boolean_value) for m in body.metrics] == [("Node Control/Rebirth", True)]
    time.sleep(0.5)  # any second NCMD would have arrived by now
    assert len([m for m in probe.messages if "/NCMD/" in m.topic]) == 1
    assert preds[0].topic.endswith(f"/{node}.pump")


# --- the simulator's Sparkplug mode, read by the decoder ------------------------------------------


@pytest.mark.parametrize("mode", ["sample", "block"])
def test_the_simulator_speaks_sparkplug_the_decoder_reads_it_and_it_answers_rebirth(
    mode: str,
) -> None:
    from floorline.edge.demo.simulator import PlantConfig, PlantSimulator  # noqa: PLC0415

    published: list[tuple[str, bytes]] = []
    sim = PlantSimulator(PlantConfig(assets=2, fmt="sparkplug", mode=mode, block=16, seed=1,
                                     start_time=1_700_000_000.0, bdseq=3),
                         lambda t, p: published.append((t, p)))
    will_topic, will = sim.sparkplug_will()
    assert will_topic == "spBv1.0/plant/NDEATH/line1"
    assert [(m.name, m.long_value) for m in pb.Payload.FromString(will).metrics] == [("bdSeq", 3)]
    sim.step(200)  # over 256 messages in sample mode: seq wraps
    sim.flush()
    dec, sent, _ = decoder()
    rows: dict[str, int] = {}
    for t, p in published:
        s = dec.decode(p, t)
        if s is not None:
            assert s.asset is not None
            rows[s.asset] = rows.get(s.asset, 0) + len(s.values)
    assert rows == {"line1.pump-01": 200, "line1.pump-02": 200}
    assert sent.messages == []  # no gap, no unknown alias
    kinds = [t.split("/")[2] for t, _ in published[:3]]
    assert kinds == ["NBIRTH", "DBIRTH", "DBIRTH"]
    assert pb.Payload.FromString(published[0][1]).seq == 0
    # A rebirth request (built from the proto) makes it publish its births again.
    ask = pb.Payload(timestamp=T0)
    _metric(ask, "Node Control/Rebirth", None, BOOLEAN, True)
    assert not sim.command("spBv1.0/plant/NCMD/other", ask.SerializeToString())
    assert sim.command("spBv1.0/plant/NCMD/line1", ask.SerializeToString())
    published.clear()
    sim.step(1)
    assert [t.split("/")[2] for t, _ in published[:3]] == ["NBIRTH", "DBIRTH", "DBIRTH"]
    for t, p in published:
        dec.decode(p, t)
    assert sent.messages == []
