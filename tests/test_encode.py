"""PredictionEncoder: a batch encodes exactly as its windows one by one."""

from __future__ import annotations

import math
import time

import numpy as np
import orjson
import pytest

from floorline.edge.bundle.bundle import Bundle
from floorline.edge.bundle.manifest import Task
from floorline.edge.stream.encode import PredictionEncoder
from floorline.edge.stream.window import Window
from tests.daemon_harness import EXAMPLE


def _encoder(task: Task, thresholds: dict[str, float] | None = None) -> PredictionEncoder:
    bundle = Bundle.open(EXAMPLE)
    manifest = bundle.manifest.model_copy(update={"task": task})
    return PredictionEncoder(
        gateway="gw", pipeline="p", manifest=manifest, artifact=manifest.artifacts[0],
        topic_template="floorline/{gateway}/pred/{pipeline}/{asset}", thresholds=thresholds,
    )


@pytest.mark.parametrize(
    ("task", "thresholds"),
    [(Task.CLASSIFICATION, None), (Task.CLASSIFICATION, {"imbalance": 0.3}),
     (Task.ANOMALY, {"anomaly": 0.5}), (Task.REGRESSION, None)],
)
def test_a_batch_encodes_as_its_windows_one_by_one(
    task: Task, thresholds: dict[str, float] | None
) -> None:
    encoder = _encoder(task, thresholds)
    rng = np.random.default_rng(3)
    labels = 4
    out = rng.random((5, labels), dtype=np.float32)
    out[1] = [0.25, 0.5, 0.5, 0.1]  # a tie: the first maximum wins, as np.argmax
    out[2, 2] = np.nan  # a NaN: np.argmax picks it
    windows = [Window(f"a{i}", np.zeros((64, 3), np.float32), 1.0 + i, 2.0 + i, 5.0, i)
               for i in range(5)]
    batch = encoder.encode_batch(windows, out, inference_ms=1.23456, now=5.5)
    single = [encoder.encode(w, row, inference_ms=1.23456, batch_size=5, now=5.5)
              for w, row in zip(windows, out, strict=True)]

    def without_ts(payload: bytes) -> dict[str, object]:
        doc = orjson.loads(payload)
        assert math.isclose(doc.pop("ts"), time.time(), abs_tol=5)
        return doc

    assert [without_ts(b) for b in batch] == [without_ts(s) for s in single]
    if task is Task.CLASSIFICATION:
        docs = [orjson.loads(b) for b in batch]
        names = Bundle.open(EXAMPLE).manifest.heads[0].labels
        assert names is not None
        assert docs[1]["label"] == names[1]
        assert docs[2]["label"] == names[2]
