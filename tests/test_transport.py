"""MqttTransport against a real mosquitto: protocols, reconnects, auth, TLS, will and shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import paho.mqtt.client as mqtt
import pytest

from floorline.edge.config.model import BrokerConfig, TlsConfig
from floorline.edge.errors import ConfigError, TransportError
from floorline.edge.mqtt import paho_seam
from floorline.edge.mqtt import transport as transport_module
from floorline.edge.mqtt.transport import MqttTransport, SessionOptions, Will, backoff_delays
from floorline.edge.service.logs import RateLimitFilter
from tests.daemon_harness import config_text, vibration_pipeline
from tests.mqtt_broker import (
    AUTH_PASSWORD,
    AUTH_USER,
    Mosquitto,
    ProbeFactory,
    TlsMaterial,
    free_port,
    make_tls_material,
    wait_until,
)

REPO = Path(__file__).resolve().parents[1]
CONNECT_TIMEOUT_S = 5.0
# mosquitto's "New client connected ... (p5, ...)": p2 is MQTT 3.1.1 on the wire.
WIRE_PROTOCOL = {"5": "p5", "3.1.1": "p2"}
ENV_VAR = "FLOORLINE_TEST_MQTT_PASSWORD"
UNSET_VAR = "FLOORLINE_TEST_UNSET_PASSWORD"


@dataclass(frozen=True)
class Received:
    """What the transport handed to its message handler."""

    topic: str
    payload: bytes
    received_at: float


class Inbox:
    """A thread-safe MessageHandler that records calls and lets the test wait for them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list[Received] = []

    def __call__(
        self, topic: str, payload: bytes, received_at: float, mid: int = 0, qos: int = 0
    ) -> None:
        del mid, qos
        with self._cond:
            self._items.append(Received(topic, payload, received_at))
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._items) >= n, timeout):
                raise TimeoutError(f"handler got {len(self._items)} of {n} message(s)")
            return list(self._items[:n])


@dataclass(frozen=True)
class Running:
    """A started transport, its inbox, and the client id the broker sees."""

    transport: MqttTransport
    inbox: Inbox
    client_id: str


StartTransport = Callable[..., Running]


def broker_config(broker: Mosquitto, **fields: Any) -> BrokerConfig:
    # Reconnect fast: the transport backs off from reconnect_min_s, with jitter.
    values: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 1.0,
    }
    return BrokerConfig(**(values | fields))


@pytest.fixture
def start_transport() -> Iterator[StartTransport]:
    """``start_transport(config, subscriptions, will=None)`` → Running; stopped after the test."""
    started: list[MqttTransport] = []

    def start(
        config: BrokerConfig,
        subscriptions: list[tuple[str, int]] | None = None,
        will: Will | None = None,
    ) -> Running:
        inbox = Inbox()
        client_id = f"floorline-test-{uuid.uuid4().hex[:8]}"
        transport = MqttTransport(config, client_id, inbox, subscriptions or [], will=will)
        started.append(transport)
        transport.start()
        return Running(transport, inbox, client_id)

    yield start
    for transport in started:
        transport.stop(timeout=1.0)


# -- plain broker: protocols, messages, reconnects ------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_transport_receives_and_publishes_over_each_protocol(
    protocol: Literal["5", "3.1.1"],
    mosquitto_session: Mosquitto,
    unique_topic: str,
    mqtt_client: ProbeFactory,
    start_transport: StartTransport,
) -> None:
    broker = mosquitto_session
    probe = mqtt_client(broker)
    probe.subscribe(f"{unique_topic}/out/#")
    mark = broker.log_mark()
    run = start_transport(broker_config(broker, protocol=protocol), [(f"{unique_topic}/in/#", 1)])

    assert run.transport.wait_connected(CONNECT_TIMEOUT_S)
    assert run.transport.connects == 1
    assert run.transport.last_error is None
    connected = broker.wait_for_log(rf"as {run.client_id} \(", since=mark)
    assert f"({WIRE_PROTOCOL[protocol]}, c1, k30" in connected
    broker.wait_subscribed(run.client_id, f"{unique_topic}/in/#", since=mark)

    sent_at = time.monotonic()
    probe.publish(f"{unique_topic}/in/pump-07/vibration", b"0.25,0.5", qos=1)
    [received] = run.inbox.wait_for(1)
    assert received.topic == f"{unique_topic}/in/pump-07/vibration"
    assert received.payload == b"0.25,0.5"
    assert sent_at <= received.received_at <= time.monotonic()

    run.transport.publish(f"{unique_topic}/out/pred/pump-07", b'{"label":"ok"}', qos=1)
    [message] = probe.wait_for(1, f"{unique_topic}/out/#")
    assert message.topic == f"{unique_topic}/out/pred/pump-07"
    assert message.payload == b'{"label":"ok"}'
    assert message.qos == 1


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_transport_resubscribes_after_the_broker_restarts(
    protocol: Literal["5", "3.1.1"],
    mosquitto: Mosquitto,
    unique_topic: str,
    mqtt_client: ProbeFactory,
    start_transport: StartTransport,
) -> None:
    topic_filter = f"{unique_topic}/in/#"
    run = start_transport(broker_config(mosquitto, protocol=protocol), [(topic_filter, 1)])
    assert run.transport.wait_connected(CONNECT_TIMEOUT_S)

    mosquitto.kill()
    wait_until(lambda: not run.transport.connected.is_set(), 5, "the transport to see the loss")
    mark = mosquitto.log_mark()
    mosquitto.restart()

    wait_until(lambda: run.transport.connects == 2, 10, "the transport to reconnect")
    # The session was clean: only a SUBSCRIBE sent after the restart puts the filter back.
    mosquitto.wait_subscribed(run.client_id, topic_filter, since=mark)
    mqtt_client(mosquitto).publish(f"{unique_topic}/in/after-restart", b"still here", qos=1)
    [received] = run.inbox.wait_for(1)
    assert (received.topic, received.payload) == (f"{unique_topic}/in/after-restart", b"still here")


def test_stop_returns_promptly_when_the_broker_is_unreachable(
    mosquitto: Mosquitto, start_transport: StartTransport
) -> None:
    config = broker_config(mosquitto)
    mosquitto.kill()  # nothing listens on its port now
    run = start_transport(config)
    started = time.monotonic()
    run.transport.stop(final=[("never/sent", b"x", 1, True)])
    assert time.monotonic() - started < 2.0
    assert run.transport.connects == 0


# -- password authentication ----------------------------------------------------------------------


def test_password_from_environment_connects(
    auth_broker: Mosquitto, start_transport: StartTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, AUTH_PASSWORD)
    config = broker_config(
        auth_broker, username=AUTH_USER, password_env=ENV_VAR
    )
    mark = auth_broker.log_mark()
    run = start_transport(config)
    assert run.transport.wait_connected(CONNECT_TIMEOUT_S)
    auth_broker.wait_for_log(rf"as {run.client_id} \(.*u'{AUTH_USER}'\)", since=mark)


def test_password_from_file_connects(
    auth_broker: Mosquitto, start_transport: StartTransport, tmp_path: Path
) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text(AUTH_PASSWORD + "\n")  # as `echo` or systemd-creds leave it
    run = start_transport(broker_config(auth_broker, username=AUTH_USER, password_file=secret))
    assert run.transport.wait_connected(CONNECT_TIMEOUT_S)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_wrong_password_is_refused_and_retried_until_the_broker_accepts_it(
    protocol: Literal["5", "3.1.1"],
    auth_broker: Mosquitto,
    start_transport: StartTransport,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_VAR, "not-the-password")
    config = broker_config(
        auth_broker,
        protocol=protocol,
        username=AUTH_USER,
        password_env=ENV_VAR,
    )
    mark = auth_broker.log_mark()
    run = start_transport(config)

    wait_until(lambda: run.transport.last_error is not None, 5, "the refusal")
    assert "refused" in str(run.transport.last_error)
    assert "not authorized" in str(run.transport.last_error).lower()
    wait_until(
        lambda: auth_broker.count_log(r"disconnected, not authorised", since=mark) >= 2,
        5,
        "a second attempt",
    )
    assert not run.transport.connected.is_set()
    assert run.transport.connects == 0

    # The operator fixes the broker side; the gateway gets in without being restarted.
    auth_broker.set_password(AUTH_USER, "not-the-password")
    assert run.transport.wait_connected(CONNECT_TIMEOUT_S)
    assert run.transport.connects == 1
    assert run.transport.last_error is None


def test_missing_password_variable_is_a_config_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(UNSET_VAR, raising=False)
    config = BrokerConfig(username=AUTH_USER, password_env=UNSET_VAR)
    with pytest.raises(ConfigError, match=rf"password_env: \${UNSET_VAR}"):
        MqttTransport(config, "floorline-test", Inbox(), [])


def test_unreadable_password_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    config = BrokerConfig(username=AUTH_USER, password_file=tmp_path / "no-such-secret")
    with pytest.raises(ConfigError, match=r"password_file: cannot read .*no-such-secret"):
        MqttTransport(config, "floorline-test", Inbox(), [])


# -- TLS -------------------------------------------------------------------------------------------


def test_tls_with_the_ca_file_connects_and_carries_messages(
    tls_broker: Mosquitto,
    tls_material: TlsMaterial,
    unique_topic: str,
    mqtt_client: ProbeFactory,
    start_transport: StartTransport,
) -> None:
    probe = mqtt_client(tls_broker)
    probe.subscribe(f"{unique_topic}/#")
    run = start_transport(broker_config(tls_broker, tls=TlsConfig(ca_file=tls_material.ca_cert)))
    assert run.transport.wait_connected(CONNECT_TIMEOUT_S)
    run.transport.publish(f"{unique_topic}/state", b"online", qos=1)
    [message] = probe.wait_for(1)
    assert message.payload == b"online"


def test_tls_refuses_a_broker_certificate_from_another_ca(
    tls_broker: Mosquitto, tmp_path: Path, start_transport: StartTransport
) -> None:
    stranger = make_tls_material(tmp_path / "other-ca", name="stranger")
    mark = tls_broker.log_mark()
    run = start_transport(broker_config(tls_broker, tls=TlsConfig(ca_file=stranger.ca_cert)))
    # mosquitto logs the alert the gateway sent when it rejected the broker's certificate.
    wait_until(
        lambda: tls_broker.count_log(r"alert unknown ca", since=mark) >= 1,
        10,
        "a handshake the gateway aborted",
    )
    assert not run.transport.connected.is_set()
    assert run.transport.connects == 0


def test_mutual_tls_connects_with_the_client_certificate(
    mtls_broker: Mosquitto, tls_material: TlsMaterial, start_transport: StartTransport
) -> None:
    tls = TlsConfig(
        ca_file=tls_material.ca_cert,
        cert_file=tls_material.client_cert,
        key_file=tls_material.client_key,
    )
    run = start_transport(broker_config(mtls_broker, tls=tls))
    assert run.transport.wait_connected(CONNECT_TIMEOUT_S)


def test_mutual_tls_without_a_client_certificate_never_connects(
    mtls_broker: Mosquitto, tls_material: TlsMaterial, start_transport: StartTransport
) -> None:
    mark = mtls_broker.log_mark()
    run = start_transport(broker_config(mtls_broker, tls=TlsConfig(ca_file=tls_material.ca_cert)))
    wait_until(
        lambda: mtls_broker.count_log(r"peer did not return a certificate", since=mark) >= 1,
        10,
        "a handshake refused for want of a client certificate",
    )
    assert not run.transport.connected.is_set()
    assert run.transport.connects == 0


@pytest.mark.parametrize("field", ["ca_file", "cert_file", "key_file"])
def test_missing_tls_file_is_a_transport_error_naming_the_field(
    field: str, tls_material: TlsMaterial, tmp_path: Path
) -> None:
    files = {
        "ca_file": tls_material.ca_cert,
        "cert_file": tls_material.client_cert,
        "key_file": tls_material.client_key,
    }
    files[field] = tmp_path / "missing.pem"
    tls = TlsConfig(
        ca_file=files["ca_file"], cert_file=files["cert_file"], key_file=files["key_file"]
    )
    config = BrokerConfig(port=8883, tls=tls)
    with pytest.raises(TransportError, match=rf"broker\.tls\.{field}: .*missing\.pem"):
        MqttTransport(config, "floorline-test", Inbox(), [])


# -- last will and shutdown ---------------------------------------------------------------------

# A gateway in its own process, so the test can kill it the way a power cut or OOM kill would.
_GATEWAY = """
import sys
from floorline.edge.config.model import BrokerConfig
from floorline.edge.mqtt.transport import MqttTransport, Will, backoff_delays

host, port, state, keepalive, client_id = sys.argv[1:6]
transport = MqttTransport(
    BrokerConfig(host=host, port=int(port), keepalive=int(keepalive)),
    client_id,
    lambda *message: None,
    [],
    will=Will(state, b"lost"),
)
transport.start()
if not transport.wait_connected(10):
    sys.exit(3)
transport.publish(state, b"online", qos=1, retain=True).wait_for_publish(10)
sys.stdin.read()  # until killed, or until the test's end of the pipe closes
"""


@dataclass(frozen=True)
class GatewayProcess:
    """A transport with a will, running in a child process."""

    proc: subprocess.Popen[bytes]
    client_id: str


SpawnGateway = Callable[[Mosquitto, str, int], GatewayProcess]


@pytest.fixture
def gateway_process() -> Iterator[SpawnGateway]:
    """``gateway_process(broker, state_topic, keepalive)``; killed after the test."""
    children: list[subprocess.Popen[bytes]] = []

    def spawn(broker: Mosquitto, state: str, keepalive: int) -> GatewayProcess:
        client_id = f"floorline-will-{uuid.uuid4().hex[:8]}"
        argv = [sys.executable, "-c", _GATEWAY, broker.host, str(broker.port), state,
                str(keepalive), client_id]
        child = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE)
        children.append(child)
        return GatewayProcess(child, client_id)

    yield spawn
    for child in children:
        if child.poll() is None:
            child.kill()  # SIGKILL also ends a stopped process
        child.wait(5)


def _assert_retained(
    broker: Mosquitto, mqtt_client: ProbeFactory, topic: str, payload: bytes
) -> None:
    late = mqtt_client(broker)
    late.subscribe(topic)
    [message] = late.wait_for(1, topic, timeout=5)
    assert (message.payload, message.retain) == (payload, True)


def test_broker_publishes_the_will_when_the_gateway_process_is_killed(
    mosquitto_session: Mosquitto,
    unique_topic: str,
    mqtt_client: ProbeFactory,
    gateway_process: SpawnGateway,
) -> None:
    state = f"{unique_topic}/state"
    probe = mqtt_client(mosquitto_session)
    probe.subscribe(state)
    gateway = gateway_process(mosquitto_session, state, 30)
    [online] = probe.wait_for(1, timeout=15)  # includes the child's interpreter start-up
    assert online.payload == b"online"

    gateway.proc.kill()  # SIGKILL: the kernel closes the socket, no DISCONNECT is sent
    will = probe.wait_for(2, timeout=5)[1]
    assert will.payload == b"lost"
    _assert_retained(mosquitto_session, mqtt_client, state, b"lost")


@pytest.mark.slow
def test_broker_publishes_the_will_after_keepalive_expiry_when_the_gateway_hangs(
    mosquitto_session: Mosquitto,
    unique_topic: str,
    mqtt_client: ProbeFactory,
    gateway_process: SpawnGateway,
) -> None:
    state = f"{unique_topic}/state"
    probe = mqtt_client(mosquitto_session)
    probe.subscribe(state)
    gateway = gateway_process(mosquitto_session, state, 5)
    probe.wait_for(1, timeout=15)
    mark = mosquitto_session.log_mark()

    # SIGSTOP keeps the socket open but silent, like a hung host or a cut cable: only the
    # broker's keepalive check can notice. The spec says 1.5 x 5 s; mosquitto 2.0.11 takes
    # about 11 s, hence the 20 s bound.
    os.kill(gateway.proc.pid, signal.SIGSTOP)
    will = probe.wait_for(2, timeout=20)[1]
    assert will.payload == b"lost"
    mosquitto_session.wait_for_log(rf"Client {gateway.client_id} has exceeded timeout", since=mark)


def test_stop_publishes_final_messages_then_disconnects_without_the_will(
    mosquitto_session: Mosquitto,
    unique_topic: str,
    mqtt_client: ProbeFactory,
    start_transport: StartTransport,
) -> None:
    broker = mosquitto_session
    state, bye = f"{unique_topic}/state", f"{unique_topic}/bye"
    probe = mqtt_client(broker)
    probe.subscribe(f"{unique_topic}/#")
    run = start_transport(broker_config(broker), will=Will(state, b"lost"))
    assert run.transport.wait_connected(CONNECT_TIMEOUT_S)
    mark = broker.log_mark()

    run.transport.stop(final=[(state, b"offline", 1, True), (bye, b"bye", 0, False)])

    assert [(m.topic, m.payload) for m in probe.wait_for(2)] == [
        (state, b"offline"),
        (bye, b"bye"),
    ]
    assert not run.transport.connected.is_set()
    # A clean DISCONNECT, so the broker discards the will; once it has logged the disconnect,
    # a will would already be retained.
    broker.wait_for_log(rf"Client {run.client_id} disconnected\.$", since=mark)
    _assert_retained(broker, mqtt_client, state, b"offline")
    late = mqtt_client(broker)
    late.subscribe(f"{unique_topic}/#")
    late.publish(f"{unique_topic}/marker", b"", qos=1)
    late.wait_for(1, f"{unique_topic}/marker", timeout=5)
    retained = [(m.topic, m.retain) for m in late.messages if m.topic != f"{unique_topic}/marker"]
    assert retained == [(state, True)]  # "bye" was not retained


# -- liveness and backoff ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_silently_dead_broker_is_detected_within_one_and_a_half_keepalives(
    mosquitto: Mosquitto, start_transport: StartTransport
) -> None:
    keepalive = 5
    running = start_transport(broker_config(mosquitto, keepalive=keepalive))
    assert running.transport.wait_connected(10)
    time.sleep(0.5)  # some quiet traffic-free time, as on an idle line
    assert mosquitto.pid is not None
    # SIGSTOP: the socket stays open but nothing answers, like a hung broker or a cut cable.
    os.kill(mosquitto.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_until(lambda: not running.transport.connected.is_set(), 3 * keepalive,
                   "dead connection noticed")
        noticed = time.monotonic() - stopped
    finally:
        os.kill(mosquitto.pid, signal.SIGCONT)
    # The requirement is 1.5 x keepalive; the network loop polls every 50 ms.
    assert noticed <= 1.5 * keepalive + 0.5
    assert running.transport.wait_connected(15)  # and it comes back when the broker does


def test_reconnect_delays_back_off_exponentially_with_jitter_up_to_the_cap() -> None:
    delays = backoff_delays(1.0, 8.0, random.Random(1))  # noqa: S311 - jitter, seeded
    got = [next(delays) for _ in range(8)]
    bounds = [1, 2, 4, 8, 8, 8, 8, 8]
    for delay, top in zip(got, bounds, strict=True):
        assert top / 2 <= delay <= top
    assert len({round(d, 6) for d in got[3:]}) > 1  # jittered, not a fixed cap


def test_refused_credentials_are_reported_and_retried_with_backoff(
    auth_broker: Mosquitto, start_transport: StartTransport
) -> None:
    config = broker_config(
        auth_broker,
        username=AUTH_USER,
        password_env="FLOORLINE_WRONG_PW",  # noqa: S106 - the variable's name, not a password
        reconnect_min_s=0.2,
        reconnect_max_s=0.4,
    )
    os.environ["FLOORLINE_WRONG_PW"] = "wrong"
    try:
        running = start_transport(config)
        wait_until(lambda: running.transport.connection_attempts >= 3, 10, "three attempts")
    finally:
        del os.environ["FLOORLINE_WRONG_PW"]
    assert not running.transport.connected.is_set()
    assert running.transport.last_error is not None
    assert "refused" in running.transport.last_error


# -- one writer: the network thread ---------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """One send() on some socket of this process."""

    thread: str
    fd: int
    size: int


@pytest.fixture
def socket_sends(monkeypatch: pytest.MonkeyPatch) -> list[Send]:
    """Every ``socket.send`` made in this process from now on: which thread, which socket."""
    sends: list[Send] = []
    real_send = socket.socket.send

    def send(sock: socket.socket, data: Any, *flags: int) -> int:
        sends.append(Send(threading.current_thread().name, sock.fileno(), len(data)))
        return real_send(sock, data, *flags)

    monkeypatch.setattr(socket.socket, "send", send)
    return sends


def _fd(transport: MqttTransport) -> int:
    sock = transport._client.socket()
    assert sock is not None
    return int(sock.fileno())


def test_only_the_network_thread_writes_to_the_socket(
    mosquitto_session: Mosquitto,
    unique_topic: str,
    mqtt_client: ProbeFactory,
    socket_sends: list[Send],
) -> None:
    # Publishes from several threads and manual PUBACKs from a worker, as the daemon makes them:
    # paho writes inline from whichever thread calls it unless told otherwise, and two writers
    # interleave their packets (predictions out of order on a topic).
    broker = mosquitto_session
    probe = mqtt_client(broker)
    probe.subscribe(f"{unique_topic}/out/#")
    owed: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
    config = broker_config(broker)
    def one(topic: str, payload: bytes, received: float, mid: int, qos: int) -> None:
        del topic, payload, received
        owed.put((mid, qos))

    def many(batch: list[Any], received: float) -> None:
        del received
        for _, _, mid, qos in batch:
            owed.put((mid, qos))

    transport = MqttTransport(
        config, f"one-writer-{uuid.uuid4().hex[:8]}", one, [(f"{unique_topic}/in/#", 1)],
        session=SessionOptions(manual_ack=True), on_messages=many,
    )
    transport.start()
    try:
        assert transport.wait_connected(CONNECT_TIMEOUT_S)
        wait_until(transport.subscribed.is_set, 5, "SUBACK")
        fd = _fd(transport)
        acked = 0

        def acker() -> None:
            nonlocal acked
            for _ in range(50):
                mid, qos = owed.get(timeout=10)
                transport.ack(mid, qos)
                acked += 1

        def sender(name: str) -> None:
            for i in range(200):
                transport.publish(f"{unique_topic}/out/{name}", b"%d" % i, qos=i % 2)

        threads = [threading.Thread(target=acker, name="worker")]
        threads += [threading.Thread(target=sender, args=(f"s{i}",), name=f"sender-{i}")
                    for i in range(3)]
        for t in threads:
            t.start()
        for i in range(50):
            probe.publish(f"{unique_topic}/in/sensor", b"%d" % i, qos=1)
        sender("main")
        for t in threads:
            t.join(10)
        probe.wait_for(800, f"{unique_topic}/out/#", timeout=10)
        assert acked == 50
    finally:
        transport.stop(timeout=1.0)
    writers = {s.thread for s in socket_sends if s.fd == fd}
    assert writers == {"mqtt-network"}


def test_what_one_loop_turn_queues_leaves_in_one_send(
    mosquitto_session: Mosquitto,
    unique_topic: str,
    mqtt_client: ProbeFactory,
    socket_sends: list[Send],
) -> None:
    # The messages queued in one turn (here by the connect hook, as the daemon announces its
    # state; as many as paho lets out at once) are written together, not one send per packet.
    probe = mqtt_client(mosquitto_session)
    probe.subscribe(f"{unique_topic}/#")
    BURST = 100  # noqa: N806 - the transport's in-flight window: paho holds the rest back
    box: list[MqttTransport] = []

    def announce() -> None:
        for i in range(BURST):
            box[0].publish(f"{unique_topic}/burst", b"%d" % i, qos=1)

    transport = MqttTransport(broker_config(mosquitto_session), "gather-" + uuid.uuid4().hex[:8],
                              Inbox(), [], on_connect=announce)
    box.append(transport)
    transport.start()
    try:
        assert transport.wait_connected(CONNECT_TIMEOUT_S)
        received = probe.wait_for(BURST, f"{unique_topic}/burst")
        assert [m.payload for m in received] == [b"%d" % i for i in range(BURST)]
        fd = _fd(transport)
        wait_until(lambda: not transport._client._out_messages, 5, "every PUBACK")
    finally:
        transport.stop(timeout=1.0)
    sends = [s for s in socket_sends if s.fd == fd]
    # CONNECT, then the burst (the kernel may take it in two pieces), then DISCONNECT.
    assert len(sends) <= 4, sends
    assert sum(s.size for s in sends) > BURST * (len(f"{unique_topic}/burst") + 4)


# -- the network thread survives its handlers -----------------------------------------------------


def test_an_exception_in_a_handler_resets_the_connection_and_the_thread_lives_on(
    mosquitto_session: Mosquitto,
    unique_topic: str,
    mqtt_client: ProbeFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    inbox = Inbox()
    boom = {"left": 3}

    def one(topic: str, payload: bytes, received: float, mid: int = 0, qos: int = 0) -> None:
        if payload.startswith(b"boom") and boom["left"]:
            boom["left"] -= 1
            raise RuntimeError("a routing bug")
        inbox(topic, payload, received, mid, qos)

    def many(batch: list[Any], received: float) -> None:
        for topic, payload, mid, qos in batch:
            one(topic, payload, received, mid, qos)

    caplog.set_level(logging.WARNING, logger="floorline.edge.mqtt.transport")
    topic_filter = f"{unique_topic}/in/#"
    transport = MqttTransport(broker_config(mosquitto_session), "survivor-" + uuid.uuid4().hex[:8],
                              one, [(topic_filter, 1)], on_messages=many)
    transport.start()
    probe = mqtt_client(mosquitto_session)
    try:
        for n in (1, 2, 3):
            wait_until(transport.subscribed.is_set, 10, f"subscribed ({n})")
            probe.publish(f"{unique_topic}/in/x", b"boom", qos=1)
            wait_until(lambda n=n: transport.loop_errors == n, 10, f"loop error {n}")
            wait_until(lambda n=n: transport.connects == n + 1, 10, f"reconnect {n}")
        assert transport.is_alive()
        assert time.monotonic() - transport.last_loop < 1.0
        assert transport.last_loop_error == "RuntimeError: a routing bug"
        wait_until(transport.subscribed.is_set, 10, "subscribed again")
        probe.publish(f"{unique_topic}/in/x", b"after", qos=1)
        assert [r.payload for r in inbox.wait_for(1)] == [b"after"]
    finally:
        transport.stop(timeout=1.0)
    failures = [r for r in caplog.records if "network loop failed" in r.getMessage()]
    # The first with its traceback; the next two within a minute are not logged again.
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert "a routing bug" in caplog.text


def test_liveness_is_reported_while_disconnected_and_ends_with_stop(
    mosquitto: Mosquitto, start_transport: StartTransport
) -> None:
    config = broker_config(mosquitto, reconnect_min_s=2.0, reconnect_max_s=4.0)
    mosquitto.kill()
    run = start_transport(config)
    time.sleep(1.5)  # waiting between attempts: the thread still turns
    assert run.transport.is_alive(max_age_s=1.0)
    assert time.monotonic() - run.transport.last_loop < 1.0
    run.transport.stop()
    assert not run.transport.is_alive()


# -- keepalive under load ------------------------------------------------------------------------


class PingrespDropper:
    """A TCP proxy in front of the broker that swallows the broker's PINGRESPs.

    What a broker with a backlog for this client looks like to the keepalive check: the PINGRESP
    does not come (it waits behind everything queued), while other packets keep arriving.
    """

    def __init__(self, broker: Mosquitto) -> None:
        self._broker = broker
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.dropped = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((self._broker.host, self._broker.port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _up(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)

    def _down(self, src: socket.socket, dst: socket.socket) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                buf += data
                out = bytearray()
                while len(buf) >= 2:
                    length, shift, i = 0, 0, 1
                    while i < len(buf):
                        length |= (buf[i] & 0x7F) << shift
                        shift += 7
                        i += 1
                        if buf[i - 1] < 0x80:
                            break
                    else:
                        break  # the length itself is cut off
                    if len(buf) < i + length:
                        break
                    packet, buf = buf[: i + length], buf[i + length :]
                    if packet[0] == 0xD0:
                        self.dropped += 1
                    else:
                        out += packet
                if out:
                    dst.sendall(out)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            sock.close()


@pytest.mark.slow
def test_any_packet_from_the_broker_answers_a_keepalive_ping(
    mosquitto: Mosquitto,
    mqtt_client: ProbeFactory,
    unique_topic: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keepalive = 5
    proxy = PingrespDropper(mosquitto)
    inbox = Inbox()
    config = BrokerConfig(host="127.0.0.1", port=proxy.port, keepalive=keepalive,
                          reconnect_min_s=0.2, reconnect_max_s=1.0)
    transport = MqttTransport(config, "busy-" + uuid.uuid4().hex[:8], inbox,
                              [(f"{unique_topic}/#", 0)])
    probe = mqtt_client(mosquitto)
    flowing = threading.Event()
    flowing.set()

    def feed() -> None:
        i = 0
        while flowing.is_set():
            probe.publish(f"{unique_topic}/load", b"%d" % i)
            i += 1
            time.sleep(0.2)

    caplog.set_level(logging.WARNING, logger="floorline.edge.mqtt.transport")
    transport.start()
    feeder = threading.Thread(target=feed, daemon=True)
    try:
        assert transport.wait_connected(CONNECT_TIMEOUT_S)
        wait_until(transport.subscribed.is_set, 5, "SUBACK")
        feeder.start()
        # Two and a half keepalives: every PINGRESP swallowed, messages arriving all along.
        time.sleep(2.5 * keepalive)
        assert proxy.dropped >= 2  # pings went out and were never answered
        assert transport.connects == 1
        assert transport.connected.is_set()
        assert "presumed dead" not in caplog.text
        # Now the line goes quiet as well: that is a dead connection, found within 1.5 x
        # keepalive of the last packet.
        flowing.clear()
        feeder.join(5)
        quiet = time.monotonic()
        wait_until(lambda: not transport.connected.is_set(), 3 * keepalive, "dead connection")
        assert time.monotonic() - quiet <= 1.5 * keepalive + 0.5
        assert "presumed dead" in caplog.text
    finally:
        flowing.clear()
        transport.stop(timeout=1.0)
        proxy.close()


# -- outages are reported at growing intervals ---------------------------------------------------


def test_an_outage_is_reported_at_growing_intervals_in_messages_the_rate_limiter_keeps(
    mosquitto: Mosquitto,
    start_transport: StartTransport,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1 s, 10 s, 60 s, then every 5 min, scaled down to 0.2, 0.5, 1 and every 0.5 s.
    stages = [(at, text) for at, (_, text) in
              zip((0.2, 0.5, 1.0), transport_module.OUTAGE_NOTICES, strict=True)]
    monkeypatch.setattr(transport_module, "OUTAGE_NOTICES", tuple(stages))
    monkeypatch.setattr(transport_module, "OUTAGE_REPEAT_S", 0.5)
    caplog.set_level(logging.INFO, logger="floorline.edge.mqtt.transport")
    config = broker_config(mosquitto)
    mosquitto.kill()
    started = time.monotonic()
    run = start_transport(config)
    wait_until(lambda: "broker still unreachable after" in caplog.text, 5, "the repeated notice")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    templates = [r.msg for r in warnings]
    assert templates[0] == "%s; retrying with backoff"
    assert templates[1:4] == [text for _, text in stages]
    # The log's rate limiter keys on the message: even at one record per message per minute,
    # every stage gets through.
    limiter = RateLimitFilter(burst=1, window_s=60)
    assert all(limiter.filter(r) for r in warnings[:5])
    notice = warnings[1].getMessage()
    assert f"{mosquitto.host}:{mosquitto.port}" in notice
    assert "refused" in notice
    attempts = [int(re.search(r"(\d+) attempts", r.getMessage())[1]) for r in warnings[1:5]]
    assert attempts == sorted(attempts)
    assert attempts[-1] >= 2
    assert time.monotonic() - started < 4
    caplog.clear()
    mosquitto.restart()
    assert run.transport.wait_connected(10)
    # `connected` is set before the line is logged: wait for the line, not the flag.
    wait_until(lambda: "connected to" in caplog.text, 5, "the reconnect line")
    [back] = [r.getMessage() for r in caplog.records if "connected to" in r.getMessage()]
    assert re.search(r"after \d+\.\d s without a connection \(\d+ attempts\)", back), back


# -- the service's start-up wait -----------------------------------------------------------------
# (Here rather than in tests/test_service.py only because of who edits which file this week.)


def test_floorline_run_stops_promptly_on_sigterm_while_the_broker_is_unreachable(
    tmp_path: Path, unique_topic: str
) -> None:
    closed = SimpleNamespace(host="127.0.0.1", port=free_port())  # nothing listens there
    config = tmp_path / "gw.yaml"
    config.write_text(config_text(closed, vibration_pipeline(unique_topic)))  # type: ignore[arg-type]
    proc = subprocess.Popen(
        [sys.executable, "-m", "floorline.edge", "run", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )
    seen: list[str] = []
    hung = threading.Timer(60, proc.kill)  # whatever happens, the test ends
    hung.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # up to the first failed attempt: signal handlers are in place
            seen.append(line)
            if "cannot connect" in line:
                break
        assert proc.poll() is None, "".join(seen)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        out, _ = proc.communicate(timeout=10)
        took = time.monotonic() - signalled
    finally:
        hung.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    out = "".join(seen) + out
    assert proc.returncode == 0, out
    assert took < 3.0, out


# -- the paho seam ---------------------------------------------------------------------------------


def test_the_installed_paho_has_every_private_name_the_seam_needs() -> None:
    assert paho_seam.SEAM_MISSING == ()


def test_the_seam_check_names_what_a_paho_release_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(mqtt.Client, "_packet_read")
    missing, _ = paho_seam._check()
    assert "Client._packet_read" in missing


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_without_the_seam_stock_paho_still_carries_every_message(
    protocol: Literal["5", "3.1.1"],
    mosquitto_session: Mosquitto,
    unique_topic: str,
    mqtt_client: ProbeFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(paho_seam, "SEAM_MISSING", ("Client._pretend_renamed",))
    monkeypatch.setattr(paho_seam, "_warned", False)
    caplog.set_level(logging.WARNING, logger="floorline.edge.mqtt.paho_seam")
    recorder = _Recorder()
    acked: list[int] = []
    transport = MqttTransport(
        broker_config(mosquitto_session, protocol=protocol), "stock-" + uuid.uuid4().hex[:8],
        recorder.one, [(f"{unique_topic}/in/#", 1)], on_messages=recorder.many,
        on_published=acked.append,
    )
    second = MqttTransport(broker_config(mosquitto_session), "stock2-" + uuid.uuid4().hex[:8],
                           Inbox(), [])
    assert isinstance(transport._client, paho_seam.StockClient)
    probe = mqtt_client(mosquitto_session)
    probe.subscribe(f"{unique_topic}/out/#")
    transport.start()
    try:
        assert transport.wait_connected(CONNECT_TIMEOUT_S)
        wait_until(transport.subscribed.is_set, 5, "SUBACK")
        for i in range(300):
            probe.publish(f"{unique_topic}/in/s", b"%d" % i, qos=i % 2)
        mids = [transport.publish_tracked(f"{unique_topic}/out/p", b"%d" % i, 1, False)
                for i in range(300)]
        wait_until(lambda: len(recorder.items) >= 300, 10, "300 messages in")
        out = probe.wait_for(300, f"{unique_topic}/out/#")
        wait_until(lambda: len(acked) >= 300, 10, "300 PUBACKs")
    finally:
        transport.stop(timeout=1.0)
    assert [p for _, p in recorder.items] == [b"%d" % i for i in range(300)]
    assert recorder.batches == 0  # stock paho: one on_message per message
    assert [m.payload for m in out] == [b"%d" % i for i in range(300)]
    assert sorted(acked) == sorted(m for m in mids if m is not None)
    warnings = [r for r in caplog.records if "lacks what the fast receive path needs" in r.msg]
    assert len(warnings) == 1  # once per process, not per connection
    assert "Client._pretend_renamed" in warnings[0].getMessage()
    del second


class _Recorder:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.batches = 0

    def one(self, topic: str, payload: bytes, received: float, mid: int, qos: int) -> None:
        del received, mid, qos
        self.items.append((topic, payload))

    def many(self, batch: list[Any], received: float) -> None:
        del received
        self.batches += 1
        self.items.extend((t, p) for t, p, _, _ in batch)
