"""py-spy of the daemon on one stream at one rate, outside a full benchmark run.

    .venv/bin/python -m tests.bench_profile binary 2900 [5|3.1.1]

Starts its own mosquitto and the daemon (as ``tests.benchmark`` does), offers KIND (sample,
binary, json_block) at RATE messages per second for 4 s under py-spy (``--gil`` and CPU, as
``tests.benchmark.profile_daemon``), and prints the step's verdict, the GIL-held and on-CPU
seconds sampled, the share per thread and the top functions. docs/benchmarks.md quotes it for
before/after figures of one change; needs py-spy (``.venv/bin/python -m pip install py-spy``).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from tests import benchmark as b
from tests.mqtt_broker import Mosquitto


def main(argv: list[str]) -> int:
    """Profile the daemon on the stream and rate ARGV names; print the summary."""
    if len(argv) not in (2, 3) or argv[0] not in b.PIPELINE_NAMES:
        print(__doc__)
        return 2
    kind, rate = argv[0], float(argv[1])
    protocol = argv[2] if len(argv) == 3 else "5"
    work = Path(tempfile.mkdtemp(prefix="floorline-profile-"))
    broker = Mosquitto(work / "broker").start()
    collector = b.Collector(broker.port)
    bench = b.Bench(replace(b.QUICK, step_s=4.0, block_step_s=4.0), work, broker.port, collector)
    bench.stats = True
    try:
        result = b.profile_daemon(bench, protocol, kind, rate, work / "profile", print)  # type: ignore[arg-type]
    finally:
        bench.close()
        collector.close()
        broker.stop()
    if "summary" not in result:
        print(result.get("skipped", result))
        return 1
    step = result["step"]
    print(f"{kind} at {rate:,.0f}/s, MQTT {protocol}: {step['reason']}, "
          f"cpu {step['cpu_cores']:.2f} cores = {1e6 * step['cpu_cores'] / rate:.0f} µs/msg")
    for mode in ("gil", "cpu"):
        summary = result["summary"][mode]
        seconds = summary["samples_s"]
        print(f"== {mode}: {seconds} s of samples "
              f"({1e6 * seconds / (rate * bench.budget.step_s):.0f} µs/msg), "
              f"threads {summary['threads_pct']}")
        for name, pct in summary["inclusive_pct"][:20]:
            print(f"    {pct:5.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
