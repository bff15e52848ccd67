"""Timing each artifact of a bundle on the gateway's backends at a few batch sizes.

This measures the runtime alone (no MQTT, no decoding): the ceiling a pipeline cannot beat. Run it
on the gateway itself for numbers that mean anything there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from floorline.edge.backends import BackendOptions
from floorline.edge.bundle import selftest
from floorline.edge.bundle.bundle import Bundle
from floorline.edge.cli import table as text_table

DEFAULT_BATCHES = (1, 8, 32)


@dataclass(frozen=True)
class BenchRow:
    """Latency of one artifact at one batch size."""

    artifact: str
    backend: str
    batch: int
    p50_ms: float
    p99_ms: float
    windows_per_s: float


def bench(
    bundle: Bundle,
    *,
    batches: tuple[int, ...] = DEFAULT_BATCHES,
    iterations: int = 200,
    threads: int = 1,
) -> list[BenchRow]:
    """Time every artifact at every batch size, ITERATIONS runs each after a warm-up."""
    rows = []
    rng = np.random.default_rng(0)
    for art in bundle.manifest.artifacts:
        loaded = selftest.load(bundle, artifact=art.file, options=BackendOptions(threads=threads))
        try:
            golden = bundle.golden.inputs
            for batch in batches:
                x = golden[rng.integers(0, len(golden), batch)]
                for _ in range(max(3, iterations // 20)):
                    loaded.backend.infer(x)  # warm-up, including a resize to this batch size
                times = np.empty(iterations)
                for i in range(iterations):
                    start = time.perf_counter()
                    loaded.backend.infer(x)
                    times[i] = time.perf_counter() - start
                p50 = float(np.percentile(times, 50))
                rows.append(
                    BenchRow(
                        artifact=art.file,
                        backend=loaded.backend.runtime,
                        batch=batch,
                        p50_ms=p50 * 1e3,
                        p99_ms=float(np.percentile(times, 99)) * 1e3,
                        windows_per_s=batch / p50 if p50 > 0 else float("inf"),
                    )
                )
        finally:
            loaded.backend.close()
    return rows


def format_rows(rows: list[BenchRow]) -> str:
    """A plain-text table of bench rows."""
    header = ("artifact", "runtime", "batch", "p50 ms", "p99 ms", "windows/s")
    lines = [
        (
            r.artifact,
            r.backend,
            str(r.batch),
            f"{r.p50_ms:.3f}",
            f"{r.p99_ms:.3f}",
            f"{r.windows_per_s:,.0f}",
        )
        for r in rows
    ]
    return text_table.render(header, lines)
