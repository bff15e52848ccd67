"""Running the real daemon in-process against a test broker, and feeding it known samples."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson

from edge.config import Config, parse_config
from edge.daemon import Daemon
from edge.signals import AssetParams, AssetSignal, Condition
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
                extra: str = "") -> str:
    """A gateway config for BROKER with the given pipelines section."""
    return (
        f"gateway: {{id: {gateway}}}\n"
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
