"""A model's outputs ("heads") as the gateway reads them: split, scored, and laid out for encoding.

A backend returns one array per batch: the only output as it is, or several outputs flattened and
joined per row in head order (``backends.base.join_outputs``). ``HeadLayout`` cuts that apart
again and, for an autoencoder head, turns the reconstruction into what a prediction reports: the
anomaly score (mean squared or absolute reconstruction error over the window) followed by each
feature's share of it. Everything after inference sees only these *values*.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from floorline.edge.bundle.manifest import Head, Manifest, ScoreMetric

FloatArray = NDArray[np.float32]


def reconstruction_scores(
    inputs: FloatArray, reconstruction: FloatArray, metric: ScoreMetric
) -> tuple[FloatArray, FloatArray]:
    """Per window: the anomaly score and each feature's share of it.

    INPUTS and their RECONSTRUCTION are (n, ..., features), in the model's normalized units. The
    score is the mean over every sample and feature of the squared (mse) or absolute (mae)
    difference; shares sum to 1 (all 0 for a perfect reconstruction).
    """
    n, features = len(inputs), inputs.shape[-1]
    diff = reconstruction.reshape(n, -1, features).astype(np.float64) - inputs.reshape(
        n, -1, features
    )
    err = diff * diff if metric == "mse" else np.abs(diff)
    per_feature = err.mean(axis=1)
    score = per_feature.mean(axis=1)
    total = per_feature.sum(axis=1, keepdims=True)
    shares = np.divide(per_feature, total, out=np.zeros_like(per_feature), where=total > 0)
    return score.astype(np.float32), shares.astype(np.float32)


@dataclass(frozen=True)
class _Slot:
    head: Head
    start: int  # in the backend's joined row
    stop: int


class HeadLayout:
    """How one bundle's heads sit in a backend's output and in the values encoders read."""

    def __init__(self, source: Manifest | list[Head]) -> None:
        # A list of heads: a manifest not yet written (the converter's).
        heads = source if isinstance(source, list) else source.heads
        self.heads = heads
        features = next((h.shape[-1] for h in heads if h.score is not None), 0)
        slots, offset = [], 0
        for head in self.heads:
            slots.append(_Slot(head, offset, offset + head.size))
            offset += head.size
        self._slots = slots
        self.scored = any(h.score is not None for h in self.heads)
        self.widths = [1 + int(features or 0) if h.score is not None else h.size for h in heads]
        """Values per head in ``values`` rows: a scored head has its score, then the shares."""

    def split(self, raw: FloatArray) -> list[FloatArray]:
        """RAW (a backend's output for n windows) as one (n, *head.shape[1:]) array per head."""
        n = len(raw)
        if len(self._slots) == 1:
            return [raw.reshape(n, *self.heads[0].shape[1:])]
        flat = raw.reshape(n, -1)
        return [
            flat[:, s.start : s.stop].reshape(n, *s.head.shape[1:])
            for s in self._slots
        ]

    def values(self, inputs: FloatArray, raw: FloatArray) -> FloatArray:
        """(n, sum(widths)): every head's values per window, scored heads scored.

        INPUTS are the model inputs of the batch (normalized), which a reconstruction is compared
        with. Without a scored head this is RAW, reshaped: no copy on the hot path.
        """
        n = len(raw)
        if not self.scored:
            return raw.reshape(n, -1)
        parts: list[FloatArray] = []
        for head, out in zip(self.heads, self.split(raw), strict=True):
            if head.score is None:
                parts.append(out.reshape(n, -1))
                continue
            score, shares = reconstruction_scores(inputs, out, head.score.metric)
            parts.extend([score[:, None], shares])
        return np.concatenate(parts, axis=1)

    def first_classifier(self, raw: FloatArray) -> FloatArray | None:
        """The first classification head's outputs in RAW, for top-1 agreement; None if none."""
        for head, out in zip(self.heads, self.split(raw), strict=True):
            if head.task.value == "classification":
                return out
        return None
