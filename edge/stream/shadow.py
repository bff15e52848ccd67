"""Comparing a shadow model's outputs with the primary's, window by window: pure statistics.

Heads are paired by name where both models have the head with the same task and width (values per
window, as ``HeadLayout.values`` makes them); two one-head models are paired whatever their
heads' names, under the same condition. Any other head is *incomparable* and reported as such.
Per pair, over the windows both models predicted:

- classification: top-1 agreement (count and share), the disagreements counted by
  (primary label → shadow label), and the mean and max absolute difference of the scores;
- regression: the mean and max absolute difference of the values;
- anomaly: the mean and max absolute difference of the score, and verdict agreement (each side
  against its own threshold), with the disagreements split into primary-only and shadow-only.

A difference that is not a number (a NaN or infinite output on either side) is counted as
``nonfinite`` and left out of the mean and max.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from floorline.edge.bundle.manifest import Head, Manifest
from floorline.edge.stream.heads import HeadLayout

FloatArray = NDArray[np.float32]


@dataclass
class _Pair:
    name: str  # the primary's head name (the report's key)
    shadow_name: str
    task: str
    primary: tuple[int, int]  # columns in the values rows
    shadow: tuple[int, int]
    primary_labels: list[str]
    shadow_labels: list[str]
    primary_limit: float
    shadow_limit: float
    windows: int = 0
    agree: int = 0
    confusion: Counter[tuple[str, str]] = field(default_factory=Counter)
    primary_only: int = 0
    shadow_only: int = 0
    diff_sum: float = 0.0
    diff_n: int = 0
    diff_max: float = 0.0
    nonfinite: int = 0


def _bounds(widths: list[int]) -> list[tuple[int, int]]:
    return [(sum(widths[:i]), sum(widths[: i + 1])) for i in range(len(widths))]


def _labels(head: Head, override: list[str] | None, width: int) -> list[str]:
    labels = override if override is not None else head.labels
    return list(labels) if labels else [str(i) for i in range(width)]


def _limit(head: Head, thresholds: dict[str, float] | None) -> float:
    # As the prediction encoder decides "anomalous": the configured threshold, else the score's.
    table = thresholds if thresholds is not None else (head.thresholds or {})
    return table.get("anomaly", head.score.threshold if head.score is not None else float("inf"))


class ShadowStats:
    """Running comparison of a primary and a shadow model's values, per paired head."""

    def __init__(
        self,
        primary: Manifest,
        shadow: Manifest,
        *,
        labels: list[str] | None = None,
        thresholds: dict[str, float] | None = None,
    ) -> None:
        """LABELS and THRESHOLDS: the pipeline's overrides of a one-head primary (as encoded)."""
        p_heads, s_heads = primary.heads, shadow.heads
        p_widths, s_widths = HeadLayout(primary).widths, HeadLayout(shadow).widths
        p_bounds, s_bounds = _bounds(p_widths), _bounds(s_widths)
        one = len(p_heads) == 1
        by_name = {h.name: i for i, h in enumerate(s_heads)}
        if one and len(s_heads) == 1:
            by_name = {p_heads[0].name: 0}  # one head each: paired whatever their names
        self.pairs: list[_Pair] = []
        self.incomparable: list[dict[str, str]] = []
        paired: set[int] = set()
        for i, head in enumerate(p_heads):
            j = by_name.get(head.name)
            if j is None:
                self.incomparable.append(
                    {"head": head.name, "side": "primary", "reason": "the shadow has no such head"}
                )
                continue
            other = s_heads[j]
            reason = None
            if other.task != head.task:
                reason = f"task {head.task.value} vs {other.task.value}"
            elif p_widths[i] != s_widths[j]:
                reason = f"{p_widths[i]} vs {s_widths[j]} values per window"
            if reason is not None:
                self.incomparable.append({"head": head.name, "side": "both", "reason": reason})
                paired.add(j)
                continue
            paired.add(j)
            self.pairs.append(_Pair(
                name=head.name,
                shadow_name=other.name,
                task=head.task.value,
                primary=p_bounds[i],
                shadow=s_bounds[j],
                primary_labels=_labels(head, labels if one else None, p_widths[i]),
                shadow_labels=_labels(other, None, s_widths[j]),
                primary_limit=_limit(head, thresholds if one else None),
                shadow_limit=_limit(other, None),
            ))
        for j, other in enumerate(s_heads):
            if j not in paired:
                self.incomparable.append(
                    {"head": other.name, "side": "shadow", "reason": "the primary has no such head"}
                )
        self.windows = 0

    def add(self, primary: FloatArray, shadow: FloatArray) -> None:
        """Compare one batch: PRIMARY and SHADOW are values rows (n, …) of the same windows."""
        n = len(primary)
        if len(shadow) != n:
            raise ValueError(f"{len(shadow)} shadow rows for {n} primary rows")
        p_all = primary.reshape(n, -1).astype(np.float64)
        s_all = shadow.reshape(n, -1).astype(np.float64)
        self.windows += n
        for pair in self.pairs:
            p = p_all[:, pair.primary[0] : pair.primary[1]]
            s = s_all[:, pair.shadow[0] : pair.shadow[1]]
            pair.windows += n
            if pair.task == "classification":
                self._classification(pair, p, s)
                self._diff(pair, p, s)
            elif pair.task == "anomaly":
                self._anomaly(pair, p[:, 0], s[:, 0])
                self._diff(pair, p[:, :1], s[:, :1])
            else:
                self._diff(pair, p, s)

    @staticmethod
    def _classification(pair: _Pair, p: NDArray[np.float64], s: NDArray[np.float64]) -> None:
        # The first maximum, or the first NaN, as the encoder and np.argmax pick.
        top_p, top_s = p.argmax(axis=1), s.argmax(axis=1)
        same = top_p == top_s
        pair.agree += int(same.sum())
        for a, b in zip(top_p[~same].tolist(), top_s[~same].tolist(), strict=True):
            pair.confusion[(pair.primary_labels[a], pair.shadow_labels[b])] += 1

    @staticmethod
    def _anomaly(pair: _Pair, p: NDArray[np.float64], s: NDArray[np.float64]) -> None:
        # A score that is not a number is no evidence of normal (as the encoder flags it).
        flag_p = ~(p < pair.primary_limit)
        flag_s = ~(s < pair.shadow_limit)
        pair.agree += int((flag_p == flag_s).sum())
        pair.primary_only += int((flag_p & ~flag_s).sum())
        pair.shadow_only += int((flag_s & ~flag_p).sum())

    @staticmethod
    def _diff(pair: _Pair, p: NDArray[np.float64], s: NDArray[np.float64]) -> None:
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(p - s)
        finite = np.isfinite(diff)
        pair.nonfinite += int(diff.size - finite.sum())
        good = diff[finite]
        if good.size:
            pair.diff_sum += float(good.sum())
            pair.diff_n += int(good.size)
            pair.diff_max = max(pair.diff_max, float(good.max()))

    def report(self) -> dict[str, Any]:
        """Per paired head its figures (see the module), and the incomparable heads."""
        heads: dict[str, Any] = {}
        for pair in self.pairs:
            n = pair.windows
            doc: dict[str, Any] = {"task": pair.task, "shadow_head": pair.shadow_name,
                                   "windows": n}
            if pair.task == "classification":
                doc["top1"] = {"agree": pair.agree, "share": _share(pair.agree, n)}
                confusion: dict[str, dict[str, int]] = {}
                # A copy first (in C, at once): the worker may add a pair meanwhile.
                for (a, b), count in sorted(dict(pair.confusion).items()):
                    confusion.setdefault(a, {})[b] = count
                doc["confusion"] = confusion
            elif pair.task == "anomaly":
                doc["verdict"] = {
                    "agree": pair.agree,
                    "share": _share(pair.agree, n),
                    "primary_only": pair.primary_only,
                    "shadow_only": pair.shadow_only,
                    "primary_threshold": _finite(pair.primary_limit),
                    "shadow_threshold": _finite(pair.shadow_limit),
                }
            doc["abs_diff"] = {
                "mean": pair.diff_sum / pair.diff_n if pair.diff_n else None,
                "max": pair.diff_max if pair.diff_n else None,
                "nonfinite": pair.nonfinite,
            }
            heads[pair.name] = doc
        return {"heads": heads, "incomparable_heads": list(self.incomparable)}


def _share(count: int, total: int) -> float | None:
    return round(count / total, 6) if total else None


def _finite(value: float) -> float | None:
    return value if np.isfinite(value) else None
