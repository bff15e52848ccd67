"""A new user's first commands: ``--version``, ``floorline init``, ``floorline examples``."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from floorline.converter.cli import main as floorline_convert
from floorline.edge import backends, resources
from floorline.edge.cli.main import main as floorline
from floorline.edge.config import starter
from floorline.edge.config.model import load_config
from floorline.edge.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("main", [floorline, floorline_convert], ids=["floorline", "convert"])
def test_version_is_the_installed_distributions(main, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"floorline {metadata.version('floorline')}"


def test_version_without_installed_metadata_is_unknown_not_an_error():
    script = (
        "import importlib.metadata as m\n"
        "def missing(name):\n"
        "    raise m.PackageNotFoundError(name)\n"
        "m.version = missing\n"
        "import floorline.edge\n"
        "print(floorline.edge.__version__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0+unknown"


def test_init_writes_a_config_that_checks(tmp_path, capsys):
    path = tmp_path / "gw.yaml"
    assert floorline(["init", str(path), "--gateway-id", "gw-7", "--broker", "mqtt.lan:1884"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {path}" in out
    assert f"floorline check --config {path}" in out
    assert f"floorline run --config {path}" in out
    config = load_config(path)
    assert (config.gateway.id, config.broker.host, config.broker.port) == ("gw-7", "mqtt.lan", 1884)
    (pipeline,) = config.pipelines
    assert pipeline.bundle == resources.models_dir() / "pdm-classifier"
    assert "bundle: example:pdm-classifier" in path.read_text()
    assert floorline(["check", "--config", str(path)]) == 0
    assert "pipeline vibration: ok" in capsys.readouterr().out


def test_init_refuses_to_overwrite_without_force(tmp_path, capsys):
    path = tmp_path / "gw.yaml"
    path.write_text("# mine\n")
    assert floorline(["init", str(path)]) == 1
    assert "exists; use --force" in capsys.readouterr().err
    assert path.read_text() == "# mine\n"
    assert floorline(["init", str(path), "--force"]) == 0
    assert "bundle: example:pdm-classifier" in path.read_text()


@pytest.mark.parametrize(
    ("modules", "backend"),
    [({"onnxruntime"}, "onnx"), ({"ai_edge_litert"}, "litert"),
     ({"ai_edge_litert", "onnxruntime"}, "litert"), (set(), "auto")],
)
def test_init_picks_a_backend_whose_runtime_is_installed(tmp_path, monkeypatch, modules, backend):
    monkeypatch.setattr(backends, "_findable", lambda module: module in modules)
    made = starter.render(tmp_path / "gw.yaml", gateway_id="gw")
    assert made.backend == backend
    assert yaml.safe_load(made.text)["pipelines"][0]["backend"] == backend


def test_init_says_what_to_install_when_no_runtime_is(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(backends, "_findable", lambda _module: False)
    assert floorline(["init", str(tmp_path / "gw.yaml")]) == 0
    assert "pip install 'floorline[litert]'" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "words"),
    [(["--gateway-id", "line/1"], "--gateway-id 'line/1'"),
     (["--broker", "host:99999"], "--broker 'host:99999'"),
     (["--broker", "host:"], "expected HOST:PORT")],
)
def test_init_refuses_bad_values_and_writes_nothing(tmp_path, capsys, args, words):
    path = tmp_path / "gw.yaml"
    assert floorline(["init", str(path), *args]) == 1
    assert words in capsys.readouterr().err
    assert not path.exists()


@pytest.mark.parametrize(
    ("address", "expected"),
    [("localhost", ("localhost", 1883)), ("10.0.0.5:8883", ("10.0.0.5", 8883)),
     ("[::1]:1884", ("::1", 1884)), ("[fe80::1]", ("fe80::1", 1883))],
)
def test_broker_addresses(address, expected):
    assert starter.parse_broker(address) == expected


def test_init_quotes_an_ipv6_broker_so_it_stays_one_value(tmp_path):
    made = starter.render(tmp_path / "gw.yaml", gateway_id="gw", broker="[::1]:1884")
    assert yaml.safe_load(made.text)["broker"] == {"host": "::1", "port": 1884, "protocol": "5"}


def test_examples_lists_the_shipped_configs_and_bundles(capsys):
    assert floorline(["examples"]) == 0
    out = capsys.readouterr().out
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert path.name in out
    for path in resources.example_configs():
        assert str(path) in out
    assert str(resources.examples_dir() / "config.schema.json") in out
    assert "example:pdm-classifier" in out


def test_shipped_example_configs_name_shipped_bundles_only():
    # A path like ../edge/models/... exists in a clone and nowhere in an installed wheel.
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        for pipeline in yaml.safe_load(path.read_text()).get("pipelines", []):
            assert str(pipeline["bundle"]).startswith("example:"), path.name


def test_example_bundle_lookup_names_what_is_shipped():
    assert resources.example_bundles() == ["pdm-classifier"]
    assert (resources.example_bundle("pdm-classifier") / "manifest.json").is_file()
    with pytest.raises(ConfigError, match="shipped: example:pdm-classifier"):
        resources.example_bundle("../models/pdm-classifier")


def test_fleet_push_packs_a_shipped_example_bundle_without_a_bundle_flag(
    tmp_path, mosquitto_session, mqtt_client, unique_topic
):
    from floorline.edge.bundle.signing import generate_keypair  # noqa: PLC0415
    from floorline.edge.fleet.operator import broker_config, push  # noqa: PLC0415

    key, _ = generate_keypair(tmp_path / "operator")
    gateway = unique_topic.rsplit("/", 1)[-1]
    probe = mqtt_client(mosquitto_session)
    probe.subscribe(f"floorline/{gateway}/desired", qos=1)
    out = io.StringIO()
    push(target={"gateway": gateway}, config_file=ROOT / "configs" / "desired.example.yaml",
         bundles=[], key_file=key, out=out,
         broker=broker_config(f"127.0.0.1:{mosquitto_session.port}", "5"))
    assert "bundle " in out.getvalue()
    (desired,) = probe.wait_for(1, timeout=10)
    document = json.loads(base64.b64decode(json.loads(desired.payload)["payload"]))
    (pipeline,) = document["config"]["pipelines"]
    assert pipeline["bundle"] == "sha256:" + document["bundles"][0]
