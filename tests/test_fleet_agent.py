"""The gateway's fleet agent against a real broker: probation that survives a restart, quiet
retained copies, a history kept on disk, health refreshed on a timer, versions in rejections,
targeting (gateway, group, selector) and its precedence, and operator-key rotation.

Each test names the issue 14 finding it guards; each failed before its fix.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from floorline.edge.bundle import archive
from floorline.edge.bundle.hashing import sha256_bytes
from floorline.edge.bundle.signing import (
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
)
from floorline.edge.fleet.envelope import EnvelopeError, open_envelope, peek, seal
from floorline.edge.service.run import Service
from tests.daemon_harness import EXAMPLE, asset_samples, sample_payload
from tests.mqtt_broker import wait_until
from tests.test_fleet import bundle_variant, history, model_versions, wait_result

GW = "gw-agent"
AGENT_LOG = "floorline.edge.fleet.agent"


class Gateway:
    """One gateway's config file (rewritable between starts), its services and a probe."""

    def __init__(self, tmp_path: Path, mosquitto: Any, probe: Any) -> None:
        self.tmp = tmp_path
        self.mosquitto = mosquitto
        self.probe = probe
        self.key, self.pub = generate_keypair(tmp_path / "operator")
        self.prefix = f"agent{time.monotonic_ns() % 10**7}"
        self.base = tmp_path / "gateway.yaml"
        self.services: list[Service] = []

    def write(self, *, keys: list[Path] | None = None, **fleet: object) -> None:
        options = {"probation_s": 0.3, "min_probation_messages": 10,
                   "bundle_fetch_timeout_s": 10, "groups": "[line1]", **fleet}
        extra = "".join(f", {k}: {v}" for k, v in options.items())
        operator = ", ".join(str(k) for k in (keys or [self.pub]))
        self.base.write_text(f"""
gateway: {{id: {GW}}}
state_dir: {self.tmp / 'state'}
broker: {{host: 127.0.0.1, port: {self.mosquitto.port}, keepalive: 10, reconnect_min_s: 0.5,
          reconnect_max_s: 1}}
trust: {{trusted_keys: [{self.pub}]}}
fleet: {{enabled: true, operator_keys: [{operator}]{extra}}}
pipelines:
  - name: vibration
    subscribe: ["{self.prefix}/+/vibration"]
    bundle: {EXAMPLE}
    decoder: {{type: json, timestamp: ts, sequence: seq}}
    window: {{hop: 32}}
    batch: {{max_batch: 8, max_wait_ms: 2}}
""")

    def start(self) -> Service:
        svc = Service(self.base)
        svc.start()
        self.services.append(svc)
        wait_until(lambda: svc.daemon.transport is not None
                   and svc.daemon.transport.subscribed.is_set(), 10, "gateway subscribed")
        return svc

    def stop(self, svc: Service) -> None:
        svc.stop()
        self.services.remove(svc)

    def pipeline(self, bundle: str | Path = EXAMPLE, max_batch: int = 8, **more: object) -> dict:
        return {"name": "vibration", "subscribe": [f"{self.prefix}/+/vibration"],
                "bundle": str(bundle),
                "decoder": {"type": "json", "timestamp": "ts", "sequence": "seq", **more},
                "window": {"hop": 32}, "batch": {"max_batch": max_batch, "max_wait_ms": 2}}

    def publish(self, topic: str, version: int, *, target: dict | None = None,
                config: dict | None = None, key: Path | None = None, bundles: list[str] = (),
                deployment: str = "", **seal_args: Any) -> bytes:
        env = seal(key=load_private_key(key or self.key), version=version,
                   target=target or {"gateway": GW},
                   config={"pipelines": [self.pipeline()]} if config is None else config,
                   bundles=list(bundles), deployment=deployment, **seal_args)
        self.probe.publish(topic, env, qos=1, retain=True)
        return env

    def reported(self) -> list[dict]:
        return [orjson.loads(m.payload) for m in self.probe.messages
                if m.topic == f"floorline/{GW}/reported" and m.payload]


@pytest.fixture
def gw(tmp_path, mosquitto, mqtt_client, caplog):
    caplog.set_level(logging.DEBUG, logger=AGENT_LOG)
    probe = mqtt_client(mosquitto)
    probe.subscribe(f"floorline/{GW}/reported", qos=1)
    g = Gateway(tmp_path, mosquitto, probe)
    g.write()
    yield g
    for svc in list(g.services):
        svc.stop()


DESIRED = f"floorline/{GW}/desired"


def ignored(caplog: pytest.LogCaptureFixture, version: int) -> bool:
    """Whether the agent logged that it ignored VERSION quietly (not newer than seen)."""
    return any(r.name == AGENT_LOG and r.levelno == logging.DEBUG
               and f"version {version} " in r.getMessage() and "not newer" in r.getMessage()
               for r in caplog.records)


def max_batch(svc: Service) -> int:
    return svc.daemon.pipelines[0].config.batch.max_batch


# -- finding 1: a stop during probation never promotes ------------------------------------------


def test_a_stop_during_probation_is_not_a_pass_and_the_next_start_rolls_back(gw, tmp_path,
                                                                              caplog):
    gw.write(probation_s=60)
    svc = gw.start()
    v2 = bundle_variant(tmp_path / "v2", "1.1.0", gw.key)
    archive_bytes, digest = packed(v2, tmp_path)
    gw.probe.publish(f"floorline/bundles/{digest}", archive_bytes, qos=1, retain=True)
    version = int(time.time() * 1000)
    gw.publish(DESIRED, version, config={"pipelines": [gw.pipeline(f"sha256:{digest}")]},
               bundles=[digest], deployment="pdm-1-1")
    assert svc.agent is not None
    wait_until(lambda: svc.agent.running_version == version, 20, "the switch")
    assert model_versions(svc) == ["1.1.0"]
    wait_until(lambda: any((r.get("probation") or {}).get("version") == version
                           for r in gw.reported()), 10, "probation reported")
    probation = next(r["probation"] for r in gw.reported() if r.get("probation"))
    assert probation["until"] > time.time() + 30
    gw.stop(svc)  # mid-probation: the unproven config must not become the last-known-good
    assert "passed probation" not in caplog.text
    lkg = tmp_path / "state" / "fleet" / "last-known-good.json"
    assert not lkg.exists()

    caplog.clear()
    again = gw.start()
    assert model_versions(again) == ["1.0.0"]  # the local file, not the unproven push
    assert again.agent is not None
    assert again.agent.running_version is None
    last = history(again)[-1]
    assert last["version"] == version
    assert last["result"] == "rolled_back"
    assert last["reason"] == f"the gateway restarted during probation of version {version}"
    assert last["deployment"] == "pdm-1-1"
    # The retained document comes back at the connect: ignored quietly, not a "replay".
    wait_until(lambda: ignored(caplog, version), 10, "the retained copy ignored")
    assert history(again)[-1] == last
    assert not any("replay" in r["reason"] for r in history(again))
    wait_until(lambda: any(r.get("history") and r["history"][-1]["result"] == "rolled_back"
                           and r.get("probation") is None for r in gw.reported()), 10,
               "the rollback reported")


def packed(bundle_dir: Path, tmp_path: Path) -> tuple[bytes, str]:
    out = Path(tempfile.mkdtemp(dir=tmp_path)) / "bundle.tar"
    archive.pack(bundle_dir, out)
    data = out.read_bytes()
    return data, sha256_bytes(data)


# -- finding 2: the retained copy of a rolled-back push is not a "replay" -----------------------


def test_a_rolled_back_push_is_not_reported_as_a_replay_after_a_restart(gw, tmp_path, caplog):
    gw.write(probation_s=1.5)
    svc = gw.start()
    version = int(time.time() * 1000)
    # Every message is dead-lettered under the pushed decoder: rolled back after probation.
    gw.publish(DESIRED, version, config={"pipelines": [gw.pipeline(
        fields={"accel_x": "acc.x", "accel_y": "acc.y", "accel_z": "acc.z"})]})
    wait_until(lambda: svc.agent is not None and svc.agent.running_version == version, 20,
               "the switch")
    for i, row in enumerate(asset_samples(40, seed=81)):
        gw.probe.publish(f"{gw.prefix}/pump-r/vibration", sample_payload(1.0 + i / 1000, i, row),
                         qos=1)
    result = wait_result(svc, 1)
    assert result["result"] == "rolled_back", result
    gw.stop(svc)
    caplog.clear()
    again = gw.start()
    wait_until(lambda: ignored(caplog, version), 10, "the retained copy ignored")
    assert [(r["version"], r["result"]) for r in history(again)] == [(version, "rolled_back")]


# -- finding 3: the apply history survives restarts, bounded by fleet.history --------------------


def test_the_apply_history_survives_a_restart_and_stays_bounded(gw):
    gw.write(history=3)
    svc = gw.start()
    base = int(time.time() * 1000)
    for i in range(4):
        gw.publish(DESIRED, base + i, config={"pipelines": [gw.pipeline(max_batch=4 + i)]},
                   deployment=f"step-{i}")
        wait_until(lambda i=i: [r["version"] for r in history(svc)][-1:] == [base + i], 10,
                   f"push {i}")
    before = history(svc)
    assert [r["version"] for r in before] == [base + 1, base + 2, base + 3]
    gw.stop(svc)
    again = gw.start()
    assert history(again) == before
    assert history(again)[-1]["deployment"] == "step-3"
    assert max_batch(again) == 7
    wait_until(lambda: any(len(r.get("history", [])) == 3 and r["history"] == before
                           for r in gw.reported()), 10, "the kept history reported")


# -- finding 4: health is refreshed on a timer --------------------------------------------------


def test_health_in_the_reported_state_is_refreshed_every_report_interval(gw):
    gw.write(report_interval_s=0.3)
    gw.start()
    wait_until(lambda: len({(r.get("health") or {}).get("ts") for r in gw.reported()} - {None})
               >= 3, 10, "three health reports without any event")
    stamps = [r["health"]["ts"] for r in gw.reported()]
    assert stamps == sorted(stamps)
    assert all(abs(r["health"]["ts"] - r["ts"]) < 1 for r in gw.reported())


# -- finding 8: a rejection names the version it could read -------------------------------------


@pytest.mark.parametrize("problem", ["expired", "wrong_target", "untrusted_key"])
def test_a_rejected_document_names_its_version(gw, tmp_path, problem):
    svc = gw.start()
    version = int(time.time() * 1000)
    if problem == "expired":
        gw.publish(DESIRED, version, now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=8))
    elif problem == "wrong_target":
        gw.publish(DESIRED, version, target={"group": "line9"})
    else:
        other, _ = generate_keypair(tmp_path / "intruder")
        gw.publish(DESIRED, version, key=other)
    result = wait_result(svc, 1)
    assert result["result"] == "rejected"
    assert result["version"] == version, result
    wait_until(lambda: any(r.get("history") and r["history"][-1]["version"] == version
                           for r in gw.reported()), 10, "the rejection reported")


# -- targeting ---------------------------------------------------------------------------------


def test_a_selector_push_applies_where_the_attributes_match_and_is_reported(gw, caplog):
    gw.write(attributes="{site: a, line: 3, machine: rig-7}")
    svc = gw.start()
    assert svc.agent is not None
    attrs = svc.agent.attributes
    assert (attrs["site"], attrs["line"]) == ("a", "3")
    assert attrs["machine"] == "rig-7"  # configured wins over automatic
    assert attrs["floorline"]
    assert "runtimes" in attrs
    version = int(time.time() * 1000)
    gw.publish("floorline/selectors/site-a-line-3/desired", version,
               target={"selector": {"site": "a", "line": "3"}},
               config={"pipelines": [gw.pipeline(max_batch=5)]}, deployment="pdm-a3")
    result = wait_result(svc, 1)
    assert (result["version"], result["result"], result["deployment"]) == (
        version, "applied", "pdm-a3")
    assert max_batch(svc) == 5
    signer = key_id(load_public_key(gw.pub))
    def done(r: dict) -> bool:
        return r.get("running_version") == version and bool(r.get("history"))

    wait_until(lambda: any(done(r) for r in gw.reported()), 10, "reported")
    rep = [r for r in gw.reported() if done(r)][-1]
    assert rep["deployment"] == "pdm-a3"
    assert rep["signed_by"] == signer
    assert rep["attributes"] == attrs
    assert rep["probation"] is None
    assert rep["config_source"] == "fleet"
    assert rep["history"][-1] == {"version": version, "result": "applied",
                                  "reason": "passed probation", "ts": rep["history"][-1]["ts"],
                                  "deployment": "pdm-a3"}
    # Another site's selector, newer: ignored without a trace.
    gw.publish("floorline/selectors/site-b/desired", version + 1,
               target={"selector": {"site": "b"}},
               config={"pipelines": [gw.pipeline(max_batch=6)]})
    wait_until(lambda: "does not match this gateway" in caplog.text, 10, "selector ignored")
    assert len(history(svc)) == 1
    assert max_batch(svc) == 5


def test_precedence_highest_version_wins_then_gateway_over_group_over_selector(gw, caplog):
    gw.write(attributes="{site: a}")
    v = int(time.time() * 1000)
    selector_topic = "floorline/selectors/everywhere/desired"
    group_topic = "floorline/groups/line1/desired"
    # Retained before the gateway starts: they arrive together at its connect. The group's is
    # the newest: only it is applied, the others are ignored quietly.
    gw.publish(DESIRED, v, config={"pipelines": [gw.pipeline(max_batch=3)]})
    gw.publish(group_topic, v + 2, target={"group": "line1"},
               config={"pipelines": [gw.pipeline(max_batch=4)]})
    gw.publish(selector_topic, v + 1, target={"selector": {}},
               config={"pipelines": [gw.pipeline(max_batch=5)]})
    svc = gw.start()
    assert wait_result(svc, 1)["version"] == v + 2
    assert max_batch(svc) == 4
    wait_until(lambda: ignored(caplog, v) and ignored(caplog, v + 1), 10, "older ones ignored")
    assert len(history(svc)) == 1
    # Equal versions: selector first, then the gateway's wins over it, the group's loses.
    w = v + 10
    gw.publish(selector_topic, w, target={"selector": {"site": "a"}},
               config={"pipelines": [gw.pipeline(max_batch=5)]})
    wait_until(lambda: max_batch(svc) == 5 and len(history(svc)) == 2, 10, "selector applied")
    gw.publish(DESIRED, w, config={"pipelines": [gw.pipeline(max_batch=6)]})
    wait_until(lambda: max_batch(svc) == 6 and len(history(svc)) == 3, 10, "gateway applied")
    caplog.clear()
    gw.publish(group_topic, w, target={"group": "line1"},
               config={"pipelines": [gw.pipeline(max_batch=7)]})
    wait_until(lambda: ignored(caplog, w), 10, "the group's equal version ignored")
    assert max_batch(svc) == 6
    # A newer selector document beats the gateway's older one.
    gw.publish(selector_topic, w + 1, target={"selector": {"site": "a"}},
               config={"pipelines": [gw.pipeline(max_batch=2)]})
    wait_until(lambda: max_batch(svc) == 2 and len(history(svc)) == 4, 10, "newest applied")
    assert [r["result"] for r in history(svc)] == ["applied"] * 4


def test_an_empty_config_runs_the_local_file(gw):
    svc = gw.start()
    v = int(time.time() * 1000)
    gw.publish(DESIRED, v, config={"pipelines": [gw.pipeline(max_batch=5)]}, deployment="d1")
    wait_until(lambda: len(history(svc)) == 1 and max_batch(svc) == 5, 10, "push applied")
    gw.publish(DESIRED, v + 1, config={}, deployment="d1-rollback")
    result = wait_result(svc, 2)
    assert (result["version"], result["result"]) == (v + 1, "applied")
    assert max_batch(svc) == 8  # the local file's
    wait_until(lambda: any(r.get("running_version") == v + 1 and len(r["history"]) == 2
                           for r in gw.reported()), 10, "reported")
    rep = [r for r in gw.reported() if r.get("running_version") == v + 1][-1]
    assert rep["config_source"] == "local"
    assert rep["deployment"] == "d1-rollback"


# -- housekeeping: a cleared retained bundle is not a bundle ------------------------------------


def test_an_empty_message_on_a_bundle_topic_is_ignored_while_fetching(gw, tmp_path):
    svc = gw.start()
    v2 = bundle_variant(tmp_path / "v2", "1.1.0", gw.key)
    data, digest = packed(v2, tmp_path)
    topic = f"floorline/bundles/{digest}"
    gw.publish(DESIRED, int(time.time() * 1000),
               config={"pipelines": [gw.pipeline(f"sha256:{digest}")]}, bundles=[digest])
    transport = svc.daemon.transport
    assert transport is not None
    wait_until(lambda: topic in dict(transport._subscriptions), 10, "fetching the bundle")
    time.sleep(0.3)  # the SUBACK
    gw.probe.publish(topic, b"", qos=1, retain=True)  # the operator clears the retained bundle
    time.sleep(0.5)
    gw.probe.publish(topic, data, qos=1, retain=True)
    result = wait_result(svc, 1)
    assert result["result"] == "applied", result
    assert model_versions(svc) == ["1.1.0"]


# -- operator-key rotation ----------------------------------------------------------------------


def test_operator_key_rotation_trust_both_then_drop_the_old(gw, tmp_path, caplog):
    new_key, new_pub = generate_keypair(tmp_path / "operator-2026")
    gw.write(keys=[gw.pub, new_pub])
    svc = gw.start()
    v = int(time.time() * 1000)
    gw.publish(DESIRED, v, config={"pipelines": [gw.pipeline(max_batch=5)]})
    assert wait_result(svc, 1)["result"] == "applied"
    gw.publish(DESIRED, v + 1, key=new_key, config={"pipelines": [gw.pipeline(max_batch=6)]})
    assert wait_result(svc, 2)["result"] == "applied"
    assert svc.agent is not None
    assert svc.agent.signed_by == key_id(load_public_key(new_pub))
    gw.stop(svc)
    gw.write(keys=[new_pub])  # the old key retired
    caplog.clear()
    again = gw.start()
    assert max_batch(again) == 6
    wait_until(lambda: ignored(caplog, v + 1), 10, "the retained document ignored")
    gw.publish(DESIRED, v + 2, config={"pipelines": [gw.pipeline(max_batch=7)]})  # old key
    result = wait_result(again, 3)
    assert result["result"] == "rejected"
    old_id = key_id(load_public_key(gw.pub))
    assert result["reason"].startswith("bad_signature: ")
    assert f"signed by key {old_id}, which is not trusted" in result["reason"]
    assert max_batch(again) == 6
    gw.publish(DESIRED, v + 3, key=new_key, config={"pipelines": [gw.pipeline(max_batch=4)]})
    assert wait_result(again, 4)["result"] == "applied"


# -- the envelope (no broker) -------------------------------------------------------------------


def test_envelopes_carry_deployment_and_selector_targets(tmp_path):
    key_file, pub = generate_keypair(tmp_path / "op")
    key, keys = load_private_key(key_file), [load_public_key(pub)]
    config = {"pipelines": []}
    env = seal(key=key, version=7, target={"selector": {"site": "a"}}, config=config,
               bundles=[], deployment="roll-1")
    assert peek(env) == (7, {"selector": {"site": "a"}})
    d = open_envelope(env, operator_keys=keys, gateway="g", groups=[],
                      attributes={"site": "a", "line": "2"})
    assert (d.deployment, d.scope, d.rank) == ("roll-1", "selector", 1)
    with pytest.raises(EnvelopeError) as err:
        open_envelope(env, operator_keys=keys, gateway="g", groups=[], attributes={"site": "b"})
    assert (err.value.reason, err.value.version, err.value.deployment) == (
        "wrong_target", 7, "roll-1")
    everyone = seal(key=key, version=8, target={"selector": {}}, config=config, bundles=[])
    assert open_envelope(everyone, operator_keys=keys, gateway="g", groups=[]).deployment == ""
    old = seal(key=key, version=9, target={"gateway": "g"}, config=config, bundles=[])
    assert b"deployment" not in base64.b64decode(orjson.loads(old)["payload"])
    assert open_envelope(old, operator_keys=keys, gateway="g", groups=[]).rank == 3
    for bad in ({"gateway": "g", "group": "x"}, {"selector": {"site": 1}}, {"site": "a"}):
        env = seal(key=key, version=10, target=bad, config=config, bundles=[])
        with pytest.raises(EnvelopeError, match="malformed"):
            open_envelope(env, operator_keys=keys, gateway="g", groups=["x"])
