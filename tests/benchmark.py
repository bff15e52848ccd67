"""Floorline against its ceilings: one run, one broker, every figure a ratio to what bounds it.

    .venv/bin/python -m tests.benchmark [--quick | --tiny] [--json bench-results.json]
                                        [--no-train] [--profile DIR] [--keep]
                                        [--only overload]

Starts its own mosquitto (``tests/mqtt_broker.Mosquitto``: 127.0.0.1, a free port, never the
system broker) and measures, on the committed example bundle ``edge/models/pdm-classifier``:

1. ceilings: a subscriber that only counts (MQTT 3.1.1 and 5): floorline's own reader
   (``floorline.edge.mqtt.reader``, what the daemon receives with), stock paho and
   ``mosquitto_sub`` (C); an echo client that publishes one prediction-sized message per message
   (binary and JSON block feeds), at QoS 0 (both protocols) and at QoS 1 (MQTT 5), with stock
   paho and with floorline's reader; and the raw LiteRT backend at batch 1 and 32 (and 18, and
   alternating 32/18);
2. ``floorline run`` (its own process) on a per-sample JSON stream of 50 assets: the highest rate
   it sustains without losing anything, by bounded bisection up to the larger of the two Python
   bare subscribers' ceilings, per protocol; reported against floorline's reader (the goal),
   stock paho and mosquitto_sub; then, on MQTT 5, the overload curve (0.9-1.5 x that rate);
3. the same for one-window-per-message block streams (binary float32 and JSON blocks), searched
   up to the larger QoS 1 echo ceiling, the goal's being stock paho's; then two daemons sharing
   one binary block stream through an MQTT 5 shared subscription, and the multi-worker run:
   a daemon with ``workers: 1`` and one with ``workers: 2`` on binary blocks, each searched over
   the same range, with the CPU of the reader and of each worker (``tests/bench_workers.py``
   runs this section alone, repeated);
4. publish-to-prediction latency at half the sustained per-sample rate, split into publish →
   daemon receipt, the daemon's own ``end_to_end``, and encoded → collector;
5. the daemon's memory (PSS over its process tree, and RSS), and its time from process start to
   READY=1 on $NOTIFY_SOCKET;
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
  pre-encoded MQTT PUBLISH packets straight to its socket (QoS 0 needs nothing else), so it
  takes a fraction of a core at any rate the receivers can take. paho is used only on the
  receiving side, which is what the ceilings are about.
- Ceilings are measured in a closed loop (``_flow``): the generator stays a window of messages
  ahead of what the client has passed on, so the client always has input and the broker never
  builds a backlog; the rate is taken after a fifth of the burst for start-up. (A flood, as
  before issue 15, measured the broker's queueing and dropping on the same two cores instead:
  docs/benchmarks.md, "Why the echo ceiling measured low".) Stock paho clients are turned the way
  the daemon's transport turns its own connection (``_network_loop``). The daemon's steps are
  paced in 0.5 ms ticks; it publishes its predictions at QoS 1 through its outbox, as configured
  in ``tests/soak.py`` and by default.
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
import select
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
Reader = Literal["paho", "floorline", "paho-loop"]
"""How a ceiling's client receives: stock paho (``on_message`` per message, its socket turned as
the daemon turns its own: ``_network_loop``), floorline's own reader
(``floorline.edge.mqtt.reader.BufferedClient``, the daemon's: PUBLISH runs to ``on_publishes``),
or stock paho turned by its own ``loop()`` (a diagnostic: how the ceilings ran before issue 15)."""
Tally = Any
"""A one-slot ``RawArray("q", 1)`` in shared memory: the measured client's running count, read
by the load generator (``_flow``)."""
PROTOCOLS: tuple[Protocol, ...] = ("3.1.1", "5")
READERS: tuple[Reader, ...] = ("paho", "floorline")
READER_LABELS: dict[Reader, str] = {"paho": "stock paho", "floorline": "floorline reader",
                                    "paho-loop": "stock paho, its own loop()"}
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
    overload_factors: tuple[float, ...] = (0.9, 1.0, 1.1, 1.2, 1.3, 1.5)
    """The overload curve's offered rates, as multiples of the per-sample sustained rate."""
    pair_steps: int = 4
    """Steps of the two-instance search."""
    echo_protocols: tuple[Protocol, ...] = ("3.1.1", "5")
    """Where the QoS 0 echoes are measured (the daemon's block streams run on MQTT 5 only)."""
    diagnostics: bool = True
    """Also stock paho's own ``loop()`` echo: the cause of the low echo ceilings before issue 15."""


FULL = Budget(ceiling_s=3.0, ceiling_bursts=2, step_s=4.0, steps=6, block_step_s=3.0,
              block_steps=5, naive_steps=4, latency_s=10.0, backend_s=1.0, warmup_s=1.0)
QUICK = Budget(ceiling_s=1.0, ceiling_bursts=1, step_s=1.5, steps=3, block_step_s=1.5,
               block_steps=3, naive_steps=1, latency_s=3.0, backend_s=0.3, warmup_s=0.5,
               overload_factors=(0.9, 1.1, 1.3, 1.5), pair_steps=3)
# The smoke test's: every section once, in seconds; 8 assets so the naive way's step stays short.
# Its naive way runs only when the Keras model is already there (it passes --no-train).
TINY = Budget(ceiling_s=0.4, ceiling_bursts=1, step_s=0.4, steps=1, block_step_s=0.4,
              block_steps=1, naive_steps=1, latency_s=0.5, backend_s=0.1, warmup_s=0.2, assets=8,
              overload_factors=(1.1, 1.5), pair_steps=1, echo_protocols=("5",),
              diagnostics=False)


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

    def subscribe(self, topic_filter: str) -> None:
        """SUBSCRIBE to TOPIC_FILTER at QoS 0 and wait for the SUBACK (nothing else arrives yet)."""
        body = b"\x00\x01" + (b"\x00" if self.v5 else b"") + _utf8(topic_filter) + b"\x00"
        self._sock.settimeout(10)
        self._sock.sendall(b"\x82" + _varint(len(body)) + body)
        head = self._recv_exact(2)
        rest = self._recv_exact(head[1])
        if head[0] != 0x90 or rest[-1] >= 0x80:
            raise ConnectionError(f"broker refused the raw subscription: SUBACK {head + rest!r}")
        self._sock.settimeout(None)

    def count_publishes(self, tally: Tally, stop: threading.Event) -> None:
        """Add every PUBLISH packet received to TALLY[0] until STOP; decodes nothing else.

        The cheapest receiver there is in Python (one ``recv_into`` per 256 KiB, a length walk
        per packet): the third process counting an echo client's output must not take the CPU
        the echo client is measured with.
        """
        buf = bytearray(1 << 18)
        view = memoryview(buf)
        have = 0
        self._sock.settimeout(0.05)
        while not stop.is_set():
            try:
                got = self._sock.recv_into(view[have:])
            except TimeoutError:
                continue
            if not got:
                return
            have += got
            pos, count = 0, 0
            while True:  # whole packets in buf[pos:have]
                if have - pos < 2:
                    break
                length, shift, i = 0, 0, pos + 1
                while i < have:
                    byte = buf[i]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    i += 1
                    if not byte & 0x80:
                        break
                else:
                    break  # the length itself is cut
                if i + length > have:
                    break
                if buf[pos] >> 4 == 3:
                    count += 1
                pos = i + length
            tally[0] += count
            if pos:
                buf[: have - pos] = buf[pos:have]
                have -= pos

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


def _wchar_count(pid: int) -> int:
    """Messages a ``mosquitto_sub -F x`` process printed: its written bytes over 2 ("x\\n" each).

    ``wchar`` also counts its socket writes, a few bytes before the count is based and a 2-byte
    PINGREQ per keepalive (60 s): at most one message's error over a burst.
    """
    with Path(f"/proc/{pid}/io").open("rb") as f:
        for line in f:
            if line.startswith(b"wchar:"):
                return int(line.split()[1]) // 2
    return 0


@dataclass
class FlowReport:
    """One closed-loop burst (``_flow``): what was sent, what the measured client passed on."""

    send: SendReport
    count: CountReport
    generator_idle: float
    """Share of the burst the generator spent waiting for credit: above 0 it was never what
    limited the rate (it was ahead of the client by the whole window)."""


def _flow(
    wire: RawPublisher, data: bytes, ends: NDArray[np.int64], duration: float, window: int,
    tally: Tally, wchar_pid: int | None,
) -> FlowReport:
    """Send DATA's messages (repeatedly) for DURATION, never more than WINDOW ahead of the count.

    The count is what the measured client has passed on: a bare subscriber's messages, an echo
    client's echoes as its counting process receives them (TALLY[0], written by that process),
    or ``mosquitto_sub``'s output (WCHAR_PID's written bytes). Keeping the broker's queue for the
    client at most WINDOW messages deep measures the client at its own pace: a flood instead
    makes the broker spend its CPU queuing and dropping what the client cannot take, on the same
    two cores (docs/benchmarks.md, "Why the echo ceiling measured low").
    """
    n = len(ends)
    view = memoryview(data)
    bounds = [0, *ends.tolist()]

    def counted() -> int:
        return _wchar_count(wchar_pid) if wchar_pid is not None else int(tally[0])

    base = counted()
    timeline: list[tuple[float, int]] = []
    sent, idle, sampled = 0, 0.0, 0.0
    start = time.monotonic()
    deadline = start + duration
    while (now := time.monotonic()) < deadline:
        done = counted() - base
        if now - sampled >= 0.005:
            timeline.append((now, done))
            sampled = now
        room = done + window - sent
        if room <= 0:
            time.sleep(0.0002)
            idle += time.monotonic() - now
            continue
        i = sent % n
        j = min(n, i + min(room, 512))
        wire.write(view[bounds[i] : bounds[j]])
        sent += j - i
    finished = time.monotonic()
    timeline.append((finished, counted() - base))
    return FlowReport(SendReport(sent, start, finished), _timeline_rate(timeline),
                      round(idle / max(finished - start, 1e-9), 3))


def publisher_main(conn: Connection, port: int, protocol: Protocol, tally: Tally) -> None:
    """Publisher process: build and send streams on command; reply with a report each.

    ``("paced", spec, rate)``: SPEC at RATE messages/s (a step); ``("flow", spec, (duration,
    window, wchar_pid))``: closed-loop for a ceiling (``_flow``).
    """
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
            if op == "paced":
                conn.send(_paced(wire, data, ends, arg))
            else:
                duration, window, wchar_pid = arg
                conn.send(_flow(wire, data, ends, duration, window, tally, wchar_pid))
    finally:
        wire.close()


def _paho_client(protocol: Protocol, prefix: str, *, reader: Reader = "paho") -> mqtt.Client:
    return (BufferedClient if reader == "floorline" else mqtt.Client)(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"{prefix}-{uuid.uuid4().hex[:6]}",
        protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
    )


DRAIN_READS = 256
"""A turn of ``_network_loop`` reads at most this many times before it writes and selects again."""


def _network_loop(
    client: mqtt.Client, stop: threading.Event, progress: Callable[[], int], reader: Reader
) -> None:
    """Turn CLIENT's network loop until STOP, the way the daemon's transport turns it.

    As ``edge/mqtt/transport.py`` does (``MqttTransport._turn``) through paho's documented
    external-loop API: one ``select``, reads until the socket is drained (PROGRESS, packets
    handled so far, stops moving), one write of everything queued, ``loop_misc``. Stock paho's
    own ``loop()`` (READER ``paho-loop``, how these ceilings ran until issue 15) reads one packet
    per ``select`` when nothing is in flight, and each ``publish`` from a callback writes a
    wake-up byte to its socket pair that the next turn reads back: about a third of a stock
    echo client's time (docs/benchmarks.md).
    """
    if reader == "paho-loop":
        while not stop.is_set():
            client.loop(timeout=0.05)
        return
    unsent = getattr(client, "unsent", lambda: 0)  # floorline's reader may hold written bytes
    while not stop.is_set():
        sock = client.socket()
        if sock is None:
            return
        wants = client.want_write() or unsent()
        readable, _, _ = select.select([sock], [sock] if wants else [], [], 0.05)
        if readable:
            for _ in range(DRAIN_READS):
                before = progress()
                if client.loop_read() or progress() == before:
                    break
        if client.want_write() or unsent():
            client.loop_write()
        client.loop_misc()


def _connect_and_subscribe(
    client: mqtt.Client, port: int, topic_filter: str, *, reader: Reader,
    progress: Callable[[], int], qos: int = 0,
) -> Callable[[], None]:
    """Connect, subscribe, run the network loop on a thread; returns what stops that thread."""
    subscribed = threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect(HOST, port, keepalive=60)
    client.subscribe(topic_filter, qos)
    stop = threading.Event()
    loop = threading.Thread(target=_network_loop, args=(client, stop, progress, reader),
                            daemon=True)
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
    conn: Connection, port: int, protocol: Protocol, topic_filter: str, reader: Reader,
    tally: Tally,
) -> None:
    """Bare subscriber process: counts its messages into TALLY[0], nothing else.

    The load generator reads the count (``_flow``): for its credit and for the rate. READER
    ``floorline`` receives with the daemon's own reader (``floorline.edge.mqtt.reader``), counting
    each PUBLISH run by its length.
    """

    def one(_topic: str) -> None:
        tally[0] += 1

    def run(batch: list[Publish]) -> None:
        tally[0] += len(batch)

    client = _paho_client(protocol, "bench-count", reader=reader)
    _receive(client, one, run)
    stop = _connect_and_subscribe(client, port, topic_filter, reader=reader,
                                  progress=lambda: int(tally[0]))
    conn.send("ready")
    conn.recv()  # told to stop
    stop()
    client.disconnect()


def raw_counter_main(
    conn: Connection, port: int, protocol: Protocol, topic_filter: str, tally: Tally
) -> None:
    """The counting third process of an echo ceiling: ``RawPublisher.count_publishes``."""
    wire = RawPublisher(HOST, port, protocol, f"bench-tally-{uuid.uuid4().hex[:6]}")
    wire.subscribe(topic_filter)
    stop = threading.Event()
    counting = threading.Thread(target=wire.count_publishes, args=(tally, stop), daemon=True)
    counting.start()
    conn.send("ready")
    conn.recv()
    stop.set()
    counting.join(5)
    wire.close()


ECHO_INFLIGHT = 100
"""In-flight QoS 1 messages the QoS 1 echo allows: the daemon's (``MqttTransport``), not paho's
default 20."""


def echo_main(
    conn: Connection, port: int, protocol: Protocol, topic_filter: str, reader: Reader,
    qos: int = 0,
) -> None:
    """Echo process: for every message received, publish one prediction-sized message at QOS.

    QOS 1 also subscribes at QoS 1 (the raw load generator publishes at QoS 0, so the input still
    arrives at QoS 0, as the daemon's does) and lets ``ECHO_INFLIGHT`` publications be in flight:
    one message in, one QoS 1 message out and its PUBACK, the protocol work the daemon cannot
    avoid. Under a flood a QoS 1 echo stalls: its PUBACKs queue behind the flood on the same
    socket and the in-flight window closes (~200 echoes/s on MQTT 5 once measured); the closed
    loop of ``_flow`` keeps that queue short. READER ``floorline`` receives with the daemon's own
    reader (``floorline.edge.mqtt.reader``); it publishes through paho all the same.
    """
    received = acked = 0
    client = _paho_client(protocol, "bench-echo", reader=reader)
    if qos:
        client.max_inflight_messages_set(ECHO_INFLIGHT)

    def one(topic: str) -> None:
        nonlocal received
        received += 1
        # The asset level of the topic, as the daemon takes it (topic_segment -2).
        client.publish("echo/" + topic.rsplit("/", 2)[1], ECHO_PAYLOAD, qos=qos)

    def run(batch: list[Publish]) -> None:
        for topic, _, _, _ in batch:
            one(topic)

    def published(*_: object) -> None:
        nonlocal acked
        acked += 1

    if qos:  # paho builds a reason code and properties per on_publish call: only when needed
        client.on_publish = published
    _receive(client, one, run)
    stop = _connect_and_subscribe(client, port, topic_filter, reader=reader, qos=qos,
                                  progress=lambda: received + acked)
    conn.send("ready")
    if conn.recv() == "count":
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


TALLY = "<tally>"
"""Stands for the host process's shared count in a role's arguments (``Host.start``)."""


def host_main(conn: Connection, tally: Tally) -> None:
    """A client host: runs one role (a ceiling's client) after another, on command.

    A role is ``fn(conn, *args)``: it says "ready", serves, and returns once told to stop; the
    host then says "idle". Spawning a process per client cost 0.5-1 s each (imports), two per
    echo ceiling, the largest part of a --tiny run.
    """
    conn.send("ready")
    while (command := conn.recv()) is not None:
        role, args = command
        role(conn, *(tally if a == TALLY else a for a in args))
        conn.send("idle")


class Host:
    """A ``host_main`` process, started on first use and again if a role killed it."""

    def __init__(self, tally: Tally) -> None:
        self._tally = tally
        self._worker: Worker | None = None

    @property
    def pid(self) -> int | None:
        """The host process's id (None before its first role)."""
        return None if self._worker is None else self._worker.process.pid

    def start(self, role: Callable[..., None], *args: object) -> Role:
        """Run ROLE(conn, *ARGS) in the host; returns once it said "ready"."""
        if self._worker is None or not self._worker.process.is_alive():
            self._worker = Worker(host_main, self._tally)
        self._worker.conn.send((role, args))
        self._worker.expect("ready", 30)
        return Role(self._worker)

    def close(self) -> None:
        """End the host process."""
        if self._worker is not None:
            self._worker.close()


class Role:
    """A running role: ``ask`` it once (a role serves one request), ``close`` it."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._open = True

    def ask(self, what: str, timeout: float = 30) -> Any:
        """Send WHAT, return the reply; the role then stops."""
        self._worker.conn.send(what)
        self._open = False
        reply = self._worker.recv(timeout)
        self._worker.expect("idle", 30)
        return reply

    def close(self) -> None:
        """Stop the role if it still runs (the host stays)."""
        if self._open:
            self._open = False
            with contextlib.suppress(OSError, BrokenPipeError):
                self._worker.conn.send("stop")
            with contextlib.suppress(RuntimeError, TimeoutError):
                self._worker.expect("idle", 30)


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


MACHINE = "machine (all processes)"
"""The ``cpu_split`` entry for the whole machine (/proc/stat): what is left of the cores."""


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds PID has used so far (all its threads); PID 0: the machine's."""
    if pid == 0:
        busy = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        # user nice system idle iowait irq softirq steal: all but idle and iowait
        ticks = sum(int(x) for i, x in enumerate(busy[:8]) if i not in (3, 4))
        return ticks / os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process (those gone are left out)."""
    out: dict[str, float] = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[name] = proc_cpu_s(pid)
    return out


def tree_pids(pid: int) -> list[int]:
    """PID and every process below it (a daemon's worker processes, once it has any)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree_memory_mb(pid: int) -> dict[str, float]:
    """PSS and RSS (MiB) summed over PID's process tree, and how many processes that is.

    PSS (``/proc/PID/smaps_rollup``) shares each page among the processes mapping it, so a tree
    of processes sharing libraries and a model is not counted once per process as RSS would.
    """
    pss = rss = 0.0
    pids = tree_pids(pid)
    for each in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{each}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) / 1024
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1]) / 1024
    return {"pss": round(pss, 1), "rss": round(rss, 1), "processes": len(pids)}


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
    companions: list[Target] = field(default_factory=list)
    """More daemons sharing the work (the two-instance run): their predictions count with this
    one's (PRED_PREFIX covers them all), as do their stats and their CPU."""

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def check_alive(self) -> None:
        """Raise with the log's tail if the process (or a companion) has exited."""
        for other in self.companions:
            other.check_alive()
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path else ""
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail}")

    def stop(self) -> None:
        """SIGTERM (the daemon drains), then SIGKILL if it takes too long."""
        for other in self.companions:
            other.stop()
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


def _pipeline_yaml(
    name: str, kind: Kind, out_qos: int = 1, *, share: str | None = None, extra: str = ""
) -> str:
    """One pipeline of the benchmark's configuration. SHARE: subscribe through the MQTT 5 shared
    subscription ``$share/SHARE/<filter>``; EXTRA: more keys (indented lines)."""
    decoder = {
        "sample": "{type: json, timestamp: ts, sequence: seq}",
        "binary": "{type: binary, header: timestamp_sequence, sample_interval_ms: 1.0}",
        "json_block": "{type: json, samples: samples, timestamp: ts, sequence: seq}",
    }[kind]
    # Per sample: hop 32 as in tests/soak.py. Blocks: tumbling windows, one per message.
    window = f"{{hop: {HOP}, max_gap_s: 0.05}}" if kind == "sample" else "{max_gap_s: 0.05}"
    topic_filter = FEED_FILTERS[kind] if share is None else f"$share/{share}/{FEED_FILTERS[kind]}"
    return (
        f"  - name: {name}\n"
        f"    subscribe: ['{topic_filter}']\n"
        "    qos: 0\n"
        f"    bundle: '{EXAMPLE}'\n"
        "    backend: litert\n"
        f"    decoder: {decoder}\n"
        f"    window: {window}\n"
        f"    batch: {{max_batch: {BATCH}, max_wait_ms: {MAX_WAIT_MS}}}\n"
        f"    output: {{qos: {out_qos}}}\n"
        + extra
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
    *, stats: bool, out_qos: int = 1, gateway: str | None = None, share: str | None = None,
    extra: str = "",
) -> tuple[Target, Startup]:
    """``floorline run`` as its own process on a fresh state directory; waits until online.

    GATEWAY: its id (default a new one); SHARE and EXTRA: as for ``_pipeline_yaml``.
    """
    gateway = gateway or f"bench-{uuid.uuid4().hex[:6]}"
    config = work / f"{gateway}.yaml"
    config.write_text(
        f"gateway: {{id: {gateway}}}\n"
        f"state_dir: '{work / gateway}'\n"
        f"broker: {{host: {HOST}, port: {port}, protocol: '{protocol}'}}\n"
        + ("metrics: {stats_interval_s: 1}\n" if stats else "")
        + "pipelines:\n"
        + "".join(_pipeline_yaml(PIPELINE_NAMES[k], k, out_qos, share=share, extra=extra)
                  for k in kinds)
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
    """From the daemon's stats topic: messages received, dropped (inbox full) and, where the
    daemon reports it, shed in the step."""
    cpu_split: dict[str, float] = field(default_factory=dict)
    """CPU per process over the step (cores): the daemon(s), the broker, the load generator."""
    by_source: dict[str, int] = field(default_factory=dict)
    """Distinct predictions per gateway id (several only in the two-instance run)."""


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

    def __init__(self, budget: Budget, work: Path, port: int, collector: Collector,
                 broker_pid: int | None = None) -> None:
        self.budget = budget
        self.work = work
        self.port = port
        self.collector = collector
        self.broker_pid = broker_pid
        self.stats = False
        self.tally: Tally = mp.get_context("spawn").RawArray("q", 1)
        """The measured client's count during a ceiling (``_flow``)."""
        self._publishers: dict[Protocol, Worker] = {}
        self.hosts = (Host(self.tally), Host(self.tally))
        """Where the ceilings' clients run: the measured one, and an echo's counting process."""
        self._steps = 0

    def publisher(self, protocol: Protocol) -> Worker:
        """The raw publisher speaking PROTOCOL (started on first use, kept for the run)."""
        if protocol not in self._publishers:
            self._publishers[protocol] = Worker(publisher_main, self.port, protocol, self.tally)
        return self._publishers[protocol]

    def cpu_pids(self, target: Target | None = None) -> dict[str, int]:
        """The processes whose CPU a step reports (``Step.cpu_split``)."""
        pids: dict[str, int] = {}
        if target is not None:
            for i, t in enumerate([target, *target.companions]):
                name = f"daemon {chr(ord('a') + i)}" if target.companions else "daemon"
                pids[name] = t.pid
                # Worker processes (``workers: N``), counted as the daemon's in ``cpu_cores``.
                for n, child in enumerate(tree_pids(t.pid)[1:], 1):
                    pids[f"{name} worker {n}"] = child
        if self.broker_pid is not None:
            pids["broker"] = self.broker_pid
        for protocol, worker in self._publishers.items():
            if worker.process.pid is not None:
                pids[f"load generator (MQTT {protocol})"] = worker.process.pid
        pids[MACHINE] = 0  # every process on the machine: the others' share of the cores
        return pids

    def close(self) -> None:
        """Stop the publishers and the client hosts."""
        for worker in self._publishers.values():
            worker.close()
        for host in self.hosts:
            host.close()

    # -- ceilings ------------------------------------------------------------------------------

    def flow(self, protocol: Protocol, spec: StreamSpec, wchar_pid: int | None = None
             ) -> FlowReport:
        """One closed-loop burst of SPEC for the ceiling time (``_flow``)."""
        pub = self.publisher(protocol)
        pub.conn.send(("flow", spec, (self.budget.ceiling_s, CREDIT_WINDOW, wchar_pid)))
        pub.expect("built", 300)
        report: FlowReport = pub.recv(self.budget.ceiling_s + 120)
        return report

    # -- steps ---------------------------------------------------------------------------------

    def _counters(self, target: Target, after: float, timeout: float) -> dict[str, int] | None:
        """The pipeline counters from each daemon's first stats message arriving after AFTER.

        Summed over TARGET and its companions. ``shed`` (messages the daemon shed whole windows'
        worth of, issue 15) is there only when the stats topic reports it.
        """
        found: dict[str, int] = {}
        for each in [target, *target.companions]:
            one = self._counters_of(each, after, timeout)
            if one is None:
                return None
            for key, value in one.items():
                found[key] = found.get(key, 0) + value
        return found

    def _counters_of(self, target: Target, after: float, timeout: float) -> dict[str, int] | None:
        if not self.stats or target.stats_topic is None or target.pipeline is None:
            return None
        deadline = time.monotonic() + timeout
        while True:
            last = self.collector.last(target.stats_topic)
            if last is not None and last[0] > after:
                pipe = last[1].get("pipelines", {}).get(target.pipeline, {})
                out = {"received": int(pipe.get("received", 0)),
                       "dropped": int(pipe.get("dropped", pipe.get("dropped_inbox_full", 0)))}
                if "shed" in pipe:
                    out["shed"] = int(pipe["shed"])
                return out
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
        watched = self.cpu_pids(target)
        cpu0, t0 = _cpu_seconds(watched), time.monotonic()
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
        cpu1, wall = _cpu_seconds(watched), max(time.monotonic() - t0, 1e-9)
        cpu_split = {name: round((cpu1[name] - cpu0[name]) / wall, 3) for name in cpu1
                     if name in cpu0}
        cpu_cores = sum(v for k, v in cpu_split.items() if k.startswith("daemon"))
        after = self._counters(target, last_arrival + 0.05, 3.0)
        counters = None
        if before is not None and after is not None:
            counters = {k: after[k] - before.get(k, 0) for k in after}

        seen: set[tuple[int, int]] = set()
        by_source: dict[str, int] = {}
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
            source = topic.split("/", 2)[1]  # floorline/<gateway>/pred/...
            by_source[source] = by_source.get(source, 0) + 1
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
        if counters is not None and (counters["received"] != sent.sent or counters["dropped"]
                                     or counters.get("shed")):
            reasons.append(f"daemon received {counters['received']} of {sent.sent}, "
                           f"dropped {counters['dropped']}"
                           + (f", shed {counters['shed']}" if "shed" in counters else ""))
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
            cpu_cores=round(cpu_cores, 3), counters=counters, cpu_split=cpu_split,
            by_source=by_source,
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


CREDIT_WINDOW = 2000
"""Messages the ceilings' load generator may be ahead of the measured client's count (``_flow``):
enough that the client never waits for input (20-100 ms of it at the rates measured), few enough
that the broker never holds a backlog to queue, drop or put PUBACKs behind."""


def blast_spec(kind: Kind, assets: int) -> StreamSpec:
    """A reusable buffer of about 2 MB of KIND's messages, sent over and over for a ceiling."""
    approx = {"sample": 110, "binary": 830, "json_block": 6000}[kind]
    return StreamSpec(kind, "blast", assets, max(4, round(2e6 / (assets * approx))))


def _best_of(
    bench: Bench, protocol: Protocol, kind: Kind, wchar_pid: int | None = None
) -> dict[str, Any]:
    # Noise on a shared machine only ever slows a receiver down: a ceiling is the best burst.
    bursts = [bench.flow(protocol, blast_spec(kind, bench.budget.assets), wchar_pid)
              for _ in range(bench.budget.ceiling_bursts)]
    best = max(bursts, key=lambda b: b.count.rate)
    return {"rate": round(best.count.rate, 1), "bursts": [round(b.count.rate, 1) for b in bursts],
            "received": best.count.received, "offered_rate": round(best.send.rate, 1),
            "span_s": round(best.count.span_s, 2), "generator_idle": best.generator_idle}


def measure_bare(bench: Bench, protocol: Protocol, *, reader: Reader = "paho") -> dict[str, Any]:
    """Ceiling (a): a subscriber that only counts, fed per-sample messages as fast as it takes them.

    READER ``paho``: stock paho; ``floorline``: the daemon's own reader
    (``floorline.edge.mqtt.reader.BufferedClient``), the per-sample goal's ceiling.
    """
    counter = bench.hosts[0].start(counter_main, bench.port, protocol, FEED_FILTERS["sample"],
                                   reader, TALLY)
    try:
        return _best_of(bench, protocol, "sample")
    finally:
        counter.close()


def measure_c_client(bench: Bench, protocol: Protocol) -> dict[str, Any]:
    """Ceiling (a'): ``mosquitto_sub`` (C, libmosquitto) printing "x" per message to /dev/null.

    Counted from its written bytes (``_wchar_count``), fed like the others. Skipped, and said so,
    when mosquitto_sub is not installed (Debian: mosquitto-clients).
    """
    sub = shutil.which("mosquitto_sub")
    if sub is None:
        return {"skipped": "mosquitto_sub not installed (apt install mosquitto-clients)"}
    proc = subprocess.Popen(
        [sub, "-h", HOST, "-p", str(bench.port), "-V", "5" if protocol == "5" else "311",
         "-i", f"bench-c-{uuid.uuid4().hex[:6]}", "-t", FEED_FILTERS["sample"], "-F", "x",
         "--quiet"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        # Subscribed once a probe comes out: mosquitto_sub says nothing on its own.
        probe = RawPublisher(HOST, bench.port, protocol, f"bench-probe-{uuid.uuid4().hex[:6]}")
        try:
            frame = publish_frame(FEED_FILTERS["sample"].replace("+", "probe").encode(), b"{}",
                                  v5=protocol == "5")
            # Its CONNECT and SUBSCRIBE are written at once; a later growth is a probe printed.
            started, before = time.monotonic(), -1
            while True:
                probe.write(frame)
                time.sleep(0.05)
                now, count = time.monotonic(), _wchar_count(proc.pid)
                if now > started + 0.2 and before >= 0 and count > before:
                    break
                if now > started + 10 or proc.poll() is not None:
                    return {"skipped": f"mosquitto_sub did not subscribe (exit {proc.poll()})"}
                before = count
        finally:
            probe.close()
        return _best_of(bench, protocol, "sample", wchar_pid=proc.pid) | {
            "client": subprocess.run([sub, "--help"], capture_output=True, text=True,
                                     check=False, timeout=10).stdout.split("\n", 2)[1].strip()}
    finally:
        proc.terminate()
        proc.wait(5)


def measure_echo(
    bench: Bench, protocol: Protocol, kind: Kind, *, reader: Reader = "paho", qos: int = 0
) -> dict[str, Any]:
    """Ceiling (b): a client publishing one message per message at QOS; a third process counts.

    READER as for ``measure_bare`` (or ``paho-loop``); the counting process is the cheapest there
    is (``raw_counter_main``) whatever the echo client, so that it takes little of the CPU the
    echo client is measured with.
    """
    counter = bench.hosts[1].start(raw_counter_main, bench.port, protocol, "echo/#", TALLY)
    echo = bench.hosts[0].start(echo_main, bench.port, protocol, FEED_FILTERS[kind], reader, qos)
    try:
        found = _best_of(bench, protocol, kind)
        found["echo_received"] = int(echo.ask("count"))
    finally:
        echo.close()
        counter.close()
    return found | {"qos": qos}


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


FEATURE_STAGE = {
    "sample_rate": 1000.0,
    "blocks": [
        {"type": "stats"},
        {"type": "bands", "bands": [[5, 50], [50, 150], [150, 250], [250, 450]]},
        {"type": "envelope", "channels": ["accel_x"], "band": [200, 450],
         "bands": [[2, 60], [60, 120], [120, 240]]},
    ],
}
"""The feature stage of tests/test_features.py's bundle: 30 features of 3 axes (issue 17)."""


def measure_features(seconds: float, window: int = 256) -> dict[str, Any]:
    """Ceiling: the feature stage (``features.compute``) in-process, windows per second.

    Raw windows of WINDOW x 3 axes at 1 kHz through FEATURE_STAGE, at batch 1 and 32, the same
    way as the LiteRT rows; ``us_per_window`` is what the stage adds to each window's inference.
    """
    from floorline.edge.bundle.manifest import FeatureStage  # noqa: PLC0415
    from floorline.edge.stream import features  # noqa: PLC0415

    axes = ["accel_x", "accel_y", "accel_z"]
    draft = FeatureStage.model_validate({**FEATURE_STAGE, "names": ["?"]})
    stage = FeatureStage.model_validate(
        {**FEATURE_STAGE, "names": features.feature_names(draft, axes)})
    rng = np.random.default_rng(0)
    xs = {n: rng.standard_normal((n, window, 3)).astype(np.float32) for n in (1, 32)}

    def rate(n: int) -> float:
        features.compute(xs[n], stage, axes)  # warm-up
        windows = 0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            features.compute(xs[n], stage, axes)
            windows += n
        return windows / (time.monotonic() - start)

    b1, b32 = rate(1), rate(32)
    return {"window": window, "channels": 3, "features": len(stage.names),
            "batch1_windows_s": round(b1, 1), "batch32_windows_s": round(b32, 1),
            "us_per_window_batch1": round(1e6 / b1, 1),
            "us_per_window_batch32": round(1e6 / b32, 1)}


def measure_sparkplug_decode(seconds: float) -> dict[str, Any]:
    """Ceiling: the ``sparkplug`` decoder in-process on DDATA with 3 metrics by alias, msg/s.

    Beside it the ``json`` decoder on the same sample (3 features, ts, seq), measured the same way
    in the same run, as the ratio's reference. Payloads are built with the generated protobuf
    module; the decoder has seen the node's NBIRTH and the device's DBIRTH first.
    """
    from floorline.edge.decoders import make_decoder  # noqa: PLC0415
    from floorline.edge.decoders.json import JsonDecoderConfig  # noqa: PLC0415
    from floorline.edge.decoders.sparkplug import SparkplugDecoderConfig  # noqa: PLC0415
    from floorline.edge.sparkplug import sparkplug_b_pb2 as pb  # noqa: PLC0415

    names = ("accel_x", "accel_y", "accel_z")
    birth = pb.Payload(timestamp=1, seq=0)
    birth.metrics.add(name="bdSeq", datatype=4, long_value=0)
    dbirth = pb.Payload(timestamp=1, seq=1)
    for i, name in enumerate(names):
        dbirth.metrics.add(name=name, alias=i + 1, datatype=10, double_value=0.0)
    ts = 1_700_000_000_000
    messages = []
    for k in range(256):  # one full seq cycle, so the loop below never makes a gap
        p = pb.Payload(timestamp=ts + k, seq=(k + 2) % 256)
        for i in range(3):
            p.metrics.add(alias=i + 1, timestamp=ts + k, double_value=0.1 * k + i)
        messages.append(p.SerializeToString())
    topic = "spBv1.0/g/DDATA/n/d"
    sp = make_decoder(SparkplugDecoderConfig(), names)
    sp.decode(birth.SerializeToString(), "spBv1.0/g/NBIRTH/n")
    sp.decode(dbirth.SerializeToString(), "spBv1.0/g/DBIRTH/n/d")
    js = make_decoder(JsonDecoderConfig(timestamp="ts", sequence="seq"), names)
    json_messages = [orjson.dumps({"ts": k / 1000, "seq": k, "accel_x": 0.1 * k,
                                   "accel_y": 1.0, "accel_z": 2.0}) for k in range(256)]

    def rate(decode: Any, payloads: list[bytes], topic: str) -> float:
        n = 0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            for payload in payloads:
                decode(payload, topic)
            n += len(payloads)
        return n / (time.monotonic() - start)

    sparkplug = rate(sp.decode, messages, topic)
    json_rate = rate(js.decode, json_messages, "plant/pump/vibration")
    return {"ddata_3_metrics_msgs_s": round(sparkplug, 1), "json_3_features_msgs_s":
            round(json_rate, 1), "ratio_to_json": round(sparkplug / json_rate, 3)}


def _warm_up(bench: Bench, target: Target, kind: Kind, rate: float) -> Step:
    """A short stream before measuring: first inferences, allocations, SQLite pages."""
    return bench.step(target, kind, rate, bench.budget.warmup_s)


OVERLOAD_PROTOCOL: Protocol = "5"
"""The per-sample daemon whose overload curve is measured (after its search and latency step)."""


def measure_daemon_sample(
    bench: Bench, protocol: Protocol, bound: float, log: Callable[[str], None]
) -> dict[str, Any]:
    """Per-sample JSON stream: sustained rate, latency at half of it, footprint, start-up.

    The search bisects [0, BOUND] (``search_bound``), so its resolution is relative to BOUND. On
    ``OVERLOAD_PROTOCOL`` the overload curve follows (``overload_curve``), and the memory after it.
    """
    target, startup = start_daemon(bench.work, bench.port, protocol, ["sample"],
                                   bench.collector, stats=bench.stats)
    target.pipeline = PIPELINE_NAMES["sample"]
    overload = None
    try:
        log(f"  daemon up in {startup.seconds:.2f} s ({startup.source}); warming up")
        rss_start = proc_rss_mb(target.pid)
        warm = _warm_up(bench, target, "sample", min(2000.0, bound / 4))
        rss_warm = proc_rss_mb(target.pid)
        mem_warm = tree_memory_mb(target.pid)
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
        rss_sustained = max(
            (x.rss_peak_mb or 0.0 for x in [*search.steps, *([latency] if latency else [])]
             if x.passed or x is latency), default=0.0)
        if protocol == OVERLOAD_PROTOCOL:
            # Without a sustained rate (a --tiny search of one failed step), the warm-up's rate.
            base = search.sustained or warm.offered_rate
            overload = overload_curve(bench, target, base, found=search.sustained > 0, log=log)
        rss_load = target.sampler.peak
        mem_after = tree_memory_mb(target.pid)
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
        # Over the daemon's process tree; "after load": after the overloaded search steps, and
        # on OVERLOAD_PROTOCOL after the overload curve too.
        "memory_mb": {"after_warm_up": mem_warm, "after_load": mem_after,
                      "after_overload_curve": overload is not None},
        "overload": overload,
    }


def overload_curve(
    bench: Bench, target: Target, base: float, *, found: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    """The per-sample daemon offered each of the budget's multiples of BASE, its sustained rate.

    Per step: the share of the offered windows predicted, the messages dropped and shed (from the
    stats topic, ``shed`` where the daemon reports it), the latency (lag) of what was predicted.
    The daemon is given time to drain between steps, so each starts without a backlog.
    """
    log(f"  overload curve around {base:,.0f}/s"
        + ("" if found else " (no sustained rate found: the warm-up's rate)"))
    points = []
    for factor in bench.budget.overload_factors:
        bench.settle(target)
        s = bench.step(target, "sample", base * factor, bench.budget.step_s)
        share = s.predictions / s.expected if s.expected else 0.0
        c = s.counters or {}
        points.append({
            "factor": factor, "offered_rate": s.offered_rate,
            "windows_predicted": round(share, 4), "predictions": s.predictions,
            "expected": s.expected, "sent": s.sent, "received": c.get("received"),
            "dropped": c.get("dropped"), "shed": c.get("shed"),
            "latency_ms": s.latency_ms, "trend_ms": s.trend_ms, "drain_s": s.drain_s,
            "cpu_cores": s.cpu_cores, "rss_peak_mb": s.rss_peak_mb, "passed": s.passed,
        })
        log(f"    {factor:.1f} x = {s.offered_rate:9,.0f}/s: {share:6.1%} of windows, dropped "
            f"{c.get('dropped', 'n/a')}, shed {c.get('shed', 'n/a')}, p99 "
            f"{s.latency_ms.get('p99', math.nan):.0f} ms")
    return {"base_rate": round(base, 1), "base_is_sustained": found, "points": points,
            "shed_reported": any(p["shed"] is not None for p in points)}


def measure_overload_only(bench: Bench, log: Callable[[str], None]) -> dict[str, Any]:
    """``--only overload``: the per-sample daemon on ``OVERLOAD_PROTOCOL`` and its overload curve.

    Only what the curve stands on: the two bare subscribers' ceilings (the search's bound), then
    ``measure_daemon_sample`` (search, latency step, curve) as in a full run.
    """
    p = OVERLOAD_PROTOCOL
    c: dict[str, Any] = {key: {} for key in BARE_KEYS.values()}
    for reader in READERS:
        found = c[BARE_KEYS[reader]][p] = measure_bare(bench, p, reader=reader)
        log(f"  bare subscriber, {READER_LABELS[reader]}, MQTT {p}: {found['rate']:,.0f}/s")
    bound = search_bound(c, p, "sample")
    log(f"daemon, per-sample JSON, MQTT {p} (searched up to {bound:,.0f}/s)")
    return {"ceilings": c, "daemon_sample": {p: measure_daemon_sample(bench, p, bound, log)}}


def measure_blocks_only(bench: Bench, log: Callable[[str], None]) -> dict[str, Any]:
    """``--only blocks``: the QoS 1 echo ceilings (the goal's) and the block daemon's searches."""
    p: Protocol = "5"
    c: dict[str, Any] = {key: {} for key in ECHO_KEYS.values()}
    for kind in BLOCK_KINDS:
        for reader in READERS:
            found = c[ECHO_KEYS[(reader, 1)]].setdefault(p, {})[kind] = (
                measure_echo(bench, p, kind, reader=reader, qos=1))
            log(f"  echo {kind}, QoS 1 out, {READER_LABELS[reader]}, MQTT {p}: "
                f"{found['rate']:,.0f}/s")
    blocks = measure_daemon_blocks(bench, p, {k: search_bound(c, p, k) for k in BLOCK_KINDS}, log)
    for kind in BLOCK_KINDS:
        stock = c[ECHO_KEYS[("paho", 1)]][p][kind]["rate"]
        blocks[kind]["ratio_stock_qos1_echo"] = _ratio(blocks[kind]["sustained"], stock)
        log(f"  {kind}: {blocks[kind]['sustained']:,.0f}/s = "
            f"{blocks[kind]['ratio_stock_qos1_echo']} x the stock paho QoS 1 echo")
    return {"ceilings": c, "daemon_block": blocks}


def overload_text(over: dict[str, Any] | None) -> str:
    """The overload curve alone (``--only overload``): per point, windows predicted and shed."""
    if not over:
        return "overload curve: not measured"
    lines = [f"overload curve, per-sample MQTT {OVERLOAD_PROTOCOL}, around "
             f"{over['base_rate']:,.0f} msg/s "
             + ("(sustained)" if over["base_is_sustained"] else "(warm-up rate, none found)")]
    for x in over["points"]:
        shed = (f"{x['shed'] / x['received']:6.1%}" if x["shed"] is not None and x["received"]
                else "   n/a")
        lag = x["latency_ms"].get("p99")
        lines.append(f"  {x['factor']:.2f} x {x['offered_rate']:9,.0f}/s: windows predicted "
                     f"{x['windows_predicted']:6.1%}, shed {shed} of received, dropped "
                     f"{x['dropped']}, p99 " + ("n/a" if lag is None else f"{lag:,.0f} ms"))
    return "\n".join(lines)


def measure_daemon_blocks(
    bench: Bench, protocol: Protocol, bounds: dict[Kind, float], log: Callable[[str], None]
) -> dict[str, Any]:
    """Block streams (one window per message), binary and JSON, on one daemon.

    Each kind's search bisects [0, BOUNDS[kind]] (``search_bound``: the larger QoS 1 echo).
    """
    target, startup = start_daemon(bench.work, bench.port, protocol, list(BLOCK_KINDS),
                                   bench.collector, stats=bench.stats)
    out: dict[str, Any] = {"startup": asdict(startup)}
    try:
        for kind in BLOCK_KINDS:
            target.pipeline = PIPELINE_NAMES[kind]
            log(f"  {kind} blocks (searched up to {bounds[kind]:,.0f}/s, the larger QoS 1 echo "
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


SHARE_GROUP = "bench"
"""The share group of the two-instance run: ``$share/bench/plant/+/+/vibration-bin``."""


def _best_step(search: Search) -> Step | None:
    """The passed step at the highest rate, else the last step (what failed nearest)."""
    passed = [x for x in search.steps if x.passed]
    if passed:
        return max(passed, key=lambda x: x.offered_rate)
    return search.steps[-1] if search.steps else None


def _start_failure(exc: Exception) -> str:
    # The daemon's own one-line error is the last non-empty line of its log tail.
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__


def measure_pair(
    bench: Bench, single: float, bound: float, log: Callable[[str], None]
) -> dict[str, Any]:
    """Two daemons (two gateway ids, two state directories) on one binary block stream.

    Both subscribe through the MQTT 5 shared subscription ``$share/SHARE_GROUP/<filter>``: the
    broker hands each message to one of them. Searched from SINGLE (what one daemon sustained in
    this run; every block must still be predicted exactly once, duplicates across the two count
    against it) up to 2.5 x SINGLE, or BOUND when one daemon found none. Reports the total rate,
    each daemon's share of the predictions and the CPU per process of the best step.
    """
    protocol: Protocol = "5"
    gateway = f"bench-{uuid.uuid4().hex[:6]}"
    started: list[Target] = []
    try:
        for side in "ab":
            target, _ = start_daemon(bench.work, bench.port, protocol, ["binary"],
                                     bench.collector, stats=bench.stats,
                                     gateway=f"{gateway}-{side}", share=SHARE_GROUP)
            target.pipeline = PIPELINE_NAMES["binary"]
            started.append(target)
    except (RuntimeError, TimeoutError) as exc:
        for target in started:
            target.stop()
        why = _start_failure(exc)
        log(f"  skipped: a daemon on a $share subscription did not start: {why}")
        return {"skipped": f"a daemon on a $share subscription did not start: {why}"}
    pair = started[0]
    pair.companions = started[1:]
    pair.name = f"two daemons, $share/{SHARE_GROUP} (MQTT 5, binary)"
    pair.pred_prefix = f"floorline/{gateway}-"  # both gateways' predictions
    lo, hi = (single, 2.5 * single) if single > 0 else (0.0, bound)
    try:
        log(f"  two daemons on $share/{SHARE_GROUP}/{FEED_FILTERS['binary']} "
            f"(searched {lo:,.0f}-{hi:,.0f}/s)")
        warm = _warm_up(bench, pair, "binary", min(500.0, max(hi, 1.0) / 8))
        search = bench.search(pair, "binary", lo, hi, steps=bench.budget.pair_steps,
                              step_s=bench.budget.block_step_s, log=log)
        best = _best_step(search)
        memory = [tree_memory_mb(t.pid) for t in started]
    finally:
        pair.stop()
    exact = [x.predictions == x.expected and x.duplicates == 0 for x in search.steps]
    return {
        "share": f"$share/{SHARE_GROUP}/{FEED_FILTERS['binary']}",
        "search": asdict(search), "sustained": search.sustained, "warm_up": asdict(warm),
        "single_sustained": single,
        "ratio_to_single": _ratio(search.sustained, single),
        "exact_steps": sum(exact), "steps": len(exact),
        "duplicates": sum(x.duplicates for x in search.steps),
        "best_step": None if best is None else {
            "offered_rate": best.offered_rate, "predictions": best.predictions,
            "expected": best.expected, "duplicates": best.duplicates,
            "by_daemon": best.by_source, "cpu_split": best.cpu_split, "passed": best.passed},
        "memory_mb": memory,
    }


def workers_supported() -> str | None:
    """Why a pipeline's ``workers: N`` cannot be measured yet (None: the config takes it)."""
    from floorline.edge.config.model import parse_config  # noqa: PLC0415
    from floorline.edge.errors import ConfigError  # noqa: PLC0415

    text = ("gateway: {id: probe}\npipelines:\n"
            f"  - {{name: p, subscribe: ['a/+/b'], bundle: '{EXAMPLE}', decoder: {{type: json}}, "
            "workers: 2}\n")
    try:
        parse_config(text)
    except ConfigError as exc:
        lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
        said = next((x for x in lines if "workers" in x), lines[-1] if lines else "refused")
        return f"not implemented: the daemon's configuration refuses workers: 2 ({said[:200]})"
    return None


WORKER_COUNTS = (1, 2)
"""The multi-worker run's daemons: ``workers: 1`` (the single-process daemon) against 2."""


def measure_workers(
    bench: Bench, single: float, bound: float, log: Callable[[str], None], rounds: int = 1
) -> dict[str, Any]:
    """Binary blocks on a daemon with ``workers: 1`` and one with ``workers: 2``, same section.

    Each daemon runs only the binary block pipeline (MQTT 5), searched over the same range: up
    to the larger of BOUND (the QoS 1 echo ceiling) and 2.5 x SINGLE (the block daemon's rate
    earlier in the run). ROUNDS > 1 repeats the pair, alternating, for the spread on a shared
    machine. The ratio is the best two-worker rate over the best one-worker rate of the section.
    Per daemon: the best step's CPU split (the reader, each worker, the broker, the load
    generator, the machine as a whole) and its CPU per message; PSS over the process tree.
    """
    why = workers_supported()
    if why is not None:
        log(f"  {why}")
        return {"implemented": False, "skipped": why}
    hi = max(bound, 2.5 * single)
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in WORKER_COUNTS}
    for r in range(rounds):
        for n in WORKER_COUNTS:
            target, _ = start_daemon(bench.work, bench.port, "5", ["binary"], bench.collector,
                                     stats=bench.stats, extra=f"    workers: {n}\n")
            target.pipeline = PIPELINE_NAMES["binary"]
            log(f"  workers: {n} (round {r + 1} of {rounds}, searched up to {hi:,.0f}/s)")
            try:
                _warm_up(bench, target, "binary", min(500.0, hi / 8))
                search = bench.search(target, "binary", 0.0, hi, steps=bench.budget.block_steps,
                                      step_s=bench.budget.block_step_s, log=log)
                best = _best_step(search)
                memory = tree_memory_mb(target.pid)
            finally:
                target.stop()
            runs[n].append({"sustained": search.sustained, "search": asdict(search),
                            "best_step": _cpu_report(best), "memory_mb": memory})
    one = max(x["sustained"] for x in runs[1])
    two = max(x["sustained"] for x in runs[2])
    best_two = max(runs[2], key=lambda x: x["sustained"])
    return {"implemented": True, "workers": 2, "rounds": rounds,
            "one_worker": {"sustained": one, "runs": [x["sustained"] for x in runs[1]]},
            "runs": [x["sustained"] for x in runs[2]],
            "sustained": two, "search": best_two["search"],
            "ratio_to_one_worker": _ratio(two, one),
            "ratios_by_round": [_ratio(b["sustained"], a["sustained"])
                                for a, b in zip(runs[1], runs[2], strict=True)],
            "ratio_to_block_daemon": _ratio(two, single),
            "cpu_split": best_two["best_step"]["cpu_split"] if best_two["best_step"] else None,
            "memory_mb": best_two["memory_mb"],
            "by_workers": {str(n): runs[n] for n in WORKER_COUNTS}}


def _cpu_report(step: Step | None) -> dict[str, Any] | None:
    """STEP's rate, verdict, CPU split and CPU per message of each daemon process (µs)."""
    if step is None:
        return None
    rate = max(step.offered_rate, 1e-9)
    return {"offered_rate": step.offered_rate, "passed": step.passed, "reason": step.reason,
            "cpu_split": step.cpu_split,
            "us_per_msg": {k: round(1e6 * v / rate, 1) for k, v in step.cpu_split.items()
                           if k.startswith("daemon")}}


def workers_text(w: dict[str, Any]) -> str:
    """The multi-worker run as text: each daemon's rates, and the best steps' CPU."""
    if not w.get("implemented"):
        return f"multi-worker run: {w.get('skipped')}"
    head = (f"two workers / one worker, binary blocks: {w['ratio_to_one_worker']} "
            f"(best {w['sustained']:,.0f}/s against {w['one_worker']['sustained']:,.0f}/s; "
            f"by round {w['ratios_by_round']})")
    lines = [head]
    for n, runs in w["by_workers"].items():
        for i, x in enumerate(runs, 1):
            b = x["best_step"] or {}
            split = ", ".join(f"{k} {v:.2f}" for k, v in (b.get("cpu_split") or {}).items())
            per = ", ".join(f"{k} {v:.0f}" for k, v in (b.get("us_per_msg") or {}).items())
            lines.append(f"  workers: {n} round {i}: sustained {x['sustained']:,.0f}/s; best "
                         f"step {b.get('offered_rate', 0):,.0f}/s {b.get('reason', '')}")
            lines.append(f"    CPU, cores: {split}")
            lines.append(f"    CPU per message, µs: {per}; PSS {x['memory_mb']['pss']} MiB "
                         f"over {x['memory_mb']['processes']} processes")
    return "\n".join(lines)


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


BARE_KEYS: dict[Reader, str] = {"paho": "bare", "floorline": "bare_floorline"}
"""Where each reader's bare-subscriber ceilings go in the results' ``ceilings``."""
ECHO_KEYS: dict[tuple[Reader, int], str] = {
    ("paho", 0): "echo", ("floorline", 0): "echo_floorline",
    ("paho", 1): "echo_qos1", ("floorline", 1): "echo_qos1_floorline",
}
"""Where each (reader, QoS out) echo ceiling goes in the results' ``ceilings``."""
QOS1_PROTOCOLS: tuple[Protocol, ...] = ("5",)
"""The QoS 1 echo is measured where the daemon's block streams are: MQTT 5."""


def _rate(found: dict[str, Any] | None) -> float | None:
    return None if not found or "rate" not in found else float(found["rate"])


def ceiling_of(
    c: dict[str, Any], reader: Reader, protocol: Protocol, kind: Kind, qos: int = 1
) -> float | None:
    """READER's ceiling for KIND on PROTOCOL: the bare subscriber per sample, the QOS echo per
    block (None: not measured in this run)."""
    if kind == "sample":
        return _rate(c[BARE_KEYS[reader]].get(protocol))
    return _rate(c[ECHO_KEYS[(reader, qos)]].get(protocol, {}).get(kind))


def search_bound(c: dict[str, Any], protocol: Protocol, kind: Kind) -> float:
    """Where the daemon's search for KIND on PROTOCOL tops out: the larger of the two readers'.

    Per sample the bare subscribers, per block the QoS 1 echoes (the goal's ceiling). The daemon
    receives with floorline's reader, so it can outrun a stock paho client; the stock ceiling
    alone would cap it there.
    """
    found = [ceiling_of(c, reader, protocol, kind) for reader in READERS]
    return max([f for f in found if f] or [0.0])


def ceiling_ratios(
    sustained: float, c: dict[str, Any], protocol: Protocol, kind: Kind
) -> dict[str, Any]:
    """SUSTAINED against every ceiling of its kind; ``ratio`` is the goal's.

    Per sample the goal is floorline's own bare reader (``ratio``, ``ratio_floorline``), beside
    stock paho (``ratio_paho``) and ``mosquitto_sub`` (``ratio_c``). Per block it is the stock
    paho QoS 1 echo (``ratio``), beside floorline's QoS 1 echo (``ratio_floorline``) and the
    QoS 0 echoes (``ratio_qos0``, ``ratio_qos0_floorline``).
    """
    if kind == "sample":
        own = _ratio(sustained, ceiling_of(c, "floorline", protocol, kind))
        return {"ratio": own, "ratio_floorline": own,
                "ratio_paho": _ratio(sustained, ceiling_of(c, "paho", protocol, kind)),
                "ratio_c": _ratio(sustained, _rate(c.get("bare_c", {}).get(protocol))),
                "bound": search_bound(c, protocol, kind)}
    return {
        "ratio": _ratio(sustained, ceiling_of(c, "paho", protocol, kind, 1)),
        "ratio_floorline": _ratio(sustained, ceiling_of(c, "floorline", protocol, kind, 1)),
        "ratio_qos0": _ratio(sustained, ceiling_of(c, "paho", protocol, kind, 0)),
        "ratio_qos0_floorline": _ratio(sustained, ceiling_of(c, "floorline", protocol, kind, 0)),
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
        add(f"per-sample sustained >= 0.85 x floorline's bare reader (MQTT {p})", d["ratio"],
            0.85, at_least=True, unit="ratio")
    for kind in BLOCK_KINDS:
        d = r["daemon_block"][kind]
        add(f"{kind} blocks sustained >= 0.85 x stock paho QoS 1 echo "
            f"(MQTT {r['daemon_block']['protocol']})", d["ratio"], 0.85, at_least=True,
            unit="ratio")
    for p in PROTOCOLS:
        lat = r["daemon_sample"][p]["latency"]
        p99 = lat["latency_ms"].get("p99") if lat else None
        add(f"p99 publish->prediction <= 20 ms at 50 % load (MQTT {p})", p99, 20.0,
            at_least=False, unit="ms")
    over = r["daemon_sample"][OVERLOAD_PROTOCOL]["overload"] or {}
    at = [x for x in over.get("points", []) if abs(x["factor"] - 1.1) < 1e-9]
    add(f"overload: >= 85 % of windows predicted at 1.1 x sustained (MQTT {OVERLOAD_PROTOCOL})",
        at[0]["windows_predicted"] if at else None, 0.85, at_least=True, unit="share",
        skipped=None if at else "1.1 x not in this run's overload curve")
    for p in PROTOCOLS:
        mem = r["daemon_sample"][p]["memory_mb"]
        worst = max(mem["after_warm_up"]["pss"], mem["after_load"]["pss"])
        add(f"PSS <= 70 MiB over the daemon's processes, after warm-up and after load (MQTT {p})",
            worst, 70.0, at_least=False, unit="MiB")
    w = r["workers"]
    add("two workers: block throughput >= 1.4 x one worker", w.get("ratio_to_one_worker"), 1.4,
        at_least=True, unit="x", skipped=w.get("skipped"))
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
        v = ("n/a" if value is None else str(value) if isinstance(value, int)
             else f"{value:,.0f}" if value >= 100 else f"{value:.2f}")
        q = "" if ratio is None else f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.2g}"
        rows.append((what, f"{v} {unit}" if unit else "", against, q))

    c = r["ceilings"]
    for p in PROTOCOLS:
        own = c["bare_floorline"][p]["rate"]
        row(f"ceiling: bare subscriber, floorline reader, MQTT {p}", own, "msg/s")
        row("  bare subscriber, stock paho", c["bare"][p]["rate"], "msg/s",
            f"floorline bare MQTT {p}", _ratio(c["bare"][p]["rate"], own))
        cc = c["bare_c"].get(p, {})
        if "rate" in cc:
            row("  bare subscriber, mosquitto_sub (C)", cc["rate"], "msg/s",
                f"floorline bare MQTT {p}", _ratio(cc["rate"], own))
        else:
            row("  bare subscriber, mosquitto_sub (C)", None, "", "skipped")
    for p in PROTOCOLS:
        for kind in BLOCK_KINDS:
            for qos in (0, 1):
                stock = ceiling_of(c, "paho", p, kind, qos)
                own_echo = ceiling_of(c, "floorline", p, kind, qos)
                if stock is None:
                    continue
                row(f"ceiling: paho echo, {kind} in, QoS {qos} out, MQTT {p}", stock, "msg/s")
                row("  echo, floorline reader", own_echo, "msg/s",
                    f"paho echo {kind} QoS {qos}", _ratio(own_echo, stock))
    diag = c.get("echo_paho_loop", {}).get("5", {}).get("binary")
    if diag:
        row("  paho echo binary QoS 0 MQTT 5, paho's own loop()", diag["rate"], "msg/s",
            "paho echo binary QoS 0", _ratio(diag["rate"], ceiling_of(c, "paho", "5", "binary", 0)))
    b = c["backend"]
    row(f"ceiling: LiteRT infer, batch 1 ({b['runtime']})", b["batch1_windows_s"], "win/s")
    row("ceiling: LiteRT infer, batch 32", b["batch32_windows_s"], "win/s")
    row("  LiteRT infer, batch 18", b["batch18_windows_s"], "win/s")
    row("  LiteRT infer, batch alternating 32/18", b["alternating_32_18_windows_s"], "win/s",
        "batch 32", _ratio(b["alternating_32_18_windows_s"], b["batch32_windows_s"]))
    ft = c.get("features")
    if ft:
        row(f"ceiling: feature stage, batch 1 ({ft['window']}x{ft['channels']} -> "
            f"{ft['features']} features)", ft["batch1_windows_s"], "win/s",
            "LiteRT batch 1", _ratio(ft["batch1_windows_s"], b["batch1_windows_s"]))
        row("  feature stage, batch 32", ft["batch32_windows_s"], "win/s",
            "LiteRT batch 32", _ratio(ft["batch32_windows_s"], b["batch32_windows_s"]))
    spd = c.get("sparkplug_decode")
    if spd:
        row("ceiling: Sparkplug B decode, DDATA 3 metrics", spd["ddata_3_metrics_msgs_s"],
            "msg/s", "json decode, 3 features", spd["ratio_to_json"])
    for p in PROTOCOLS:
        d = r["daemon_sample"][p]
        row(f"daemon per-sample JSON, MQTT {p}", d["sustained"], "msg/s",
            f"floorline bare MQTT {p}", d["ratio"])
        row("  against stock paho", None, "", f"paho bare MQTT {p}", d["ratio_paho"])
        row("  against mosquitto_sub", None, "", f"C bare MQTT {p}", d["ratio_c"])
        windows = d["sustained"] / HOP  # one window per HOP samples of each asset
        row("  as windows", windows, "win/s", "LiteRT batch 32",
            _ratio(windows, b["batch32_windows_s"]))
    db = r["daemon_block"]
    bp = db["protocol"]
    for kind in BLOCK_KINDS:
        row(f"daemon {kind} blocks, MQTT {bp}", db[kind]["sustained"], "msg/s",
            f"paho echo {kind} QoS 1", db[kind]["ratio"])
        row("  against floorline QoS 1 echo", None, "", f"floorline echo {kind} QoS 1",
            db[kind]["ratio_floorline"])
        row("  against paho QoS 0 echo", None, "", f"paho echo {kind} QoS 0",
            db[kind]["ratio_qos0"])
        row("  against floorline QoS 0 echo", None, "", f"floorline echo {kind} QoS 0",
            db[kind]["ratio_qos0_floorline"])
    pair = r.get("two_instances", {})
    if "skipped" in pair:
        row("two daemons, $share, binary blocks", None, "", "skipped (see below)")
    elif pair:
        row(f"two daemons, {pair['share']}", pair["sustained"], "msg/s",
            "one daemon, binary", pair["ratio_to_single"])
        row("  steps with every block predicted exactly once", pair["exact_steps"], "",
            f"of {pair['steps']} steps")
        best = pair["best_step"] or {}
        if best:
            row("  predictions per daemon (best step)", None, "",
                ", ".join(f"{k.rsplit('-', 1)[-1]} {v}" for k, v in best["by_daemon"].items()))
            row("  CPU, cores (best step)", None, "",
                ", ".join(f"{k} {v:.2f}" for k, v in best["cpu_split"].items()))
    w = r.get("workers", {})
    if w.get("implemented"):
        row("two workers, binary blocks", w["sustained"], "msg/s", "one worker",
            w["ratio_to_one_worker"])
        if "one_worker" in w:
            row("  one worker, same section", w["one_worker"]["sustained"], "msg/s")
            best = (max(w["by_workers"]["2"], key=lambda x: x["sustained"])["best_step"]
                    or {})
            if best.get("cpu_split"):
                row("  CPU, cores (best step)", None, "",
                    ", ".join(f"{k} {v:.2f}" for k, v in best["cpu_split"].items()))
    else:
        row("two workers, binary blocks", None, "", "not implemented")
    over = r["daemon_sample"][OVERLOAD_PROTOCOL]["overload"]
    if over:
        row(f"overload curve, per-sample MQTT {OVERLOAD_PROTOCOL}, around", over["base_rate"],
            "msg/s", "sustained" if over["base_is_sustained"] else "warm-up rate (none found)")
        for x in over["points"]:
            lag = x["latency_ms"].get("p99")
            shed = "n/a" if x["shed"] is None else x["shed"]
            row(f"  {x['factor']:.1f} x: windows predicted", x["windows_predicted"], "",
                f"dropped {x['dropped']}, shed {shed}, p99 "
                + ("n/a" if lag is None else f"{lag:,.0f} ms"),
                x["windows_predicted"])
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
        mem = d["memory_mb"]
        row(f"PSS after warm-up (MQTT {p}; {mem['after_warm_up']['processes']} process(es))",
            mem["after_warm_up"]["pss"], "MiB", "goal 70", _ratio(mem["after_warm_up"]["pss"], 70))
        row("  PSS after load" + (" and the overload curve" if mem["after_overload_curve"]
                                  else ""),
            mem["after_load"]["pss"], "MiB", "goal 70", _ratio(mem["after_load"]["pss"], 70))
        row(f"RSS after warm-up (MQTT {p})", d["rss_mb"]["after_warm_up"], "MiB")
        row("  peak at sustained rates", d["rss_mb"]["peak_sustained_load"], "MiB")
        row("  peak under load (overloaded steps too)", d["rss_mb"]["peak_under_load"], "MiB")
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
        say: Callable[[str], None] = _say, only: str | None = None,
        broker_inflight: int | None = None) -> dict[str, Any]:
    """Every measurement, in one run on one broker; returns the results document.

    Without TRAIN and without the Keras model, the naive way is skipped (and says why); every
    other section runs. ONLY (a name in ``ONLY_SECTIONS``): that section alone, and what it needs.
    BROKER_INFLIGHT: the broker's ``max_inflight_messages`` (what it announces to MQTT 5 clients as
    Receive Maximum) instead of the tests' 20, mosquitto's default.
    """
    started = time.monotonic()

    def log(text: str) -> None:  # every line says when, so slow sections are easy to see
        say(f"[{time.monotonic() - started:6.1f}s] {text}")

    check_bundle()
    results: dict[str, Any] = {"machine": machine(), "budget": asdict(budget)}
    extra = "" if broker_inflight is None else f"max_inflight_messages {broker_inflight}"
    broker = Mosquitto(work / "broker", extra=extra).start()
    results["broker_inflight"] = broker_inflight or 20
    collector = Collector(broker.port)
    bench = Bench(budget, work, broker.port, collector, broker_pid=broker.pid)
    bench.stats = stats_supported()
    results["counters"] = (
        "daemon stats topic (received, dropped) + predictions" if bench.stats
        else "predictions only: this daemon has no metrics.stats_interval_s yet")
    try:
        if only == "overload":
            log("overload curve only: its ceilings, the per-sample daemon, the curve")
            results |= measure_overload_only(bench, log)
            results["elapsed_s"] = round(time.monotonic() - started, 1)
            return results
        if only == "blocks":
            log("blocks only: the QoS 1 echo ceilings on MQTT 5, the block daemon's searches")
            results |= measure_blocks_only(bench, log)
            results["elapsed_s"] = round(time.monotonic() - started, 1)
            return results
        log("ceilings")
        backend = measure_backend(budget.backend_s)
        log(f"  LiteRT: {backend}")
        c: dict[str, Any] = {key: {} for key in (*BARE_KEYS.values(), *ECHO_KEYS.values(),
                                                  "bare_c", "echo_paho_loop")}
        # Each stock ceiling beside its floorline-reader twin: drift on a shared machine
        # then moves both alike.
        for p in PROTOCOLS:
            for reader in READERS:
                found = c[BARE_KEYS[reader]][p] = measure_bare(bench, p, reader=reader)
                log(f"  bare subscriber, {READER_LABELS[reader]}, MQTT {p}: "
                    f"{found['rate']:,.0f}/s (generator idle {found['generator_idle']:.0%})")
            found = c["bare_c"][p] = measure_c_client(bench, p)
            log(f"  bare subscriber, mosquitto_sub, MQTT {p}: "
                + (f"{found['rate']:,.0f}/s" if "rate" in found else found["skipped"]))
        for p in PROTOCOLS:
            for qos in (0, 1):
                if p not in (budget.echo_protocols if qos == 0 else QOS1_PROTOCOLS):
                    continue
                for kind in BLOCK_KINDS:
                    for reader in READERS:
                        found = c[ECHO_KEYS[(reader, qos)]].setdefault(p, {})[kind] = (
                            measure_echo(bench, p, kind, reader=reader, qos=qos))
                        log(f"  echo {kind}, QoS {qos} out, {READER_LABELS[reader]}, MQTT {p}: "
                            f"{found['rate']:,.0f}/s (generator idle "
                            f"{found['generator_idle']:.0%})")
        if budget.diagnostics:
            found = c["echo_paho_loop"]["5"] = {"binary": measure_echo(
                bench, "5", "binary", reader="paho-loop")}
            log(f"  echo binary, QoS 0 out, {READER_LABELS['paho-loop']}, MQTT 5: "
                f"{found['binary']['rate']:,.0f}/s (diagnostic)")
        c["backend"] = backend
        c["sparkplug_decode"] = measure_sparkplug_decode(budget.backend_s)
        c["features"] = measure_features(budget.backend_s)
        log(f"  feature stage: {c['features']['us_per_window_batch1']:.0f} us/window at batch 1, "
            f"{c['features']['us_per_window_batch32']:.0f} at batch 32")
        log(f"  Sparkplug B decode, DDATA 3 metrics: "
            f"{c['sparkplug_decode']['ddata_3_metrics_msgs_s']:,.0f} msg/s "
            f"({c['sparkplug_decode']['ratio_to_json']:.2f}x json)")
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

        log("two daemons, one block stream, an MQTT 5 shared subscription")
        results["two_instances"] = measure_pair(
            bench, blocks["binary"]["sustained"], search_bound(c, block_protocol, "binary"), log)
        log("multi-worker run")
        results["workers"] = measure_workers(
            bench, blocks["binary"]["sustained"], search_bound(c, block_protocol, "binary"), log)

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


ONLY_SECTIONS: dict[str, str] = {
    "overload": "the bare subscribers on MQTT 5, the per-sample daemon's search, latency step "
    "and overload curve",
    "blocks": "the QoS 1 echo ceilings on MQTT 5 and the block daemon's searches, binary and JSON",
}
"""What ``--only`` can run alone, and what that includes."""


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
    parser.add_argument("--broker-inflight", type=int, metavar="N",
                        help="the broker's max_inflight_messages (MQTT 5 Receive Maximum) "
                        "instead of mosquitto's default 20")
    parser.add_argument("--only", choices=ONLY_SECTIONS, metavar="SECTION",
                        help="run one section alone, with what it needs: "
                        + ", ".join(f"{k} ({v})" for k, v in ONLY_SECTIONS.items()))
    if argv is None:
        argv = sys.argv[1:]
    args = parser.parse_args(argv)
    budget = TINY if args.tiny else QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="floorline-bench-"))
    command = "python -m tests.benchmark " + " ".join(argv)
    try:
        results = run(budget, work, profile=args.profile, train=not args.no_train,
                      only=args.only, broker_inflight=args.broker_inflight)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}")
    results["command"] = command.strip()
    if args.only == "blocks":
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nelapsed {results['elapsed_s']} s; wrote {args.json}")
        return 0
    if args.only == "overload":
        print()
        print(overload_text(results["daemon_sample"][OVERLOAD_PROTOCOL]["overload"]))
        print(f"\nelapsed {results['elapsed_s']} s")
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
        return 0
    print()
    print(table(results))
    if "profile" in results:
        print()
        print(profile_text(results))
    if "skipped" in results["naive"]:
        print(f"\nnaive way: skipped: {results['naive']['skipped']}")
    if "skipped" in results["two_instances"]:
        print(f"two daemons on a shared subscription: skipped: "
              f"{results['two_instances']['skipped']}")
    if not results["workers"].get("implemented"):
        print(f"multi-worker run: {results['workers']['skipped']}")
    print(f"\n{results['counters']}; elapsed {results['elapsed_s']} s"
          + (f" (+ {results['profile_elapsed_s']} s profiles and experiments)"
             if "profile_elapsed_s" in results else ""))
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
