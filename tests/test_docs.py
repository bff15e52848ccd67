"""The documentation: every page is there, every relative link lands, and the examples work.

The consumer examples in ``docs/examples/`` are checked against what a gateway really publishes:
the prediction payloads here come from the gateway's own encoder, and the topic from the config's
default template, so a change to either that the examples miss fails here.
"""

from __future__ import annotations

import json
import py_compile
import re
import runpy
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from paho.mqtt.client import topic_matches_sub

from floorline.edge.bundle.manifest import Manifest
from floorline.edge.config.model import TopicsConfig
from floorline.edge.stream.encode import PredictionEncoder
from floorline.edge.stream.window import Window

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
SUBSCRIBER = EXAMPLES / "subscriber.py"
EXAMPLE = ROOT / "edge" / "models" / "pdm-classifier"  # the committed example bundle

PAGES = (
    "README.md",
    "bundles.md",
    "config.md",
    "reliability.md",
    "scale-out.md",
    "workers.md",
    "sparkplug.md",
    "fleet.md",
    "operations.md",
    "monitoring.md",
    "consuming.md",
    "platforms.md",
    "benchmarks.md",
)

# [text](target) and ![alt](target), with an optional "title"; not inside code.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-', repeats -1, -2."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(_FENCE.sub("", markdown)):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
        slug = re.sub(r"[^\w\- ]", "", text.replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in _LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # https:, mailto: ...: not a file of this repository
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest.read_text()):
            broken.append(f"{target}: no heading #{fragment} in {dest.name}")
    return broken


def _prediction_topic(gateway: str = "line1-gw01", pipeline: str = "vibration",
                      asset: str = "pump-02") -> str:
    return TopicsConfig().predictions.format(gateway=gateway, pipeline=pipeline, asset=asset)


def _prediction(gateway: str, asset: str, seq: int, label: str) -> bytes:
    """A prediction exactly as a gateway encodes it, for the example bundle's classifier."""
    manifest = Manifest.from_bytes((EXAMPLE / "manifest.json").read_bytes())
    labels = manifest.heads[0].labels
    assert labels is not None
    encoder = PredictionEncoder(
        gateway=gateway, pipeline="vibration", manifest=manifest,
        artifact=manifest.artifacts[0], topic_template=TopicsConfig().predictions,
    )
    start = 1_764_400_000.0 + seq * 0.032
    window = Window(asset, np.zeros((manifest.input.window, 3), np.float32), start,
                    start + 0.063, received=0.0, index=seq)
    row = np.full(len(labels), 0.01, np.float32)
    row[labels.index(label)] = 0.97
    return encoder.encode(window, row, inference_ms=0.4, batch_size=1, now=0.003)


def _path(doc: dict[str, Any], dotted: str) -> Any:
    value: Any = doc
    for key in dotted.split("."):
        value = value[key]
    return value


# -- pages and links -------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_every_concept_has_its_page(page):
    assert (DOCS / page).is_file(), f"docs/{page} is missing"


def test_the_docs_index_links_every_page():
    index = (DOCS / "README.md").read_text()
    linked = {t.partition("#")[0] for t in _LINK.findall(_prose(index))}
    assert not [p for p in PAGES if p != "README.md" and p not in linked]


@pytest.mark.parametrize(
    "page",
    [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_relative_links_point_at_files_that_exist(page):
    assert _broken_links(page) == []


def test_a_broken_link_is_reported(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#a-heading) [gone](missing.md) [bad](there.md#nope)\n"
                    "`[code](not-a-link.md)` [web](https://example.com/x.md)\n")
    assert _broken_links(page) == [
        "missing.md: no such file", "there.md#nope: no heading #nope in there.md",
    ]


# -- the Python subscriber -------------------------------------------------------------------


def test_subscriber_example_compiles(tmp_path):
    py_compile.compile(str(SUBSCRIBER), cfile=str(tmp_path / "subscriber.pyc"), doraise=True)


def test_subscriber_example_prints_each_prediction_once(mosquitto_session, mqtt_client):
    broker = mosquitto_session
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    client_id = f"docs-subscriber-{uuid.uuid4().hex[:8]}"
    first = _prediction(gateway, "pump-01", 7, "imbalance")
    second = _prediction(gateway, "pump-02", 7, "healthy")
    mark = broker.log_mark()
    proc = subprocess.Popen(
        [sys.executable, str(SUBSCRIBER), "--host", broker.host, "--port", str(broker.port),
         "--gateway", gateway, "--count", "2", "--client-id", client_id],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        broker.wait_subscribed(client_id, f"floorline/{gateway}/pred/#", mark, timeout=10)
        publisher = mqtt_client(broker)
        publisher.publish(_prediction_topic(gateway, asset="pump-01"), first, qos=1)
        # The same window again, as after a reconnect: same asset and seq, same bytes.
        publisher.publish(_prediction_topic(gateway, asset="pump-01"), first, qos=1)
        publisher.publish(_prediction_topic(gateway, asset="pump-02"), second, qos=1)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert f"{gateway} vibration pump-01 seq=7 imbalance score=0.970" in lines[0]
    assert f"{gateway} vibration pump-02 seq=7 healthy score=0.970" in lines[1]
    assert "(pdm-classifier 1.0.0)" in lines[1]


def test_subscriber_example_tells_a_restarted_counter_from_a_repeat():
    subscriber = runpy.run_path(str(SUBSCRIBER))  # the example's names; main() does not run
    dedup, window_key = subscriber["Deduplicator"](), subscriber["window_key"]
    before = orjson.loads(_prediction("gw", "pump-01", 0, "healthy"))
    again = orjson.loads(_prediction("gw", "pump-01", 0, "healthy"))
    after_restart = {**before, "window": {**before["window"], "start": 1.0, "end": 2.0}}
    assert dedup.first_time(window_key(before))
    assert not dedup.first_time(window_key(again))
    assert dedup.first_time(window_key(after_restart))


# -- Node-RED --------------------------------------------------------------------------------


def _node_red_flow() -> list[dict[str, Any]]:
    nodes = json.loads((EXAMPLES / "node-red-flow.json").read_text())
    assert isinstance(nodes, list)
    return nodes


def test_node_red_flow_is_wired_to_the_prediction_topic():
    nodes = _node_red_flow()
    assert all(isinstance(n, dict) and n.get("id") and n.get("type") for n in nodes)
    ids = [n["id"] for n in nodes]
    assert len(ids) == len(set(ids)), "node ids must be unique"
    by_id = {n["id"]: n for n in nodes}
    for node in nodes:
        for output in node.get("wires", []):
            for target in output:
                assert target in by_id, f"{node['type']} {node['id']} wires to unknown {target}"
        if "z" in node:
            assert by_id.get(node["z"], {}).get("type") == "tab", f"{node['id']}: no tab"
    inputs = [n for n in nodes if n["type"] == "mqtt in"]
    assert any(topic_matches_sub(n["topic"], _prediction_topic()) for n in inputs)
    for node in inputs:
        assert by_id.get(node["broker"], {}).get("type") == "mqtt-broker"
    assert {"json", "function", "debug"} <= {n["type"] for n in nodes}


@pytest.mark.skipif(shutil.which("node") is None, reason="node (Node.js) is not installed")
def test_node_red_function_drops_repeats_and_flags_non_healthy_labels(tmp_path):
    func = next(n for n in _node_red_flow() if n["type"] == "function")["func"]
    messages = [
        {"topic": _prediction_topic(asset="pump-01"),
         "payload": orjson.loads(_prediction("gw", "pump-01", 3, "healthy"))},
        {"topic": _prediction_topic(asset="pump-01"),
         "payload": orjson.loads(_prediction("gw", "pump-01", 3, "healthy"))},
        {"topic": _prediction_topic(asset="pump-02"),
         "payload": orjson.loads(_prediction("gw", "pump-02", 3, "looseness"))},
    ]
    # Node-RED runs the body as a function of msg, node and context; so does this harness.
    harness = tmp_path / "harness.js"
    harness.write_text(
        "const store = {};\n"
        "const context = {get: k => store[k], set: (k, v) => { store[k] = v; }};\n"
        "const node = {warn: () => {}, status: () => {}};\n"
        f"const f = new Function('msg', 'node', 'context', {json.dumps(func)});\n"
        f"const out = {json.dumps(messages)}.map(m => f(m, node, context));\n"
        "console.log(JSON.stringify(out.map(o => o && o.map(m => m && m.flagged))));\n"
    )
    result = subprocess.run(["node", str(harness)], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0, result.stderr
    # healthy: first output only; its repeat: nothing; looseness: both outputs, flagged.
    assert json.loads(result.stdout) == [[False, None], None, [True, True]]


# -- Telegraf --------------------------------------------------------------------------------


def test_telegraf_config_reads_the_prediction_topic_and_fields():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    conf = tomllib.loads((EXAMPLES / "telegraf.conf").read_text())
    consumer = conf["inputs"]["mqtt_consumer"][0]
    topic = _prediction_topic()
    assert consumer["data_format"] == "json_v2"
    assert any(topic_matches_sub(f, topic) for f in consumer["topics"])
    template = TopicsConfig().predictions.split("/")
    for parsing in consumer["topic_parsing"]:
        assert topic_matches_sub(parsing["topic"], topic)
        tags = parsing["tags"].split("/")
        assert len(tags) == len(template)
        named = {tag: level for tag, level in zip(tags, template, strict=True) if tag != "_"}
        assert named == {"gateway": "{gateway}", "pipeline": "{pipeline}", "asset": "{asset}"}
    prediction = orjson.loads(_prediction("gw", "pump-02", 5, "imbalance"))
    for section in consumer["json_v2"]:
        assert isinstance(_path(prediction, section["timestamp_path"]), float)
        for entry in section.get("tag", []) + section.get("field", []):
            if not entry.get("optional"):
                _path(prediction, entry["path"])  # KeyError: the path is not in a prediction
    assert "influxdb_v2" in conf["outputs"]


# -- CHANGELOG and LICENSE -------------------------------------------------------------------


def test_changelog_has_an_unreleased_section_and_the_first_release():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(r"^## \[Unreleased\]", text, re.MULTILINE)
    assert re.search(r"^## \[0\.1\.0\]", text, re.MULTILINE)


def test_license_is_the_apache_license_2_0():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
