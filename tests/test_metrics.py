"""Metrics: the real /metrics endpoint scraped over HTTP, the JSON stats message, the dashboard."""

from __future__ import annotations

import json
import re
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from floorline.edge.config.model import parse_config
from floorline.edge.daemon.daemon import Daemon
from floorline.edge.errors import FloorlineError
from floorline.edge.messages import Inbound
from floorline.edge.service.metrics import (
    CAPTURE_METRIC_NAMES,
    METRIC_NAMES,
    BundleInfo,
    Metrics,
    MetricsConfig,
    StatsReporter,
)
from tests.daemon_harness import EXAMPLE, asset_samples, block_payload, config_text, running
from tests.mqtt_broker import Mosquitto, wait_until

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "configs" / "grafana-dashboard.json"

REASONS = ("bad_json", "missing_field", "not_numeric", "non_finite", "wrong_length",
           "too_large", "bad_asset", "inference_failed")


def pipeline_stats(i: int) -> dict[str, Any]:
    return {
        "received": 1000 + i, "decoded": 990 + i, "dropped_inbox_full": 3 + i,
        "windows": 300 + i, "batches": 40 + i, "batched_windows": 300 + i,
        "predictions": 299 + i, "released": 0, "queued": 5 + i, "pending_samples": 17 + i,
        "dead_letters": {"bad_json": 2 + i, "too_large": 1},
        "window_resets": {"gap": 1}, "duplicates": 0,
    }


def fake_stats(pipelines: int = 3) -> dict[str, Any]:
    """Shaped like Daemon.stats()."""
    return {
        "connected": True, "connects": 4, "last_error": None, "unroutable": 6,
        "unacknowledged_input": 0,
        "outbox": {"mode": "disk", "depth": 12, "bytes": 3456,
                   "dropped": {"max_bytes": 7, "max_age": 2}, "degraded_reason": None,
                   "moved_aside": None},
        "published": 900, "delivered": 888, "journal_error": None,
        "pipelines": {f"line{i}": pipeline_stats(i) for i in range(pipelines)},
    }


BUNDLES: list[BundleInfo] = [{
    "pipeline": "line0", "name": "pdm-classifier", "version": "1.0.0", "sha256": "ab" * 32,
    "artifact": "model.tflite", "runtime": "ai_edge_litert 2.3.0",
}]


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """GET /metrics; {sample name: {sorted labels: value}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


@pytest.fixture
def served() -> Iterator[tuple[Metrics, int]]:
    metrics = Metrics(fake_stats, bundles=lambda: BUNDLES, gateway="gw1")
    server = metrics.start_http("127.0.0.1", 0)
    yield metrics, server.port
    server.stop()


def test_scrape_exposes_every_family_with_labels_and_values(served: tuple[Metrics, int]) -> None:
    metrics, port = served
    metrics.observe_batch("line0", 4, 0.0004, [0.003, 0.004, 0.02, 0.5])
    s = scrape(port)

    def pipe(name: str, line: int = 0) -> float:
        return s[name][(("pipeline", f"line{line}"),)]

    for line in range(3):
        assert pipe("floorline_messages_received_total", line) == 1000 + line
        assert pipe("floorline_messages_decoded_total", line) == 990 + line
        assert pipe("floorline_messages_dropped_total", line) == 3 + line
        assert pipe("floorline_windows_total", line) == 300 + line
        assert pipe("floorline_batches_total", line) == 40 + line
        assert pipe("floorline_predictions_total", line) == 299 + line
        assert pipe("floorline_inbox_messages", line) == 5 + line
        assert pipe("floorline_pending_samples", line) == 17 + line
    assert s["floorline_dead_letters_total"] == {
        **{(("pipeline", f"line{i}"), ("reason", "bad_json")): 2.0 + i for i in range(3)},
        **{(("pipeline", f"line{i}"), ("reason", "too_large")): 1.0 for i in range(3)},
    }
    assert s["floorline_outbox_messages"] == {(): 12.0}
    assert s["floorline_outbox_bytes"] == {(): 3456.0}
    assert s["floorline_outbox_degraded"] == {(): 0.0}
    assert s["floorline_outbox_dropped_total"] == {
        (("reason", "max_age"),): 2.0, (("reason", "max_bytes"),): 7.0,
    }
    assert s["floorline_published_total"] == {(): 900.0}
    assert s["floorline_delivered_total"] == {(): 888.0}
    assert s["floorline_unroutable_total"] == {(): 6.0}
    assert s["floorline_mqtt_reconnects_total"] == {(): 3.0}  # 4 connects = 3 reconnects
    assert s["floorline_mqtt_connected"] == {(): 1.0}
    assert s["floorline_bundle_info"] == {tuple(sorted(BUNDLES[0].items())): 1.0}
    assert pipe("floorline_inference_seconds_count") == 1
    assert pipe("floorline_end_to_end_seconds_count") == 4
    assert pipe("floorline_batch_size_sum") == 4
    assert set(s) == METRIC_NAMES


def test_histograms_count_every_observation_in_the_right_bucket(
    served: tuple[Metrics, int],
) -> None:
    metrics, port = served
    metrics.observe_batch("line1", 8, 0.002, [0.004] * 8)
    metrics.observe_batch("line1", 1, 0.3, [2.0])
    metrics.observe_batch("line2", 32, 0.01, [])
    s = scrape(port)

    def bucket(name: str, le: str, line: str = "line1") -> float:
        return s[f"{name}_bucket"][(("le", le), ("pipeline", line))]

    assert s["floorline_inference_seconds_count"][(("pipeline", "line1"),)] == 2
    assert s["floorline_inference_seconds_sum"][(("pipeline", "line1"),)] == pytest.approx(0.302)
    assert bucket("floorline_inference_seconds", "0.001") == 0
    assert bucket("floorline_inference_seconds", "0.0025") == 1  # 0.002
    assert bucket("floorline_inference_seconds", "0.25") == 1
    assert bucket("floorline_inference_seconds", "0.5") == 2  # 0.3
    assert bucket("floorline_inference_seconds", "+Inf") == 2
    assert s["floorline_end_to_end_seconds_count"][(("pipeline", "line1"),)] == 9
    assert bucket("floorline_end_to_end_seconds", "0.005") == 8
    assert bucket("floorline_end_to_end_seconds", "2.5") == 9
    assert bucket("floorline_batch_size", "1.0") == 1  # "le" is inclusive
    assert bucket("floorline_batch_size", "8.0") == 2
    assert bucket("floorline_batch_size", "32.0", "line2") == 1
    assert bucket("floorline_batch_size", "16.0", "line2") == 0
    assert s["floorline_end_to_end_seconds_count"][(("pipeline", "line2"),)] == 0


def test_observations_from_many_threads_are_all_counted(served: tuple[Metrics, int]) -> None:
    metrics, port = served

    def worker() -> None:
        for _ in range(500):
            metrics.observe_batch("line0", 2, 0.001, [0.01, 0.02])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    s = scrape(port)
    assert s["floorline_batch_size_count"][(("pipeline", "line0"),)] == 2000
    assert s["floorline_end_to_end_seconds_count"][(("pipeline", "line0"),)] == 4000


def test_each_metrics_has_its_own_registry() -> None:
    a = Metrics(lambda: fake_stats(1))
    b = Metrics(lambda: {**fake_stats(1), "published": 5})
    text_a = prometheus_client.generate_latest(a.registry).decode()
    text_b = prometheus_client.generate_latest(b.registry).decode()
    assert "floorline_published_total 900.0" in text_a
    assert "floorline_published_total 5.0" in text_b
    assert "floorline_" not in prometheus_client.generate_latest().decode()  # global untouched


def test_stopped_server_no_longer_answers() -> None:
    server = Metrics(fake_stats).start_http("127.0.0.1", 0)
    port = server.port
    assert scrape(port)
    server.stop()
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_port_in_use_is_a_clear_error(served: tuple[Metrics, int]) -> None:
    _, port = served
    with pytest.raises(FloorlineError, match=f"cannot listen on 127.0.0.1:{port}"):
        Metrics(fake_stats).start_http("127.0.0.1", port)


def test_without_prometheus_client_the_endpoint_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # makes the import fail
    metrics = Metrics(fake_stats)
    with pytest.raises(FloorlineError, match=re.escape("pip install 'floorline[metrics]'")):
        metrics.start_http("127.0.0.1", 0)
    assert orjson.loads(metrics.stats_message())["published"] == 900  # stats need nothing


def test_a_failing_stats_source_is_retried_once() -> None:
    calls = []

    def flaky() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("dictionary changed size during iteration")
        return fake_stats(1)

    text = prometheus_client.generate_latest(Metrics(flaky).registry).decode()
    assert len(calls) == 2
    assert "floorline_published_total 900.0" in text


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def test_stats_message_is_small_json_with_totals_and_rates() -> None:
    clock = Clock()
    stats = fake_stats(3)
    for p in stats["pipelines"].values():
        p["dead_letters"] = dict.fromkeys(REASONS, 123456)  # every reason, big numbers
    metrics = Metrics(lambda: stats, gateway="line1-gw01", clock=clock, wall_clock=lambda: 1.5e9)
    metrics.observe_batch("line0", 4, 0.0005, [0.002, 0.004])
    clock.now += 10.0
    raw = metrics.stats_message()
    assert len(raw) < 2048, len(raw)
    doc = json.loads(raw)
    assert doc["gateway"] == "line1-gw01"
    assert doc["ts"] == 1.5e9
    assert doc["interval_s"] == 10.0
    assert (doc["connected"], doc["reconnects"], doc["published"], doc["delivered"]) == (
        True, 3, 900, 888
    )
    assert doc["outbox"] == {"depth": 12, "bytes": 3456, "dropped": 9, "degraded": False}
    line0 = doc["pipelines"]["line0"]
    assert (line0["received"], line0["predictions"], line0["dropped"], line0["queued"]) == (
        1000, 299, 3, 5
    )
    assert line0["dead_letters"] == dict.fromkeys(REASONS, 123456)
    assert line0["rate"]["received"] == 100.0  # 1000 since the start, over 10 s
    assert line0["inference_ms"] == 0.5
    assert line0["end_to_end_ms"] == 3.0
    assert line0["batch"] == 4.0
    assert doc["pipelines"]["line1"]["inference_ms"] is None  # nothing inferred yet


def test_stats_rates_cover_the_interval_since_the_last_message() -> None:
    clock, stats = Clock(), fake_stats(1)
    metrics = Metrics(lambda: stats, clock=clock)
    clock.now += 30.0
    metrics.stats_message()
    stats["pipelines"]["line0"]["received"] += 600
    metrics.observe_batch("line0", 2, 0.010, [])
    clock.now += 30.0
    doc = json.loads(metrics.stats_message())
    assert doc["pipelines"]["line0"]["rate"]["received"] == 20.0
    assert doc["pipelines"]["line0"]["inference_ms"] == 10.0
    assert doc["uptime_s"] == 60.0
    # A pipeline replaced at run time starts counting from zero: no negative rates.
    stats["pipelines"]["line0"]["received"] = 90
    clock.now += 30.0
    doc = json.loads(metrics.stats_message())
    assert doc["pipelines"]["line0"]["rate"]["received"] == 3.0
    assert doc["pipelines"]["line0"]["inference_ms"] is None


def test_stats_reporter_publishes_every_interval_and_survives_publish_errors() -> None:
    received: list[bytes] = []

    def publish(payload: bytes) -> None:
        received.append(payload)
        if len(received) == 1:
            raise OSError("broker away")

    reporter = StatsReporter(Metrics(fake_stats), 0.05, publish)
    reporter.start()
    try:
        wait_until(lambda: len(received) >= 3, 5.0, "three stats messages")
    finally:
        reporter.stop()
    assert all(json.loads(m)["published"] == 900 for m in received)
    with pytest.raises(ValueError, match="0 means"):
        StatsReporter(Metrics(fake_stats), 0, publish)


def test_metrics_config_defaults_and_strictness() -> None:
    c = MetricsConfig()
    assert (c.prometheus.enabled, c.prometheus.bind, c.prometheus.port) == (
        False, "127.0.0.1", 9108
    )
    assert c.stats_interval_s == 30
    assert MetricsConfig.model_validate({"stats_interval_s": 0}).stats_interval_s == 0
    for bad in ({"prometheus": {"enabeld": True}}, {"stats_interval_s": -1},
                {"prometheus": {"port": 70000}}, {"extra": 1}):
        with pytest.raises(ValidationError):
            MetricsConfig.model_validate(bad)
    schema = MetricsConfig.model_json_schema()
    assert all(
        "description" in field
        for model in schema["$defs"].values() for field in model["properties"].values()
    )


def test_real_daemon_stats_feed_the_collector(tmp_path: Path) -> None:
    text = (ROOT / "configs" / "gateway.minimal.yaml").read_text()
    config = parse_config(text, "minimal", base=ROOT / "configs")
    config.state_dir = tmp_path / "state"
    daemon = Daemon(config)
    daemon.load()
    try:
        daemon.pipelines[0].offer(Inbound("plant/line1/pump-01/vibration", b"{}", 0.0))
        s = {}
        text_out = prometheus_client.generate_latest(Metrics(daemon.stats).registry).decode()
        for family in text_string_to_metric_families(text_out):
            for sample in family.samples:
                s[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    finally:
        daemon.stop()
    labels = (("pipeline", "vibration"),)
    assert s[("floorline_messages_received_total", labels)] == 1
    assert s[("floorline_inbox_messages", labels)] == 1
    assert s[("floorline_mqtt_connected", ())] == 0
    assert s[("floorline_outbox_messages", ())] == 0


# -- data capture ----------------------------------------------------------------------------


def capture_stats() -> dict[str, Any]:
    """Shaped like Daemon.stats()["capture"] (CaptureService.stats)."""
    return {
        "file": "/var/lib/floorline/capture.sqlite", "error": None, "queued": 3,
        "dropped": {"queue_full": 9, "disk_full": 4},
        "labels": {"accepted": 2, "refused": 1}, "labels_applied": 2,
        "pipelines": {
            "line0": {"windows": 120, "bytes": 108_000, "captured": 130, "errors": 1,
                      "dropped_queue_full": 9, "dropped_disk_full": 4,
                      "evicted_max_bytes": 6, "evicted_max_age": 4,
                      "reasons": {"sample": 100, "drift": 1, "before_drift": 2,
                                  "after_drift": 2, "label": 25}},
        },
    }


def test_capture_series_per_pipeline_and_reason_on_the_endpoint() -> None:
    stats = {**fake_stats(), "capture": capture_stats()}
    server = Metrics(lambda: stats).start_http("127.0.0.1", 0)
    try:
        s = scrape(server.port)
    finally:
        server.stop()

    def by(name: str, **labels: str) -> float:
        return s[name][tuple(sorted({"pipeline": "line0", **labels}.items()))]

    assert by("floorline_capture_windows_total", reason="drift") == 1
    assert by("floorline_capture_windows_total", reason="before_drift") == 2
    assert by("floorline_capture_windows_total", reason="sample") == 100
    assert by("floorline_capture_dropped_total", reason="queue_full") == 9
    assert by("floorline_capture_dropped_total", reason="disk_full") == 4
    assert by("floorline_capture_evicted_total", reason="max_bytes") == 6
    assert by("floorline_capture_evicted_total", reason="max_age") == 4
    assert by("floorline_capture_errors_total") == 1
    assert by("floorline_capture_stored_windows") == 120
    assert by("floorline_capture_stored_bytes") == 108_000
    assert s["floorline_capture_queue_windows"] == {(): 3.0}
    assert s["floorline_capture_unavailable"] == {(): 0.0}
    assert s["floorline_capture_label_commands_total"] == {
        (("result", "accepted"),): 2.0, (("result", "refused"),): 1.0}
    assert s["floorline_capture_labels_applied_total"] == {(): 2.0}
    assert set(s) - METRIC_NAMES == CAPTURE_METRIC_NAMES  # every one, and none unlisted


def test_without_capture_no_capture_series_and_no_capture_in_the_stats_message() -> None:
    stats = {**fake_stats(1), "capture": None}
    text = prometheus_client.generate_latest(Metrics(lambda: stats).registry).decode()
    assert "floorline_capture" not in text
    doc = json.loads(Metrics(lambda: stats).stats_message())
    assert "capture" not in doc["pipelines"]["line0"]


def test_stats_message_has_each_capturing_pipelines_store_facts() -> None:
    stats = {**fake_stats(2), "capture": capture_stats()}
    doc = json.loads(Metrics(lambda: stats).stats_message())
    assert doc["pipelines"]["line0"]["capture"] == {
        "windows": 120, "bytes": 108_000, "captured": 130, "dropped": 13}
    assert "capture" not in doc["pipelines"]["line1"]


def test_a_capturing_daemon_feeds_the_capture_series(
    mosquitto: Mosquitto, unique_topic: str, tmp_path: Path,
) -> None:
    pipeline = f"""
  - name: vibration
    subscribe: ["{unique_topic}/+/vibration"]
    bundle: "{EXAMPLE}"
    decoder: {{type: json, samples: samples, timestamp: ts, sequence: seq}}
    batch: {{max_batch: 8, max_wait_ms: 5}}
    capture: {{sample_rate: 0.5, before: 0, after: 0}}
"""
    samples = asset_samples(64 * 20, seed=3)
    with running(config_text(mosquitto, pipeline, gateway="gw-met")) as daemon:
        server = daemon.metrics.start_http("127.0.0.1", 0)
        try:
            for k in range(20):
                daemon._on_message(f"{unique_topic}/pump-3/vibration",
                                   block_payload(samples[64 * k: 64 * (k + 1)], 64 * k, 1000.0),
                                   0.0)
            wait_until(lambda: daemon.pipelines[0].counters["predictions"] == 20, 30,
                       "every window predicted")
            daemon.capture.on_label("floorline/gw-met/capture/label",
                                    b'{"asset": "pump-3", "last_s": 10, "label": "x"}')
            daemon.capture.on_label("floorline/gw-met/capture/label", b"not json")
            assert daemon.capture.store is not None
            assert daemon.capture.store.flush()
            s = scrape(server.port)
        finally:
            server.stop()
    labels = (("pipeline", "vibration"),)
    assert s["floorline_capture_windows_total"] == {(*labels, ("reason", "sample")): 10.0}
    assert s["floorline_capture_stored_windows"] == {labels: 10.0}
    assert 10 * 64 * 3 * 4 < s["floorline_capture_stored_bytes"][labels] < 10 * 2048
    assert s["floorline_capture_label_commands_total"] == {
        (("result", "accepted"),): 1.0, (("result", "refused"),): 1.0}
    assert s["floorline_capture_labels_applied_total"] == {(): 1.0}
    assert s["floorline_capture_unavailable"] == {(): 0.0}


# -- the Grafana dashboard -------------------------------------------------------------------


def _exprs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                yield value["query"]
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def test_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = list(_exprs(dashboard))
    assert len(exprs) > 20
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\bfloorline_[a-z0-9_]+", expr))
        assert names, f"query uses no floorline metric: {expr}"
        assert names <= METRIC_NAMES, f"unknown metrics {names - METRIC_NAMES} in: {expr}"
        used |= names
    # What the dashboard is for: rates, dead letters by reason, latency quantiles, outbox, link.
    assert {"floorline_dead_letters_total", "floorline_outbox_messages",
            "floorline_mqtt_connected", "floorline_batch_size_bucket",
            "floorline_inference_seconds_bucket", "floorline_end_to_end_seconds_bucket",
            "floorline_messages_received_total", "floorline_predictions_total"} <= used
    joined = "\n".join(exprs)
    assert "histogram_quantile(0.95" in joined
    assert "sum by (pipeline, reason)" in joined


def test_dashboard_panels_have_unique_ids_and_a_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["targets"]
