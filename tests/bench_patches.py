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
    "yield": "P8: the worker yields the GIL (time.sleep(0)) after handing a batch's predictions "
    "to the publisher",
    "chunk16k": "P9: the reader takes 16 KiB per recv, not 64 KiB (shorter GIL holds per read)",
    "trace": "T: no change; times each outbox put, put -> read back by the flusher -> published, "
    "and each publish call (written to /tmp/trace-PID at exit)",
}
"""Every patch, by the name the command line takes."""


def _small_sqlite_cache() -> None:
    connect = sqlite3.connect

    def connect_small(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = connect(*args, **kwargs)
        conn.execute("PRAGMA cache_size = -256")
        return conn

    sqlite3.connect = connect_small  # type: ignore[assignment]


def _yield_after_submit() -> None:
    import time  # noqa: PLC0415

    from floorline.edge.daemon.pipeline import Pipeline  # noqa: PLC0415

    infer = Pipeline._infer

    def infer_then_yield(self: Pipeline, batch: Any) -> None:
        infer(self, batch)
        time.sleep(0)  # the publisher was just woken: let it have the GIL now

    Pipeline._infer = infer_then_yield  # type: ignore[method-assign]


def _trace() -> None:
    import atexit  # noqa: PLC0415
    import os  # noqa: PLC0415
    import time  # noqa: PLC0415

    from floorline.edge.delivery.outbox import Outbox  # noqa: PLC0415
    from floorline.edge.mqtt.transport import MqttTransport  # noqa: PLC0415

    put_at: dict[int, float] = {}
    puts: list[float] = []
    waits: list[float] = []
    put_many, after = Outbox.put_many, Outbox.after
    publish_tracked = MqttTransport.publish_tracked
    read: list[float] = []  # put time of each row read back, in order
    pubs: list[float] = []
    pub_cost: list[float] = []

    def traced_publish(self: MqttTransport, topic: str, payload: bytes, qos: int,
                       retain: bool) -> Any:
        t0 = time.monotonic()
        mid = publish_tracked(self, topic, payload, qos, retain)
        t1 = time.monotonic()
        pub_cost.append(t1 - t0)
        if qos and read:
            pubs.append(t1 - read.pop(0))
        return mid

    def traced_put(self: Outbox, messages: Any, seqs: Any = None) -> list[int]:
        t0 = time.monotonic()
        ids = put_many(self, messages, seqs)
        t1 = time.monotonic()
        puts.append(t1 - t0)
        for i in ids:
            put_at[i] = t1
        return ids

    def traced_after(self: Outbox, last_id: int, limit: int) -> Any:
        rows = after(self, last_id, limit)
        now = time.monotonic()
        for r in rows:
            t = put_at.pop(r.id, None)
            if t is not None:
                waits.append(now - t)
                read.append(t)
        return rows

    def report() -> None:
        def pct(v: list[float], q: float) -> float:
            v = sorted(v)
            return 1e3 * v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")
        with open(f"/tmp/trace-{os.getpid()}", "w") as f:  # noqa: PTH123
            f.write(f"put n={len(puts)} p50={pct(puts, .5):.3f} p99={pct(puts, .99):.3f} ms\n")
            f.write(f"put->after n={len(waits)} p50={pct(waits, .5):.3f} "
                    f"p99={pct(waits, .99):.3f} ms\n")
            f.write(f"put->published n={len(pubs)} p50={pct(pubs, .5):.3f} "
                    f"p99={pct(pubs, .99):.3f} ms\n")
            f.write(f"publish call n={len(pub_cost)} p50={pct(pub_cost, .5):.3f} "
                    f"p99={pct(pub_cost, .99):.3f} ms\n")

    Outbox.put_many = traced_put  # type: ignore[method-assign]
    Outbox.after = traced_after  # type: ignore[method-assign]
    MqttTransport.publish_tracked = traced_publish  # type: ignore[method-assign]
    atexit.register(report)


def apply(names: str) -> None:
    """Apply the comma-separated patches NAMES to this process."""
    for name in names.split(","):
        if name == "switch1ms":
            sys.setswitchinterval(0.001)
        elif name == "sqlite256k":
            _small_sqlite_cache()
        elif name == "trace":
            _trace()
        elif name == "yield":
            _yield_after_submit()
        elif name == "chunk16k":
            import floorline.edge.mqtt.reader  # noqa: PLC0415

            floorline.edge.mqtt.reader._CHUNK = 16384
        elif name != "none":
            raise SystemExit(f"unknown patch {name!r}; known: {', '.join(PATCHES)}, none")


def main(argv: list[str] | None = None) -> int:
    """``floorline`` ARGV[1:] with the patches named in ARGV[0]."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python -m tests.bench_patches PATCH[,PATCH...] run --config FILE")
    apply(args[0])
    from floorline.edge.cli.main import main as floorline  # noqa: PLC0415 - after the patches

    return floorline(args[1:])


if __name__ == "__main__":
    sys.exit(main())
