"""The changes the benchmark proposes, applied to an unmodified daemon to measure them.

    python -m tests.bench_patches PATCH[,PATCH...] run --config FILE

applies the named patches, then runs ``floorline`` with the remaining arguments. It imports
nothing the daemon does not import anyway (paho, sqlite3), so the patched daemon's memory compares
with the stock one's. ``tests/benchmark.py --profile`` starts the daemon this way for its
experiments; nothing here is used by the gateway. Each patch is a prototype of a change proposed
in docs/benchmarks.md for ``edge/``, written against paho 2.2's internals (``_create_socket``,
``_sock``), which is fine for an experiment and a reason to do it properly in the transport.
"""

from __future__ import annotations

import sqlite3
import sys
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

PATCHES: dict[str, str] = {
    "buffered": "P1: paho reads its socket through a 64 KiB buffer (BufferedPahoClient)",
    "switch1ms": "P2: sys.setswitchinterval(0.001), GIL handed over after 1 ms, not 5",
    "sqlite256k": "P6: every SQLite connection with PRAGMA cache_size = -256 (256 KiB, not 2 MiB)",
}
"""Every patch, by the name the command line takes."""


class BufferedSocket:
    """P1: paho's socket, read through a 64 KiB buffer.

    paho reads every packet with three or more ``recv`` calls (1 byte of type, the length byte by
    byte, then the rest) after a ``select``; each call is a syscall that drops and retakes the
    GIL. Served from a buffer, a burst of packets costs one ``recv``. ``pending()`` is what paho
    already asks of TLS sockets: while it is non-zero paho's loop does not wait in ``select``.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        """Up to N bytes, from the buffer when it holds any."""
        if self._pos >= len(self._buf):
            data: bytes = self._sock.recv(65536)
            if len(data) <= n:
                return data
            self._buf, self._pos = data, 0
        chunk = self._buf[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk

    def pending(self) -> int:
        """Bytes read from the socket and not yet handed to paho."""
        return len(self._buf) - self._pos

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class BufferedPahoClient(mqtt.Client):
    """P1: paho on a ``BufferedSocket``, each loop turn reading what is buffered."""

    def _create_socket(self) -> Any:
        return BufferedSocket(super()._create_socket())

    def loop(self, timeout: float = 1.0) -> MQTTErrorCode:
        """paho's loop, then up to 256 more packets straight from the buffer (no ``select``)."""
        rc = super().loop(timeout)
        sock = self._sock
        for _ in range(256):  # bounded: writes and keepalive get their turn
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not isinstance(sock, BufferedSocket):
                break
            if not sock.pending() or self._sock is not sock:
                break
            rc = self.loop_read()
        return rc


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
        if name == "buffered":
            mqtt.Client = BufferedPahoClient  # type: ignore[misc]
        elif name == "switch1ms":
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
