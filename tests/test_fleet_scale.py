"""Fleet operations at scale: 200 simulated gateways, one MQTT connection each, a real mosquitto.

The gateways are ``tests/fleet_sim.py`` SimGateways: 200 paho clients (200 broker connections,
client ids, wills and subscriptions) driven by one event-loop thread; mosquitto 2.0 has no
connection limit by default (max_connections -1), only its file-descriptor limit, which it
inherits (thousands here), so 200 connections need no broker change. The figures (how long a
200-gateway status and a 3-wave rollout take) are printed in the test output and kept in the
test report's user properties; nothing asserts on them.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from floorline.edge.bundle.signing import generate_keypair, load_public_key
from floorline.edge.fleet import rollout
from floorline.edge.fleet.common import broker_config
from floorline.edge.fleet.push import push
from floorline.edge.fleet.status import Filters, fleet_status
from tests.fleet_sim import SimFleet, SimGateway, make_fleet
from tests.mqtt_broker import wait_until

N = 200
DESIRED = """pipelines:
  - name: vibration
    subscribe: ["plant/+/+/vibration"]
    bundle: example:pdm-classifier
    decoder: {type: json, timestamp: ts, sequence: seq}
    window: {hop: HOP}
"""


class Scale:
    def __init__(self, tmp: Path, port: int) -> None:
        self.key, self.pub = generate_keypair(tmp / "operator")
        self.broker = broker_config(f"127.0.0.1:{port}")
        self.port = port
        self.configs = {}
        for hop in (16, 32):
            path = tmp / f"desired-{hop}.yaml"
            path.write_text(DESIRED.replace("HOP", str(hop)))
            self.configs[hop] = path
        self.gateways: list[SimGateway] = make_fleet(N, probation_s=0.3)
        self.fleet: SimFleet | None = None

    def start(self) -> SimFleet:
        self.fleet = SimFleet("127.0.0.1", self.port, [load_public_key(self.pub)],
                              self.gateways).start()
        return self.fleet

    def by_id(self) -> dict[str, SimGateway]:
        return {g.id: g for g in self.gateways}


@pytest.fixture
def scale(tmp_path: Path, mosquitto: Any) -> Iterator[Scale]:
    s = Scale(tmp_path, mosquitto.port)
    yield s
    if s.fleet is not None:
        s.fleet.stop()


def figure(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str], what: str,
           seconds: float) -> None:
    """Print a timing figure in the run's output and keep it in the report."""
    request.node.user_properties.append((what, round(seconds, 3)))
    with capsys.disabled():
        print(f"\n[fleet scale] {what}: {seconds:.2f} s")


def test_a_3_wave_rollout_over_200_gateways_and_status_aggregates_every_one(
        scale, request, capsys):
    fleet = scale.start()
    out = io.StringIO()
    t0 = time.monotonic()
    report = fleet_status(broker=scale.broker, out=out)
    figure(request, capsys, f"status of {N} gateways (before the rollout)", time.monotonic() - t0)
    assert report.summary["gateways"] == N
    assert report.exit_code == 0
    t0 = time.monotonic()
    code = rollout.start(name="scale-3w", config_file=scale.configs[16], bundles=[],
                         key_file=scale.key, broker=scale.broker, target={"selector": {}},
                         waves=["canary:10", "50%", "100%"], out=out)
    figure(request, capsys, f"3-wave rollout (canary 10, 50%, 100%) over {N} gateways "
           "(simulated probation 0.3 s)", time.monotonic() - t0)
    assert code == 0, out.getvalue()
    assert "canary 10, 50% 90, 100% 100" in out.getvalue()
    version = next(g.running_version for g in scale.gateways)
    assert all(g.running_version == version and g.deployment == "scale-3w"
               for g in scale.gateways)
    t0 = time.monotonic()
    report = fleet_status(broker=scale.broker, out=io.StringIO())
    figure(request, capsys, f"status of {N} gateways (after the rollout)", time.monotonic() - t0)
    s = report.summary
    assert (s["gateways"], s["online"], s["offline"], s["not_reporting"]) == (N, N, 0, 0)
    assert s["versions"] == {str(version): N}
    assert s["results"] == {"applied": N}
    assert s["deployments"] == {"scale-3w": N}
    assert report.exit_code == 0
    site_a = fleet_status(broker=scale.broker, filters=Filters(attrs={"site": "site-a"}),
                          out=io.StringIO())
    assert site_a.summary["gateways"] == N // 4
    assert fleet.messages >= N  # every gateway received its document


@pytest.mark.parametrize("rollback_wave", [False, True])
def test_a_failing_canary_stops_the_rollout_at_that_wave(scale, request, capsys, rollback_wave):
    scale.start()
    gws = scale.by_id()
    # Everyone runs a first deployment (by selector): what a rollback must restore.
    first = push(target={"selector": {}}, config_file=scale.configs[32], bundles=[],
                 key_file=scale.key, broker=scale.broker, deployment="base", out=io.StringIO())
    wait_until(lambda: all(g.verdict(first) == "applied" for g in scale.gateways), 30,
               "the base deployment everywhere")
    canary = [f"gw-{i:03d}" for i in range(0, 200, 10)]  # 20 gateways over every site and line
    gws[canary[3]].fail = "rolled_back"  # 1 of 20: 5 % of the canary wave fails
    out = io.StringIO()
    t0 = time.monotonic()
    code = rollout.start(
        name="scale-fail", config_file=scale.configs[16], bundles=[], key_file=scale.key,
        broker=scale.broker, target={"selector": {}},
        waves=[f"canary:{','.join(canary)}", "50%", "100%"], max_failures="0",
        rollback_wave=rollback_wave, out=out)
    figure(request, capsys, f"failing canary (rollback wave: {rollback_wave})",
           time.monotonic() - t0)
    assert code == 1, out.getvalue()
    text = out.getvalue()
    assert "wave 1/3 canary: 1 of 20 gateways failed" in text
    assert f"{canary[3]}: rolled_back" in text
    doc = _rollout_doc(scale, "scale-fail")
    v = doc["version"]
    touched = {g.id for g in scale.gateways if any(ver >= v for _, ver in g.received)}
    assert touched <= set(canary)  # no later wave touched
    later = [g for g in scale.gateways if g.id not in canary]
    assert all(g.running_version == first for g in later)
    assert doc["state"] == "failed"
    assert [w["state"] for w in doc["waves"]] == ["failed", "pending", "pending"]
    applied = [c for c in canary if c != canary[3]]
    if rollback_wave:
        rb = doc["waves"][0]["rollback"]
        assert sorted(rb["gateways"]) == sorted(applied)
        assert {v["result"] for v in rb["verdicts"].values()} == {"applied"}
        for name in applied:
            g = gws[name]
            assert g.running_version == rb["version"]
            assert g.config["pipelines"][0]["window"] == {"hop": 32}  # the base config again
            assert g.deployment == "base"
    else:
        assert all(gws[c].config["pipelines"][0]["window"] == {"hop": 16} for c in applied)
    assert gws[canary[3]].running_version == first  # rolled back by itself
    report = fleet_status(broker=scale.broker, filters=Filters(missing=v), out=io.StringIO())
    missing = set(report.summary["missing"]["gateways"])
    # Reached: running V or newer (a rollback wave's version is newer too).
    assert missing == {g.id for g in later} | {canary[3]}
    assert report.exit_code == 1  # canary[3] rolled V back


def _rollout_doc(scale: Scale, name: str) -> dict[str, Any]:
    import orjson  # noqa: PLC0415

    from floorline.edge.fleet.common import Collector  # noqa: PLC0415

    with Collector(scale.broker, [f"floorline/rollouts/{name}"]) as col:
        col.start()
        payload = col.get(f"floorline/rollouts/{name}")
    assert payload
    doc: dict[str, Any] = orjson.loads(payload)
    return doc


def test_a_stopped_rollout_resumes_and_status_missing_follows_it(scale, request, capsys):
    fleet = scale.start()
    offline = ["gw-007", "gw-133"]
    for name in offline:
        fleet.go_offline(name)
    wait_until(lambda: fleet_status(broker=scale.broker, out=io.StringIO()).summary["offline"]
               == len(offline), 10, "two gateways offline")
    out = io.StringIO()
    stop = threading.Event()

    def ctrl_c_during_the_canary() -> None:
        wait_until(lambda: any(g.received for g in scale.gateways), 30, "the canary pushed")
        stop.set()  # as Ctrl-C does: halt once the current wave's verdicts are in

    threading.Thread(target=ctrl_c_during_the_canary, daemon=True).start()
    code = rollout.start(name="scale-resume", config_file=scale.configs[16], bundles=[],
                         key_file=scale.key, broker=scale.broker, target={"selector": {}},
                         waves=["canary:10", "50%", "100%"], skip_offline=True, out=out,
                         interrupt=stop)
    assert code == 3, out.getvalue()
    assert "skipping 2 offline gateway(s): gw-007, gw-133" in out.getvalue()
    doc = _rollout_doc(scale, "scale-resume")
    version = doc["version"]
    assert doc["state"] == "stopped"
    assert [w["state"] for w in doc["waves"]] == ["done", "pending", "pending"]
    report = fleet_status(broker=scale.broker, filters=Filters(missing=version),
                          out=io.StringIO())
    assert report.summary["missing"]["count"] == N - 10
    assert report.exit_code == 3
    t0 = time.monotonic()
    code = rollout.resume(name="scale-resume", key_file=scale.key, broker=scale.broker, out=out)
    figure(request, capsys, "resume of the remaining 2 waves (188 gateways)",
           time.monotonic() - t0)
    assert code == 0, out.getvalue()
    text = io.StringIO()
    report = fleet_status(broker=scale.broker, filters=Filters(missing=version), out=text)
    assert sorted(report.summary["missing"]["gateways"]) == offline  # offline ones included
    assert report.exit_code == 3
    assert "2 gateway(s) have not reached version" in text.getvalue()
