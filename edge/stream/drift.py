"""Input drift: live windows compared with the calibration data the bundle was converted with.

What is compared. Per window and per input feature (channel): the *mean* and the *std* of its raw
samples (``std`` only for windows of 2 samples or more). Not the raw samples themselves: samples
inside a window are strongly correlated (a vibration waveform), so their histogram carries little
more than the window's own statistics, costs a window's worth of work per window, and its noise
is hard to bound. The window is the unit the model sees and windows are close to independent, so
a histogram of per-window statistics has the noise of a plain sample of windows (bounded below).
A shifted mean (a sensor offset, another operating point) moves the ``mean`` histogram; a changed
variance (vibration energy, a loose mount, a noisy cable) moves the ``std`` one, by far more than
the same change moves a histogram of raw samples. Besides, the model's own outputs: a
classification head's top-1 class, an anomaly score, a regression value. Those are reported, never
alarmed on: a shift in predictions is what a model that works shows when the machine changes.

How. The bundle's ``reference`` (``manifest.ReferenceSummary``, made by the converter from its
data files) holds each statistic's bin edges (deciles of the calibration data) and counts. The
gateway bins each batch's statistics with the same edges (:func:`bin_index`, the one
implementation both sides use) into time buckets of ``interval_s``; the last ``window_s`` of
buckets are the live distribution (bounded memory: buckets x statistics x bins integers, per asset
with ``per_asset``). At the first batch of each interval it compares them with the reference:
the population stability index (:func:`psi`, counts smoothed by half a window per bin, so an
empty bin is finite) and the Kolmogorov-Smirnov distance of the binned distributions
(:func:`ks`). The largest measure over the input statistics is the *score*; at or above
``level`` the scope (the pipeline, or an asset) drifts: its predictions carry ``drift: true``, and
one alert goes out (``topics.alerts``, ``floorline/{gateway}/alerts/{pipeline}``) and
``on_drift`` is called (data capture keeps the windows around it). It clears below 0.8 x level
(hysteresis: a score hovering at the level does not flap), with one ``cleared`` message; a new
alert for the same scope waits at least ``window_s`` after the previous one.

Noise: with B bins, n live and m reference windows, PSI of two samples of one distribution is
about (B - 1)(1/n + 1/m) on average (chi-square); with 10 bins, 200 windows (``min_windows``) and
2000 reference windows that is ~0.05, against a level of 0.25.

Everything here is plain objects and numpy. With ``workers: N > 1`` (floorline.edge.daemon.workers)
the pipeline still has one monitor, in the reader: each worker process's monitor only counts
(:meth:`DriftMonitor.as_worker`: the cells and tallies, the per-window work) and hands its count
deltas up with its next report (:meth:`DriftMonitor.take_counts`); the reader's monitor adds them
(:meth:`DriftMonitor.merge`), judges, publishes and alerts, and its verdict
(:meth:`DriftMonitor.verdict`) goes back down to the workers, which flag predictions from it
(:meth:`DriftMonitor.set_verdict`): one hand-off later than with one process.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from floorline.edge.bundle.manifest import Manifest, ReferenceHistogram, ReferenceSummary, Task
from floorline.edge.messages import Outbound
from floorline.edge.stream.heads import HeadLayout
from floorline.edge.stream.window import Window

log = logging.getLogger(__name__)

__all__ = [
    "ALERT_TOPIC",
    "STATS_TOPIC",
    "Counts",
    "DriftConfig",
    "DriftMonitor",
    "Verdict",
    "bin_index",
    "ks",
    "make_monitor",
    "psi",
    "window_statistics",
]

STATS_TOPIC = "floorline/{gateway}/drift/{pipeline}"
"""Retained, QoS 0: the latest drift measures, every ``interval_s`` while windows arrive (the
default of ``topics.drift``)."""
ALERT_TOPIC = "floorline/{gateway}/alerts/{pipeline}"
"""QoS 1, not retained: one message when a scope starts to drift, one when it cleared (the
default of ``topics.alerts``)."""

SMOOTHING = 0.5
"""Pseudo-count added to every bin before PSI: an empty bin gives a finite, bounded term."""
CLEAR_RATIO = 0.8
"""A drifting scope clears when its score falls below CLEAR_RATIO x level."""
DEFAULT_LEVEL = {"psi": 0.25, "ks": 0.2}
_TOP = 3  # statistics named in an alert
_REPORT_ASSETS = 20  # drifting assets listed in a stats message at most
_LOG_EVERY_S = 60.0
_FLUSH_WINDOWS = 32  # windows counted together at least (fewer wait for the next batches)

Counts = dict[int, tuple[int, NDArray[np.int64], tuple[str, ...], NDArray[np.int64],
                         NDArray[np.int64]]]
"""A worker's count deltas, per time bucket: (windows, (S, B) counts of the pipeline, the assets
counted (per_asset, else none), their windows (A,), their counts (A, S, B))."""
Verdict = tuple[bool, frozenset[str]]
"""What flags predictions: whether the pipeline drifts, and (per_asset) the drifting assets."""


class DriftConfig(BaseModel):
    """Input drift detection against the bundle's reference summary (docs/monitoring.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = Field(
        default=True,
        description="Compare live windows with the bundle's calibration summary (bundles "
        "converted without one run with drift detection off, said once in the log).",
    )
    measure: Literal["psi", "ks"] = Field(
        default="psi",
        description="What the level applies to: population stability index or "
        "Kolmogorov-Smirnov distance (both are published).",
    )
    level: float | None = Field(
        default=None, gt=0,
        description="Score at or above which the input drifts; default 0.25 (psi) or 0.2 (ks).",
    )
    window_s: float = Field(
        default=600.0, gt=0, description="Sliding period of live windows compared (seconds)."
    )
    interval_s: float = Field(
        default=60.0, gt=0,
        description="Seconds between evaluations and stats messages (the period's time step).",
    )
    min_windows: int = Field(
        default=200, ge=10,
        description="Windows the period must hold before it is judged (fewer: too noisy).",
    )
    per_asset: bool = Field(
        default=False,
        description="Judge each asset on its own windows (flags and alerts per asset) besides "
        "the whole pipeline's.",
    )
    max_assets: int = Field(
        default=1000, ge=1, le=100_000,
        description="per_asset: assets tracked at most; the least recently seen is forgotten.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DriftConfig:
        if self.interval_s > self.window_s:
            raise ValueError(
                f"interval_s {self.interval_s:g} is longer than window_s {self.window_s:g}; "
                "make interval_s at most window_s"
            )
        if self.window_s / self.interval_s > 1000:
            raise ValueError("window_s / interval_s must be at most 1000 (buckets kept)")
        return self

    @property
    def threshold(self) -> float:
        """The level in force (the configured one or the measure's default)."""
        return self.level if self.level is not None else DEFAULT_LEVEL[self.measure]


# -- the measures (also used by the converter) -------------------------------------------------


def padded_edges(histograms: Sequence[ReferenceHistogram]) -> NDArray[np.float64]:
    """(S, E) edges, each row padded with +inf to the longest (no value reaches a pad)."""
    width = max(len(h.edges) for h in histograms)
    out = np.full((len(histograms), width), np.inf)
    for i, h in enumerate(histograms):
        out[i, : len(h.edges)] = h.edges
    return out


def bin_index(values: NDArray[Any], edges: NDArray[np.float64]) -> NDArray[np.intp]:
    """(n, S) bin numbers of VALUES (n, S) against EDGES (S, E): how many edges are <= v.

    Bin i holds edges[i-1] <= v < edges[i]; NaN lands in bin 0. One vectorised comparison.
    """
    hits = values[:, :, None] >= edges[None, :, :]
    out: NDArray[np.intp] = hits.sum(axis=2, dtype=np.intp)
    return out


def _smoothed(counts: NDArray[Any], mask: NDArray[np.bool_]) -> NDArray[np.float64]:
    c = np.where(mask, counts + SMOOTHING, 0.0)
    out: NDArray[np.float64] = c / c.sum(axis=-1, keepdims=True)
    return out


def psi(reference: NDArray[Any], live: NDArray[Any], bins: NDArray[Any] | None = None) -> (
    NDArray[np.float64]
):
    """Population stability index per row of counts (S, B): sum (l - r) ln(l / r).

    Both are smoothed by SMOOTHING per bin; BINS (S,) says how many bins of each row are real
    (default all), the rest is padding.
    """
    ref, cur = np.atleast_2d(reference), np.atleast_2d(live)
    nb = np.full(len(ref), ref.shape[1]) if bins is None else np.asarray(bins)
    mask = np.arange(ref.shape[1])[None, :] < nb[:, None]
    r, lv = _smoothed(ref, mask), _smoothed(cur, mask)
    terms = np.where(mask, (lv - r) * np.log(np.where(mask, lv, 1.0) / np.where(mask, r, 1.0)), 0)
    out: NDArray[np.float64] = terms.sum(axis=1)
    return out


def ks(reference: NDArray[Any], live: NDArray[Any]) -> NDArray[np.float64]:
    """Kolmogorov-Smirnov distance per row of counts (S, B): max |CDF_live - CDF_ref| at edges."""
    ref, cur = np.atleast_2d(reference).astype(np.float64), np.atleast_2d(live).astype(np.float64)
    rc = np.cumsum(ref, axis=1) / np.maximum(ref.sum(axis=1, keepdims=True), 1.0)
    lc = np.cumsum(cur, axis=1) / np.maximum(cur.sum(axis=1, keepdims=True), 1.0)
    out: NDArray[np.float64] = np.abs(lc - rc).max(axis=1)
    return out


def window_statistics(raw: NDArray[Any], with_std: bool) -> tuple[NDArray[np.float64], ...]:
    """Per window and feature of RAW (n, W, F): (mean,) or (mean, std), each (n, F)."""
    x = raw.astype(np.float64)
    mean = x.sum(axis=1) / x.shape[1]
    if not with_std:
        return (mean,)
    d = x - mean[:, None, :]  # centred first: exact for an offset far larger than the spread
    return mean, np.sqrt(np.einsum("nwf,nwf->nf", d, d) / x.shape[1])


# -- the reference, as arrays ------------------------------------------------------------------


class Plan:
    """How a bundle's reference histograms are read from windows and head values."""

    def __init__(self, reference: ReferenceSummary, manifest: Manifest) -> None:
        """Raise ValueError if REFERENCE does not fit MANIFEST's input and heads."""
        features = [f.name for f in manifest.input.features]
        window = manifest.input.window
        layout = HeadLayout(manifest)
        starts = [sum(layout.widths[:i]) for i in range(len(layout.widths))]
        heads = {h.name: (h, s, w) for h, s, w in zip(manifest.heads, starts, layout.widths,
                                                        strict=True)}
        hs = reference.histograms
        self.histograms = hs
        self.inputs: list[tuple[int, int, int]] = []  # (column, feature, 0 mean | 1 std)
        self.values: list[tuple[int, int]] = []  # (column, value index in a head-values row)
        self.classes: list[tuple[int, int, int]] = []  # (column, start, stop)
        for col, h in enumerate(hs):
            if h.kind == "input":
                if h.name not in features:
                    raise ValueError(f"reference names input feature {h.name!r}, not the model's")
                if h.statistic == "std" and window < 2:
                    raise ValueError("reference has a std for windows of 1 sample")
                self.inputs.append((col, features.index(h.name), int(h.statistic == "std")))
                continue
            if h.name not in heads:
                raise ValueError(f"reference names head {h.name!r}, not the model's")
            head, start, width = heads[h.name]
            if h.statistic == "class":
                if head.task is not Task.CLASSIFICATION or len(h.counts) != width:
                    raise ValueError(f"reference: head {h.name} has no {len(h.counts)} classes")
                self.classes.append((col, start, start + width))
            else:
                if h.column >= width:
                    raise ValueError(f"reference: head {h.name} has no value {h.column}")
                self.values.append((col, start + h.column))
        self.with_std = any(kind for _, _, kind in self.inputs)
        # Index arrays made once: per batch, one fancy-indexed copy per kind of statistic.
        self._pick = [
            (np.asarray([c for c, _, k in self.inputs if k == kind], dtype=np.intp),
             np.asarray([f for _, f, k in self.inputs if k == kind], dtype=np.intp))
            for kind in (0, 1)
        ]
        self.edges = padded_edges(hs)
        self.width = self.edges.shape[1] + 1
        self.bins = np.asarray([len(h.edges) + 1 for h in hs])
        self._offsets = (np.arange(len(hs)) * self.width)[None, :]
        self._size = len(hs) * self.width
        self.reference = np.zeros((len(hs), self.width), dtype=np.int64)
        for i, h in enumerate(hs):
            self.reference[i, : len(h.counts)] = h.counts
        self.is_input = np.asarray([h.kind == "input" for h in hs])
        self.labels = [f"{h.name}.{h.statistic}" + (f".{h.column}" if h.column else "")
                       for h in hs]

    def statistics(self, raw: NDArray[Any], values: NDArray[Any] | None) -> NDArray[np.float64]:
        """(n, S): every statistic of windows RAW (n, W, F) and their head VALUES (n, V)."""
        n = len(raw)
        out = np.zeros((n, len(self.histograms)))
        stats = window_statistics(raw.reshape(n, -1, raw.shape[-1]), self.with_std)
        for (cols, feats), block in zip(self._pick, stats, strict=False):
            if len(cols):
                out[:, cols] = block[:, feats]
        if values is not None:
            for col, index in self.values:
                out[:, col] = values[:, index]
            for col, start, stop in self.classes:
                # A class index c sits between edges c - 0.5 and c + 0.5: its own bin.
                out[:, col] = np.argmax(values[:, start:stop], axis=1)
        return out

    def cells(self, raw: NDArray[Any], values: NDArray[Any] | None) -> NDArray[np.intp]:
        """(n, S): each window's bin of each statistic, as an index into a flat (S * B) array."""
        out: NDArray[np.intp] = bin_index(self.statistics(raw, values), self.edges) + self._offsets
        return out

    def tally(self, cells: NDArray[np.intp]) -> NDArray[np.int64]:
        """(S, B) counts of CELLS (rows of ``cells``)."""
        return np.bincount(cells.ravel(), minlength=self._size).reshape(-1, self.width)

    def counts(self, raw: NDArray[Any], values: NDArray[Any] | None) -> NDArray[np.int64]:
        """(S, B) counts of windows RAW's statistics in the reference's bins."""
        return self.tally(self.cells(raw, values))


# -- the live side -----------------------------------------------------------------------------


class _Ring:
    """Counts in time buckets: the last K buckets make the sliding period."""

    __slots__ = ("buckets", "counts", "current", "windows")

    def __init__(self, k: int, shape: tuple[int, int]) -> None:
        self.counts = np.zeros((k, *shape), dtype=np.int64)
        self.windows = np.zeros(k, dtype=np.int64)
        self.buckets = k
        self.current = -1  # bucket number (time // interval) the last add went to

    def advance(self, bucket: int) -> None:
        if bucket == self.current:
            return
        if self.current < 0 or bucket - self.current >= self.buckets:
            self.counts[:] = 0
            self.windows[:] = 0
        else:
            for b in range(self.current + 1, bucket + 1):
                self.counts[b % self.buckets] = 0
                self.windows[b % self.buckets] = 0
        self.current = bucket

    def add(self, bucket: int, counts: NDArray[np.int64], windows: int) -> None:
        if 0 <= bucket < self.current:
            # Counts a worker sent after another's of a later bucket (workers: N): into their
            # own bucket while it is in the period, else dropped (the period moved past them).
            if self.current - bucket < self.buckets:
                self.counts[bucket % self.buckets] += counts
                self.windows[bucket % self.buckets] += windows
            return
        self.advance(bucket)
        self.counts[bucket % self.buckets] += counts
        self.windows[bucket % self.buckets] += windows

    def total(self) -> tuple[NDArray[np.int64], int]:
        return self.counts.sum(axis=0), int(self.windows.sum())


@dataclass
class _Scope:
    """The pipeline, or one asset: its live counts and its alarm state."""

    ring: _Ring
    drifting: bool = False
    alerted: bool = False
    next_alert: float = 0.0
    score: float | None = None
    last: dict[str, Any] = field(default_factory=dict)


class DriftMonitor:
    """One pipeline's drift detection (in the process that runs its windows)."""

    def __init__(self, config: DriftConfig, plan: Plan, *, gateway: str, pipeline: str,
                 wall: Any = time.time, stats_topic: str = STATS_TOPIC,
                 alert_topic: str = ALERT_TOPIC) -> None:
        self.config = config
        self.plan = plan
        self.level = config.threshold
        self._gateway = gateway
        self._pipeline = pipeline
        self._wall = wall
        # K buckets make the period; one more is the interval being filled when it is judged.
        self._k = max(1, math.ceil(config.window_s / config.interval_s - 1e-9)) + 1
        self._shape = (len(plan.histograms), plan.width)
        self.whole = _Scope(_Ring(self._k, self._shape))
        self.assets: dict[str, _Scope] = {}
        self._bucket = -1
        self._pending: list[tuple[Sequence[Window], NDArray[Any], NDArray[Any] | None]] = []
        self._pending_n = 0
        self.alerts = 0
        self.evaluations = 0
        self.errors = 0
        self._error_log_at = 0.0
        self._worker = False
        self._deltas: dict[int, tuple[list[Any], dict[str, list[Any]]]] = {}
        self._verdict: Verdict = (False, frozenset())
        self.stats_topic = stats_topic.format(gateway=gateway, pipeline=pipeline)
        self.alert_topic = alert_topic.format(gateway=gateway, pipeline=pipeline)
        self.on_drift: Callable[[str | None], None] | None = None
        """Called with the asset (None: the whole pipeline) when a scope's alert goes out, on the
        thread that observes; the pipeline's data capture sets it (``Capture.mark``)."""
        self.document: dict[str, Any] = {"status": "collecting", "windows": 0,
                                          "level": self.level, "measure": config.measure}
        """The latest evaluation (replaced whole: other threads may read it any time)."""

    # -- per batch (the pipeline's worker) ---------------------------------------------------

    def flagged(self, asset: str) -> bool:
        """Whether ASSET's predictions carry ``drift: true`` now."""
        if self._worker:  # the reader's verdict, as its last hand-off brought it
            drifting, assets = self._verdict
            return asset in assets if self.config.per_asset else drifting
        if self.config.per_asset:
            scope = self.assets.get(asset)
            return scope is not None and scope.drifting
        return self.whole.drifting

    def observe(self, windows: Sequence[Window], raw: NDArray[Any], values: NDArray[Any] | None,
                now: float) -> list[Outbound]:
        """Count a batch: RAW (n, W, F) windows, their head VALUES (n, V).

        At an interval's first batch, evaluate first and return the stats message and any
        alerts. Never raises (counted, logged).
        """
        return self._guarded(lambda: self._observe(windows, raw, values, now), now)

    def _guarded(self, work: Callable[[], list[Outbound]], now: float) -> list[Outbound]:
        """WORK's messages; on any error none, counted and logged at most every minute."""
        try:
            return work()
        except Exception:  # monitoring must never cost a prediction
            self.errors += 1
            if now >= self._error_log_at:
                log.exception("pipeline %s: drift detection failed (%d times); predictions "
                              "go on", self._pipeline, self.errors)
                self._error_log_at = now + _LOG_EVERY_S
            return []

    def _observe(self, windows: Sequence[Window], raw: NDArray[Any], values: NDArray[Any] | None,
                 now: float) -> list[Outbound]:
        bucket = int(now // self.config.interval_s)
        out: list[Outbound] = []
        if self._bucket >= 0 and bucket != self._bucket:
            if self._worker:
                self._flush()  # into the bucket they arrived in; the reader judges
            else:
                out = self.evaluate(now, bucket)
        self._bucket = bucket
        # Small batches wait for company: numpy's per-call cost dominates below a few dozen
        # windows. Exact all the same: they are counted before the next evaluation, in their
        # own bucket.
        self._pending.append((windows, raw, values))
        self._pending_n += len(raw)
        if self._pending_n >= _FLUSH_WINDOWS:
            self._flush()
        return out

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._pending_n = self._pending, [], 0
        windows, raw, values = pending[0]
        if len(pending) > 1:
            windows = [w for p in pending for w in p[0]]
            raw = np.concatenate([p[1] for p in pending])
            values = None if values is None else np.concatenate([p[2] for p in pending])
        cells = self.plan.cells(raw, values)
        counts = self.plan.tally(cells)
        if self._worker:
            self._count(windows, cells, self._bucket, counts)
            return
        self.whole.ring.add(self._bucket, counts, len(raw))
        if self.config.per_asset:
            self._per_asset(windows, cells, self._bucket, counts)

    def _per_asset(self, windows: Sequence[Window], cells: NDArray[np.intp], bucket: int,
                   whole: NDArray[np.int64]) -> None:
        for asset, counts, n in self._by_asset(windows, cells, whole):
            self._asset_scope(asset).ring.add(bucket, counts, n)

    def _by_asset(self, windows: Sequence[Window], cells: NDArray[np.intp],
                  whole: NDArray[np.int64]) -> list[tuple[str, NDArray[np.int64], int]]:
        rows: dict[str, list[int]] = {}
        for i, w in enumerate(windows):
            rows.setdefault(w.asset, []).append(i)
        # The batch's bins, counted per asset: statistics are computed once per batch.
        return [(asset, whole if len(idx) == len(cells) else self.plan.tally(cells[idx]), len(idx))
                for asset, idx in rows.items()]

    def _asset_scope(self, asset: str) -> _Scope:
        scope = self.assets.pop(asset, None)  # re-inserted last: least recently seen first
        if scope is None:
            if len(self.assets) >= self.config.max_assets:
                del self.assets[next(iter(self.assets))]
            scope = _Scope(_Ring(self._k, self._shape))
        self.assets[asset] = scope
        return scope

    # -- workers: N > 1 (floorline.edge.daemon.workers) --------------------------------------

    def as_worker(self) -> None:
        """Count only, in a worker process: the reader's monitor judges (``merge``).

        ``observe`` then never evaluates nor returns messages; ``take_counts`` gives what it
        counted since the last call, and ``flagged`` answers from ``set_verdict``.
        """
        self._worker = True
        self.on_drift = None

    def _count(self, windows: Sequence[Window], cells: NDArray[np.intp], bucket: int,
               counts: NDArray[np.int64]) -> None:
        entry = self._deltas.get(bucket)
        if entry is None:
            entry = self._deltas[bucket] = ([0, np.zeros(self._shape, dtype=np.int64)], {})
        whole, assets = entry
        whole[0] += len(cells)
        whole[1] += counts
        if self.config.per_asset:
            for asset, c, n in self._by_asset(windows, cells, counts):
                cell = assets.get(asset)
                if cell is None:
                    assets[asset] = [n, c.copy()]
                else:
                    cell[0] += n
                    cell[1] += c

    def take_counts(self) -> Counts:
        """A worker's counts since the last call, per time bucket (empty: none)."""
        try:
            self._flush()
        except Exception:  # as observe: monitoring never costs a prediction
            self.errors += 1
            self._pending, self._pending_n = [], 0
            log.exception("pipeline %s: drift counting failed", self._pipeline)
        deltas, self._deltas = self._deltas, {}
        out: Counts = {}
        for bucket, ((n, counts), assets) in deltas.items():
            names = tuple(assets)
            ns = np.fromiter((assets[a][0] for a in names), dtype=np.int64, count=len(names))
            per = (np.stack([assets[a][1] for a in names]) if names
                   else np.zeros((0, *self._shape), dtype=np.int64))
            out[bucket] = (n, counts, names, ns, per)
        return out

    def merge(self, counts: Counts, now: float) -> list[Outbound]:
        """Add a worker's COUNTS (``take_counts``) in the reader; the messages to send.

        As ``observe`` does with a batch: the first counts of a later interval evaluate first.
        Counts of an earlier bucket than another worker's last (a report that came later) go
        into their own bucket. Never raises (counted, logged).
        """
        return self._guarded(lambda: self._merge(counts, now), now)

    def _merge(self, counts: Counts, now: float) -> list[Outbound]:
        out: list[Outbound] = []
        for bucket in sorted(counts):
            n, whole, names, ns, per = counts[bucket]
            if bucket > self._bucket:
                if self._bucket >= 0:
                    out += self.evaluate(now, bucket)
                self._bucket = bucket
            self.whole.ring.add(bucket, whole, n)
            if self.config.per_asset:
                for asset, an, ac in zip(names, ns.tolist(), per, strict=True):
                    self._asset_scope(asset).ring.add(bucket, ac, an)
        return out

    def verdict(self) -> Verdict:
        """The reader's judgement, as the workers flag predictions from it."""
        if not self.config.per_asset:
            return (self.whole.drifting, frozenset())
        return (self.whole.drifting,
                frozenset(a for a, scope in self.assets.items() if scope.drifting))

    def set_verdict(self, verdict: Verdict) -> None:
        """A worker's flags from now on: the reader's latest ``verdict``."""
        self._verdict = verdict

    # -- per interval ------------------------------------------------------------------------

    def evaluate(self, now: float, bucket: int | None = None) -> list[Outbound]:
        """Judge every scope on its period's counts; the stats message and alerts to send."""
        self._flush()  # into the bucket they arrived in
        bucket = self._bucket if bucket is None else bucket
        self.evaluations += 1
        wall = self._wall()
        out: list[Outbound] = []
        whole = self._judge(self.whole, bucket)
        if not self.config.per_asset:
            out += self._alarm(self.whole, None, now, wall)
        drifting_assets: list[tuple[float, str]] = []
        for asset, scope in list(self.assets.items()):
            self._judge(scope, bucket)
            if scope.ring.total()[1] == 0:  # nothing in the period: forgotten
                del self.assets[asset]
                continue
            out += self._alarm(scope, asset, now, wall)
            if scope.drifting and scope.score is not None:
                drifting_assets.append((scope.score, asset))
        doc: dict[str, Any] = {
            "gateway": self._gateway, "pipeline": self._pipeline, "ts": round(wall, 3),
            "measure": self.config.measure, "level": self.level,
            "period_s": self.config.window_s, **whole,
            "drifting": self.whole.drifting if not self.config.per_asset else bool(
                drifting_assets),
            "alerts": self.alerts,
        }
        if self.config.per_asset:
            drifting_assets.sort(reverse=True)
            doc["assets"] = {"tracked": len(self.assets), "drifting": len(drifting_assets),
                             "top": {a: round(s, 4) for s, a in drifting_assets[:_REPORT_ASSETS]}}
        self.document = doc
        out.insert(0, Outbound(self.stats_topic, orjson.dumps(doc), 0, True))
        return out

    def _judge(self, scope: _Scope, bucket: int) -> dict[str, Any]:
        scope.ring.advance(bucket)  # buckets older than the period leave it
        counts, n = scope.ring.total()
        plan = self.plan
        summary: dict[str, Any] = {"windows": n}
        if n < self.config.min_windows:
            scope.score = None
            summary["status"] = "collecting"
            scope.last = summary
            return summary
        p = psi(plan.reference, counts, plan.bins)
        k = ks(plan.reference, counts)
        measure = p if self.config.measure == "psi" else k
        inputs = np.flatnonzero(plan.is_input)
        scope.score = float(measure[inputs].max()) if len(inputs) else 0.0
        features: dict[str, dict[str, dict[str, float]]] = {}
        outputs: dict[str, dict[str, float]] = {}
        for i, h in enumerate(plan.histograms):
            entry = {"psi": round(float(p[i]), 4), "ks": round(float(k[i]), 4)}
            if h.kind == "input":
                features.setdefault(h.name, {})[h.statistic] = entry
            else:
                outputs[plan.labels[i]] = entry
        summary.update(status="ok", score=round(scope.score, 4), features=features,
                       outputs=outputs)
        if scope.score >= self.level:
            scope.drifting = True
        elif scope.score < self.level * CLEAR_RATIO:
            scope.drifting = False
        summary["status"] = "drift" if scope.drifting else "ok"
        ranked = sorted(((float(measure[i]), i) for i in inputs), reverse=True)[:_TOP]
        summary["top"] = [
            {"feature": plan.histograms[i].name, "statistic": plan.histograms[i].statistic,
             "psi": round(float(p[i]), 4), "ks": round(float(k[i]), 4)}
            for _, i in ranked
        ]
        scope.last = summary
        return summary

    def _alarm(self, scope: _Scope, asset: str | None, now: float, wall: float) -> list[Outbound]:
        state = None
        if scope.drifting and not scope.alerted and now >= scope.next_alert:
            scope.alerted, scope.next_alert, state = True, now + self.config.window_s, "drift"
            self.alerts += 1
        elif not scope.drifting and scope.alerted:
            scope.alerted, state = False, "cleared"
        if state is None:
            return []
        last = scope.last
        where = f"asset {asset}" if asset else "the pipeline"
        if state == "drift":
            if self.on_drift is not None:
                try:
                    self.on_drift(asset)
                except Exception:  # the alert and the stats message go out all the same
                    self.errors += 1
                    if now >= self._error_log_at:  # per_asset: one alert per asset, rate-limited
                        log.exception("pipeline %s: the drift hook failed (%d errors); the alert "
                                      "goes out", self._pipeline, self.errors)
                        self._error_log_at = now + _LOG_EVERY_S
            top = last.get("top", [{}])[0]
            log.warning(
                "pipeline %s: input drift on %s: %s %.3g >= level %.3g (%s %s, %d windows in "
                "%gs); predictions carry drift: true", self._pipeline, where,
                self.config.measure, last.get("score", 0.0), self.level, top.get("feature"),
                top.get("statistic"), last.get("windows", 0), self.config.window_s,
            )
        else:
            log.info("pipeline %s: input drift on %s cleared (%s %.3g)", self._pipeline, where,
                     self.config.measure, last.get("score", 0.0))
        message = {
            "gateway": self._gateway, "pipeline": self._pipeline, "asset": asset,
            "kind": "drift", "state": state, "ts": round(wall, 3),
            "measure": self.config.measure, "level": self.level, "score": last.get("score"),
            "windows": last.get("windows"), "period_s": self.config.window_s,
            "top": last.get("top", []),
        }
        return [Outbound(self.alert_topic, orjson.dumps(message), 1, False)]


def make_monitor(config: DriftConfig, manifest: Manifest, *, gateway: str, pipeline: str,
                 stats_topic: str = STATS_TOPIC,
                 alert_topic: str = ALERT_TOPIC) -> DriftMonitor | None:
    """The pipeline's monitor, or None (disabled, or no usable reference: said once, INFO).

    STATS_TOPIC, ALERT_TOPIC: the templates (``topics.drift``, ``topics.alerts``).
    """
    if not config.enabled:
        return None
    if manifest.reference is None:
        log.info("pipeline %s: drift detection off: bundle %s %s has no reference summary "
                 "(convert it with calibration data to get one)", pipeline, manifest.name,
                 manifest.version)
        return None
    try:
        plan = Plan(manifest.reference, manifest)
    except ValueError as exc:
        log.warning("pipeline %s: drift detection off: bundle %s %s: %s", pipeline,
                    manifest.name, manifest.version, exc)
        return None
    return DriftMonitor(config, plan, gateway=gateway, pipeline=pipeline,
                        stats_topic=stats_topic, alert_topic=alert_topic)
