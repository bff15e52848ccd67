"""The benchmark's multi-worker run alone: ``workers: 1`` against ``workers: 2`` on binary blocks.

    .venv/bin/python -m tests.bench_workers [--rounds 3] [--up-to 20000] [--steps 5]
                                            [--step-s 3] [--json workers.json]

Starts its own mosquitto (as ``tests.benchmark`` does) and runs ``tests.benchmark.measure_workers``:
per round, a daemon with ``workers: 1`` then one with ``workers: 2``, each searched by bisection
over [0, UP_TO] messages/s (MQTT 5, binary float32 blocks, predictions at QoS 1 through the
outbox), then prints each daemon's sustained rate and its best step's CPU split: the reader,
each worker, the broker, the load generator and the machine as a whole (``machine (all
processes)``: on a shared machine, what else took the cores). No ceilings are measured, so the
search range is given (the full benchmark takes it from the QoS 1 echo ceiling).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from tests import benchmark as b
from tests.mqtt_broker import Mosquitto


def main(argv: list[str]) -> int:
    """Run the multi-worker section ARGV asks for; print it, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench_workers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="pairs of daemons (default 3)")
    parser.add_argument("--up-to", type=float, default=20000.0, help="search bound, msg/s")
    parser.add_argument("--steps", type=int, default=b.FULL.block_steps, help="bisection steps")
    parser.add_argument("--step-s", type=float, default=b.FULL.block_step_s,
                        help="seconds per step")
    parser.add_argument("--json", type=Path, default=Path("bench-workers.json"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="floorline-bench-workers-"))
    broker = Mosquitto(work / "broker").start()
    collector = b.Collector(broker.port)
    budget = replace(b.FULL, block_steps=args.steps, block_step_s=args.step_s)
    bench = b.Bench(budget, work, broker.port, collector, broker_pid=broker.pid)
    bench.stats = b.stats_supported()
    try:
        result = b.measure_workers(bench, 0.0, args.up_to, print, rounds=args.rounds)
    finally:
        bench.close()
        collector.close()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    result["command"] = "python -m tests.bench_workers " + " ".join(argv)
    result["machine"] = b.machine()
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print()
    print(b.workers_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
