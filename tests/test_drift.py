"""Input drift: the reference summary (converter), live histograms, PSI/KS, alarms, the daemon."""

from __future__ import annotations

import logging
import math
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from floorline.converter.card import ModelCard
from floorline.converter.convert import ConvertRequest, convert
from floorline.converter.drift_summary import summarize
from floorline.edge.bundle.bundle import Bundle
from floorline.edge.bundle.manifest import Manifest, ReferenceHistogram
from floorline.edge.errors import ManifestError
from floorline.edge.messages import Outbound
from floorline.edge.service.metrics import DRIFT_METRIC_NAMES, Metrics
from floorline.edge.stream.drift import (
    DriftConfig,
    DriftMonitor,
    Plan,
    bin_index,
    ks,
    make_monitor,
    psi,
)
from floorline.edge.stream.window import Window
from tests.daemon_harness import EXAMPLE, config_text, publish_stream, running, vibration_pipeline
from tests.mqtt_broker import Mosquitto, MqttProbe, wait_until

DATA = Path(__file__).parent / "data"

W = 64  # the example bundle's window
FEATURES = ["accel_x", "accel_y", "accel_z"]


@pytest.fixture(scope="module")
def example() -> Manifest:
    with Bundle.open(EXAMPLE) as bundle:
        return bundle.manifest


def _windows(rng: np.random.Generator, n: int, *, shift: float = 0.0, scale: float = 1.0) -> (
    np.ndarray
):
    return (rng.normal(shift, scale, (n, W, 3))).astype(np.float32)


@pytest.fixture(scope="module")
def referenced(example: Manifest) -> Manifest:
    """The example's manifest with a reference of N(0, 1) windows (inputs only)."""
    ref = _windows(np.random.default_rng(1), 2000)
    summary = summarize(ref, example.heads, None, FEATURES, data_name="calibration")
    return example.model_copy(update={"reference": summary})


def _monitor(manifest: Manifest, **config: Any) -> DriftMonitor:
    cfg = DriftConfig(**{"interval_s": 1.0, "window_s": 4.0, "min_windows": 200, **config})
    assert manifest.reference is not None
    return DriftMonitor(cfg, Plan(manifest.reference, manifest), gateway="gw", pipeline="vib")


def _feed(mon: DriftMonitor, x: np.ndarray, t0: float, *, assets: list[str] | None = None,
          per_batch: int = 50, dt: float = 0.25) -> tuple[list[Outbound], list[bool], float]:
    """X fed in batches DT apart from T0: messages out, each window's flag after its batch."""
    out: list[Outbound] = []
    flags: list[bool] = []
    t = t0
    for start in range(0, len(x), per_batch):
        part = x[start : start + per_batch]
        names = assets or ["a"]
        wins = [Window(names[(start + i) % len(names)], part[i], None, None, t, start + i)
                for i in range(len(part))]
        out += mon.observe(wins, part, None, t)
        flags += [mon.flagged(w.asset) for w in wins]
        t += dt
    return out, flags, t


def _alerts(messages: list[Outbound]) -> list[dict[str, Any]]:
    return [orjson.loads(m.payload) for m in messages if "/alerts/" in m.topic]


# -- measures ---------------------------------------------------------------------------------


def test_psi_and_ks_match_hand_computed_values() -> None:
    ref, live = np.array([50, 50]), np.array([90, 10])
    # Half a window added to each bin: ref 0.5/0.5, live 90.5/101 and 10.5/101.
    r, lv = 0.5, 90.5 / 101
    expected = (lv - r) * math.log(lv / r) + ((1 - lv) - r) * math.log((1 - lv) / r)
    assert psi(ref, live)[0] == pytest.approx(expected, rel=1e-12)
    assert psi(ref, ref)[0] == pytest.approx(0.0, abs=1e-15)
    assert ks(ref, live)[0] == pytest.approx(0.4)  # CDFs 0.5 vs 0.9 at the edge
    # An empty bin is finite: ref 100/0 vs live 0/100 (smoothed 100.5/0.5 of 101).
    a, b = 100.5 / 101, 0.5 / 101
    assert psi(np.array([100, 0]), np.array([0, 100]))[0] == pytest.approx(
        2 * (a - b) * math.log(a / b))
    # Padding bins (beyond a row's own) count for nothing.
    padded = psi(np.array([[50, 50, 0]]), np.array([[90, 10, 0]]), np.array([2]))
    assert padded[0] == pytest.approx(expected, rel=1e-12)


def test_bins_are_left_closed_and_nan_goes_first() -> None:
    edges = np.array([[0.0, 1.0, np.inf]])
    v = np.array([[-1.0], [0.0], [0.5], [1.0], [7.0], [np.nan]])
    assert bin_index(v, edges)[:, 0].tolist() == [0, 1, 1, 2, 2, 0]


def test_summary_bins_are_deciles_and_constant_statistics_get_two_edges(
    example: Manifest,
) -> None:
    rng = np.random.default_rng(0)
    x = _windows(rng, 1000)
    x[:, :, 2] = 3.0  # a constant channel: its std is 0 in every window, its mean 3
    s = summarize(x, example.heads, None, FEATURES, data_name="calibration")
    by = {(h.name, h.statistic): h for h in s.histograms}
    assert set(by) == {(f, st) for f in FEATURES for st in ("mean", "std")}
    assert by["accel_x", "mean"].counts == [100] * 10
    const = by["accel_z", "mean"]
    assert len(const.edges) == 2
    assert const.edges[0] < 3.0 < const.edges[1]
    assert const.counts == [0, 1000, 0]
    with pytest.raises(ValidationError, match="increase strictly"):
        ReferenceHistogram(kind="input", name="x", statistic="mean", edges=[1, 1], counts=[1, 1, 1])
    with pytest.raises(ValidationError, match="statistic class"):
        ReferenceHistogram(kind="input", name="x", statistic="class", edges=[1], counts=[1, 1])


def test_manifest_reference_round_trips_and_is_absent_when_none(
    example: Manifest, referenced: Manifest
) -> None:
    assert b'"reference"' not in example.to_bytes()
    with Bundle.open(DATA / "vib-lstm") as bundle:  # a schema 2 manifest (the converter's)
        plain = bundle.manifest
    assert plain.schema_version == 2
    newer = plain.model_copy(update={"reference": referenced.reference, "schema_version": 3})
    again = Manifest.from_bytes(newer.to_bytes())
    assert again.reference == referenced.reference
    assert again.to_bytes() == newer.to_bytes()


def test_a_reference_needs_schema_3_so_older_gateways_say_upgrade(referenced: Manifest) -> None:
    # A schema 2 gateway refuses any unknown key; schema 3 makes it name the reason.
    with Bundle.open(DATA / "vib-lstm") as bundle:
        plain = bundle.manifest
    wrong = plain.model_copy(update={"reference": referenced.reference})
    with pytest.raises(ManifestError, match=r"reference \(a drift summary\) needs schema_versi"):
        Manifest.from_bytes(wrong.to_bytes())


def test_config_defaults_and_refusals() -> None:
    cfg = DriftConfig()
    assert (cfg.enabled, cfg.threshold, cfg.window_s, cfg.interval_s, cfg.min_windows,
            cfg.per_asset) == (True, 0.25, 600.0, 60.0, 200, False)
    assert DriftConfig(measure="ks").threshold == 0.2
    with pytest.raises(ValidationError, match="interval_s 700 is longer than window_s 600"):
        DriftConfig(interval_s=700)
    with pytest.raises(ValidationError):
        DriftConfig(level=0)


# -- the monitor --------------------------------------------------------------------------------


def test_no_false_alarms_on_calibration_data_over_many_seeds(referenced: Manifest) -> None:
    alarms = 0
    scores = []
    for seed in range(40):
        mon = _monitor(referenced)
        out, flags, _ = _feed(mon, _windows(np.random.default_rng(100 + seed), 1000), 0.0)
        alarms += any(flags) or bool(_alerts(out))
        scores.append(mon.document["score"])
    # Noise of PSI at 800 windows, 10 bins: ~0.02 per statistic; the level is 0.25.
    assert alarms == 0, scores
    assert max(scores) < 0.15


@pytest.mark.parametrize(("shift", "scale"), [(0.25, 1.0), (0.0, 2.0 ** 0.5)],
                         ids=["mean+0.25sd", "variance x2"])
def test_drift_is_detected_within_the_period_and_alerted_once(
    referenced: Manifest, shift: float, scale: float
) -> None:
    mon = _monitor(referenced)
    rng = np.random.default_rng(7)
    out, flags, t = _feed(mon, _windows(rng, 1000), 0.0)
    assert not any(flags)
    assert not _alerts(out)
    out, flags, t = _feed(mon, _windows(rng, 1000, shift=shift, scale=scale), t)
    alerts = _alerts(out)
    assert [a["state"] for a in alerts] == ["drift"], alerts
    # Judged at the first batch of an interval once the shifted windows fill min_windows; the
    # flag holds from that batch on (the window_s period is 4 s, here 5 s of shifted input).
    first = flags.index(True)
    assert first <= 400
    assert all(flags[first:])
    top = alerts[0]["top"][0]
    assert top["statistic"] == ("mean" if shift else "std")
    assert alerts[0]["asset"] is None
    assert alerts[0]["score"] >= 0.25
    stats = [orjson.loads(m.payload) for m in out if "/drift/" in m.topic]
    assert stats[-1]["drifting"] is True
    assert stats[-1]["status"] == "drift"
    assert all(m.retain and m.qos == 0 for m in out if "/drift/" in m.topic)
    assert all(m.qos == 1 and not m.retain for m in out if "/alerts/" in m.topic)


def test_clears_once_then_alerts_again_only_after_the_rate_limit(referenced: Manifest) -> None:
    mon = _monitor(referenced)
    rng = np.random.default_rng(3)
    messages: list[Outbound] = []
    t = 0.0
    for shift in (0.0, 0.5, 0.0, 0.5):
        out, _, t = _feed(mon, _windows(rng, 1000, shift=shift), t)
        messages += out
    states = [a["state"] for a in _alerts(messages)]
    assert states == ["drift", "cleared", "drift"]
    assert mon.alerts == 2


def test_small_batches_count_exactly_as_large_ones(referenced: Manifest) -> None:
    # Batches under 32 windows wait to be counted together: same counts, same buckets.
    x = _windows(np.random.default_rng(9), 1200, shift=0.1)
    docs = []
    for per_batch in (1, 8, 100):  # each divides the 200 windows of an interval
        mon = _monitor(referenced, per_asset=True)
        for i in range(0, len(x), per_batch):
            t = i // 200 + (i % 200) / 1000  # the same time for a window whatever its batch
            part = x[i : i + per_batch]
            wins = [Window("abc"[(i + j) % 3], part[j], None, None, t, i + j)
                    for j in range(len(part))]
            mon.observe(wins, part, None, t)
        docs.append((mon.document["windows"], mon.document["features"],
                     mon.assets["b"].last))
    assert docs[0] == docs[1] == docs[2]


def test_rate_limit_holds_a_second_alert_back(referenced: Manifest) -> None:
    # A scope that cleared and drifts again within window_s of its last alert is flagged, and
    # alerted only once window_s has passed (white-box: the rule itself, without a minute of data).
    mon = _monitor(referenced, window_s=60.0)
    scope = mon.whole
    scope.drifting = True
    assert [a["state"] for a in _alerts(mon._alarm(scope, None, 10.0, 0.0))] == ["drift"]
    scope.drifting = False
    assert [a["state"] for a in _alerts(mon._alarm(scope, None, 20.0, 0.0))] == ["cleared"]
    scope.drifting = True
    assert mon._alarm(scope, None, 30.0, 0.0) == []
    assert mon.flagged("any")
    assert [a["state"] for a in _alerts(mon._alarm(scope, None, 70.0, 0.0))] == ["drift"]


def test_per_asset_flags_and_alerts_only_the_drifting_asset(referenced: Manifest) -> None:
    mon = _monitor(referenced, per_asset=True)
    rng = np.random.default_rng(5)
    x = _windows(rng, 2000)
    x[1::2] += 0.5  # asset b's windows (every second one) are shifted
    out, flags, _ = _feed(mon, x, 0.0, assets=["a", "b"], per_batch=100)
    alerts = _alerts(out)
    assert [(a["asset"], a["state"]) for a in alerts] == [("b", "drift")]
    assert mon.flagged("b")
    assert not mon.flagged("a")
    assert not any(flags[0::2])
    assert flags[-1]
    doc = mon.document
    assert doc["assets"]["drifting"] == 1
    assert list(doc["assets"]["top"]) == ["b"]


def test_a_failing_drift_hook_is_logged_once_per_period_and_alerts_go_out(
    referenced: Manifest, caplog: pytest.LogCaptureFixture,
) -> None:
    mon = _monitor(referenced, per_asset=True)

    def hook(asset: str | None) -> None:
        raise RuntimeError(f"capture broke for {asset}")

    mon.on_drift = hook
    x = _windows(np.random.default_rng(5), 2000)
    x[1::2] += 0.5  # assets b and d drift
    with caplog.at_level(logging.ERROR, "floorline.edge.stream.drift"):
        out, _, _ = _feed(mon, x, 0.0, assets=["a", "b", "c", "d"], per_batch=100)
    assert sorted(a["asset"] for a in _alerts(out)) == ["b", "d"]
    assert mon.errors == 2
    assert caplog.text.count("the drift hook failed") == 1


def test_per_asset_memory_is_bounded(referenced: Manifest) -> None:
    mon = _monitor(referenced, per_asset=True, max_assets=5)
    x = _windows(np.random.default_rng(6), 400)
    _feed(mon, x, 0.0, assets=[f"a{i}" for i in range(20)])
    assert len(mon.assets) == 5


def test_a_bundle_without_reference_or_a_disabled_config_gives_no_monitor(
    example: Manifest, referenced: Manifest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "floorline.edge.stream.drift")
    assert make_monitor(DriftConfig(), example, gateway="gw", pipeline="vib") is None
    assert "drift detection off: bundle pdm-classifier" in caplog.text
    assert make_monitor(DriftConfig(enabled=False), referenced, gateway="gw",
                        pipeline="vib") is None
    assert make_monitor(DriftConfig(), referenced, gateway="gw", pipeline="vib") is not None


def test_a_failure_inside_never_raises(referenced: Manifest) -> None:
    mon = _monitor(referenced)
    bad = np.zeros((40, W, 2), dtype=np.float32)  # too few features: the plan cannot read it
    assert mon.observe([], bad, None, 0.0) == []
    assert mon.errors == 1


def test_metrics_export_the_drift_document(referenced: Manifest) -> None:
    pytest.importorskip("prometheus_client")
    mon = _monitor(referenced)
    _feed(mon, _windows(np.random.default_rng(8), 1000, shift=0.5), 0.0)
    metrics = Metrics(lambda: {"pipelines": {"vib": {"received": 1, "drift": mon.document}}})
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in metrics.collect() for s in fam.samples}
    assert samples["floorline_drift_active", (("pipeline", "vib"),)] == 1.0
    assert samples["floorline_drift_alerts_total", (("pipeline", "vib"),)] == 1.0
    key = ("floorline_drift_psi", (("feature", "accel_x"), ("pipeline", "vib"),
                                   ("statistic", "mean")))
    assert samples[key] > 0.25
    names = {s.name for fam in metrics.collect() for s in fam.samples}
    assert {n for n in names if "drift" in n} <= DRIFT_METRIC_NAMES
    assert DRIFT_METRIC_NAMES - names == {"floorline_drift_output_psi"}  # no outputs summarized
    summary = orjson.loads(metrics.stats_message())["pipelines"]["vib"]
    assert summary["drift"]["drifting"] is True


# -- the real converter and the real daemon ------------------------------------------------------

SK_FEATURES = ["rms_g", "peak_g", "crest_factor", "kurtosis", "temperature_c", "dominant_hz"]


@pytest.fixture(scope="module")
def sk_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scikit-learn classifier converted with calibration and parity files (no TensorFlow)."""
    from tests import sklearn_zoo  # noqa: PLC0415

    work = tmp_path_factory.mktemp("drift-sk")
    source = sklearn_zoo.save(sklearn_zoo.ZOO["logistic"].make(), work, "logistic")
    np.save(work / "calibration.npy", sklearn_zoo.features(2000, 11)[0].astype(np.float32))
    np.save(work / "parity.npy", sklearn_zoo.features(600, 12)[0].astype(np.float32))
    card = ModelCard.model_validate({
        "name": "sk-drift", "task": "classification", "features": SK_FEATURES,
        "labels": ["bearing_wear", "imbalance", "normal"],
    })
    said: list[str] = []
    convert(ConvertRequest(source=source, out=work / "bundle", card=card, targets=["onnx"],
                           calibration=work / "calibration.npy",
                           parity_data=work / "parity.npy", kind="sklearn"), say=said.append)
    assert any(s.startswith("drift reference: 2600 windows") for s in said), said
    return work / "bundle"


def test_the_converter_stores_the_reference_and_signs_it(sk_bundle: Path) -> None:
    with Bundle.open(sk_bundle) as bundle:
        ref = bundle.manifest.reference
    assert ref is not None
    assert ref.windows == 2600
    assert ref.data == "calibration+parity"
    kinds = [(h.kind, h.name, h.statistic) for h in ref.histograms]
    assert kinds == [("input", f, "mean") for f in SK_FEATURES] + [("output", "output", "class")]
    classes = ref.histograms[-1]
    assert classes.edges == [0.5, 1.5]
    assert sum(classes.counts) == 2600
    assert min(classes.counts) > 300  # the classes are balanced in this data


def test_the_converter_without_data_files_writes_no_reference(tmp_path: Path) -> None:
    from tests import sklearn_zoo  # noqa: PLC0415

    source = sklearn_zoo.save(sklearn_zoo.ZOO["logistic"].make(), tmp_path, "logistic")
    card = ModelCard.model_validate({"name": "sk-nodrift", "task": "classification",
                                     "features": SK_FEATURES,
                                     "labels": ["bearing_wear", "imbalance", "normal"]})
    said: list[str] = []
    convert(ConvertRequest(source=source, out=tmp_path / "b", card=card, targets=["onnx"],
                           kind="sklearn"), say=said.append)
    assert any("drift reference: none" in s for s in said)
    with Bundle.open(tmp_path / "b") as bundle:
        assert bundle.manifest.reference is None
        assert b'"reference"' not in (tmp_path / "b" / "manifest.json").read_bytes()


SK_PIPELINE = """
  - name: health
    subscribe: ["{prefix}/+/features"]
    qos: 0
    bundle: "{bundle}"
    backend: onnx
    decoder: {{type: json}}
    batch: {{max_batch: 16, max_wait_ms: 5}}
    drift: {{interval_s: 0.5, window_s: 2.0, min_windows: 200}}
"""


def test_the_daemon_publishes_drift_flags_predictions_and_alerts_once(
    mosquitto: Mosquitto, unique_topic: str, sk_bundle: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    from tests import sklearn_zoo  # noqa: PLC0415

    caplog.set_level(logging.INFO, "floorline.edge.stream.drift")
    pipelines = (SK_PIPELINE.format(prefix=unique_topic, bundle=sk_bundle)
                 + vibration_pipeline(unique_topic, backend="onnx"))
    normal = sklearn_zoo.features(1200, 21)[0]
    shifted = sklearn_zoo.features(1600, 22)[0]
    shifted[:, 4] += 15.0  # temperature_c: a sensor offset the model never saw
    with MqttProbe().connect("127.0.0.1", mosquitto.port) as probe, \
            running(config_text(mosquitto, pipelines)) as daemon:
        probe.subscribe("floorline/gw-test/#", qos=1)
        topic = f"{unique_topic}/pump-1/features"

        def send(rows: np.ndarray) -> None:
            for i, row in enumerate(rows):
                probe.publish(topic, orjson.dumps(dict(zip(SK_FEATURES, map(float, row),
                                                           strict=True))), qos=0)
                if i % 100 == 99:
                    time.sleep(0.1)  # ~1000 windows a second: several per interval

        send(normal)
        send(shifted)
        publish_stream(probe, f"{unique_topic}/pump-2/vibration",
                       np.random.default_rng(0).normal(0, 0.3, (128, 3)), t0=1000.0, qos=0)

        def alerted() -> bool:
            return any("/alerts/" in m.topic for m in probe.messages)

        wait_until(alerted, 15, "a drift alert")
        preds = [orjson.loads(m.payload) for m in probe.messages
                 if m.topic.startswith("floorline/gw-test/pred/health/")]
        wait_until(lambda: any(m.topic.startswith("floorline/gw-test/pred/vibration/")
                               for m in probe.messages), 10, "vibration predictions")
        send(shifted[:600])  # still drifting: flagged, and no second alert
        time.sleep(1.0)
        stats = daemon.stats()["pipelines"]
        messages = list(probe.messages)
        with MqttProbe().connect("127.0.0.1", mosquitto.port) as late:  # retained for dashboards
            late.subscribe("floorline/gw-test/drift/+", qos=1)
            wait_until(lambda: bool(late.messages), 5, "the retained drift stats")
            assert late.messages[0].retain
            assert late.messages[0].topic == "floorline/gw-test/drift/health"

    flags = [p.get("drift", False) for p in preds]
    assert not any(flags[:1000]), "no drift flag on calibration-like input"
    first = flags.index(True)
    assert all(flags[first:])
    assert first < 1200 + 1000
    alerts = [orjson.loads(m.payload) for m in messages if "/alerts/" in m.topic]
    assert [(a["pipeline"], a["state"]) for a in alerts] == [("health", "drift")]
    assert alerts[0]["top"][0]["feature"] == "temperature_c"
    drift_stats = [orjson.loads(m.payload) for m in messages
                   if m.topic == "floorline/gw-test/drift/health"]
    assert drift_stats
    assert drift_stats[0]["drifting"] is False
    assert drift_stats[-1]["drifting"] is True
    assert "class" in next(iter(drift_stats[-1]["outputs"]))  # the model's outputs too
    assert stats["health"]["drift"]["drifting"] is True
    # The bundle without a reference runs as before: no flag, no stats, one info line.
    vib = [orjson.loads(m.payload) for m in messages
           if m.topic.startswith("floorline/gw-test/pred/vibration/")]
    assert vib
    assert all("drift" not in p for p in vib)
    assert "drift" not in stats["vibration"]
    assert not [m for m in messages if m.topic.endswith("/drift/vibration")]
    assert "pipeline vibration: drift detection off: bundle pdm-classifier" in caplog.text


def test_worker_processes_feed_one_monitor_in_the_reader(
    mosquitto: Mosquitto, unique_topic: str, sk_bundle: Path,
) -> None:
    """workers: 2: one alert, stats on the pipeline's topic, metrics, flags in both workers."""
    from tests import sklearn_zoo  # noqa: PLC0415

    pytest.importorskip("prometheus_client")
    pipeline = SK_PIPELINE.format(prefix=unique_topic, bundle=sk_bundle) + "    workers: 2\n"
    assets = [f"pump-{i}" for i in range(8)]
    owners = {a: zlib.crc32(a.encode()) % 2 for a in assets}
    assert set(owners.values()) == {0, 1}  # the assets are spread over both workers
    normal = sklearn_zoo.features(1200, 31)[0]
    shifted = sklearn_zoo.features(2400, 32)[0]
    shifted[:, 4] += 15.0

    def send(probe: MqttProbe, rows: np.ndarray) -> None:
        for i, row in enumerate(rows):
            probe.publish(f"{unique_topic}/{assets[i % 8]}/features",
                          orjson.dumps(dict(zip(SK_FEATURES, map(float, row), strict=True))),
                          qos=0)
            if i % 100 == 99:
                time.sleep(0.1)

    def drift_docs(probe: MqttProbe) -> list[dict[str, Any]]:
        return [orjson.loads(m.payload) for m in list(probe.messages)
                if m.topic == "floorline/gw-test/drift/health"]

    with MqttProbe().connect("127.0.0.1", mosquitto.port) as probe, \
            running(config_text(mosquitto, pipeline)) as daemon:
        probe.subscribe("floorline/gw-test/#", qos=1)
        send(probe, normal)  # steady: judged, no alert, no flag
        wait_until(lambda: any(d["windows"] >= 200 for d in drift_docs(probe)), 15,
                   "drift stats judged on the steady stream")
        steady = list(probe.messages)
        steady_stats = daemon.stats()["pipelines"]["health"]["drift"]
        send(probe, shifted)

        def flagged_by_both() -> bool:
            preds = [m for m in list(probe.messages) if "/pred/health/" in m.topic]
            return {owners[m.topic.split("/")[-1]] for m in preds
                    if orjson.loads(m.payload).get("drift")} == {0, 1}

        wait_until(flagged_by_both, 20, "drift flags on both workers' assets")
        mark = len(probe.messages)
        send(probe, shifted[:400])  # still drifting: flagged, no second alert

        def later_predictions() -> bool:  # of every asset, after the alert went out
            later = [m.topic for m in list(probe.messages)[mark:] if "/pred/health/" in m.topic]
            return all(later.count(f"floorline/gw-test/pred/health/{a}") >= 20 for a in assets)

        wait_until(later_predictions, 15, "predictions of the still drifting stream")
        stats = daemon.stats()["pipelines"]["health"]
        names = {s.name for fam in daemon.metrics.collect() for s in fam.samples}
        messages = list(probe.messages)

    # The steady stream: judged, never drifting, no alert, no flag.
    steady_docs = [orjson.loads(m.payload) for m in steady
                   if m.topic == "floorline/gw-test/drift/health"]
    assert all(d["drifting"] is False for d in steady_docs)
    assert steady_stats["drifting"] is False
    assert not [m for m in steady if "/alerts/" in m.topic]
    assert not [m for m in steady if "/pred/health/" in m.topic
                and orjson.loads(m.payload).get("drift")]
    # The drifting stream: one alert for the pipeline, on its topic.
    alerts = [(m.topic, orjson.loads(m.payload)) for m in messages if "/alerts/" in m.topic]
    assert [(t, a["state"], a["asset"]) for t, a in alerts] == [
        ("floorline/gw-test/alerts/health", "drift", None)]
    assert "worker" not in alerts[0][1]
    assert alerts[0][1]["top"][0]["feature"] == "temperature_c"
    assert not [m for m in messages if m.topic.startswith("floorline/gw-test/drift/health/")]
    docs = [orjson.loads(m.payload) for m in messages
            if m.topic == "floorline/gw-test/drift/health"]
    assert docs[-1]["drifting"] is True
    assert "worker" not in docs[-1]
    assert stats["drift"]["drifting"] is True
    assert stats["drift"]["alerts"] == 1
    assert {"floorline_drift_score", "floorline_drift_active",
            "floorline_drift_alerts_total"} <= names
    # Once an asset's predictions are flagged they stay flagged while the input drifts.
    per_asset: dict[str, list[bool]] = {}
    for m in messages:
        if "/pred/health/" in m.topic:
            per_asset.setdefault(m.topic.split("/")[-1], []).append(
                bool(orjson.loads(m.payload).get("drift")))
    for asset, flags in per_asset.items():
        assert True in flags, asset
        assert all(flags[flags.index(True):]), asset


@pytest.mark.parametrize("lag", [1, 3], ids=["in-step", "worker-0-lags"])
def test_worker_counts_merged_in_the_reader_judge_as_one_monitor(referenced: Manifest,
                                                                   lag: int) -> None:
    """Two counting monitors (workers) and one merging (reader) = one monitor on everything.

    LAG: worker 0 reports every LAG batches, after worker 1: its counts of a bucket then come
    after worker 1's of the next one, and still land in their own bucket.
    """
    rng = np.random.default_rng(5)
    x = np.concatenate([_windows(rng, 1200), _windows(rng, 2400, shift=0.5)])
    names = [f"m{i}" for i in range(6)]
    single = _monitor(referenced, per_asset=True)
    single_out, _, _ = _feed(single, x, 0.0, assets=names, per_batch=60, dt=0.1)
    reader = _monitor(referenced, per_asset=True)
    workers = [_monitor(referenced, per_asset=True) for _ in range(2)]
    for w in workers:
        w.as_worker()
    merged: list[Outbound] = []
    t = 0.0
    for step, start in enumerate(range(0, len(x), 60)):
        part = x[start : start + 60]
        wins = [Window(names[(start + i) % 6], part[i], None, None, t, start + i)
                for i in range(len(part))]
        for k, w in enumerate(workers):
            idx = [i for i, win in enumerate(wins) if zlib.crc32(win.asset.encode()) % 2 == k]
            assert w.observe([wins[i] for i in idx], part[idx], None, t) == []
        # Worker 1 reports before worker 0: counts of a bucket may arrive after a later one's.
        for k in (1, 0):
            if k == 1 or step % lag == lag - 1 or start + 60 >= len(x):
                merged += reader.merge(workers[k].take_counts(), t)
        for w in workers:
            w.set_verdict(reader.verdict())
        t += 0.1
    # Every window counted once, in its own bucket, whatever order the reports came in.
    assert reader.whole.ring.current == single.whole.ring.current
    assert np.array_equal(reader.whole.ring.counts, single.whole.ring.counts)
    assert set(reader.assets) == set(single.assets)
    for a, scope in single.assets.items():
        assert np.array_equal(reader.assets[a].ring.windows, scope.ring.windows)
    assert {a["asset"] for a in _alerts(merged)} == {a["asset"] for a in _alerts(single_out)}
    if lag == 1:  # the same evaluations, on the same counts
        assert [m.topic for m in merged] == [m.topic for m in single_out]
        alerts = [{k: v for k, v in a.items() if k != "ts"} for a in _alerts(merged)]
        assert alerts
        assert alerts == [{k: v for k, v in a.items() if k != "ts"}
                          for a in _alerts(single_out)]
        assert reader.document["assets"] == single.document["assets"]
        assert reader.document["windows"] == single.document["windows"]
    assets = reader.verdict()[1]
    assert assets
    assert assets == {a for a in names if single.flagged(a)}
    assert all(w.flagged(a) == (a in assets) for w in workers for a in names)
    assert workers[0].take_counts() == {}  # nothing counted since the last report


# -- drift and data capture ------------------------------------------------------------------

CAPTURING = """
  - name: {name}
    subscribe: ["{prefix}/{name}/+/features"]
    qos: 0
    bundle: "{bundle}"
    backend: onnx
    decoder: {{type: json}}
    batch: {{max_batch: 16, max_wait_ms: 5}}
    drift: {{interval_s: 0.5, window_s: 2.0, min_windows: 200}}
    capture: {{sample_rate: 0.05, alerts: false, before: 2, after: 3}}
"""


def _send_features(probe: MqttProbe, topic: str, rows: np.ndarray) -> None:
    for i, row in enumerate(rows):
        probe.publish(topic, orjson.dumps(dict(zip(SK_FEATURES, map(float, row), strict=True))),
                      qos=0)
        if i % 100 == 99:
            time.sleep(0.1)  # ~1000 windows a second: several per drift interval


def _reasons(data: Any) -> list[set[str]]:
    return [set(r.split(",")) for r in data["reasons"].tolist()]


def test_a_drift_alert_keeps_the_windows_around_it_and_a_steady_stream_none(
    mosquitto: Mosquitto, unique_topic: str, sk_bundle: Path, tmp_path: Path,
) -> None:
    from floorline.edge.capture.export import export  # noqa: PLC0415
    from tests import sklearn_zoo  # noqa: PLC0415

    pipelines = "".join(CAPTURING.format(name=name, prefix=unique_topic, bundle=sk_bundle)
                        for name in ("health", "steady"))
    normal = sklearn_zoo.features(1200, 21)[0]
    shifted = sklearn_zoo.features(1600, 22)[0]
    shifted[:, 4] += 15.0  # temperature_c: a sensor offset the model never saw
    steady = sklearn_zoo.features(2800, 23)[0]
    state = tmp_path / "state"
    with MqttProbe().connect("127.0.0.1", mosquitto.port) as probe, \
            running(config_text(mosquitto, pipelines, state_dir=state)) as daemon:
        probe.subscribe("floorline/gw-test/alerts/#", qos=1)
        _send_features(probe, f"{unique_topic}/health/pump-1/features", normal)
        _send_features(probe, f"{unique_topic}/steady/pump-9/features", steady[:1200])
        _send_features(probe, f"{unique_topic}/health/pump-1/features", shifted)
        _send_features(probe, f"{unique_topic}/steady/pump-9/features", steady[1200:])
        wait_until(lambda: bool(probe.messages), 15, "a drift alert")
        wait_until(lambda: {p.name: p.counters["predictions"] for p in daemon.pipelines}
                   == {"health": 2800, "steady": 2800}, 20, "every window predicted")
        alerts = [orjson.loads(m.payload) for m in probe.messages]
    export(state, tmp_path / "health.npz", pipeline="health")  # after the daemon stopped
    export(state, tmp_path / "steady.npz", pipeline="steady")
    health, steady_out = np.load(tmp_path / "health.npz"), np.load(tmp_path / "steady.npz")
    assert [(a["pipeline"], a["state"]) for a in alerts] == [("health", "drift")]
    reasons = _reasons(health)
    seqs = health["seq"].tolist()
    marked = [s for s, r in zip(seqs, reasons, strict=True) if "drift" in r]
    before = [s for s, r in zip(seqs, reasons, strict=True) if "before_drift" in r]
    after = [s for s, r in zip(seqs, reasons, strict=True) if "after_drift" in r]
    # One alert: one marked window of pump-1, the 2 held before it, the 3 after it.
    assert len(marked) == 1, reasons
    assert len(before) == 2
    assert len(after) == 3
    assert max(before) < marked[0] < min(after)
    assert marked[0] >= 1200  # after the offset began, not in the calibration-like part
    assert set(health["asset"].tolist()) == {"pump-1"}
    # The steady stream was sampled (so the store has its windows) and never marked.
    assert len(steady_out["seq"]) > 50
    assert all(r == {"sample"} for r in _reasons(steady_out))


def test_per_asset_drift_marks_only_the_drifting_asset(referenced: Manifest,
                                                       tmp_path: Path) -> None:
    from floorline.edge.capture.config import CaptureConfig  # noqa: PLC0415
    from floorline.edge.capture.service import CaptureService  # noqa: PLC0415

    svc = CaptureService(tmp_path, "gw")
    cap = svc.policy(CaptureConfig(before=1, after=1, alerts=False), pipeline="vib",
                     manifest=referenced, sha256="ab" * 32)
    assert cap is not None
    cap.activate()  # what Pipeline.start does
    mon = _monitor(referenced, per_asset=True)
    mon.on_drift = lambda asset: cap.mark("drift", asset)
    rng = np.random.default_rng(4)
    t, seq = 0.0, 0
    for step in range(40):  # a, b, c take turns; from step 10, b's mean moves
        x = _windows(rng, 60)
        names = ["a", "b", "c"] * 20
        if step >= 10:
            x[1::3] += 1.0
        wins = [Window(names[i], x[i], None, None, t, seq + i) for i in range(60)]
        seq += 60
        mon.observe(wins, x, None, t)
        cap.offer(wins, np.tile(np.array([0.97, 0.01, 0.01, 0.01], np.float32), (60, 1)))
        t += 0.25
    assert svc.store is not None
    assert svc.store.flush()
    stats = svc.stats()
    svc.close()
    assert stats is not None
    assert mon.assets["b"].alerted
    assert not mon.assets["a"].alerted
    assert not mon.assets["c"].alerted
    reasons = stats["pipelines"]["vib"]["reasons"]
    assert reasons == {"before_drift": 1, "drift": 1, "after_drift": 1}
    import sqlite3  # noqa: PLC0415

    conn = sqlite3.connect(svc.path)
    try:
        assets = {a for (a,) in conn.execute("SELECT asset FROM windows")}
    finally:
        conn.close()
    assert assets == {"b"}


def test_drift_alert_and_label_topics_follow_the_config_templates(
    mosquitto: Mosquitto, unique_topic: str, sk_bundle: Path,
) -> None:
    from tests import sklearn_zoo  # noqa: PLC0415

    topics = ('topics: {drift: "site/{gateway}/model-drift/{pipeline}", '
              'alerts: "site/{gateway}/alarms/{pipeline}", '
              'capture_label: "site/{gateway}/labels"}\n')
    pipeline = CAPTURING.format(name="health", prefix=unique_topic, bundle=sk_bundle)
    shifted = sklearn_zoo.features(800, 24)[0]
    shifted[:, 4] += 15.0
    with MqttProbe().connect("127.0.0.1", mosquitto.port) as probe, \
            running(config_text(mosquitto, pipeline, extra=topics)) as daemon:
        probe.subscribe("#", qos=1)  # this test's own broker: everything
        _send_features(probe, f"{unique_topic}/health/pump-1/features", shifted)
        wait_until(lambda: any(m.topic == "site/gw-test/alarms/health" for m in probe.messages),
                   15, "the alert on the configured topic")
        wait_until(lambda: any(m.topic == "site/gw-test/model-drift/health"
                               for m in probe.messages), 5, "drift stats on the configured topic")
        label = b'{"asset": "pump-1", "last_s": 60, "label": "sensor_offset"}'
        # The default topic between two on the configured one: the broker delivers them in
        # order, so once both of those are counted, the middle one would have been too.
        probe.publish("site/gw-test/labels", label, qos=1)
        probe.publish("floorline/gw-test/capture/label", label, qos=1)
        probe.publish("site/gw-test/labels", label, qos=1)
        wait_until(lambda: daemon.capture.labels["accepted"] >= 2, 10, "the labels")
        labels = dict(daemon.capture.labels)
        topics_seen = {m.topic for m in probe.messages}
    assert labels == {"accepted": 2}
    assert not {t for t in topics_seen if t.startswith(("floorline/gw-test/drift",
                                                        "floorline/gw-test/alerts"))}
    alert = next(m for m in probe.messages if m.topic == "site/gw-test/alarms/health")
    assert orjson.loads(alert.payload)["state"] == "drift"
    assert (alert.qos, alert.retain) == (1, False)



def test_a_reload_that_moves_the_drift_topic_clears_the_old_retained_measures(
    mosquitto: Mosquitto, unique_topic: str, sk_bundle: Path, tmp_path: Path,
) -> None:
    from floorline.edge.config.model import parse_config  # noqa: PLC0415
    from tests import sklearn_zoo  # noqa: PLC0415

    pipelines = SK_PIPELINE.format(prefix=unique_topic, bundle=sk_bundle)
    rows = sklearn_zoo.features(400, 31)[0]
    old_topic = "floorline/gw-test/drift/health"
    with MqttProbe().connect("127.0.0.1", mosquitto.port) as probe, \
            running(config_text(mosquitto, pipelines, state_dir=tmp_path)) as daemon:
        probe.subscribe(old_topic, qos=1)

        def measured() -> bool:  # windows until a measure was published (every interval_s)
            _send_features(probe, f"{unique_topic}/pump-1/features", rows[:40])
            return any(m.payload for m in probe.messages)

        wait_until(measured, 15, "a drift measure")
        moved = config_text(mosquitto, pipelines, state_dir=tmp_path,
                            extra="topics: {drift: 'site/{gateway}/drift/{pipeline}'}\n")
        assert daemon.apply(parse_config(moved)).ok
        wait_until(lambda: any(m.payload == b"" for m in probe.messages), 10,
                   "the old topic cleared")
    with MqttProbe().connect("127.0.0.1", mosquitto.port) as late:
        late.subscribe(old_topic, qos=1)
        late.subscribe(f"{unique_topic}/done", qos=1)
        late.publish(f"{unique_topic}/done", b"x", qos=1)  # comes after any retained message
        wait_until(lambda: any(m.topic.endswith("/done") for m in late.messages), 5, "echo")
        assert not [m for m in late.messages if m.topic == old_topic]
