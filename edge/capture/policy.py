"""Which windows a pipeline captures: the per-pipeline part, run on its worker thread.

``Capture.offer`` is called once per batch, after the predictions were submitted. It decides per
window (sampling, alerts with the windows before and after them, low confidence, marks, the
rolling keep) and hands the chosen ones to the store's writer thread through a bounded queue,
never blocking: a full queue is a counted drop. Its state (a few recent windows per asset for
"before", counters) lives on the worker thread; ``mark`` may be called from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from floorline.edge.bundle.manifest import Manifest, Task
from floorline.edge.capture.config import CaptureConfig
from floorline.edge.capture.store import Bounds, CaptureStore, Record
from floorline.edge.stream.heads import HeadLayout
from floorline.edge.stream.window import Window

log = logging.getLogger(__name__)

_LOG_EVERY_S = 30.0
_MAX_ASSETS = 4096  # assets whose recent windows are held for "before" (oldest asset out)
_MAX_MARKS = _MAX_ASSETS  # assets with a mark pending (oldest mark out)
_SWEEP_S = 10.0
MARK_EXPIRE_S = 600.0
"""How long a mark waits for its asset's next window, and an ``after`` countdown for the next
ones (the pipeline sets its drift ``window_s``): an asset that went silent and comes back much
later does not have its first windows stored as ``drift`` / ``after_drift``."""


class _Heads:
    """Per batch, vectorised: each window's top label and score, and whether it alerts."""

    def __init__(self, manifest: Manifest, labels: list[str] | None,
                 thresholds: dict[str, float] | None) -> None:
        heads = manifest.heads
        widths = HeadLayout(manifest).widths
        one = len(heads) == 1
        self.parts: list[tuple[int, int, Task, list[str], list[tuple[int, float]], float]] = []
        start = 0
        for head, width in zip(heads, widths, strict=True):
            names = (labels if labels is not None and one else head.labels) or []
            limits = thresholds if thresholds is not None and one else head.thresholds
            anomaly = limits.get("anomaly", head.score.threshold if head.score else float("inf"))
            cols = [(names.index(k), v) for k, v in limits.items() if k in names]
            self.parts.append((start, start + width, head.task, names, cols, anomaly))
            start += width

    def summarize(self, out: NDArray[np.float32]
                  ) -> tuple[list[str | None], NDArray[np.float64], NDArray[np.bool_]]:
        n = len(out)
        rows = out.reshape(n, -1)
        labels: list[str | None] = [None] * n
        top = np.full(n, np.nan)
        alert = np.zeros(n, dtype=bool)
        found = False
        for start, stop, task, names, cols, anomaly in self.parts:
            values = rows[:, start:stop]
            if task is Task.CLASSIFICATION:
                for col, limit in cols:
                    alert |= values[:, col] >= limit
                if not found and names:
                    best = np.argmax(values, axis=1)
                    top = values[np.arange(n), best].astype(np.float64)
                    labels = [names[i] for i in best.tolist()]
                    found = True
            elif task is Task.ANOMALY:
                alert |= values[:, 0] >= anomaly
        return labels, top, alert


class Capture:
    """One pipeline's capture policy, feeding the gateway's ``CaptureStore``."""

    def __init__(self, config: CaptureConfig, store: CaptureStore, *, gateway: str,
                 pipeline: str, manifest: Manifest, sha256: str,
                 labels: list[str] | None = None,
                 thresholds: dict[str, float] | None = None) -> None:
        self.config = config
        self.pipeline = pipeline
        self._store = store
        self._heads = _Heads(manifest, labels, thresholds)
        # In force only from ``activate``: a configuration refused after this pipeline was
        # built must not apply its bounds to the running pipeline's stored windows.
        self.bounds = Bounds(
            gateway=gateway,
            model={"name": manifest.name, "version": manifest.version, "sha256": sha256},
            max_bytes=config.max_bytes, max_age_s=config.max_age_s,
            keep_recent_s=config.keep_recent_s,
        )
        self._acc = 0.0  # sampling accumulator: every 1/sample_rate-th window, deterministic
        self._recent: dict[str, deque[tuple[Window, float, str | None, float]]] = {}
        self.expire_s = MARK_EXPIRE_S
        # asset -> (windows still to keep, why, until: monotonic time)
        self._after: dict[str, tuple[int, str, float]] = {}
        self._swept = 0.0
        self._marks: dict[str, tuple[str, float]] = {}  # asset -> (reason, until)
        self._mark_all: tuple[str, float] | None = None  # every asset's: (reason, until)
        self._marks_lock = threading.Lock()
        self._last_error = 0.0

    def activate(self) -> None:
        """Put this pipeline's bounds in force in the store (``Pipeline.start``).

        Before any ``offer``; from here its stored windows are pruned to them.
        """
        self.bounds = self._store.register(self.pipeline, self.bounds)

    def mark(self, reason: str, asset: str | None = None) -> None:
        """Capture the windows around now for REASON (e.g. ``drift``), ASSET's or every asset's.

        Without ASSET: every asset of the pipeline's next batch and every asset that has
        windows held (``before`` > 0). Any thread. Takes effect at the pipeline's next batch:
        the ``before`` windows held for the asset are stored, its first window in that batch
        (with the asset's name) is stored for REASON, and its next ``after`` windows are.
        A mark (and the ``after`` countdown) lapses after ``expire_s``; at most _MAX_MARKS
        assets' marks wait (the oldest goes).
        """
        until = time.monotonic() + self.expire_s
        with self._marks_lock:
            if asset is None:
                self._mark_all = (reason, until)
                return
            self._marks.pop(asset, None)  # re-marked: now the newest
            self._marks[asset] = (reason, until)
            if len(self._marks) > _MAX_MARKS:
                self._marks.pop(next(iter(self._marks)))

    def offer(self, batch: Sequence[Window], out: NDArray[np.float32]) -> None:
        """Store what this batch's policy picks; never blocks, never raises.

        Called after the batch's predictions were submitted: a failure here must not fail them
        (it is counted ``capture_errors`` and logged, rate-limited).
        """
        try:
            self._offer(batch, out)
        except Exception:
            self.bounds.counters["errors"] += 1
            now = time.monotonic()
            if now - self._last_error >= _LOG_EVERY_S:
                self._last_error = now
                log.exception("pipeline %s: capture failed for a batch (predictions unaffected)",
                              self.pipeline)

    def _offer(self, batch: Sequence[Window], out: NDArray[np.float32]) -> None:
        cfg = self.config
        labels, top, alert = self._heads.summarize(out)
        if not cfg.alerts:
            alert[:] = False
        low = (top < cfg.low_confidence if cfg.low_confidence is not None
               else np.zeros(len(batch), dtype=bool))
        now = time.monotonic()
        marks: dict[str, tuple[str, float]] = {}
        everyone: str | None = None
        if self._marks or self._mark_all is not None:
            with self._marks_lock:
                marks, self._marks = self._marks, {}
                mark_all, self._mark_all = self._mark_all, None
            marks = {a: m for a, m in marks.items() if m[1] > now}
            if mark_all is not None and mark_all[1] > now:
                everyone = mark_all[0]
        after = self._after
        if after and now - self._swept >= _SWEEP_S:
            self._swept = now
            for asset in [a for a, (_, _, until) in after.items() if until <= now]:
                del after[asset]
        ts = time.time()
        keep_all = cfg.keep_recent_s > 0
        top_list = top.tolist()
        out_records: list[Record] = []
        until = now + self.expire_s
        if everyone is not None:
            # This batch's assets: their first window here is the marked one (below). Other
            # assets seen lately: their held windows now, their next ones after.
            for w in batch:
                marks.setdefault(w.asset, (everyone, until))
            for asset in list(self._recent):
                if asset in marks:
                    continue
                self._flush_before(asset, everyone, out_records)
                if cfg.after:
                    after[asset] = (cfg.after, everyone, until)
        rate, before = cfg.sample_rate, cfg.before
        flagged = (low | alert).tolist()
        for i, w in enumerate(batch):
            self._acc += rate
            sampled = self._acc >= 1.0 - 1e-9  # 0.1 ten times is 0.9999999999999999
            if not (sampled or flagged[i] or after or marks):
                # The common case, kept cheap: nothing to store, at most held for "before".
                if keep_all:
                    out_records.append(self._record(w, ts, labels[i], top_list[i], False, "recent",
                                                 keep=False))
                elif before:
                    self._hold(w, ts, labels[i], top_list[i])
                continue
            reasons: list[str] = []
            if sampled:
                self._acc -= 1.0
                reasons.append("sample")
            if low[i]:
                reasons.append("low_confidence")
            marked = marks.pop(w.asset, None)
            trigger = "alert" if alert[i] else marked[0] if marked is not None else None
            if trigger is not None:
                reasons.append(trigger)
                self._flush_before(w.asset, trigger, out_records)
                if cfg.after:
                    after[w.asset] = (cfg.after, trigger, until)
            elif w.asset in after:
                left, why, lapse = after[w.asset]
                if lapse > now:
                    reasons.append(f"after_{why}")
                if left <= 1 or lapse <= now:
                    del after[w.asset]
                else:
                    after[w.asset] = (left - 1, why, lapse)
            if reasons:
                out_records.append(self._record(w, ts, labels[i], top_list[i], bool(alert[i]),
                                             ",".join(reasons), keep=True))
            elif keep_all:
                out_records.append(self._record(w, ts, labels[i], top_list[i], False, "recent",
                                             keep=False))
            elif before:
                self._hold(w, ts, labels[i], top_list[i])
        self._store.put_records(out_records)  # one hand-off per batch; drops counted there
        if marks:  # assets not in this batch: at their next window, until theirs lapse
            with self._marks_lock:
                for asset, mark in marks.items():
                    self._marks.setdefault(asset, mark)
                while len(self._marks) > _MAX_MARKS:
                    self._marks.pop(next(iter(self._marks)))

    def _record(self, w: Window, ts: float, label: str | None, score: float, alert: bool,
                reasons: str, *, keep: bool) -> Record:
        summary: dict[str, Any] = {"label": label, "alert": alert}
        if score == score:  # noqa: PLR0124 - not NaN: a classifier's top score
            summary["score"] = score
        return Record(self.pipeline, w.asset, w.index, w.start, w.end, ts, w.values, reasons,
                      summary, keep=keep, model=self.bounds.model)

    def _hold(self, w: Window, ts: float, label: str | None, score: float) -> None:
        # A plain tuple: a Record is made only if an alert or mark follows.
        ring = self._recent.get(w.asset)
        if ring is None:
            if len(self._recent) >= _MAX_ASSETS:
                self._recent.pop(next(iter(self._recent)))
            ring = self._recent[w.asset] = deque(maxlen=self.config.before)
        ring.append((w, ts, label, score))

    def _flush_before(self, asset: str, why: str, into: list[Record]) -> None:
        ring = self._recent.pop(asset, None)
        for w, ts, label, score in ring or ():
            into.append(self._record(w, ts, label, score, False, f"before_{why}", keep=True))

    def counters(self) -> dict[str, int]:
        """For the pipeline's stats: captured, dropped_* (this pipeline's)."""
        counters = dict(self.bounds.counters)  # one C-level copy: the writer adds keys
        return {f"capture_{k}": v for k, v in counters.items()}
