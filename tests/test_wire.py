"""What reaches the broker when many threads send at once: every message, in order per topic.

The real path (``Publisher`` with its on-disk outbox → ``MqttTransport`` → mosquitto) under the
mix the daemon produces: several pipelines' predictions, dead letters and stats through
``Publisher.submit``, state reports to the connection's own queue (``keep=False``), reports
through ``MqttTransport.publish`` itself, and manual PUBACKs for received input from a worker
thread, all at once: over 100,000 QoS 1 messages (before the one-writer fix, about one in
100,000 came out of order here; with half as many, half the runs would have missed it). A stock
paho subscriber in a process of its own (not the code under test, and not competing for this
process's GIL) checks per-topic sequence numbers: nothing reordered, nothing lost, nothing twice.
"""

from __future__ import annotations

import collections
import itertools
import json
import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from floorline.edge.config.model import BrokerConfig
from floorline.edge.delivery.outbox import Outbox, OutboxConfig
from floorline.edge.delivery.publisher import Publisher
from floorline.edge.messages import Outbound
from floorline.edge.mqtt.reader import Publish
from floorline.edge.mqtt.transport import MqttTransport, SessionOptions
from tests.mqtt_broker import Mosquitto, wait_until

PIPELINES = 4
ASSETS = 4  # per pipeline: each a topic of its own
PREDICTIONS_PER_PIPELINE = 22_000
BATCH = 25  # predictions per submit, as a pipeline's batch
DEAD_LETTERS = 8_400
STATS_REPORTS = 3_000
# Retained, QoS 1, not kept: they wait in the connection's own queue, which holds 1000 (the rest
# are refused, see test_a_state_report_the_connection_refuses_is_counted_and_logged), and the test
# broker saves its database for every retained message: few, as the daemon sends them.
STATE_REPORTS = 100
REPORTERS = 1  # threads publishing through MqttTransport.publish itself, each its own topic
REPORTS = 16_000  # each, one every REPORT_EVERY_S
REPORT_EVERY_S = 0.0005
REPORT_WINDOW = 600
INPUTS = 2_000  # QoS 1 input the gateway acknowledges by hand from a worker thread
DEADLINE_S = 90.0

# The order checker: subscribes, says "ready", collects until it has TOTAL messages or DEADLINE
# passed, then prints {topic: [sequence numbers in arrival order]} as JSON.
_CHECKER = """
import json, sys, threading, time, uuid
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

host, port, topic_filter, total, deadline = sys.argv[1:6]
total, deadline = int(total), time.monotonic() + float(deadline)
seqs, count, done, subscribed = {}, [0], threading.Event(), threading.Event()

def on_message(client, userdata, msg):
    seqs.setdefault(msg.topic, []).append(int(msg.payload.split(b" ", 1)[0]))
    count[0] += 1
    if count[0] >= total:
        done.set()

client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                     client_id="order-checker-" + uuid.uuid4().hex[:8], protocol=mqtt.MQTTv311)
# QoS 0: what is checked is the gateway's QoS 1 path to the broker. The test broker saves its
# database after every message it queues for a QoS 1 subscriber, which would make the disk, not
# the gateway, set the pace; QoS 0 to a connected client is never queued, dropped or reordered.
client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=0)
client.on_subscribe = lambda *_: subscribed.set()
client.on_message = on_message
client.connect(host, int(port), keepalive=60)
client.loop_start()
if not subscribed.wait(10):
    sys.exit("order checker: no SUBACK")
print("ready", flush=True)
done.wait(max(0.0, deadline - time.monotonic()))
time.sleep(0.3)  # anything late (a duplicate) shows up now
client.disconnect()
client.loop_stop()
print(json.dumps(seqs), flush=True)
"""


class Gateway:
    """A Publisher and an MqttTransport wired as the daemon wires them, acking input by hand."""

    def __init__(self, broker: Mosquitto, state_dir: Path, input_filter: str) -> None:
        self.publisher = Publisher(Outbox(state_dir / "outbox.sqlite", OutboxConfig()))
        self.inputs: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self.received = 0
        self.transport = MqttTransport(
            BrokerConfig(host=broker.host, port=broker.port, keepalive=10),
            f"wire-gw-{uuid.uuid4().hex[:8]}",
            on_message=self._one,
            subscriptions=[(input_filter, 1)],
            on_connect=self.publisher.on_connected,
            session=SessionOptions(manual_ack=True, receive_maximum=200),
            on_published=self.publisher.on_published,
            on_messages=self._many,
        )
        self.publisher.attach(self.transport)
        self.transport.start()
        self._acker = threading.Thread(target=self._ack_loop, name="acker", daemon=True)
        self._acker.start()

    def _one(self, topic: str, payload: bytes, received: float, mid: int, qos: int) -> None:
        del topic, payload, received
        self.inputs.put((mid, qos))

    def _many(self, batch: list[Publish], received: float) -> None:
        del received
        for _, _, mid, qos in batch:
            self.inputs.put((mid, qos))

    def _ack_loop(self) -> None:
        # A worker acknowledging what it processed: its PUBACKs share the socket with everything
        # the other threads send.
        while (item := self.inputs.get()) is not None:
            mid, qos = item
            self.received += 1
            if qos:
                self.transport.ack(mid, qos)

    def stop(self) -> None:
        self.inputs.put(None)
        self._acker.join(5)
        self.transport.stop(timeout=2)
        self.publisher.stop()


def _sender(name: str, work: list[tuple[list[Outbound], bool]], publisher: Publisher,
            errors: list[BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            for messages, keep in work:
                publisher.submit(messages, keep=keep)
                if not keep:
                    time.sleep(0.002)  # state reports come now and then, not in a flood
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    return threading.Thread(target=run, name=name, daemon=True)


def _reporter(
    transport: MqttTransport, topic: str, errors: list[BaseException]
) -> threading.Thread:
    """A thread publishing straight to the connection now and then, as stop()'s final messages go.

    At most REPORT_WINDOW unacknowledged: the connection's own queue (1000) never overflows,
    however slowly the broker acknowledges.
    """

    def run() -> None:
        try:
            window: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()
            for i in range(REPORTS):
                while window and window[0].is_published():
                    window.popleft()
                if len(window) >= REPORT_WINDOW:
                    window.popleft().wait_for_publish(30)
                window.append(transport.publish(topic, b"%d {}" % i, qos=1))
                time.sleep(REPORT_EVERY_S)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    return threading.Thread(target=run, name="reports", daemon=True)


def _numbered(topic: str, first: int, n: int, *, retain: bool = False) -> list[Outbound]:
    return [Outbound(topic, b"%d %s" % (first + i, b"x" * 40), 1, retain) for i in range(n)]


def _workload(out: str) -> tuple[dict[str, list[tuple[list[Outbound], bool]]], dict[str, int]]:
    """Per sender thread, its submits; per topic, how many messages it gets."""
    work: dict[str, list[tuple[list[Outbound], bool]]] = {}
    expected: dict[str, int] = {}
    for p in range(PIPELINES):
        counters = dict.fromkeys(range(ASSETS), 0)
        batches: list[tuple[list[Outbound], bool]] = []
        for start in range(0, PREDICTIONS_PER_PIPELINE, BATCH):
            batch: list[Outbound] = []
            for i in range(start, min(start + BATCH, PREDICTIONS_PER_PIPELINE)):
                asset = i % ASSETS
                batch.append(Outbound(f"{out}/pipeline-{p}/asset-{asset}",
                                      b"%d {}" % counters[asset], 1))
                counters[asset] += 1
            batches.append((batch, True))
        work[f"pipeline-{p}"] = batches
        expected |= {f"{out}/pipeline-{p}/asset-{a}": n for a, n in counters.items()}
    dlq, stats, state = f"{out}/dead-letter", f"{out}/stats", f"{out}/state"
    work["dead-letters"] = [(_numbered(dlq, i, 5), True) for i in range(0, DEAD_LETTERS, 5)]
    work["stats"] = [(_numbered(stats, i, 1), True) for i in range(STATS_REPORTS)]
    # Retained, QoS 1, not kept: straight to the connection's own queue, as the daemon's state.
    work["state"] = [(_numbered(state, i, 1, retain=True), False) for i in range(STATE_REPORTS)]
    expected |= {dlq: DEAD_LETTERS, stats: STATS_REPORTS, state: STATE_REPORTS}
    return work, expected


@pytest.mark.slow
def test_concurrent_senders_reach_the_broker_complete_and_in_order_per_topic(
    mosquitto: Mosquitto, unique_topic: str, tmp_path: Path
) -> None:
    out = f"{unique_topic}/out"
    work, expected = _workload(out)
    expected |= {f"{out}/reports-{r}": REPORTS for r in range(REPORTERS)}
    total = sum(expected.values())
    assert total >= 50_000
    checker = subprocess.Popen(
        [sys.executable, "-c", _CHECKER, mosquitto.host, str(mosquitto.port), f"{out}/#",
         str(total), str(DEADLINE_S)],
        stdout=subprocess.PIPE, text=True,
    )
    errors: list[BaseException] = []
    gateway: Gateway | None = None
    feeder = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         client_id=f"feeder-{uuid.uuid4().hex[:8]}")
    try:
        assert checker.stdout is not None
        assert checker.stdout.readline().strip() == "ready"
        gateway = Gateway(mosquitto, tmp_path, f"{unique_topic}/in/#")
        assert gateway.transport.wait_connected(10)
        wait_until(gateway.transport.subscribed.is_set, 10, "SUBACK")
        senders = [_sender(name, w, gateway.publisher, errors) for name, w in work.items()]
        senders += [_reporter(gateway.transport, f"{out}/reports-{r}", errors)
                    for r in range(REPORTERS)]
        started = time.monotonic()
        for s in senders:
            s.start()
        # Input for the gateway to acknowledge by hand while all that goes out.
        feeder.connect(mosquitto.host, mosquitto.port)
        feeder.loop_start()
        for i in range(INPUTS):
            feeder.publish(f"{unique_topic}/in/sensor-{i % 3}", b"%d" % i, qos=1)
        for s in senders:
            s.join(DEADLINE_S)
        stdout, _ = checker.communicate(timeout=DEADLINE_S + 10)
        elapsed = time.monotonic() - started
        paho = gateway.transport._client
        held = collections.Counter(m.state for m in paho._out_messages.values())
        wait_until(lambda: gateway is not None and gateway.received >= INPUTS, 10,
                   f"{INPUTS} inputs")
    finally:
        feeder.disconnect()
        feeder.loop_stop()
        if checker.poll() is None:
            checker.kill()
            checker.wait(5)
        if gateway is not None:
            gateway.stop()
    seqs: dict[str, list[int]] = json.loads(stdout.splitlines()[-1])
    t, p = gateway.transport, gateway.publisher
    missing = {topic.rsplit("/", 2)[-1]: n - len(seqs.get(topic, []))
               for topic, n in expected.items() if len(seqs.get(topic, [])) != n}
    print(f"subscriber got {sum(map(len, seqs.values()))} of {total} in {elapsed:.1f} s; "
          f"gateway: {t.connects} connect(s), last error {t.last_error}, outbox depth "
          f"{p.outbox.depth()}, published {p.published}, delivered {p.delivered}; "
          f"short: {missing or 'none'}; paho still holds (by state): {dict(held)}")
    assert not errors
    assert p.refused == 0
    reordered = {topic.rsplit("/", 2)[-1] if "pipeline" not in topic else
                 "/".join(topic.rsplit("/", 2)[-2:]): [(a, b) for a, b in itertools.pairwise(s)
                                                        if b < a]
                 for topic, s in seqs.items()}
    assert {topic: r for topic, r in reordered.items() if r} == {}, f"reordered (of {total})"
    assert {topic: len(s) for topic, s in seqs.items()} == expected  # none lost, none twice
    for topic, s in seqs.items():
        assert s == list(range(expected[topic])), topic
    assert t.connects == 1  # the broker never dropped the connection (a garbled stream would)
    assert t.loop_errors == 0


class _FullConnection:
    """A connection whose own queue is full: it refuses every message."""

    connected = threading.Event()

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        del topic, payload, qos, retain
        raise AssertionError("keep=False goes through publish_tracked")

    def publish_tracked(self, topic: str, payload: bytes, qos: int, retain: bool) -> int | None:
        del topic, payload, qos, retain
        return None


def test_a_state_report_the_connection_refuses_is_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = Publisher(Outbox(tmp_path / "outbox.sqlite", OutboxConfig()))
    publisher.attach(_FullConnection())  # type: ignore[arg-type]
    try:
        publisher.submit([Outbound("gw/state", b"online", 1, True)], keep=False)
    finally:
        publisher.stop()
    assert publisher.refused == 1
    assert "message to gw/state dropped" in caplog.text
