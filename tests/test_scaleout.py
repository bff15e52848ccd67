"""Scale-out: several gateways share one stream through an MQTT 5 shared subscription (``$share/``).

Against the real mosquitto of the fixtures (2.0: round-robin dispatch inside a share group):
two gateways on one binary block stream predict every block exactly once between them; in
``ack: durable`` mode one of them is SIGKILLed mid-stream and restarted, and no block goes
unpredicted (at least once: repeats are counted, never required absent). The config side: a
pipeline whose windows span messages is refused behind a round-robin ``$share/``, accepted with
``share_dispatch: sticky`` (and the assumption logged), and a block pipeline is accepted.

What mosquitto does with a dead member's share (docs/scale-out.md, measured here): its persistent
session stays in the group, so mosquitto keeps queueing every other message to it and keeps its
unacknowledged in-flight ones; all of them are delivered when the gateway comes back under the
same client id. The surviving member does not take them over. Every wait is bounded and
generous; nothing here measures speed.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from floorline.edge.cli.main import main as floorline
from floorline.edge.config.model import parse_config
from floorline.edge.daemon.daemon import Daemon
from floorline.edge.errors import ConfigError
from tests.daemon_harness import (
    EXAMPLE,
    Collector,
    ReliablePublisher,
    asset_samples,
    running,
)
from tests.mqtt_broker import Mosquitto, wait_until

FLOORLINE = [sys.executable, "-m", "floorline.edge"]
WINDOW = 64  # the example bundle's window: one binary block is exactly one window
T0 = 1_000.0
STEP_S = 0.001  # the header's sample_interval_ms, in seconds
GROUP = "floorline"


def block(samples: np.ndarray, first_seq: int) -> bytes:
    """One binary block: float64 time of the first sample, uint64 its sequence, float32 rows."""
    header = struct.pack("<dQ", T0 + first_seq * STEP_S, first_seq)
    return header + np.ascontiguousarray(samples, dtype="<f4").tobytes()


def gateway_config(broker: Mosquitto, prefix: str, gateway: str, state: Path, *,
                   durable: bool, protocol: str = "5") -> str:
    """A gateway on BROKER reading PREFIX/<asset>/vibration blocks through $share/floorline/."""
    session = (f"clean_start: false, session_expiry_s: 3600, client_id: {gateway}, "
               if durable else f"protocol: '{protocol}', ")
    ack = "    ack: durable\n" if durable else ""
    return (
        f"gateway: {{id: {gateway}}}\n"
        f"state_dir: '{state}'\n"
        f"broker: {{host: 127.0.0.1, port: {broker.port}, {session}keepalive: 5,"
        " reconnect_min_s: 1, reconnect_max_s: 2}\n"
        "pipelines:\n"
        "  - name: vibration\n"
        f'    subscribe: ["$share/{GROUP}/{prefix}/+/vibration"]\n'
        "    qos: 1\n"
        f"{ack}"
        f'    bundle: "{EXAMPLE}"\n'
        "    backend: litert\n"
        f"    decoder: {{type: binary, header: timestamp_sequence,"
        f" sample_interval_ms: {STEP_S * 1000}}}\n"
        "    batch: {max_batch: 16, max_wait_ms: 5}\n"
        "    output: {qos: 1}\n"
    )


def keyed(bodies: list[dict[str, Any]]) -> Counter[tuple[str, float]]:
    """Predictions counted by (asset, window start): the identity of a block across gateways."""
    return Counter((b["asset"], round(b["window"]["start"], 6)) for b in bodies)


def block_key(asset: str, index: int) -> tuple[str, float]:
    return asset, round(T0 + index * WINDOW * STEP_S, 6)


# -- two gateways, one block stream -----------------------------------------------------------


# mosquitto (like EMQX and HiveMQ) honours $share/ from MQTT 3.1.1 clients too, as an extension.
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_two_gateways_on_a_shared_block_stream_predict_every_block_exactly_once(
    mosquitto, mqtt_client, unique_topic, tmp_path, protocol
):
    blocks = 30
    assets = {f"pump-{i}": asset_samples(WINDOW * blocks, seed=70 + i) for i in range(3)}
    collector = Collector(mosquitto, "floorline/+/pred/#")
    plant = mqtt_client(mosquitto)
    configs = [gateway_config(mosquitto, unique_topic, gw, tmp_path / gw, durable=False,
                              protocol=protocol) for gw in ("gw-a", "gw-b")]
    with running(configs[0]), running(configs[1]):
        for k in range(blocks):
            for asset, samples in assets.items():
                plant.publish(f"{unique_topic}/{asset}/vibration",
                              block(samples[k * WINDOW:(k + 1) * WINDOW], k * WINDOW), qos=1)
        expected = {block_key(a, k) for a in assets for k in range(blocks)}
        wait_until(lambda: set(keyed(collector.bodies())) >= expected, 60,
                   "a prediction for every block")
        # A block delivered to both would be predicted about as soon as the first copy: a
        # second's grace lets any such repeat arrive before counting.
        time.sleep(1.0)
    collector.close()
    bodies = collector.bodies()
    counts = keyed(bodies)
    assert set(counts) == expected
    repeated = {k: n for k, n in counts.items() if n > 1}
    assert not repeated, f"blocks predicted more than once: {sorted(repeated)[:10]}"
    by_gateway = Counter(b["gateway"] for b in bodies)
    # The broker really split the stream: each gateway predicted a share of it.
    assert set(by_gateway) == {"gw-a", "gw-b"}, by_gateway
    assert min(by_gateway.values()) >= len(expected) // 4, by_gateway


# -- one of them killed mid-stream, durable --------------------------------------------------


class DaemonProcess:
    """`floorline run --config CONFIG` as a process, its output appended to LOG."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with self.log.open("ab") as out:  # a file, not a pipe: an unread pipe can fill and block
            self.proc = subprocess.Popen([*FLOORLINE, "run", "--config", str(self.config)],
                                         stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@contextlib.contextmanager
def daemon_process(config: Path, log: Path) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(config, log)
    try:
        yield daemon
    finally:
        daemon.stop()


def subscribed(broker: Mosquitto, client_id: str, since: int = 0) -> bool:
    """Whether BROKER logged CLIENT_ID's shared subscription after offset SINCE."""
    return broker.count_log(rf"{client_id} 1 \$share/{GROUP}/", since) > 0


@pytest.mark.slow
def test_a_gateway_killed_mid_stream_loses_no_prediction_in_durable_mode(
    mosquitto, unique_topic, tmp_path
):
    n_blocks = 45
    kill_at, restart_at = 15, 30  # block indices: B is dead while blocks 15..29 are published
    assets = {f"pump-{i}": asset_samples(WINDOW * n_blocks, seed=80 + i) for i in range(3)}
    collector = Collector(mosquitto, "floorline/+/pred/#")
    plant = ReliablePublisher(mosquitto)
    paths = {}
    for gw in ("gw-a", "gw-b"):
        paths[gw] = tmp_path / f"{gw}.yaml"
        paths[gw].write_text(gateway_config(mosquitto, unique_topic, gw, tmp_path / gw,
                                            durable=True))
    with daemon_process(paths["gw-a"], tmp_path / "gw-a.log") as a, \
            daemon_process(paths["gw-b"], tmp_path / "gw-b.log") as b:
        for gw in ("gw-a", "gw-b"):
            wait_until(lambda gw=gw: subscribed(mosquitto, gw), 60, f"{gw} subscribed")
        published_at: dict[tuple[str, float], int] = {}
        for k in range(n_blocks):
            if k == kill_at:
                b.kill()  # SIGKILL: windows, batches and acknowledgements in flight
            if k == restart_at:
                mark = mosquitto.log_mark()
                b.start()  # same client id and state: its session is waiting for it
                wait_until(lambda m=mark: mosquitto.count_log(r"as gw-b", m) > 0, 60,
                           "gw-b reconnected")
            for asset, samples in assets.items():
                plant.publish(f"{unique_topic}/{asset}/vibration",
                              block(samples[k * WINDOW:(k + 1) * WINDOW], k * WINDOW))
                published_at[block_key(asset, k)] = k
        expected = set(published_at)
        wait_until(lambda: set(keyed(collector.bodies())) >= expected, 120,
                   "a prediction for every block")
        assert a.alive(), "gw-a died"
    collector.close()
    plant.close()
    bodies = collector.bodies()
    counts = keyed(bodies)
    assert set(counts) == expected  # nothing missing, nothing foreign
    repeats = sum(n - 1 for n in counts.values())
    print(f"\n{len(expected)} blocks, {repeats} predicted again (at least once)")
    outage = {key for key, k in published_at.items() if kill_at <= k < restart_at}
    during = {gw: {key for key in outage
                   if any(b["gateway"] == gw and (b["asset"], round(b["window"]["start"], 6))
                          == key for b in bodies)}
              for gw in ("gw-a", "gw-b")}
    # The survivor kept predicting its share while the other was down...
    assert during["gw-a"], "gw-a predicted nothing while gw-b was down"
    # ...and mosquitto 2.0 kept queueing the dead member's share in its session, delivered when
    # it came back (docs/scale-out.md). If this fails, mosquitto now hands a dead member's
    # share to the others: the outcome is still checked above, but update the docs.
    assert during["gw-b"], "mosquitto no longer queues a dead shared subscriber's share"


# -- the config: what is refused behind $share/, what is accepted ----------------------------


def pipeline_yaml(subscribe: str, decoder: str, extra: str = "") -> str:
    return (
        "gateway: {id: gw}\n"
        "pipelines:\n"
        "  - name: vibration\n"
        f'    subscribe: ["{subscribe}"]\n'
        f'    bundle: "{EXAMPLE}"\n'
        "    backend: litert\n"
        f"    decoder: {decoder}\n"
        f"{extra}"
    )


PER_SAMPLE = "{type: json, timestamp: ts, sequence: seq}"
BINARY = "{type: binary, header: timestamp_sequence, sample_interval_ms: 1}"
SHARED = "$share/floorline/plant/+/vibration"


def test_a_per_sample_pipeline_behind_a_round_robin_share_is_refused_in_one_line():
    with pytest.raises(ConfigError) as caught:
        parse_config(pipeline_yaml(SHARED, PER_SAMPLE), "gw.yaml")
    lines = str(caught.value).splitlines()
    assert lines[0] == "invalid config:"
    (line,) = (text.strip() for text in lines[1:])
    assert line.startswith("gw.yaml:4: pipelines.0.subscribe: ")  # the subscribe line
    assert "round-robin shared subscription" in line
    assert "one sample per message" in line  # what is wrong
    for fix in ("blocks of whole windows", "subscribe without $share/", "share_dispatch: sticky"):
        assert fix in line


def test_overlapping_windows_behind_a_round_robin_share_are_refused_even_for_blocks():
    with pytest.raises(ConfigError, match=r"window\.hop: overlapping windows"):
        parse_config(pipeline_yaml(SHARED, BINARY, "    window: {hop: 32}\n"))


def test_floorline_check_refuses_it_too(tmp_path, capsys):
    path = tmp_path / "gw.yaml"
    path.write_text(pipeline_yaml(SHARED, PER_SAMPLE))
    assert floorline(["check", "--config", str(path)]) != 0
    captured = capsys.readouterr()
    assert "round-robin shared subscription" in captured.out + captured.err


@pytest.mark.parametrize(("filters", "message"), [
    ("$share/floorline", "a shared subscription is $share/<group>/<filter>"),
    ("$share//plant/#", "a shared subscription is $share/<group>/<filter>"),
    ("$share/+/plant/#", "may not hold '+' or '#'"),
    ("$queue/plant/#", "$queue/ prefix is not supported"),
    ("$share/g/plant/#/x", "'#' must be a whole last level"),
])
def test_a_malformed_shared_subscription_is_refused(filters, message):
    with pytest.raises(ConfigError, match=message.replace("$", r"\$").replace("+", r"\+")):
        parse_config(pipeline_yaml(filters, BINARY))


def test_share_dispatch_without_a_shared_subscription_is_refused_as_ineffective():
    with pytest.raises(ConfigError, match="share_dispatch: set, but no subscribe filter"):
        parse_config(pipeline_yaml("plant/+/vibration", BINARY, "    share_dispatch: sticky\n"))


def built_warnings(text: str, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> list[str]:
    """Build TEXT's pipelines as `run` does (no broker needed); the scale-out warnings logged."""
    config = parse_config(text.replace("gateway: {id: gw}\n",
                                       f"gateway: {{id: gw}}\nstate_dir: '{tmp_path}'\n"))
    with caplog.at_level(logging.WARNING, logger="floorline.edge.daemon.generation"):
        daemon = Daemon(config)
        generation = daemon.build(config, restore=False)
        generation.close()
    return [r.getMessage() for r in caplog.records
            if r.name == "floorline.edge.daemon.generation"]


def test_sticky_dispatch_accepts_a_per_sample_pipeline_and_logs_the_assumption_once(
    caplog, tmp_path
):
    text = pipeline_yaml(SHARED, PER_SAMPLE, "    share_dispatch: sticky\n").replace(
        "gateway: {id: gw}", "gateway: {id: gw-sticky}")
    (warning,) = built_warnings(text, caplog, tmp_path)
    assert warning.startswith("pipeline vibration: share_dispatch: sticky: assuming the broker "
                              "sends every message of an asset")
    assert "hash_topic" in warning
    caplog.clear()
    assert built_warnings(text, caplog, tmp_path) == []  # a reload does not repeat it


def test_a_block_pipeline_behind_a_round_robin_share_is_accepted_with_a_note(caplog, tmp_path):
    text = pipeline_yaml(SHARED, BINARY).replace("gateway: {id: gw}", "gateway: {id: gw-block}")
    parse_config(text)  # accepted
    (warning,) = built_warnings(text, caplog, tmp_path)
    # The config cannot tell how many samples a binary message holds: it says what it assumes.
    assert "windows stay whole only if every binary message holds whole windows (64 samples" in (
        warning)


def test_a_plain_subscription_needs_no_note(caplog, tmp_path):
    text = pipeline_yaml("plant/+/vibration", PER_SAMPLE).replace(
        "gateway: {id: gw}", "gateway: {id: gw-plain}")
    assert built_warnings(text, caplog, tmp_path) == []


# -- routing: the broker's messages reach the pipeline under their own topics ------------------


def test_a_shared_subscription_is_sent_as_is_and_routed_by_its_plain_filter(
    mosquitto, mqtt_client, unique_topic, tmp_path
):
    config = gateway_config(mosquitto, unique_topic, "gw-route", tmp_path / "s", durable=False)
    with running(config) as daemon:
        assert daemon.gen is not None
        assert list(daemon.gen.subscriptions()) == [f"$share/{GROUP}/{unique_topic}/+/vibration"]
        assert subscribed(mosquitto, "floorline-gw-route")
        probe = mqtt_client(mosquitto)
        probe.subscribe("floorline/gw-route/pred/#")
        samples = asset_samples(WINDOW, seed=5)
        probe.publish(f"{unique_topic}/pump-x/vibration", block(samples, 0), qos=1)
        (message,) = probe.wait_for(1, "floorline/gw-route/pred/#", timeout=30)
    body = orjson.loads(message.payload)
    assert body["asset"] == "pump-x"  # the asset comes from the real topic, not the filter
    assert body["window"]["start"] == pytest.approx(T0)
