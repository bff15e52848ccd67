"""Issue 16's "Done when": a plant that speaks only Sparkplug B, Floorline between, a SCADA host.

The plant is the simulator in its Sparkplug mode (an edge node per line, a device per pump:
NBIRTH, DBIRTH, DDATA by alias, seq wrapping). The gateway runs two pipelines on the same input,
the same model and windows: ``spb`` publishes as a Sparkplug edge node, ``ref`` as plain MQTT
JSON. The SCADA host below is written from the spec against the generated protobuf module
(``sparkplug_b_pb2``) alone, never the gateway's codec: its own alias tables, datatype reading,
seq check and report-by-exception bookkeeping. Its view of every prediction must equal the
``ref`` pipeline's, window for window.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

pb = pytest.importorskip("floorline.edge.sparkplug.sparkplug_b_pb2")

from floorline.edge.bundle.bundle import Bundle  # noqa: E402
from floorline.edge.demo.signals import Condition  # noqa: E402
from floorline.edge.demo.simulator import Fault, PlantConfig, PlantSimulator  # noqa: E402
from tests.daemon_harness import EXAMPLE, config_text, running  # noqa: E402
from tests.mqtt_broker import wait_until  # noqa: E402
from tests.test_demo import summary_rows  # noqa: E402

NODE = "floorline-1"  # Floorline's edge node id
SAMPLES = 320  # per pump: (320 - 64) / 32 + 1 = 9 windows each
WINDOWS = (SAMPLES - 64) // 32 + 1


def pipelines(plant_group: str, out_group: str) -> str:
    common = f"""
    subscribe: ["spBv1.0/{plant_group}/#"]
    qos: 1
    bundle: "{EXAMPLE}"
    backend: litert
    decoder: {{type: sparkplug}}
    asset: {{payload: true}}
    window: {{hop: 32, max_gap_s: 1.0}}
    batch: {{max_batch: 16, max_wait_ms: 5}}
"""
    return (f"  - name: spb{common}"
            f"    output: {{type: sparkplug, group_id: {out_group}, edge_node_id: {NODE}}}\n"
            f"  - name: ref{common}    output: {{qos: 1}}\n")


# -- the host: the spec's protobuf, decoded here -------------------------------------------------

_FIELD = {pb.Int8: "int_value", pb.Int16: "int_value", pb.Int32: "int_value",
          pb.UInt8: "int_value", pb.UInt16: "int_value", pb.UInt32: "int_value",
          pb.Int64: "long_value", pb.UInt64: "long_value", pb.DateTime: "long_value",
          pb.Float: "float_value", pb.Double: "double_value", pb.Boolean: "boolean_value",
          pb.String: "string_value", pb.Text: "string_value"}
_BITS = {pb.Int8: 8, pb.Int16: 16, pb.Int32: 32, pb.Int64: 64}


def read(metric: Any, datatype: int) -> Any:
    """A metric's value as its datatype says (the spec's table), checking the oneof field."""
    if metric.is_null:
        return None
    field_name = _FIELD[datatype]
    assert metric.WhichOneof("value") == field_name, (datatype, metric)
    raw = getattr(metric, field_name)
    bits = _BITS.get(datatype)
    if bits is not None:  # two's complement of the type's width
        raw &= (1 << bits) - 1
        return raw - (1 << bits) if raw >> (bits - 1) else raw
    return raw


@dataclass
class Device:
    names: dict[int, str] = field(default_factory=dict)  # alias -> name (from its DBIRTH)
    types: dict[str, int] = field(default_factory=dict)  # name -> datatype
    values: dict[str, Any] = field(default_factory=dict)  # current value of each metric
    stamps: dict[str, int] = field(default_factory=dict)  # metric timestamps (ms)
    predictions: list[dict[str, Any]] = field(default_factory=list)  # one snapshot each


class Scada:
    """A Sparkplug host application subscribed to one group."""

    def __init__(self, probe: Any, group: str) -> None:
        self.probe, self.group = probe, group
        probe.subscribe(f"spBv1.0/{group}/#", qos=1)

    def messages(self) -> list[tuple[str, str | None, Any]]:
        """(message type, device, payload) of the edge node's messages, in arrival order."""
        out = []
        for m in self.probe.messages:
            parts = m.topic.split("/")
            if parts[2] in ("NCMD", "DCMD"):
                continue
            assert parts[3] == NODE, m.topic
            out.append((parts[2], parts[4] if len(parts) > 4 else None,
                        pb.Payload.FromString(m.payload)))
        return out

    def replay(self) -> tuple[Any, dict[str, Device]]:
        """The NBIRTH and each device's predictions, checking seq and aliases on the way."""
        nbirth, devices, seq = None, {}, None
        aliases: set[int] = set()
        for kind, device, payload in self.messages():
            if kind == "NBIRTH":
                assert payload.seq == 0
                nbirth, seq, devices, aliases = payload, 0, {}, set()
                continue
            assert seq is not None, f"{kind} before the NBIRTH (or after the NDEATH)"
            if kind == "NDEATH":  # the gateway's clean stop: bdSeq of the NBIRTH, no seq
                assert not payload.HasField("seq")
                assert [m.long_value for m in payload.metrics if m.name == "bdSeq"] == [
                    m.long_value for m in nbirth.metrics if m.name == "bdSeq"]
                seq = None
                continue
            assert payload.seq == (seq + 1) % 256, (kind, seq, payload.seq)
            seq = payload.seq
            assert device is not None, kind
            if kind == "DBIRTH":
                d = devices[device] = Device()
                for m in payload.metrics:
                    assert m.name, m
                    assert m.HasField("datatype"), m
                    d.types[m.name] = m.datatype
                    d.values[m.name] = read(m, m.datatype)
                    d.stamps[m.name] = m.timestamp
                    if m.alias:
                        assert m.alias not in aliases, f"alias {m.alias} used twice in the node"
                        aliases.add(m.alias)
                        d.names[m.alias] = m.name
            elif kind == "DDATA":
                d = devices[device]  # a DDATA before its DBIRTH fails here
                for m in payload.metrics:
                    assert not m.name, "DDATA goes by alias"
                    assert m.alias in d.names, f"alias {m.alias} not in {device}'s DBIRTH"
                    name = d.names[m.alias]
                    d.values[name] = read(m, d.types[name])
                    d.stamps[name] = m.timestamp
            else:
                raise AssertionError(f"unexpected {kind} while the plant runs")
            d.predictions.append({**d.values, "_ms": d.stamps["Window/Seq"]})
        return nbirth, devices


# -- the test --------------------------------------------------------------------------------------


def test_a_sparkplug_plant_gets_floorlines_predictions_as_birth_announced_metrics(
    mosquitto, mqtt_client, unique_topic
):
    suffix = unique_topic.rsplit("-", 1)[-1]
    plant_group, out_group = f"plant-{suffix}", f"floorline-{suffix}"
    scada = Scada(mqtt_client(mosquitto), out_group)
    watcher = mqtt_client(mosquitto)
    watcher.subscribe("floorline/gw-test/pred/ref/+", qos=1)
    watcher.subscribe(f"spBv1.0/{plant_group}/#", qos=1)  # what the plant says, and is told
    link = mqtt_client(mosquitto)
    sim = PlantSimulator(
        PlantConfig(assets=3, rate=20_000.0, group=plant_group, fmt="sparkplug", seed=7,
                    start_time=1_700_000_000.0,
                    faults=[Fault("pump-02", Condition.IMBALANCE)]),
        lambda topic, payload: link.publish(topic, payload, qos=1),
    )
    pumps = sim.config.asset_names()
    with running(config_text(mosquitto, pipelines(plant_group, out_group))) as daemon:
        wait_until(lambda: [k for k, _, _ in scada.messages()] == ["NBIRTH"], 10,
                   "Floorline's NBIRTH")
        sim.run(max_samples=SAMPLES)  # NBIRTH, a DBIRTH per pump, then DDATA by alias
        refs = watcher.wait_for(3 * WINDOWS, "floorline/gw-test/pred/ref/+", timeout=30)
        wait_until(lambda: sum(len(d.predictions) for d in scada.replay()[1].values())
                   >= 3 * WINDOWS, 20, "every prediction at the SCADA host")
        stats = daemon.stats()["pipelines"]
    time.sleep(0.2)  # anything more (a duplicate) would have arrived by now

    # The plant spoke only Sparkplug, and the gateway never had to ask it for a rebirth.
    plant = [m for m in watcher.messages if m.topic.startswith("spBv1.0/")]
    assert {m.topic.split("/")[2] for m in plant} == {"NBIRTH", "DBIRTH", "DDATA"}
    assert sim.messages > 256  # the plant's seq wrapped
    for name in ("spb", "ref"):
        assert stats[name]["dead_letters"] == {}, stats[name]
        assert stats[name]["predictions"] == 3 * WINDOWS, stats[name]

    nbirth, devices = scada.replay()
    assert scada.messages()[-1][0] == "NDEATH"  # the daemon stopped: NDEATH, then DISCONNECT
    bdseq = [m for m in nbirth.metrics if m.name == "bdSeq"]
    assert [(m.datatype, m.long_value) for m in bdseq] == [(pb.Int64, 0)]
    rebirth = [m for m in nbirth.metrics if m.name == "Node Control/Rebirth"]
    assert [(m.datatype, m.boolean_value) for m in rebirth] == [(pb.Boolean, False)]

    manifest = Bundle.open(EXAMPLE).manifest
    labels = manifest.heads[0].labels
    assert labels is not None
    assert sorted(devices) == [f"line1.{p}" for p in pumps]  # one device per asset
    for d in devices.values():
        assert d.types["Label"] == pb.String
        assert d.types["Score"] == pb.Double
        assert d.types["Window/Seq"] in (pb.Int64, pb.UInt64)
        assert all(d.types[f"Scores/{x}"] == pb.Double for x in labels)
        assert d.values["Model/Name"] == manifest.name
        assert d.values["Model/Version"] == str(manifest.version)
        assert len(d.values["Model/SHA256"]) == 64

    # What the SCADA host sees is what the same model said on the same windows.
    expected: dict[tuple[str, int], dict[str, Any]] = {}
    for m in refs:
        body = orjson.loads(m.payload)
        expected[(body["asset"], body["seq"])] = body
    seen = {}
    for device, d in devices.items():
        for p in d.predictions:
            key = (device, p["Window/Seq"])
            assert key not in seen, f"prediction {key} twice"
            seen[key] = p
    assert sorted(seen) == sorted(expected)
    for key, p in seen.items():
        ref = expected[key]
        assert p["Label"] == ref["label"], key
        assert p["Score"] == pytest.approx(ref["score"], abs=1e-5), key
        for label, score in ref["scores"].items():
            assert p[f"Scores/{label}"] == pytest.approx(score, abs=1e-5), (key, label)
    # Each prediction's metrics (the first's in the DBIRTH, the others' in DDATA) are stamped
    # with its window's end: the plant's sample time, to the ms.
    for device, d in devices.items():
        for p in d.predictions:
            ref = expected[(device, p["Window/Seq"])]
            assert p["_ms"] == round(ref["window"]["end"] * 1000), (device, p["Window/Seq"])
    # And the plant's fault is what SCADA reads for that pump.
    assert devices["line1.pump-02"].predictions[-1]["Label"] == Condition.IMBALANCE.value
    assert devices["line1.pump-01"].predictions[-1]["Label"] == Condition.HEALTHY.value


# -- the demo and the simulator in Sparkplug mode -------------------------------------------------


def test_the_demo_in_sparkplug_mode_reads_the_plant_and_shows_predictions_from_ddata(
    mosquitto, mqtt_client
):
    probe = mqtt_client(mosquitto)
    probe.subscribe("spBv1.0/#", qos=0)
    probe.subscribe("floorline/#", qos=0)
    out = subprocess.run(
        [sys.executable, "-m", "floorline.edge", "demo", "--sparkplug", "--duration", "6",
         "--assets", "3", "--host", "127.0.0.1", "--port", str(mosquitto.port),
         "--fault", "pump-02=imbalance@0"],
        capture_output=True, text=True, timeout=90, check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    head, summary = out.stdout.split("\nsummary:", 1)
    assert "  input        spBv1.0/plant/#  (Sparkplug B: edge node line1" in head
    assert ("  predictions  spBv1.0/floorline/+/demo/#  (Sparkplug B edge node floorline/demo"
            in head)
    assert "-t 'spBv1.0/floorline/#' -v   # watch the predictions (protobuf)" in head
    # The plant spoke Sparkplug only; the gateway published no JSON predictions.
    kinds = {tuple(m.topic.split("/")[1:3]) for m in probe.messages if m.topic.startswith("spB")}
    assert {("plant", "NBIRTH"), ("plant", "DBIRTH"), ("plant", "DDATA")} <= kinds
    assert {("floorline", "NBIRTH"), ("floorline", "DBIRTH"), ("floorline", "DDATA")} <= kinds
    assert not [m for m in probe.messages if "/pred/" in m.topic]
    # The table is drawn from the DDATA: the faulty pump reads as its fault, the others healthy.
    rows = summary_rows(out.stdout)
    assert rows["pump-02"]["labels predicted"].startswith("imbalance "), rows
    assert rows["pump-01"]["labels predicted"].startswith("healthy "), rows
    counts = re.search(r"pipeline vibration: \d+ messages, (\d+) windows, (\d+) predictions, "
                       r"dead letters \{\}", summary)
    assert counts, summary
    scored = sum(int(n) for row in rows.values()
                 for n in re.findall(r"of (\d+)", " ".join(row.values())))
    assert 0 < scored <= int(counts[2])  # each prediction the host decoded, scored once


def test_simulate_speaks_sparkplug_with_its_ndeath_as_the_will(mosquitto, mqtt_client):
    probe = mqtt_client(mosquitto)
    probe.subscribe("spBv1.0/cli-plant/#", qos=0)
    out = subprocess.run(
        [sys.executable, "-m", "floorline.edge", "simulate", "--format", "sparkplug",
         "--group", "cli-plant", "--assets", "2", "--duration", "1",
         "--broker", f"127.0.0.1:{mosquitto.port}"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    wait_until(lambda: any("/DDATA/" in m.topic for m in probe.messages), 5, "DDATA")
    topics = [m.topic for m in probe.messages]
    assert topics[:3] == ["spBv1.0/cli-plant/NBIRTH/line1",
                          "spBv1.0/cli-plant/DBIRTH/line1/pump-01",
                          "spBv1.0/cli-plant/DBIRTH/line1/pump-02"]
    ddata = pb.Payload.FromString(next(m.payload for m in probe.messages if "/DDATA/" in m.topic))
    assert ddata.metrics
    assert all(m.alias and not m.name for m in ddata.metrics)
