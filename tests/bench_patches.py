"""The changes the benchmark proposes, applied to an unmodified daemon to measure them.

    python -m tests.bench_patches PATCH[,PATCH...] run --config FILE

applies the named patches, then runs ``floorline`` with the remaining arguments. It imports
nothing the daemon does not import anyway (sqlite3), so the patched daemon's memory compares
with the stock one's. ``tests/benchmark.py --profile`` starts the daemon this way for its
experiments; nothing here is used by the gateway. Each patch is a prototype of a change proposed
in docs/benchmarks.md for ``edge/``. P1 (paho reading its socket through a 64 KiB buffer) was
one; it is built into the daemon now (``edge/mqtt_reader.py``), so it is no longer here.
"""

from __future__ import annotations

import sqlite3
import sys
from typing import Any

PATCHES: dict[str, str] = {
    "switch1ms": "P2: sys.setswitchinterval(0.001), GIL handed over after 1 ms, not 5",
    "sqlite256k": "P6: every SQLite connection with PRAGMA cache_size = -256 (256 KiB, not 2 MiB)",
}
"""Every patch, by the name the command line takes."""


def _small_sqlite_cache() -> None:
    connect = sqlite3.connect

    def connect_small(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = connect(*args, **kwargs)
        conn.execute("PRAGMA cache_size = -256")
        return conn

    sqlite3.connect = connect_small  # type: ignore[assignment]


def apply(names: str) -> None:
    """Apply the comma-separated patches NAMES to this process."""
    for name in names.split(","):
        if name == "switch1ms":
            sys.setswitchinterval(0.001)
        elif name == "sqlite256k":
            _small_sqlite_cache()
        elif name != "none":
            raise SystemExit(f"unknown patch {name!r}; known: {', '.join(PATCHES)}, none")


def main(argv: list[str] | None = None) -> int:
    """``floorline`` ARGV[1:] with the patches named in ARGV[0]."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python -m tests.bench_patches PATCH[,PATCH...] run --config FILE")
    apply(args[0])
    from edge.cli import main as floorline  # noqa: PLC0415 - after the patches

    return floorline(args[1:])


if __name__ == "__main__":
    sys.exit(main())
