"""The daemon runs schema 2 bundles made by the converter: every head and autoencoder scores.

The bundles are committed under tests/data (``python -m tests.data.make_bundles pump-heads
vib-autoencoder`` rebuilds them). What the daemon publishes is compared with the bundle run
directly on its backend, window by window, and the anomaly scores with a plain numpy computation
of the reconstruction error.
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from floorline.edge.backends import BackendOptions, create
from floorline.edge.bundle.bundle import Bundle
from floorline.edge.demo.signals import Condition
from floorline.edge.stream.normalization import normalize
from tests.daemon_harness import ROOT, asset_samples, config_text, publish_stream, running

PUMP = ROOT / "tests" / "data" / "pump-heads"
AUTOENCODER = ROOT / "tests" / "data" / "vib-autoencoder"
LSTM = ROOT / "tests" / "data" / "vib-lstm"
WINDOW = 32


def _pipeline(name: str, prefix: str, bundle: object, backend: str, artifact: str = "") -> str:
    chosen = f"\n    artifact: {artifact}" if artifact else ""
    return f"""
  - name: {name}
    subscribe: ["{prefix}/+/vibration"]
    bundle: "{bundle}"
    backend: {backend}{chosen}
    decoder: {{type: json, timestamp: ts, sequence: seq}}
    asset: {{topic_segment: -2}}
    window: {{hop: {WINDOW}, max_gap_s: 0.05}}
    batch: {{max_batch: 8, max_wait_ms: 5}}
"""


def _windows(samples: np.ndarray) -> np.ndarray:
    return np.stack([samples[s : s + WINDOW] for s in range(0, len(samples) - WINDOW + 1, WINDOW)])


def _direct(bundle_dir: object, backend: str, raw: np.ndarray,
            artifact: str = "") -> tuple[np.ndarray, Bundle]:
    bundle = Bundle.open(bundle_dir)  # type: ignore[arg-type]
    art = next(a for a in bundle.manifest.artifacts
               if (a.file == artifact if artifact else
                   a.format == ("tflite" if backend == "litert" else "onnx")))
    runner = create(backend, bundle.path / art.file,
                    BackendOptions(outputs=tuple(art.outputs or ())))
    try:
        return runner.infer(normalize(raw, bundle.manifest.input)), bundle
    finally:
        runner.close()


@pytest.mark.parametrize("backend", ["litert", "onnx"])
def test_two_head_predictions_carry_every_head_as_the_backend_computes_them(
    mosquitto, mqtt_client, unique_topic, backend
):
    samples = asset_samples(WINDOW * 6, 21, Condition.BEARING_OUTER_RACE)
    raw = _windows(samples)
    direct, bundle = _direct(PUMP, backend, raw)
    labels = bundle.manifest.heads[0].labels
    assert labels is not None
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    with running(config_text(mosquitto, _pipeline("pump", unique_topic, PUMP, backend))):
        publish_stream(probe, f"{unique_topic}/p1/vibration", samples, t0=5.0)
        got = probe.wait_for(len(raw), "floorline/gw-test/pred/pump/p1", timeout=20)
    docs = sorted((orjson.loads(m.payload) for m in got), key=lambda d: d["seq"])
    assert [d["seq"] for d in docs] == list(range(len(raw)))
    for doc, row in zip(docs, direct, strict=True):
        fault, rms = doc["heads"]["fault"], doc["heads"]["rms"]
        assert fault["label"] == labels[int(row[:4].argmax())]
        assert [fault["scores"][lab] for lab in labels] == pytest.approx(row[:4].tolist(),
                                                                         abs=1e-6)
        assert rms["unit"] == "g"
        assert rms["value"] == pytest.approx(float(row[4]), abs=1e-5)
        # The regression head learned the window's RMS: it is near the true value.
        assert "label" not in doc


@pytest.mark.parametrize("backend", ["litert", "onnx"])
def test_autoencoder_predictions_are_reconstruction_scores_with_feature_shares(
    mosquitto, mqtt_client, unique_topic, backend
):
    healthy = asset_samples(WINDOW * 8, 31)
    faulty = asset_samples(WINDOW * 8, 32, Condition.LOOSENESS)
    recon, bundle = _direct(AUTOENCODER, backend, _windows(faulty))
    head = bundle.manifest.heads[0]
    assert head.score is not None
    assert head.score.percentile == 99
    x = normalize(_windows(faulty), bundle.manifest.input)
    per_feature = ((recon - x) ** 2).mean(axis=1)
    expected = per_feature.mean(axis=1)
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    with running(config_text(mosquitto, _pipeline("ae", unique_topic, AUTOENCODER, backend))):
        publish_stream(probe, f"{unique_topic}/ok/vibration", healthy, t0=5.0)
        publish_stream(probe, f"{unique_topic}/bad/vibration", faulty, t0=5.0)
        ok = probe.wait_for(8, "floorline/gw-test/pred/ae/ok", timeout=20)
        bad = probe.wait_for(8, "floorline/gw-test/pred/ae/bad", timeout=20)
    bad_docs = sorted((orjson.loads(m.payload) for m in bad), key=lambda d: d["seq"])
    ok_docs = [orjson.loads(m.payload) for m in ok]
    for doc, score, shares in zip(bad_docs, expected, per_feature, strict=True):
        anomaly = doc["anomaly"]
        assert anomaly["score"] == pytest.approx(float(score), rel=1e-4, abs=1e-6)
        assert anomaly["threshold"] == pytest.approx(head.score.threshold)
        assert anomaly["anomalous"] is (anomaly["score"] >= anomaly["threshold"])
        assert list(anomaly["features"]) == ["accel_x", "accel_y", "accel_z"]
        assert sum(anomaly["features"].values()) == pytest.approx(1.0, abs=1e-5)
        assert [anomaly["features"][f] for f in ("accel_x", "accel_y", "accel_z")] == (
            pytest.approx((shares / shares.sum()).tolist(), abs=1e-5))
    # Trained on healthy windows only: a loose machine reconstructs worse than a healthy one.
    assert np.mean([d["anomaly"]["score"] for d in bad_docs]) > np.mean(
        [d["anomaly"]["score"] for d in ok_docs])


@pytest.mark.parametrize(("backend", "artifact"), [("litert", "model.int8.tflite"),
                                                   ("litert", "model.tflite"),
                                                   ("onnx", "model.onnx")])
def test_recurrent_bundle_predicts_in_the_daemon_as_on_its_backend(
    mosquitto, mqtt_client, unique_topic, backend, artifact
):
    # An LSTM, unrolled by the converter: the daemon batches its windows like any other model's.
    streams = {f"m{i}": asset_samples(WINDOW * 5, 40 + i, cond)
               for i, cond in enumerate([Condition.HEALTHY, Condition.IMBALANCE,
                                         Condition.LOOSENESS])}
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    cfg = config_text(mosquitto, _pipeline("lstm", unique_topic, LSTM, backend, artifact))
    with running(cfg):
        for asset, samples in streams.items():
            publish_stream(probe, f"{unique_topic}/{asset}/vibration", samples, t0=5.0)
        got = probe.wait_for(5 * len(streams), "floorline/gw-test/pred/lstm/+", timeout=20)
    docs = [orjson.loads(m.payload) for m in got]
    for asset, samples in streams.items():
        direct, bundle = _direct(LSTM, backend, _windows(samples), artifact)
        labels = bundle.manifest.heads[0].labels
        assert labels is not None
        mine = sorted((d for d in docs if d["asset"] == asset), key=lambda d: d["seq"])
        assert [d["seq"] for d in mine] == list(range(5))
        assert all(d["model"]["artifact"] == artifact for d in mine)
        for doc, row in zip(mine, direct, strict=True):
            assert doc["label"] == labels[int(row.argmax())]
            assert [doc["scores"][lab] for lab in labels] == pytest.approx(row.tolist(), abs=1e-6)
