"""The ``sparkplug`` output against a real broker, checked by an independent Sparkplug host.

The host here decodes with the generated Tahu protobuf module (``sparkplug_b_pb2``) directly,
never with the gateway's own payload helpers, and keeps its own alias tables, seq checks and
bdSeq bookkeeping, as a SCADA host would.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

pb = pytest.importorskip("floorline.edge.sparkplug.sparkplug_b_pb2")

from floorline.edge.bundle.bundle import Bundle  # noqa: E402
from floorline.edge.config.model import parse_config  # noqa: E402
from floorline.edge.errors import ConfigError  # noqa: E402
from tests.daemon_harness import (  # noqa: E402
    EXAMPLE,
    asset_samples,
    config_text,
    publish_stream,
    running,
)
from tests.mqtt_broker import wait_until  # noqa: E402

FLOORLINE = [sys.executable, "-m", "floorline.edge"]
HOST = "scada"


def pipeline(prefix: str, node: str, extra: str = "", hop: int = 32) -> str:
    return f"""
  - name: spb
    subscribe: ["{prefix}/+/vibration"]
    qos: 1
    bundle: "{EXAMPLE}"
    backend: litert
    decoder: {{type: json, timestamp: ts, sequence: seq}}
    asset: {{topic_segment: -2}}
    window: {{hop: {hop}, max_gap_s: 0.05}}
    batch: {{max_batch: 32, max_wait_ms: 5}}
    output: {{type: sparkplug, group_id: plant, edge_node_id: {node}{extra}}}
"""


@dataclass
class Seen:
    topic: str
    kind: str
    device: str | None
    payload: Any  # pb.Payload


class Host:
    """A Sparkplug host application on a probe: decodes everything under spBv1.0/plant/."""

    def __init__(self, probe: Any, node: str) -> None:
        self.probe, self.node = probe, node
        probe.subscribe("spBv1.0/plant/#", qos=1)

    def seen(self) -> list[Seen]:
        out = []
        for m in self.probe.messages:
            parts = m.topic.split("/")
            if len(parts) < 4 or parts[3] != self.node or parts[2] in ("NCMD", "DCMD"):
                continue  # not the edge node's (a host's own commands)
            payload = pb.Payload()
            payload.ParseFromString(m.payload)
            out.append(Seen(m.topic, parts[2], parts[4] if len(parts) > 4 else None, payload))
        return out

    def of(self, kind: str) -> list[Seen]:
        return [s for s in self.seen() if s.kind == kind]

    def set_state(self, online: bool) -> None:
        body = orjson.dumps({"online": online, "timestamp": int(time.time() * 1000)})
        self.probe.publish(f"spBv1.0/STATE/{HOST}", body, qos=1, retain=True)

    def rebirth(self) -> None:
        payload = pb.Payload()
        payload.timestamp = int(time.time() * 1000)
        metric = payload.metrics.add()
        metric.name, metric.datatype = "Node Control/Rebirth", pb.Boolean
        metric.boolean_value = True
        self.probe.publish(f"spBv1.0/plant/NCMD/{self.node}", payload.SerializeToString(), qos=0)

    def predictions(self) -> dict[str, list[tuple[int, bool]]]:
        """Per device: (Window/Seq, is_historical) in arrival order, from DBIRTH and DDATA.

        Aliases resolved with this host's own table from each device's latest DBIRTH; a DDATA
        alias unknown there fails the test.
        """
        aliases: dict[str, dict[int, str]] = {}
        out: dict[str, list[tuple[int, bool]]] = {}
        for s in self.seen():
            if s.kind == "DBIRTH":
                assert s.device is not None
                aliases[s.device] = {m.alias: m.name for m in s.payload.metrics if m.alias}
                for m in s.payload.metrics:
                    if m.name == "Window/Seq" and not m.is_null:
                        out.setdefault(s.device, []).append((_int(m.long_value), False))
            elif s.kind == "DDATA":
                assert s.device is not None
                table = aliases[s.device]  # a DDATA before its device's DBIRTH fails here
                for m in s.payload.metrics:
                    assert not m.name, "DDATA metrics go by alias"
                    assert m.alias in table, f"alias {m.alias} not in {s.device}'s DBIRTH"
                    if table[m.alias] == "Window/Seq":
                        out.setdefault(s.device, []).append((_int(m.long_value), m.is_historical))
        return out


def _int(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def metric(payload: Any, name: str) -> Any:
    found = [m for m in payload.metrics if m.name == name]
    assert found, f"no metric {name!r} in {[m.name for m in payload.metrics]}"
    return found[0]


def check_seq(seen: list[Seen]) -> int:
    """Every message after each NBIRTH (seq 0) is one more, mod 256; returns how many wrapped."""
    wraps = 0
    previous: int | None = None
    for s in seen:
        if s.kind == "NDEATH":
            assert not s.payload.HasField("seq"), "NDEATH carries no seq"
            previous = None
            continue
        assert s.payload.HasField("seq"), s.kind
        if s.kind == "NBIRTH":
            assert s.payload.seq == 0
        else:
            assert previous is not None, f"{s.kind} before any NBIRTH"
            assert s.payload.seq == (previous + 1) % 256, (s.kind, previous, s.payload.seq)
            wraps += s.payload.seq == 0
        previous = s.payload.seq
    return wraps


def windows(n: int, hop: int) -> int:
    return (n - 64) // hop + 1


def feed(plant: Any, prefix: str, assets: dict[str, Any], *, t0: float, first: int = 0,
         count: int | None = None) -> None:
    for asset, samples in assets.items():
        part = samples[first:first + count if count else None]
        publish_stream(plant, f"{prefix}/{asset}/vibration", part, t0=t0, first_seq=first)


def test_births_announce_every_metric_and_ddata_goes_by_alias_with_seq_wrapping(
    mosquitto, mqtt_client, unique_topic
):
    host = Host(mqtt_client(mosquitto), "edge-1")
    plant = mqtt_client(mosquitto)
    n, hop = 700, 4
    assets = {"pump-a": asset_samples(n, seed=1), "pump-b": asset_samples(n, seed=2)}
    with running(config_text(mosquitto, pipeline(unique_topic, "edge-1", hop=hop))) as daemon:
        wait_until(lambda: host.of("NBIRTH"), 10, "NBIRTH")
        feed(plant, unique_topic, assets, t0=100.0)
        expected = windows(n, hop)
        wait_until(lambda: all(len(host.predictions().get(a, [])) >= expected for a in assets),
                   30, "every prediction")
        assert daemon.pipelines[0].stats()["predictions"] == 2 * expected
    seen = host.seen()
    nbirth = seen[0]
    assert nbirth.kind == "NBIRTH"
    assert metric(nbirth.payload, "bdSeq").datatype == pb.Int64
    assert metric(nbirth.payload, "bdSeq").long_value == 0  # a fresh state directory
    rebirth = metric(nbirth.payload, "Node Control/Rebirth")
    assert rebirth.datatype == pb.Boolean
    assert rebirth.boolean_value is False
    assert nbirth.payload.HasField("timestamp")
    manifest = Bundle.open(EXAMPLE).manifest
    labels = manifest.heads[0].labels
    for dbirth in [s for s in seen if s.kind == "DBIRTH"]:
        names = {m.name: m for m in dbirth.payload.metrics}
        for name in ["Label", "Score", "Window/Seq", *(f"Scores/{x}" for x in labels)]:
            assert names[name].alias > 0, name
            assert names[name].HasField("datatype"), name
        assert names["Label"].datatype == pb.String
        assert names["Score"].datatype == pb.Double
        assert names["Model/Name"].string_value == manifest.name
        assert names["Model/Version"].string_value == str(manifest.version)
        assert len(names["Model/SHA256"].string_value) == 64
    aliases = [m.alias for s in seen if s.kind == "DBIRTH" for m in s.payload.metrics if m.alias]
    assert len(aliases) == len(set(aliases)), "aliases unique across the edge node"
    for s in seen:
        if s.kind == "DDATA":
            for m in s.payload.metrics:
                if m.HasField("string_value"):
                    assert m.string_value in labels
    assert check_seq(seen) >= 1  # > 256 messages: the seq wrapped
    preds = host.predictions()
    for asset in assets:
        assert [p for p, _ in preds[asset]] == list(range(expected)), "all, in order, once"
    assert seen[-1].kind == "NDEATH"  # a clean stop: NDEATH then DISCONNECT
    assert metric(seen[-1].payload, "bdSeq").long_value == 0


def test_rebirth_on_ncmd_and_ddeath_when_an_asset_stops(mosquitto, mqtt_client, unique_topic):
    host = Host(mqtt_client(mosquitto), "edge-2")
    plant = mqtt_client(mosquitto)
    n = 64 + 32 * 4
    assets = {"pump-a": asset_samples(n, seed=3), "pump-b": asset_samples(n, seed=4)}
    config = config_text(mosquitto, pipeline(unique_topic, "edge-2", ", device_timeout_s: 1.5"))
    with running(config):
        wait_until(lambda: host.of("NBIRTH"), 10, "NBIRTH")
        feed(plant, unique_topic, assets, t0=100.0)
        wait_until(lambda: len(host.of("DBIRTH")) == 2, 10, "DBIRTHs")
        time.sleep(0.3)
        host.rebirth()
        wait_until(lambda: len(host.of("NBIRTH")) == 2, 10, "NBIRTH after NCMD")
        wait_until(lambda: len(host.of("DBIRTH")) == 4, 10, "DBIRTHs after NCMD")
        births = host.of("NBIRTH")
        assert metric(births[1].payload, "bdSeq").long_value == metric(
            births[0].payload, "bdSeq").long_value, "a rebirth keeps the connection's bdSeq"
        # pump-b keeps going, pump-a has stopped: only pump-a dies.
        more = {"pump-b": asset_samples(n + 96, seed=4)}
        for _ in range(3):
            time.sleep(0.6)
            feed(plant, unique_topic, more, t0=100.0, first=n, count=32)
            n += 32
        wait_until(lambda: host.of("DDEATH"), 10, "DDEATH")
        deaths = host.of("DDEATH")
        assert [d.device for d in deaths] == ["pump-a"]
        assert deaths[0].payload.HasField("seq")
        assert deaths[0].payload.HasField("timestamp")
    seen = host.seen()
    check_seq(seen)
    kinds = [s.kind for s in seen]
    after = kinds[kinds.index("NBIRTH", 1):]
    assert after[:3] == ["NBIRTH", "DBIRTH", "DBIRTH"], "births first, then data"


def test_bdseq_increments_on_broker_restart_and_daemon_restart(
    mosquitto, mqtt_client, unique_topic, tmp_path
):
    host = Host(mqtt_client(mosquitto), "edge-3")
    config = config_text(mosquitto, pipeline(unique_topic, "edge-3"), state_dir=tmp_path / "s")
    with running(config):
        wait_until(lambda: host.of("NBIRTH"), 10, "NBIRTH")
        mosquitto.restart()
        mosquitto.wait_subscribed(host.probe.client_id, "spBv1.0/plant/#", timeout=15)
        # The node may have been born again before this host was back: a host that reconnects
        # asks for births (same connection, same bdSeq).
        time.sleep(1.5)
        host.rebirth()
        wait_until(lambda: len(host.of("NBIRTH")) >= 2, 20, "NBIRTH after the broker restart")
        count = len(host.of("NBIRTH"))
    with running(config):
        wait_until(lambda: len(host.of("NBIRTH")) > count, 10, "NBIRTH after the daemon restart")
    births = [metric(b.payload, "bdSeq").long_value for b in host.of("NBIRTH")]
    assert list(dict.fromkeys(births)) == [0, 1, 2]
    deaths = [metric(d.payload, "bdSeq").long_value for d in host.of("NDEATH")]
    assert deaths[-1] == 2
    assert 1 in deaths


def test_ndeath_will_with_the_matching_bdseq_on_sigkill(mosquitto, mqtt_client, unique_topic,
                                                       tmp_path):
    host = Host(mqtt_client(mosquitto), "edge-4")
    path = tmp_path / "gw.yaml"
    path.write_text(config_text(mosquitto, pipeline(unique_topic, "edge-4"),
                                state_dir=tmp_path / "s"))
    for _ in range(2):
        proc = subprocess.Popen([*FLOORLINE, "run", "--config", str(path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            count = len(host.of("NBIRTH"))
            wait_until(lambda: len(host.of("NBIRTH")) > count, 30, "NBIRTH")  # noqa: B023
            deaths = len(host.of("NDEATH"))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            wait_until(lambda: len(host.of("NDEATH")) > deaths, 10, "the will")  # noqa: B023
        finally:
            if proc.poll() is None:
                proc.kill()
    births = [metric(b.payload, "bdSeq").long_value for b in host.of("NBIRTH")]
    deaths = host.of("NDEATH")
    assert births == [0, 1]
    assert [metric(d.payload, "bdSeq").long_value for d in deaths] == births
    assert all(len(d.payload.metrics) == 1 for d in deaths), "NDEATH: bdSeq only"


def test_primary_host_offline_holds_predictions_and_forwards_them_in_order(
    mosquitto, mqtt_client, unique_topic
):
    host = Host(mqtt_client(mosquitto), "edge-5")
    host.probe.subscribe(f"spBv1.0/STATE/{HOST}", qos=1)
    plant = mqtt_client(mosquitto)
    host.set_state(online=False)
    n = 64 + 32 * 9
    assets = {"pump-a": asset_samples(n, seed=5), "pump-b": asset_samples(n, seed=6)}
    extra = f", primary_host_id: {HOST}"
    with running(config_text(mosquitto, pipeline(unique_topic, "edge-5", extra))) as daemon:
        feed(plant, unique_topic, assets, t0=100.0, count=64 + 32 * 2)  # 3 windows each
        wait_until(lambda: daemon.pipelines[0].stats().get("predictions", 0) >= 6, 10,
                   "predictions made")
        time.sleep(0.5)
        assert host.of("NBIRTH") == [], "no birth while the primary host is offline"
        host.set_state(online=True)
        wait_until(lambda: all(len(host.predictions().get(a, [])) >= 3 for a in assets), 10,
                   "held predictions forwarded")
        # Online, then offline again mid-stream: NDEATH, hold, then forward.
        host.set_state(online=False)
        wait_until(lambda: host.of("NDEATH"), 10, "NDEATH when the primary host went offline")
        feed(plant, unique_topic, assets, t0=100.0, first=64 + 32 * 2, count=32 * 3)
        wait_until(lambda: daemon.pipelines[0].stats().get("predictions", 0) >= 12, 10,
                   "predictions made")
        time.sleep(0.5)
        before = len(host.seen())
        assert [s.kind for s in host.seen()][-1] == "NDEATH", "nothing after NDEATH"
        feed(plant, unique_topic, assets, t0=100.0, first=64 + 32 * 5, count=32 * 4)
        host.set_state(online=True)
        expected = windows(n, 32)
        wait_until(lambda: all(len(host.predictions().get(a, [])) >= expected for a in assets),
                   20, "every prediction after the host came back")
        assert len(host.seen()) > before
    seen = host.seen()
    check_seq(seen)
    births = [metric(b.payload, "bdSeq").long_value for b in host.of("NBIRTH")]
    assert births == sorted(set(births)), "a new session, a new bdSeq"
    preds = host.predictions()
    for asset in assets:
        numbers = [p for p, historical in preds[asset] if historical]
        assert numbers == sorted(numbers), "history in order"
        assert numbers, "held predictions are sent as history"
        # DBIRTHs carry the current (newest) value; every prediction arrives, none is lost.
        assert {p for p, _ in preds[asset]} == set(range(expected)), asset


def test_config_errors_are_one_line():
    base = "gateway: {id: gw}\nbroker: {host: localhost}\npipelines:\n"
    text = base + pipeline("t", "edge/1")
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert lines[1].endswith("output.sparkplug.edge_node_id: 'edge/1': Sparkplug ids cannot "
                             "contain + / or #")
    text = base + pipeline("t", "n", ", device_id: '{nope}'")
    with pytest.raises(ConfigError, match=r"only \{asset\}"):
        parse_config(text)
