"""A synthetic plant: N rotating assets publishing 3-axis vibration and temperature over MQTT.

It uses the same physics (``floorline.edge.demo.signals``) as the example model's training data,
so the example bundle recognises its faults. Faults can be scheduled per asset: the severity ramps
from 0 to the target over a ramp time, as a real defect grows. The condition every sample was
generated with stays on record (:meth:`PlantSimulator.truth_at`), so a prediction can be scored
against the truth of the very window it was made on.

Time: the accelerometer is sampled at 1 kHz of *simulated* time; ``rate`` samples per second of
wall time are published per asset. Timestamps in messages are simulated time, so windows and gap
detection see a continuous 1 kHz signal whatever the publishing rate.

Message formats (topics ``plant/{line}/{asset}/vibration`` and ``.../temperature``):
- sample/json: ``{"ts": 1.0e9, "seq": 17, "accel_x": 0.1, "accel_y": -0.2, "accel_z": 0.03}``
- block/json:  ``{"samples": [{"ts": ..., "seq": ..., "accel_x": ...}, ...]}``
- block/binary: ``<d ts><Q seq>`` then float32 little-endian rows (accel_x, accel_y, accel_z)
- temperature: ``{"ts": ..., "temperature_c": 41.2}`` once per simulated second
- sparkplug (``fmt: sparkplug``): the line is a Sparkplug B edge node ``spBv1.0/{group}/.../{line}``
  and each asset a device: NBIRTH (bdSeq, Node Control/Rebirth), a DBIRTH per asset announcing
  accel_x/y/z and temperature_c (Double) with aliases, then DDATA by alias (sample mode: one
  sample per message; block mode: each metric repeated per sample, with its own timestamp), seq
  wrapping 255 -> 0. :meth:`PlantSimulator.sparkplug_will` is the NDEATH to register as the MQTT
  will, :meth:`PlantSimulator.command` answers a ``Node Control/Rebirth`` NCMD with new births.
"""

from __future__ import annotations

import bisect
import re
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Literal

import numpy as np
import orjson

from floorline.edge.demo.signals import SAMPLE_RATE_HZ, AssetParams, AssetSignal, Condition

if TYPE_CHECKING:
    from floorline.edge.sparkplug import payload as sp

Publish = Callable[[str, bytes], None]

_TICK_S = 0.02
_FAULT_SPEC = re.compile(
    r"^(?P<asset>[^=]+)=(?P<condition>[a-z_]+)(?:@(?P<start>[\d.]+))?(?:\+(?P<ramp>[\d.]+))?"
    r"(?::(?P<severity>[\d.]+))?$"
)


@dataclass(frozen=True)
class Fault:
    """A fault that appears on ASSET at START_S (wall seconds) and grows to SEVERITY over RAMP_S."""

    asset: str
    condition: Condition
    start_s: float = 0.0
    ramp_s: float = 0.0
    severity: float = 1.0

    def severity_at(self, elapsed: float) -> float:
        """Severity at ELAPSED seconds since the simulation started (0 before the start)."""
        if elapsed < self.start_s:
            return 0.0
        if self.ramp_s <= 0:
            return self.severity
        return self.severity * min(1.0, (elapsed - self.start_s) / self.ramp_s)

    def spec(self) -> str:
        """The fault as :meth:`parse` reads it, e.g. 'pump-03=imbalance@10+20'."""
        text = f"{self.asset}={self.condition.value}@{self.start_s:g}+{self.ramp_s:g}"
        return text if self.severity == 1.0 else f"{text}:{self.severity:g}"

    @classmethod
    def parse(cls, text: str) -> Fault:
        """Parse 'ASSET=CONDITION[@START][+RAMP][:SEVERITY]', e.g. 'pump-03=imbalance@10+20'."""
        m = _FAULT_SPEC.match(text.strip())
        if not m:
            raise ValueError(
                f"fault {text!r}: expected ASSET=CONDITION[@START_S][+RAMP_S][:SEVERITY]"
            )
        try:
            condition = Condition(m["condition"])
        except ValueError:
            names = ", ".join(c.value for c in Condition)
            raise ValueError(f"fault {text!r}: unknown condition; choose {names}") from None
        return cls(
            asset=m["asset"],
            condition=condition,
            start_s=float(m["start"] or 0),
            ramp_s=float(m["ramp"] or 0),
            severity=min(1.0, float(m["severity"] or 1.0)),
        )


@dataclass
class PlantConfig:
    """What to simulate and how to publish it."""

    assets: int = 8
    line: str = "line1"
    rate: float = 200.0
    """Samples per wall-clock second per asset."""
    mode: Literal["sample", "block"] = "sample"
    fmt: Literal["json", "binary", "sparkplug"] = "json"
    block: int = 64
    """Samples per block message."""
    faults: list[Fault] = field(default_factory=list)
    seed: int = 0
    qos: int = 0
    temperature: bool = True
    start_time: float | None = None
    """Simulated epoch time of the first sample; default: now."""
    group: str = "plant"
    """Sparkplug group id (``fmt: sparkplug``); the edge node id is ``line``."""
    bdseq: int = 0
    """Sparkplug bdSeq of this session (NBIRTH and the NDEATH will)."""

    def asset_names(self) -> list[str]:
        """pump-01, pump-02, ..."""
        return [f"pump-{i + 1:02d}" for i in range(self.assets)]


@dataclass(frozen=True)
class Truth:
    """What an asset really had when a sample was generated: the simulator's ground truth."""

    condition: Condition
    severity: float
    """0 while healthy."""
    ramping: bool
    """The fault's severity was still growing towards its target."""


_HEALTHY = Truth(Condition.HEALTHY, 0.0, ramping=False)


class _Asset:
    def __init__(self, name: str, signal: AssetSignal, faults: list[Fault]) -> None:
        self.name = name
        self.signal = signal
        self.faults = faults
        self.sent = 0
        self.pending: list[np.ndarray] = []
        self.next_temperature = 0
        # (first sample, truth from that sample on), appended as the condition changes.
        self.history: list[tuple[int, Truth]] = [(0, _HEALTHY)]


class PlantSimulator:
    """Publishes the configured plant until stopped or a duration passes."""

    def __init__(self, config: PlantConfig, publish: Publish) -> None:
        if config.mode == "sample" and config.fmt == "binary":
            raise ValueError("binary messages carry blocks: use mode 'block' with fmt 'binary'")
        self.config = config
        self._publish = publish
        rng = np.random.default_rng(config.seed)
        names = config.asset_names()
        unknown = {f.asset for f in config.faults} - set(names)
        if unknown:
            raise ValueError(f"faults name unknown assets {sorted(unknown)}; assets are {names}")
        self._assets = [
            _Asset(
                name,
                AssetSignal(AssetParams.random(rng), np.random.default_rng(rng.integers(2**32))),
                [f for f in config.faults if f.asset == name],
            )
            for name in names
        ]
        self._by_name = {a.name: a for a in self._assets}
        self._t0 = config.start_time if config.start_time is not None else time.time()
        self.messages = 0
        self.samples = 0
        self._stop = threading.Event()
        # The histories grow on run()'s thread and are read by whoever scores predictions.
        self._history_lock = threading.Lock()
        self._spb: _Sparkplug | None = _Sparkplug(self) if config.fmt == "sparkplug" else None


    def send(self, topic: str, payload: bytes) -> None:
        """Publish PAYLOAD on TOPIC through the simulator's publish path (its Sparkplug node)."""
        self._publish(topic, payload)
    def stop(self) -> None:
        """Ask run() to return after the current tick."""
        self._stop.set()

    def sparkplug_will(self) -> tuple[str, bytes]:
        """The NDEATH (topic, payload) to register as the MQTT will (``fmt: sparkplug``)."""
        if self._spb is None:
            raise ValueError("sparkplug_will: the simulator's fmt is not sparkplug")
        return self._spb.will()

    def command(self, topic: str, payload: bytes) -> bool:
        """Handle an NCMD for this edge node; True when it asked for a rebirth.

        Safe from another thread (an MQTT callback): the births go out on run()'s next tick, or
        at the next step().
        """
        return self._spb is not None and self._spb.command(topic, payload)

    def condition_of(self, asset: str) -> tuple[str, float]:
        """The condition and severity an asset has now (ground truth, for the demo)."""
        a = self._by_name[asset]
        return a.signal.condition.value, a.signal.severity

    def truth_at(self, asset: str, sample: int) -> Truth:
        """The condition ASSET had when its sample number SAMPLE was generated.

        For a sample not generated yet: the condition it has now.
        """
        a = self._by_name[asset]
        with self._history_lock:
            i = bisect.bisect_right(a.history, sample, key=itemgetter(0))
            return a.history[max(i - 1, 0)][1]

    def sample_index(self, ts: float) -> int:
        """The sample number whose published timestamp is TS (the ``seq`` sent with it)."""
        return round((ts - self._t0) * SAMPLE_RATE_HZ)

    def topic(self, asset: str, kind: str = "vibration") -> str:
        """The topic an asset publishes KIND on."""
        return f"plant/{self.config.line}/{asset}/{kind}"

    def run(self, duration: float | None = None, max_samples: int | None = None) -> None:
        """Publish in real time for DURATION seconds (None: until stop()).

        With MAX_SAMPLES, stop once every asset has produced that many samples.
        """
        start = time.monotonic()
        while not self._stop.is_set():
            elapsed = time.monotonic() - start
            if duration is not None and elapsed >= duration:
                break
            due = int(elapsed * self.config.rate) + 1
            if max_samples is not None:
                due = min(due, max_samples)
            for asset in self._assets:
                self._update_condition(asset, elapsed)
                if due > asset.sent:
                    self._emit(asset, due - asset.sent)
            if max_samples is not None and all(a.sent >= max_samples for a in self._assets):
                break
            self._stop.wait(_TICK_S)
        self.flush()

    def step(self, samples: int) -> None:
        """Produce SAMPLES more samples per asset immediately (no clock), for tests and benches."""
        for asset in self._assets:
            self._emit(asset, samples)

    def flush(self) -> None:
        """Publish partial blocks (block mode) so nothing generated is withheld."""
        for asset in self._assets:
            if asset.pending:
                block = np.concatenate(asset.pending)
                asset.pending = []
                self._send_block(asset, asset.sent - len(block), block)

    def _update_condition(self, asset: _Asset, elapsed: float) -> None:
        active = [f for f in asset.faults if elapsed >= f.start_s]
        if not active:
            return
        fault = active[-1]
        severity = fault.severity_at(elapsed)
        if (asset.signal.condition, asset.signal.severity) != (fault.condition, severity):
            asset.signal.set_condition(fault.condition, severity)
            truth = Truth(fault.condition, asset.signal.severity, severity < fault.severity)
            with self._history_lock:
                asset.history.append((asset.sent, truth))

    def _emit(self, asset: _Asset, n: int) -> None:
        if self._spb is not None:
            self._spb.births_if_due()
        first = asset.sent
        values = asset.signal.next_block(n)
        asset.sent += n
        self.samples += n
        if self.config.mode == "sample":
            for i in range(n):
                self._send_sample(asset, first + i, values[i])
        else:
            asset.pending.append(values)
            held = sum(len(p) for p in asset.pending)
            if held >= self.config.block:
                block = np.concatenate(asset.pending)
                base = asset.sent - len(block)  # sequence number of block[0]
                cut = (len(block) // self.config.block) * self.config.block
                asset.pending = [block[cut:]] if cut < len(block) else []
                for i in range(0, cut, self.config.block):
                    self._send_block(asset, base + i, block[i : i + self.config.block])
        if self.config.temperature:
            sim_seconds = int(asset.sent / SAMPLE_RATE_HZ)
            while asset.next_temperature <= sim_seconds:
                ts = self._t0 + asset.next_temperature
                celsius = round(asset.signal.temperature_c(), 3)
                if self._spb is not None:
                    self._spb.temperature(asset.name, ts, celsius)
                else:
                    payload = {"ts": ts, "temperature_c": celsius}
                    self._publish(self.topic(asset.name, "temperature"), orjson.dumps(payload))
                asset.next_temperature += 1

    def _ts(self, seq: int) -> float:
        return self._t0 + seq / SAMPLE_RATE_HZ

    def _send_sample(self, asset: _Asset, seq: int, row: np.ndarray) -> None:
        if self._spb is not None:
            self._spb.data(asset.name, [self._ts(seq)], row.reshape(1, -1))
            self.messages += 1
            return
        x, y, z = row.tolist()
        payload = orjson.dumps(
            {"ts": self._ts(seq), "seq": seq, "accel_x": x, "accel_y": y, "accel_z": z}
        )
        self._publish(self.topic(asset.name), payload)
        self.messages += 1

    def _send_block(self, asset: _Asset, first: int, block: np.ndarray) -> None:
        if self._spb is not None:
            self._spb.data(asset.name, [self._ts(first + i) for i in range(len(block))], block)
            self.messages += 1
            return
        if self.config.fmt == "binary":
            payload = struct.pack("<dQ", self._ts(first), first) + block.astype("<f4").tobytes()
        else:
            rows = block.tolist()
            payload = orjson.dumps(
                {
                    "samples": [
                        {"ts": self._ts(first + i), "seq": first + i,
                         "accel_x": r[0], "accel_y": r[1], "accel_z": r[2]}
                        for i, r in enumerate(rows)
                    ]
                }
            )
        self._publish(self.topic(asset.name), payload)
        self.messages += 1


_AXES = ("accel_x", "accel_y", "accel_z")


class _Sparkplug:
    """The plant as one Sparkplug B edge node (the line) with a device per asset."""

    def __init__(self, sim: PlantSimulator) -> None:
        from floorline.edge.sparkplug import require  # noqa: PLC0415 - protobuf only if used

        require("the simulator's sparkplug format")
        from floorline.edge.sparkplug import payload, topics  # noqa: PLC0415

        self._p = payload
        self._t = topics
        self._sim = sim
        config = sim.config
        topics.check_id(config.group, "group")
        topics.check_id(config.line, "line (the edge node id)")
        self._group, self._node = config.group, config.line
        self._devices = config.asset_names()
        # Aliases unique over the node: asset i's metrics are 10*(i+1) + 0..3.
        self._alias = {name: 10 * (i + 1) for i, name in enumerate(self._devices)}
        self._seq = 0
        self._born = False
        self._rebirth = threading.Event()
        self.rebirths = 0
        """Rebirths answered."""

    def will(self) -> tuple[str, bytes]:
        p = self._p
        message = p.build([p.bdseq_metric(self._sim.config.bdseq)])
        return (self._t.node_topic(self._group, "NDEATH", self._node),
                message.SerializeToString())

    def command(self, topic: str, payload: bytes) -> bool:
        t = self._t.parse_topic(topic)
        if t is None or t.type != "NCMD" or (t.group, t.node) != (self._group, self._node):
            return False
        try:
            message = self._p.parse(payload)
        except self._p.PayloadError:
            return False
        if not self._p.is_rebirth_request(message):
            return False
        self._rebirth.set()
        return True

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = self._p.next_seq(seq)
        return seq

    def births_if_due(self) -> None:
        if self._born and not self._rebirth.is_set():
            return
        if self._born:
            self.rebirths += 1
        self._rebirth.clear()
        self._born = True
        p, dt = self._p, self._p.DataType
        self._seq = 0  # NBIRTH starts the node's seq at 0
        nbirth = p.build([p.bdseq_metric(self._sim.config.bdseq),
                          p.metric("Node Control/Rebirth", dt.Boolean, False)],
                         seq=self._next_seq())
        self._send(self._t.node_topic(self._group, "NBIRTH", self._node), nbirth)
        for device in self._devices:
            base = self._alias[device]
            metrics = [p.metric(name, dt.Double, 0.0, alias=base + i)
                       for i, name in enumerate((*_AXES, "temperature_c"))]
            self._send(self._topic("DBIRTH", device), p.build(metrics, seq=self._next_seq()))

    def data(self, device: str, times: list[float], rows: np.ndarray) -> None:
        p, dt = self._p, self._p.DataType
        base = self._alias[device]
        metrics: list[sp.Metric] = []
        for ts, row in zip(times, rows.tolist(), strict=True):
            ms = round(ts * 1000)
            metrics.extend(p.metric(None, dt.Double, float(v), alias=base + i, timestamp=ms)
                           for i, v in enumerate(row))
        message = p.build(metrics, seq=self._next_seq(), timestamp=round(times[-1] * 1000))
        self._send(self._topic("DDATA", device), message)

    def temperature(self, device: str, ts: float, celsius: float) -> None:
        p = self._p
        ms = round(ts * 1000)
        metric = p.metric(None, p.DataType.Double, celsius, alias=self._alias[device] + 3,
                          timestamp=ms)
        self._send(self._topic("DDATA", device), p.build([metric], seq=self._next_seq(),
                                                          timestamp=ms))

    def _topic(self, kind: Literal["DBIRTH", "DDATA"], device: str) -> str:
        return self._t.device_topic(self._group, kind, self._node, device)

    def _send(self, topic: str, message: sp.Payload) -> None:
        self._sim.send(topic, message.SerializeToString())
