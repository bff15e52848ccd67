"""Fleet pushes end to end against a real broker: signed, verified, atomic, rolled back when bad."""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from floorline.edge.bundle.bundle import GOLDEN_FILE, MANIFEST_FILE, SIGNATURE_FILE
from floorline.edge.bundle.hashing import sha256_file
from floorline.edge.bundle.manifest import Manifest
from floorline.edge.bundle.signing import generate_keypair, load_private_key, sign
from floorline.edge.config.model import BrokerConfig
from floorline.edge.fleet.envelope import seal
from floorline.edge.fleet.operator import push, status
from floorline.edge.service.run import Service
from tests.daemon_harness import EXAMPLE, asset_samples, sample_payload
from tests.mqtt_broker import wait_until

GW = "gw-fleet"


def bundle_variant(dest: Path, version: str, key_file: Path | None, *,
                   break_golden: bool = False) -> Path:
    """A copy of the example bundle with another version (and optionally wrong golden outputs),
    re-signed: a different, valid (or self-test-failing) bundle without TensorFlow."""
    shutil.copytree(EXAMPLE, dest)
    manifest = Manifest.from_bytes((dest / MANIFEST_FILE).read_bytes())
    changes: dict[str, object] = {"version": version}
    if break_golden:
        with np.load(dest / GOLDEN_FILE) as npz:
            arrays = {k: npz[k] for k in npz.files}
        for k in arrays:
            if k.startswith("expected:"):
                arrays[k] = arrays[k][:, ::-1].copy()  # scores in the wrong order
        with (dest / GOLDEN_FILE).open("wb") as fh:
            np.savez(fh, **arrays)
        golden = manifest.golden.model_copy(update={"sha256": sha256_file(dest / GOLDEN_FILE)})
        changes["golden"] = golden
    manifest = manifest.model_copy(update=changes)
    (dest / MANIFEST_FILE).write_bytes(manifest.to_bytes())
    (dest / SIGNATURE_FILE).unlink(missing_ok=True)
    if key_file is not None:
        sig = sign(manifest.to_bytes(), load_private_key(key_file))
        (dest / SIGNATURE_FILE).write_bytes(sig.to_bytes())
    return dest


@pytest.fixture
def fleet(tmp_path, mosquitto):
    """Operator keys, a gateway config file, and helpers to run and push."""
    key, pub = generate_keypair(tmp_path / "operator")
    prefix = f"plant{int(time.time() * 1000) % 10**6}"
    base = tmp_path / "gateway.yaml"
    base.write_text(f"""
gateway: {{id: {GW}}}
state_dir: {tmp_path / 'state'}
broker: {{host: 127.0.0.1, port: {mosquitto.port}, keepalive: 10, reconnect_min_s: 0.5,
          reconnect_max_s: 1}}
trust: {{trusted_keys: [{pub}]}}
fleet: {{enabled: true, operator_keys: [{pub}], groups: [line1], probation_s: 1.5,
         min_probation_messages: 10, bundle_fetch_timeout_s: 10}}
pipelines:
  - name: vibration
    subscribe: ["{prefix}/+/vibration"]
    bundle: {EXAMPLE}
    decoder: {{type: json, timestamp: ts, sequence: seq}}
    window: {{hop: 32}}
    batch: {{max_batch: 8, max_wait_ms: 2}}
""")
    broker = BrokerConfig(host="127.0.0.1", port=mosquitto.port)

    class Fleet:
        def __init__(self) -> None:
            self.key, self.pub, self.base, self.prefix = key, pub, base, prefix
            self.broker = broker
            self.services: list[Service] = []

        def start(self) -> Service:
            svc = Service(base)
            svc.start()
            self.services.append(svc)
            wait_until(lambda: svc.daemon.transport is not None
                       and svc.daemon.transport.subscribed.is_set(), 10, "gateway subscribed")
            return svc

        def desired_file(self, bundle: Path, **pipeline: str) -> Path:
            extra = "".join(f"    {k}: {v}\n" for k, v in pipeline.items())
            decoder = pipeline.pop("decoder", None)
            path = tmp_path / f"desired-{time.monotonic_ns()}.yaml"
            path.write_text(
                "pipelines:\n"
                "  - name: vibration\n"
                f'    subscribe: ["{prefix}/+/vibration"]\n'
                f"    bundle: {bundle}\n"
                + ("" if decoder else "    decoder: {type: json, timestamp: ts, sequence: seq}\n")
                + "    window: {hop: 32}\n"
                "    batch: {max_batch: 8, max_wait_ms: 2}\n" + extra
            )
            return path

        def push(self, bundle: Path, *, version: int | None = None, sign_bundles: bool = False,
                 **pipeline: str) -> int:
            return push(target={"gateway": GW}, config_file=self.desired_file(bundle, **pipeline),
                        bundles=[bundle], key_file=key, broker=broker, version=version,
                        sign_bundles=sign_bundles, out=io.StringIO())

        def publish_raw(self, topic: str, payload: bytes, probe) -> None:
            probe.publish(topic, payload, qos=1, retain=True)

    f = Fleet()
    yield f
    for svc in f.services:
        svc.stop()


def history(svc: Service) -> list[dict]:
    assert svc.agent is not None
    return [r.__dict__ for r in svc.agent.history]


def wait_result(svc: Service, n: int, timeout: float = 20) -> dict:
    wait_until(lambda: len(history(svc)) >= n, timeout, f"{n} apply results")
    return history(svc)[n - 1]


def model_versions(svc: Service) -> list[str]:
    return [p.model.bundle.manifest.version for p in svc.daemon.pipelines]


def test_a_good_push_is_applied_reported_and_survives_a_restart(fleet, tmp_path, mqtt_client,
                                                                 mosquitto):
    svc = fleet.start()
    v2 = bundle_variant(tmp_path / "v2", "1.1.0", fleet.key)
    version = fleet.push(v2)
    result = wait_result(svc, 1)
    assert (result["version"], result["result"]) == (version, "applied"), result
    assert model_versions(svc) == ["1.1.0"]
    probe = mqtt_client(mosquitto)
    probe.subscribe(f"floorline/{GW}/reported", qos=1)
    wait_until(lambda: any(orjson.loads(m.payload).get("running_version") == version
                           for m in probe.messages), 10, "reported version")
    rows = status(broker=fleet.broker, gateway=GW, wait_s=1.0, out=io.StringIO())
    assert rows[0]["version"] == version
    assert rows[0]["online"]
    assert "pdm-classifier 1.1.0" in rows[0]["models"]
    svc.stop()
    fleet.services.remove(svc)
    again = fleet.start()  # comes up on the last-known-good, not the local file
    assert model_versions(again) == ["1.1.0"]
    assert again.agent is not None
    assert again.agent.running_version == version


@pytest.mark.parametrize("problem", ["tampered", "unsigned_bundle", "fails_selftest"])
def test_bad_bundles_are_refused_and_the_old_config_keeps_serving(fleet, tmp_path, mqtt_client,
                                                                  mosquitto, problem):
    svc = fleet.start()
    probe = mqtt_client(mosquitto)
    if problem == "tampered":
        # A bundle address whose retained bytes are not the bundle that hashes to it.
        svc2_version = int(time.time() * 1000)
        addr = "ab" * 32
        probe.publish(f"floorline/bundles/{addr}", b"not the bundle at this address", qos=1,
                      retain=True)
        env = seal(key=load_private_key(fleet.key), version=svc2_version, target={"gateway": GW},
                   config={"pipelines": [_pipeline(fleet.prefix, f"sha256:{addr}")]},
                   bundles=[addr])
        probe.publish(f"floorline/{GW}/desired", env, qos=1, retain=True)
        result = wait_result(svc, 1)
        assert result["result"] == "rejected"
        assert "hashes to" in result["reason"]
    else:
        bad = bundle_variant(tmp_path / "bad", "9.9.9",
                             None if problem == "unsigned_bundle" else fleet.key,
                             break_golden=problem == "fails_selftest")
        fleet.push(bad)
        result = wait_result(svc, 1)
        assert result["result"] == "rejected", result
        words = "signature" if problem == "unsigned_bundle" else "does not reproduce"
        assert words in result["reason"]
    assert model_versions(svc) == ["1.0.0"]  # still the local config's bundle
    assert_still_predicting(svc, fleet, probe)


def _pipeline(prefix: str, bundle: str) -> dict:
    return {"name": "vibration", "subscribe": [f"{prefix}/+/vibration"], "bundle": bundle,
            "decoder": {"type": "json", "timestamp": "ts", "sequence": "seq"},
            "window": {"hop": 32}}


def assert_still_predicting(svc: Service, fleet, probe) -> None:
    probe.subscribe(f"floorline/{GW}/pred/#", qos=1)
    samples = asset_samples(64, seed=70)
    topic = f"{fleet.prefix}/pump-s/vibration"
    for i, row in enumerate(samples):
        probe.publish(topic, sample_payload(5000.0 + i / 1000, i, row), qos=1)
    (msg,) = probe.wait_for(1, f"floorline/{GW}/pred/#", timeout=10)
    assert orjson.loads(msg.payload)["model"]["version"] == model_versions(svc)[0]


@pytest.mark.parametrize("problem", ["unsigned", "wrong_key", "expired", "replayed",
                                     "wrong_target"])
def test_bad_desired_documents_are_rejected_and_reported(fleet, tmp_path, mqtt_client, mosquitto,
                                                         problem):
    svc = fleet.start()
    probe = mqtt_client(mosquitto)
    key = load_private_key(fleet.key)
    config = {"pipelines": [_pipeline(fleet.prefix, str(EXAMPLE))]}
    expect = {"unsigned": "unsigned", "wrong_key": "bad_signature", "expired": "expired",
              "replayed": "replay", "wrong_target": "wrong_target"}[problem]
    n = 1
    if problem == "unsigned":
        env = json.dumps({"payload": "e30="}).encode()
    elif problem == "wrong_key":
        other, _ = generate_keypair(tmp_path / "intruder")
        env = seal(key=load_private_key(other), version=10, target={"gateway": GW},
                   config=config, bundles=[])
    elif problem == "expired":
        env = seal(key=key, version=10, target={"gateway": GW}, config=config, bundles=[],
                   now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=8))
    elif problem == "wrong_target":
        env = seal(key=key, version=10, target={"group": "line9"}, config=config, bundles=[])
    else:
        v2 = bundle_variant(tmp_path / "v2", "1.1.0", fleet.key)
        fleet.push(v2, version=50)
        assert wait_result(svc, 1)["result"] == "applied"
        env = seal(key=key, version=40, target={"gateway": GW}, config=config, bundles=[])
        n = 2
    probe.publish(f"floorline/{GW}/desired", env, qos=1, retain=True)
    if problem == "replayed":
        # Not newer than the highest seen: ignored quietly, not recorded (issue 14; the
        # retained copy of a rolled-back push must not read as a replay).
        time.sleep(1.5)
        assert len(history(svc)) == 1
        assert model_versions(svc) == ["1.1.0"]
        return
    result = wait_result(svc, n)
    assert result["result"] == "rejected"
    assert expect in result["reason"], result
    assert model_versions(svc) == (["1.1.0"] if problem == "replayed" else ["1.0.0"])


def test_a_push_that_breaks_the_stream_is_rolled_back_after_probation(fleet, tmp_path,
                                                                      mqtt_client, mosquitto):
    svc = fleet.start()
    probe = mqtt_client(mosquitto)
    v2 = bundle_variant(tmp_path / "v2", "1.1.0", fleet.key)
    # The new pipeline expects fields the plant does not send: every message is dead-lettered.
    fleet.push(v2, decoder="{type: json, timestamp: ts, sequence: seq, "
                           "fields: {accel_x: acc.x, accel_y: acc.y, accel_z: acc.z}}")
    wait_until(lambda: model_versions(svc) == ["1.1.0"], 20, "switch to the new config")
    samples = asset_samples(40, seed=71)
    for i, row in enumerate(samples):
        probe.publish(f"{fleet.prefix}/pump-r/vibration",
                      sample_payload(1.0 + i / 1000, i, row), qos=1)
    result = wait_result(svc, 1)
    assert result["result"] == "rolled_back", result
    assert "dead-lettered" in result["reason"]
    assert model_versions(svc) == ["1.0.0"]
    assert_still_predicting(svc, fleet, probe)


def test_an_offline_gateway_applies_the_retained_push_when_it_connects(fleet, tmp_path):
    v2 = bundle_variant(tmp_path / "v2", "1.1.0", fleet.key)
    version = fleet.push(v2)  # nobody is listening yet
    svc = fleet.start()
    result = wait_result(svc, 1)
    assert (result["version"], result["result"]) == (version, "applied")
    assert model_versions(svc) == ["1.1.0"]


def test_a_hot_swap_under_a_live_stream_loses_and_duplicates_nothing(fleet, tmp_path, mqtt_client,
                                                                     mosquitto):
    svc = fleet.start()
    probe = mqtt_client(mosquitto)
    probe.subscribe(f"floorline/{GW}/pred/#", qos=1)
    samples = asset_samples(64 * 40, seed=72)
    stop = threading.Event()
    sent = 0

    def stream() -> None:
        nonlocal sent
        for i, row in enumerate(samples):
            if stop.is_set():
                return
            probe.publish(f"{fleet.prefix}/pump-h/vibration",
                          sample_payload(9.0 + i / 1000, i, row), qos=1)
            sent = i + 1

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    wait_until(lambda: sent > 600, 30, "stream under way")
    fleet.push(bundle_variant(tmp_path / "v2", "1.1.0", fleet.key))
    thread.join(60)
    windows = (len(samples) - 64) // 32 + 1
    wait_until(lambda: len(probe.messages) >= windows, 30, "every window")
    result = wait_result(svc, 1)
    assert result["result"] == "applied", result
    bodies = [orjson.loads(m.payload) for m in probe.messages]
    seqs = [b["seq"] for b in bodies]
    assert sorted(seqs) == list(range(windows))  # none lost, none twice
    versions = [b["model"]["version"] for b in sorted(bodies, key=lambda b: b["seq"])]
    switch = versions.index("1.1.0")
    assert set(versions[:switch]) == {"1.0.0"}
    assert set(versions[switch:]) == {"1.1.0"}
    assert 0 < switch < windows


def test_sighup_reload_applies_the_edited_file_and_refuses_a_broken_one(fleet):
    svc = fleet.start()
    text = fleet.base.read_text()
    fleet.base.write_text(text.replace("max_batch: 8", "max_batch: 4"))
    assert svc.reload()
    assert svc.daemon.pipelines[0].config.batch.max_batch == 4
    fleet.base.write_text(text.replace("max_batch: 8", "max_batch: many"))
    assert not svc.reload()
    assert svc.daemon.pipelines[0].config.batch.max_batch == 4


def test_a_push_with_a_shadow_model_ships_both_bundles_and_runs_the_shadow(fleet, tmp_path):
    # The candidate travels like the primary: packed, retained on its bundle topic, fetched into
    # the gateway's store, verified (signed), and run in shadow on the same windows.
    svc = fleet.start()
    primary = bundle_variant(tmp_path / "v2", "1.1.0", fleet.key)
    candidate = bundle_variant(tmp_path / "v3", "1.2.0", fleet.key)
    config = fleet.desired_file(primary, shadow=f"{{bundle: {candidate}}}")
    version = push(target={"gateway": GW}, config_file=config, bundles=[primary, candidate],
                   key_file=fleet.key, broker=fleet.broker, out=io.StringIO())
    result = wait_result(svc, 1)
    assert (result["version"], result["result"]) == (version, "applied"), result
    (pipeline,) = svc.daemon.pipelines
    assert str(pipeline.config.bundle).startswith("sha256:")
    assert pipeline.config.shadow is not None
    assert str(pipeline.config.shadow.bundle).startswith("sha256:")
    assert pipeline.shadow is not None
    assert pipeline.shadow.model.bundle.manifest.version == "1.2.0"
