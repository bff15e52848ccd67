"""``floorline check``: it builds what ``floorline run`` builds, and ``--connect`` tries the broker.

A config ``check`` passes must not fail at ``run``'s start: each pipeline's bundle is verified
and self-tested, then the model must fit the config and the real pipeline is constructed
(decoder for the model's features, windower, batcher, output). Every failure names the file,
the line of the offending key and the pipeline.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from floorline.edge.cli.main import main as floorline
from tests.mqtt_broker import AUTH_PASSWORD, AUTH_USER, Mosquitto, TlsMaterial, free_port

ROOT = Path(__file__).resolve().parent.parent
FLOORLINE_RUN = [sys.executable, "-m", "floorline.edge"]
EXAMPLE = ROOT / "edge" / "models" / "pdm-classifier"


def write_config(tmp_path: Path, pipelines: str, broker: str = "{host: 127.0.0.1, port: 1}",
                 name: str = "gateway.yaml") -> Path:
    """Line 1 gateway, 3 broker, 4 pipelines; a pipeline() entry starts on line 5."""
    path = tmp_path / name
    path.write_text(
        "gateway: {id: gw}\n"
        f"state_dir: '{tmp_path / 'state'}'\n"
        f"broker: {broker}\n"
        f"pipelines:\n{pipelines}"
    )
    return path


def pipeline(name: str = "vibration", *, decoder: str = "{type: json, timestamp: ts, seq: 0}",
             extra: str = "", backend: str = "litert",
             subscribe: str = '["plant/+/+/vibration"]') -> str:
    """Lines: name +0, subscribe +1, bundle +2, backend +3, decoder +4, EXTRA from +5."""
    decoder = decoder.replace("seq: 0", "sequence: seq")
    return (
        f"  - name: {name}\n"
        f"    subscribe: {subscribe}\n"
        f'    bundle: "{EXAMPLE}"\n'
        f"    backend: {backend}\n"
        f"    decoder: {decoder}\n"
        f"{extra}"
    )


def check(config: Path, *args: str) -> int:
    return floorline(["check", "--config", str(config), *args])


def test_a_good_config_builds_every_pipeline_and_exits_zero(tmp_path, capsys):
    cfg = write_config(tmp_path, pipeline() + pipeline(
        "blocks", decoder="{type: binary, header: timestamp, sample_interval_ms: 1}",
        subscribe='["logger/+/block"]', extra="    window: {max_gap_s: 0.01}\n"))
    assert check(cfg) == 0
    out = capsys.readouterr().out
    assert "pipeline vibration: ok  pdm-classifier 1.0.0" in out
    assert "pipeline blocks: ok  pdm-classifier 1.0.0" in out


# --- what `run` refuses when it builds a pipeline, `check` refuses: at the key, naming the pipeline


@pytest.mark.parametrize(
    ("entry", "line", "message"),
    [
        (pipeline(extra="    window: {hop: 65}\n"), 10,
         "window.hop: 65 is larger than the model's window of 64 samples (1 to 64)"),
        (pipeline(decoder="{type: json, fields: {temp: t}}"), 9,
         ("decoder.fields: 'temp' is not a feature of the model "
         "(features: accel_x, accel_y, accel_z)")),
        (pipeline(decoder="{type: json, fields: {accel_xx: x}}"), 9,
         "decoder.fields: 'accel_xx' is not a feature of the model; did you mean 'accel_x'?"),
        (pipeline(decoder="{type: csv, columns: [timestamp, accel_x, accel_y]}"), 9,
         "decoder.columns: no column for the model's feature 'accel_z'"),
        (pipeline(decoder="{type: csv, columns: [timestamp, accel_x, accel_y, accel_z, temp]}"),
         9, "decoder.columns: 'temp' is not a feature of the model"),
        (pipeline(extra="    thresholds: {imbalanse: 0.5}\n"), 10,
         "thresholds: 'imbalanse' is not a label of the model; did you mean 'imbalance'?"),
        (pipeline(extra="    labels: [ok, bad]\n"), 10,
         "labels: 2 labels for the model's 4 outputs"),
    ],
)
def test_what_run_would_refuse_fails_check_at_the_key_naming_the_pipeline(
    tmp_path, capsys, entry, line, message
):
    cfg = write_config(tmp_path, entry)
    assert check(cfg) == 1
    out = capsys.readouterr().out
    assert "pipeline vibration: FAIL\n" in out
    assert f"    {cfg}:{line}: pipelines[0] (vibration): {message}" in out
    assert "vibration: ok" not in out


def test_every_pipeline_is_checked_and_the_failing_one_named(tmp_path, capsys):
    cfg = write_config(tmp_path, pipeline() + pipeline(
        "second", subscribe='["plant/+/+/second"]', extra="    window: {hop: 100}\n"))
    assert check(cfg) == 1
    out = capsys.readouterr().out
    assert "pipeline vibration: ok" in out
    assert f"{cfg}:15: pipelines[1] (second): window.hop: 100 is larger" in out


def test_a_backend_that_cannot_run_the_named_artifact_is_the_reported_mismatch(tmp_path, capsys):
    cfg = write_config(tmp_path, pipeline(backend="onnx", extra="    artifact: model.tflite\n"))
    assert check(cfg) == 1
    out = capsys.readouterr().out
    assert (f"{cfg}:10: pipelines[0] (vibration): artifact model.tflite is tflite; backend onnx "
            "runs onnx artifacts") in out


def test_a_tampered_bundle_is_reported_at_the_bundle_line(tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(EXAMPLE, bundle)
    data = bytearray((bundle / "model.tflite").read_bytes())
    data[1000] ^= 0x01
    (bundle / "model.tflite").write_bytes(bytes(data))
    cfg = write_config(tmp_path, pipeline().replace(str(EXAMPLE), str(bundle)))
    assert check(cfg) == 1
    out = capsys.readouterr().out
    assert f"{cfg}:7: pipelines[0] (vibration): {bundle}: model.tflite has sha256" in out


# --- check --connect ------------------------------------------------------------------------------


def broker_yaml(broker: Mosquitto | int, extra: str = "") -> str:
    port = broker if isinstance(broker, int) else broker.port
    return f"{{host: 127.0.0.1, port: {port}, reconnect_min_s: 1, reconnect_max_s: 2{extra}}}"


def test_connect_reports_connack_and_suback(mosquitto, tmp_path, capsys):
    cfg = write_config(tmp_path, pipeline() + pipeline("more", subscribe='["a/#", "b/+/c"]'),
                       broker_yaml(mosquitto))
    assert check(cfg, "--connect") == 0
    out = capsys.readouterr().out
    assert (f"broker 127.0.0.1:{mosquitto.port}: ok  connected (MQTT 5); subscriptions "
            "acknowledged: plant/+/+/vibration, a/#, b/+/c") in out


def test_connect_never_takes_over_the_gateways_own_session(mosquitto, mqtt_client, tmp_path):
    # A running gateway uses the configured client id: check must not kick it off the broker.
    gateway = mqtt_client(mosquitto, client_id="floorline-gw")
    cfg = write_config(tmp_path, pipeline(), broker_yaml(mosquitto))
    assert check(cfg, "--connect") == 0
    assert gateway.connected.is_set()
    assert "closing old connection" not in mosquitto.log_text()


def test_connect_tries_a_shared_subscription_in_a_group_of_its_own(mosquitto, mqtt_client,
                                                                    tmp_path, capsys):
    # Joining the gateways' share group would take part of the live stream, and mosquitto hands
    # what an unacknowledging member held to nobody else: check subscribes its own group.
    member = mqtt_client(mosquitto)
    member.subscribe("$share/line1/plant/+/+/vibration", qos=1)
    cfg = write_config(tmp_path, pipeline(subscribe='["$share/line1/plant/+/+/vibration"]',
                                          extra="    share_dispatch: sticky\n"),
                       broker_yaml(mosquitto))
    assert check(cfg, "--connect") == 0
    out = capsys.readouterr().out
    group = f"line1-check-{os.getpid()}"
    assert f"subscriptions acknowledged: $share/{group}/plant/+/+/vibration" in out
    assert "$share/line1/" not in out


def test_connect_without_a_broker_fails_at_once_with_the_reason(tmp_path, capsys):
    port = free_port()
    cfg = write_config(tmp_path, pipeline(), broker_yaml(port))
    start = time.monotonic()
    assert check(cfg, "--connect", "--timeout", "20") == 1
    assert time.monotonic() - start < 15  # the first refusal is the answer, not the timeout
    assert f"broker 127.0.0.1:{port}: FAIL  cannot connect to 127.0.0.1:{port}" in (
        capsys.readouterr().out)


def test_connect_reports_refused_credentials(auth_broker, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHECK_TEST_PASSWORD", "wrong")
    creds = f", username: {AUTH_USER}, password_env: CHECK_TEST_PASSWORD"
    cfg = write_config(tmp_path, pipeline(), broker_yaml(auth_broker, creds))
    assert check(cfg, "--connect") == 1
    assert "FAIL  broker refused the connection" in capsys.readouterr().out
    monkeypatch.setenv("CHECK_TEST_PASSWORD", AUTH_PASSWORD)
    assert check(cfg, "--connect") == 0


def test_connect_uses_tls_as_configured(tls_broker, tls_material: TlsMaterial, tmp_path, capsys):
    good = write_config(tmp_path, pipeline(),
                        broker_yaml(tls_broker, f", tls: {{ca_file: '{tls_material.ca_cert}'}}"))
    assert check(good, "--connect") == 0
    assert "ok  connected (MQTT 5, TLS)" in capsys.readouterr().out
    # The system CAs do not know the test CA: the handshake fails, and check says so.
    system = write_config(tmp_path, pipeline(), broker_yaml(tls_broker, ", tls: {insecure: false}"),
                          name="system-cas.yaml")
    assert check(system, "--connect") == 1
    assert "certificate verify failed" in capsys.readouterr().out.lower()


def test_connect_names_the_filters_the_broker_refuses(acl_broker: int, tmp_path, capsys):
    cfg = write_config(tmp_path, pipeline(subscribe='["plant/+/+/vibration", "secret/#"]'),
                       broker_yaml(acl_broker))
    assert check(cfg, "--connect") == 1
    out = capsys.readouterr().out
    assert "FAIL  connected, but broker refused subscriptions: secret/#" in out
    assert "plant/+/+/vibration" not in out.split("refused subscriptions:")[1]


def test_connect_gives_up_after_the_timeout_when_the_broker_never_answers(silent_server, tmp_path,
                                                                        capsys):
    cfg = write_config(tmp_path, pipeline(), broker_yaml(silent_server))
    start = time.monotonic()
    assert check(cfg, "--connect", "--timeout", "1") == 1
    assert time.monotonic() - start < 10
    assert "FAIL  no answer (CONNACK) within 1 s" in capsys.readouterr().out


_DYNSEC = {
    # Anonymous clients may subscribe plant/# and nothing else: a SUBACK refuses other filters.
    "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True,
                         "subscribe": False, "unsubscribe": True},
    "clients": [],
    "groups": [{"groupname": "anonymous", "roles": [{"rolename": "plant"}], "clients": []}],
    "roles": [{"rolename": "plant", "acls": [
        {"acltype": "subscribePattern", "topic": "plant/#", "priority": 0, "allow": True}]}],
    "anonymousGroup": "anonymous",
}


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[int]:
    """A mosquitto that refuses (in its SUBACK) filters outside plant/#; yields its port.

    mosquitto's acl_file only filters what is delivered; its dynamic-security plugin refuses
    the subscription itself, as a production broker's ACL plugin would.
    """
    program = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    plugins = sorted(Path("/usr/lib").glob("**/mosquitto_dynamic_security.so"))
    if not plugins:
        pytest.skip("mosquitto's dynamic-security plugin is not installed")
    port = free_port()
    (tmp_path / "dynsec.json").write_text(json.dumps(_DYNSEC))
    conf = tmp_path / "mosquitto-acl.conf"
    conf.write_text(
        f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
        f"plugin {plugins[0]}\nplugin_opt_config_file {tmp_path / 'dynsec.json'}\n"
        "persistence false\nlog_dest none\n"
    )
    proc = subprocess.Popen([program, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _accepts(port):
            assert proc.poll() is None, "mosquitto exited"
            assert time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word; yields the port."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    server.close()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def test_run_refuses_what_check_refuses_in_the_same_words(tmp_path):
    # `run` builds the pipelines the same way before it connects: same file:line: pipeline message.
    cfg = write_config(tmp_path, pipeline(extra="    window: {hop: 65}\n"))
    run = subprocess.run(
        [*FLOORLINE_RUN, "run", "--config", str(cfg)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert run.returncode != 0
    assert f"{cfg}:10: pipelines[0] (vibration): window.hop: 65 is larger" in run.stderr, run.stderr
