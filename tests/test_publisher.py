"""The publisher's hand-over: submitting threads hand their own rows to paho, in outbox order.

``Publisher.submit`` hands a batch to the connection itself when nothing older waits, and leaves
it to the flusher otherwise (a backlog, a resync after a reconnect, a full window). Whoever hands
rows over, they reach the wire in outbox id order. The first tests use a fake connection that
records the order in which messages are queued; the rest go through the real ``MqttTransport``
to mosquitto, with a subscriber checking what arrived (first arrivals: after a reconnect paho
resends what was not acknowledged, so a message may come twice, but never after a newer one).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from floorline.edge.config.model import BrokerConfig
from floorline.edge.delivery.outbox import Outbox, OutboxConfig, SeqMarks
from floorline.edge.delivery.publisher import Predictions, Publisher
from floorline.edge.messages import Outbound
from floorline.edge.mqtt.transport import MqttTransport
from tests.mqtt_broker import Mosquitto, MqttProbe, ProbeFactory, wait_until

# -- with a fake connection: who hands what over, deterministically ----------------------------


class _Wire:
    """A connection that records what is queued on it, in order; acknowledges nothing itself."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.connected.set()
        self.queued: list[tuple[bytes, int, int | None]] = []  # (payload, qos, mid)
        self.runs = 0
        self.next_mid = 1

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        del topic, retain
        self.queued.append((payload, qos, None))

    def publish_tracked(self, topic: str, payload: bytes, qos: int, retain: bool) -> int | None:
        del topic, retain
        mid, self.next_mid = self.next_mid, self.next_mid + 1
        self.queued.append((payload, qos, mid))
        return mid

    @contextlib.contextmanager
    def publishing(self) -> Iterator[bool]:
        self.runs += 1
        yield self.connected.is_set()

    def payloads(self) -> list[bytes]:
        return [p for p, _, _ in self.queued]


def _msgs(*spec: tuple[str, int]) -> list[Outbound]:
    return [Outbound("t/x", text.encode(), qos) for text, qos in spec]


@pytest.fixture
def wired(tmp_path: Path) -> Iterator[tuple[Publisher, _Wire]]:
    publisher = Publisher(Outbox(tmp_path / "outbox.sqlite", OutboxConfig()))
    wire = _Wire()
    publisher.attach(wire)
    publisher.on_connected()
    # The flusher's resync after the connect, with nothing to resend: hand-overs may begin.
    wait_until(lambda: publisher._resynced == publisher._connects, 5, "resync")
    try:
        yield publisher, wire
    finally:
        publisher.stop()


def test_a_caught_up_submit_is_handed_over_by_its_own_thread_qos0_in_place(
    wired: tuple[Publisher, _Wire],
) -> None:
    publisher, wire = wired
    publisher.submit(_msgs(("a", 1), ("b", 0), ("c", 1), ("d", 0)))
    # Already queued when submit returns (no flusher turn), each message in its place.
    assert wire.payloads() == [b"a", b"b", b"c", b"d"]
    assert publisher.published_direct == 2
    assert publisher._cursor == 2


def test_rows_another_thread_committed_first_go_out_ahead_of_a_later_submit(
    wired: tuple[Publisher, _Wire],
) -> None:
    publisher, wire = wired
    # Thread A committed its batch but has not reached its hand-over yet; thread B submits.
    early = _msgs(("a1", 1), ("a2", 1))
    ids = publisher.outbox.put_many(early)
    publisher.submit(_msgs(("b1", 1)))
    assert wire.payloads() == [b"a1", b"a2", b"b1"]
    # A's hand-over then finds its rows handed over: nothing is queued twice.
    assert publisher._hand_over(wire, early, ids) == 0
    time.sleep(0.05)  # a flusher turn, had anything been left to it
    assert wire.payloads() == [b"a1", b"a2", b"b1"]


def test_nothing_is_handed_over_before_the_resync_after_a_reconnect(
    wired: tuple[Publisher, _Wire],
) -> None:
    publisher, wire = wired
    publisher.submit(_msgs(("old", 1)))
    assert wire.payloads() == [b"old"]
    # A reconnect: paho resends "old" itself; nothing newer may be queued before it is acked,
    # whether the flusher has begun its resync yet or not.
    publisher.on_connected()
    publisher.submit(_msgs(("new", 1), ("q0", 0)))
    assert wire.payloads() == [b"old", b"q0"]  # QoS 0 goes at once; "new" waits
    time.sleep(0.1)  # the flusher's turn: paho still holds "old", so "new" still waits
    assert wire.payloads() == [b"old", b"q0"]
    old_mid = wire.queued[0][2]
    assert old_mid is not None
    publisher.on_published(old_mid)  # the resend acknowledged
    wait_until(lambda: b"new" in wire.payloads(), 5, "new handed over by the flusher")
    publisher.submit(_msgs(("next", 1)))
    assert wire.payloads() == [b"old", b"q0", b"new", b"next"]
    assert publisher.published_direct == 2  # "old" and "next"; "new" was the flusher's


def test_a_disconnected_submit_waits_in_the_outbox_and_keeps_its_place(
    wired: tuple[Publisher, _Wire],
) -> None:
    publisher, wire = wired
    wire.connected.clear()
    publisher.submit(_msgs(("a", 1), ("dropped", 0)))
    publisher.submit(_msgs(("b", 1)))
    assert wire.payloads() == []
    assert publisher.dropped_qos0 == 1
    wire.connected.set()
    publisher.on_connected()
    publisher.submit(_msgs(("c", 1)))  # not ahead of the two waiting in the outbox
    wait_until(lambda: len(wire.queued) == 3, 5, "three handed over")
    assert wire.payloads() == [b"a", b"b", b"c"]


def test_a_stale_acknowledgement_never_completes_a_row_that_reuses_its_id(
    wired: tuple[Publisher, _Wire],
) -> None:
    publisher, wire = wired
    # Paho reports written QoS 0 messages (and keep=False ones) through on_published too, with
    # ids it hands out again later. Such a report must not complete the row that gets the id.
    publisher.on_published(wire.next_mid)
    time.sleep(0.05)
    publisher.submit(_msgs(("a", 1)))
    time.sleep(0.1)
    assert publisher.delivered == 0
    assert publisher.outbox.depth() == 1
    publisher.on_published(wire.queued[0][2] or 0)
    wait_until(lambda: publisher.outbox.depth() == 0, 5, "the row deleted after its own ack")
    assert publisher.delivered == 1


def test_a_full_window_leaves_the_batch_to_the_flusher_in_order(tmp_path: Path) -> None:
    publisher = Publisher(Outbox(tmp_path / "outbox.sqlite", OutboxConfig()), max_inflight=3)
    wire = _Wire()
    publisher.attach(wire)
    publisher.on_connected()
    try:
        wait_until(lambda: publisher._resynced == 1, 5, "resync")
        publisher.submit(_msgs(("a", 1), ("b", 1)))
        publisher.submit(_msgs(("c", 1), ("d", 1)))  # only one more fits: the flusher's
        wait_until(lambda: len(wire.queued) == 3, 5, "window full")
        assert wire.payloads() == [b"a", b"b", b"c"]
        publisher.on_published(1)
        wait_until(lambda: len(wire.queued) == 4, 5, "d after an ack")
        assert wire.payloads() == [b"a", b"b", b"c", b"d"]
    finally:
        publisher.stop()


def test_prediction_counters_are_stored_with_the_batch_handed_over(
    wired: tuple[Publisher, _Wire],
) -> None:
    publisher, wire = wired
    publisher.submit(Predictions(_msgs(("p", 1)), SeqMarks("pipe", {"a": 7})))
    assert wire.payloads() == [b"p"]
    assert publisher.outbox.next_seqs("pipe") == {"a": 7}


# -- through mosquitto: what reaches the wire ---------------------------------------------------


class _Gateway:
    """A Publisher (on-disk outbox) and an MqttTransport wired as the daemon wires them.

    Every outbox row's payload is recorded by id, so the order the wire must show is known.
    """

    def __init__(self, broker: Mosquitto, tmp_path: Path, *, start: bool = True) -> None:
        self.publisher = Publisher(Outbox(tmp_path / "outbox.sqlite", OutboxConfig()))
        self.rows: dict[int, bytes] = {}
        put = self.publisher.outbox.put_many

        def put_many(messages: Sequence[Outbound], seqs: SeqMarks | None = None) -> list[int]:
            ids = put(messages, seqs)
            for i, m in zip(ids, messages, strict=True):
                self.rows[i] = m.payload
            return ids

        self.publisher.outbox.put_many = put_many  # type: ignore[method-assign]
        self.transport = MqttTransport(
            BrokerConfig(host=broker.host, port=broker.port, keepalive=10,
                         reconnect_min_s=0.02, reconnect_max_s=0.1),
            f"pub-gw-{uuid.uuid4().hex[:8]}",
            on_message=lambda *_: None,
            subscriptions=[],
            on_connect=self.publisher.on_connected,
            on_published=self.publisher.on_published,
        )
        self.publisher.attach(self.transport)
        if start:
            self.start()

    def start(self) -> None:
        self.transport.start()
        assert self.transport.wait_connected(10)

    def outbox_order(self) -> list[bytes]:
        return [self.rows[i] for i in sorted(self.rows)]

    def stop(self) -> None:
        self.transport.stop(timeout=2)
        self.publisher.stop()


@pytest.fixture
def gateways(mosquitto_session: Mosquitto, tmp_path: Path) -> Iterator[list[_Gateway]]:
    made: list[_Gateway] = []
    yield made
    for gateway in made:
        gateway.stop()


class _SlowToResend(threading.Event):
    """``connected`` for a transport whose network thread pauses after setting it."""

    def set(self) -> None:
        super().set()
        time.sleep(0.005)


def _first_arrivals(probe: MqttProbe, prefix: str) -> list[bytes]:
    return list(dict.fromkeys(m.payload for m in probe.messages if m.topic.startswith(prefix)))


def _submitter(publisher: Publisher, topic: str, batches: int, size: int, *, tag: str,
               pause_s: float, errors: list[BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            for b in range(batches):
                publisher.submit([Outbound(f"{topic}/{tag}", f"{tag} {b * size + i}".encode(), 1)
                                  for i in range(size)])
                if pause_s:
                    time.sleep(pause_s)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    return threading.Thread(target=run, name=f"submit-{tag}", daemon=True)


def _wait_wire(probe: MqttProbe, prefix: str, n: int, timeout: float = 30.0) -> list[bytes]:
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: len(_first_arrivals(probe, prefix)) >= n, timeout, f"{n} on the wire")
    return _first_arrivals(probe, prefix)


def test_new_submits_never_overtake_a_backlog(
    mosquitto_session: Mosquitto, mqtt_client: ProbeFactory, unique_topic: str, tmp_path: Path,
    gateways: list[_Gateway],
) -> None:
    probe = mqtt_client(mosquitto_session)
    probe.subscribe(f"{unique_topic}/#", qos=0)
    gateway = _Gateway(mosquitto_session, tmp_path, start=False)
    gateways.append(gateway)
    publisher = gateway.publisher
    # A backlog, built up while there was no connection: 15 windows' worth.
    for b in range(150):
        publisher.submit([Outbound(f"{unique_topic}/o", b"backlog %d" % (b * 10 + i), 1)
                          for i in range(10)])
    errors: list[BaseException] = []
    # New submits from the moment the connection is up, while the flusher works the backlog.
    live = _submitter(publisher, unique_topic, 300, 5, tag="live", pause_s=0.002, errors=errors)
    gateway.start()
    live.start()
    live.join(60)
    assert not errors
    assert publisher.wait_empty(30)
    wire = _wait_wire(probe, unique_topic, 3000)
    assert wire == gateway.outbox_order()
    assert wire[:1500] == [b"backlog %d" % i for i in range(1500)]
    # Both ways were taken: the flusher read the backlog back, then the submitting thread
    # handed its own rows over once it had caught up.
    assert 0 < publisher.published_direct < publisher.published


def test_order_holds_across_reconnects_while_several_threads_submit(
    mosquitto_session: Mosquitto, mqtt_client: ProbeFactory, unique_topic: str, tmp_path: Path,
    gateways: list[_Gateway],
) -> None:
    probe = mqtt_client(mosquitto_session)
    probe.subscribe(f"{unique_topic}/#", qos=0)
    gateway = _Gateway(mosquitto_session, tmp_path, start=False)
    gateways.append(gateway)
    publisher, transport = gateway.publisher, gateway.transport
    # Paho queues its resends right after `connected` is set (on_connect returns); here it takes
    # its time, so a submit that ignored the resync would overtake them on the wire.
    transport.connected = _SlowToResend()
    gateway.start()
    errors: list[BaseException] = []
    threads = [_submitter(publisher, unique_topic, 400, 5, tag=f"p{k}", pause_s=0.001,
                          errors=errors) for k in range(4)]
    for t in threads:
        t.start()
    rng = random.Random(15)  # noqa: S311 - timing, not cryptography
    drops = 0
    while any(t.is_alive() for t in threads) and drops < 6:
        time.sleep(rng.uniform(0.05, 0.2))
        transport._reset_socket()  # the connection drops mid-stream: paho resends, we resync
        drops += 1
        wait_until(transport.connected.is_set, 10, "reconnected")
    for t in threads:
        t.join(60)
    assert not errors
    assert drops >= 3, "the submitters finished before the connection was dropped enough"
    assert publisher.wait_empty(30)
    wire = _wait_wire(probe, unique_topic, 4 * 400 * 5)
    assert len(wire) == 4 * 400 * 5  # nothing lost
    assert wire == gateway.outbox_order()  # in outbox id order, across every reconnect
    assert transport.connects >= 1 + 3
    assert publisher.published_direct > 0


def test_qos0_messages_keep_their_place_among_a_submits_rows_on_the_wire(
    mosquitto_session: Mosquitto, mqtt_client: ProbeFactory, unique_topic: str, tmp_path: Path,
    gateways: list[_Gateway],
) -> None:
    probe = mqtt_client(mosquitto_session)
    probe.subscribe(f"{unique_topic}/#", qos=0)
    gateway = _Gateway(mosquitto_session, tmp_path)
    gateways.append(gateway)
    publisher = gateway.publisher
    wait_until(lambda: publisher._resynced == publisher._connects, 5, "resync")
    sent: list[bytes] = []
    for b in range(100):
        batch = [Outbound(f"{unique_topic}/m", b"%d.%d" % (b, i), 1 if i % 2 == 0 else 0)
                 for i in range(4)]
        sent += [m.payload for m in batch]
        publisher.submit(batch)
        if b % 10 == 9:  # 20 rows in flight at most, far from the window: never the flusher's
            _wait_wire(probe, unique_topic, len(sent), timeout=10)
    assert publisher.published_direct == 200  # every batch handed over by this thread
    assert _wait_wire(probe, unique_topic, 400) == sent


def test_a_run_wakes_the_network_thread_once_when_it_is_all_queued(
    mosquitto_session: Mosquitto, unique_topic: str, gateways: list[_Gateway], tmp_path: Path,
) -> None:
    gateway = _Gateway(mosquitto_session, tmp_path)
    gateways.append(gateway)
    transport = gateway.transport
    me = threading.get_ident()
    queued = [0]
    wakes: list[int] = []  # how many of the run were queued at each of this thread's wake-ups
    wake = transport._wake
    assert wake is not None

    class _Counting:
        def send(self, data: bytes) -> int:
            if threading.get_ident() == me:  # the network thread wakes itself too: not counted
                wakes.append(queued[0])
            return wake[1].send(data)

    transport._wake = (wake[0], _Counting())  # type: ignore[assignment]
    try:
        for _ in range(20):
            wakes.clear()
            queued[0] = 0
            with transport.publishing() as up:
                assert up
                for i in range(50):
                    transport.publish_tracked(f"{unique_topic}/w", b"%d" % i, 1, False)
                    queued[0] += 1
            # Paho asks for a wake-up with the first packet queued after a write turn; inside a
            # run it waits for the run's end, so the network thread finds the whole run queued.
            assert wakes in ([], [50])
    finally:
        transport._wake = wake
