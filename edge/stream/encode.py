"""Model outputs → prediction messages with provenance; rejected input → dead-letter reports."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from floorline.edge.bundle.manifest import Artifact, Manifest, Task
from floorline.edge.stream.window import Window

_DETAIL_LIMIT = 200
_TOPIC_LIMIT = 256


class PredictionEncoder:
    """Builds one pipeline's prediction topics and payloads.

    Every prediction says where it came from (gateway, pipeline, asset), what made it (model name,
    version, artifact sha256), which data (window start/end, per-asset sequence number) and how
    fast (inference and end-to-end latency), so a consumer can audit and de-duplicate it.
    """

    def __init__(
        self,
        *,
        gateway: str,
        pipeline: str,
        manifest: Manifest,
        artifact: Artifact,
        topic_template: str,
        labels: list[str] | None = None,
        thresholds: dict[str, float] | None = None,
    ) -> None:
        self._gateway = gateway
        self._pipeline = pipeline
        self._template = topic_template
        self._task = manifest.task
        self._labels = labels if labels is not None else manifest.output.labels
        self._thresholds = thresholds if thresholds is not None else manifest.output.thresholds
        self._model = {
            "name": manifest.name,
            "version": manifest.version,
            "artifact": artifact.file,
            "sha256": artifact.sha256,
        }
        self._window_samples = manifest.input.window
        self._topics: dict[str, str] = {}

    def topic(self, asset: str) -> str:
        """The prediction topic for ASSET (cached: assets repeat)."""
        topic = self._topics.get(asset)
        if topic is None:
            topic = self._template.format(
                gateway=self._gateway, pipeline=self._pipeline, asset=asset
            )
            self._topics[asset] = topic
        return topic

    def _outputs(self, values: list[float]) -> dict[str, Any]:
        """The task-specific part of a prediction, from one output row."""
        if self._task is Task.CLASSIFICATION and self._labels:
            # The first maximum, or the first NaN, as np.argmax picks.
            best = next((i for i, v in enumerate(values) if v != v), None)  # noqa: PLR0124
            if best is None:
                best = values.index(max(values))
            scores = dict(zip(self._labels, values, strict=False))
            out: dict[str, Any] = {
                "label": self._labels[best],
                "score": values[best],
                "scores": scores,
            }
            if self._thresholds:
                out["alerts"] = [
                    label
                    for label, limit in self._thresholds.items()
                    if scores.get(label, float("-inf")) >= limit
                ]
            return out
        if self._task is Task.ANOMALY:
            score = values[0]
            limit = self._thresholds.get("anomaly", float("inf"))
            return {"anomaly": {"score": score, "threshold": limit, "anomalous": score >= limit}}
        return {"value": values[0] if len(values) == 1 else values}

    def encode(
        self,
        window: Window,
        row: NDArray[np.float32],
        *,
        inference_ms: float,
        batch_size: int,
        now: float | None = None,
    ) -> bytes:
        """A prediction message for one window."""
        now = time.monotonic() if now is None else now
        return self._message(window, row.tolist(), round(inference_ms, 3), batch_size, now,
                             time.time())

    def encode_batch(
        self, windows: list[Window], out: NDArray[np.float32], *, inference_ms: float, now: float
    ) -> list[bytes]:
        """One prediction message per window of a batch (OUT: its rows), as ``encode`` makes.

        The rows go to Python floats in one call, and the clocks are read once per batch.
        """
        rows = out.reshape(len(windows), -1).tolist()
        ms, size, wall = round(inference_ms, 3), len(windows), time.time()
        return [
            self._message(w, values, ms, size, now, wall)
            for w, values in zip(windows, rows, strict=True)
        ]

    def _message(
        self, window: Window, values: list[float], inference_ms: float, batch_size: int,
        now: float, wall: float,
    ) -> bytes:
        message = {
            "gateway": self._gateway,
            "pipeline": self._pipeline,
            "asset": window.asset,
            "seq": window.index,
            "model": self._model,
            "window": {"start": window.start, "end": window.end, "samples": self._window_samples},
            "latency_ms": {
                "inference": inference_ms,
                "end_to_end": round((now - window.received) * 1e3, 3),
            },
            "batch": batch_size,
            "ts": wall,
            **self._outputs(values),
        }
        return orjson.dumps(message)


def dead_letter(pipeline: str, reason: str, topic: str, size: int, detail: str = "") -> bytes:
    """A bounded report of a rejected message: never its payload."""
    return orjson.dumps(
        {
            "pipeline": pipeline,
            "reason": reason,
            "topic": topic[:_TOPIC_LIMIT],
            "size": size,
            "detail": detail[:_DETAIL_LIMIT],
            "ts": time.time(),
        }
    )
