"""Soak run: the daemon on a steady simulated stream; is its memory flat?

    .venv/bin/python -m tests.soak --minutes 5 [--assets 20 --rate 200]

Starts its own mosquitto (tests/mqtt_broker.py), runs ``floorline run`` as a separate process on
the example bundle (per-sample JSON, QoS 1 predictions through the outbox), publishes the
simulated plant, and samples the daemon's resident memory every 10 s. It reports RSS after
warm-up (the first minute), at the end and the largest, and fails (exit 1) if the end exceeds
the post-warm-up figure by more than 10 %. Not part of the test suite: it takes minutes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from floorline.edge.config.model import BrokerConfig
from floorline.edge.demo.simulator import PlantConfig, PlantSimulator
from floorline.edge.mqtt.transport import MqttTransport
from tests.daemon_harness import EXAMPLE
from tests.mqtt_broker import Mosquitto, wait_until

FLOORLINE = [sys.executable, "-m", "floorline.edge"]


def rss_mb(pid: int) -> float:
    """Resident set size of PID in MiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    """Run the soak; exit 0 when memory stayed within 10 % after warm-up."""
    parser = argparse.ArgumentParser(prog="python -m tests.soak")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--assets", type=int, default=20)
    parser.add_argument("--rate", type=float, default=200.0, help="samples/s per asset")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="floorline-soak-"))
    broker = Mosquitto(work / "broker").start()
    config = work / "gw.yaml"
    config.write_text(
        f"gateway: {{id: soak}}\nstate_dir: '{work / 'state'}'\n"
        f"broker: {{host: 127.0.0.1, port: {broker.port}}}\n"
        "pipelines:\n"
        "  - name: vibration\n"
        "    subscribe: ['plant/+/+/vibration']\n"
        f"    bundle: '{EXAMPLE}'\n"
        "    decoder: {type: json, timestamp: ts, sequence: seq}\n"
        "    window: {hop: 32, max_gap_s: 0.05}\n"
        "    output: {qos: 1}\n"
    )
    daemon = subprocess.Popen([*FLOORLINE, "run", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pub = MqttTransport(BrokerConfig(host="127.0.0.1", port=broker.port), "soak-plant",
                        lambda *_: None, [])
    pub.start()
    wait_until(pub.connected.is_set, 10, "publisher connected")
    sim = PlantSimulator(PlantConfig(assets=args.assets, rate=args.rate),
                         lambda t, p: pub.publish(t, p, 0, False))
    duration = args.minutes * 60
    thread = threading.Thread(target=sim.run, kwargs={"duration": duration}, daemon=True)
    start = time.monotonic()
    thread.start()
    samples: list[tuple[float, float]] = []
    try:
        while thread.is_alive():
            thread.join(10)
            samples.append((time.monotonic() - start, rss_mb(daemon.pid)))
            print(f"t={samples[-1][0]:5.0f}s  rss={samples[-1][1]:6.1f} MiB", flush=True)
    finally:
        daemon.terminate()
        daemon.wait(30)
        pub.stop()
        broker.stop()
    warm = next((r for t, r in samples if t >= 60), samples[0][1])
    end = samples[-1][1]
    peak = max(r for _, r in samples)
    growth = (end - warm) / warm
    print(f"messages {sim.messages}; rss after warm-up {warm:.1f} MiB, end {end:.1f} MiB, "
          f"peak {peak:.1f} MiB, growth {growth:+.1%} (limit +10%)")
    return 0 if growth <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
