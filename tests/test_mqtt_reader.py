"""edge/mqtt/reader.py: PUBLISH packets split in bulk equal what paho decodes, on a real broker too.

The split is checked against paho's own reader (its public API, so on every paho release) on
generated packets (both protocols, every
QoS, properties, multi-byte lengths, cut anywhere), then end to end: bursts written straight to a
mosquitto socket arrive through the buffered client complete and in order, over TCP and TLS,
with paho still handling what the split leaves to it (QoS 2, packets cut by a read).
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from floorline.edge.config.model import BrokerConfig, TlsConfig
from floorline.edge.mqtt.reader import BufferedSocket, Publish, split_publishes
from floorline.edge.mqtt.transport import MqttTransport
from tests.mqtt_broker import Mosquitto, ProbeFactory, TlsMaterial, wait_until


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_packet(
    topic: str,
    payload: bytes,
    *,
    qos: int = 0,
    mid: int = 1,
    v5: bool = False,
    properties: bytes = b"",
) -> bytes:
    """A PUBLISH packet as a broker sends it (PROPERTIES: MQTT 5's, packed, with their length)."""
    name = topic.encode()
    body = len(name).to_bytes(2, "big") + name
    if qos:
        body += mid.to_bytes(2, "big")
    if v5:
        body += properties or b"\x00"
    body += payload
    return bytes([0x30 | (qos << 1)]) + varint(len(body)) + body


class PahoReader:
    """Stock paho as the oracle, through its public API only (so on every paho release).

    A paho client connected to a socket this test holds the other end of: each PUBLISH packet
    is written there and read back by paho's own ``loop_read``, as from a broker.
    """

    def __init__(self, v5: bool) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.got: list[mqtt.MQTTMessage] = []
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", self._listener.getsockname()[1])  # sends CONNECT
        self.broker, _ = self._listener.accept()
        self.broker.recv(65536)
        self.broker.sendall(b"\x20\x03\x00\x00\x00" if v5 else b"\x20\x02\x00\x00")  # CONNACK
        self._read_until(self.client.is_connected)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        del client, userdata
        self.got.append(msg)

    def _read_until(self, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 5
        while not done():
            assert time.monotonic() < deadline, "paho read nothing"
            sock = self.client.socket()
            assert sock is not None
            select.select([sock], [], [], 0.5)
            self.client.loop_read()

    def decode(self, packet: bytes) -> Publish:
        """What paho makes of one QoS 0/1 PUBLISH packet."""
        self.got.clear()
        self.broker.sendall(packet)
        self._read_until(lambda: bool(self.got))
        with contextlib.suppress(BlockingIOError):  # the PUBACKs paho sent back
            self.broker.recv(65536, socket.MSG_DONTWAIT)
        msg = self.got[0]
        return (msg.topic, bytes(msg.payload), msg.mid, msg.qos)

    def close(self) -> None:
        self.client.socket().close()  # type: ignore[union-attr]
        self.broker.close()
        self._listener.close()


@pytest.fixture(scope="module")
def paho_readers() -> Iterator[dict[bool, PahoReader]]:
    readers = {v5: PahoReader(v5) for v5 in (False, True)}
    yield readers
    for reader in readers.values():
        reader.close()


def some_properties() -> bytes:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.MessageExpiryInterval = 30
    props.ContentType = "application/json"
    props.UserProperty = [("site", "plant-7"), ("line", "3")]
    packed: bytes = props.pack()  # type: ignore[no-untyped-call]
    return packed


packets = st.lists(
    st.tuples(
        st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\0+#"),
                min_size=1, max_size=40),
        st.binary(max_size=300) | st.sampled_from([b"x" * 200, b"y" * 20_000]),
        st.sampled_from([0, 1, 2]),
        st.integers(1, 65535),
        st.booleans(),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packets=packets, v5=st.booleans(), cut=st.integers(0, 10_000))
def test_split_equals_paho_up_to_qos2_or_a_cut(
    packets: list[tuple[str, bytes, int, int, bool]], v5: bool, cut: int,
    paho_readers: dict[bool, PahoReader],
) -> None:
    props = some_properties()
    wire = [
        publish_packet(t, p, qos=q, mid=m, v5=v5, properties=props if with_props else b"")
        for t, p, q, m, with_props in packets
    ]
    stream = b"".join(wire)
    cut = min(cut, len(stream)) if cut < 10_000 else len(stream)
    data = stream[:cut]
    expected: list[Publish] = []
    end = 0
    for packet in wire:
        if packet[0] >> 1 & 3 == 2 or end + len(packet) > cut:
            break
        expected.append(paho_readers[v5].decode(packet))
        end += len(packet)
    out: list[Publish] = []
    assert split_publishes(data, 0, v5, out) == end
    assert out == expected
    # With the shared-topic cache, cold then warm: the same messages, one str per topic.
    topics: dict[bytes, str] = {}
    for _ in range(2):
        cached: list[Publish] = []
        assert split_publishes(data, 0, v5, cached, topics) == end
        assert cached == expected
    assert len({id(m[0]) for m in cached}) == len({m[0] for m in cached})


def test_split_starts_at_the_given_position_and_appends() -> None:
    first = publish_packet("a/b", b"1")
    second = publish_packet("c/d", b"22", qos=1, mid=7)
    out: list[Publish] = [("earlier", b"", 0, 0)]
    data = b"junk" + first + second
    assert split_publishes(data, 4, False, out) == len(data)
    assert out == [("earlier", b"", 0, 0), ("a/b", b"1", 0, 0), ("c/d", b"22", 7, 1)]


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("PUBACK", b"\x40\x02\x00\x01"),
        ("CONNACK", b"\x20\x02\x00\x00"),
        ("topic longer than the packet", b"\x30\x04\x00\x09ab"),
        ("remaining length over 4 bytes", b"\x30\xff\xff\xff\xff\x01" + b"\x00" * 8),
        ("topic not UTF-8", b"\x30\x05\x00\x02\xff\xfex"),
        ("MQTT 5 topic alias (empty topic)", b"\x30\x05\x00\x00\x00ab"),
        ("QoS 1 without room for a packet id", b"\x32\x03\x00\x01a"),
        ("only a header byte", b"\x30"),
    ],
)
def test_split_leaves_everything_it_does_not_handle_to_paho(name: str, data: bytes) -> None:
    out: list[Publish] = []
    good = publish_packet("ok", b"1", v5=True)
    assert split_publishes(good + data, 0, True, out) == len(good), name
    assert out == [("ok", b"1", 0, 0)]


def test_split_of_mqtt5_properties_longer_than_the_packet_stops() -> None:
    out: list[Publish] = []
    # Property length 9 with only 2 bytes of packet left.
    data = b"\x30\x06\x00\x01t\x09ab"
    assert split_publishes(data, 0, True, out) == 0
    assert out == []


def test_buffered_socket_serves_small_reads_from_one_recv() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        sock = BufferedSocket(ours)
        theirs.sendall(b"abcdef")
        wait_until(lambda: sock.pending() > 0 or bool(select.select([ours], [], [], 0)[0]), 5,
                   "data on the socket")
        assert sock.recv(1) == b"a"
        assert sock.pending() == 5
        assert sock.recv(2) == b"bc"
        theirs.sendall(b"gh")
        assert sock.recv(10) == b"def"  # the buffer first, without touching the socket
        assert sock.pending() == 0
        time.sleep(0.05)
        assert sock.recv(10) == b"gh"  # a read no larger than asked is not buffered
        assert sock.pending() == 0
        with pytest.raises(BlockingIOError):
            sock.recv(1)
        assert sock.send(b"ba") == 2  # gathered, not sent yet
        assert sock.send(b"ck") == 2
        assert sock.wants_write()
        assert sock.flush()
        assert not sock.wants_write()
        assert theirs.recv(10) == b"back"


# -- end to end, against mosquitto ---------------------------------------------------------------


class RawClient:
    """An MQTT 3.1.1 client on a bare socket, to write bursts of PUBLISH packets in one send."""

    def __init__(self, port: int, ca_file: Path | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if ca_file is not None:
            context = ssl.create_default_context(cafile=str(ca_file))
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        self.sock = sock
        client_id = f"raw-{uuid.uuid4().hex[:8]}".encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
        self.sock.sendall(b"\x10" + varint(len(body)) + body)
        connack = self.sock.recv(4)
        assert connack[:1] == b"\x20", connack
        assert connack[3] == 0, connack
        # The PUBACKs and PUBRECs that come back (a few KiB here) wait in the socket buffer.

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.sendall(b"\xe0\x00")
        self.sock.close()


class Recorder:
    """Both handlers of a transport, recording (topic, payload, qos) in arrival order."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes, int]] = []
        self.batches = 0
        self.singles = 0
        self._lock = threading.Lock()

    def one(self, topic: str, payload: bytes, received: float, mid: int, qos: int) -> None:
        del received, mid
        with self._lock:
            self.singles += 1
            self.items.append((topic, payload, qos))

    def many(self, batch: list[Publish], received: float) -> None:
        del received
        with self._lock:
            self.batches += 1
            self.items.extend((t, p, q) for t, p, _, q in batch)


@pytest.fixture
def raw_clients() -> Iterator[list[RawClient]]:
    clients: list[RawClient] = []
    yield clients
    for client in clients:
        client.close()


def _run_bursts(
    config: BrokerConfig,
    topic: str,
    raw_clients: list[RawClient],
    *,
    qos_of: Callable[[int], int],
    ca_file: Path | None = None,
    between: Callable[[int], list[tuple[str, bytes, int]]] | None = None,
) -> tuple[Recorder, list[tuple[str, bytes, int]]]:
    recorder = Recorder()
    transport = MqttTransport(
        config, f"reader-{uuid.uuid4().hex[:8]}", recorder.one, [(f"{topic}/#", 2)],
        on_messages=recorder.many,
    )
    transport.start()
    try:
        assert transport.wait_connected(10)
        wait_until(transport.subscribed.is_set, 10, "SUBACK")
        raw = RawClient(config.port, ca_file)
        raw_clients.append(raw)
        sent: list[tuple[str, bytes, int]] = []
        for burst in range(20):
            data = bytearray()
            for i in range(250):
                n = burst * 250 + i
                # Sizes cross the 1- and 2-byte remaining length limits; a few exceed a chunk.
                size = (n * 37) % 300 if n % 97 else 70_000 + n
                payload = n.to_bytes(4, "big") + bytes([n % 251]) * size
                qos = qos_of(n)
                t = f"{topic}/asset-{n % 7}"
                sent.append((t, payload, qos))
                data += publish_packet(t, payload, qos=qos, mid=n % 65535 + 1)
            raw.send(bytes(data))
            if between is not None:
                sent += between(burst)
        wait_until(lambda: len(recorder.items) >= len(sent), 30,
                   f"{len(sent)} messages (have {len(recorder.items)})")
        time.sleep(0.2)  # nothing more may come
    finally:
        transport.stop(timeout=2)
    return recorder, sent


def per_qos(messages: list[tuple[str, bytes, int]]) -> dict[int, list[tuple[str, bytes]]]:
    levels: dict[int, list[tuple[str, bytes]]] = {}
    for topic, payload, qos in messages:
        levels.setdefault(qos, []).append((topic, payload))
    return levels


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
@pytest.mark.parametrize("mix", ["qos0", "qos0+1"])
def test_bursts_arrive_complete_and_in_order_through_the_split(
    protocol: Literal["3.1.1", "5"],
    mix: str,
    mosquitto: Mosquitto,
    unique_topic: str,
    raw_clients: list[RawClient],
) -> None:
    config = BrokerConfig(host=mosquitto.host, port=mosquitto.port, protocol=protocol)
    qos_of = (lambda _: 0) if mix == "qos0" else (lambda n: n % 2)
    recorder, sent = _run_bursts(config, unique_topic, raw_clients, qos_of=qos_of)
    # MQTT orders messages per QoS level only (mosquitto holds QoS 1 back at its in-flight limit
    # while QoS 0 goes on), so: each level complete and in order.
    assert per_qos(recorder.items) == per_qos(sent)
    assert recorder.batches > 0
    if mix == "qos0":
        assert recorder.items == sent
        # paho reads only the messages the split leaves to it (a packet cut by a read's end).
        assert recorder.singles < len(sent) / 4


def test_qos2_goes_through_paho_between_bursts_and_each_level_stays_in_order(
    mosquitto: Mosquitto, unique_topic: str, raw_clients: list[RawClient], mqtt_client: ProbeFactory
) -> None:
    # QoS 2 needs a PUBREL from its publisher, so a paho client sends those, between bursts.
    probe = mqtt_client(mosquitto)

    def qos2(burst: int) -> list[tuple[str, bytes, int]]:
        messages = [(f"{unique_topic}/exact", f"q2-{burst}-{i}".encode(), 2) for i in range(5)]
        for topic, payload, qos in messages:
            probe.publish(topic, payload, qos=qos)
        return messages

    config = BrokerConfig(host=mosquitto.host, port=mosquitto.port, protocol="5")
    recorder, sent = _run_bursts(
        config, unique_topic, raw_clients, qos_of=lambda n: n % 2, between=qos2
    )
    assert per_qos(recorder.items) == per_qos(sent)
    assert len(per_qos(sent)[2]) == 100


def test_bursts_over_tls_arrive_complete_and_in_order(
    tls_broker: Mosquitto,
    tls_material: TlsMaterial,
    unique_topic: str,
    raw_clients: list[RawClient],
) -> None:
    config = BrokerConfig(
        host=tls_broker.host, port=tls_broker.port, protocol="5",
        tls=TlsConfig(ca_file=tls_material.ca_cert),
    )
    recorder, sent = _run_bursts(
        config, unique_topic, raw_clients, qos_of=lambda n: n % 2, ca_file=tls_material.ca_cert
    )
    assert per_qos(recorder.items) == per_qos(sent)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_every_qos1_publish_is_acknowledged_once_through_the_puback_path(
    protocol: Literal["3.1.1", "5"], mosquitto: Mosquitto, unique_topic: str
) -> None:
    # The broker's PUBACKs arrive in runs; the reader matches them to paho's outgoing messages
    # itself. Each must reach on_published once, and paho must forget each message.
    acked: list[int] = []
    config = BrokerConfig(host=mosquitto.host, port=mosquitto.port, protocol=protocol)
    transport = MqttTransport(
        config, f"reader-{uuid.uuid4().hex[:8]}", lambda *_: None, [],
        on_published=acked.append, on_messages=lambda *_: None,
    )
    transport.start()
    try:
        assert transport.wait_connected(10)
        mids: list[int | None] = []
        for burst in range(15):  # 200 at a time: paho holds at most 1000 unsent (the transport)
            mids += [transport.publish_tracked(f"{unique_topic}/p", b"%d" % i, 1, False)
                     for i in range(200)]
            want = len(mids)
            wait_until(lambda w=want: len(acked) >= w, 30, f"{want} PUBACKs ({burst})")
        assert None not in mids
        info = transport.publish(f"{unique_topic}/p", b"last", qos=1)
        info.wait_for_publish(10)
        assert info.is_published()
        time.sleep(0.2)
        assert sorted(acked) == sorted([*mids, info.mid])
        assert not transport._client._out_messages  # paho forgot them all
    finally:
        transport.stop(timeout=2)
