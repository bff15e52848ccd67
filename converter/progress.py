"""Progress for long converter steps: a bar shown only on a terminal, and timed steps.

``with step("exporting tflite-int8", say): ...`` says "exporting tflite-int8 ..." when the step
starts and "exporting tflite-int8: 3.2 s" when it ends ("... failed after 3.2 s" on an exception,
which propagates). ``say_stderr`` is a ``say`` that writes plain lines to stderr, so progress never
mixes with a command's results on stdout.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TextIO


def say_stderr(message: str) -> None:
    """Print one progress line to stderr (plain text, flushed at once)."""
    print(message, file=sys.stderr, flush=True)


class Timer:
    """``with Timer() as t: ...``; ``t.elapsed`` is the seconds since entry (frozen at exit)."""

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._end: float | None = None

    @property
    def elapsed(self) -> float:
        """Seconds from entering the block to leaving it (or to now, inside it)."""
        return (self._end if self._end is not None else time.monotonic()) - self._start

    def __enter__(self) -> Timer:
        self._start = time.monotonic()
        self._end = None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end = time.monotonic()


@contextmanager
def step(label: str, say: Callable[[str], None] = say_stderr) -> Iterator[Timer]:
    """Say LABEL when a step starts and how long it took when it ends (or failed)."""
    say(f"{label} ...")
    with Timer() as timer:
        try:
            yield timer
        except BaseException:
            say(f"{label}: failed after {timer.elapsed:.1f} s")
            raise
    say(f"{label}: {timer.elapsed:.1f} s")


class Progress:
    """``with Progress("calibrating", total) as bar: bar.advance()``; silent when not a TTY."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        # Duplicate the terminal's descriptor now: a bar created before native output is captured
        # (see native_output) keeps drawing on the terminal while fd 2 points elsewhere.
        if stream is None and sys.stderr.isatty():
            stream = os.fdopen(os.dup(sys.stderr.fileno()), "w")
        self._stream = stream or sys.stderr
        self._enabled = self._stream.isatty()
        self._last = 0.0

    def advance(self, steps: int = 1) -> None:
        """Count STEPS more; redraw at most 10 times a second."""
        self.done = min(self.done + steps, self.total)
        now = time.monotonic()
        if self._enabled and (now - self._last > 0.1 or self.done == self.total):
            self._last = now
            width = 30
            filled = int(width * self.done / self.total)
            self._stream.write(
                f"\r{self.label:<24} [{'#' * filled}{'.' * (width - filled)}] "
                f"{self.done}/{self.total}"
            )
            self._stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._enabled:
            self._stream.write("\n")
            self._stream.flush()
