"""``floorline demo``: broker, simulated plant, daemon and live predictions in one command.

It uses a broker at localhost:1883 when one answers MQTT there, otherwise starts the embedded one
(amqtt) on a free port. The daemon runs the committed example bundle on a simulated plant where
some pumps develop faults over time; the table shows each pump's true condition (from the
simulator) beside what the model predicts, so you can watch predictions follow the faults.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import orjson

from floorline.edge.config.model import Config, parse_config
from floorline.edge.daemon.daemon import Daemon
from floorline.edge.demo.simulator import Fault, PlantConfig, PlantSimulator
from floorline.edge.mqtt.transport import MqttTransport
from floorline.edge.resources import models_dir

EXAMPLE_BUNDLE = models_dir() / "pdm-classifier"

DEFAULT_FAULTS = (
    "pump-02=imbalance@8+12",
    "pump-04=bearing_outer_race@16+12",
    "pump-06=looseness@24+12",
)

_CONFIG = """
gateway: {{id: demo}}
state_dir: "{state_dir}"
broker: {{host: "{host}", port: {port}, protocol: "3.1.1", keepalive: 15}}
pipelines:
  - name: vibration
    subscribe: ["plant/+/+/vibration"]
    qos: 0
    bundle: "{bundle}"
    decoder: {{type: json, timestamp: ts, sequence: seq}}
    asset: {{topic_segment: -2}}
    window: {{hop: 32, max_gap_s: 0.05}}
    batch: {{max_batch: 32, max_wait_ms: 5}}
    output: {{qos: 0}}
"""


def demo_config(host: str, port: int, bundle: Path = EXAMPLE_BUNDLE) -> Config:
    """The demo's gateway config: one pipeline, the example bundle, per-sample JSON."""
    # The demo keeps nothing between runs: its outbox lives in a fresh temporary directory.
    state_dir = tempfile.mkdtemp(prefix="floorline-demo-")
    return parse_config(
        _CONFIG.format(host=host, port=port, bundle=bundle, state_dir=state_dir), "demo config"
    )


def _mqtt_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    # A TCP accept is not enough (something else may listen on 1883): send CONNECT, expect CONNACK.
    connect = bytes.fromhex("101000044d5154540402003c0004666c6465")  # MQTT 3.1.1, client id 'flde'
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(connect)
            ok = sock.recv(4)[:1] == b"\x20"
            if ok:
                sock.sendall(b"\xe0\x00")  # DISCONNECT, so the broker logs a clean goodbye
            return ok
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def broker(host: str = "localhost", port: int = 1883) -> Iterator[tuple[str, int, str]]:
    """Yield (host, port, description) of a usable broker, starting the embedded one if needed."""
    if _mqtt_answers(host, port):
        yield host, port, f"broker at {host}:{port}"
        return
    free = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "floorline.edge.demo.embedded_broker", "--port", str(free)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not _mqtt_answers("127.0.0.1", free):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read() if proc.stderr else ""
                raise RuntimeError(f"the embedded broker did not start: {err.strip()[-500:]}")
            time.sleep(0.1)
        yield "127.0.0.1", free, f"embedded broker (amqtt) on 127.0.0.1:{free}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class _AssetView:
    label: str = "-"
    score: float = 0.0
    predictions: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=200))


class PredictionBoard:
    """Collects predictions from MQTT (on paho's thread) for the table."""

    def __init__(self) -> None:
        self.assets: dict[str, _AssetView] = defaultdict(_AssetView)
        self.total = 0
        self._lock = threading.Lock()

    def on_message(self, topic: str, payload: bytes, *meta: object) -> None:
        """Record one prediction message."""
        del topic, meta
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        with self._lock:
            view = self.assets[str(msg.get("asset"))]
            view.label = str(msg.get("label", "-"))
            view.score = float(msg.get("score", 0.0))
            view.predictions += 1
            view.labels[view.label] += 1
            view.latencies.append(float(msg["latency_ms"]["end_to_end"]))
            self.total += 1

    def snapshot(self) -> dict[str, _AssetView]:
        """A consistent copy for drawing."""
        with self._lock:
            return {
                k: _AssetView(
                    v.label, v.score, v.predictions, Counter(v.labels), deque(v.latencies)
                )
                for k, v in self.assets.items()
            }


def _render(
    sim: PlantSimulator, board: PredictionBoard, daemon: Daemon, where: str, elapsed: float,
    duration: float, rates: tuple[float, float],
) -> str:
    snap = board.snapshot()
    lines = [
        (
            f"Floorline demo · {where} · {sim.config.assets} pumps at {sim.config.rate:g} "
            f"samples/s · {elapsed:4.0f}/{duration:.0f} s   (Ctrl-C to stop)"
        ),
        "",
        f"{'asset':<9} {'true condition':<27} {'predicted':<20} {'score':>5}  {'preds':>6}",
    ]
    for name in sim.config.asset_names():
        truth, severity = sim.condition_of(name)
        truth_text = truth if truth == "healthy" else f"{truth} ({severity:.0%})"
        view = snap.get(name, _AssetView())
        mark = " " if view.label in ("-", truth) else "*"
        lines.append(
            f"{name:<9} {truth_text:<27} {view.label:<20}{mark}{view.score:5.2f}  "
            f"{view.predictions:6d}"
        )
    stats = daemon.stats()["pipelines"]
    assert isinstance(stats, dict)  # noqa: S101
    dead = sum(sum(p["dead_letters"].values()) for p in stats.values())
    lat = sorted(x for v in snap.values() for x in v.latencies)
    p50 = lat[len(lat) // 2] if lat else 0.0
    lines += [
        "",
        (
            f"in {rates[0]:7,.0f} msg/s · predictions {rates[1]:5,.0f}/s · dead letters {dead} · "
            f"end-to-end p50 {p50:.1f} ms"
        ),
        "* prediction differs from the simulator's truth (early, low-severity faults look healthy)",
    ]
    return "\n".join(lines)


def run_demo(
    *,
    duration: float = 60.0,
    assets: int = 8,
    rate: float = 200.0,
    faults: tuple[str, ...] | None = None,
    host: str = "localhost",
    port: int = 1883,
    metrics_port: int | None = None,
    out: TextIO | None = None,
) -> int:
    """Run the whole demo; returns an exit code. Prints a summary at the end.

    FAULTS default to DEFAULT_FAULTS for the pumps that exist; explicit ones must name real pumps.
    """
    out = out or sys.stdout
    tty = out.isatty() and os.environ.get("TERM") != "dumb"
    try:
        plant = PlantConfig(assets=assets, rate=rate)
        names = set(plant.asset_names())
        if faults is None:
            faults = tuple(f for f in DEFAULT_FAULTS if f.split("=", 1)[0] in names)
        plant.faults = [Fault.parse(f) for f in faults]
    except ValueError as exc:
        print(f"floorline demo: {exc}", file=sys.stderr)
        return 2
    if unknown := sorted({f.asset for f in plant.faults} - names):
        print(f"floorline demo: faults name pumps that do not exist: {', '.join(unknown)}",
              file=sys.stderr)
        return 2
    with broker(host, port) as (bhost, bport, where):
        config = demo_config(bhost, bport)
        daemon = Daemon(config)
        daemon.load()
        metrics_server = None
        if metrics_port is not None:
            metrics_server = daemon.metrics.start_http("127.0.0.1", metrics_port)
        if metrics_server is not None:
            out.write(f"metrics: http://127.0.0.1:{metrics_server.port}/metrics\n")
        board = PredictionBoard()
        watcher = MqttTransport(
            config.broker, f"floorline-demo-view-{os.getpid()}", board.on_message,
            [("floorline/demo/pred/#", 0)],
        )
        publisher = MqttTransport(config.broker, f"floorline-demo-plant-{os.getpid()}",
                                  lambda *_: None, [])
        sim = PlantSimulator(plant, lambda t, p: publisher.publish(t, p, 0, False))
        try:
            daemon.start()
            watcher.start()
            publisher.start()
            if not (daemon.transport and daemon.transport.wait_connected(10)
                    and watcher.wait_connected(10) and publisher.wait_connected(10)):
                print(f"floorline demo: could not connect to the {where}", file=sys.stderr)
                return 1
            if not tty:
                out.write(f"floorline demo: {where}; {assets} pumps at {rate:g} samples/s for "
                          f"{duration:g} s; faults: {', '.join(faults) or 'none'}\n")
            _show(sim, board, daemon, where, duration, out, tty)
            time.sleep(0.5)  # let the last windows come back before the summary
        finally:
            daemon.stop()
            watcher.stop()
            publisher.stop()
            if metrics_server is not None:
                metrics_server.stop()
    out.write(_summary(sim, board, daemon) + "\n")
    return 0


def _show(
    sim: PlantSimulator, board: PredictionBoard, daemon: Daemon, where: str, duration: float,
    out: TextIO, tty: bool,
) -> None:
    """Run the simulator for DURATION, redrawing the table (or printing a line) as it goes."""
    sim_thread = threading.Thread(target=sim.run, kwargs={"duration": duration}, daemon=True)
    start = time.monotonic()
    sim_thread.start()
    last = (start, 0, 0)
    try:
        while sim_thread.is_alive():
            sim_thread.join(1.0 if tty else 5.0)
            now = time.monotonic()
            received = sum(p.counters["received"] for p in daemon.pipelines)
            dt = max(now - last[0], 1e-6)
            rates = ((received - last[1]) / dt, (board.total - last[2]) / dt)
            last = (now, received, board.total)
            frame = _render(sim, board, daemon, where, now - start, duration, rates)
            if tty:
                out.write("\x1b[H\x1b[J" + frame + "\n")
            else:
                out.write(f"t={now - start:3.0f}s  " + frame.splitlines()[-2].strip() + "\n")
            out.flush()
    except KeyboardInterrupt:
        sim.stop()
        sim_thread.join(2)


def _summary(sim: PlantSimulator, board: PredictionBoard, daemon: Daemon) -> str:
    snap = board.snapshot()
    lines = ["", "summary", f"{'asset':<9} {'final truth':<20} {'last prediction':<20} labels seen"]
    for name in sim.config.asset_names():
        truth, _ = sim.condition_of(name)
        view = snap.get(name, _AssetView())
        seen = ", ".join(f"{k} {n}" for k, n in view.labels.most_common())
        lines.append(f"{name:<9} {truth:<20} {view.label:<20} {seen}")
    stats = daemon.stats()["pipelines"]
    assert isinstance(stats, dict)  # noqa: S101
    for pname, s in stats.items():
        lines.append(
            f"pipeline {pname}: {s.get('received', 0)} messages, {s.get('windows', 0)} windows, "
            f"{s.get('predictions', 0)} predictions, dead letters {s.get('dead_letters')}"
        )
    lines.append(f"simulator published {sim.messages} messages ({sim.samples} samples)")
    return "\n".join(lines)
