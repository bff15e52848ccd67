"""A minimal progress bar for long converter steps, shown only on a terminal."""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import TextIO


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
