"""Running the real daemon in-process against a test broker, and feeding it known samples."""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from floorline.edge.config.model import Config, parse_config
from floorline.edge.daemon.daemon import Daemon
from floorline.edge.demo.signals import AssetParams, AssetSignal, Condition
from tests.mqtt_broker import Mosquitto, MqttProbe, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "edge" / "models" / "pdm-classifier"
TEMP_ANOMALY = ROOT / "tests" / "data" / "temp-anomaly"

VIBRATION_PIPELINE = """
  - name: vibration
    subscribe: ["{prefix}/+/vibration"]
    qos: 1
    bundle: "{bundle}"
    backend: {backend}
    decoder: {{type: json, timestamp: ts, sequence: seq}}
    asset: {{topic_segment: -2}}
    window: {{hop: 32, max_gap_s: 0.05}}
    batch: {{max_batch: {max_batch}, max_wait_ms: {max_wait_ms}}}
    output: {{qos: 1}}
"""


def config_text(broker: Mosquitto, pipelines: str, *, gateway: str = "gw-test",
                extra: str = "", state_dir: Path | None = None) -> str:
    """A gateway config for BROKER with the given pipelines section.

    STATE_DIR defaults to a new temporary directory: tests never share an outbox by accident.
    """
    state = state_dir or Path(tempfile.mkdtemp(prefix="floorline-test-state-"))
    return (
        f"gateway: {{id: {gateway}}}\n"
        f"state_dir: '{state}'\n"
        f"broker: {{host: 127.0.0.1, port: {broker.port}, keepalive: 10,"
        f" reconnect_min_s: 1, reconnect_max_s: 2}}\n"
        f"{extra}"
        f"pipelines:\n{pipelines}"
    )


def vibration_pipeline(prefix: str, *, backend: str = "litert", max_batch: int = 32,
                       max_wait_ms: float = 5, bundle: Path = EXAMPLE) -> str:
    """The example bundle on per-sample JSON under PREFIX/<asset>/vibration."""
    return VIBRATION_PIPELINE.format(prefix=prefix, bundle=bundle, backend=backend,
                                     max_batch=max_batch, max_wait_ms=max_wait_ms)


@contextlib.contextmanager
def running(config: Config | str) -> Iterator[Daemon]:
    """A started, connected daemon, stopped afterwards."""
    cfg = parse_config(config) if isinstance(config, str) else config
    daemon = Daemon(cfg)
    daemon.start()
    try:
        assert daemon.transport is not None
        wait_until(daemon.transport.connected.is_set, 10, "daemon connected")
        # paho subscribes in on_connect; a message published before the SUBACK would be lost.
        wait_until(lambda: daemon.transport is not None and daemon.transport.subscribed.is_set(),
                   10, "daemon subscribed")
        yield daemon
    finally:
        daemon.stop()


def asset_samples(n: int, seed: int, condition: Condition = Condition.HEALTHY) -> np.ndarray:
    """N raw 3-axis samples of one simulated asset."""
    rng = np.random.default_rng(seed)
    signal = AssetSignal(AssetParams.random(rng), rng)
    if condition is not Condition.HEALTHY:
        signal.set_condition(condition, 1.0)
    return signal.next_block(n)


def sample_payload(ts: float, seq: int, row: np.ndarray) -> bytes:
    """One per-sample JSON message as the plant publishes it."""
    x, y, z = (float(v) for v in row)
    return orjson.dumps({"ts": ts, "seq": seq, "accel_x": x, "accel_y": y, "accel_z": z})


def publish_stream(probe: MqttProbe, topic: str, samples: np.ndarray, *, t0: float,
                   first_seq: int = 0, qos: int = 1) -> None:
    """Publish SAMPLES one message each, timestamps 1 ms apart from T0."""
    for i, row in enumerate(samples):
        probe.publish(topic, sample_payload(t0 + (first_seq + i) / 1000.0, first_seq + i, row),
                      qos=qos)


class Collector:
    """A subscriber with a persistent session: it misses nothing across broker restarts.

    QoS 1 with clean_session off under a fixed client id, so the broker queues (and, with the
    test broker's persistence settings, saves) what arrives while this client is reconnecting.
    """

    def __init__(self, broker: Mosquitto, topic_filter: str) -> None:
        import paho.mqtt.client as mqtt  # noqa: PLC0415 - tests may import paho
        from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

        self._lock = threading.Lock()
        self.messages: list[tuple[str, bytes]] = []
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"collector-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        self._client.reconnect_delay_set(1, 1)
        self._filter = topic_filter

        def on_connect(client: Any, *args: Any) -> None:
            client.subscribe(topic_filter, qos=1)

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            with self._lock:
                self.messages.append((msg.topic, bytes(msg.payload)))

        self._client.on_connect = on_connect
        self._client.on_message = on_message
        self._client.connect(broker.host, broker.port, keepalive=5)
        self._client.loop_start()
        wait_until(self._client.is_connected, 10, "collector connected")

    def bodies(self) -> list[dict[str, Any]]:
        """Every message so far, parsed."""
        with self._lock:
            return [orjson.loads(p) for _, p in self.messages]

    def close(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()


class ReliablePublisher:
    """Publishes QoS 1 and retries until the broker acknowledged, across broker restarts."""

    def __init__(self, broker: Mosquitto) -> None:
        import paho.mqtt.client as mqtt  # noqa: PLC0415
        from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"plant-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        self._client.reconnect_delay_set(1, 1)
        self._client.connect(broker.host, broker.port, keepalive=5)
        self._client.loop_start()
        wait_until(self._client.is_connected, 10, "publisher connected")

    def publish(self, topic: str, payload: bytes, timeout: float = 60.0) -> None:
        """Publish until acknowledged (a duplicate is possible, a loss is not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            wait_until(self._client.is_connected, max(0.1, deadline - time.monotonic()),
                       "publisher reconnected")
            info = self._client.publish(topic, payload, qos=1)
            try:
                info.wait_for_publish(2.0)
            except (RuntimeError, ValueError):
                continue
            if info.is_published():
                return
        raise TimeoutError(f"could not publish to {topic} within {timeout} s")

    def close(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()


def block_payload(samples: np.ndarray, first_seq: int, t0: float) -> bytes:
    """One JSON block message: a list of sample objects with ts and seq."""
    return orjson.dumps({"samples": [
        {"ts": t0 + (first_seq + i) / 1000.0, "seq": first_seq + i,
         "accel_x": float(r[0]), "accel_y": float(r[1]), "accel_z": float(r[2])}
        for i, r in enumerate(samples)
    ]})


def first_occurrences(bodies: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Predictions per asset, de-duplicated by seq (first arrival kept), in arrival order."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, list[dict[str, Any]]] = {}
    for b in bodies:
        key = (b["asset"], b["seq"])
        if key not in seen:
            seen.add(key)
            out.setdefault(b["asset"], []).append(b)
    return out
