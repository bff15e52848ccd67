"""Floorline against its ceilings: one run, one broker, every figure a ratio to what bounds it.

    .venv/bin/python -m tests.benchmark [--quick | --tiny] [--json bench-results.json]
                                        [--no-train] [--profile DIR] [--keep]

Starts its own mosquitto (``tests/mqtt_broker.Mosquitto``: 127.0.0.1, a free port, never the
system broker) and measures, on the committed example bundle ``edge/models/pdm-classifier``:

1. ceilings: a bare paho subscriber that only counts (MQTT 3.1.1 and 5), a paho echo client that
   publishes one prediction-sized message per message (both protocols, binary and JSON block
   feeds), the same two receiving with floorline's own reader (``floorline.edge.mqtt.reader``, what
   the
   daemon receives with), and the raw LiteRT backend at batch 1 and 32 (and 18, and
   alternating 32/18);
2. ``floorline run`` (its own process) on a per-sample JSON stream of 50 assets: the highest rate
   it sustains without losing anything, by bounded bisection up to the larger of the two bare
   subscribers' ceilings, per protocol; reported against both, the goal against stock paho's;
3. the same for one-window-per-message block streams (binary float32 and JSON blocks), searched
   up to the larger of the two echo ceilings;
4. publish-to-prediction latency at half the sustained per-sample rate, split into publish →
   daemon receipt, the daemon's own ``end_to_end``, and encoded → collector;
5. the daemon's resident memory, and its time from process start to READY=1 on $NOTIFY_SOCKET;
6. the naive way (``tests/naive_baseline.py``: paho, ``json.loads``, Keras ``model.predict``)
   on the same per-sample stream, searched the same way. It needs the trained Keras model
   (``.work/pdm/pdm.keras``): when that is missing the benchmark trains it once, or, with
   ``--no-train`` (the smoke test), skips this part only and says so (``"naive": {"skipped":
   why}``, the target marked skipped, a line in the table).

With ``--profile DIR`` it then py-spies the daemon at the sustained rates it found (speedscope
files in DIR, top functions in the output), breaks its memory down by import, and measures the
proposed changes it can try without touching ``edge/`` (see ``experiments``).

How it measures, and why:

- The machine is small and shared: absolute figures drift from run to run, so every throughput
  is reported beside the ceiling measured in the same run on the same broker, as a ratio.
- The load generator must never be what is measured. It is a separate process writing
  pre-encoded MQTT PUBLISH packets straight to its socket (QoS 0 needs nothing else), in 0.5 ms
  ticks, so it takes a fraction of a core at any rate the receivers can take. paho is used only on
  the receiving side, which is what the ceilings are about.
- Ceilings are blasted: the publisher writes as fast as the broker reads and the receiver is
  measured while flooded, after a fifth of the burst for start-up. The echo clients publish at
  QoS 0 (see ``echo_main`` for why); the daemon publishes its predictions at QoS 1 through its
  outbox, as configured in ``tests/soak.py`` and by default.
- A rate is *sustained* when nothing was lost and no backlog built up. Nothing lost: every
  expected prediction arrived (each stream ends on a window boundary, so every sample lies in
  some window and one lost message costs at least one prediction) and, from the daemon's stats
  topic, it received every message and dropped none. No backlog: the latency neither grew over
  the step nor stood high (``latency_trend``, ``TREND_LIMIT_S``, ``LATENCY_CAP_S``); the
  daemon's inbox and the broker's queue would otherwise hide an overload for seconds.
- Latency is measured from the publisher's send time of a window's last message to the
  collector's receipt of its prediction, on ``time.monotonic()`` in both processes (Linux
  CLOCK_MONOTONIC is system-wide).

Not part of the test suite (``tests/test_benchmark_smoke.py`` runs ``--tiny --no-train``);
nothing is downloaded at run time. docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import orjson
import paho.mqtt.client as mqtt
from numpy.typing import NDArray
from paho.mqtt.enums import CallbackAPIVersion

from floorline.edge.mqtt.reader import BufferedClient, Publish
from tests.bench_patches import PATCHES
from tests.mqtt_broker import HOST, Mosquitto

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "edge" / "models" / "pdm-classifier"
KERAS_MODEL = ROOT / ".work" / "pdm" / "pdm.keras"
KERAS_CARD = ROOT / ".work" / "pdm" / "card.yaml"
NAIVE_SKIPPED = (f"needs {KERAS_MODEL.relative_to(ROOT)} (python -m "
                 "floorline.converter.examples.pdm makes it; --no-train does not train)")
"""Why the naive way was not run: its ``skipped`` under ``--no-train`` without the Keras model."""

Protocol = Literal["3.1.1", "5"]
Kind = Literal["sample", "binary", "json_block"]
Reader = Literal["paho", "floorline"]
"""How a ceiling's client receives: stock paho (``on_message`` per message), or floorline's own
reader (``floorline.edge.mqtt.reader.BufferedClient``, the daemon's: PUBLISH runs to
``on_publishes``)."""
PROTOCOLS: tuple[Protocol, ...] = ("3.1.1", "5")
READERS: tuple[Reader, ...] = ("paho", "floorline")
CEILING_KEYS: dict[Reader, tuple[str, str]] = {
    "paho": ("bare", "echo"), "floorline": ("bare_floorline", "echo_floorline")
}
"""Where each reader's (bare subscriber, echo) ceilings go in the results' ``ceilings``."""
READER_LABELS: dict[Reader, str] = {"paho": "stock paho", "floorline": "floorline reader"}
BLOCK_KINDS: tuple[Kind, ...] = ("binary", "json_block")

WINDOW = 64  # the example bundle's window; checked against its manifest at start
HOP = 32
BATCH = 32
MAX_WAIT_MS = 5
FEATURES = 3
SAMPLE_INTERVAL_S = 0.001  # simulated 1 kHz sensor time in the payloads' timestamps
TREND_LIMIT_S = 0.1
"""How much the daemon's latency may grow over a sustained step (see ``latency_trend``)."""
LATENCY_CAP_S = 0.5
"""The daemon's latency in a sustained step stays below this (fifths' medians): 100 times its
max_wait_ms, far above what it adds when it keeps up, far below a standing backlog."""
TICK_S = 0.0005
"""The paced publisher's write period: coarse enough to batch writes, fine enough for latency."""
KEEPALIVE_S = 60000  # the raw publisher never pings; mosquitto caps keepalive at 65535
SAMPLE_TOPIC = "plant/bench/{asset}/vibration"
BLOCK_TOPICS: dict[Kind, str] = {
    "sample": SAMPLE_TOPIC,
    "binary": "plant/bench/{asset}/vibration-bin",
    "json_block": "plant/bench/{asset}/vibration-blk",
}
FEED_FILTERS: dict[Kind, str] = {
    "sample": "plant/+/+/vibration",
    "binary": "plant/+/+/vibration-bin",
    "json_block": "plant/+/+/vibration-blk",
}
# What the echo client publishes per message: the size of a real prediction, so the ceiling pays
# for the same bytes the daemon sends.
ECHO_PAYLOAD = orjson.dumps({
    "gateway": "bench", "pipeline": "vibration", "asset": "s00-pump-01", "seq": 141,
    "model": {"name": "pdm-classifier", "version": "1.0.0", "artifact": "model.tflite",
              "sha256": "5fb67d5a50e77d7dabc0334376f0cd39896b53a386e484b796a19e6faaf75a56"},
    "window": {"start": 1732780012.345, "end": 1732780012.408, "samples": 64},
    "latency_ms": {"inference": 0.41, "end_to_end": 3.2}, "batch": 4, "ts": 1732780012.6,
    "label": "imbalance", "score": 0.97,
    "scores": {"healthy": 0.02, "imbalance": 0.97, "bearing_outer_race": 0.01, "looseness": 0.0},
})


@dataclass(frozen=True)
class Budget:
    """How long each kind of measurement runs (full, --quick and --tiny differ only here)."""

    ceiling_s: float
    """Each blast for a ceiling."""
    ceiling_bursts: int
    step_s: float
    """Each offered rate of the per-sample searches."""
    steps: int
    block_step_s: float
    block_steps: int
    naive_steps: int
    latency_s: float
    backend_s: float
    """Each LiteRT loop."""
    warmup_s: float
    assets: int = 50


FULL = Budget(ceiling_s=3.0, ceiling_bursts=2, step_s=4.0, steps=6, block_step_s=3.0,
              block_steps=5, naive_steps=4, latency_s=10.0, backend_s=1.0, warmup_s=1.0)
QUICK = Budget(ceiling_s=1.0, ceiling_bursts=1, step_s=1.5, steps=3, block_step_s=1.5,
               block_steps=3, naive_steps=1, latency_s=3.0, backend_s=0.3, warmup_s=0.5)
# The smoke test's: every section once, in seconds; 8 assets so the naive way's step stays short.
# Its naive way runs only when the Keras model is already there (it passes --no-train).
TINY = Budget(ceiling_s=0.4, ceiling_bursts=1, step_s=0.4, steps=1, block_step_s=0.4,
              block_steps=1, naive_steps=1, latency_s=0.5, backend_s=0.1, warmup_s=0.2, assets=8)


# -- MQTT on the wire (the load generator only) -------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def publish_frame(topic: bytes, payload: bytes, *, v5: bool) -> bytes:
    """One QoS 0 PUBLISH packet (MQTT 5 adds an empty property list)."""
    head = struct.pack("!H", len(topic)) + topic + (b"\x00" if v5 else b"")
    return b"\x30" + _varint(len(head) + len(payload)) + head + payload


class RawPublisher:
    """A QoS 0 MQTT publisher that writes pre-encoded PUBLISH packets to its socket.

    paho's publish path costs tens of microseconds per message in Python; a load generator built
    on it would be the bottleneck it is meant to measure around.
    """

    def __init__(self, host: str, port: int, protocol: Protocol, client_id: str) -> None:
        self.v5 = protocol == "5"
        self._sock = socket.create_connection((host, port), timeout=10)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        var = b"\x00\x04MQTT" + bytes([5 if self.v5 else 4, 0x02])  # clean session
        var += struct.pack("!H", KEEPALIVE_S) + (b"\x00" if self.v5 else b"")
        body = var + _utf8(client_id)
        self._sock.sendall(b"\x10" + _varint(len(body)) + body)
        head = self._recv_exact(2)
        rest = self._recv_exact(head[1])  # CONNACK's remaining length fits one byte
        if head[0] != 0x20 or rest[1] != 0:
            raise ConnectionError(f"broker refused the raw publisher: CONNACK {head + rest!r}")
        self._sock.settimeout(None)

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("broker closed the connection during CONNECT")
            data += chunk
        return data

    def write(self, data: memoryview | bytes) -> None:
        """Send DATA (whole packets), blocking while the broker's socket buffer is full."""
        self._sock.sendall(data)

    def close(self) -> None:
        """DISCONNECT and close."""
        with contextlib.suppress(OSError):
            self._sock.sendall(b"\xe0\x00")
        self._sock.close()


# -- streams ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    """A stream of ASSETS interleaved round-robin: message m is asset m % assets, index m // assets.

    ``per_asset`` messages per asset; a ``sample`` message is one sample (sequence = index), a
    block message is one window of ``WINDOW`` samples (first sequence = index * WINDOW).
    """

    kind: Kind
    prefix: str
    assets: int
    per_asset: int
    seed: int = 0

    def asset(self, a: int) -> str:
        """Asset name of index A (unique per step: nothing of another step can be mistaken)."""
        return f"{self.prefix}-pump-{a + 1:02d}"

    @property
    def messages(self) -> int:
        """Messages in the stream."""
        return self.assets * self.per_asset

    def expected_windows(self) -> int:
        """Windows (so predictions) the stream makes with hop HOP (samples) or one per block."""
        if self.kind != "sample":
            return self.messages
        n = self.per_asset
        return self.assets * (0 if n < WINDOW else (n - WINDOW) // HOP + 1)

    def end_message(self, asset: int, window: int) -> int:
        """Index of the message that completes window number WINDOW of ASSET."""
        if self.kind == "sample":
            return (WINDOW - 1 + HOP * window) * self.assets + asset
        return window * self.assets + asset


DAEMON_ENTRY = ["-m", "floorline.edge"]
"""How the daemon is started (the ``floorline`` console script's module)."""

MIN_ROUNDS = 3
"""Windows per asset in a step at least, so the latency trend has a first and a last round."""


def samples_per_asset(rate: float, duration: float, assets: int) -> int:
    """Per-asset sample count for RATE msgs/s over DURATION: a whole number of hops past a window.

    Ending every asset's stream exactly at a window boundary puts every sample inside some window,
    so a single lost message always shows as a missing prediction.
    """
    rounds = round((rate * duration / assets - WINDOW) / HOP) + 1
    return WINDOW + HOP * (max(MIN_ROUNDS, rounds) - 1)


def stream_messages(spec: StreamSpec) -> list[tuple[str, bytes]]:
    """SPEC's (topic, payload) messages in sending order."""
    from floorline.edge.demo.signals import AssetParams, AssetSignal  # noqa: PLC0415 - numpy only, but heavy

    rng = np.random.default_rng(spec.seed)
    per_msg = 1 if spec.kind == "sample" else WINDOW
    values = [
        AssetSignal(AssetParams.random(rng), rng).next_block(spec.per_asset * per_msg).tolist()
        for _ in range(spec.assets)
    ]
    topics = [BLOCK_TOPICS[spec.kind].format(asset=spec.asset(a)) for a in range(spec.assets)]
    t0 = time.time()
    messages: list[tuple[str, bytes]] = []
    for i in range(spec.per_asset):
        for a in range(spec.assets):
            rows = values[a]
            if spec.kind == "sample":
                x, y, z = rows[i]
                payload = orjson.dumps({"ts": t0 + i * SAMPLE_INTERVAL_S, "seq": i,
                                        "accel_x": x, "accel_y": y, "accel_z": z})
            else:
                first = i * WINDOW
                block = rows[first : first + WINDOW]
                if spec.kind == "binary":
                    payload = struct.pack("<dQ", t0 + first * SAMPLE_INTERVAL_S, first)
                    payload += np.asarray(block, dtype="<f4").tobytes()
                else:
                    payload = orjson.dumps({"samples": [
                        {"ts": t0 + (first + j) * SAMPLE_INTERVAL_S, "seq": first + j,
                         "accel_x": r[0], "accel_y": r[1], "accel_z": r[2]}
                        for j, r in enumerate(block)
                    ]})
            messages.append((topics[a], payload))
    return messages


def build_stream(spec: StreamSpec, *, v5: bool) -> tuple[bytes, NDArray[np.int64]]:
    """The encoded PUBLISH packets of SPEC concatenated, and each message's end offset."""
    frames = [publish_frame(t.encode(), p, v5=v5) for t, p in stream_messages(spec)]
    ends = np.cumsum(np.fromiter(map(len, frames), dtype=np.int64, count=len(frames)))
    return b"".join(frames), ends


# -- worker processes ------------------------------------------------------------------------------


@dataclass
class SendReport:
    """What the publisher process did for one command."""

    sent: int
    started: float
    finished: float
    send_times: NDArray[np.float64] | None = None
    """Per message, ``time.monotonic()`` just before the write that carried it (paced only)."""

    @property
    def rate(self) -> float:
        """Messages per second actually offered."""
        return self.sent / max(self.finished - self.started, 1e-9)


def _paced(wire: RawPublisher, data: bytes, ends: NDArray[np.int64], rate: float) -> SendReport:
    n = len(ends)
    view = memoryview(data)
    times = np.empty(n, dtype=np.float64)
    sent = 0
    offset = 0
    start = time.monotonic()
    while sent < n:
        now = time.monotonic()
        due = min(n, int((now - start) * rate) + 1)
        if due > sent:
            end = int(ends[due - 1])
            times[sent:due] = now
            wire.write(view[offset:end])
            sent, offset = due, end
            continue
        # Sleep to the next message's time, at least a tick: writes are batched, never spun for.
        time.sleep(max(TICK_S, start + sent / rate - now))
    return SendReport(sent, start, time.monotonic(), times)


def _blast(wire: RawPublisher, data: bytes, ends: NDArray[np.int64], duration: float) -> SendReport:
    # Chunks of ~64 KiB of whole packets: the duration is checked often, writes stay large.
    view = memoryview(data)
    cuts = [0]
    for end in ends.tolist():
        if end - cuts[-1] >= 65536:
            cuts.append(end)
    if cuts[-1] != len(data):
        cuts.append(len(data))
    per_chunk = np.searchsorted(ends, np.asarray(cuts[1:]), side="right") - np.searchsorted(
        ends, np.asarray(cuts[:-1]), side="right")
    chunks = list(zip(cuts[:-1], cuts[1:], per_chunk.tolist(), strict=True))
    sent = 0
    start = time.monotonic()
    deadline = start + duration
    while time.monotonic() < deadline:
        for a, b, count in chunks:
            wire.write(view[a:b])
            sent += count
            if time.monotonic() >= deadline:
                break
    return SendReport(sent, start, time.monotonic())


def publisher_main(conn: Connection, port: int, protocol: Protocol) -> None:
    """Publisher process: build and send streams on command; reply with a SendReport each."""
    wire = RawPublisher(HOST, port, protocol, f"bench-pub-{uuid.uuid4().hex[:6]}")
    conn.send("ready")
    try:
        while True:
            command = conn.recv()
            if command is None:
                return
            op, spec, arg = command
            data, ends = build_stream(spec, v5=wire.v5)
            conn.send("built")
            report = _paced(wire, data, ends, arg) if op == "paced" else _blast(
                wire, data, ends, arg)
            conn.send(report)
    finally:
        wire.close()


def _paho_client(protocol: Protocol, prefix: str, *, reader: Reader = "paho") -> mqtt.Client:
    return (BufferedClient if reader == "floorline" else mqtt.Client)(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"{prefix}-{uuid.uuid4().hex[:6]}",
        protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
    )


def _network_loop(client: mqtt.Client, stop: threading.Event) -> None:
    # The same loop edge/transport.py runs (client.loop on our own thread), so the ceilings pay
    # exactly paho's per-message cost the daemon pays.
    while not stop.is_set():
        client.loop(timeout=0.05)


def _connect_and_subscribe(
    client: mqtt.Client, port: int, topic_filter: str
) -> Callable[[], None]:
    """Connect, subscribe, run the network loop on a thread; returns what stops that thread."""
    subscribed = threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect(HOST, port, keepalive=60)
    client.subscribe(topic_filter, 0)
    stop = threading.Event()
    loop = threading.Thread(target=_network_loop, args=(client, stop), daemon=True)
    loop.start()
    if not subscribed.wait(10):
        raise TimeoutError(f"no SUBACK for {topic_filter}")

    def halt() -> None:
        # Joined, not just told: floorline's reader has one writer, and the caller's
        # disconnect() writes next (racing the loop's own writes raised BufferError).
        stop.set()
        loop.join(5)

    return halt


@dataclass
class CountReport:
    """A counting subscriber's view of one burst of traffic."""

    received: int
    rate: float
    """Messages per second over the burst after its first fifth (start-up excluded)."""
    span_s: float
    """From the first message to the end of the burst."""


def _timeline_rate(timeline: list[tuple[float, int]]) -> CountReport:
    t = np.array([p[0] for p in timeline])
    n = np.array([p[1] for p in timeline]) - timeline[0][1]
    total = int(n[-1])
    if total < 2:
        return CountReport(total, 0.0, 0.0)
    first = int(np.argmax(n > 0))  # sampled every 10 ms: when traffic started arriving
    span = float(t[-1] - t[first])
    # The first fifth is start-up (connections filling, the broker's queue building up).
    cut = int(np.searchsorted(t, t[first] + span / 5))
    if cut >= len(t) - 1:
        return CountReport(total, total / span if span > 0 else 0.0, span)
    return CountReport(total, float((total - n[cut]) / (t[-1] - t[cut])), span)


def _receive(
    client: mqtt.Client, on_topic: Callable[[str], None],
    on_batch: Callable[[list[Publish]], None],
) -> None:
    """Have CLIENT call ON_TOPIC per message paho delivers, ON_BATCH per run of PUBLISH packets.

    With the floorline reader paho still delivers the odd message itself (``on_message``), so a
    receiver needs both; stock paho only ever calls ON_TOPIC.
    """
    client.on_message = lambda _client, _userdata, msg: on_topic(msg.topic)
    if isinstance(client, BufferedClient):
        client.on_publishes = lambda batch, _received: on_batch(batch)


def counter_main(
    conn: Connection, port: int, protocol: Protocol, topic_filter: str, reader: Reader = "paho"
) -> None:
    """Bare subscriber process: counts messages, nothing else; reports bursts on command.

    A burst is measured from "arm" to "finish" (sent when the blast ends): the subscriber is
    flooded all along, so its rate is its capacity. Whatever the broker still queues for it is
    never waited for: the next measurement uses a new client, and this one's queue goes with it.
    READER ``floorline`` receives with the daemon's own reader (``floorline.edge.mqtt.reader``),
    counting
    each PUBLISH run by its length.
    """
    count = 0

    def one(_topic: str) -> None:
        nonlocal count
        count += 1

    def run(batch: list[Publish]) -> None:
        nonlocal count
        count += len(batch)

    client = _paho_client(protocol, "bench-count", reader=reader)
    _receive(client, one, run)
    stop = _connect_and_subscribe(client, port, topic_filter)
    conn.send("ready")
    while conn.recv() is not None:
        timeline = [(time.monotonic(), count)]
        conn.send("armed")
        while not conn.poll(0.01):
            timeline.append((time.monotonic(), count))
        conn.recv()
        timeline.append((time.monotonic(), count))
        conn.send(_timeline_rate(timeline))
    stop()
    client.disconnect()


def echo_main(
    conn: Connection, port: int, protocol: Protocol, topic_filter: str, reader: Reader = "paho"
) -> None:
    """Echo process: for every message received, publish one prediction-sized message.

    At QoS 0: the cheapest receive-one-publish-one there is, so the ceiling is an upper bound. At
    QoS 1 a flood stalls it instead: its PUBACKs queue behind the flood on the same socket and
    the in-flight window closes (measured: ~200 echoes/s on MQTT 5), which says nothing about
    its capacity. The daemon publishes predictions at QoS 1, through its outbox, and that cost
    is part of what its ratio to this ceiling shows. READER ``floorline`` receives with the
    daemon's own reader (``floorline.edge.mqtt.reader``); it publishes through paho all the same.
    """
    received = 0
    client = _paho_client(protocol, "bench-echo", reader=reader)

    def one(topic: str) -> None:
        nonlocal received
        received += 1
        # The asset level of the topic, as the daemon takes it (topic_segment -2).
        client.publish("echo/" + topic.rsplit("/", 2)[1], ECHO_PAYLOAD, qos=0)

    def run(batch: list[Publish]) -> None:
        for topic, _, _, _ in batch:
            one(topic)

    _receive(client, one, run)
    stop = _connect_and_subscribe(client, port, topic_filter)
    conn.send("ready")
    conn.recv()
    conn.send(received)
    stop()
    client.disconnect()


class Worker:
    """A spawned worker process and its end of the command pipe."""

    def __init__(self, target: Callable[..., None], *args: object) -> None:
        ctx = mp.get_context("spawn")  # paho threads and sockets must not be forked
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.process.start()
        child.close()
        self.expect("ready", 30)

    def expect(self, what: str, timeout: float) -> None:
        """Wait for the string WHAT from the worker."""
        got = self.recv(timeout)
        if got != what:
            raise RuntimeError(f"worker said {got!r}, expected {what!r}")

    def recv(self, timeout: float) -> Any:
        """The worker's next message; TimeoutError after TIMEOUT, RuntimeError if it died."""
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.1):
            if not self.process.is_alive():
                raise RuntimeError(f"worker {self.process.name} died ({self.process.exitcode})")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"worker {self.process.name} silent for {timeout:g} s")
        return self.conn.recv()

    def close(self) -> None:
        """Ask the worker to finish, then make sure it did."""
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(None)
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


# -- the orchestrator's collector ---------------------------------------------------------------


class Collector:
    """Predictions, gateway states and stats from every target, stamped on arrival.

    Subscribed at QoS 0: on loopback nothing is lost below the broker's queue limit, and a QoS 1
    subscription would make the test broker (persistence after every change) save its database
    on every PUBACK.
    """

    FILTERS = ("floorline/+/pred/#", "floorline/+/state", "floorline/+/stats", "naive/pred/#")

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[float, str, bytes]] = []
        self.latest: dict[str, tuple[float, bytes]] = {}
        """The last state or stats message per topic (kept when ``messages`` is trimmed)."""
        self._client = _paho_client("3.1.1", "bench-collect")
        self._client.on_message = self._on_message
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.connect(HOST, port, keepalive=60)
        self._client.subscribe([(f, 0) for f in self.FILTERS])
        self._client.loop_start()
        if not subscribed.wait(10):
            raise TimeoutError("collector: no SUBACK")

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        del client, userdata
        # list.append and a dict store are atomic under the GIL: no lock with the readers.
        now, payload = time.monotonic(), cast("bytes", msg.payload)
        self.messages.append((now, msg.topic, payload))
        if "/pred/" not in msg.topic:
            self.latest[msg.topic] = (now, payload)

    def mark(self) -> int:
        """Position to read from later (``since``)."""
        return len(self.messages)

    def since(self, mark: int, prefix: str) -> list[tuple[float, str, bytes]]:
        """Messages after MARK whose topic starts with PREFIX."""
        return [m for m in self.messages[mark:] if m[1].startswith(prefix)]

    def last(self, topic: str) -> tuple[float, dict[str, Any]] | None:
        """The latest state or stats message on TOPIC, parsed, with its arrival time."""
        found = self.latest.get(topic)
        return None if found is None else (found[0], orjson.loads(found[1]))

    def trim(self) -> None:
        """Forget everything received so far (between measurements)."""
        del self.messages[:]

    def close(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()


# -- targets: the daemon and the naive script ------------------------------------------------------


def proc_rss_mb(pid: int, key: str = "VmRSS") -> float:
    """KEY (VmRSS, VmHWM) of PID from /proc, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0  # a zombie has no VmRSS line


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds PID has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples a process's RSS every PERIOD_S; keeps the largest since armed and since a mark."""

    def __init__(self, pid: int, period_s: float = 0.2) -> None:
        self.pid = pid
        self.peak = 0.0
        """Largest RSS since ``arm()`` (MiB)."""
        self.since_mark = 0.0
        """Largest RSS since the last ``mark()`` (MiB): one step's."""
        self._armed = threading.Event()
        self._stop = threading.Event()
        self._period = period_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            with contextlib.suppress(OSError, ValueError):
                rss = proc_rss_mb(self.pid)
                self.since_mark = max(self.since_mark, rss)
                if self._armed.is_set():
                    self.peak = max(self.peak, rss)

    def mark(self) -> None:
        """Start a new ``since_mark`` window."""
        with contextlib.suppress(OSError, ValueError):
            self.since_mark = proc_rss_mb(self.pid)

    def arm(self) -> None:
        """Start recording the peak (after warm-up)."""
        self._armed.set()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(2)


@dataclass
class Target:
    """Something under test: a process that turns a stream into predictions on PRED_PREFIX."""

    name: str
    process: subprocess.Popen[bytes]
    pred_prefix: str
    protocol: Protocol
    stats_topic: str | None = None
    pipeline: str | None = None
    window_of_body: Callable[[dict[str, Any]], int] = field(default=lambda b: int(b["seq"]))
    """The window number a prediction is for (the daemon says it; the naive script gives the
    sequence number of the window's last sample)."""
    log_path: Path | None = None
    sampler: RssSampler | None = None
    trend_allowance_ms: float = TREND_LIMIT_S * 1e3
    """How much its latency may grow over a step (see ``latency_trend``)."""
    latency_cap_ms: float = LATENCY_CAP_S * 1e3
    """The largest a fifth's median latency may be in a sustained step."""

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def check_alive(self) -> None:
        """Raise with the log's tail if the process has exited."""
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path else ""
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail}")

    def stop(self) -> None:
        """SIGTERM (the daemon drains), then SIGKILL if it takes too long."""
        if self.sampler is not None:
            self.sampler.stop()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def stats_supported() -> bool:
    """Whether this daemon's config takes ``metrics.stats_interval_s`` (the JSON stats topic)."""
    from floorline.edge.config.model import parse_config  # noqa: PLC0415
    from floorline.edge.errors import ConfigError  # noqa: PLC0415

    text = (
        "gateway: {id: probe}\nmetrics: {stats_interval_s: 1}\npipelines:\n"
        f"  - {{name: p, subscribe: ['a/+/b'], bundle: '{EXAMPLE}', decoder: {{type: json}}}}\n"
    )
    try:
        parse_config(text)
    except ConfigError:
        return False
    return True


def _pipeline_yaml(name: str, kind: Kind, out_qos: int = 1) -> str:
    decoder = {
        "sample": "{type: json, timestamp: ts, sequence: seq}",
        "binary": "{type: binary, header: timestamp_sequence, sample_interval_ms: 1.0}",
        "json_block": "{type: json, samples: samples, timestamp: ts, sequence: seq}",
    }[kind]
    # Per sample: hop 32 as in tests/soak.py. Blocks: tumbling windows, one per message.
    window = f"{{hop: {HOP}, max_gap_s: 0.05}}" if kind == "sample" else "{max_gap_s: 0.05}"
    return (
        f"  - name: {name}\n"
        f"    subscribe: ['{FEED_FILTERS[kind]}']\n"
        "    qos: 0\n"
        f"    bundle: '{EXAMPLE}'\n"
        "    backend: litert\n"
        f"    decoder: {decoder}\n"
        f"    window: {window}\n"
        f"    batch: {{max_batch: {BATCH}, max_wait_ms: {MAX_WAIT_MS}}}\n"
        f"    output: {{qos: {out_qos}}}\n"
    )


PIPELINE_NAMES: dict[Kind, str] = {
    "sample": "vibration", "binary": "block-binary", "json_block": "block-json"
}


@dataclass
class Startup:
    """How long a daemon took to come up, from just before its process was spawned."""

    ready_s: float | None
    """Until READY=1 arrived on $NOTIFY_SOCKET (None: the daemon sent none)."""
    online_s: float
    """Until its retained ``online`` state reached the collector (connected and subscribed)."""
    source: str
    """Which of the two the start-up figure is: 'READY=1' or 'state online (no READY=1)'."""

    @property
    def seconds(self) -> float:
        """The start-up figure: READY if the daemon sent it, else the online state."""
        return self.ready_s if self.ready_s is not None else self.online_s


def start_daemon(
    work: Path, port: int, protocol: Protocol, kinds: Sequence[Kind], collector: Collector,
    *, stats: bool, out_qos: int = 1,
) -> tuple[Target, Startup]:
    """``floorline run`` as its own process on a fresh state directory; waits until online."""
    gateway = f"bench-{uuid.uuid4().hex[:6]}"
    config = work / f"{gateway}.yaml"
    config.write_text(
        f"gateway: {{id: {gateway}}}\n"
        f"state_dir: '{work / gateway}'\n"
        f"broker: {{host: {HOST}, port: {port}, protocol: '{protocol}'}}\n"
        + ("metrics: {stats_interval_s: 1}\n" if stats else "")
        + "pipelines:\n"
        + "".join(_pipeline_yaml(PIPELINE_NAMES[k], k, out_qos) for k in kinds)
    )
    notify_path = work / f"{gateway}.notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.02)
    log_path = work / f"{gateway}.log"
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    state_topic = f"floorline/{gateway}/state"
    try:
        with log_path.open("wb") as log:
            started = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, *DAEMON_ENTRY, "run", "--config", str(config)],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        target = Target(
            name=f"floorline run (MQTT {protocol}, {'+'.join(kinds)})",
            process=proc, pred_prefix=f"floorline/{gateway}/pred/", protocol=protocol,
            stats_topic=f"floorline/{gateway}/stats", log_path=log_path,
        )
        ready_s: float | None = None
        online_s: float | None = None
        deadline = started + 60
        grace: float | None = None  # once online, how long to keep waiting for READY=1
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                if b"READY=1" in notify.recv(4096).split(b"\n") and ready_s is None:
                    ready_s = time.monotonic() - started
            state = collector.last(state_topic)
            if online_s is None and state is not None and state[1].get("state") == "online":
                online_s = state[0] - started
                grace = time.monotonic() + 2.0
            if online_s is not None and (ready_s is not None or time.monotonic() > (grace or 0)):
                break
            target.check_alive()
        if online_s is None:
            target.stop()
            raise TimeoutError(f"{target.name} did not come online:\n{log_path.read_text()}")
    finally:
        notify.close()
        notify_path.unlink(missing_ok=True)
    source = "READY=1" if ready_s is not None else "state online (the daemon sent no READY=1)"
    target.sampler = RssSampler(proc.pid)
    return target, Startup(ready_s, online_s, source)


def start_naive(work: Path, port: int) -> tuple[Target, float, float]:
    """tests/naive_baseline.py as its own process; returns it, its start-up s and predict ms."""
    log_path = work / "naive.log"
    with log_path.open("wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.naive_baseline", "--port", str(port),
             "--model", str(KERAS_MODEL), "--card", str(KERAS_CARD)],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
    target = Target(
        name="naive baseline (paho + json + keras model.predict)", process=proc,
        pred_prefix="naive/pred/", protocol="3.1.1", log_path=log_path,
        # It reports the sequence number of the window's last sample.
        window_of_body=lambda b: (int(b["seq"]) - (WINDOW - 1)) // HOP,
    )
    assert proc.stdout is not None
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        lines.extend(raw.decode(errors="replace").strip() for raw in proc.stdout)

    threading.Thread(target=read, daemon=True).start()
    deadline = started + 180  # TensorFlow's import alone takes seconds on a small machine
    while not any(line.startswith("ready") for line in lines):
        if time.monotonic() > deadline:
            target.stop()
            raise TimeoutError("the naive baseline did not start")
        target.check_alive()
        time.sleep(0.05)
    startup = time.monotonic() - started
    ready = next(line for line in lines if line.startswith("ready"))
    match = re.search(r"predict_ms=([\d.]+)", ready)
    target.sampler = RssSampler(proc.pid)
    return target, startup, float(match[1]) if match else 0.0


# -- steps and searches ---------------------------------------------------------------------------

QUIET_S = 1.0
"""After the stream ended, a step stops waiting once no prediction came for this long."""


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 and max of VALUES (milliseconds in, milliseconds out); empty: {}."""
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3),
            "p99": round(float(p99), 3), "max": round(float(a.max()), 3), "n": int(a.size)}


def latency_trend(rounds: dict[int, list[float]]) -> tuple[float | None, float | None]:
    """How far behind the target fell during a step: (growth, worst level), in ms.

    A round is one window number across all assets: their windows fall due together, so a target
    that works through them one by one (the naive way) has a spread inside every round that says
    nothing about falling behind. The rounds are cut into fifths and each fifth's median latency
    taken: medians over a fifth, so one scheduling hiccup on a shared machine is not a trend.
    Growth is the largest fifth's median minus the first's (the largest, not the last: an
    overloaded daemon catches up at the very end, once the stream stops competing with it for the
    GIL); the worst level is the largest fifth's median. Both are needed: a daemon can also fall
    seconds behind in the first fifth and then hold that backlog, working in bigger batches, with
    no further growth.
    """
    if not rounds:
        return None, None  # nothing arrived: the missing predictions say it already
    ordered = [rounds[k] for k in sorted(rounds)]
    n = len(ordered)
    cuts = sorted({round(i * n / 5) for i in range(6)})
    medians = [float(np.median([lat for r in ordered[a:b] for lat in r]))
               for a, b in itertools.pairwise(cuts) if b > a]
    return max(medians) - medians[0], max(medians)


@dataclass
class Step:
    """One rate offered for a while, and what the target made of it."""

    kind: Kind
    target_rate: float
    offered_rate: float
    """Messages per second the publisher actually achieved."""
    duration_s: float
    sent: int
    expected: int
    predictions: int
    """Distinct (asset, window) predictions received."""
    duplicates: int
    passed: bool
    reason: str
    latency_ms: dict[str, float]
    """Publisher's send of the window's last message → the collector's receipt."""
    end_to_end_ms: dict[str, float]
    """The daemon's own ``latency_ms.end_to_end`` (its receipt of that message → encoded)."""
    inward_ms: dict[str, float]
    """Publisher's send → the daemon's receipt (broker, socket, paho's thread getting the GIL)."""
    outward_ms: dict[str, float]
    """Prediction encoded → the collector's receipt (outbox, publisher thread, broker)."""
    rss_peak_mb: float | None
    trend_ms: float | None
    """See ``latency_trend``: how much further behind the target fell (None: nothing arrived)."""
    drain_s: float
    """Last message sent → last prediction received."""
    cpu_cores: float
    """The target's CPU use over the step (1.0 = one core)."""
    round_p50_ms: list[float] = field(default_factory=list)
    """Median latency per round (one window number across all assets), at most 24 of them."""
    counters: dict[str, int] | None = None
    """From the daemon's stats topic: messages received and dropped (inbox full) in the step."""


@dataclass
class Search:
    """A bounded bisection for the highest sustained rate."""

    kind: Kind
    protocol: Protocol
    bracket: tuple[float, float]
    steps: list[Step]
    sustained: float
    """Highest offered rate that passed (messages per second); 0.0 if none did."""


class Bench:
    """The shared pieces of one run: budget, broker, collector, the publisher per protocol."""

    def __init__(self, budget: Budget, work: Path, port: int, collector: Collector) -> None:
        self.budget = budget
        self.work = work
        self.port = port
        self.collector = collector
        self.stats = False
        self._publishers: dict[Protocol, Worker] = {}
        self._steps = 0

    def publisher(self, protocol: Protocol) -> Worker:
        """The raw publisher speaking PROTOCOL (started on first use, kept for the run)."""
        if protocol not in self._publishers:
            self._publishers[protocol] = Worker(publisher_main, self.port, protocol)
        return self._publishers[protocol]

    def close(self) -> None:
        """Stop the publishers."""
        for worker in self._publishers.values():
            worker.close()

    # -- ceilings ------------------------------------------------------------------------------

    def burst(
        self, counter: Worker, protocol: Protocol, spec: StreamSpec
    ) -> tuple[CountReport, SendReport]:
        """Blast SPEC's messages (repeatedly) for the ceiling time; COUNTER's view of it."""
        counter.conn.send("arm")
        counter.expect("armed", 10)
        pub = self.publisher(protocol)
        pub.conn.send(("blast", spec, self.budget.ceiling_s))
        pub.expect("built", 300)
        sent: SendReport = pub.recv(self.budget.ceiling_s + 120)
        counter.conn.send("finish")
        report: CountReport = counter.recv(120)
        return report, sent

    # -- steps ---------------------------------------------------------------------------------

    def _counters(self, target: Target, after: float, timeout: float) -> dict[str, int] | None:
        """The daemon's pipeline counters from the first stats message arriving after AFTER."""
        if not self.stats or target.stats_topic is None or target.pipeline is None:
            return None
        deadline = time.monotonic() + timeout
        while True:
            last = self.collector.last(target.stats_topic)
            if last is not None and last[0] > after:
                pipe = last[1].get("pipelines", {}).get(target.pipeline, {})
                return {"received": int(pipe.get("received", 0)),
                        "dropped": int(pipe.get("dropped", pipe.get("dropped_inbox_full", 0)))}
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def step(
        self, target: Target, kind: Kind, rate: float, duration: float,
        on_start: Callable[[], None] | None = None,
    ) -> Step:
        """Offer RATE messages/s of KIND for DURATION seconds; judge whether TARGET kept up.

        ON_START runs once the stream is built, just before it starts (a profiler attaching).
        """
        if not rate > 0:
            raise ValueError(f"cannot offer {rate} messages/s")
        self._steps += 1
        prefix = f"s{self._steps:03d}"
        if kind == "sample":
            per_asset = samples_per_asset(rate, duration, self.budget.assets)
        else:
            per_asset = max(MIN_ROUNDS, round(rate * duration / self.budget.assets))
        spec = StreamSpec(kind, prefix, self.budget.assets, per_asset, seed=self._steps)
        self.collector.trim()
        before = self._counters(target, 0.0, 0.0)
        pub = self.publisher(target.protocol)
        pub.conn.send(("paced", spec, rate))
        pub.expect("built", 300)
        if on_start is not None:
            on_start()
        if target.sampler is not None:
            target.sampler.mark()
        cpu0, t0 = proc_cpu_s(target.pid), time.monotonic()
        sent: SendReport = pub.recv(duration * 5 + 120)
        assert sent.send_times is not None
        expected = spec.expected_windows()
        needle = f"/{prefix}-pump-"
        got, scanned, last_arrival = 0, 0, sent.finished
        cap = sent.finished + max(10.0, 2 * duration)
        while got < expected:
            new = self.collector.messages[scanned:]
            scanned += len(new)
            for t, topic, _ in new:
                if topic.startswith(target.pred_prefix) and needle in topic:
                    got += 1
                    last_arrival = max(last_arrival, t)  # a stream's end can follow a quiet spell
            now = time.monotonic()
            if got >= expected or now - last_arrival > QUIET_S or now > cap:
                break
            target.check_alive()
            time.sleep(0.01)
        cpu_cores = (proc_cpu_s(target.pid) - cpu0) / max(time.monotonic() - t0, 1e-9)
        after = self._counters(target, last_arrival + 0.05, 3.0)
        counters = None
        if before is not None and after is not None:
            counters = {k: after[k] - before[k] for k in after}

        seen: set[tuple[int, int]] = set()
        duplicates = 0
        rounds: dict[int, list[float]] = {}  # window number → latencies (ms) of all assets
        e2e: list[float] = []
        # Where a window's latency went: publish → the daemon's receipt (``inward``), its own
        # end_to_end, encoded → the collector (``outward``: outbox, publisher thread, broker).
        # The prediction's ``ts`` is the daemon's wall clock at encoding; ours is the same clock.
        wall_offset = time.time() - time.monotonic()
        inward: list[float] = []
        outward: list[float] = []
        for t, topic, payload in self.collector.messages[:scanned]:
            if not (topic.startswith(target.pred_prefix) and needle in topic):
                continue
            body = orjson.loads(payload)
            key = (int(str(body["asset"]).rsplit("-", 1)[1]) - 1, target.window_of_body(body))
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            m = spec.end_message(*key)
            if not 0 <= m < len(sent.send_times):
                continue
            total_ms = (t - float(sent.send_times[m])) * 1e3
            rounds.setdefault(key[1], []).append(total_ms)
            if isinstance(body.get("latency_ms"), dict) and "ts" in body:
                own_ms = float(body["latency_ms"]["end_to_end"])
                out_ms = (t + wall_offset - float(body["ts"])) * 1e3
                e2e.append(own_ms)
                outward.append(out_ms)
                inward.append(total_ms - own_ms - out_ms)
        latencies = [lat for r in rounds.values() for lat in r]
        trend_ms, level_ms = latency_trend(rounds)
        reasons = []
        if len(seen) != expected:
            reasons.append(f"{len(seen)} of {expected} predictions")
        if trend_ms is not None and trend_ms > target.trend_allowance_ms:
            reasons.append(f"falling behind (latency +{trend_ms:.0f} ms over the step, "
                           f"allowed {target.trend_allowance_ms:.0f})")
        if level_ms is not None and level_ms > target.latency_cap_ms:
            reasons.append(f"behind by {level_ms:.0f} ms (a fifth's median; allowed "
                           f"{target.latency_cap_ms:.0f})")
        if counters is not None and (counters["received"] != sent.sent or counters["dropped"]):
            reasons.append(f"daemon received {counters['received']} of {sent.sent}, "
                           f"dropped {counters['dropped']}")
        if sent.rate < 0.97 * rate:
            reasons.append(f"publisher reached only {sent.rate:.0f}/s")
        passed = not [r for r in reasons if not r.startswith("publisher")]
        if time.monotonic() > cap:
            self.settle(target)
        return Step(
            kind=kind, target_rate=round(rate, 1), offered_rate=round(sent.rate, 1),
            duration_s=round(sent.finished - sent.started, 3), sent=sent.sent, expected=expected,
            predictions=len(seen), duplicates=duplicates, passed=passed,
            reason="; ".join(reasons) or "ok", latency_ms=percentiles(latencies),
            end_to_end_ms=percentiles(e2e), inward_ms=percentiles(inward),
            outward_ms=percentiles(outward),
            rss_peak_mb=round(target.sampler.since_mark, 1) if target.sampler else None,
            trend_ms=None if trend_ms is None else round(trend_ms, 1),
            drain_s=round(max(0.0, last_arrival - sent.finished), 3),
            cpu_cores=round(cpu_cores, 3), counters=counters,
            round_p50_ms=[round(float(np.median(rounds[k])), 1)
                          for k in sorted(rounds)[:: max(1, math.ceil(len(rounds) / 24))]],
        )

    def settle(self, target: Target, quiet_s: float = 1.0, cap_s: float = 30.0) -> None:
        """Wait (bounded) until TARGET stopped publishing: a backlog must not leak into a step."""
        deadline = time.monotonic() + cap_s
        mark = self.collector.mark()
        last = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if self.collector.since(mark, target.pred_prefix):
                mark = self.collector.mark()
                last = time.monotonic()
            elif time.monotonic() - last >= quiet_s:
                return

    def search(
        self, target: Target, kind: Kind, lo: float, hi: float, *, steps: int, step_s: float,
        geometric: bool = False, log: Callable[[str], None] = print,
    ) -> Search:
        """Bisect [LO, HI] for the highest rate TARGET sustains, in STEPS steps of STEP_S."""
        done: list[Step] = []
        best = 0.0
        bracket = (round(lo, 1), round(hi, 1))
        for _ in range(steps):
            rate = math.sqrt(lo * hi) if geometric else (lo + hi) / 2
            s = self.step(target, kind, rate, step_s)
            done.append(s)
            log(f"    {rate:9.0f}/s offered {s.offered_rate:9.0f}/s  "
                f"{'pass' if s.passed else 'FAIL'}  {s.reason}  "
                f"(p99 {s.latency_ms.get('p99', math.nan):.1f} ms, cpu {s.cpu_cores:.2f})")
            if s.passed:
                lo = rate
                best = max(best, s.offered_rate)
            else:
                hi = rate
        return Search(kind, target.protocol, bracket, done, round(best, 1))


# -- the measurements -----------------------------------------------------------------------------


def blast_spec(kind: Kind, assets: int) -> StreamSpec:
    """A reusable blast buffer of about 2 MB of KIND's messages."""
    approx = {"sample": 110, "binary": 830, "json_block": 6000}[kind]
    return StreamSpec(kind, "blast", assets, max(4, round(2e6 / (assets * approx))))


def _best_of(bench: Bench, counter: Worker, protocol: Protocol, kind: Kind) -> dict[str, Any]:
    # Noise on a shared machine only ever slows a receiver down: a ceiling is the best burst.
    bursts = [bench.burst(counter, protocol, blast_spec(kind, bench.budget.assets))
              for _ in range(bench.budget.ceiling_bursts)]
    count, sent = max(bursts, key=lambda b: b[0].rate)
    return {"rate": round(count.rate, 1), "bursts": [round(c.rate, 1) for c, _ in bursts],
            "received": count.received, "offered_rate": round(sent.rate, 1),
            "span_s": round(count.span_s, 2)}


def measure_bare(bench: Bench, protocol: Protocol, *, reader: Reader = "paho") -> dict[str, Any]:
    """Ceiling (a): a subscriber that only counts, under a blast of per-sample messages.

    READER ``paho``: stock paho, the ceiling the goals are set against; ``floorline``: the
    daemon's own reader (``floorline.edge.mqtt.reader.BufferedClient``), which the daemon can
    approach.
    """
    counter = Worker(counter_main, bench.port, protocol, FEED_FILTERS["sample"], reader)
    try:
        return _best_of(bench, counter, protocol, "sample")
    finally:
        counter.close()


def measure_echo(
    bench: Bench, protocol: Protocol, kind: Kind, *, reader: Reader = "paho"
) -> dict[str, Any]:
    """Ceiling (b): a client publishing one message per message; a third process counts.

    READER as for ``measure_bare``, for the echo client and the counter of its echoes alike.
    """
    counter = Worker(counter_main, bench.port, protocol, "echo/#", reader)
    echo = Worker(echo_main, bench.port, protocol, FEED_FILTERS[kind], reader)
    try:
        found = _best_of(bench, counter, protocol, kind)
        echo.conn.send("count")
        found["echo_received"] = int(echo.recv(30))
    finally:
        echo.close()
        counter.close()
    return found


def measure_backend(seconds: float) -> dict[str, Any]:
    """Ceiling (c): ``backends.create("litert", ...).infer`` in a loop, windows per second.

    Also with the batch size alternating 32/18, the pattern 50 assets with windows falling due
    together give the time-bounded batcher: the backend reallocates its tensors on every change.
    """
    from floorline.edge.backends import create  # noqa: PLC0415 - imports the runtime

    backend = create("litert", EXAMPLE / "model.tflite")
    rng = np.random.default_rng(0)
    xs = {n: rng.standard_normal((n, WINDOW, FEATURES)).astype(np.float32) for n in (1, 18, 32)}
    runtime = getattr(backend, "runtime", "litert")

    def rate(sizes: Sequence[int]) -> float:
        for n in sizes:
            backend.infer(xs[n])  # warm-up (and the first resize)
        windows = 0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            for n in sizes:
                backend.infer(xs[n])
                windows += n
        return windows / (time.monotonic() - start)

    try:
        out = {
            "runtime": runtime,
            "batch1_windows_s": round(rate([1]), 1),
            "batch32_windows_s": round(rate([32]), 1),
            "batch18_windows_s": round(rate([18]), 1),
            "alternating_32_18_windows_s": round(rate([32, 18]), 1),
        }
    finally:
        backend.close()
    return out


def _warm_up(bench: Bench, target: Target, kind: Kind, rate: float) -> Step:
    """A short stream before measuring: first inferences, allocations, SQLite pages."""
    return bench.step(target, kind, rate, bench.budget.warmup_s)


def measure_daemon_sample(
    bench: Bench, protocol: Protocol, bound: float, log: Callable[[str], None]
) -> dict[str, Any]:
    """Per-sample JSON stream: sustained rate, latency at half of it, footprint, start-up.

    The search bisects [0, BOUND] (``search_bound``), so its resolution is relative to BOUND.
    """
    target, startup = start_daemon(bench.work, bench.port, protocol, ["sample"],
                                   bench.collector, stats=bench.stats)
    target.pipeline = PIPELINE_NAMES["sample"]
    try:
        log(f"  daemon up in {startup.seconds:.2f} s ({startup.source}); warming up")
        rss_start = proc_rss_mb(target.pid)
        warm = _warm_up(bench, target, "sample", min(2000.0, bound / 4))
        rss_warm = proc_rss_mb(target.pid)
        assert target.sampler is not None
        target.sampler.arm()
        search = bench.search(target, "sample", 0.0, bound, steps=bench.budget.steps,
                              step_s=bench.budget.step_s, log=log)
        latency = None
        if search.sustained > 0:
            log(f"  latency at 50 % of {search.sustained:.0f}/s")
            latency = bench.step(target, "sample", search.sustained / 2, bench.budget.latency_s)
            log(f"    p50 {latency.latency_ms.get('p50', math.nan):.1f} ms, "
                f"p99 {latency.latency_ms.get('p99', math.nan):.1f} ms, "
                f"max {latency.latency_ms.get('max', math.nan):.1f} ms ({latency.reason})")
        rss_load = target.sampler.peak
        sustained_steps = [x for x in search.steps if x.passed]
        if latency is not None:
            sustained_steps.append(latency)
        rss_sustained = max((x.rss_peak_mb or 0.0 for x in sustained_steps), default=0.0)
        hwm = proc_rss_mb(target.pid, "VmHWM")
    finally:
        target.stop()
    return {
        "search": asdict(search),
        "sustained": search.sustained,
        "warm_up": asdict(warm),
        "latency": asdict(latency) if latency is not None else None,
        "startup": {**asdict(startup), "seconds": round(startup.seconds, 3)},
        "rss_mb": {"at_online": round(rss_start, 1), "after_warm_up": round(rss_warm, 1),
                   "peak_sustained_load": round(rss_sustained, 1),
                   "peak_under_load": round(rss_load, 1), "hwm": round(hwm, 1)},
    }


def measure_daemon_blocks(
    bench: Bench, protocol: Protocol, bounds: dict[Kind, float], log: Callable[[str], None]
) -> dict[str, Any]:
    """Block streams (one window per message), binary and JSON, on one daemon.

    Each kind's search bisects [0, BOUNDS[kind]] (``search_bound``: the larger echo ceiling).
    """
    target, startup = start_daemon(bench.work, bench.port, protocol, list(BLOCK_KINDS),
                                   bench.collector, stats=bench.stats)
    out: dict[str, Any] = {"startup": asdict(startup)}
    try:
        for kind in BLOCK_KINDS:
            target.pipeline = PIPELINE_NAMES[kind]
            log(f"  {kind} blocks (searched up to {bounds[kind]:,.0f}/s, the larger echo "
                "ceiling)")
            _warm_up(bench, target, kind, min(500.0, bounds[kind] / 4))
            search = bench.search(target, kind, 0.0, bounds[kind],
                                  steps=bench.budget.block_steps,
                                  step_s=bench.budget.block_step_s, log=log)
            out[kind] = {"search": asdict(search), "sustained": search.sustained}
        out["rss_mb"] = {"hwm": round(proc_rss_mb(target.pid, "VmHWM"), 1)}
    finally:
        target.stop()
    return out


def measure_naive(bench: Bench, ceiling: float, log: Callable[[str], None]) -> dict[str, Any]:
    """The naive script on the per-sample stream (MQTT 3.1.1, paho's default), searched alike."""
    if not KERAS_MODEL.is_file():
        # No training at benchmark time except this once: the example's own script makes it.
        log(f"  {KERAS_MODEL} missing: running python -m floorline.converter.examples.pdm "
            "once (~15 s)")
        scratch = bench.work / "pdm-bundle"
        subprocess.run(
            [sys.executable, "-m", "floorline.converter.examples.pdm", "--out", str(scratch),
             "--work", str(KERAS_MODEL.parent)],
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL, timeout=600,
        )
    target, startup, predict_ms = start_naive(bench.work, bench.port)
    try:
        log(f"  naive up in {startup:.1f} s; model.predict on one window {predict_ms:.1f} ms")
        # Bracket from its own model cost: one predict per HOP messages is what it can afford.
        capacity = HOP * 1000 / predict_ms if predict_ms > 0 else ceiling / 64
        # Its windows of all assets fall due together and it predicts them one by one: a round
        # takes assets x predict_ms however light the load. Judge its backlog against that.
        round_ms = bench.budget.assets * (predict_ms or 100.0)
        target.trend_allowance_ms = max(TREND_LIMIT_S * 1e3, round_ms / 8)
        target.latency_cap_ms = round_ms + LATENCY_CAP_S * 1e3
        # No warm-up stream: the script traced its model before it said ready, and at its
        # rates every extra step costs many seconds.
        search = bench.search(target, "sample", capacity / 2, min(ceiling, 1.25 * capacity),
                              steps=bench.budget.naive_steps, step_s=bench.budget.step_s,
                              geometric=True, log=log)
        rss = proc_rss_mb(target.pid, "VmHWM")
    finally:
        target.stop()
    return {"search": asdict(search), "sustained": search.sustained,
            "startup_s": round(startup, 2), "predict_ms": predict_ms, "rss_mb_hwm": round(rss, 1)}


# -- profile (--profile) ---------------------------------------------------------------------------


def _py_spy() -> str | None:
    found = shutil.which("py-spy")
    local = Path(sys.executable).parent / "py-spy"
    return found or (str(local) if local.is_file() else None)


def _frame_name(name: str, file: str) -> str:
    # "Pipeline._handle (edge/pipeline.py)": functions, not lines, are what a reader compares.
    short = file.replace(str(ROOT) + "/", "")
    short = re.sub(r"^.*/site-packages/", "", short)
    short = re.sub(r"^.*/lib/python3\.\d+/", "", short)
    return f"{name} ({short})"


def summarize_speedscope(doc: dict[str, Any], top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares of samples per function, and per thread, from py-spy's output.

    py-spy (not ``--idle``) samples threads that are on a CPU, so shares are of the process's
    CPU time. A thread waiting for the GIL is asleep in the kernel and is not sampled.
    """
    frames = [_frame_name(f["name"], f.get("file") or "?") for f in doc["shared"]["frames"]]
    threads: dict[str, float] = {}
    own: dict[str, float] = {}
    inclusive: dict[str, float] = {}
    own_by_thread: dict[str, dict[str, float]] = {}
    total = 0.0
    for profile in doc["profiles"]:
        # 'Thread 511 "pipeline-vibration"' → 'pipeline-vibration'
        match = re.search(r'"(.*)"', profile["name"])
        thread = match[1] if match else profile["name"]
        per = own_by_thread.setdefault(thread, {})
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            # py-spy --threads puts a "thread (tid): name" pseudo-frame at the root.
            calls = [frames[i] for i in stack if not frames[i].startswith("thread (")]
            calls = calls or ["(no Python frame)"]
            total += weight
            threads[thread] = threads.get(thread, 0.0) + weight
            own[calls[-1]] = own.get(calls[-1], 0.0) + weight
            per[calls[-1]] = per.get(calls[-1], 0.0) + weight
            for name in set(calls):
                inclusive[name] = inclusive.get(name, 0.0) + weight

    def share(table: dict[str, float], n: int = top) -> list[tuple[str, float]]:
        ranked = sorted(table.items(), key=lambda kv: -kv[1])[:n]
        return [(name, round(100 * w / max(total, 1e-9), 1)) for name, w in ranked]

    return {
        "samples_s": round(total, 2),
        "threads_pct": share(threads),
        "self_pct": share(own),
        "inclusive_pct": share(
            {k: v for k, v in inclusive.items() if "(threading.py)" not in k}, 2 * top),
        "self_pct_by_thread": {t: share(tab, 10) for t, tab in own_by_thread.items()},
    }


def profile_daemon(
    bench: Bench, protocol: Protocol, kind: Kind, rate: float, out_dir: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """py-spy of the daemon, all threads, while it takes RATE msgs/s of KIND: two recordings.

    ``gil``: only the thread holding the GIL is sampled. The daemon is one Python process, so the
    GIL is the resource its three threads share; this says what holds it. ``cpu``: every thread
    on a CPU (py-spy's default), which adds the C code that runs without the GIL (sockets,
    SQLite, LiteRT). Both sample without stopping the process (``--nonblocking``) at the same
    time, on the same stream; py-spy itself takes some of the machine's other core.
    """
    spy = _py_spy()
    if spy is None:
        return {"skipped": "py-spy not installed (.venv/bin/pip install py-spy)"}
    seconds = max(2.0, bench.budget.step_s)
    target, _ = start_daemon(bench.work, bench.port, protocol, [kind], bench.collector,
                             stats=bench.stats)
    target.pipeline = PIPELINE_NAMES[kind]
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {mode: out_dir / f"daemon-{kind}-mqtt{protocol}-{mode}.speedscope.json"
               for mode in ("gil", "cpu")}
    recorders: list[subprocess.Popen[bytes]] = []

    def attach() -> None:
        for mode, out in outputs.items():
            recorders.append(subprocess.Popen(
                [spy, "record", "--pid", str(target.pid), "--rate", "250", "--duration",
                 f"{seconds:g}", "--threads", "--nonblocking", "--format", "speedscope",
                 "--output", str(out), *(["--gil"] if mode == "gil" else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))

    try:
        _warm_up(bench, target, kind, rate / 4)
        step = bench.step(target, kind, rate, seconds, on_start=attach)
        for recorder in recorders:
            recorder.wait(seconds + 30)
    finally:
        target.stop()
    log(f"  profiled {kind} at {rate:.0f}/s: {step.reason}, cpu {step.cpu_cores:.2f}")
    missing = [m for m, out in outputs.items() if not out.is_file()]
    if missing:
        return {"skipped": f"py-spy wrote no {'/'.join(missing)} profile of the {kind} run"}
    return {"kind": kind, "protocol": protocol, "rate": round(rate, 1), "step": asdict(step),
            "speedscope": {m: str(out) for m, out in outputs.items()},
            "summary": {m: summarize_speedscope(json.loads(out.read_text()))
                        for m, out in outputs.items()}}


def pipeline_in_process(work: Path, kind: Kind, messages: int = 20000) -> dict[str, Any]:
    """The pipeline's stages alone, on this thread: no MQTT, no other thread, no GIL contention.

    The daemon's own construction path (``Daemon.load``: bundle, self-test, outbox), then its
    worker's per-message step (``Pipeline._handle``, batches inferred as they fill or fall due)
    on a stream of KIND, under cProfile for the top functions. Private methods: if the daemon's
    code moved on, this says so instead of failing the run.
    """
    import cProfile  # noqa: PLC0415
    import pstats  # noqa: PLC0415

    from floorline.edge.config.model import parse_config  # noqa: PLC0415
    from floorline.edge.daemon.daemon import Daemon  # noqa: PLC0415

    config = parse_config(
        f"gateway: {{id: inproc}}\nstate_dir: '{work / ('inproc-' + kind)}'\npipelines:\n"
        + _pipeline_yaml(PIPELINE_NAMES[kind], kind)
    )
    daemon = Daemon(config)
    daemon.load()
    pipeline = daemon.pipelines[0]
    per = WINDOW if kind == "sample" else 1
    spec = StreamSpec(kind, "inproc", 50, max(3, messages // 50 // per * per))
    batch = stream_messages(spec)

    def feed() -> None:
        for topic, payload in batch:
            pipeline._handle(topic, payload, time.monotonic())
            due = pipeline._batcher.take_due()
            if due:
                pipeline._infer(due)
        rest = pipeline._batcher.drain()
        if rest:
            pipeline._infer(rest)

    try:
        start = time.perf_counter()
        feed()
        elapsed = time.perf_counter() - start
        profiler = cProfile.Profile()
        batch = stream_messages(replace(spec, prefix="inproc2"))
        profiler.enable()
        feed()
        profiler.disable()
    except AttributeError as exc:
        return {"skipped": f"the pipeline's internals changed: {exc}"}
    finally:
        daemon.stop()
    stats = pstats.Stats(profiler)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in raw.values())
    top = sorted(raw.items(), key=lambda kv: -kv[1][2])[:12]
    return {
        "messages": len(batch),
        "us_per_message": round(elapsed / len(batch) * 1e6, 2),
        "messages_s": round(len(batch) / elapsed, 1),
        "cprofile_self_pct": [
            (_frame_name(f"{func}:{line}" if file != "~" else func, file),
             round(100 * tt / total, 1))
            for (file, line, func), (_, _, tt, _, _) in top
        ],
    }


def memory_by_import() -> list[tuple[str, float]]:
    """RSS (MiB) of a fresh interpreter after each import the daemon makes, then the model."""
    code = (
        "import sys\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS:'): return int(line.split()[1]) / 1024\n"
        "print('python', rss())\n"
        "for name in sys.argv[1:]:\n"
        "    __import__(name); print(name, rss())\n"
        "from pathlib import Path\n"
        "from floorline.edge.backends import create\n"
        f"b = create('litert', Path({str(EXAMPLE / 'model.tflite')!r}))\n"
        "print('model loaded', rss())\n"
    )
    modules = ["numpy", "orjson", "yaml", "pydantic", "paho.mqtt.client", "sqlite3",
               "floorline.edge", "floorline.edge.config.model", "floorline.edge.daemon.daemon",
               "floorline.edge.service.run", "floorline.edge.cli.main",
               "ai_edge_litert.interpreter"]
    out = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True,
                         cwd=ROOT, check=True, timeout=60).stdout
    rows = [line.rsplit(" ", 1) for line in out.splitlines() if line.strip()]
    return [(name, round(float(mib), 1)) for name, mib in rows]


def experiments(
    bench: Bench, results: dict[str, Any], log: Callable[[str], None]
) -> dict[str, Any]:
    """What the proposed changes would give, measured in this run beside the stock figures.

    The daemon's code is untouched: a wrapper entry point (``python -m tests.bench_patches``)
    applies the named PATCHES and then runs ``floorline run``; it imports nothing the daemon
    does not, so memory figures compare too. An experiment that searches the sustained rate does
    so up to the same bound as the unpatched daemon (``search_bound``); for the per-sample stream
    each measures latency at the unpatched latency step's rate, so each pair of figures differs
    in the patch only. (P1, the buffered socket, is no longer a patch:
    ``floorline.edge.mqtt.reader`` is
    the daemon's reader now, and the run's floorline-reader ceilings measure it bare.)
    """
    global DAEMON_ENTRY  # noqa: PLW0603 - the experiments start the daemon differently
    out: dict[str, Any] = {"patches": PATCHES, "daemon": []}
    stock = DAEMON_ENTRY
    stock_latency = results["daemon_sample"]["5"]["latency"]
    latency_rate = stock_latency["target_rate"] if stock_latency else None
    runs: list[tuple[str, Kind, bool]] = [
        # (patches, kind, search?). "none" is the unpatched daemon started the same way: the
        # baseline the per-sample experiments' latency and memory compare with, since the main
        # run's latency step follows a search whose overloaded steps grew the daemon's heap.
        # Latency first, on a fresh daemon; a search (throughput), if any, after it.
        ("none", "sample", False),
        ("switch1ms", "sample", False),
        ("sqlite256k", "sample", False),
        ("yield", "sample", False),
        ("chunk16k", "sample", False),
        ("trace", "sample", False),
    ]
    try:
        for patches, kind, search_rate in runs:
            hi = search_bound(results["ceilings"], "5", kind)
            DAEMON_ENTRY = ["-m", "tests.bench_patches", patches]
            label = "P0" if patches == "none" else PATCHES[patches].split(":")[0]
            name = f"{label} {kind}, MQTT 5"
            log(f"  {name}: {PATCHES.get(patches, 'unpatched daemon, the baseline')}")
            target, _ = start_daemon(bench.work, bench.port, "5", [kind], bench.collector,
                                     stats=bench.stats)
            target.pipeline = PIPELINE_NAMES[kind]
            found: dict[str, Any] = {"experiment": name, "patches": patches, "kind": kind,
                                     "bound": hi}
            try:
                _warm_up(bench, target, kind, hi / 8)
                if kind == "sample" and latency_rate:
                    lat = bench.step(target, kind, latency_rate, bench.budget.latency_s)
                    found["latency"] = asdict(lat)
                    log(f"    latency at {latency_rate:,.0f}/s: p50 "
                        f"{lat.latency_ms.get('p50', math.nan):.1f} ms, p99 "
                        f"{lat.latency_ms.get('p99', math.nan):.1f} ms ({lat.reason}); "
                        f"RSS peak {lat.rss_peak_mb} MiB")
                if search_rate:
                    steps, step_s = ((bench.budget.steps, bench.budget.step_s) if kind == "sample"
                                     else (bench.budget.block_steps, bench.budget.block_step_s))
                    search = bench.search(target, kind, 0.0, hi, steps=steps, step_s=step_s,
                                          log=log)
                    found |= {"sustained": search.sustained, "search": asdict(search)}
                    found |= ceiling_ratios(search.sustained, results["ceilings"], "5", kind)
            finally:
                target.stop()
            trace = Path(f"/tmp/trace-{target.pid}")
            if trace.is_file():
                found["trace"] = trace.read_text().splitlines()
                log("    " + "; ".join(found["trace"]))
                trace.unlink()
            out["daemon"].append(found)
    finally:
        DAEMON_ENTRY = stock
    return out


# -- the run and its report ------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mosquitto = subprocess.run(
        [os.environ.get("FLOORLINE_MOSQUITTO") or shutil.which("mosquitto")
         or "/usr/sbin/mosquitto", "-h"],
        capture_output=True, text=True, check=False, timeout=10,
    ).stdout.splitlines()[:1]
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": mosquitto[0] if mosquitto else "unknown",
        "versions": {d: _version(d) for d in ("paho-mqtt", "ai-edge-litert", "onnxruntime",
                                              "numpy", "orjson", "tensorflow", "keras")},
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "code": _git_state(),
    }


def _git_state() -> dict[str, Any]:
    # Others change edge/ while benchmarks run: say exactly which code the figures are of.
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False, timeout=10)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "modified": git("status", "--short", "--", "edge").splitlines()}


def _ratio(value: float | None, ceiling: float | None) -> float | None:
    if value is None or not ceiling:
        return None
    return round(value / ceiling, 3)


def ceiling_of(c: dict[str, Any], reader: Reader, protocol: Protocol, kind: Kind) -> float:
    """READER's ceiling for KIND on PROTOCOL: the bare subscriber per sample, the echo per block."""
    bare_key, echo_key = CEILING_KEYS[reader]
    found = c[bare_key][protocol] if kind == "sample" else c[echo_key][protocol][kind]
    return float(found["rate"])


def search_bound(c: dict[str, Any], protocol: Protocol, kind: Kind) -> float:
    """Where the daemon's search for KIND on PROTOCOL tops out: the larger of the two readers'.

    The daemon receives with floorline's reader, so it can outrun a stock paho subscriber; the
    stock ceiling alone would cap it there.
    """
    return max(ceiling_of(c, reader, protocol, kind) for reader in READERS)


def ceiling_ratios(
    sustained: float, c: dict[str, Any], protocol: Protocol, kind: Kind
) -> dict[str, Any]:
    """SUSTAINED against each reader's ceiling (``ratio``: stock paho, the goals' measure)."""
    return {
        "ratio": _ratio(sustained, ceiling_of(c, "paho", protocol, kind)),
        "ratio_floorline": _ratio(sustained, ceiling_of(c, "floorline", protocol, kind)),
        "bound": search_bound(c, protocol, kind),
    }


def evaluate_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal, the figure it is judged on, and whether it was met (goals, not asserts)."""
    out: list[dict[str, Any]] = []

    def add(goal: str, value: float | None, limit: float, *, at_least: bool, unit: str,
            skipped: str | None = None) -> None:
        if skipped is not None:  # not measured: neither met nor missed
            out.append({"goal": goal, "value": None, "limit": limit, "unit": unit, "met": None,
                        "skipped": skipped})
            return
        met = value is not None and (value >= limit if at_least else value <= limit)
        out.append({"goal": goal, "value": value, "limit": limit, "unit": unit, "met": met})

    for p in PROTOCOLS:
        d = r["daemon_sample"][p]
        add(f"per-sample sustained >= 0.85 x bare subscriber (MQTT {p})", d["ratio"], 0.85,
            at_least=True, unit="ratio")
    for kind in BLOCK_KINDS:
        d = r["daemon_block"][kind]
        add(f"{kind} blocks sustained >= 0.85 x echo (MQTT {r['daemon_block']['protocol']})",
            d["ratio"], 0.85, at_least=True, unit="ratio")
    for p in PROTOCOLS:
        lat = r["daemon_sample"][p]["latency"]
        p99 = lat["latency_ms"].get("p99") if lat else None
        add(f"p99 publish->prediction <= 20 ms at 50 % load (MQTT {p})", p99, 20.0,
            at_least=False, unit="ms")
    for p in PROTOCOLS:
        add(f"RSS under load <= 70 MB, overloaded search steps included (MQTT {p})",
            r["daemon_sample"][p]["rss_mb"]["peak_under_load"], 70.0, at_least=False, unit="MiB")
    for p in PROTOCOLS:
        add(f"start to READY <= 1 s (MQTT {p}; "
            f"{r['daemon_sample'][p]['startup']['source']})",
            r["daemon_sample"][p]["startup"]["seconds"], 1.0, at_least=False, unit="s")
    naive = r["naive"]
    add("per-sample sustained >= 20 x the naive way (MQTT 3.1.1)", naive.get("speedup"), 20.0,
        at_least=True, unit="x", skipped=naive.get("skipped"))
    return out


def table(r: dict[str, Any]) -> str:
    """The human-readable report: every figure, the ceiling it is set against, the ratio."""
    rows: list[tuple[str, str, str, str]] = []

    def row(what: str, value: float | None, unit: str, against: str = "",
            ratio: float | None = None) -> None:
        v = "n/a" if value is None else (f"{value:,.0f}" if value >= 100 else f"{value:.2f}")
        q = "" if ratio is None else f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.2g}"
        rows.append((what, f"{v} {unit}" if unit else "", against, q))

    c = r["ceilings"]
    for p in PROTOCOLS:
        row(f"ceiling: bare paho subscriber, MQTT {p}", c["bare"][p]["rate"], "msg/s")
        row("  bare subscriber, floorline reader", c["bare_floorline"][p]["rate"], "msg/s",
            f"bare MQTT {p}", _ratio(c["bare_floorline"][p]["rate"], c["bare"][p]["rate"]))
    for p in PROTOCOLS:
        for kind in BLOCK_KINDS:
            stock, own = c["echo"][p][kind]["rate"], c["echo_floorline"][p][kind]["rate"]
            row(f"ceiling: paho echo, {kind} in, MQTT {p}", stock, "msg/s")
            row("  echo, floorline reader", own, "msg/s", f"echo {kind} MQTT {p}",
                _ratio(own, stock))
    b = c["backend"]
    row(f"ceiling: LiteRT infer, batch 1 ({b['runtime']})", b["batch1_windows_s"], "win/s")
    row("ceiling: LiteRT infer, batch 32", b["batch32_windows_s"], "win/s")
    row("  LiteRT infer, batch 18", b["batch18_windows_s"], "win/s")
    row("  LiteRT infer, batch alternating 32/18", b["alternating_32_18_windows_s"], "win/s",
        "batch 32", _ratio(b["alternating_32_18_windows_s"], b["batch32_windows_s"]))
    for p in PROTOCOLS:
        d = r["daemon_sample"][p]
        row(f"daemon per-sample JSON, MQTT {p}", d["sustained"], "msg/s",
            f"bare MQTT {p}", d["ratio"])
        row("  against floorline reader", None, "", f"floorline bare MQTT {p}",
            d["ratio_floorline"])
        windows = d["sustained"] / HOP  # one window per HOP samples of each asset
        row("  as windows", windows, "win/s", "LiteRT batch 32",
            _ratio(windows, b["batch32_windows_s"]))
    db = r["daemon_block"]
    for kind in BLOCK_KINDS:
        row(f"daemon {kind} blocks, MQTT {db['protocol']}", db[kind]["sustained"], "msg/s",
            f"echo {kind} MQTT {db['protocol']}", db[kind]["ratio"])
        row("  against floorline reader", None, "", f"floorline echo {kind} MQTT {db['protocol']}",
            db[kind]["ratio_floorline"])
    for p in PROTOCOLS:
        lat = r["daemon_sample"][p]["latency"]
        if lat is None:
            row(f"latency at 50 %, MQTT {p}", None, "ms")
            continue
        true, own = lat["latency_ms"], lat["end_to_end_ms"]
        rate = lat["offered_rate"]
        row(f"latency publish->prediction p50 (MQTT {p}, {rate:,.0f}/s)", true.get("p50"), "ms")
        row("  p99", true.get("p99"), "ms", "goal 20 ms", _ratio(true.get("p99"), 20.0))
        row("  max", true.get("max"), "ms")
        for label, part in (("  publish -> daemon receipt", lat["inward_ms"]),
                            ("  daemon's own end_to_end", own),
                            ("  encoded -> collector", lat["outward_ms"])):
            row(f"{label} p50", part.get("p50"), "ms")
            row(f"{label} p99", part.get("p99"), "ms")
    for p in PROTOCOLS:
        d = r["daemon_sample"][p]
        row(f"RSS after warm-up (MQTT {p})", d["rss_mb"]["after_warm_up"], "MiB")
        row("  peak at sustained rates", d["rss_mb"]["peak_sustained_load"], "MiB")
        row("  peak under load (overloaded steps too)", d["rss_mb"]["peak_under_load"], "MiB",
            "goal 70", _ratio(d["rss_mb"]["peak_under_load"], 70.0))
        row(f"  start to {'READY' if d['startup']['ready_s'] is not None else 'online'}",
            d["startup"]["seconds"], "s", "goal 1 s", _ratio(d["startup"]["seconds"], 1.0))
    n = r["naive"]
    if "skipped" in n:
        # The reason is in the goals below: too long for the "against" column.
        row("naive way (paho + json + model.predict), MQTT 3.1.1", None, "",
            "skipped: no Keras model")
    else:
        row("naive way (paho + json + model.predict), MQTT 3.1.1", n["sustained"], "msg/s",
            "bare MQTT 3.1.1", _ratio(n["sustained"], c["bare"]["3.1.1"]["rate"]))
        row("  daemon / naive", n["speedup"], "x", "goal 20", _ratio(n["speedup"], 20.0))

    width = max(len(w) for w, *_ in rows)
    against = max(len(a) for _, _, a, _ in rows)
    lines = [f"{'figure':<{width}}  {'value':>14}  {'against':<{against}} ratio"]
    lines += [f"{w:<{width}}  {v:>14}  {a:<{against}} {q}".rstrip() for w, v, a, q in rows]
    lines.append("")
    lines += [f"SKIPPED {t['goal']}: {t['skipped']}" if "skipped" in t
              else f"{'met   ' if t['met'] else 'MISSED'} {t['goal']}: {t['value']} {t['unit']}"
              for t in r["targets"]]
    return "\n".join(lines)


def profile_text(r: dict[str, Any]) -> str:
    """The --profile section as text: py-spy's top functions, memory, in-process, experiments."""
    lines: list[str] = []
    for prof in r["profile"]["py_spy"]:
        if "summary" not in prof:
            lines.append(f"py-spy: {prof.get('skipped')}")
            continue
        step = prof["step"]
        lines.append(f"py-spy, {prof['kind']} at {prof['rate']:,.0f} msg/s, MQTT "
                     f"{prof['protocol']} ({step['reason']}; daemon CPU {step['cpu_cores']:.2f} "
                     "cores)")
        for mode, title in (("gil", "holding the GIL"), ("cpu", "on a CPU")):
            s = prof["summary"][mode]
            lines.append(f"  {title} ({s['samples_s']} s of samples): "
                         + ", ".join(f"{n} {v}%" for n, v in s["threads_pct"]))
            lines.append("    self:")
            lines += [f"      {v:5.1f}  {n}" for n, v in s["self_pct"]]
            if mode == "gil":
                lines.append("    inclusive:")
                lines += [f"      {v:5.1f}  {n}" for n, v in s["inclusive_pct"][:16]]
    for kind, inproc in r["profile"].get("pipeline_in_process", {}).items():
        if "skipped" in inproc:
            lines.append(f"pipeline in process, {kind}: {inproc['skipped']}")
            continue
        lines.append(f"pipeline stages in process (no MQTT), {kind}: "
                     f"{inproc['us_per_message']} us/msg ({inproc['messages_s']:,.0f} msg/s); "
                     "cProfile self time: " + ", ".join(
                         f"{n} {v}%" for n, v in inproc["cprofile_self_pct"][:8]))
    lines.append("RSS by import (MiB, cumulative): " + ", ".join(
        f"{n} {v}" for n, v in r["profile"]["memory_by_import_mib"]))
    e = r.get("experiments", {})
    for x in e.get("daemon", []):
        text = f"{x['experiment']}:"
        if "sustained" in x:
            stock = (r["daemon_sample"]["5"]["sustained"] if x["kind"] == "sample"
                     else r["daemon_block"][x["kind"]]["sustained"])
            text += (f" sustained {x['sustained']:,.0f}/s ({x['ratio']} of stock paho, "
                     f"{x['ratio_floorline']} of the floorline reader; unpatched {stock:,.0f}/s)")
        if "latency" not in x and "sustained" not in x:
            text += " not run: the unpatched daemon found no sustained rate to take half of"
        if "latency" in x:
            lat = x["latency"]
            text += (f" latency at {lat['offered_rate']:,.0f}/s p50/p99 "
                     f"{lat['latency_ms'].get('p50')}/{lat['latency_ms'].get('p99')} ms, RSS peak "
                     f"{lat['rss_peak_mb']} MiB")
        lines.append(text)
    return "\n".join(lines)


def check_bundle() -> None:
    """The streams are built for the example bundle's input: say so if the bundle changed."""
    spec = json.loads((EXAMPLE / "manifest.json").read_text())["input"]
    if (spec["window"], len(spec["features"])) != (WINDOW, FEATURES):
        raise SystemExit(f"{EXAMPLE} now takes {spec['window']} x {len(spec['features'])} "
                         f"windows; tests/benchmark.py builds {WINDOW} x {FEATURES}")


def _say(text: str) -> None:
    print(text, flush=True)  # progress must show when the output goes to a file or a pipe


def run(budget: Budget, work: Path, *, profile: Path | None, train: bool = True,
        say: Callable[[str], None] = _say) -> dict[str, Any]:
    """Every measurement, in one run on one broker; returns the results document.

    Without TRAIN and without the Keras model, the naive way is skipped (and says why); every
    other section runs.
    """
    started = time.monotonic()

    def log(text: str) -> None:  # every line says when, so slow sections are easy to see
        say(f"[{time.monotonic() - started:6.1f}s] {text}")

    check_bundle()
    results: dict[str, Any] = {"machine": machine(), "budget": asdict(budget)}
    broker = Mosquitto(work / "broker").start()
    collector = Collector(broker.port)
    bench = Bench(budget, work, broker.port, collector)
    bench.stats = stats_supported()
    results["counters"] = (
        "daemon stats topic (received, dropped) + predictions" if bench.stats
        else "predictions only: this daemon has no metrics.stats_interval_s yet")
    try:
        log("ceilings")
        backend = measure_backend(budget.backend_s)
        log(f"  LiteRT: {backend}")
        c: dict[str, Any] = {key: {} for keys in CEILING_KEYS.values() for key in keys}
        # Each stock ceiling beside its floorline-reader twin: drift on a shared machine
        # then moves both alike.
        for p in PROTOCOLS:
            for reader in READERS:
                found = c[CEILING_KEYS[reader][0]][p] = measure_bare(bench, p, reader=reader)
                log(f"  bare subscriber, {READER_LABELS[reader]}, MQTT {p}: "
                    f"{found['rate']:,.0f}/s")
            for reader in READERS:
                c[CEILING_KEYS[reader][1]][p] = {}
            for kind in BLOCK_KINDS:
                for reader in READERS:
                    found = c[CEILING_KEYS[reader][1]][p][kind] = measure_echo(
                        bench, p, kind, reader=reader)
                    log(f"  echo {kind}, {READER_LABELS[reader]}, MQTT {p}: "
                        f"{found['rate']:,.0f}/s")
        c["backend"] = backend
        results["ceilings"] = c

        results["daemon_sample"] = {}
        for p in PROTOCOLS:
            bound = search_bound(c, p, "sample")
            log(f"daemon, per-sample JSON, MQTT {p} (searched up to {bound:,.0f}/s, the larger "
                "bare subscriber ceiling)")
            d = measure_daemon_sample(bench, p, bound, log)
            results["daemon_sample"][p] = d | ceiling_ratios(d["sustained"], c, p, "sample")

        block_protocol: Protocol = "5"
        log(f"daemon, blocks, MQTT {block_protocol}")
        blocks = measure_daemon_blocks(
            bench, block_protocol,
            {k: search_bound(c, block_protocol, k) for k in BLOCK_KINDS}, log)
        blocks["protocol"] = block_protocol
        for kind in BLOCK_KINDS:
            blocks[kind] |= ceiling_ratios(blocks[kind]["sustained"], c, block_protocol, kind)
        results["daemon_block"] = blocks

        if not train and not KERAS_MODEL.is_file():
            log(f"naive way: skipped: {NAIVE_SKIPPED}")
            results["naive"] = {"skipped": NAIVE_SKIPPED}
        else:
            log("naive way")
            # Stock paho is what the naive script receives with: its ceiling bounds it.
            naive = measure_naive(bench, c["bare"]["3.1.1"]["rate"], log)
            naive["speedup"] = (round(results["daemon_sample"]["3.1.1"]["sustained"]
                                      / naive["sustained"], 1) if naive["sustained"] else None)
            results["naive"] = naive
        results["targets"] = evaluate_targets(results)
        results["elapsed_s"] = round(time.monotonic() - started, 1)

        if profile is not None:
            log("profiles: py-spy of the daemon at the sustained rates found above")
            results["profile"] = {
                "py_spy": [
                    # At the sustained rate; a quarter of the ceiling if none was found.
                    profile_daemon(bench, "5", "sample",
                                   results["daemon_sample"]["5"]["sustained"]
                                   or search_bound(c, "5", "sample") / 4, profile, log),
                    profile_daemon(bench, "5", "binary", blocks["binary"]["sustained"]
                                   or search_bound(c, "5", "binary") / 4, profile, log),
                ],
                "memory_by_import_mib": memory_by_import(),
                "pipeline_in_process": {k: pipeline_in_process(work, k)
                                        for k in ("sample", *BLOCK_KINDS)},
            }
            log("experiments: the proposed changes, measured against this run's ceilings")
            results["experiments"] = experiments(bench, results, log)
            results["profile_elapsed_s"] = round(
                time.monotonic() - started - results["elapsed_s"], 1)
    finally:
        bench.close()
        collector.close()
        broker.stop()
    results["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m tests.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="about a minute instead of six")
    size.add_argument("--tiny", action="store_true",
                      help="seconds per section, one step per search: for the smoke test only")
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"),
                        help="where to write the results (default bench-results.json)")
    parser.add_argument("--no-train", action="store_true",
                        help="without .work/pdm/pdm.keras, skip the naive way (and say so) "
                        "instead of training it once")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="afterwards, py-spy the daemon at its sustained rates into DIR")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    if argv is None:
        argv = sys.argv[1:]
    args = parser.parse_args(argv)
    budget = TINY if args.tiny else QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="floorline-bench-"))
    command = "python -m tests.benchmark " + " ".join(argv)
    try:
        results = run(budget, work, profile=args.profile, train=not args.no_train)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}")
    results["command"] = command.strip()
    print()
    print(table(results))
    if "profile" in results:
        print()
        print(profile_text(results))
    if "skipped" in results["naive"]:
        print(f"\nnaive way: skipped: {results['naive']['skipped']}")
    print(f"\n{results['counters']}; elapsed {results['elapsed_s']} s"
          + (f" (+ {results['profile_elapsed_s']} s profiles and experiments)"
             if "profile_elapsed_s" in results else ""))
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
