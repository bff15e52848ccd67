"""``floorline demo``: broker, simulated plant, daemon and live predictions in one command.

It uses a broker at localhost:1883 when one answers MQTT there, otherwise starts the embedded one
(amqtt) on a free port, and says which, with the topics to watch. The daemon runs the committed
example bundle on a simulated plant where some pumps develop faults over the run; the table shows
each pump's true condition (from the simulator) beside what the model predicts, marks where they
differ and why, and the summary at the end says how often each pump's predictions were right while
it was healthy, while a fault grew and once it had fully developed.

``--sparkplug``: the same plant as a Sparkplug B edge node (``spBv1.0/plant/.../line1``, a device
per pump), read by a ``sparkplug`` decoder, and the predictions published by a ``sparkplug``
output as edge node ``spBv1.0/floorline/.../demo``; the table is drawn from those DBIRTH/DDATA
messages, decoded as a SCADA host would (aliases from the births, report by exception).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TextIO

import orjson

from floorline.edge.bundle.bundle import Bundle
from floorline.edge.config.model import Config, parse_config
from floorline.edge.daemon.daemon import Daemon
from floorline.edge.demo.signals import DEFAULT_SEVERITY_RANGE, SAMPLE_RATE_HZ, Condition
from floorline.edge.demo.simulator import Fault, PlantConfig, PlantSimulator, Truth
from floorline.edge.errors import FloorlineError
from floorline.edge.mqtt.transport import MqttTransport, Will
from floorline.edge.resources import models_dir

__all__ = [
    "EXAMPLE_BUNDLE",
    "PredictionBoard",
    "Scorecard",
    "SparkplugBoard",
    "WindowKind",
    "broker",
    "classify",
    "default_faults",
    "demo_config",
    "run_demo",
]

EXAMPLE_BUNDLE = models_dir() / "pdm-classifier"

# (pump, fault, onset as a share of the run). Each ramps over _RAMP_SHARE of the run, so the last
# one is fully developed at 70 % and the final 30 % shows all three at full severity, whether the
# run lasts 10 s or 10 min.
_DEFAULT_FAULTS = (
    ("pump-02", Condition.IMBALANCE, 0.10),
    ("pump-04", Condition.BEARING_OUTER_RACE, 0.25),
    ("pump-06", Condition.LOOSENESS, 0.40),
)
_RAMP_SHARE = 0.30

# The example model only ever saw faults at least this severe (signals.make_dataset's default).
_TRAINED_MIN_SEVERITY = DEFAULT_SEVERITY_RANGE[0]

_GATEWAY = """
gateway: {{id: demo}}
state_dir: "{state_dir}"
broker: {{host: "{host}", port: {port}, protocol: "3.1.1", keepalive: 15}}
pipelines:
  - name: vibration"""

_CONFIG = _GATEWAY + """
    subscribe: ["plant/+/+/vibration"]
    qos: 0
    bundle: "{bundle}"
    decoder: {{type: json, timestamp: ts, sequence: seq}}
    asset: {{topic_segment: -2}}
    window: {{hop: 32, max_gap_s: 0.05}}
    batch: {{max_batch: 32, max_wait_ms: 5}}
    output: {{qos: 0}}
"""

# --sparkplug: the plant is edge node line1 of group "plant"; the gateway edge node "demo" of
# group "floorline". Assets are the device ids (pump-NN), as in the JSON demo.
SPARKPLUG_PLANT_GROUP = "plant"
SPARKPLUG_GROUP = "floorline"
_SPARKPLUG_CONFIG = _GATEWAY + """
    subscribe: ["spBv1.0/{plant}/#"]
    qos: 0
    bundle: "{bundle}"
    decoder: {{type: sparkplug, asset: "{{device}}"}}
    asset: {{payload: true}}
    window: {{hop: 32, max_gap_s: 0.05}}
    batch: {{max_batch: 32, max_wait_ms: 5}}
    output: {{type: sparkplug, group_id: {group}}}
"""


def default_faults(duration: float, assets: Sequence[str]) -> tuple[Fault, ...]:
    """The demo's faults for a run of DURATION seconds, on those of its pumps that exist in ASSETS.

    Onsets and ramps are shares of the duration, so a short run shows every fault develop and a
    long one spreads them out.
    """
    ramp = round(_RAMP_SHARE * duration, 2)
    return tuple(
        Fault(asset, condition, start_s=round(share * duration, 2), ramp_s=ramp)
        for asset, condition, share in _DEFAULT_FAULTS
        if asset in assets
    )


def demo_config(host: str, port: int, bundle: Path = EXAMPLE_BUNDLE, *,
                sparkplug: bool = False) -> Config:
    """The demo's gateway config: one pipeline, the example bundle, per-sample JSON.

    SPARKPLUG: Sparkplug B in (the ``sparkplug`` decoder) and out (the ``sparkplug`` output).
    """
    # The demo keeps nothing between runs: its outbox lives in a fresh temporary directory.
    state_dir = tempfile.mkdtemp(prefix="floorline-demo-")
    template = _SPARKPLUG_CONFIG if sparkplug else _CONFIG
    return parse_config(
        template.format(host=host, port=port, bundle=bundle, state_dir=state_dir,
                        plant=SPARKPLUG_PLANT_GROUP, group=SPARKPLUG_GROUP),
        "demo config",
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
        yield (
            "127.0.0.1",
            free,
            f"embedded broker (amqtt) on 127.0.0.1:{free} (nothing answered MQTT on {host}:{port})",
        )
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- scoring predictions against the simulator's truth ---------------------------------------


class WindowKind(str, Enum):
    """What a pump was doing during the window a prediction was made on."""

    HEALTHY = "healthy"
    WEAK = "weak"
    """A fault below the weakest the model was trained on (early in its ramp)."""
    RAMPING = "ramping"
    """A fault still growing, already in the range the model was trained on."""
    DEVELOPED = "developed"
    """A fault at its final severity."""
    CHANGE = "change"
    """The window holds samples of two conditions (a fault that starts without a ramp)."""


_COLUMNS = {
    WindowKind.HEALTHY: "healthy",
    WindowKind.WEAK: f"fault <{_TRAINED_MIN_SEVERITY:.0%}",
    WindowKind.RAMPING: "ramping",
    WindowKind.DEVELOPED: "developed",
    WindowKind.CHANGE: "mixed",
}

_MARKS = {WindowKind.WEAK: "~", WindowKind.CHANGE: "|"}
"""How the table marks a wrong prediction, by kind of window; every other kind: '*'."""

# Why a prediction can differ from the truth, by mark: one line under the live table, the full
# reason under the summary. Each claim is checked: the model was trained on make_dataset's
# severities only, and the demo's pumps are drawn from the same AssetParams ranges as its
# training windows; on fresh windows of that generator it mislabels about 1.5 % (healthy pumps
# read as a fault up to ~4 % of the time on some of the demo's pumps).
_LEGEND_SHORT = {
    "~": f"~ fault under {_TRAINED_MIN_SEVERITY:.0%} severity, weaker than any in training: "
    "mostly reads healthy",
    "*": "* model error: a few windows in 100 get a wrong label, healthy pumps included",
    "|": "| the window spans a sudden change of condition and holds samples of both",
}
_LEGEND = {
    "~": (
        f"~ The fault was below {_TRAINED_MIN_SEVERITY:.0%} severity (early in its ramp, or "
        "set that weak with :SEVERITY). "
        "The example model was trained only on faults of "
        f"{_TRAINED_MIN_SEVERITY:.0%} to 100% severity; a weaker one mostly reads healthy."
    ),
    "*": (
        "* A model error. The plant runs the same synthetic physics, with machines drawn from "
        "the same ranges, as the model's training data, yet the model mislabels a few windows "
        "in 100, more on some pumps than on others: a healthy pump is flagged now and then, "
        "and a single 64 ms window decides each label."
    ),
    "|": (
        "| The window spans a sudden change of condition (a fault with no ramp, or one fault "
        "replacing another) and holds samples of both."
    ),
}


def classify(first: Truth, last: Truth) -> tuple[WindowKind, frozenset[str]]:
    """The kind of a window from the truth at its first and last sample, and the right labels."""
    if first.condition is not last.condition and not (
        first.condition is Condition.HEALTHY and last.severity < _TRAINED_MIN_SEVERITY
    ):
        return WindowKind.CHANGE, frozenset({first.condition.value, last.condition.value})
    right = frozenset({last.condition.value})
    if last.condition is Condition.HEALTHY:
        return WindowKind.HEALTHY, right
    if last.severity < _TRAINED_MIN_SEVERITY:
        return WindowKind.WEAK, right
    return (WindowKind.RAMPING if last.ramping else WindowKind.DEVELOPED), right


@dataclass
class _Latest:
    label: str
    score: float
    kind: WindowKind
    right: bool


@dataclass
class Scorecard:
    """Per pump and kind of window: predictions made and how many named the true condition."""

    windows: dict[str, Counter[WindowKind]] = field(default_factory=dict)
    matched: dict[str, Counter[WindowKind]] = field(default_factory=dict)
    labels: dict[str, Counter[str]] = field(default_factory=dict)
    latest: dict[str, _Latest] = field(default_factory=dict)
    marks_seen: set[str] = field(default_factory=set)

    def add(self, asset: str, label: str, score: float, first: Truth, last: Truth) -> bool:
        """Score one prediction of ASSET's window; returns whether it was right."""
        kind, right_labels = classify(first, last)
        right = label in right_labels
        self.windows.setdefault(asset, Counter())[kind] += 1
        self.matched.setdefault(asset, Counter())[kind] += right
        self.labels.setdefault(asset, Counter())[label] += 1
        self.latest[asset] = _Latest(label, score, kind, right)
        if not right:
            self.marks_seen.add(_MARKS.get(kind, "*"))
        return right

    def share(self, asset: str, kind: WindowKind) -> str:
        """'97% of 120' or '-' when ASSET had no window of KIND."""
        n = self.windows.get(asset, Counter())[kind]
        if not n:
            return "-"
        return f"{self.matched[asset][kind] / n:.0%} of {n}"

    def legend(self, *, short: bool = False) -> list[str]:
        """The explanation of each kind of mark the run has shown so far."""
        if short:
            return [text for mark, text in _LEGEND_SHORT.items() if mark in self.marks_seen]
        return [
            line
            for mark, text in _LEGEND.items()
            if mark in self.marks_seen
            for line in textwrap.wrap(text, 96, subsequent_indent="  ")
        ]


@dataclass(frozen=True)
class _Prediction:
    asset: str
    label: str
    score: float
    start: float | None
    end: float | None
    latency_ms: float


class PredictionBoard:
    """Collects prediction messages from MQTT for the main thread to decode and score.

    ``on_message`` runs on paho's thread, so it only appends the payload.
    """

    def __init__(self) -> None:
        self.total = 0
        self._new: list[bytes] = []
        self._lock = threading.Lock()

    def on_message(self, topic: str, payload: bytes, *meta: object) -> None:
        """Keep one prediction message."""
        del topic, meta
        with self._lock:
            self._new.append(payload)
            self.total += 1

    def take(self) -> list[_Prediction]:
        """The predictions received since the last call, oldest first; unreadable ones skipped."""
        with self._lock:
            new, self._new = self._new, []
        return [p for p in map(_decode, new) if p is not None]


def _decode(payload: bytes) -> _Prediction | None:
    try:
        msg = orjson.loads(payload)
        window = msg.get("window") or {}
        return _Prediction(
            str(msg.get("asset")), str(msg.get("label", "-")), float(msg.get("score", 0.0)),
            window.get("start"), window.get("end"), float(msg["latency_ms"]["end_to_end"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


class SparkplugBoard(PredictionBoard):
    """Predictions as a Sparkplug host application sees them: the gateway edge node's messages.

    Each device's DBIRTH gives its aliases, datatypes and current values; a DDATA changes some
    of them (report by exception). A prediction is a new ``Window/Seq`` of a device (a rebirth
    repeats the current one: counted once); its window ends at that metric's timestamp and
    starts WINDOW_S earlier. Sparkplug carries no latency: ``latency_ms`` is from the edge
    node's send time (the payload's timestamp) to arrival here.
    """

    def __init__(self, window_s: float) -> None:
        super().__init__()
        from floorline.edge.sparkplug import require  # noqa: PLC0415 - protobuf only if used

        require("floorline demo --sparkplug")
        from floorline.edge.sparkplug import payload, topics  # noqa: PLC0415

        self._sp, self._topics = payload, topics
        self._window_s = window_s
        self._raw: list[tuple[str, bytes, float]] = []
        # device → (alias → name, name → datatype, name → value, name → timestamp ms)
        self._devices: dict[str, tuple[dict[int, str], dict[str, int], dict[str, Any],
                                       dict[str, int]]] = {}
        self._seen: set[tuple[str, int]] = set()

    def on_message(self, topic: str, payload: bytes, *meta: object) -> None:
        """Keep one message of the edge node (decoded in order by take())."""
        del meta
        with self._lock:
            self._raw.append((topic, payload, time.time()))

    def take(self) -> list[_Prediction]:
        """The predictions that arrived since the last call, oldest first."""
        with self._lock:
            raw, self._raw = self._raw, []
        out = [p for p in (self._read(*r) for r in raw) if p is not None]
        self.total += len(out)
        return out

    def _read(self, topic: str, data: bytes, arrived: float) -> _Prediction | None:
        sp = self._sp
        where = self._topics.parse_topic(topic)
        if where is None or where.device is None:
            return None  # NBIRTH, NDEATH: the node's, not a pump's
        device = where.device
        try:
            message = sp.parse(data)
            if where.type == "DBIRTH":
                names = {m.alias: m.name for m in message.metrics if m.alias}
                types = {m.name: m.datatype for m in message.metrics}
                self._devices[device] = (
                    names, types, {m.name: sp.value_of(m) for m in message.metrics},
                    {m.name: m.timestamp for m in message.metrics},
                )
            elif where.type == "DDATA" and device in self._devices:
                names, types, values, stamps = self._devices[device]
                for m in message.metrics:
                    name = names.get(m.alias, m.name)
                    values[name] = sp.value_of(m, types.get(name, m.datatype))
                    stamps[name] = m.timestamp
            else:
                if where.type == "DDEATH":
                    self._devices.pop(device, None)
                return None
        except sp.PayloadError:
            return None
        _, _, values, stamps = self._devices[device]
        seq, label, score = values.get("Window/Seq"), values.get("Label"), values.get("Score")
        if not isinstance(seq, int) or not isinstance(label, str) or (device, seq) in self._seen:
            return None  # typed nulls (born before any prediction), or a repeat
        self._seen.add((device, seq))
        end = stamps["Window/Seq"] / 1000.0
        return _Prediction(device, label, float(score) if isinstance(score, float) else 0.0,
                           end - self._window_s, end, (arrived * 1000.0) - message.timestamp)


@dataclass
class _Run:
    """What the table and the summary are drawn from."""

    sim: PlantSimulator
    board: PredictionBoard
    daemon: Daemon
    header: list[str]
    duration: float
    sparkplug: bool = False
    card: Scorecard = field(default_factory=Scorecard)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=1000))

    def score(self) -> None:
        """Score the predictions that came in since the last call."""
        for p in self.board.take():
            self.latencies.append(p.latency_ms)
            if p.start is None or p.end is None:
                continue
            first = self.sim.truth_at(p.asset, self.sim.sample_index(p.start))
            last = self.sim.truth_at(p.asset, self.sim.sample_index(p.end))
            self.card.add(p.asset, p.label, p.score, first, last)

    def pipeline_stats(self) -> dict[str, dict[str, object]]:
        """Daemon.stats() of each pipeline."""
        stats = self.daemon.stats()["pipelines"]
        assert isinstance(stats, dict)  # noqa: S101 - narrows the type for mypy
        return stats


# -- output ------------------------------------------------------------------------------------


def _header(
    config: Config, where: str, host: str, port: int, faults: Sequence[Fault],
    metrics_url: str | None,
) -> list[str]:
    """Where everything is: broker, topics, faults, metrics, and a command to watch predictions."""
    gateway = config.gateway.id
    pipeline = config.pipelines[0]
    per_asset = config.topics.predictions.format(
        gateway=gateway, pipeline=pipeline.name, asset="+"
    )
    fault_text = ", ".join(f.spec() for f in faults) + " (@onset+ramp s)" if faults else "none"
    subscribed = ", ".join(pipeline.subscribe)
    if pipeline.output.type == "sparkplug":
        node = f"spBv1.0/{SPARKPLUG_GROUP}/+/{gateway}"
        edge = f"{SPARKPLUG_GROUP}/{gateway}"
        inputs = [
            f"  input        {subscribed}  (Sparkplug B: edge node line1, a device per pump)",
            f"  predictions  {node}/#  (Sparkplug B edge node {edge}: DBIRTH, DDATA per pump)",
        ]
    else:
        inputs = [
            f"  input        {subscribed}  (pumps: plant/line1/pump-NN/vibration)",
            f"  predictions  {per_asset}  (one topic per pump)",
        ]
    lines = [
        f"  broker       {where}",
        *inputs,
        f"  state        {config.topics.state.format(gateway=gateway)}  (retained)",
        *textwrap.wrap(fault_text, 100, initial_indent="  faults       ",
                       subsequent_indent=" " * 15, break_long_words=False,
                       break_on_hyphens=False),
    ]
    if metrics_url:
        lines.append(f"  metrics      {metrics_url}")
    # Ready to paste whole: the comment is the shell's.
    topic_filter = shlex.quote(_watch_filter(config))
    protobuf = " (protobuf)" if pipeline.output.type == "sparkplug" else ""
    lines.append(
        f"  mosquitto_sub -h {shlex.quote(host)} -p {port} -t {topic_filter} -v"
        f"   # watch the predictions{protobuf}"
    )
    return lines


def _render(run: _Run, elapsed: float, rates: tuple[float, float]) -> str:
    plant = run.sim.config
    lines = [
        (
            f"Floorline demo · {plant.assets} pumps at {plant.rate:g} samples/s · "
            f"{elapsed:4.0f}/{run.duration:g} s   (Ctrl-C to stop)"
        ),
        *run.header,
        "",
        f"{'asset':<9} {'true condition':<27} {'predicted':<20} {'score':>5}  {'preds':>6}",
    ]
    for name in plant.asset_names():
        truth, severity = run.sim.condition_of(name)
        truth_text = truth if truth == "healthy" else f"{truth} ({severity:.0%})"
        latest = run.card.latest.get(name)
        label, score, mark = "-", 0.0, " "
        if latest is not None:
            label, score = latest.label, latest.score
            mark = " " if latest.right else _MARKS.get(latest.kind, "*")
        count = sum(run.card.windows.get(name, Counter()).values())
        lines.append(
            f"{name:<9} {truth_text:<27} {label:<20}{mark}{score:5.2f}  {count:6d}"
        )
    dead = sum(p.dead_letters.total() for p in run.daemon.pipelines)
    lat = sorted(run.latencies)
    p50 = lat[len(lat) // 2] if lat else 0.0
    latency = "edge node to host" if run.sparkplug else "end-to-end"
    lines += [
        "",
        (
            f"in {rates[0]:7,.0f} msg/s · predictions {rates[1]:5,.0f}/s · dead letters {dead} · "
            f"{latency} p50 {p50:.1f} ms"
        ),
        *run.card.legend(short=True),
    ]
    return "\n".join(lines)


def _summary(run: _Run) -> str:
    card = run.card
    names = run.sim.config.asset_names()
    kinds: list[WindowKind] = [k for k in WindowKind if k is not WindowKind.CHANGE]
    if any(card.windows.get(n, Counter())[WindowKind.CHANGE] for n in names):
        kinds.append(WindowKind.CHANGE)
    intro = (
        "summary: share of each pump's predictions that named the condition it really had in the "
        "window they were made on, by what the pump was doing then (ramping: a fault still "
        f"growing, already at {_TRAINED_MIN_SEVERITY:.0%} severity or more"
        + ("; mixed: the window spans a sudden change of condition)"
           if WindowKind.CHANGE in kinds else ")")
    )
    lines = [
        "",
        *textwrap.wrap(intro, 96),
        f"{'asset':<9} {'condition at end':<20} "
        + "".join(f"{_COLUMNS[k]:<13}  " for k in kinds)
        + "labels predicted",
    ]
    for name in names:
        truth, _ = run.sim.condition_of(name)
        seen = ", ".join(f"{k} {n}" for k, n in card.labels.get(name, Counter()).most_common())
        lines.append(
            f"{name:<9} {truth:<20} "
            + "".join(f"{card.share(name, k):<13}  " for k in kinds)
            + seen
        )
    if card.legend():
        lines += ["", "where predictions differed from the truth (marks in the live table):"]
        lines += card.legend()
    lines.append("")
    for pname, s in run.pipeline_stats().items():
        lines.append(
            f"pipeline {pname}: {s.get('received', 0)} messages, {s.get('windows', 0)} windows, "
            f"{s.get('predictions', 0)} predictions, dead letters {s.get('dead_letters')}"
        )
    lines.append(f"simulator published {run.sim.messages} messages ({run.sim.samples} samples)")
    return "\n".join(lines)


def _show(run: _Run, out: TextIO, tty: bool) -> None:
    """Run the simulator for its duration, redrawing the table (or printing a line) as it goes."""
    sim_thread = threading.Thread(
        target=run.sim.run, kwargs={"duration": run.duration}, daemon=True
    )
    start = time.monotonic()
    sim_thread.start()
    last = (start, 0, 0)
    try:
        while sim_thread.is_alive():
            sim_thread.join(1.0 if tty else 5.0)
            run.score()
            now = time.monotonic()
            received = sum(p.counters["received"] for p in run.daemon.pipelines)
            dt = max(now - last[0], 1e-6)
            rates = ((received - last[1]) / dt, (run.board.total - last[2]) / dt)
            last = (now, received, run.board.total)
            if tty:
                # No newline after the frame: a frame as high as the terminal must not scroll.
                out.write("\x1b[H\x1b[J" + _render(run, now - start, rates))
            elif not sim_thread.is_alive():
                break  # the summary follows at once
            else:
                out.write(
                    f"t={now - start:3.0f}s  in {rates[0]:,.0f} msg/s · predictions "
                    f"{rates[1]:,.0f}/s · {run.board.total} so far\n"
                )
            out.flush()
    except KeyboardInterrupt:
        run.sim.stop()
        sim_thread.join(2)
    if tty:
        out.write("\n")


def _wait_drained(run: _Run, timeout: float = 5.0) -> None:
    """Wait up to TIMEOUT for every published message to be handled and predicted on.

    So the summary covers the whole run; QoS 0 may lose messages, hence the bound.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run.score()  # a Sparkplug board counts the predictions it has decoded
        handled = windows = predicted = failed = 0
        for p in run.daemon.pipelines:
            handled += p.counters["decoded"] + p.counters["control"] + p.dead_letters.total()
            windows += p.counters["windows"]
            predicted += p.counters["predictions"]
            failed += p.dead_letters["inference_failed"]
        if (handled >= run.sim.messages and predicted + failed >= windows
                and run.board.total >= predicted):
            return
        time.sleep(0.05)


def _prometheus_installed() -> bool:
    # The same module floorline.edge.service.metrics imports when it starts the endpoint.
    try:
        import prometheus_client  # noqa: F401, PLC0415 - optional extra, checked before starting
    except ImportError:
        return False
    return True


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
    sparkplug: bool = False,
) -> int:
    """Run the whole demo; returns an exit code. Prints a summary at the end.

    FAULTS default to :func:`default_faults` for the pumps that exist, scaled to DURATION;
    explicit ones are used as given and must name real pumps. SPARKPLUG: the plant and the
    gateway speak Sparkplug B (module docstring).
    """
    out = out or sys.stdout
    tty = out.isatty() and os.environ.get("TERM") != "dumb"
    if not duration > 0:
        print(f"floorline demo: --duration must be > 0, got {duration:g}", file=sys.stderr)
        return 2
    if metrics_port is not None and not _prometheus_installed():
        print(
            "floorline demo: --metrics-port needs prometheus-client, which is not installed: "
            "pip install 'floorline[metrics]'",
            file=sys.stderr,
        )
        return 2
    if sparkplug:
        from floorline.edge.sparkplug import require  # noqa: PLC0415 - protobuf only if used

        try:
            require("floorline demo --sparkplug")
        except FloorlineError as exc:
            print(f"floorline demo: {exc}", file=sys.stderr)
            return 2
    try:
        plant = PlantConfig(assets=assets, rate=rate,
                            fmt="sparkplug" if sparkplug else "json",
                            group=SPARKPLUG_PLANT_GROUP)
        names = plant.asset_names()
        if faults is None:
            plant.faults = list(default_faults(duration, names))
        else:
            plant.faults = [Fault.parse(f) for f in faults]
    except ValueError as exc:
        print(f"floorline demo: {exc}", file=sys.stderr)
        return 2
    if unknown := sorted({f.asset for f in plant.faults} - set(names)):
        print(f"floorline demo: faults name pumps that do not exist: {', '.join(unknown)}",
              file=sys.stderr)
        return 2
    with broker(host, port) as (bhost, bport, where):
        config = demo_config(bhost, bport, sparkplug=sparkplug)
        try:
            return _run(config, plant, where, duration, metrics_port, out, tty)
        finally:
            if config.state_dir is not None:  # always: demo_config made it
                shutil.rmtree(config.state_dir, ignore_errors=True)


def _run(
    config: Config, plant: PlantConfig, where: str, duration: float, metrics_port: int | None,
    out: TextIO, tty: bool,
) -> int:
    daemon = Daemon(config)
    sparkplug = plant.fmt == "sparkplug"
    board = PredictionBoard()
    if sparkplug:
        window = Bundle.open(config.pipelines[0].bundle).manifest.input.window
        board = SparkplugBoard((window - 1) / SAMPLE_RATE_HZ)
    header_host, header_port = config.broker.host, config.broker.port
    watcher = MqttTransport(
        config.broker, f"floorline-demo-view-{os.getpid()}", board.on_message,
        [(_watch_filter(config), 0)],
    )
    publishing: list[MqttTransport] = []  # the plant's connection, made once sim exists
    sim = PlantSimulator(plant, lambda t, p: publishing[0].publish(t, p, 0, False))
    will: Will | None = None
    commands: list[tuple[str, int]] = []
    if sparkplug:
        # An edge node registers its NDEATH as its will and obeys rebirth requests: the
        # gateway asks for one when it missed the plant's births.
        will = Will(*sim.sparkplug_will(), qos=1, retain=False)
        commands = [(f"spBv1.0/{plant.group}/NCMD/{plant.line}", 0)]

    def command(topic: str, payload: bytes, *_: object) -> None:
        sim.command(topic, payload)

    publisher = MqttTransport(config.broker, f"floorline-demo-plant-{os.getpid()}", command,
                              commands, will=will)
    publishing.append(publisher)
    metrics_server = None
    try:
        daemon.load()
        if metrics_port is not None:
            try:
                metrics_server = daemon.metrics.start_http("127.0.0.1", metrics_port)
            except FloorlineError as exc:
                print(f"floorline demo: {exc}", file=sys.stderr)
                return 1
        metrics_url = (
            f"http://127.0.0.1:{metrics_server.port}/metrics" if metrics_server else None
        )
        run = _Run(sim, board, daemon,
                   _header(config, where, header_host, header_port, plant.faults, metrics_url),
                   duration, sparkplug)
        daemon.start()
        watcher.start()
        publisher.start()
        if not (daemon.transport and daemon.transport.wait_connected(10)
                and watcher.wait_connected(10) and publisher.wait_connected(10)):
            print(f"floorline demo: could not connect to the {where}", file=sys.stderr)
            return 1
        if not tty:
            out.write(
                f"Floorline demo · {plant.assets} pumps at {plant.rate:g} samples/s for "
                f"{duration:g} s\n" + "\n".join(run.header) + "\n"
            )
            out.flush()
        _show(run, out, tty)
        _wait_drained(run)
        run.score()
    finally:
        daemon.stop()
        watcher.stop()
        publisher.stop()
        if metrics_server is not None:
            metrics_server.stop()
    out.write(_summary(run) + "\n")
    return 0


def _watch_filter(config: Config) -> str:
    """A filter for every prediction of this gateway, e.g. floorline/demo/pred/#."""
    if config.pipelines[0].output.type == "sparkplug":
        return f"spBv1.0/{SPARKPLUG_GROUP}/#"  # the gateway edge node's births and data
    # The demo's pipeline keeps the gateway's default prediction topic.
    template = config.topics.predictions
    prefix = template.format(gateway=config.gateway.id, pipeline="\0", asset="\0")
    prefix = prefix.split("\0", 1)[0].rstrip("/")
    return f"{prefix}/#" if prefix else "#"
