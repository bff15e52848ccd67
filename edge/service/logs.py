"""Log output that suits where it goes: the journal under systemd, timestamps on a terminal.

Under systemd, stderr is a stream into journald, which stamps every line itself and reads a
``<N>`` prefix as the syslog priority (``sd-daemon(3)``), so ``journalctl -p warning`` filters and
colours work. systemd tells a service which stream that is with ``$JOURNAL_STREAM``
(``device:inode``); anywhere else (a terminal, a file, a pipe, tests) lines carry their own time:

    journal:   <4>floorline.edge.daemon.daemon: outbox in memory: disk full
    otherwise: 2026-11-28 18:00:00,123 WARNING floorline.edge.daemon.daemon: outbox in memory: disk
    full

A ``RateLimitFilter`` keeps a flood of one message (a broker refusing us every second, a bad
sensor) from drowning the journal: per (logger, message template), the first ``burst`` records
of a window pass, the rest are counted, and one summary says how many were suppressed. Records
that are each a different event (fleet outcomes: another version, another verdict) are limited
per event instead (``DISTINCT_LOGGERS``, or ``extra={"floorline_distinct": True}``). Summaries
come when the window ends, on a timer even if nothing else is logged, and at shutdown.

    setup_logging(config.logging.level)       # once, early in `floorline run`
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

__all__ = [
    "DISTINCT_ATTR",
    "DISTINCT_LOGGERS",
    "HUMAN_FORMAT",
    "JournalFormatter",
    "RateLimitFilter",
    "setup_logging",
    "writes_to_journal",
]

HUMAN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""Terminal and file format:
``2026-11-28 18:00:00,123 INFO floorline.edge.daemon.daemon: message``."""

_LEVELS = {
    "CRITICAL": logging.CRITICAL,
    "ERROR": logging.ERROR,
    "WARNING": logging.WARNING,
    "INFO": logging.INFO,
    "DEBUG": logging.DEBUG,
}

_SUMMARY_ATTR = "floorline_rate_limit_summary"

DISTINCT_ATTR = "floorline_distinct"
"""A record with this attribute true (``extra={DISTINCT_ATTR: True}``) is limited per formatted
message, not per template: each different one is its own event."""
DISTINCT_LOGGERS = ("floorline.edge.fleet",)
"""Loggers (and their children) whose INFO-and-above records are limited per formatted message.
Every fleet outcome shares one template ("fleet: version %s %s: %s"); keyed by the template, an
untrusted key or a rollback would be suppressed after five ordinary outcomes a minute."""
_MAX_KEYS = 4096
"""Windows tracked at most; beyond, distinct records fall back to their template's window, so a
flood of distinct messages cannot grow memory without bound."""


def _syslog_priority(levelno: int) -> int:
    # syslog(3): 2 crit, 3 err, 4 warning, 5 notice, 6 info, 7 debug.
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>name: message``, with no timestamp (journald adds its own)."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The record with its priority prefix on every line.

        journald makes one entry per line and reads the prefix per line: without it, a
        traceback's lines would be logged at the stream's default priority (info).
        """
        prefix = f"<{_syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def writes_to_journal(stream: TextIO) -> bool:
    """Whether STREAM is the journal stream systemd named in ``$JOURNAL_STREAM``.

    Comparing device and inode (not merely seeing the variable) matters: a child process, or a
    stream redirected to a file, inherits the variable while writing somewhere else.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        # No such variable, a malformed one, or a stream without a file descriptor (StringIO).
        return False


@dataclass
class _Window:
    start: float
    passed: int = 1
    suppressed: int = 0
    last: logging.LogRecord | None = None


class RateLimitFilter(logging.Filter):
    """Passes the first BURST records per (logger, message template) per WINDOW_S seconds.

    Records beyond that are dropped and counted. When the window is over, one summary record
    (same logger and level) goes to SINK: ``message repeated N more times in 60 s (first 5
    shown); last: …``. Windows are checked whenever any record passes through (at most once per
    second), so a summary appears even if the message never recurs; ``flush()`` emits what is
    pending (at shutdown).

    Keyed by the template (``record.msg``) rather than the formatted text, so "dead letter from
    pump-01" and "... pump-02" count as one message: the flood is the problem, not its arguments.
    Except for records that are each their own event (``DISTINCT_LOGGERS``, ``DISTINCT_ATTR``):
    those are keyed by their formatted text, so only repeats of the same event are limited.

    With a SINK, a daemon thread (started at the first suppressed record, ended when nothing is
    pending) emits summaries when their window ends even if no record comes by; ``close()`` (at
    shutdown: ``setup_logging``'s handler calls it from ``logging.shutdown``) emits the rest.
    """

    def __init__(
        self,
        burst: int = 5,
        window_s: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sink: Callable[[logging.LogRecord], object] | None = None,
    ) -> None:
        super().__init__()
        if burst < 1 or window_s <= 0:
            raise ValueError("burst must be >= 1 and window_s > 0")
        self.burst = burst
        self.window_s = window_s
        self.sink = sink
        """Where summaries go; ``setup_logging`` sets the handler's ``handle``."""
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, ...], _Window] = {}
        self._next_sweep = clock()
        self._timer: threading.Thread | None = None
        self._closed = threading.Event()

    def filter(self, record: logging.LogRecord) -> bool:
        """True to let RECORD through; False when its window's burst is used up."""
        if getattr(record, _SUMMARY_ATTR, False):
            return True
        template = record.msg if isinstance(record.msg, str) else f"<{type(record.msg).__name__}>"
        key: tuple[str, ...] = (record.name, template)
        if self._distinct(record):
            try:
                key = (record.name, template, record.getMessage())
            except Exception:  # noqa: BLE001 - a bad format is the handler's to report
                key = (record.name, template)
        now = self._clock()
        with self._lock:
            due = self._sweep(now) if now >= self._next_sweep else []
            if len(key) > 2 and key not in self._windows and len(self._windows) >= _MAX_KEYS:
                key = key[:2]
            window = self._windows.get(key)
            if window is None or now - window.start >= self.window_s:
                if window is not None and window.suppressed:
                    due.append(self._summary(window))
                self._windows[key] = _Window(start=now)
                allowed = True
            elif window.passed < self.burst:
                window.passed += 1
                allowed = True
            else:
                window.suppressed += 1
                window.last = record
                allowed = False
                if self.sink is not None and self._timer is None and not self._closed.is_set():
                    self._timer = threading.Thread(
                        target=self._tick, name="log-summaries", daemon=True
                    )
                    self._timer.start()
        # Outside the lock: the sink takes the handler's lock and formats.
        self._emit(due)
        return allowed

    @staticmethod
    def _distinct(record: logging.LogRecord) -> bool:
        if getattr(record, DISTINCT_ATTR, False):
            return True
        if record.levelno < logging.INFO:
            return False
        name = record.name
        return any(name == n or name.startswith(n + ".") for n in DISTINCT_LOGGERS)

    def sweep(self) -> None:
        """Emit the summaries of windows that have ended (the timer calls this)."""
        with self._lock:
            due = self._sweep(self._clock())
        self._emit(due)

    def _tick(self) -> None:
        period = min(1.0, self.window_s)
        while not self._closed.wait(period):
            self.sweep()
            with self._lock:
                if not any(w.suppressed for w in self._windows.values()):
                    self._timer = None  # the next suppressed record starts another
                    return

    def close(self) -> None:
        """Emit every pending summary and stop the timer (at shutdown). Idempotent."""
        self._closed.set()
        self.flush()

    def flush(self) -> None:
        """Emit the summaries of every window that suppressed something, and forget them."""
        with self._lock:
            due = [self._summary(w) for w in self._windows.values() if w.suppressed]
            self._windows.clear()
        self._emit(due)

    def _sweep(self, now: float) -> list[logging.LogRecord]:
        self._next_sweep = now + min(1.0, self.window_s)
        expired = [k for k, w in self._windows.items() if now - w.start >= self.window_s]
        due = []
        for key in expired:
            window = self._windows.pop(key)
            if window.suppressed:
                due.append(self._summary(window))
        return due

    def _summary(self, window: _Window) -> logging.LogRecord:
        last = window.last
        assert last is not None  # noqa: S101 - set whenever suppressed > 0
        summary = logging.LogRecord(
            name=last.name,
            level=last.levelno,
            pathname=last.pathname,
            lineno=last.lineno,
            msg="message repeated %d more times in %.0f s (first %d shown); last: %s",
            args=(window.suppressed, self.window_s, self.burst, last.getMessage()),
            exc_info=None,
            func=last.funcName,
        )
        setattr(summary, _SUMMARY_ATTR, True)
        return summary

    def _emit(self, records: list[logging.LogRecord]) -> None:
        if self.sink is None:
            return
        for record in records:
            self.sink(record)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The console handler; at ``close`` (``logging.shutdown`` at exit) it flushes summaries."""

    limiter: RateLimitFilter | None = None

    def emit(self, record: logging.LogRecord) -> None:
        """Write RECORD, unless the stream was closed under us.

        A late summary (its timer, or a replaced handler flushing) may find the stream gone: a
        redirected stderr closed, a test's capture ended, interpreter exit. Dropping it is right;
        logging's own error report ("--- Logging error ---" and a traceback) is not.
        """
        if getattr(self.stream, "closed", False):
            return
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """Stay quiet if the stream closed between ``emit``'s check and the write (a race)."""
        if getattr(self.stream, "closed", False):
            return
        super().handleError(record)

    def close(self) -> None:
        """Say what was suppressed before the stream goes away."""
        if self.limiter is not None:
            limiter, self.limiter = self.limiter, None
            limiter.close()
        super().close()


def setup_logging(
    level: str | int,
    *,
    stream: TextIO | None = None,
    burst: int = 5,
    window_s: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
) -> logging.Handler:
    """Send the root logger's records to STREAM (default stderr) in the format that suits it.

    Journal format under systemd (see ``writes_to_journal``), human format elsewhere, with a
    ``RateLimitFilter(burst, window_s)`` on the handler. Replaces the console handler that
    ``logging.basicConfig`` or an earlier call installed; other handlers stay. Returns the
    handler (its rate limiter is in ``handler.filters``).
    """
    levelno = _LEVELS.get(level.upper()) if isinstance(level, str) else level
    if levelno is None:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(_LEVELS)}")
    out = sys.stderr if stream is None else stream
    handler = _Handler(out)
    handler.setFormatter(JournalFormatter() if writes_to_journal(out) else
                         logging.Formatter(HUMAN_FORMAT))
    limiter = RateLimitFilter(burst, window_s, clock=clock, sink=handler.handle)
    handler.addFilter(limiter)
    handler.limiter = limiter
    setattr(handler, "floorline_handler", True)  # noqa: B010 - marks what a later call replaces
    root = logging.getLogger()
    for old in list(root.handlers):
        # Exactly StreamHandler: basicConfig's console handler. Subclasses (pytest's capture,
        # file handlers) belong to someone else.
        if getattr(old, "floorline_handler", False) or type(old) is logging.StreamHandler:
            root.removeHandler(old)
            if isinstance(old, _Handler) and old.limiter is not None:
                old.limiter.close()  # its summaries, before they are lost with it
    root.addHandler(handler)
    root.setLevel(levelno)
    return handler
