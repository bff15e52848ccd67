"""The window journal: each asset's partial window, saved before its input is acknowledged.

In durable mode a per-sample input message is acknowledged to the broker only once the samples it
brought are safe: either inside a window whose prediction is in the outbox, or in this journal.
A restarted daemon restores every asset's buffer from here and the broker redelivers whatever was
not acknowledged; sequence numbers let the window drop the samples it already holds.

SQLite in WAL mode: a commit survives a process crash. One row per (pipeline, asset), rewritten
in place, so the file stays the size of the plant, not of the stream.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class WindowJournal:
    """Persisted window state per pipeline and asset. Thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: str | None = None
        """Set when writing failed: durability is then lost, and the state report says so."""
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db: sqlite3.Connection | None = self._open(path)
        except sqlite3.DatabaseError as exc:
            # A corrupt journal loses partial windows only: move it aside and start empty.
            aside = path.with_name(f"{path.name}.corrupt")
            log.warning("window journal %s unreadable (%s); moved to %s", path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                p = Path(f"{path}{suffix}")
                if p.exists():
                    p.replace(Path(f"{aside}{suffix}"))
            self._db = self._open(path)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS window_state ("
            " pipeline TEXT NOT NULL, asset TEXT NOT NULL, state BLOB NOT NULL,"
            " PRIMARY KEY (pipeline, asset))"
        )
        return db

    def save(self, pipeline: str, states: dict[str, bytes]) -> bool:
        """Write STATES in one transaction; False (and ``error`` set) if the disk refused."""
        if not states:
            return True
        with self._lock:
            if self._db is None:
                return False
            try:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR REPLACE INTO window_state VALUES (?, ?, ?)",
                    [(pipeline, asset, state) for asset, state in states.items()],
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if self.error is None:
                    log.error(  # noqa: TRY400 - the reason is in the message, no traceback
                        "window journal %s: write failed (%s); input durability lost",
                        self.path,
                        exc,
                    )
                self.error = str(exc)
                return False
        return True

    def load(self, pipeline: str) -> dict[str, bytes]:
        """Every asset's saved state for PIPELINE."""
        with self._lock:
            if self._db is None:
                return {}
            rows = self._db.execute(
                "SELECT asset, state FROM window_state WHERE pipeline = ?", (pipeline,)
            ).fetchall()
        return {str(a): bytes(s) for a, s in rows}

    def forget(self, pipeline: str) -> None:
        """Drop a pipeline's state (its window spec changed: old buffers no longer fit)."""
        with self._lock:
            if self._db is not None:
                self._db.execute("DELETE FROM window_state WHERE pipeline = ?", (pipeline,))

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
