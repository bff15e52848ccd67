"""The capture store: raw windows in one SQLite file, written by one thread, bounded.

Why SQLite (as the outbox): crash-safe (WAL), one file, indexed by time for labels and age, and
cheap enough off the prediction path: the writer inserts a whole drained queue in one
transaction (measured in docs/monitoring.md). Segment files would need their own index and
recovery code for no gain at these rates.

The prediction path never touches the file: ``Capture.offer`` (policy.py) puts records on a
bounded queue with ``put_nowait`` and counts a drop when it is full. The writer thread drains the
queue, inserts, applies labels, and prunes each pipeline to its bounds: older than ``max_age_s``,
unlabelled rolling-keep windows older than ``keep_recent_s``, then the oldest (rolling-keep
first) beyond ``max_bytes``. The file itself is capped by SQLite's ``max_page_count`` at the
pipelines' ``max_bytes`` total plus a quarter (indexes, metadata): an insert beyond fails like a
full disk would. A full disk (or that cap) fails the transaction: its windows are counted as
dropped (``disk_full``), the oldest are evicted to make room, and capture goes on; prediction
never sees it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

log = logging.getLogger(__name__)

QUEUE_WINDOWS = 1024
"""Records the writer may have waiting; beyond, ``offer`` drops (counted ``queue_full``)."""
_LOG_EVERY_S = 30.0
_MAX_LABELS = 1000  # labels kept in memory for windows that arrive after the label
_EVICT_CHUNK = 64
_RECOUNT_S = 10.0
_AGE_EVERY_S = 1.0
_PAGE = 4096
_WAL_PAGES = 256  # autocheckpoint: the WAL stays near 1 MiB
_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY,
    pipeline TEXT NOT NULL, asset TEXT NOT NULL, seq INTEGER NOT NULL,
    start REAL, end REAL, ts REAL NOT NULL, t REAL NOT NULL,
    gateway TEXT NOT NULL, model TEXT NOT NULL, summary TEXT NOT NULL,
    reasons TEXT NOT NULL, label TEXT, keep INTEGER NOT NULL,
    samples INTEGER NOT NULL, features INTEGER NOT NULL, bytes INTEGER NOT NULL,
    data BLOB NOT NULL,
    UNIQUE (pipeline, asset, seq)
);
CREATE INDEX IF NOT EXISTS windows_asset_t ON windows (asset, t);
CREATE INDEX IF NOT EXISTS windows_pipeline ON windows (pipeline, keep, id);
CREATE INDEX IF NOT EXISTS windows_age ON windows (pipeline, keep, ts);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY, asset TEXT NOT NULL, pipeline TEXT, t0 REAL NOT NULL,
    t1 REAL NOT NULL, label TEXT NOT NULL, received REAL NOT NULL
);
PRAGMA user_version = 1;
"""
_UPSERT = """
INSERT INTO windows (pipeline, asset, seq, start, end, ts, t, gateway, model, summary, reasons,
                     label, keep, samples, features, bytes, data)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (pipeline, asset, seq) DO UPDATE SET
    reasons = CASE WHEN instr(',' || reasons || ',', ',' || excluded.reasons || ',')
                   THEN reasons ELSE reasons || ',' || excluded.reasons END,
    keep = max(keep, excluded.keep),
    label = coalesce(excluded.label, label)
"""


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~3 us more
class Record:
    """One window to store, as ``Capture.offer`` hands it over (built on the worker thread)."""

    pipeline: str
    asset: str
    seq: int
    start: float | None
    end: float | None
    ts: float
    values: NDArray[np.float32]
    reasons: str
    summary: dict[str, Any]
    keep: bool
    """False: kept only by ``keep_recent_s`` (dropped first, and after that period)."""
    model: dict[str, str]
    """The model that predicted it (name, version, sha256): the record's own, as a reload may
    register another model for the pipeline while this one still waits in the queue."""


@dataclass(frozen=True)
class Label:
    """An operator's label for an asset's windows from T0 to T1 (epoch seconds)."""

    asset: str
    t0: float
    t1: float
    label: str
    pipeline: str | None = None


@dataclass
class Bounds:
    """One pipeline's bounds and provenance, registered by its ``Capture``."""

    gateway: str
    model: dict[str, str]
    max_bytes: int
    max_age_s: float
    keep_recent_s: float
    stored_bytes: int = 0
    stored: int = 0
    counters: Counter[str] = field(default_factory=Counter)
    """captured, dropped_<why> (never stored), evicted_<bound> (stored, then removed), errors."""
    reasons: Counter[str] = field(default_factory=Counter)
    """Windows stored per reason kept (a window kept for two reasons counts under each)."""


class _Handoff:
    """A bounded hand-off to the writer: records count against WINDOWS, a batch in one lock.

    ``queue.Queue`` costs a lock and a notify per window; a batch's records go in at once here.
    """

    def __init__(self, windows: int) -> None:
        self.maxsize = windows
        self.count = 0  # records waiting
        self.others = 0  # labels waiting
        self.busy = False  # the writer holds a drain it has not finished
        self._items: list[Record | Label | None] = []
        self._cv = threading.Condition()

    def put(self, records: list[Record]) -> list[Record]:
        """Queue what fits of RECORDS; returns those that did not (to be counted as drops)."""
        with self._cv:
            room = self.maxsize - self.count
            taken, left = (records, []) if len(records) <= room else (
                records[:max(room, 0)], records[max(room, 0):])
            if taken:
                self._items.extend(taken)
                self.count += len(taken)
                self._cv.notify()
        return left

    def put_other(self, item: Label | None) -> bool:
        """Queue a label (at most _MAX_LABELS waiting: a flood is refused) or the stop mark."""
        with self._cv:
            if item is not None and self.others >= _MAX_LABELS:
                return False
            self.others += item is not None
            self._items.append(item)
            self._cv.notify()
            return True

    def take(self) -> list[Record | Label | None]:
        """Everything waiting (blocks until something is); the writer calls ``done`` after."""
        with self._cv:
            while not self._items:
                self._cv.wait()
            items, self._items = self._items, []
            self.count = self.others = 0
            self.busy = True
            return items

    def done(self) -> None:
        with self._cv:
            self.busy = False
            self._cv.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: not self._items and not self.busy, timeout)

    def qsize(self) -> int:
        return self.count


class CaptureStore:
    """The gateway's capture file and its writer thread (one per daemon)."""

    def __init__(self, path: Path, *, queue_windows: int = QUEUE_WINDOWS) -> None:
        self.path = path
        self.queue = _Handoff(queue_windows)
        self.error: str | None = None
        """Why the store is unusable (windows are then counted dropped ``unavailable``)."""
        self.dropped = Counter[str]()
        self.labels_applied = 0
        self._bounds: dict[str, Bounds] = {}
        self._labels: dict[str, list[Label]] = {}  # asset -> its labels, for later windows
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # bounds registry (worker threads) vs the writer
        self._thread: threading.Thread | None = None
        self._opened = self._closed = False
        self._last_log = 0.0
        self._recounted = 0.0
        self._aged = 0.0

    # -- any thread ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open the file (once; at the first pipeline built with ``capture``).

        At build time, off the prediction path and before ``floorline run`` forks: an unusable
        file is reported before the first window.
        """
        with self._lock:
            if not self._opened:
                self._opened = True
                self._conn = self._open()

    def register(self, pipeline: str, bounds: Bounds) -> Bounds:
        """Put PIPELINE's bounds in force (when its pipeline starts, ``Capture.activate``).

        Not at build: a configuration refused after its pipelines were built (another one failed)
        must leave the running pipeline's bounds, hence its stored windows, as they were.
        """
        self.open()
        with self._lock:
            old = self._bounds.get(pipeline)
            if old is not None:  # a new generation: same rows, new bounds
                bounds.stored, bounds.stored_bytes = old.stored, old.stored_bytes
                bounds.counters, bounds.reasons = old.counters, old.reasons
            elif self._conn is not None and self._thread is None:
                # Rows from an earlier run; with the writer running, its next recount does it.
                try:
                    bounds.stored, bounds.stored_bytes = self._conn.execute(
                        "SELECT count(*), coalesce(sum(bytes), 0) FROM windows "
                        "WHERE pipeline = ?", (pipeline,)).fetchone()
                except sqlite3.Error:
                    self._recounted = 0.0
            else:
                self._recounted = 0.0
            self._bounds[pipeline] = bounds
        return bounds

    def _start(self) -> None:
        # The writer starts with the first item, not at build: `floorline run` forks worker
        # processes when no other thread runs (floorline.edge.daemon.workers), after the build.
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
                self._thread.start()

    def put(self, item: Record | Label) -> bool:
        """Queue one ITEM for the writer (never blocks); False (counted) if it is full."""
        if isinstance(item, Label):
            if not self.queue.put_other(item):
                self.dropped["label_queue_full"] += 1
                return False
            if self._thread is None:
                self._start()
            return True
        return not self.put_records([item])

    def put_records(self, records: list[Record]) -> int:
        """Queue a batch's RECORDS (never blocks); returns how many were dropped (counted)."""
        if not records:
            return 0
        if self.error is not None:
            self._drop(records[0].pipeline, "unavailable", len(records))
            return len(records)
        left = self.queue.put(records)
        if self._thread is None:
            self._start()
        if left:
            self._drop(left[0].pipeline, "queue_full", len(left))
        return len(left)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written (tests, export after stop)."""
        if self._thread is None:
            self._start()
        return self.queue.wait_idle(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, stop the writer, close the file."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self.queue.put_other(None)
            thread.join(timeout)
            if thread.is_alive():
                log.warning("capture: the writer did not finish in %.0f s; queued windows are "
                            "lost", timeout)
        self._thread = None
        if self._conn is not None and (thread is None or not thread.is_alive()):
            self._conn.close()
            self._conn = None

    def stats(self) -> dict[str, dict[str, object]]:
        """Per pipeline: windows, bytes, counters and ``reasons`` (stored per reason kept).

        Counters: captured, errors, dropped_* (never stored), evicted_* (removed by a bound).
        """
        with self._lock:
            return {
                name: {"windows": b.stored, "bytes": b.stored_bytes, **b.counters,
                       "reasons": dict(b.reasons)}
                for name, b in self._bounds.items()
            }

    def _drop(self, pipeline: str, reason: str, n: int = 1) -> None:
        with self._lock:  # worker threads and the writer both count drops
            self.dropped[reason] += n
            b = self._bounds.get(pipeline)
            if b is not None:
                b.counters[f"dropped_{reason}"] += n
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            log.warning("capture: windows dropped (%s so far: %s); predictions are unaffected",
                        reason, self.dropped[reason])

    # -- the writer thread --------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection | None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA wal_autocheckpoint = {_WAL_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit = {_WAL_PAGES * _PAGE}")
            conn.executescript(_SCHEMA)
            for name, b in self._bounds.items():
                b.stored, b.stored_bytes = conn.execute(
                    "SELECT count(*), coalesce(sum(bytes), 0) FROM windows WHERE pipeline = ?",
                    (name,)).fetchone()
        except (OSError, sqlite3.Error) as exc:
            self.error = f"capture store {self.path} unusable: {exc}"
            log.warning("%s; windows are counted as dropped, predictions are unaffected",
                        self.error)
            return None
        return conn

    def _cap_pages(self, conn: sqlite3.Connection, total: int) -> None:
        pages = (total + total // 4) // _PAGE + 64
        conn.execute(f"PRAGMA max_page_count = {int(pages)}")

    def _run(self) -> None:
        conn = self._conn
        capped = 0
        while True:
            batch = self.queue.take()
            stop = any(i is None for i in batch)
            try:
                if conn is not None:
                    with self._lock:  # a reload may change a pipeline's max_bytes
                        total = sum(b.max_bytes for b in self._bounds.values())
                    if total != capped:
                        capped = total
                        self._cap_pages(conn, total)
                    self._write(conn, [i for i in batch if i is not None])
                else:
                    for i in batch:
                        if isinstance(i, Record):
                            self._drop(i.pipeline, "unavailable")
            except Exception:  # the writer must outlive any one batch
                log.exception("capture: writing a batch failed")
            finally:
                self.queue.done()
            if stop:
                return

    def _write(self, conn: sqlite3.Connection, items: list[Record | Label]) -> None:
        records = [i for i in items if isinstance(i, Record)]
        labels = [i for i in items if isinstance(i, Label)]
        if records:
            try:
                self._insert(conn, records)
            except sqlite3.Error as exc:
                self._rollback(conn)
                reason = "disk_full" if "full" in str(exc) else "write_failed"
                for r in records:
                    self._drop(r.pipeline, reason)
                if reason == "disk_full":
                    self._evict_oldest(conn)
        for lab in labels:
            try:
                self._label(conn, lab)
            except sqlite3.Error as exc:  # noqa: PERF203 - labels are rare
                self._rollback(conn)
                self.dropped["label_failed"] += 1
                log.warning("capture: label %r for %s not stored: %s", lab.label, lab.asset, exc)
        try:
            self._prune(conn, time.time())
        except sqlite3.Error as exc:
            self._rollback(conn)
            log.debug("capture: prune failed: %s", exc)

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.debug("capture: rollback failed")

    def _label_of(self, r: Record, t: float) -> str | None:
        for lab in reversed(self._labels.get(r.asset, ())):  # the latest label wins
            if (lab.asset == r.asset and lab.t0 <= t <= lab.t1
                    and lab.pipeline in (None, r.pipeline)):
                return lab.label
        return None

    def _insert(self, conn: sqlite3.Connection, records: list[Record]) -> None:
        rows = []
        added: Counter[str] = Counter()
        reasons: Counter[tuple[str, str]] = Counter()
        added_bytes: Counter[str] = Counter()
        for r in records:
            b = self._bounds.get(r.pipeline)
            if b is None:
                continue
            data = np.ascontiguousarray(r.values, dtype=np.float32)
            data = data.reshape(len(data), -1) if data.ndim else data.reshape(1, 1)
            blob = data.tobytes()
            summary = orjson.dumps(r.summary).decode()
            t = r.end if r.end is not None else r.ts
            label = self._label_of(r, t)
            size = len(blob) + len(summary) + len(r.asset) + 64
            samples, features = data.shape
            why = r.reasons + (",label" if label else "")
            for reason in why.split(","):
                reasons[r.pipeline, reason] += 1
            rows.append((r.pipeline, r.asset, r.seq, r.start, r.end, r.ts, t, b.gateway,
                         orjson.dumps(r.model).decode(), summary, why, label,
                         int(r.keep or label is not None), samples, features, size, blob))
            added[r.pipeline] += 1
            added_bytes[r.pipeline] += size
        conn.execute("BEGIN")
        conn.executemany(_UPSERT, rows)
        conn.execute("COMMIT")
        with self._lock:
            for name, n in added.items():
                b = self._bounds[name]
                b.counters["captured"] += n
                b.stored += n
                b.stored_bytes += added_bytes[name]
            for (name, reason), n in reasons.items():
                self._bounds[name].reasons[reason] += n
        # Upserts of windows already stored over-count here; the next recount corrects it.

    def _label(self, conn: sqlite3.Connection, lab: Label) -> None:
        kept = self._labels.setdefault(lab.asset, [])
        kept.append(lab)
        del kept[:-_MAX_LABELS]
        if len(self._labels) > _MAX_LABELS:  # assets: the one labelled longest ago goes
            self._labels.pop(next(iter(self._labels)))
        conn.execute("BEGIN")
        conn.execute("INSERT INTO labels (asset, pipeline, t0, t1, label, received) "
                     "VALUES (?, ?, ?, ?, ?, ?)",
                     (lab.asset, lab.pipeline, lab.t0, lab.t1, lab.label, time.time()))
        # Windows labelled now (not already): ``reasons["label"]`` counts each window once.
        newly = conn.execute(
            "SELECT pipeline, count(*) FROM windows WHERE asset = ? AND t BETWEEN ? AND ? "
            "AND (? IS NULL OR pipeline = ?) AND NOT instr(',' || reasons || ',', ',label,') "
            "GROUP BY pipeline",
            (lab.asset, lab.t0, lab.t1, lab.pipeline, lab.pipeline)).fetchall()
        cur = conn.execute(
            "UPDATE windows SET label = ?, keep = 1, "
            "reasons = CASE WHEN instr(',' || reasons || ',', ',label,') THEN reasons "
            "ELSE reasons || ',label' END "
            "WHERE asset = ? AND t BETWEEN ? AND ? AND (? IS NULL OR pipeline = ?)",
            (lab.label, lab.asset, lab.t0, lab.t1, lab.pipeline, lab.pipeline))
        conn.execute("COMMIT")
        with self._lock:
            for pipeline, n in newly:
                b = self._bounds.get(pipeline)
                if b is not None:
                    b.reasons["label"] += n
        self.labels_applied += 1
        log.info("capture: label %r applied to %d stored windows of %s (%.0f to %.0f)",
                 lab.label, cur.rowcount, lab.asset, lab.t0, lab.t1)

    def _prune(self, conn: sqlite3.Connection, now: float) -> None:
        # Totals are kept from each insert and delete; an exact recount (a scan of the
        # pipeline's rows) runs at most every _RECOUNT_S, to correct upserts counted twice.
        recount = now - self._recounted >= _RECOUNT_S
        if recount:
            self._recounted = now
        aged = now - self._aged >= _AGE_EVERY_S  # age bounds need no finer grain
        if aged:
            self._aged = now
        with self._lock:
            bounds = list(self._bounds.items())
        for name, b in bounds:
            conn.execute("BEGIN")
            gone = []
            evicted: Counter[str] = Counter()  # counted once committed
            if aged:  # both by the (pipeline, keep, ts) index
                for keep in (0, 1):
                    gone += conn.execute(
                        "DELETE FROM windows WHERE pipeline = ? AND keep = ? AND ts < ? "
                        "RETURNING bytes", (name, keep, now - b.max_age_s)).fetchall()
                old = len(gone)
                gone += conn.execute(
                    "DELETE FROM windows WHERE pipeline = ? AND keep = 0 AND ts < ? "
                    "RETURNING bytes", (name, now - b.keep_recent_s)).fetchall()
                evicted["evicted_max_age"] += old
                evicted["evicted_keep_recent"] += len(gone) - old
            stored, size = b.stored - len(gone), b.stored_bytes - sum(g[0] for g in gone)
            if recount:
                stored, size = conn.execute(
                    "SELECT count(*), coalesce(sum(bytes), 0) FROM windows WHERE pipeline = ?",
                    (name,)).fetchone()
            while size > b.max_bytes and stored > 0:
                # Oldest out, rolling-keep windows first.
                gone = conn.execute(
                    "DELETE FROM windows WHERE id IN (SELECT id FROM windows WHERE pipeline = ? "
                    "ORDER BY keep, id LIMIT ?) RETURNING bytes", (name, _EVICT_CHUNK)).fetchall()
                if not gone:
                    stored = size = 0
                    break
                stored -= len(gone)
                size -= sum(g[0] for g in gone)
                evicted["evicted_max_bytes"] += len(gone)
            conn.execute("COMMIT")
            with self._lock:
                b.stored, b.stored_bytes = stored, size
                b.counters.update(+evicted)  # only the bounds that removed any

    def _evict_oldest(self, conn: sqlite3.Connection) -> None:
        # The disk (or the page cap) is full: make room for the next batch, oldest out.
        try:
            conn.execute("BEGIN")
            gone = conn.execute("DELETE FROM windows WHERE id IN (SELECT id FROM windows "
                                "ORDER BY keep, id LIMIT ?) RETURNING pipeline",
                                (_EVICT_CHUNK,)).fetchall()
            conn.execute("COMMIT")
            with self._lock:
                for (pipeline,) in gone:
                    b = self._bounds.get(pipeline)
                    if b is not None:
                        b.counters["evicted_disk_full"] += 1
        except sqlite3.Error as exc:
            self._rollback(conn)
            log.debug("capture: cannot evict on a full disk: %s", exc)
