"""Heads on the gateway: several outputs split apart, autoencoders scored, both encoded."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from floorline.edge.bundle.manifest import Manifest
from floorline.edge.stream.encode import PredictionEncoder
from floorline.edge.stream.heads import HeadLayout, reconstruction_scores
from floorline.edge.stream.window import Window
from tests.bundle_factory import FEATURES, WINDOW, manifest_dict


def _manifest(heads: list[dict[str, Any]], task: str) -> Manifest:
    raw = manifest_dict()
    raw["task"] = task
    raw["outputs"] = heads
    names = [f"t{i}" for i in range(len(heads))]
    for art in raw["artifacts"]:
        art["outputs"] = names if len(heads) > 1 else None
    return Manifest.model_validate(raw)


TWO_HEADS = [
    {"name": "fault", "task": "classification", "shape": [None, 3],
     "labels": ["ok", "bearing", "imbalance"], "thresholds": {"bearing": 0.6}},
    {"name": "rul", "task": "regression", "shape": [None, 1], "units": ["h"]},
]
AUTOENCODER = [
    {"name": "reconstruction", "task": "anomaly", "shape": [None, WINDOW, len(FEATURES)],
     "score": {"metric": "mse", "threshold": 0.5, "percentile": 99.0}},
]


def _windows(n: int) -> list[Window]:
    return [Window(f"a{i}", np.zeros((WINDOW, 3), np.float32), 1.0 + i, 2.0 + i, 5.0, i)
            for i in range(n)]


def test_reconstruction_score_is_the_mean_error_and_shares_sum_to_one() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, WINDOW, 3)).astype(np.float32)
    recon = x.copy()
    recon[0, :, 1] += 2.0  # window 0: feature 1 off by 2 everywhere → mse 4/3, all of it feature 1
    recon[1] += 0.5  # window 1: every feature off by 0.5 → mse 0.25, shares equal
    score, shares = reconstruction_scores(x, recon, "mse")
    assert score[0] == pytest.approx(4 / 3, rel=1e-6)
    assert shares[0].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert score[1] == pytest.approx(0.25, rel=1e-6)
    assert shares[1].tolist() == pytest.approx([1 / 3] * 3)
    assert score[2] == 0.0
    assert shares[2].tolist() == [0.0, 0.0, 0.0]  # a perfect reconstruction: no NaN shares
    mae, _ = reconstruction_scores(x, recon, "mae")
    assert mae[0] == pytest.approx(2 / 3, rel=1e-6)


def test_two_heads_are_split_from_the_joined_row_and_encoded_under_heads() -> None:
    manifest = _manifest(TWO_HEADS, "classification")
    layout = HeadLayout(manifest)
    raw = np.array([[0.1, 0.7, 0.2, 120.5], [0.8, 0.1, 0.1, 900.0]], np.float32)
    fault, rul = layout.split(raw)
    assert fault.shape == (2, 3)
    assert rul.shape == (2, 1)
    assert layout.values(np.zeros((2, WINDOW, 3), np.float32), raw) is not None
    encoder = PredictionEncoder(gateway="gw", pipeline="p", manifest=manifest,
                                artifact=manifest.artifacts[0], topic_template="t/{asset}")
    docs = [orjson.loads(m) for m in encoder.encode_batch(_windows(2), raw, inference_ms=1.0,
                                                            now=6.0)]
    assert docs[0]["heads"]["fault"]["label"] == "bearing"
    assert docs[0]["heads"]["fault"]["alerts"] == ["bearing"]
    assert docs[0]["heads"]["rul"] == {"value": 120.5, "unit": "h"}
    assert docs[1]["heads"]["fault"]["label"] == "ok"
    assert docs[1]["heads"]["rul"]["value"] == 900.0
    assert "label" not in docs[0]  # several heads: nothing at the top level to mistake


def test_autoencoder_head_is_scored_against_the_inputs_and_encoded_with_shares() -> None:
    manifest = _manifest(AUTOENCODER, "anomaly")
    layout = HeadLayout(manifest)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, WINDOW, 3)).astype(np.float32)
    recon = x.copy()
    recon[1, :, 2] += 1.0  # mse 1/3 < 0.5
    recon[2, :, 0] += 2.0  # mse 4/3 >= 0.5
    values = layout.values(x, recon)
    assert values.shape == (3, 1 + 3)
    encoder = PredictionEncoder(gateway="gw", pipeline="p", manifest=manifest,
                                artifact=manifest.artifacts[0], topic_template="t/{asset}")
    docs = [orjson.loads(m)["anomaly"] for m in encoder.encode_batch(
        _windows(3), values, inference_ms=1.0, now=6.0)]
    assert [d["anomalous"] for d in docs] == [False, False, True]
    assert docs[2]["score"] == pytest.approx(4 / 3, rel=1e-6)
    assert docs[2]["threshold"] == 0.5
    assert docs[2]["metric"] == "mse"
    assert docs[2]["features"] == pytest.approx({FEATURES[0]: 1.0, FEATURES[1]: 0.0,
                                                 FEATURES[2]: 0.0})
    assert docs[1]["features"][FEATURES[2]] == pytest.approx(1.0)


def test_a_pipeline_threshold_overrides_the_autoencoders() -> None:
    manifest = _manifest(AUTOENCODER, "anomaly")
    encoder = PredictionEncoder(gateway="gw", pipeline="p", manifest=manifest,
                                artifact=manifest.artifacts[0], topic_template="t/{asset}",
                                thresholds={"anomaly": 0.1})
    values = np.array([[0.2, 1.0, 0.0, 0.0]], np.float32)
    doc = orjson.loads(encoder.encode_batch(_windows(1), values, inference_ms=1.0, now=6.0)[0])
    assert doc["anomaly"]["threshold"] == 0.1
    assert doc["anomaly"]["anomalous"] is True


def test_without_a_scored_head_values_are_the_raw_outputs_uncopied() -> None:
    manifest = _manifest(TWO_HEADS, "classification")
    raw = np.ones((2, 4), np.float32)
    assert np.shares_memory(HeadLayout(manifest).values(np.zeros((2, WINDOW, 3)), raw), raw)
