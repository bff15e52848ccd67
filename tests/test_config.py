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


def test_drift_and_capture_topic_templates_default_to_the_topics_they_replaced():
    t = parse_config(cfg()).topics
    assert t.drift == "floorline/{gateway}/drift/{pipeline}"
    assert t.alerts == "floorline/{gateway}/alerts/{pipeline}"
    assert t.capture_label == "floorline/{gateway}/capture/label"
    custom = parse_config(cfg("topics: {drift: 'site/{gateway}/d/{pipeline}', "
                              "capture_label: 'site/{gateway}/labels'}\n")).topics
    assert (custom.drift, custom.alerts, custom.capture_label) == (
        "site/{gateway}/d/{pipeline}", "floorline/{gateway}/alerts/{pipeline}",
        "site/{gateway}/labels")


CAPTURING = PIPELINE + "    capture: {sample_rate: 0.1}\n"
TWO_PIPELINES = PIPELINE + """  - name: temp
    subscribe: ["plant/+/+/temperature"]
    bundle: models/pdm
    decoder: {type: json}
"""


@pytest.mark.parametrize(
    ("topics", "pipelines", "words"),
    [
        ("{drift: 'floorline/{gateway}/state'}", PIPELINE,
         ("topics.state and topics.drift are the same topic: topics.state (floorline/gw1/state)"
          " and topics.drift (floorline/gw1/state, pipeline vib); give topics.drift its own")),
        ("{alerts: 'floorline/{gateway}/drift/{pipeline}'}", PIPELINE,
         "topics.drift and topics.alerts are the same topic"),
        ("{alerts: 'floorline/{gateway}/dlq/{pipeline}'}", PIPELINE,
         "topics.dead_letter and topics.alerts are the same topic"),
        ("{drift: 'floorline/{gateway}/drift'}", TWO_PIPELINES,
         "topics.drift: 'floorline/{gateway}/drift' has no {pipeline}, and pipelines vib, temp"),
        ("{capture_label: 'floorline/{gateway}/desired'}", CAPTURING,
         "topics.capture_label (floorline/gw1/desired) is the fleet's desired-state topic"),
        ("{capture_label: 'floorline/{gateway}/stats'}", CAPTURING,
         "topics.stats and topics.capture_label are the same topic"),
        ("{capture_label: 'plant/a/labels/vibration'}", CAPTURING,
         ("pipeline vib: subscribe 'plant/+/+/vibration' covers topics.capture_label "
          "(plant/a/labels/vibration): the label commands would be read as its input")),
        ("{capture_label: '$SYS/{gateway}/labels'}", CAPTURING,
         "topics.capture_label: '$SYS/{gateway}/labels' starts with '$'"),
        ("{capture_label: '$share/g/{gateway}/labels'}", CAPTURING, "starts with '$'"),
        ("{predictions: 'floorline/{gateway}/{asset}'}", PIPELINE,
         ("pipeline vib: its predictions' topic 'floorline/{gateway}/{asset}' can be "
          "topics.state (floorline/gw1/state)")),
    ],
)
def test_topics_that_collide_are_refused_naming_both_keys(topics, pipelines, words):
    with pytest.raises(ConfigError) as err:
        parse_config(cfg(f"topics: {topics}\n", pipelines))
    assert words in str(err.value)


def test_topics_collide_only_where_they_are_used():
    # No pipeline captures: the label topic is not subscribed. One pipeline: one drift topic.
    parse_config(cfg("topics: {capture_label: 'floorline/{gateway}/stats'}\n"))
    parse_config(cfg("topics: {drift: 'floorline/{gateway}/drift'}\n"))
    parse_config(cfg("topics: {drift: 'floorline/{gateway}/state'}\n",
                     PIPELINE + "    drift: {enabled: false}\n"))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("broker: {port: 70000}\n", "broker.port"),
        ("broker: {protocol: '4'}\n", "broker.protocol"),
        ("broker: {password_env: A, password_file: b}\n", "not both"),
        ("broker: {tls: {cert_file: c.pem}}\n", "cert_file and key_file go together"),
        ("limits: {inbox_size: 1}\n", "limits.inbox_size"),
        ("surprise: 1\n", "surprise: unknown key"),
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
    text = PIPELINE.replace("{type: json}", "{type: json, asset: device}")
    text += "    asset: {payload: true}\n"
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


# --- unknown keys: the nearest valid key ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (PIPELINE + "    windw: {hop: 3}\n",
         "g.yaml:7: pipelines.0.windw: unknown key; did you mean 'window'?"),
        (PIPELINE.replace("{type: json}", "{type: json, feilds: {}}"),
         "g.yaml:6: pipelines.0.decoder.feilds: unknown key; did you mean 'fields'?"),
        (PIPELINE.replace("{type: json}", "{type: csv, columns: [a], delimeter: ';'}"),
         "g.yaml:6: pipelines.0.decoder.delimeter: unknown key; did you mean 'delimiter'?"),
        (PIPELINE + "    window: {max_gap: 1}\n",
         "g.yaml:7: pipelines.0.window.max_gap: unknown key; did you mean 'max_gap_s'?"),
        ("brokr: {host: x}\n" + PIPELINE, "g.yaml:1: brokr: unknown key; did you mean 'broker'?"),
        ("broker: {tls: {ca_fil: x}}\n" + PIPELINE,
         "g.yaml:1: broker.tls.ca_fil: unknown key; did you mean 'ca_file'?"),
    ],
)
def test_an_unknown_key_names_the_nearest_valid_one(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "g.yaml")
    assert expected in str(info.value)


def test_an_unknown_key_nothing_like_a_valid_one_lists_the_valid_keys():
    with pytest.raises(ConfigError) as info:
        parse_config(cfg("zzz: 1\n"), "g.yaml")
    assert "zzz: unknown key; valid keys: broker, fleet, gateway, limits," in str(info.value)


def test_a_misspelt_choice_names_the_nearest_one():
    with pytest.raises(ConfigError, match="did you mean 'json'"):
        parse_config(cfg(pipelines=PIPELINE.replace("{type: json}", "{type: jsn}")))
    with pytest.raises(ConfigError, match="did you mean 'onnx'"):
        parse_config(cfg(pipelines=PIPELINE + "    backend: onnnx\n"))


def test_a_misspelt_section_in_a_push_names_the_nearest_pushable_one():
    with pytest.raises(ConfigError) as info:
        parse_config(cfg()).with_desired({"pipelnes": []}, "desired version 2")
    assert str(info.value) == (
        "desired version 2: a push may set only limits, logging, pipelines; not pipelnes; "
        "did you mean 'pipelines' for 'pipelnes'?"
    )


def test_an_unknown_key_in_a_push_names_the_nearest_valid_one():
    base = parse_config(cfg())
    desired = {"pipelines": [{"name": "vib", "subscribe": ["a/#"], "bundle": "b",
                              "decoder": {"type": "json"}, "windw": {}}]}
    with pytest.raises(ConfigError) as info:
        base.with_desired(desired, "desired version 3")
    assert str(info.value) == (
        "desired version 3: pipelines.0.windw: unknown key; did you mean 'window'?"
    )


# --- nothing is silently ignored -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        # The asset: decoder and pipeline must agree on where it comes from.
        (PIPELINE.replace("{type: json}", "{type: json, asset: device}"),
         "g.yaml:7: pipelines.0.decoder.asset", "asset.payload is not true"),
        (PIPELINE.replace("{type: json}", "{type: csv, columns: [asset, ax, ay, az]}"),
         "g.yaml:7: pipelines.0.decoder.columns", "asset.payload is not true"),
        (PIPELINE + "    asset: {payload: true}\n",
         "g.yaml:8: pipelines.0.asset.payload", "the decoder names no asset"),
        (PIPELINE.replace("{type: json}", "{type: json, asset: d}")
         + "    asset: {payload: true, topic_segment: 1}\n",
         "g.yaml:8: pipelines.0.asset.topic_segment", "together with payload: true"),
        # Window checks on what the samples do not carry.
        (PIPELINE + "    window: {max_gap_s: 0.1}\n",
         "g.yaml:8: pipelines.0.window.max_gap_s", "no timestamps"),
        (PIPELINE.replace("{type: json}", "{type: binary}") + "    window: {max_gap_s: 0.1}\n",
         "g.yaml:8: pipelines.0.window.max_gap_s", "no timestamps"),
        (PIPELINE + "    window: {max_seq_gap: 5}\n",
         "g.yaml:8: pipelines.0.window.max_seq_gap", "no sequence numbers"),
        (PIPELINE + "    window: {max_seq_rewind: 50}\n",
         "g.yaml:8: pipelines.0.window.max_seq_rewind", "no sequence numbers"),
        # A unit without a timestamp; an interpreter for the other runtime; a wait never waited.
        (PIPELINE.replace("{type: json}", "{type: json, timestamp_unit: ms}"),
         "g.yaml:7: pipelines.0.decoder.timestamp_unit", "no timestamp path"),
        (PIPELINE.replace("{type: json}", "{type: csv, columns: [ax, ay, az], "
                                           "timestamp_unit: ms}"),
         "g.yaml:7: pipelines.0.decoder.timestamp_unit", "no column holds a timestamp"),
        (PIPELINE + "    backend: onnx\n    interpreter: tflite_runtime\n",
         "g.yaml:9: pipelines.0.interpreter", "ignored"),
        (PIPELINE + "    batch: {max_batch: 1, max_wait_ms: 20}\n",
         "g.yaml:8: pipelines.0.batch.max_wait_ms", "no effect with max_batch: 1"),
        # Session options that the protocol or clean_start make ineffective.
        ("broker: {protocol: '3.1.1', clean_start: false, session_expiry_s: 60}\n" + PIPELINE,
         "g.yaml:2: broker.session_expiry_s", "MQTT 5 only"),
        ("broker: {session_expiry_s: 60}\n" + PIPELINE,
         "g.yaml:2: broker.session_expiry_s", "clean_start: true"),
        ("broker: {clean_start: false}\n" + PIPELINE,
         "g.yaml:2: broker.clean_start", "without session_expiry_s"),
        ("broker: {protocol: '3.1.1'}\nlimits: {max_packet_bytes: 4096}\n" + PIPELINE,
         "g.yaml:3: limits.max_packet_bytes", "MQTT 5 only"),
        # Templates str.format would fail on when publishing.
        ("topics: {dead_letter: 'dlq/{asset}'}\n" + PIPELINE,
         "g.yaml:2: topics.dead_letter", "unknown placeholder {asset}"),
        ("topics: {predictions: 'p/{gatway}/{asset}'}\n" + PIPELINE,
         "g.yaml:2: topics.predictions", "unknown placeholder {gatway}"),
        ("topics: {state: 'state/#'}\n" + PIPELINE,
         "g.yaml:2: topics.state", "'+' or '#'"),
        ("topics: {drift: 'drift/{pipeline}/{asset}'}\n" + PIPELINE,
         "g.yaml:2: topics.drift", "unknown placeholder {asset}"),
        ("topics: {alerts: 'alerts/{pipline}'}\n" + PIPELINE,
         "g.yaml:2: topics.alerts", "unknown placeholder {pipline}"),
        ("topics: {capture_label: 'labels/{pipeline}'}\n" + PIPELINE,
         "g.yaml:2: topics.capture_label", "unknown placeholder {pipeline}"),
        ("topics: {capture_label: 'labels/+'}\n" + PIPELINE,
         "g.yaml:2: topics.capture_label", "'+' or '#'"),
        (PIPELINE + "    output: {topic: 'p/{pipeline}/{assets}'}\n",
         "g.yaml:8: pipelines.0.output.topic", "unknown placeholder {assets}"),
    ],
)
def test_a_key_the_rest_of_the_config_makes_ineffective_is_an_error_at_its_line(
    text, where, words
):
    with pytest.raises(ConfigError) as info:
        parse_config(cfg(pipelines=text) if text.startswith("\n") else cfg(text), "g.yaml")
    message = str(info.value)
    assert where in message
    assert words in message


@pytest.mark.parametrize(
    "extra",
    [
        "    window: {max_seq_gap: null}\n",  # switching off a check that cannot run is fine
        "    backend: onnx\n",
        "    batch: {max_batch: 1}\n",
        "    batch: {max_batch: 1, max_wait_ms: 0}\n",
    ],
)
def test_settings_that_take_effect_or_disable_are_accepted(extra):
    parse_config(cfg(pipelines=PIPELINE + extra))


def test_timestamps_and_sequences_make_the_window_checks_valid():
    text = PIPELINE.replace("{type: json}", "{type: json, timestamp: ts, sequence: seq, "
                                            "timestamp_unit: ms}")
    text += "    window: {max_gap_s: 0.1, max_seq_gap: 2, max_seq_rewind: 50}\n"
    window = parse_config(cfg(pipelines=text)).pipelines[0].window
    assert (window.max_gap_s, window.max_seq_gap, window.max_seq_rewind) == (0.1, 2, 50)


def test_a_push_to_a_mqtt_3_gateway_is_not_refused_for_defaults_it_never_set():
    # The base config is re-validated with the push: defaults written out would read as set
    # (limits.max_packet_bytes is an error when set on MQTT 3.1.1).
    base = parse_config(cfg("broker: {protocol: '3.1.1'}\n"))
    pushed = base.with_desired({"limits": {"inbox_size": 500}})
    assert pushed.limits.inbox_size == 500
    assert pushed.broker.protocol == "3.1.1"
    with pytest.raises(ConfigError, match=r"limits\.max_packet_bytes: MQTT 5 only"):
        base.with_desired({"limits": {"max_packet_bytes": 4096}})


def test_durable_needs_a_session_the_broker_keeps():
    durable = PIPELINE.replace("{type: json}", "{type: json, sequence: seq}") + \
        "    ack: durable\n"
    with pytest.raises(ConfigError, match=r"g\.yaml:8: pipelines\.0\.ack: durable"):
        parse_config(cfg(pipelines=durable), "g.yaml")
    with pytest.raises(ConfigError, match=r"pipelines\.0\.ack: durable needs sequence numbers"):
        parse_config(cfg("broker: {clean_start: false, session_expiry_s: 60}\n",
                         pipelines=PIPELINE + "    ack: durable\n"))
    parse_config(cfg("broker: {clean_start: false, session_expiry_s: 60}\n", pipelines=durable))


# --- windows start over after a gap by default ---------------------------------------------------


def test_the_default_window_starts_over_after_a_gap_of_more_than_five_seconds():
    import numpy as np  # noqa: PLC0415

    from floorline.edge.decoders import Samples  # noqa: PLC0415
    from floorline.edge.stream.window import Windower  # noqa: PLC0415

    window = parse_config(cfg()).pipelines[0].window
    assert window.max_gap_s == 5.0

    def push(windower: Windower, times: list[float]) -> int:
        samples = Samples(np.zeros((len(times), 1), np.float32), np.array(times), None, None)
        return len(windower.push("a", samples, 0.0))

    # A 1 Hz stream with jitter fills its windows ...
    steady = Windower(4, 1, window)
    assert push(steady, [0.0, 1.2, 2.1, 3.3, 4.0, 5.4, 6.2, 7.1]) == 2
    assert steady.resets["time_gap"] == 0
    # ... and an outage of more than 5 s starts the window over.
    gap = Windower(4, 1, window)
    assert push(gap, [0.0, 1.0, 2.0, 8.5, 9.5, 10.5]) == 0
    assert gap.resets["time_gap"] == 1


# --- where a pipeline is, for errors met building it ---------------------------------------------


def test_errors_building_a_pipeline_name_the_file_the_key_line_and_the_pipeline(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(cfg(pipelines=PIPELINE + PIPELINE.replace("pipelines:\n", "").replace(
        "name: vib", "name: vib2").replace("{type: json}", "\n      type: json\n"
                                                         "      fields: {temp: t}")))
    config = load_config(path)
    error = config.pipeline_error(
        1, ConfigError("decoder.fields: 'temp' is not a feature of the model")
    )
    assert isinstance(error, ConfigError)
    assert str(error) == (
        f"{path}:14: pipelines[1] (vib2): decoder.fields: 'temp' is not a feature of the model"
    )
    # Without a key, the line of the pipeline entry; the kind of error is kept.
    with pytest.raises(ConfigError) as info, config.building(0):
        raise ConfigError("something about the model")
    assert str(info.value) == f"{path}:4: pipelines[0] (vib): something about the model"
