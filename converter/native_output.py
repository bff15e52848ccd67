"""Keep TensorFlow's native (C++) log lines off the terminal unless something fails.

TensorFlow and its converters write directly to file descriptors 1 and 2 from C++, around Python's
``sys.stdout``. A conversion that works should print Floorline's table, not hundreds of MLIR lines;
one that fails should show the tail of them, because that is where the reason is.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


class CapturedOutput:
    """What a captured block wrote; ``text`` is filled in when the block ends."""

    def __init__(self) -> None:
        self.text = ""

    def tail(self, lines: int = 15) -> str:
        """The last LINES non-empty lines."""
        kept = [line for line in self.text.splitlines() if line.strip()]
        return "\n".join(kept[-lines:])


@contextmanager
def captured(enabled: bool = True) -> Iterator[CapturedOutput]:
    """Redirect fds 1 and 2 to a temporary file for the duration of the block."""
    result = CapturedOutput()
    if not enabled:
        yield result
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield result
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            result.text = sink.read().decode(errors="replace")
