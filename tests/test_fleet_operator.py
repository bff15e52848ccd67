"""The operator's fleet commands against a real broker and simulated gateways (tests/fleet_sim.py).

Push checks and targeting, ``push --wait``, fleet-wide status and its exit codes, TLS and
credentials, staged rollouts stopped by a second operator and resumed, gc and clear, and an
operator-key rotation on a real gateway.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from floorline.edge.bundle.signing import generate_keypair, load_public_key
from floorline.edge.cli.main import main
from floorline.edge.config.model import BrokerConfig
from floorline.edge.fleet import rollout
from floorline.edge.fleet.common import broker_config
from floorline.edge.fleet.push import push
from floorline.edge.fleet.status import fleet_status
from tests.fleet_sim import SimFleet, SimGateway, make_fleet
from tests.mqtt_broker import AUTH_PASSWORD, AUTH_USER, wait_until

DESIRED = """pipelines:
  - name: vibration
    subscribe: ["plant/+/+/vibration"]
    bundle: example:pdm-classifier
    decoder: {type: json, timestamp: ts, sequence: seq}
    window: {hop: HOP}
"""


class Op:
    """An operator's files and a broker address."""

    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp = tmp
        self.key, self.pub = generate_keypair(tmp / "operator")
        self.port = port
        self.broker = broker_config(f"127.0.0.1:{port}")
        self.config = self.desired(32)

    def desired(self, hop: int) -> Path:
        path = self.tmp / f"desired-{hop}.yaml"
        path.write_text(DESIRED.replace("HOP", str(hop)))
        return path

    def args(self, *more: str) -> list[str]:
        return [*more, "--broker", f"127.0.0.1:{self.port}"]

    def push_args(self, *more: str) -> list[str]:
        return self.args("fleet", "push", "--config", str(self.config), "--key", str(self.key),
                         *more)


@pytest.fixture
def op(tmp_path: Path, mosquitto: Any) -> Op:
    return Op(tmp_path, mosquitto.port)


@pytest.fixture
def sim(op: Op, mosquitto: Any) -> Iterator[Callable[..., SimFleet]]:
    fleets: list[SimFleet] = []

    def make(gateways: list[SimGateway], keys: list[Path] | None = None) -> SimFleet:
        pubs = [load_public_key(k) for k in keys or [op.pub]]
        fleet = SimFleet("127.0.0.1", mosquitto.port, pubs, gateways).start()
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.stop()


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def retained(probe_factory: Any, broker: Any, topic_filter: str, wait: float = 0.5,
             ) -> dict[str, bytes]:
    probe = probe_factory(broker)
    probe.subscribe(topic_filter, qos=1)
    time.sleep(wait)
    return {m.topic: m.payload for m in probe.messages if m.payload}


def envelope_payload(data: bytes) -> dict[str, Any]:
    return orjson.loads(base64.b64decode(orjson.loads(data)["payload"]))


# -- finding 9: the command line ---------------------------------------------------------------


@pytest.mark.parametrize("ttl", ["-1", "0"])
def test_push_refuses_a_ttl_that_publishes_an_expired_document(op, mosquitto, mqtt_client, capsys,
                                                                ttl):
    code, out, err = run(op.push_args("--gateway", "gw-000", f"--ttl-hours={ttl}"), capsys)
    assert code == 2, (out, err)
    assert "--ttl-hours" in err
    assert "Traceback" not in err
    assert retained(mqtt_client, mosquitto, "floorline/#") == {}


def test_keygen_into_a_missing_directory_is_a_clear_error(tmp_path, capsys):
    code, out, err = run(["fleet", "keygen", str(tmp_path / "nowhere" / "operator")], capsys)
    assert code == 2
    assert "does not exist" in err
    assert "Traceback" not in err + out
    code, out, err = run(["fleet", "keygen", str(tmp_path / "operator")], capsys)
    assert code == 0, err
    code, out, err = run(["fleet", "keygen", str(tmp_path / "operator")], capsys)
    assert code == 2
    assert "refusing to overwrite" in err


def test_push_checks_config_bundles_and_key_locally_and_publishes_nothing_on_failure(
        op, mosquitto, mqtt_client, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DESIRED.replace("HOP", "many"))
    code, _, err = run(op.args("fleet", "push", "--gateway", "gw-000", "--config", str(bad),
                               "--key", str(op.key)), capsys)
    assert code == 1
    assert "window.hop" in err
    code, _, err = run(op.args("fleet", "push", "--gateway", "gw-000", "--config",
                               str(op.config), "--key", str(op.pub)), capsys)
    assert code == 1
    assert "private key" in err
    broken = tmp_path / "broken-bundle"
    broken.mkdir()
    (broken / "manifest.json").write_text("{}")
    local = tmp_path / "local.yaml"
    local.write_text(DESIRED.replace("example:pdm-classifier", str(broken)).replace("HOP", "32"))
    code, _, err = run(op.args("fleet", "push", "--gateway", "gw-000", "--config", str(local),
                               "--bundle", str(broken), "--key", str(op.key)), capsys)
    assert code == 1
    assert "manifest" in err
    assert retained(mqtt_client, mosquitto, "floorline/#") == {}


def test_push_wait_exits_non_zero_on_a_rollback_and_names_it(op, sim, capsys):
    gateways = make_fleet(3)
    gateways[1].fail = "rolled_back"
    sim(gateways)
    ids = ["--gateway", "gw-000", "--gateway", "gw-001", "--gateway", "gw-002"]
    code, out, err = run(op.push_args(*ids, "--wait"), capsys)
    assert code == 1, (out, err)
    assert "gw-001: rolled_back" in out
    assert "refused or rolled back by: gw-001" in out
    gateways[1].fail = None
    code, out, err = run(op.push_args(*ids, "--wait", "--deployment", "again"), capsys)
    assert code == 0, (out, err)
    assert "applied 3" in out


def test_push_wait_exits_3_when_a_target_gives_no_verdict(op, sim, capsys):
    fleet = sim(make_fleet(2))
    fleet.go_offline("gw-001")
    code, out, _ = run(op.push_args("--selector", "", "--wait", "--wait-timeout-s", "2"), capsys)
    assert code == 3, out
    assert "no verdict within 2 s" in out
    assert "gw-001" in out.split("no verdict")[1]


def test_push_without_wait_points_at_status_missing(op, sim, capsys):
    sim(make_fleet(1))
    code, out, _ = run(op.push_args("--gateway", "gw-000"), capsys)
    assert code == 0
    assert "fleet status --missing" in out


# -- status ------------------------------------------------------------------------------------


def test_status_exit_codes_filters_and_json(op, sim, capsys):
    gateways = make_fleet(8)  # site-a..d, two each
    gateways[0].fail = "rolled_back"  # gw-000, site-a
    fleet = sim(gateways)
    code, out, _ = run(op.args("fleet", "status"), capsys)
    assert code == 0, out
    assert "8 gateways: 8 online, 0 offline" in out
    version = push(target={"selector": {"site": "site-a"}}, config_file=op.config, bundles=[],
                   key_file=op.key, broker=op.broker, deployment="site-a-1", out=io.StringIO())
    wait_until(lambda: gateways[0].verdict(version) and gateways[4].verdict(version), 10,
               "the site-a verdicts")
    code, out, _ = run(op.args("fleet", "status"), capsys)
    assert code == 1, out
    assert f"gw-000: rolled_back v{version}: simulated" in out
    code, out, _ = run(op.args("fleet", "status", "--result", "applied"), capsys)
    assert code == 0, out
    assert "gw-004" in out
    assert "gw-000" not in out
    fleet.go_offline("gw-001")
    wait_until(lambda: fleet_status(broker=op.broker, out=io.StringIO()).summary["offline"] == 1,
               10, "the offline state")
    code, out, _ = run(op.args("fleet", "status", "--attr", "site=site-b"), capsys)
    assert code == 3, out
    assert "2 of 8 gateways: 1 online, 1 offline" in out
    code, out, _ = run(op.args("fleet", "status", "--json"), capsys)
    body = orjson.loads(out)
    assert code == body["exit_code"] == 1
    s = body["summary"]
    assert (s["gateways"], s["online"], s["offline"]) == (8, 7, 1)
    assert s["versions"] == {"local": 7, str(version): 1}
    assert s["results"] == {"none": 6, "applied": 1, "rolled_back": 1}
    row = next(r for r in body["gateways"] if r["gateway"] == "gw-004")
    assert row["deployment"] == "site-a-1"
    assert row["signer"]
    assert row["attributes"]["site"] == "site-a"
    code, out, _ = run(op.args("fleet", "status", "--missing", str(version), "--json"), capsys)
    body = orjson.loads(out)
    missing = body["summary"]["missing"]["gateways"]
    assert sorted(missing) == sorted(f"gw-{i:03d}" for i in range(8) if i != 4)
    assert code == 1  # gw-000 rolled it back
    code, out, _ = run(op.args("fleet", "status", "--deployment", "site-a-1"), capsys)
    assert code == 0
    assert "1 of 8 gateways" in out


def test_status_prints_the_version_a_verdict_has_and_never_vnone(op, mosquitto, mqtt_client,
                                                                  capsys):
    probe = mqtt_client(mosquitto)
    now = time.time()
    for gw, version in (("gw-a", None), ("gw-b", 123)):
        probe.publish(f"floorline/{gw}/state", b'{"state": "online"}', qos=1, retain=True)
        probe.publish(f"floorline/{gw}/reported", orjson.dumps({
            "gateway": gw, "ts": now, "running_version": None, "config_source": "local",
            "history": [{"version": version, "result": "rejected", "reason": "bad_signature: x",
                         "ts": now}],
            "health": {"ts": now, "pipelines": {}}}), qos=1, retain=True)
    code, out, _ = run(op.args("fleet", "status"), capsys)
    assert code == 1
    assert "vNone" not in out
    assert "gw-b: rejected v123: bad_signature" in out
    assert "gw-a: rejected: bad_signature" in out


def test_status_counts_a_gateway_with_a_stale_report_as_not_reporting(op, mosquitto,
                                                                      mqtt_client, capsys):
    probe = mqtt_client(mosquitto)
    old = time.time() - 3600
    probe.publish("floorline/gw-old/state", b'{"state": "online"}', qos=1, retain=True)
    probe.publish("floorline/gw-old/reported", orjson.dumps({
        "gateway": "gw-old", "ts": old, "running_version": 5, "history": [],
        "health": {"ts": old, "pipelines": {}}}), qos=1, retain=True)
    code, out, _ = run(op.args("fleet", "status"), capsys)
    assert code == 3
    assert "1 not reporting" in out
    assert "silent" in out


def test_status_with_no_gateways_exits_3(op, capsys):
    code, out, _ = run(op.args("fleet", "status"), capsys)
    assert code == 3
    assert "no gateways reported" in out


# -- broker options ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tls", "mtls", "auth"])
def test_push_and_status_use_tls_and_credentials(kind, request, tmp_path, mqtt_client, capsys):
    broker = request.getfixturevalue(f"{kind}_broker")
    op = Op(tmp_path, broker.port)
    if kind == "auth":
        secret = tmp_path / "mqtt-password"
        secret.write_text(AUTH_PASSWORD + "\n")
        options = ["--username", AUTH_USER, "--password-file", str(secret)]
    else:
        options = ["--ca", str(broker.tls.ca_cert)]
        if kind == "mtls":
            options += ["--cert", str(broker.tls.client_cert), "--cert-key",
                        str(broker.tls.client_key)]
    code, out, err = run([*op.push_args("--gateway", "gw-000"), *options], capsys)
    assert code == 0, (out, err)
    got = retained(mqtt_client, broker, "floorline/gw-000/desired")
    assert envelope_payload(got["floorline/gw-000/desired"])["target"] == {"gateway": "gw-000"}
    code, out, err = run([*op.args("fleet", "status"), *options], capsys)
    assert code == 3, (out, err)  # connected, and no gateway reported
    assert "no gateways reported" in out
    code, out, err = run(op.args("fleet", "status"), capsys)  # no TLS, no login
    assert code == 4, (out, err)
    assert "cannot connect to the broker" in err


def test_a_wrong_password_exits_4_and_a_password_on_the_command_line_warns(op, auth_broker,
                                                                           capsys):
    argv = ["fleet", "status", "--broker", f"127.0.0.1:{auth_broker.port}", "--username",
            AUTH_USER]
    code, _, err = run([*argv, "--password", "wrong"], capsys)
    assert code == 4
    assert "warning: --password" in err
    code, out, err = run([*argv, "--password", AUTH_PASSWORD], capsys)
    assert code == 3, (out, err)


def test_broker_option_mistakes_are_usage_errors(op, capsys, tmp_path):
    code, _, err = run(op.args("fleet", "status", "--cert", str(op.pub)), capsys)
    assert (code, "--cert and --cert-key" in err) == (2, True)
    code, _, err = run(op.args("fleet", "status", "--ca", str(tmp_path / "nope.pem")), capsys)
    assert (code, "--ca" in err) == (2, True)
    code, _, err = run(op.args("fleet", "status", "--password-file", str(op.pub)), capsys)
    assert (code, "--username" in err) == (2, True)


# -- targeting and precedence ------------------------------------------------------------------


def test_targets_gateway_list_group_and_selector(op, sim, mosquitto, mqtt_client, capsys):
    gateways = make_fleet(8, groups=["line1"])
    sim(gateways)
    code, out, _ = run(op.push_args("--gateway", "gw-000", "--gateway", "gw-001"), capsys)
    assert code == 0
    docs = retained(mqtt_client, mosquitto, "floorline/+/desired")
    assert sorted(docs) == ["floorline/gw-000/desired", "floorline/gw-001/desired"]
    payloads = [envelope_payload(d) for d in docs.values()]
    assert {p["target"]["gateway"] for p in payloads} == {"gw-000", "gw-001"}
    assert len({p["version"] for p in payloads}) == 1  # one push, one version
    code, out, _ = run(op.push_args("--selector", "site=site-b,line=1", "--deployment", "b1"),
                       capsys)
    assert code == 0
    docs = retained(mqtt_client, mosquitto, "floorline/selectors/+/desired")
    body = envelope_payload(docs["floorline/selectors/b1/desired"])
    assert body["target"] == {"selector": {"site": "site-b", "line": "1"}}
    assert body["deployment"] == "b1"
    site_b_line_1 = [g for g in gateways if g.attributes == {"site": "site-b", "line": "1"}]
    assert site_b_line_1
    wait_until(lambda: all(g.deployment == "b1" for g in site_b_line_1), 10, "selector applied")
    others = [g for g in gateways if g not in site_b_line_1 and g.id not in ("gw-000", "gw-001")]
    assert all(not g.history for g in others)  # not addressed: nothing recorded
    code, out, _ = run(op.push_args("--selector", "site=site-c"), capsys)
    assert "floorline/selectors/site-site-c/desired" in out  # no --deployment: a stable slug
    code, out, _ = run(op.push_args("--group", "line1"), capsys)
    assert code == 0
    assert "floorline/groups/line1/desired" in out


def test_precedence_latest_push_wins_and_gateway_beats_selector_on_equal_versions(op, sim):
    gateways = make_fleet(4)
    sim(gateways)
    gw0 = gateways[0]  # site-a

    def send(target: dict[str, Any], deployment: str, version: int | None = None) -> int:
        return push(target=target, config_file=op.config, bundles=[], key_file=op.key,
                    broker=op.broker, deployment=deployment, version=version,
                    out=io.StringIO())

    v1 = send({"selector": {"site": "site-a"}}, "sel-1")
    wait_until(lambda: gw0.verdict(v1) == "applied", 10, "selector push")
    v2 = send({"gateway": gw0.id}, "gw-1")
    wait_until(lambda: gw0.verdict(v2) == "applied", 10, "gateway push")
    v3 = send({"selector": {"site": "site-a"}}, "sel-2")
    wait_until(lambda: gw0.verdict(v3) == "applied", 10, "a newer selector push")
    assert gw0.deployment == "sel-2"  # the latest push wins, whatever its scope
    same = v3 + 1000
    send({"selector": {"site": "site-a"}}, "sel-3", version=same)
    send({"gateway": gw0.id}, "gw-3", version=same)
    wait_until(lambda: gw0.deployment == "gw-3" and gw0.probation is None, 10, "equal versions")
    time.sleep(0.3)
    assert gw0.deployment == "gw-3"  # gateway beats selector on equal versions
    assert gateways[1].running_version is None  # site-b: not addressed


# -- rollouts ----------------------------------------------------------------------------------


def _doc(col_broker: BrokerConfig, name: str) -> dict[str, Any]:
    from floorline.edge.fleet.common import Collector  # noqa: PLC0415

    with Collector(col_broker, [f"floorline/rollouts/{name}"]) as col:
        col.start()
        payload = col.get(f"floorline/rollouts/{name}")
    return orjson.loads(payload) if payload else {}


def test_rollout_stopped_by_a_second_operator_halts_after_the_wave_and_resumes(op, sim, capsys):
    gateways = make_fleet(12, probation_s=0.6)
    sim(gateways)
    result: dict[str, int] = {}
    out = io.StringIO()

    def first_operator() -> None:
        result["code"] = rollout.start(
            name="r-stop", config_file=op.config, bundles=[], key_file=op.key, broker=op.broker,
            target={"selector": {}}, waves=["canary:3", "50%", "100%"], out=out)

    thread = threading.Thread(target=first_operator)
    thread.start()
    wait_until(lambda: _doc(op.broker, "r-stop").get("waves", [{}])[0].get("state") == "running",
               10, "the canary under way")
    code, text, _ = run(op.args("fleet", "rollout", "stop", "r-stop"), capsys)
    assert code == 0
    assert "stop requested" in text
    thread.join(30)
    assert result["code"] == 3, out.getvalue()
    doc = _doc(op.broker, "r-stop")
    assert doc["state"] == "stopped"
    assert doc["stop_requested_by"]
    version = doc["version"]
    canary = set(doc["waves"][0]["gateways"])
    assert len(canary) == 3
    assert doc["waves"][0]["state"] == "done"
    assert [w["state"] for w in doc["waves"][1:]] == ["pending", "pending"]
    touched = {g.id for g in gateways if any(v == version for _, v in g.received)}
    assert touched == canary  # no later wave touched
    code, text, _ = run(op.args("fleet", "rollout", "status", "r-stop"), capsys)
    assert code == 3
    assert "rollout r-stop: stopped" in text
    assert "wave 1 canary: done, 3 gateway(s): applied 3" in text
    code, text, _ = run(op.args("fleet", "rollout", "status"), capsys)
    assert "r-stop: stopped" in text
    code, text, err = run(op.args("fleet", "rollout", "resume", "r-stop", "--key", str(op.key)),
                          capsys)
    assert code == 0, (text, err)
    assert "resumed" in text
    assert all(g.running_version == version for g in gateways)
    assert _doc(op.broker, "r-stop")["state"] == "done"
    code, text, _ = run(op.args("fleet", "status", "--missing", str(version)), capsys)
    assert code == 0
    assert "0 gateway(s) have not reached" in text


def test_rollout_start_refuses_a_name_in_use_and_bad_options(op, sim, capsys):
    sim(make_fleet(2))
    base = ["fleet", "rollout", "start", "r1", "--config", str(op.config), "--key", str(op.key),
            "--selector", ""]
    for extra, flag in ((["--waves", "canary:"], "--waves"),
                        (["--waves", "150%"], "--waves"),
                        (["--waves", "100%", "--max-failures", "many"], "--max-failures"),
                        (["--waves", "canary:gw-404", "--waves", "100%"], "gw-404"),
                        (["--waves", "100%", "--ttl-hours", "0"], "--ttl-hours")):
        code, _, err = run(op.args(*base, *extra), capsys)
        assert code == 2, (extra, err)
        assert flag in err
    code, _, err = run(op.args("fleet", "rollout", "start", "r1", "--config", str(op.config),
                               "--key", str(op.key), "--group", "line1", "--waves", "100%"),
                       capsys)
    assert code == 2
    assert "do not report their groups" in err
    code, out, err = run(op.args(*base, "--waves", "100%"), capsys)
    assert code == 0, (out, err)
    stale = _doc(op.broker, "r1")
    stale["state"] = "stopped"
    from floorline.edge.fleet.common import connect  # noqa: PLC0415

    t = connect(op.broker, "test")
    t.publish("floorline/rollouts/r1", orjson.dumps(stale), 1, True).wait_for_publish(5)
    t.stop()
    code, _, err = run(op.args(*base, "--waves", "100%"), capsys)
    assert code == 1
    assert "resume it" in err
    code, out, _ = run(op.args("fleet", "clear", "--rollout", "r1"), capsys)
    assert code == 0
    assert _doc(op.broker, "r1") == {}


def test_rollout_by_gateway_list_with_a_group_resolved_from_reports(op, sim, capsys):
    gateways = make_fleet(4)
    sim(gateways)
    code, out, err = run(op.args("fleet", "rollout", "start", "r-list", "--config",
                                 str(op.config), "--key", str(op.key), "--gateway", "gw-001",
                                 "--gateway", "gw-002", "--waves", "first:gw-002",
                                 "--waves", "100%"), capsys)
    assert code == 0, (out, err)
    assert "first 1, 100% 1" in out
    assert {g.id for g in gateways if g.running_version} == {"gw-001", "gw-002"}


# -- housekeeping ------------------------------------------------------------------------------


def test_gc_clears_only_unreferenced_bundles_and_clear_removes_a_document(op, mosquitto,
                                                                        mqtt_client, capsys):
    version = push(target={"gateway": "gw-000"}, config_file=op.config, bundles=[],
                   key_file=op.key, broker=op.broker, out=io.StringIO())
    del version
    probe = mqtt_client(mosquitto)
    stray = "ab" * 32
    probe.publish(f"floorline/bundles/{stray}", b"an old bundle", qos=1, retain=True)
    bundles = retained(mqtt_client, mosquitto, "floorline/bundles/+")
    assert len(bundles) == 2
    code, out, _ = run(op.args("fleet", "gc", "--dry-run"), capsys)
    assert code == 0
    assert f"would clear bundle {stray[:12]}" in out
    assert "2 retained bundle(s): 1 referenced, 1 unreferenced" in out
    assert len(retained(mqtt_client, mosquitto, "floorline/bundles/+")) == 2
    code, out, _ = run(op.args("fleet", "gc"), capsys)
    assert code == 0
    left = retained(mqtt_client, mosquitto, "floorline/bundles/+")
    assert list(left) == [t for t in bundles if stray not in t]
    code, out, _ = run(op.args("fleet", "clear", "--gateway", "gw-000"), capsys)
    assert code == 0
    assert retained(mqtt_client, mosquitto, "floorline/gw-000/desired") == {}
    code, out, _ = run(op.args("fleet", "gc"), capsys)
    assert "1 retained bundle(s): 0 referenced, 1 unreferenced" in out
    assert retained(mqtt_client, mosquitto, "floorline/bundles/+") == {}


def test_key_rotation_on_simulated_gateways(op, sim, tmp_path):
    new_key, new_pub = generate_keypair(tmp_path / "operator-2026")
    gateways = make_fleet(2)
    fleet = sim(gateways, keys=[op.pub, new_pub])  # step 1: trust the new key beside the old

    def send(key: Path) -> int:
        return push(targets=[{"gateway": g.id} for g in gateways], config_file=op.config,
                    bundles=[], key_file=key, broker=op.broker, out=io.StringIO())

    v_new = send(new_key)  # step 2: push with the new key
    wait_until(lambda: all(g.verdict(v_new) == "applied" for g in gateways), 10, "new key")
    fleet.keys[:] = [load_public_key(new_pub)]  # step 3: the gateways drop the old key
    send(op.key)
    wait_until(lambda: all(g.history[-1]["result"] == "rejected" for g in gateways), 10,
               "the old key refused")
    assert "bad_signature" in gateways[0].history[-1]["reason"]
    v_next = send(new_key)
    wait_until(lambda: all(g.verdict(v_next) == "applied" for g in gateways), 10, "new key again")
