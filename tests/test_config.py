"""Gateway config validation: strict keys, line numbers, secrets outside the YAML, paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from floorline.edge.config.model import load_config, parse_config
from floorline.edge.errors import ConfigError
from floorline.edge.resources import models_dir

PIPELINE = """
pipelines:
  - name: vib
    subscribe: ["plant/+/+/vibration"]
    bundle: models/pdm
    decoder: {type: json}
"""


def cfg(text: str = "", pipelines: str = PIPELINE) -> str:
    return "gateway: {id: gw1}\n" + text + pipelines


def test_minimal_config_gets_sane_defaults():
    c = parse_config(cfg())
    assert c.broker.host == "localhost"
    assert c.broker.port == 1883
    assert c.client_id() == "floorline-gw1"
    p = c.pipelines[0]
    assert (p.qos, p.backend, p.batch.max_batch, p.batch.max_wait_ms) == (1, "auto", 32, 5)
    assert p.asset.topic_segment == -2
    assert p.output.qos == 1
    assert c.topics.predictions == "floorline/{gateway}/pred/{pipeline}/{asset}"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("broker: {port: 70000}\n", "broker.port"),
        ("broker: {protocol: '4'}\n", "broker.protocol"),
        ("broker: {password_env: A, password_file: b}\n", "not both"),
        ("broker: {tls: {cert_file: c.pem}}\n", "cert_file and key_file go together"),
        ("limits: {inbox_size: 1}\n", "limits.inbox_size"),
        ("surprise: 1\n", "surprise: Extra inputs are not permitted"),
    ],
)
def test_invalid_sections_are_named(text, words):
    with pytest.raises(ConfigError, match=words):
        parse_config(cfg(text))


@pytest.mark.parametrize(
    "bad_filter", ["plant/#/x", "plant/a+/b", "", "plant/\\0"],  # \\0: YAML escape for NUL
)
def test_invalid_topic_filters_are_refused(bad_filter):
    text = PIPELINE.replace('["plant/+/+/vibration"]', f'["{bad_filter}"]')
    with pytest.raises(ConfigError, match="subscribe"):
        parse_config(cfg(pipelines=text))


@pytest.mark.parametrize("name", ["a/b", "a+", "#", ""])
def test_names_that_would_break_topics_are_refused(name):
    with pytest.raises(ConfigError, match=r"gateway\.id"):
        parse_config(f"gateway: {{id: '{name}'}}\n" + PIPELINE)


def test_pipeline_names_must_be_unique():
    two = PIPELINE + PIPELINE.replace("pipelines:\n", "")
    with pytest.raises(ConfigError, match="unique"):
        parse_config(cfg(pipelines=two))


def test_error_lines_point_into_the_file(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(cfg("broker:\n  host: x\n  keepalive: 1\n"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:4: broker.keepalive" in str(info.value)


def test_yaml_syntax_errors_name_the_line(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("gateway: {id: gw1}\npipelines: [\n  - oops: [\n")
    with pytest.raises(ConfigError, match=r"g\.yaml:\d+: not valid YAML"):
        load_config(path)


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "op.pub").write_text("x")
    path = tmp_path / "g.yaml"
    path.write_text(cfg(
        "broker: {password_file: secret, username: u, tls: {ca_file: ca.pem}}\n"
        "trust: {trusted_keys: [keys/op.pub]}\n"
    ))
    c = load_config(path)
    assert c.pipelines[0].bundle == tmp_path / "models/pdm"
    assert c.broker.password_file == tmp_path / "secret"
    assert c.broker.tls is not None
    assert c.broker.tls.ca_file == tmp_path / "ca.pem"
    assert c.trust.trusted_keys == [str(tmp_path / "keys/op.pub")]


def test_credentials_come_from_environment_or_file(tmp_path, monkeypatch):
    monkeypatch.setenv("GW_PASS", "s3cret")
    c = parse_config(cfg("broker: {username: gw, password_env: GW_PASS}\n"))
    assert c.broker.credentials() == ("gw", "s3cret")
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    c = parse_config(cfg(f"broker: {{username_env: GW_USER, password_file: '{secret}'}}\n"))
    monkeypatch.setenv("GW_USER", "user-from-env")
    assert c.broker.credentials() == ("user-from-env", "from-file")


def test_password_without_user_and_unreadable_files_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("GW_PASS", "x")
    c = parse_config(cfg("broker: {password_env: GW_PASS}\n"))
    with pytest.raises(ConfigError, match="no username"):
        c.broker.credentials()
    c = parse_config(cfg(f"broker: {{username: u, password_file: '{tmp_path / 'none'}'}}\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        c.broker.credentials()


def test_asset_from_payload_replaces_topic_segment():
    text = PIPELINE + "    asset: {payload: true}\n"
    c = parse_config(cfg(pipelines=text))
    assert c.pipelines[0].asset.topic_segment is None
    assert c.pipelines[0].asset.payload


def test_a_config_that_is_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        parse_config("- just\n- a list\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(Path(tmp_path / "missing.yaml"))


def test_example_bundle_reference_is_the_bundle_shipped_with_floorline(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(cfg(pipelines=PIPELINE.replace("models/pdm", "example:pdm-classifier")))
    bundle = load_config(path).pipelines[0].bundle
    assert bundle == models_dir() / "pdm-classifier"
    assert (bundle / "manifest.json").is_file()


def test_unknown_example_bundle_is_a_config_error_naming_the_shipped_ones(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(cfg(pipelines=PIPELINE.replace("models/pdm", "example:pdm-classifer")))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:6: pipelines.0.bundle: no example bundle 'pdm-classifer'; "
        "shipped: example:pdm-classifier"
    )
