"""Model outputs → prediction messages with provenance; rejected input → dead-letter reports."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from floorline.edge.bundle.manifest import Artifact, Head, Manifest, Task
from floorline.edge.stream.heads import HeadLayout
from floorline.edge.stream.window import Window

_DETAIL_LIMIT = 200
_TOPIC_LIMIT = 256


class _HeadEncoder:
    """The task-specific fields of one head, from its values in one row."""

    def __init__(
        self, head: Head, labels: list[str] | None, thresholds: dict[str, float],
        features: list[str],
    ) -> None:
        self.task = head.task
        self.labels = labels
        self.thresholds = thresholds
        self.units = head.units
        self.score = head.score
        self.features = features
        self.limit = thresholds.get(
            "anomaly", head.score.threshold if head.score is not None else float("inf")
        )

    def fields(self, values: list[float]) -> dict[str, Any]:
        if self.task is Task.CLASSIFICATION and self.labels:
            # The first maximum, or the first NaN, as np.argmax picks.
            best = next((i for i, v in enumerate(values) if v != v), None)  # noqa: PLR0124
            if best is None:
                best = values.index(max(values))
            scores = dict(zip(self.labels, values, strict=False))
            out: dict[str, Any] = {
                "label": self.labels[best],
                "score": values[best],
                "scores": scores,
            }
            if self.thresholds:
                out["alerts"] = [
                    label
                    for label, limit in self.thresholds.items()
                    if scores.get(label, float("-inf")) >= limit
                ]
            return out
        if self.task is Task.ANOMALY:
            score = values[0]
            anomaly: dict[str, Any] = {
                "score": score,
                "threshold": self.limit,
                # A score that is not a number (written as null) is no evidence of normal:
                # a reconstruction that failed is flagged, as an infinite one is.
                "anomalous": not score < self.limit,
            }
            if self.score is not None:
                # Which features the reconstruction missed most: where to look on the machine.
                anomaly["metric"] = self.score.metric
                anomaly["features"] = dict(zip(self.features, values[1:], strict=True))
            return {"anomaly": anomaly}
        out = {"value": values[0] if len(values) == 1 else values}
        if self.units:
            out["unit" if len(values) == 1 else "units"] = (
                self.units[0] if len(values) == 1 else self.units
            )
        return out


class PredictionEncoder:
    """Builds one pipeline's prediction topics and payloads.

    Every prediction says where it came from (gateway, pipeline, asset), what made it (model name,
    version, artifact sha256), which data (window start/end, per-asset sequence number) and how
    fast (inference and end-to-end latency), so a consumer can audit and de-duplicate it.

    A one-head model's fields sit at the top level of the message (``label``/``scores``,
    ``anomaly`` or ``value``); a model with several heads puts each head's under ``heads.NAME``.
    Rows are the values ``HeadLayout.values`` makes (an autoencoder head: score, then shares).
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
        drift: Callable[[str], bool] | None = None,
    ) -> None:
        """DRIFT(asset): whether ASSET's input drifts now (``stream.drift``): ``drift: true``."""
        self._drift = drift
        self._gateway = gateway
        self._pipeline = pipeline
        self._template = topic_template
        heads = manifest.heads
        features = [f.name for f in manifest.input.features]
        # A pipeline's labels and thresholds override a one-head model's (check_fit refuses them
        # for a model with several heads).
        self._heads = [
            (
                head.name,
                _HeadEncoder(
                    head,
                    labels if labels is not None and len(heads) == 1 else head.labels,
                    thresholds if thresholds is not None and len(heads) == 1 else head.thresholds,
                    features,
                ),
            )
            for head in heads
        ]
        widths = HeadLayout(manifest).widths
        self._bounds = [(sum(widths[:i]), sum(widths[: i + 1])) for i in range(len(widths))]
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

    def outputs(self, values: list[float]) -> dict[str, Any]:
        """The task-specific part of a prediction, from one row of values (as Python floats)."""
        if len(self._heads) == 1:
            return self._heads[0][1].fields(values)
        return {
            "heads": {
                name: encoder.fields(values[start:stop])
                for (name, encoder), (start, stop) in zip(self._heads, self._bounds, strict=True)
            }
        }

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
        return self._message(window, row.reshape(-1).tolist(), round(inference_ms, 3),
                             batch_size, now, time.time())

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
            **self.outputs(values),
        }
        if self._drift is not None and self._drift(window.asset):
            message["drift"] = True
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
