"""``floorline`` as an operator runs it: run (signals, last will), check, simulate, schema.

The demo has its own tests/test_demo.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from floorline.edge.cli.main import main as floorline
from floorline.edge.config.model import Config
from tests.daemon_harness import EXAMPLE, config_text, vibration_pipeline
from tests.mqtt_broker import wait_until

ROOT = Path(__file__).resolve().parent.parent

FLOORLINE = [sys.executable, "-m", "floorline.edge"]


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def spawn_run(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*FLOORLINE, "run", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_run_stops_cleanly_on_sigterm_and_reports_offline(
    mosquitto, mqtt_client, unique_topic, tmp_path
):
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/state", qos=1)
    proc = spawn_run(write_config(tmp_path, config_text(mosquitto,
                                                        vibration_pipeline(unique_topic))))
    try:
        probe.wait_for(1, timeout=20)
        assert orjson.loads(probe.messages[0].payload)["state"] == "online"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    wait_until(lambda: len(probe.messages) >= 2, 10, "offline state")
    assert orjson.loads(probe.messages[-1].payload)["reason"] == "shutdown"
    assert "Traceback" not in out


def test_last_will_marks_a_killed_daemon_offline(mosquitto, mqtt_client, unique_topic, tmp_path):
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/state", qos=1)
    text = config_text(mosquitto, vibration_pipeline(unique_topic)).replace(
        "keepalive: 10", "keepalive: 5")
    proc = spawn_run(write_config(tmp_path, text))
    try:
        probe.wait_for(1, timeout=20)
        proc.kill()  # SIGKILL: no clean shutdown, the broker must notice by itself
        proc.wait(10)
        # mosquitto sends the will at once when the socket closes, at the latest at 1.5 x keepalive
        wait_until(lambda: len(probe.messages) >= 2, 15, "last will")
    finally:
        if proc.poll() is None:
            proc.kill()
    will = orjson.loads(probe.messages[-1].payload)
    assert (will["state"], will["reason"]) == ("offline", "connection lost")


def test_check_reports_a_good_config_and_exits_zero(tmp_path, capsys):
    cfg = write_config(tmp_path, config_text(_FakeBroker(), vibration_pipeline("plant/line1")))
    assert floorline(["check", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "valid config for gateway gw-test" in out
    assert "pipeline vibration: ok  pdm-classifier 1.0.0" in out


def test_check_fails_on_a_tampered_bundle(tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(EXAMPLE, bundle)
    data = bytearray((bundle / "model.tflite").read_bytes())
    data[1000] ^= 0x01
    (bundle / "model.tflite").write_bytes(bytes(data))
    cfg = write_config(tmp_path, config_text(_FakeBroker(),
                                             vibration_pipeline("plant/x", bundle=bundle)))
    assert floorline(["check", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out
    assert "model.tflite has sha256" in out


def test_check_points_at_the_line_of_a_bad_key(tmp_path, capsys):
    cfg = write_config(tmp_path, "gateway: {id: gw}\nbroker:\n  hots: x\npipelines: []\n")
    assert floorline(["check", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"{cfg}:3: broker.hots: unknown key; did you mean 'host'?" in err
    assert "pipelines" in err


def test_run_refuses_a_missing_password_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NO_SUCH_PASSWORD_VAR", raising=False)
    text = config_text(_FakeBroker(), vibration_pipeline("p")).replace(
        "reconnect_max_s: 2}",
        "reconnect_max_s: 2, username: u, password_env: NO_SUCH_PASSWORD_VAR}",
    )
    cfg = write_config(tmp_path, text)
    assert floorline(["run", "--config", str(cfg)]) == 1
    assert "$NO_SUCH_PASSWORD_VAR is not set" in capsys.readouterr().err


def test_committed_schema_matches_the_config_models():
    committed = json.loads((ROOT / "configs" / "config.schema.json").read_text())
    regenerate = "floorline schema > configs/config.schema.json"
    assert committed == Config.model_json_schema(), regenerate


@pytest.mark.parametrize("name", ["gateway.example.yaml", "gateway.minimal.yaml"])
def test_example_configs_validate_and_self_test(name, capsys):
    assert floorline(["check", "--config", str(ROOT / "configs" / name)]) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_simulate_publishes_to_a_broker(mosquitto, mqtt_client):
    probe = mqtt_client(mosquitto)
    probe.subscribe("plant/#", qos=0)
    out = subprocess.run(
        [*FLOORLINE, "simulate", "--broker", f"127.0.0.1:{mosquitto.port}",
         "--assets", "2", "--rate", "100", "--duration", "1.5", "--mode", "block",
         "--format", "binary", "--block", "50"],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ},
    )
    assert out.returncode == 0, out.stderr
    msgs = probe.wait_for(4, "plant/line1/+/vibration", timeout=10)
    assert all(len(m.payload) == 16 + 50 * 12 for m in msgs)


class _FakeBroker:
    """Only the port: for commands that validate configs without connecting."""

    port = 1


def test_schema_command_prints_json_schema(capsys):
    assert floorline(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "Config"
