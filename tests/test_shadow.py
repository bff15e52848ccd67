"""Shadow models: a candidate bundle beside a pipeline's, on the same windows, compared, reported.

Against a real mosquitto with in-process daemons (``tests.daemon_harness``): the same bundle
agrees everywhere, a quantized artifact's agreement and confusion are exactly what the two
artifacts say directly, a shadow that does not fit is refused at build naming ``shadow.bundle``, a
failing shadow never touches the primary, shadow predictions and report cadence. Also finding 5
of issue 14: a pipeline's probation counts never show more dead letters than input.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from floorline.edge.backends import create
from floorline.edge.bundle import archive
from floorline.edge.bundle.bundle import MANIFEST_FILE, SIGNATURE_FILE, Bundle
from floorline.edge.bundle.hashing import sha256_bytes
from floorline.edge.bundle.manifest import Manifest
from floorline.edge.bundle.signing import generate_keypair, load_private_key, sign
from floorline.edge.bundle.store import BundleStore
from floorline.edge.cli.main import main as floorline
from floorline.edge.config.model import parse_config
from floorline.edge.daemon.daemon import Daemon
from floorline.edge.daemon.models import close_model, load_shadow
from floorline.edge.daemon.shadow import check_shadow_fit
from floorline.edge.demo.signals import Condition
from floorline.edge.errors import BundleError, ConfigError
from floorline.edge.stream.normalization import normalize
from floorline.edge.stream.shadow import ShadowStats
from tests.daemon_harness import (
    EXAMPLE,
    ROOT,
    asset_samples,
    config_text,
    publish_stream,
    running,
    sample_payload,
)
from tests.mqtt_broker import wait_until

DATA = ROOT / "tests" / "data"
PUMP_HEADS = DATA / "pump-heads"
VIB_LSTM = DATA / "vib-lstm"
VIB_AUTOENCODER = DATA / "vib-autoencoder"
REPORT = "floorline/gw-test/shadow/vibration"
WINDOW, HOP = 64, 32


def shadow_pipeline(prefix: str, shadow: str, *, bundle: Path = EXAMPLE, batch: str = "",
                    extra: str = "") -> str:
    """A pipeline of BUNDLE on per-sample JSON under PREFIX/<asset>/vibration with SHADOW."""
    return f"""
  - name: vibration
    subscribe: ["{prefix}/+/vibration"]
    qos: 1
    bundle: "{bundle}"
    backend: litert
    decoder: {{type: json, timestamp: ts, sequence: seq}}
    window: {{hop: 32, max_gap_s: 0.05}}
    batch: {batch or "{max_batch: 32, max_wait_ms: 5}"}
    output: {{qos: 1}}
    shadow: {shadow}
{extra}"""


def last_report(probe: Any, until: Any, timeout: float = 20.0) -> dict[str, Any]:
    """The newest shadow report once UNTIL(report) holds."""
    found: dict[str, Any] = {}

    def ready() -> bool:
        reports = [m for m in probe.messages if m.topic == REPORT]
        if not reports:
            return False
        found.clear()
        found.update(orjson.loads(reports[-1].payload))
        return bool(until(found))

    wait_until(ready, timeout, "a shadow report")
    return found


def stream(probe: Any, prefix: str, streams: dict[str, np.ndarray]) -> None:
    for n, (asset, samples) in enumerate(streams.items()):
        publish_stream(probe, f"{prefix}/{asset}/vibration", samples, t0=1000.0 * (n + 1))


def direct_top1(samples: np.ndarray, artifact: str) -> np.ndarray:
    """The top-1 class of every window of SAMPLES on ARTIFACT of the example bundle, directly."""
    with Bundle.open(EXAMPLE) as bundle:
        starts = range(0, len(samples) - WINDOW + 1, HOP)
        x = np.stack([samples[s : s + WINDOW] for s in starts])
        runner = create("litert", bundle.path / artifact)
        out = runner.infer(normalize(x, bundle.manifest.input))
        runner.close()
    return out.argmax(axis=1)


# -- on a live stream -----------------------------------------------------------------------------


def test_a_shadow_of_the_same_bundle_agrees_on_every_window(mosquitto, mqtt_client, unique_topic):
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/#", qos=1)
    cfg = config_text(mosquitto, shadow_pipeline(
        unique_topic, f'{{bundle: "{EXAMPLE}", report_interval_s: 0.2}}'))
    with running(cfg) as daemon:
        stream(probe, unique_topic, {"pump-a": asset_samples(256, seed=1),
                                     "pump-b": asset_samples(256, seed=2,
                                                             condition=Condition.IMBALANCE)})
        report = last_report(probe, lambda r: r["windows"] == 14)
        stats = daemon.stats()["pipelines"]["vibration"]
    head = report["heads"]["output"]
    assert head["task"] == "classification"
    assert head["top1"] == {"agree": 14, "share": 1.0}
    assert head["confusion"] == {}
    assert head["abs_diff"]["max"] == 0.0
    assert report["incomparable_heads"] == []
    assert report["failures"] == 0
    assert report["primary"]["sha256"] == report["shadow"]["sha256"]
    assert report["shadow"]["name"] == "pdm-classifier"
    assert report["inference_ms"]["mean"] > 0
    assert report["inference_ms"]["p95"] >= report["inference_ms"]["mean"] * 0.1
    assert stats["predictions"] == 14
    assert stats["shadow_windows"] == 14
    assert stats["shadow_failures"] == 0
    assert stats["shadow"]["windows"] == 14
    assert not stats["dead_letters"]
    # Shadow predictions are not published unless asked.
    assert not [m for m in probe.messages if m.topic.startswith(f"{REPORT}/")]


def test_a_quantized_shadow_is_compared_window_by_window(mosquitto, mqtt_client, unique_topic):
    streams = {
        "pump-a": asset_samples(512, seed=11),
        "pump-b": asset_samples(512, seed=12, condition=Condition.IMBALANCE),
        "pump-c": asset_samples(512, seed=13, condition=Condition.LOOSENESS),
    }
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/#", qos=1)
    cfg = config_text(mosquitto, shadow_pipeline(
        unique_topic,
        f'{{bundle: "{EXAMPLE}", artifact: model.int8.tflite, report_interval_s: 0.2}}',
        extra="    artifact: model.tflite\n"))
    windows = 3 * ((512 - WINDOW) // HOP + 1)
    with running(cfg):
        stream(probe, unique_topic, streams)
        report = last_report(probe, lambda r: r["windows"] == windows)
    with Bundle.open(EXAMPLE) as bundle:
        labels = bundle.manifest.heads[0].labels
    agree, confusion = 0, Counter[tuple[str, str]]()
    for samples in streams.values():
        for a, b in zip(direct_top1(samples, "model.tflite"),
                        direct_top1(samples, "model.int8.tflite"), strict=True):
            if a == b:
                agree += 1
            else:
                confusion[(labels[a], labels[b])] += 1
    head = report["heads"]["output"]
    assert head["top1"]["agree"] == agree
    assert head["top1"]["share"] == pytest.approx(agree / windows)
    got = Counter({(a, b): n for a, row in head["confusion"].items() for b, n in row.items()})
    assert got == confusion
    assert head["abs_diff"]["max"] > 0  # int8 is not float32
    assert head["abs_diff"]["mean"] <= head["abs_diff"]["max"]
    assert report["shadow"]["artifact"] == "model.int8.tflite"
    assert report["primary"]["artifact"] == "model.tflite"
    assert report["primary"]["sha256"] != report["shadow"]["sha256"]


def test_a_failing_shadow_never_touches_the_primary(mosquitto, mqtt_client, unique_topic):
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/#", qos=1)
    cfg = config_text(mosquitto, shadow_pipeline(
        unique_topic, f'{{bundle: "{EXAMPLE}", report_interval_s: 0.2}}'))
    with running(cfg) as daemon:
        runner = daemon.pipelines[0].shadow
        assert runner is not None

        class Broken:
            runtime = "broken"

            def infer(self, _batch: np.ndarray) -> np.ndarray:
                raise RuntimeError("the candidate crashed")

            def close(self) -> None:
                pass

        real = runner.model
        runner.model = dataclasses.replace(real, backend=Broken())  # type: ignore[arg-type]
        try:
            publish_stream(probe, f"{unique_topic}/pump-a/vibration", asset_samples(256, seed=5),
                           t0=5.0)
            preds = probe.wait_for(7, "floorline/gw-test/pred/vibration/+", timeout=20)
            report = last_report(probe, lambda r: r["failed_windows"] == 7)
            stats = daemon.stats()["pipelines"]["vibration"]
        finally:
            runner.model = real
    assert sorted(orjson.loads(m.payload)["seq"] for m in preds) == list(range(7))
    assert stats["predictions"] == 7
    assert not stats["dead_letters"]  # the input was fine: nothing dead-lettered
    assert not [m for m in probe.messages if "/dlq/" in m.topic]
    assert report["failures"] >= 1
    assert report["failures"] == stats["shadow_failures"]
    assert report["windows"] == 0
    assert report["last_failure"] == "RuntimeError: the candidate crashed"
    assert report["heads"]["output"]["windows"] == 0


def test_shadow_predictions_on_their_own_topic_marked_shadow(mosquitto, mqtt_client,
                                                             unique_topic):
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/#", qos=1)
    cfg = config_text(mosquitto, shadow_pipeline(
        unique_topic,
        f'{{bundle: "{EXAMPLE}", artifact: model.int8.tflite, publish_predictions: true,'
        f' report_interval_s: 0.2}}'))
    with running(cfg):
        publish_stream(probe, f"{unique_topic}/pump-s/vibration", asset_samples(256, seed=6),
                       t0=6.0)
        shadow = probe.wait_for(7, f"{REPORT}/pump-s", timeout=20)
        primary = probe.wait_for(7, "floorline/gw-test/pred/vibration/pump-s", timeout=20)
    bodies = [orjson.loads(m.payload) for m in shadow]
    assert all(m.qos == 0 for m in shadow)
    assert all(b["shadow"] is True for b in bodies)
    assert sorted(b["seq"] for b in bodies) == list(range(7))
    assert {b["model"]["artifact"] for b in bodies} == {"model.int8.tflite"}
    assert {b["asset"] for b in bodies} == {"pump-s"}
    assert all("label" in b and "scores" in b for b in bodies)
    assert all("shadow" not in orjson.loads(m.payload) for m in primary)


def test_reports_come_at_the_configured_cadence_retained_and_a_last_one_at_stop(
    mosquitto, mqtt_client, unique_topic
):
    probe = mqtt_client(mosquitto)
    probe.subscribe(REPORT, qos=1)
    cfg = config_text(mosquitto, shadow_pipeline(
        unique_topic, f'{{bundle: "{EXAMPLE}", report_interval_s: 0.25}}'))
    with running(cfg):
        start = time.monotonic()
        wait_until(lambda: len(probe.messages) >= 4, 10, "four reports")
        elapsed = time.monotonic() - start
        late = mqtt_client(mosquitto)
        late.subscribe(REPORT, qos=1)
        (retained,) = late.wait_for(1, REPORT, timeout=5)
        assert retained.retain
    reports = [orjson.loads(m.payload) for m in probe.messages]
    assert elapsed <= 5.0  # four reports 0.25 s apart
    stamps = [r["ts"] for r in reports]
    assert stamps == sorted(stamps)
    gaps = np.diff(stamps[:4])
    assert all(0.24 <= g <= 2.0 for g in gaps), gaps  # each one interval after the last
    wait_until(lambda: not orjson.loads(probe.messages[-1].payload)["running"], 10, "final")
    assert all(r["running"] for r in reports[:4])


def test_several_heads_compare_by_name_and_every_runs_one_batch_in_n(
    mosquitto, mqtt_client, unique_topic
):
    probe = mqtt_client(mosquitto)
    probe.subscribe(REPORT, qos=1)
    cfg = config_text(mosquitto, shadow_pipeline(
        unique_topic, f'{{bundle: "{PUMP_HEADS}", every: 2, report_interval_s: 0.2}}',
        bundle=PUMP_HEADS, batch="{max_batch: 1}"))
    with running(cfg):
        # Window 32, hop 32: 8 windows, one batch each; the shadow runs on every other.
        publish_stream(probe, f"{unique_topic}/pump-m/vibration", asset_samples(256, seed=7),
                       t0=7.0)
        report = last_report(probe, lambda r: r["skipped_batches"] == 4 and r["windows"] == 4)
    assert report["batches"] == 4
    assert report["every"] == 2
    assert report["heads"]["fault"]["top1"] == {"agree": 4, "share": 1.0}
    assert report["heads"]["rms"]["task"] == "regression"
    assert report["heads"]["rms"]["abs_diff"]["max"] == 0.0
    assert report["incomparable_heads"] == []


def test_heads_without_a_counterpart_are_reported_incomparable(mosquitto, mqtt_client,
                                                               unique_topic):
    probe = mqtt_client(mosquitto)
    probe.subscribe(REPORT, qos=1)
    cfg = config_text(mosquitto, shadow_pipeline(
        unique_topic, f'{{bundle: "{VIB_LSTM}", report_interval_s: 0.2}}', bundle=PUMP_HEADS))
    with running(cfg):
        publish_stream(probe, f"{unique_topic}/pump-i/vibration", asset_samples(128, seed=8),
                       t0=8.0)
        report = last_report(probe, lambda r: r["windows"] == 4)
    assert report["heads"] == {}
    assert {(h["head"], h["side"]) for h in report["incomparable_heads"]} == {
        ("fault", "primary"), ("rms", "primary"), ("output", "shadow")}


# -- refused at build -----------------------------------------------------------------------------


def _config_file(tmp_path: Path, shadow: str, *, bundle: Path = EXAMPLE) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "gateway: {id: gw}\n"
        f"state_dir: '{tmp_path / 'state'}'\n"
        "broker: {host: 127.0.0.1, port: 1}\n"
        "pipelines:\n"
        "  - name: vibration\n"
        '    subscribe: ["plant/+/vibration"]\n'
        f'    bundle: "{bundle}"\n'
        "    decoder: {type: json, timestamp: ts, sequence: seq}\n"
        f"    shadow:\n      {shadow}\n"
    )
    return path


def test_a_shadow_that_does_not_fit_is_refused_by_check_and_run_at_its_key(tmp_path, capsys):
    cfg = _config_file(tmp_path, f'bundle: "{VIB_LSTM}"')
    assert floorline(["check", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    message = (f"{cfg}:10: pipelines[0] (vibration): shadow.bundle: vib-lstm 0.1.0 takes windows "
               "of 32 samples, the pipeline's model pdm-classifier 1.0.0 64")
    assert message in out, out
    from floorline.edge.config.model import load_config  # noqa: PLC0415

    with pytest.raises(ConfigError) as refused:
        Daemon(load_config(cfg)).load()
    assert message in str(refused.value)


def test_check_summarises_a_fitting_shadow(tmp_path, capsys):
    cfg = _config_file(tmp_path, f'bundle: "{VIB_LSTM}"', bundle=PUMP_HEADS)
    assert floorline(["check", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "shadow vib-lstm 0.1.0" in out
    assert "incomparable" in out


def test_a_shadow_taking_other_features_does_not_fit():
    with Bundle.open(EXAMPLE) as bundle:
        primary = bundle.manifest
    features = [f.model_copy(update={"name": f"{f.name}_raw"}) for f in primary.input.features]
    other = primary.model_copy(update={
        "input": primary.input.model_copy(update={"features": features})})
    with pytest.raises(ConfigError, match=r"^shadow\.bundle: .* takes features accel_x_raw"):
        check_shadow_fit(primary, other)
    check_shadow_fit(primary, primary)


def test_shadow_keys_that_would_do_nothing_are_refused():
    base = ("gateway: {id: gw}\npipelines:\n  - name: p\n    subscribe: [a/b]\n"
            "    bundle: x\n    decoder: {type: json}\n")
    with pytest.raises(ConfigError, match=r"shadow\.topic: .*publish_predictions"):
        parse_config(base + "    shadow: {bundle: y, topic: 'a/{asset}'}\n")
    with pytest.raises(ConfigError, match=r"shadow\.interpreter"):
        parse_config(base + "    shadow: {bundle: y, backend: onnx, interpreter: tflite_runtime}\n")
    with pytest.raises(ConfigError, match=r"shadow\.every"):
        parse_config(base + "    shadow: {bundle: y, every: 0}\n")
    cfg = parse_config(base + "    shadow: {bundle: 'sha256:" + "ab" * 32 + "'}\n")
    shadow = cfg.pipelines[0].shadow
    assert shadow is not None
    assert (shadow.every, shadow.report_interval_s, shadow.publish_predictions) == (1, 30.0, False)
    assert shadow.topic == "floorline/{gateway}/shadow/{pipeline}/{asset}"


def test_a_shadow_from_the_fleet_store_must_be_signed_like_the_primary(tmp_path):
    key, pub = generate_keypair(tmp_path / "operator")
    store = BundleStore(tmp_path / "store", 1 << 30)

    def stored(signed: bool, version: str) -> str:
        dest = tmp_path / f"bundle-{version}"
        shutil.copytree(EXAMPLE, dest)
        manifest = Manifest.from_bytes((dest / MANIFEST_FILE).read_bytes())
        manifest = manifest.model_copy(update={"version": version})
        (dest / MANIFEST_FILE).write_bytes(manifest.to_bytes())
        (dest / SIGNATURE_FILE).unlink(missing_ok=True)
        if signed:
            sig = sign(manifest.to_bytes(), load_private_key(key))
            (dest / SIGNATURE_FILE).write_bytes(sig.to_bytes())
        data = archive.pack(dest, tmp_path / f"{version}.tar").read_bytes()
        digest = sha256_bytes(data)
        store.add(digest, data)
        return f"sha256:{digest}"

    def config(ref: str) -> Any:
        return parse_config(
            f"gateway: {{id: gw}}\ntrust: {{trusted_keys: ['{pub}']}}\npipelines:\n"
            f"  - name: p\n    subscribe: [a/b]\n    bundle: '{EXAMPLE}'\n"
            f"    decoder: {{type: json}}\n    shadow: {{bundle: '{ref}'}}\n"
        )

    good = config(stored(signed=True, version="2.0.0"))
    model = load_shadow(good, good.pipelines[0], store)
    assert model is not None
    try:
        assert model.bundle.manifest.version == "2.0.0"
    finally:
        close_model(model)
    bad = config(stored(signed=False, version="2.0.1"))
    with pytest.raises(BundleError, match=r"^shadow\.bundle: "):
        load_shadow(bad, bad.pipelines[0], store)
    missing = config("sha256:" + "cd" * 32)
    with pytest.raises(BundleError, match=r"^shadow\.bundle: bundle cdcdcdcdcdcd… is not in the"):
        load_shadow(missing, missing.pipelines[0], store)


# -- the statistics -------------------------------------------------------------------------------


def test_classification_disagreements_are_counted_by_primary_and_shadow_label():
    with Bundle.open(EXAMPLE) as bundle:
        manifest = bundle.manifest
    names = ["ok", "unbalanced", "bearing", "loose"]  # the pipeline's labels for its model
    stats = ShadowStats(manifest, manifest, labels=names)
    primary = np.eye(4, dtype=np.float32)[[0, 0, 1, 2, 3, 0]]
    shadow = np.eye(4, dtype=np.float32)[[0, 3, 1, 2, 0, 3]]
    stats.add(primary, shadow)
    head = stats.report()["heads"]["output"]
    assert head["windows"] == 6
    assert head["top1"] == {"agree": 3, "share": 0.5}
    # Primary labels as the pipeline names them, the shadow's as its bundle does.
    assert head["confusion"] == {"ok": {"looseness": 2}, "loose": {"healthy": 1}}
    assert head["abs_diff"] == {"mean": pytest.approx(6 / 24), "max": 1.0, "nonfinite": 0}
    with pytest.raises(ValueError, match="5 shadow rows for 6"):
        stats.add(primary, shadow[:5])


def test_anomaly_heads_compare_scores_and_verdicts_against_each_sides_threshold():
    with Bundle.open(VIB_AUTOENCODER) as bundle:
        manifest = bundle.manifest
    limit = manifest.heads[0].score.threshold  # type: ignore[union-attr]
    stats = ShadowStats(manifest, manifest, thresholds={"anomaly": 0.5})
    shares = [0.2, 0.3, 0.5]
    primary = np.array([[0.1, *shares], [1.0, *shares], [2.0, *shares], [np.nan, *shares]],
                       dtype=np.float32)
    shadow = np.array([[0.2, *shares], [1.0, *shares], [limit + 1, *shares], [0.0, *shares]],
                      dtype=np.float32)
    stats.add(primary, shadow)
    head = stats.report()["heads"]["reconstruction"]
    # Primary flags at 0.5 (the pipeline's threshold), the shadow at its own: 1.0 is primary-only;
    # a NaN score is flagged.
    assert head["verdict"]["agree"] == 2
    assert (head["verdict"]["primary_only"], head["verdict"]["shadow_only"]) == (2, 0)
    assert head["verdict"]["primary_threshold"] == 0.5
    assert head["abs_diff"]["nonfinite"] == 1
    assert head["abs_diff"]["max"] == pytest.approx(limit + 1 - 2.0, abs=1e-5)
    assert head["abs_diff"]["mean"] == pytest.approx((0.1 + 0 + abs(limit - 1)) / 3, abs=1e-5)


# -- finding 5: probation never counts more dead letters than input --------------------------------


def test_probation_counts_never_show_more_dead_letters_than_input_across_a_switch(
    mosquitto, mqtt_client, unique_topic
):
    # Issue 14, finding 5: a baseline taken just after a switch, while the new pipeline still had
    # the held-over and queued messages to dead-letter, made "387 of 250 messages dead-lettered".
    prefix = unique_topic
    bad = f"""
  - name: vibration
    subscribe: ["{prefix}/+/vibration"]
    qos: 0
    bundle: "{EXAMPLE}"
    decoder: {{type: json, timestamp: ts, sequence: seq, fields: {{accel_x: a.x, accel_y: a.y,
      accel_z: a.z}}}}
"""
    cfg = parse_config(config_text(mosquitto, bad))
    probe = mqtt_client(mosquitto)
    with running(cfg) as daemon:
        done = threading.Event()
        rows = asset_samples(3000, seed=9)

        def flood() -> None:
            for i, row in enumerate(rows):
                probe.publish(f"{prefix}/pump-f/vibration", sample_payload(1 + i / 1000, i, row),
                              qos=0)
            done.set()

        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        wait_until(lambda: daemon.pipelines[0].counters["received"] > 300, 20, "flood under way")
        assert daemon.apply(cfg).ok  # the same config: a switch with messages held and queued
        p = daemon.pipelines[0]
        start = p.health()  # as the fleet agent's probation takes its baseline
        samples = []
        while not done.is_set() or p.inbox.qsize():
            samples.append(p.health())
            time.sleep(0.005)
        thread.join(10)
        wait_until(lambda: p.health()[0] == p.counters["received"] and not p.inbox.qsize(), 20,
                   "everything processed")
        samples.append(p.health())
    received, dead, failed = (now - then for now, then in zip(samples[-1], start, strict=True))
    assert dead > 100
    assert failed == 0
    assert dead == received  # every message dead-lettered, and counted as input
    for earlier in [start, *samples]:
        for later in samples:
            if later[0] >= earlier[0]:
                assert later[1] - earlier[1] <= later[0] - earlier[0], (earlier, later)
    # From the pipeline's birth the same holds for the plain counters.
    assert sum(p.dead_letters.values()) <= p.counters["received"]
