"""Log format under journald and elsewhere, and the rate limiter, with an injected clock."""

from __future__ import annotations

import io
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from floorline.edge.service.logs import RateLimitFilter, setup_logging, writes_to_journal

HUMAN_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\w+) ([\w.]+): (.*)")


def human(line: str) -> tuple[str, ...]:
    """(level, logger, message) of a human-format line; fails the test for any other line."""
    match = HUMAN_LINE.fullmatch(line)
    assert match is not None, f"not a human-format log line: {line!r}"
    return match.groups()


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def journal_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> io.TextIOWrapper:
    """A file standing in for the journal stream: $JOURNAL_STREAM names its device and inode."""
    f = (tmp_path / "journal").open("w+")
    st = os.fstat(f.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    return f


def test_journal_stream_gets_syslog_priorities_and_no_timestamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with journal_file(tmp_path, monkeypatch) as f:
        setup_logging("DEBUG", stream=f)
        log = logging.getLogger("edge.test_journal")
        log.debug("d %d", 1)
        log.info("i")
        log.warning("w")
        log.error("e")
        log.critical("c")
        f.seek(0)
        lines = f.read().splitlines()
    assert lines == [
        "<7>edge.test_journal: d 1",
        "<6>edge.test_journal: i",
        "<4>edge.test_journal: w",
        "<3>edge.test_journal: e",
        "<2>edge.test_journal: c",
    ]


def test_every_traceback_line_carries_the_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with journal_file(tmp_path, monkeypatch) as f:
        setup_logging("INFO", stream=f)
        try:
            int("boom")
        except ValueError:
            logging.getLogger("edge.test_tb").exception("inference failed")
        f.seek(0)
        lines = f.read().splitlines()
    assert len(lines) > 3
    assert lines[0] == "<3>edge.test_tb: inference failed"
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ValueError: invalid literal for int() with base 10: 'boom'"


def test_journal_variable_for_another_stream_means_human_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal_file(tmp_path, monkeypatch).close()  # the variable names that file ...
    with (tmp_path / "redirected.log").open("w+") as f:  # ... but we write to this one
        assert not writes_to_journal(f)
        setup_logging("INFO", stream=f)
        logging.getLogger("edge.test_redirect").info("to a file")
        f.seek(0)
        line = f.read().strip()
    assert human(line) == ("INFO", "edge.test_redirect", "to a file")


def test_terminal_format_has_time_level_and_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    setup_logging("info", stream=out)
    logging.getLogger("edge.test_human").warning("outbox in memory: %s", "disk full")
    logging.getLogger("edge.test_human").debug("below the level")
    assert human(out.getvalue().strip()) == (
        "WARNING", "edge.test_human", "outbox in memory: disk full"
    )


def test_malformed_journal_variable_is_not_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "not-a-pair")
    with Path(os.devnull).open("w") as f:
        assert not writes_to_journal(f)


def test_setting_up_twice_replaces_the_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    first, second = io.StringIO(), io.StringIO()
    setup_logging("INFO", stream=first)
    setup_logging("INFO", stream=second)
    logging.getLogger("edge.test_twice").info("once")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        setup_logging("LOUD", stream=io.StringIO())


def test_first_burst_passes_then_one_summary_when_the_window_rolls_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    clock, out = Clock(), io.StringIO()
    setup_logging("INFO", stream=out, burst=5, window_s=60.0, clock=clock)
    log = logging.getLogger("edge.test_flood")
    for i in range(12):
        clock.now += 1.0
        log.warning("dead letter from %s", f"pump-{i:02d}")
    assert [human(x)[2] for x in out.getvalue().splitlines()] == [
        f"dead letter from pump-{i:02d}" for i in range(5)
    ]
    clock.now += 60.0
    log.warning("dead letter from %s", "pump-99")
    summary = (
        "message repeated 7 more times in 60 s (first 5 shown); last: dead letter from pump-11"
    )
    assert [human(x) for x in out.getvalue().splitlines()[5:]] == [
        ("WARNING", "edge.test_flood", summary),
        ("WARNING", "edge.test_flood", "dead letter from pump-99"),
    ]


def test_limits_are_per_logger_and_template() -> None:
    clock = Clock()
    f = RateLimitFilter(burst=2, window_s=10.0, clock=clock)

    def passes(logger: str, msg: str) -> bool:
        return f.filter(logging.LogRecord(logger, logging.INFO, __file__, 1, msg, None, None))

    assert [passes("a", "x %s") for _ in range(3)] == [True, True, False]
    assert [passes("a", "y %s") for _ in range(3)] == [True, True, False]
    assert [passes("b", "x %s") for _ in range(3)] == [True, True, False]


def test_summary_comes_when_the_window_ends_even_if_the_message_never_recurs() -> None:
    clock, summaries = Clock(), []
    f = RateLimitFilter(burst=1, window_s=10.0, clock=clock, sink=summaries.append)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("edge.x", logging.ERROR, __file__, 1, msg, ("arg",), None)

    assert f.filter(record("broker refused: %s"))
    assert not f.filter(record("broker refused: %s"))
    assert not f.filter(record("broker refused: %s"))
    clock.now += 10.5
    assert f.filter(record("something else %s"))  # any record lets the limiter look at the clock
    assert len(summaries) == 1
    assert summaries[0].levelno == logging.ERROR
    assert summaries[0].name == "edge.x"
    assert summaries[0].getMessage().startswith("message repeated 2 more times in 10 s")


def test_flush_emits_pending_summaries_once() -> None:
    clock, summaries = Clock(), []
    f = RateLimitFilter(burst=1, window_s=60.0, clock=clock, sink=summaries.append)
    rec = logging.LogRecord("edge.y", logging.WARNING, __file__, 1, "flood", None, None)
    assert [f.filter(rec) for _ in range(4)] == [True, False, False, False]
    f.flush()
    f.flush()
    assert [s.getMessage() for s in summaries] == [
        "message repeated 3 more times in 60 s (first 1 shown); last: flood"
    ]


def test_nothing_suppressed_means_no_summary() -> None:
    clock, summaries = Clock(), []
    f = RateLimitFilter(burst=3, window_s=5.0, clock=clock, sink=summaries.append)
    rec = logging.LogRecord("edge.z", logging.INFO, __file__, 1, "calm", None, None)
    for _ in range(3):
        assert f.filter(rec)
        clock.now += 2.0
    f.flush()
    assert summaries == []


# -- issue 14, finding 6: fleet outcomes must not vanish, summaries must come out ----------------


def test_fleet_outcomes_are_limited_per_event_not_per_template(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    clock, out = Clock(), io.StringIO()
    setup_logging("INFO", stream=out, burst=5, window_s=60.0, clock=clock)
    fleet = logging.getLogger("floorline.edge.fleet.agent")
    for version in range(1, 6):
        fleet.info("fleet: version %s %s: %s", version, "applied", "passed probation")
    fleet.warning("fleet: version %s %s: %s", 6, "rejected", "untrusted key")
    fleet.warning("fleet: version %s %s: %s", 7, "rolled_back", "dead letters in probation")
    for _ in range(8):  # the same event again and again is still a flood
        fleet.warning("fleet: version %s %s: %s", 8, "rejected", "replay")
    lines = [human(x)[2] for x in out.getvalue().splitlines()]
    assert "fleet: version 6 rejected: untrusted key" in lines
    assert "fleet: version 7 rolled_back: dead letters in probation" in lines
    assert lines.count("fleet: version 8 rejected: replay") == 5
    assert len(lines) == 5 + 2 + 5


def test_a_record_marked_distinct_is_limited_per_event() -> None:
    clock = Clock()
    f = RateLimitFilter(burst=1, window_s=10.0, clock=clock)

    def passes(arg: str, **extra: object) -> bool:
        rec = logging.LogRecord("edge.other", logging.WARNING, __file__, 1, "x %s", (arg,), None)
        rec.__dict__.update(extra)
        return f.filter(rec)

    assert [passes("a"), passes("b")] == [True, False]  # one template: one budget
    assert [passes("c", floorline_distinct=True), passes("d", floorline_distinct=True),
            passes("d", floorline_distinct=True)] == [True, True, False]


def test_a_summary_comes_on_a_timer_when_nothing_else_is_logged() -> None:
    summaries: list[logging.LogRecord] = []
    f = RateLimitFilter(burst=1, window_s=0.2, sink=summaries.append)
    rec = logging.LogRecord("edge.t", logging.WARNING, __file__, 1, "flood", None, None)
    assert [f.filter(rec) for _ in range(3)] == [True, False, False]
    deadline = time.monotonic() + 5.0
    while not summaries and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [s.getMessage() for s in summaries] == [
        "message repeated 2 more times in 0 s (first 1 shown); last: flood"
    ]
    f.close()


def test_pending_summaries_are_written_when_the_handler_closes_at_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    clock, out = Clock(), io.StringIO()
    handler = setup_logging("INFO", stream=out, burst=1, window_s=600.0, clock=clock)
    log = logging.getLogger("edge.test_shutdown")
    for _ in range(4):
        log.warning("broker refused us")
    handler.close()  # what logging.shutdown() does at exit
    assert [human(x)[2] for x in out.getvalue().splitlines()] == [
        "broker refused us",
        "message repeated 3 more times in 600 s (first 1 shown); last: broker refused us",
    ]


def test_a_summary_for_a_stream_closed_meanwhile_is_dropped_without_a_logging_error(capsys):
    # A handler replaced after its stream was closed (a test's capture, a redirected stderr)
    # flushes its pending summary: nothing may be written, and no "--- Logging error ---".
    first = io.StringIO()
    setup_logging("INFO", stream=first, burst=1, window_s=60)
    log = logging.getLogger("floorline.edge.test.closed")
    for _ in range(3):
        log.warning("the same thing again")  # one passes, two are held for a summary
    first.close()
    setup_logging("INFO", stream=io.StringIO())  # replaces the first: its summary is flushed
    err = capsys.readouterr().err
    assert "Logging error" not in err
    assert "Traceback" not in err
