"""The outbox: outgoing QoS>=1 messages held on disk until the broker acknowledges them.

A message is written here *before* it is handed to the MQTT client and deleted when the broker
acknowledges it, so a disconnect, a daemon restart or a crash (SIGKILL) loses nothing: whatever is
still pending is sent again, in id order, after the next connect. The intended loop
(``edge/delivery/publisher.py``): ``put_many`` from the workers, each of which publishes the
messages it just put itself when nothing older is pending, and otherwise a flusher's
``after(last_sent_id, n)`` → publish; either remembers the message ids; ``ack_many`` when the
broker's PUBACK arrives, ``after(0, n)`` again after a reconnect, and ``expire()`` now and then.
Delivery is at least once: a message whose ack was in flight when the process died is sent twice.

Storage is one SQLite file in WAL mode. ``synchronous=NORMAL`` (the default) survives a process
crash; ``fsync: true`` (``synchronous=FULL``) also survives power loss, at the price of an fsync per
transaction. Ids come from ``AUTOINCREMENT``, so they only ever grow, across deletes and restarts;
the publisher's "send everything after id N" relies on that, and on no other call's ids falling
among those of one ``put_many`` (one writer at a time, under the lock).

Bounds: ``max_bytes`` of payload (the oldest messages are dropped to make room) and ``max_age_s``
(``expire()`` drops older messages). Every drop is counted by reason in ``Outbox.dropped``.

Failures never reach the caller. If the state directory cannot be written (read-only, full disk,
I/O errors), the outbox degrades to a bounded in-memory queue with the same semantics, carries over
the pending messages it can still read, and says why in ``degraded_reason``. It stays in memory
until the daemon restarts; the file is left as it was, so anything it held is sent (again) then. A
corrupt file is moved aside to ``<name>.corrupt-<unix time>`` and replaced by a fresh one
(``moved_aside``).

Prediction counters. ``put_many(messages, SeqMarks(pipeline, {asset: next seq}))`` also records
each asset's next prediction ``seq``; the daemon seeds every pipeline's windows from ``next_seqs``
at start and at each configuration switch, so ``seq`` never goes backwards for an asset
(``floorline.edge.stream.window``). In memory the counters are exact. On disk (table ``seq``) each
is a *reservation*: when a batch's next seq passes the stored value, ``next + _SEQ_RESERVE`` is
stored, in the transaction that stores that batch's predictions. So every prediction committed,
or sent at QoS 0 (the publisher stores before it sends), has a seq below the stored value, and no
crash can break that; after a restart numbers continue from the reservation, skipping at most
``_SEQ_RESERVE`` per asset. Why not the exact counter in every transaction: that is one more page
written to the WAL per batch, measured at 13 to 40 µs per batch (100 µs for 32 assets at QoS 0,
which has no outbox transaction of its own otherwise), against about 0.3 µs for the reservation
check. Numbers are identifiers, not counts (docs/consuming.md): a gap is allowed, a repeat is not.
A corrupt file's counters are salvaged into the fresh one when they can be read. An outbox in
memory keeps them in memory: after a restart the file's reservations (as old as the degradation)
apply, and ``seq`` can repeat numbers published while the outbox was in memory.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from floorline.edge.messages import Outbound

__all__ = ["DROP_REASONS", "OutMessage", "Outbox", "OutboxConfig", "SeqMarks"]

log = logging.getLogger(__name__)

DROP_REASONS = ("max_bytes", "max_age", "memory_full")
"""Keys of ``Outbox.dropped``; all present (at 0) from the start so metrics see every series, and
so the dict never changes size: another thread may copy it while it is counted."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS seq (
    pipeline TEXT NOT NULL,
    asset TEXT NOT NULL,
    next INTEGER NOT NULL,
    PRIMARY KEY (pipeline, asset)
) WITHOUT ROWID;
PRAGMA user_version = 2;
"""
# Version 1 had no `seq` table; the statements above create only what is missing. Readers of
# version 1 (an older floorline after a downgrade) ignore the table.
# The payload is the last column on purpose: reading id/created/length never has to follow a large
# payload's overflow pages. No index on `created`: ages are judged walking from the oldest id
# (see `expire`), which saves an index page write on every insert.

_COLUMNS = "id, topic, payload, qos, retain, created"
_BUSY_TIMEOUT_S = 5.0
# Without a limit a WAL file keeps the size of its largest transaction forever; on a small SD card
# that space is better left free.
_JOURNAL_SIZE_LIMIT = 8 * 1024 * 1024
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26

_Row = tuple[int, str, bytes, int, int, float]
_TAIL_MAX = 1024  # newest messages also kept in memory, so the flusher reads them without SQL
_IN_CHUNK = 500  # ids per DELETE ... IN (...): under SQLite's smallest variable limit (999)
_RETURNING = sqlite3.sqlite_version_info >= (3, 35)
_SEQ_WRITE = "INSERT OR REPLACE INTO seq (pipeline, asset, next) VALUES (?, ?, ?)"
_SEQ_RESERVE = 1024
"""Prediction numbers reserved per stored counter: one counter write per asset per this many
windows (and one after each start); at most this many numbers skipped per asset at a restart."""


class SeqMarks(NamedTuple):
    """One pipeline's prediction counters after a batch: asset → the next ``seq`` to use."""

    pipeline: str
    next_seq: dict[str, int]


class OutboxConfig(BaseModel):
    """Bounds and durability of the outbox."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1,
        description="Payload bytes held at most; beyond, the oldest messages are dropped "
        "(counted as 'max_bytes'). Topics and SQLite's own overhead come on top.",
    )
    max_age_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description="Messages older than this (seconds) are dropped by expire() "
        "(counted as 'max_age').",
    )
    memory_max_messages: int = Field(
        default=10000,
        ge=1,
        description="Messages held at most while the outbox is in memory (no state directory, "
        "or the disk failed); beyond, the oldest are dropped (counted as 'memory_full').",
    )
    fsync: bool = Field(
        default=False,
        description="fsync every transaction (SQLite synchronous=FULL) so messages survive power "
        "loss; off (synchronous=NORMAL) they survive a crash of the process, not of the machine.",
    )


@dataclass(frozen=True, slots=True)
class OutMessage:
    """A message held until the broker acknowledges it."""

    id: int
    """Outbox id: strictly increasing in put order, never reused."""
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float
    """When it was put, from the outbox's clock (epoch seconds)."""


class _CorruptError(sqlite3.DatabaseError):
    """PRAGMA quick_check found damage that a query might only hit much later."""


class Outbox:
    """Outgoing messages held until acknowledged: on disk, or in memory when the disk fails.

    ``path`` None keeps the outbox in memory from the start (nothing survives a restart). All
    methods are thread-safe (workers, the flusher and paho's thread call them); storage failures
    are never raised, they switch ``mode`` to "memory" and set ``degraded_reason``.

    ``_max_page_count`` is for tests only: it caps the file at that many pages (SQLite's
    ``max_page_count``) so a full disk can be produced without filling one.
    """

    def __init__(
        self,
        path: Path | None,
        config: OutboxConfig,
        clock: Callable[[], float] = time.time,
        *,
        _max_page_count: int | None = None,
    ) -> None:
        self.path = path
        self.config = config
        self._clock = clock
        # One connection for every thread: SQLite serialises writers anyway, and a single lock
        # keeps the counters below consistent with the table.
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._memory: OrderedDict[int, OutMessage] = OrderedDict()
        # Disk mode: the newest messages, also in memory. Every pending message with an id of
        # _tail_from or above is in _tail, so `after` past that point needs no query: the flusher
        # reads back what it is about to publish straight after it was put.
        self._tail: OrderedDict[int, OutMessage] = OrderedDict()
        self._tail_from: int | None = None
        self._last_id = 0
        self._depth = 0
        self._bytes = 0
        self._closed = False
        self._warned: set[str] = set()
        self.mode: Literal["disk", "memory"] = "memory"
        """Where messages are held now."""
        self.degraded_reason: str | None = None
        """Why the outbox is in memory although it was given a path; None otherwise."""
        self.moved_aside: Path | None = None
        """Where a corrupt outbox file found at open was moved to."""
        self.dropped: Counter[str] = Counter(dict.fromkeys(DROP_REASONS, 0))
        """Messages dropped unsent, by reason (see ``DROP_REASONS``)."""
        self._seqs: dict[tuple[str, str], int] = {}  # (pipeline, asset) -> next seq, exact
        self._reserved: dict[tuple[str, str], int] = {}  # ... as stored: a reservation
        if path is not None:
            self._open(path, _max_page_count)

    # -- public API ---------------------------------------------------------------------------

    def put_many(self, messages: Sequence[Outbound], seqs: SeqMarks | None = None) -> list[int]:
        """Hold MESSAGES, and record the counters SEQS, in one transaction; the ids, ascending.

        A counter only ever rises: one lower than the recorded one is ignored. On disk a counter
        is written only when it passes its reservation (see the module docstring). ``max_bytes`` is
        enforced afterwards, so a batch larger than the whole bound drops its own oldest messages
        too. Never raises for storage reasons; raises RuntimeError after ``close`` (the message
        would be lost) and sqlite3.ProgrammingError for values of the wrong type.
        """
        if not messages and not seqs:
            return []
        now = self._clock()
        with self._lock:
            if self._closed:
                raise RuntimeError("outbox is closed")
            rows = self._reserve(seqs) if seqs is not None else []
            if not messages and not rows:
                return []
            if self._conn is not None:
                try:
                    ids = self._disk_put(self._conn, messages, now, rows)
                except sqlite3.ProgrammingError:
                    raise
                except sqlite3.DatabaseError as exc:
                    self._degrade(exc)
                else:
                    for pipeline, asset, n in rows:
                        self._reserved[pipeline, asset] = n
                    return ids
            return self._memory_put(messages, now)

    def next_seqs(self, pipeline: str) -> dict[str, int]:
        """PIPELINE's stored counters: asset → the next prediction ``seq`` not yet used."""
        with self._lock:
            return {a: n for (p, a), n in self._seqs.items() if p == pipeline}

    def _reserve(self, seqs: SeqMarks) -> list[tuple[str, str, int]]:
        """Note SEQS' counters; the rows to store: those past their reservation, reserved anew."""
        pipeline, exact, reserved = seqs.pipeline, self._seqs, self._reserved
        rows = []
        for asset, n in seqs.next_seq.items():
            key = (pipeline, asset)
            if n > exact.get(key, 0):
                exact[key] = n
            if n > reserved.get(key, 0) and self._conn is not None:
                rows.append((pipeline, asset, n + _SEQ_RESERVE))
        return rows

    def after(self, last_id: int, limit: int) -> list[OutMessage]:
        """Up to ``limit`` pending messages with an id above ``last_id``, in ascending id order."""
        with self._lock:
            if self._closed or limit <= 0:
                return []
            if self._conn is not None:
                if self._tail_from is not None and last_id + 1 >= self._tail_from:
                    return self._from_tail(last_id, limit)
                try:
                    rows = self._conn.execute(
                        f"SELECT {_COLUMNS} FROM outbox WHERE id > ? ORDER BY id LIMIT ?",  # noqa: S608 - constant columns
                        (last_id, limit),
                    ).fetchall()
                    return [_message(row) for row in rows]
                except sqlite3.ProgrammingError:
                    raise
                except sqlite3.DatabaseError as exc:
                    self._degrade(exc)
            out: list[OutMessage] = []
            # Bounded by memory_max_messages, so a scan is cheap enough and needs no second index.
            for message_id, message in self._memory.items():
                if message_id > last_id:
                    out.append(message)
                    if len(out) == limit:
                        break
            return out

    def _from_tail(self, last_id: int, limit: int) -> list[OutMessage]:
        # From the newest back to LAST_ID: the flusher asks for what follows its cursor, so this
        # walks only the rows it has not published yet, not the ones in flight before them.
        newer: list[OutMessage] = []
        for message_id, message in reversed(self._tail.items()):
            if message_id <= last_id:
                break
            newer.append(message)
        newer.reverse()
        return newer[:limit]

    def _tail_reset(self) -> None:
        """Rows were deleted wholesale (trim, expiry): cover only ids from here on."""
        self._tail.clear()
        self._tail_from = self._last_id + 1

    def ack_many(self, ids: Iterable[int]) -> None:
        """Forget acknowledged messages. Unknown ids (already acked, dropped) are ignored.

        After ``close`` this does nothing, since broker acks may still arrive during shutdown.
        """
        wanted = sorted(set(ids))
        if not wanted:
            return
        with self._lock:
            if self._closed:
                return
            if self._conn is not None:
                try:
                    self._disk_ack(self._conn, wanted)
                except sqlite3.ProgrammingError:
                    raise
                except sqlite3.DatabaseError as exc:
                    self._degrade(exc)  # carries the un-acked rows over; ack them below
                else:
                    return
            for message_id in wanted:
                message = self._memory.pop(message_id, None)
                if message is not None:
                    self._depth -= 1
                    self._bytes -= len(message.payload)

    def expire(self) -> int:
        """Drop messages older than ``max_age_s``; how many were dropped.

        Ages are judged from the oldest id onwards and the walk stops at the first message young
        enough. After the wall clock steps backwards, a message that looks young can therefore hold
        back older ones behind it until it expires itself; ``max_bytes`` bounds the outbox anyway.
        """
        cutoff = self._clock() - self.config.max_age_s
        with self._lock:
            if self._closed:
                return 0
            count = 0
            if self._conn is not None:
                try:
                    count = self._disk_expire(self._conn, cutoff)
                except sqlite3.ProgrammingError:
                    raise
                except sqlite3.DatabaseError as exc:
                    self._degrade(exc)
            if self._conn is None:
                while self._memory:
                    oldest = next(iter(self._memory.values()))
                    if oldest.created >= cutoff:
                        break
                    self._pop_oldest()
                    count += 1
            self._count_drops("max_age", count)
            return count

    def depth(self) -> int:
        """Messages pending (not yet acknowledged)."""
        # Read without the lock: one int read is atomic, and metrics should not wait on an fsync.
        return self._depth

    def pending_bytes(self) -> int:
        """Payload bytes pending; ``max_bytes`` bounds this."""
        # Not named bytes(): in this class body that would shadow the builtin in annotations.
        return self._bytes

    def close(self) -> None:
        """Close the file (SQLite checkpoints the WAL into it). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None
            elif self.path is not None and self._memory:
                log.warning(
                    "outbox %s closed with %d messages held only in memory; they are lost",
                    self.path, len(self._memory),
                )

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- opening ------------------------------------------------------------------------------

    def _open(self, path: Path, max_page_count: int | None) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not _has_sqlite_header(path):
                # Checked before SQLite sees the file: closing a connection to a file it cannot
                # read deletes the -wal, which is worth keeping for a post-mortem.
                self._set_aside(path, "not an SQLite database")
            try:
                if self.moved_aside is None:
                    self._attach(path, max_page_count)
            except sqlite3.DatabaseError as exc:
                if not _is_corrupt(exc):
                    raise
                self._set_aside(path, str(exc))
            if self.moved_aside is not None:
                self._attach(path, max_page_count)
                self._adopt_seqs(self.moved_aside)
        except (OSError, sqlite3.Error) as exc:
            carried: list[OutMessage] = []
            total = 0
            if path.is_file():
                carried, total = self._salvage(path)
            self._enter_memory(f"cannot open {path}: {exc}", carried, total)

    def _set_aside(self, path: Path, why: str) -> None:
        self.moved_aside = _move_aside(path, int(self._clock()))
        log.warning(
            "outbox %s is corrupt (%s): moved it aside to %s, starting a fresh one",
            path, why, self.moved_aside,
        )

    def _attach(self, path: Path, max_page_count: int | None) -> None:
        conn = sqlite3.connect(
            path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {'FULL' if self.config.fsync else 'NORMAL'}")
            conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
            if max_page_count is not None:
                conn.execute(f"PRAGMA max_page_count = {int(max_page_count)}")
            # Reads every page once. Worth it at start-up: damage found here is repaired by moving
            # the file aside; found later it would only degrade the outbox to memory.
            check = conn.execute("PRAGMA quick_check").fetchone()
            if check != ("ok",):
                _raise_corrupt(check)
            if conn.execute("PRAGMA user_version").fetchone()[0] < 2:
                conn.executescript(_SCHEMA)  # new or v1 only: no needless write at every open
            seqs = _read_seqs(conn)
            depth, size = conn.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox"
            ).fetchone()
            seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self.mode = "disk"
        self._depth, self._bytes = int(depth), int(size)
        self._last_id = int(seq[0]) if seq else 0
        self._tail_reset()
        self._merge_seqs(seqs)

    def _merge_seqs(self, seqs: dict[tuple[str, str], int]) -> None:
        for key, n in seqs.items():
            if n > self._seqs.get(key, -1):
                self._seqs[key] = n
            if n > self._reserved.get(key, -1):
                self._reserved[key] = n

    def _adopt_seqs(self, aside: Path) -> None:
        """Carry the counters of a corrupt file moved to ASIDE into the fresh one, if readable."""
        try:
            conn = sqlite3.connect(f"{aside.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
            try:
                found = _read_seqs(conn)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            log.warning("outbox %s: prediction counters unreadable (%s); seq may repeat",
                        aside, exc)
            return
        self._merge_seqs(found)
        if self._conn is not None and found:
            rows = [(p, a, n) for (p, a), n in self._reserved.items()]
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(_SEQ_WRITE, rows)
                self._conn.execute("COMMIT")
            except BaseException:
                _rollback(self._conn)
                raise

    def _salvage(self, path: Path) -> tuple[list[OutMessage], int]:
        # immutable=1 reads a file SQLite would otherwise refuse (no -shm can be created in a
        # read-only directory). It ignores a -wal, which a clean close has already merged.
        uri = f"{path.resolve().as_uri()}?mode=ro&immutable=1"
        try:
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            try:
                with contextlib.suppress(sqlite3.Error):
                    self._merge_seqs(_read_seqs(conn))
                return self._read_newest(conn)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            log.debug("outbox %s: nothing salvaged (%s)", path, exc)
            return [], 0

    def _read_newest(self, conn: sqlite3.Connection) -> tuple[list[OutMessage], int]:
        """The newest pending messages that fit in memory, ascending, and how many there were."""
        total = int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM outbox ORDER BY id DESC LIMIT ?",  # noqa: S608 - constant columns
            (self.config.memory_max_messages,),
        ).fetchall()
        seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        if seq:
            self._last_id = max(self._last_id, int(seq[0]))
        return [_message(row) for row in reversed(rows)], total

    # -- degrading ----------------------------------------------------------------------------

    def _degrade(self, exc: sqlite3.Error) -> None:
        conn, self._conn = self._conn, None
        self._tail.clear()
        self._tail_from = None
        carried: list[OutMessage] = []
        total = self._depth
        if conn is not None:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                carried, total = self._read_newest(conn)
            except sqlite3.Error as read_exc:
                log.debug("outbox %s: pending messages unreadable (%s)", self.path, read_exc)
            finally:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        self._enter_memory(f"{self.path}: {exc}", carried, total)

    def _enter_memory(self, reason: str, carried: list[OutMessage], total: int) -> None:
        self.mode = "memory"
        self.degraded_reason = reason
        self._memory = OrderedDict((m.id, m) for m in carried)
        self._depth = len(carried)
        self._bytes = sum(len(m.payload) for m in carried)
        if carried:
            self._last_id = max(self._last_id, carried[-1].id)
        # Only those that did not fit are counted: unreadable ones are not known to exist.
        self._count_drops("memory_full", max(0, total - len(carried)), warn=False)
        self._trim_memory()
        log.warning(
            "outbox degraded to memory (%s); holding up to %d messages in memory until restart, "
            "%d of %d pending carried over",
            reason, self.config.memory_max_messages, len(carried), total,
        )

    # -- disk ---------------------------------------------------------------------------------

    def _disk_put(
        self,
        conn: sqlite3.Connection,
        messages: Sequence[tuple[str, bytes, int, bool]],
        now: float,
        seqs: list[tuple[str, str, int]],
    ) -> list[int]:
        added = sum(len(m[1]) for m in messages)
        conn.execute("BEGIN IMMEDIATE")
        try:
            last, dropped, freed = self._last_id, 0, 0
            if messages:
                conn.executemany(
                    "INSERT INTO outbox (created, qos, retain, topic, payload) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [(now, qos, int(retain), t, p) for t, p, qos, retain in messages],
                )
                # One writer (this connection, under the lock) in one transaction: AUTOINCREMENT
                # ids of one statement are consecutive, ending at last_insert_rowid().
                last = int(conn.execute("SELECT last_insert_rowid()").fetchone()[0])
                dropped, freed = _trim_oldest(conn, self._bytes + added - self.config.max_bytes)
            if seqs:
                conn.executemany(_SEQ_WRITE, seqs)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        ids = list(range(last - len(messages) + 1, last + 1))
        self._depth += len(ids) - dropped
        self._bytes += added - freed
        self._last_id = last
        if dropped:
            self._tail_reset()
        else:
            tail = self._tail
            for message_id, (topic, payload, qos, retain) in zip(ids, messages, strict=True):
                tail[message_id] = OutMessage(message_id, topic, payload, qos, bool(retain), now)
            while len(tail) > _TAIL_MAX:
                oldest, _ = tail.popitem(last=False)
                self._tail_from = oldest + 1
        self._count_drops("max_bytes", dropped)
        return ids

    def _disk_ack(self, conn: sqlite3.Connection, ids: list[int]) -> None:
        removed = freed = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for at in range(0, len(ids), _IN_CHUNK):
                chunk = ids[at : at + _IN_CHUNK]
                if _RETURNING:
                    marks = ",".join("?" * len(chunk))
                    sizes = conn.execute(
                        f"DELETE FROM outbox WHERE id IN ({marks}) RETURNING length(payload)",  # noqa: S608 - only placeholders
                        chunk,
                    ).fetchall()
                else:  # SQLite before 3.35 (no RETURNING): row by row
                    sizes = []
                    for message_id in chunk:
                        row = conn.execute(
                            "SELECT length(payload) FROM outbox WHERE id = ?", (message_id,)
                        ).fetchone()
                        if row is not None:
                            conn.execute("DELETE FROM outbox WHERE id = ?", (message_id,))
                            sizes.append(row)
                removed += len(sizes)
                freed += sum(int(size) for (size,) in sizes)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        self._depth -= removed
        self._bytes -= freed
        for message_id in ids:
            self._tail.pop(message_id, None)

    def _disk_expire(self, conn: sqlite3.Connection, cutoff: float) -> int:
        conn.execute("BEGIN IMMEDIATE")
        try:
            count = freed = 0
            last: int | None = None
            rows = conn.execute("SELECT id, created, length(payload) FROM outbox ORDER BY id")
            for message_id, created, size in rows:
                if created >= cutoff:
                    break
                count += 1
                freed += size
                last = message_id
            rows.close()
            if last is not None:
                conn.execute("DELETE FROM outbox WHERE id <= ?", (last,))
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        self._depth -= count
        self._bytes -= freed
        if count:
            self._tail_reset()
        return count

    # -- memory -------------------------------------------------------------------------------

    def _memory_put(
        self, messages: Sequence[tuple[str, bytes, int, bool]], now: float
    ) -> list[int]:
        ids: list[int] = []
        for topic, payload, qos, retain in messages:
            self._last_id += 1
            self._memory[self._last_id] = OutMessage(
                self._last_id, topic, bytes(payload), qos, bool(retain), now
            )
            ids.append(self._last_id)
            self._depth += 1
            self._bytes += len(payload)
        self._trim_memory()
        return ids

    def _trim_memory(self) -> None:
        full = 0
        while self._depth > self.config.memory_max_messages:
            self._pop_oldest()
            full += 1
        too_big = 0
        while self._bytes > self.config.max_bytes:
            self._pop_oldest()
            too_big += 1
        self._count_drops("memory_full", full)
        self._count_drops("max_bytes", too_big)

    def _pop_oldest(self) -> None:
        _, message = self._memory.popitem(last=False)
        self._depth -= 1
        self._bytes -= len(message.payload)

    def _count_drops(self, reason: str, count: int, *, warn: bool = True) -> None:
        if count <= 0:
            return
        self.dropped[reason] += count
        if warn and reason not in self._warned:
            self._warned.add(reason)
            log.warning(
                "outbox: dropping the oldest messages (%s); further drops are only counted",
                reason,
            )
        else:
            log.debug("outbox: dropped %d messages (%s)", count, reason)


def _read_seqs(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    """The stored prediction counters; none in a file from before they were kept."""
    try:
        rows = conn.execute("SELECT pipeline, asset, next FROM seq").fetchall()
    except sqlite3.OperationalError:  # no such table (version 1)
        return {}
    return {(str(p), str(a)): int(n) for p, a, n in rows}


def _message(row: _Row) -> OutMessage:
    message_id, topic, payload, qos, retain, created = row
    return OutMessage(message_id, topic, payload, qos, bool(retain), created)


def _trim_oldest(conn: sqlite3.Connection, excess: int) -> tuple[int, int]:
    """Delete the oldest rows until ``excess`` payload bytes are freed; (rows, bytes) deleted."""
    if excess <= 0:
        return 0, 0
    count = freed = 0
    last: int | None = None
    rows = conn.execute("SELECT id, length(payload) FROM outbox ORDER BY id")
    for message_id, size in rows:
        count += 1
        freed += size
        last = message_id
        if freed >= excess:
            break
    rows.close()
    if last is not None:
        conn.execute("DELETE FROM outbox WHERE id <= ?", (last,))
    return count, freed


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite has already rolled back on some errors (SQLITE_FULL among them).
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _raise_corrupt(check: tuple[str] | None) -> None:
    raise _CorruptError(f"quick_check: {check[0] if check else 'no result'}")


def _has_sqlite_header(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            head = file.read(16)
    except FileNotFoundError:
        return True
    return head in (b"", b"SQLite format 3\x00")  # an empty file is an empty database


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    if isinstance(exc, _CorruptError):
        return True
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc)
    return "file is not a database" in text or "malformed" in text


def _move_aside(path: Path, stamp: int) -> Path:
    """Rename a corrupt outbox and its -wal/-shm to ``<name>.corrupt-<stamp>[-wal|-shm]``."""
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
    # Sidecars first: a fresh database next to an old -wal would replay the old frames into it.
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    path.rename(target)
    return target
