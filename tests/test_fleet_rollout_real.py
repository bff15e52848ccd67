"""A staged rollout and fleet status against real gateways (daemon + fleet agent), not simulated.

Three gateways in this process, each a full ``Service`` with its own state directory, attributes
and group, on one real mosquitto. The operator commands run through the CLI exactly as
docs/fleet.md shows them: a canary wave, then the rest; a bad bundle stops at the canary and the
later gateways are never touched.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from floorline.edge.bundle.signing import generate_keypair
from floorline.edge.cli.main import main
from floorline.edge.service.run import Service
from tests.daemon_harness import EXAMPLE
from tests.mqtt_broker import wait_until
from tests.test_fleet import bundle_variant

GATEWAYS = ["rg-a", "rg-b", "rg-c"]


@pytest.fixture
def plant(tmp_path, mosquitto):
    key, pub = generate_keypair(tmp_path / "operator")
    prefix = f"rollout{int(time.time() * 1000) % 10**6}"
    services: list[Service] = []
    for gw in GATEWAYS:
        cfg = tmp_path / f"{gw}.yaml"
        cfg.write_text(f"""
gateway: {{id: {gw}}}
state_dir: {tmp_path / gw}
broker: {{host: 127.0.0.1, port: {mosquitto.port}, keepalive: 10, reconnect_min_s: 0.5,
          reconnect_max_s: 1}}
trust: {{trusted_keys: [{pub}]}}
fleet: {{enabled: true, operator_keys: [{pub}], groups: [line9], probation_s: 1,
         min_probation_messages: 5, bundle_fetch_timeout_s: 20,
         attributes: {{site: plant-r, line: "9"}}}}
pipelines:
  - name: vibration
    subscribe: ["{prefix}/{gw}/+/vibration"]
    bundle: {EXAMPLE}
    decoder: {{type: json, timestamp: ts, sequence: seq}}
""")
        svc = Service(cfg)
        svc.start()
        services.append(svc)
    for svc in services:
        wait_until(lambda s=svc: s.daemon.transport is not None
                   and s.daemon.transport.subscribed.is_set(), 10, "gateway subscribed")
    desired = tmp_path / "desired.yaml"

    def write_desired(bundle: Path) -> Path:
        desired.write_text(
            "pipelines:\n  - name: vibration\n"
            f'    subscribe: ["{prefix}/+/vibration"]\n'
            f"    bundle: {bundle}\n"
            "    decoder: {type: json, timestamp: ts, sequence: seq}\n"
        )
        return desired

    broker = ["--broker", f"127.0.0.1:{mosquitto.port}"]
    yield {"key": key, "services": services, "desired": write_desired, "broker": broker,
           "tmp": tmp_path}
    for svc in services:
        svc.stop()


def _versions(services: list[Service]) -> list[str]:
    return [svc.daemon.pipelines[0].model.bundle.manifest.version for svc in services]


def _status(plant, capsys, *extra: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["fleet", "status", *plant["broker"], "--json", *extra])
    return code, orjson.loads(capsys.readouterr().out)


def test_a_rollout_over_real_gateways_goes_wave_by_wave_and_status_agrees(plant, capsys):
    services = plant["services"]
    v2 = bundle_variant(plant["tmp"] / "v2", "1.1.0", plant["key"])
    code = main(["fleet", "rollout", "start", "real-1", "--config", str(plant["desired"](v2)),
                 "--bundle", str(v2), "--key", str(plant["key"]), *plant["broker"],
                 "--group", "line9", "--waves", "canary:rg-b", "--waves", "100%",
                 "--wave-timeout-s", "60"])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert _versions(services) == ["1.1.0"] * 3
    code, doc = _status(plant, capsys)
    assert code == 0, doc
    rows = {r["gateway"]: r for r in doc["gateways"]}
    assert set(GATEWAYS) <= set(rows)
    assert {rows[g]["deployment"] for g in GATEWAYS} == {"real-1"}
    version = rows["rg-a"]["version"]
    code, missing = _status(plant, capsys, "--missing", str(version))
    assert code == 0, missing


def test_a_bad_canary_stops_the_rollout_and_the_rest_never_see_it(plant, capsys):
    services = plant["services"]
    bad = bundle_variant(plant["tmp"] / "bad", "6.6.6", plant["key"], break_golden=True)
    code = main(["fleet", "rollout", "start", "real-bad", "--config", str(plant["desired"](bad)),
                 "--bundle", str(bad), "--key", str(plant["key"]), *plant["broker"],
                 "--selector", "site=plant-r", "--waves", "canary:rg-c", "--waves", "100%",
                 "--max-failures", "0", "--wave-timeout-s", "60"])
    out = capsys.readouterr()
    assert code == 1, out.out + out.err
    # The canary refused the bundle (its golden self-test fails) and kept serving; the others
    # were never sent the version.
    assert _versions(services) == ["1.0.0"] * 3
    histories = {svc.agent.gateway: [r.result for r in svc.agent.history]
                 for svc in services if svc.agent is not None}
    assert histories["rg-c"] == ["rejected"]
    assert histories["rg-a"] == []
    assert histories["rg-b"] == []
    code, doc = _status(plant, capsys)
    assert code == 1, doc  # a rejection is something a script must act on
