"""The MQTT connection: with edge/mqtt_reader.py, the only modules that import paho.

Paho's network thread calls ``on_message`` under its own lock, so the callback given here must
only enqueue. Connection state is what the broker said in CONNACK, never an assumption:
``connected`` is set in ``on_connect`` after a success code and cleared in ``on_disconnect``.

The network loop is ours rather than paho's ``loop_start``, for two reasons paho does not cover:
reconnects back off exponentially *with jitter* (a plant full of gateways that lost the same
broker must not reconnect in lockstep), and a silently dead connection (a broker or a NAT that
stopped answering) is detected within 1.5 x keepalive rather than paho's 2 x.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from floorline.edge.config.model import BrokerConfig
from floorline.edge.errors import TransportError
from floorline.edge.mqtt.reader import BufferedClient, BufferedSocket, PublishBatch

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes, float, int, int], None]
"""Called on the network thread with (topic, payload, monotonic receive time, mid, qos).

It must only enqueue. With ``manual_ack`` the message stays unacknowledged until ``ack(mid, qos)``.
"""

_LOOP_TIMEOUT_S = 0.05


@dataclass(frozen=True)
class Will:
    """The last-will message the broker publishes if this client vanishes."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class SessionOptions:
    """What this connection asks of the broker beyond the BrokerConfig."""

    manual_ack: bool = False
    receive_maximum: int | None = None
    """MQTT 5: unacknowledged QoS>0 messages the broker may send at once (backpressure)."""
    max_packet_bytes: int | None = None
    """MQTT 5: larger messages are never sent to us (the broker drops them)."""


def backoff_delays(minimum: float, maximum: float, rng: random.Random) -> Any:
    """Endless jittered delays: each in [d/2, d], d doubling from MINIMUM up to MAXIMUM."""
    delay = minimum
    while True:
        yield rng.uniform(delay / 2, delay)
        delay = min(delay * 2, maximum)


class MqttTransport:
    """A paho client set up from a BrokerConfig, with subscriptions restored on every connect."""

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        on_message: Callable[..., None],
        subscriptions: list[tuple[str, int]],
        will: Will | None = None,
        on_connect: Callable[[], None] | None = None,
        session: SessionOptions | None = None,
        on_published: Callable[[int], None] | None = None,
        on_messages: PublishBatch | None = None,
    ) -> None:
        """Set up the client; nothing touches the network before start().

        ON_MESSAGE gets messages one by one; with ON_MESSAGES, runs of QoS 0/1 PUBLISH packets
        read together go there as one list instead (edge/mqtt_reader.py), in order with those
        ON_MESSAGE still gets.
        """
        self._broker = broker
        self._handler = on_message
        self._subscriptions = subscriptions
        self._on_connect_hook = on_connect
        self._on_published = on_published
        self._session = session or SessionOptions()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        """Set when the broker acknowledged this connection's subscriptions."""
        self.connects = 0
        self.connection_attempts = 0
        self.session_present = False
        self.last_error: str | None = None
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography
        self._v5 = broker.protocol == "5"
        self._client = BufferedClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            clean_session=None if self._v5 else broker.clean_start,
            manual_ack=self._session.manual_ack,
        )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_publishes = on_messages
        # A wider window keeps prediction bursts moving; the outbox, not paho, holds the backlog.
        self._client.max_inflight_messages_set(100)
        # QoS 0 messages published while disconnected are refused rather than piling up here.
        self._client.max_queued_messages_set(1000)
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        user, password = broker.credentials()
        if user is not None:
            self._client.username_pw_set(user, password)
        if broker.tls is not None:
            self._setup_tls()

    def _setup_tls(self) -> None:
        tls = self._broker.tls
        assert tls is not None  # noqa: S101 - checked by the caller
        for name, path in (
            ("ca_file", tls.ca_file),
            ("cert_file", tls.cert_file),
            ("key_file", tls.key_file),
        ):
            if path is not None and not path.is_file():
                raise TransportError(f"broker.tls.{name}: {path} does not exist")
        try:
            self._client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise TransportError(f"broker.tls: cannot load TLS files: {exc}") from exc
        self._client.tls_insecure_set(tls.insecure)

    def _connect_properties(self) -> Properties | None:
        if not self._v5:
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self._broker.session_expiry_s:
            props.SessionExpiryInterval = self._broker.session_expiry_s
        if self._session.receive_maximum:
            props.ReceiveMaximum = max(1, min(self._session.receive_maximum, 65535))
        if self._session.max_packet_bytes:
            props.MaximumPacketSize = self._session.max_packet_bytes
        return props

    # -- paho callbacks (network thread) ---------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        del userdata, properties
        if reason_code.is_failure:
            first = self.last_error is None or "refused" not in self.last_error
            self.last_error = f"broker refused the connection: {reason_code}"
            if first:
                log.error("%s; retrying with backoff", self.last_error)
            return
        self.connects += 1
        self.last_error = None
        self.session_present = bool(flags.session_present)
        self.subscribed.clear()
        if self._subscriptions:
            client.subscribe(list(self._subscriptions))
        else:
            self.subscribed.set()
        # The hook first: paho resends its unacknowledged messages only after this callback
        # returns, so a publisher that saw `connected` before its hook ran could send newer
        # messages ahead of those resends (out of order on the topic).
        if self._on_connect_hook is not None:
            self._on_connect_hook()
        self.connected.set()
        log.info(
            "connected to %s:%d (MQTT %s%s)",
            self._broker.host,
            self._broker.port,
            self._broker.protocol,
            ", session resumed" if self.session_present else "",
        )

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        del client, userdata, mid, properties
        refused = [
            f
            for (f, _), code in zip(self._subscriptions, reason_codes, strict=False)
            if code.is_failure
        ]
        if refused:
            # A broker ACL can refuse a filter while accepting the connection: say which.
            self.last_error = f"broker refused subscriptions: {', '.join(refused)}"
            log.error("%s", self.last_error)
        self.subscribed.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        del client, userdata, flags, properties
        if self.connected.is_set() and not self._closing.is_set():
            log.warning("disconnected from the broker: %s", reason_code)
        self.connected.clear()
        self.subscribed.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        del client, userdata
        # Paho hands over bytes (bytearray only for messages built locally): no copy needed.
        self._handler(
            msg.topic, cast("bytes", msg.payload), time.monotonic(), msg.mid, msg.qos
        )

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        del client, userdata, properties
        if self._on_published is not None and not reason_code.is_failure:
            self._on_published(mid)

    # -- the network thread ---------------------------------------------------------------

    def _run(self) -> None:
        delays = backoff_delays(
            self._broker.reconnect_min_s, self._broker.reconnect_max_s, self._rng
        )
        first = True
        while not self._closing.is_set():
            if not self._open(first=first):
                self._closing.wait(next(delays))
                continue
            first = False
            while not self._closing.is_set():
                rc = self._client.loop(timeout=_LOOP_TIMEOUT_S)
                if self.connected.is_set():
                    delays = backoff_delays(
                        self._broker.reconnect_min_s, self._broker.reconnect_max_s, self._rng
                    )
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._dead_connection():
                    break
            self.connected.clear()
            self.subscribed.clear()
            if not self._closing.is_set():
                self._closing.wait(next(delays))
        # Let a final DISCONNECT (from stop) leave the socket.
        self._client.loop(timeout=_LOOP_TIMEOUT_S)

    def _open(self, *, first: bool) -> bool:
        self.connection_attempts += 1
        try:
            if first:
                self._client.connect(
                    self._broker.host,
                    self._broker.port,
                    keepalive=self._broker.keepalive,
                    clean_start=(
                        self._broker.clean_start if self._v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY
                    ),
                    properties=self._connect_properties(),
                )
            else:
                self._client.reconnect()
        except (OSError, ssl.SSLError, ValueError) as exc:
            first_failure = self.last_error is None
            self.last_error = f"cannot connect to {self._broker.host}:{self._broker.port}: {exc}"
            if first_failure:
                log.warning("%s; retrying with backoff", self.last_error)
            return False
        return True

    def _dead_connection(self) -> bool:
        # Paho closes a connection only after a whole keepalive without PINGRESP (2 x keepalive
        # after the last traffic). A PINGREQ unanswered for half a keepalive is enough to call it
        # dead: 1.5 x keepalive in all. Paho keeps the time it sent PINGREQ in _ping_t.
        ping_t = getattr(self._client, "_ping_t", 0)
        if not ping_t or not self.connected.is_set():
            return False
        if time.monotonic() - ping_t <= self._broker.keepalive / 2:
            return False
        log.warning("broker did not answer a keepalive ping: connection presumed dead")
        sock = self._client.socket()
        if isinstance(sock, BufferedSocket):
            sock = sock.raw
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):  # already closed: just as dead
                sock.shutdown(socket.SHUT_RDWR)
        return True

    # -- API (any thread) --------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background and keep reconnecting until stop()."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="mqtt-network", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """Block until the broker accepted the connection, or TIMEOUT seconds passed."""
        return self.connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> Any:
        """Queue a message; returns paho's MQTTMessageInfo (its ``mid`` names the PUBACK)."""
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    def publish_tracked(self, topic: str, payload: bytes, qos: int, retain: bool) -> int | None:
        """Publish; return paho's message id, or None if paho refused it (its queue is full).

        With an id, paho holds the message and sends it now or after a reconnect.
        """
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            return int(info.mid)
        return None

    def set_subscriptions(self, subscriptions: list[tuple[str, int]]) -> None:
        """Replace the subscription set: subscribe what is new, unsubscribe what went away.

        Kept for every later reconnect, too.
        """
        old = dict(self._subscriptions)
        new = dict(subscriptions)
        self._subscriptions = list(subscriptions)
        added = [(f, q) for f, q in new.items() if old.get(f) != q]
        removed = [f for f in old if f not in new]
        if self.connected.is_set():
            if added:
                self._client.subscribe(added)
            if removed:
                self._client.unsubscribe(removed)

    def add_subscription(self, topic_filter: str, qos: int) -> None:
        """Subscribe one more filter (kept across reconnects)."""
        subs = [(f, q) for f, q in self._subscriptions if f != topic_filter]
        self.set_subscriptions([*subs, (topic_filter, qos)])

    def remove_subscription(self, topic_filter: str) -> None:
        """Unsubscribe a filter."""
        self.set_subscriptions([(f, q) for f, q in self._subscriptions if f != topic_filter])

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a received message (manual_ack mode): the broker may now forget it."""
        self._client.ack(mid, qos)

    def stop(
        self, final: list[tuple[str, bytes, int, bool]] | None = None, timeout: float = 2.0
    ) -> None:
        """Publish FINAL messages (waiting up to TIMEOUT for them), disconnect, stop the loop."""
        if self.connected.is_set():
            infos = [self._client.publish(t, p, qos=q, retain=r) for t, p, q, r in final or []]
            deadline = time.monotonic() + timeout
            for info in infos:
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    try:
                        info.wait_for_publish(remaining)
                    except (RuntimeError, ValueError):
                        break
        self._closing.set()
        self._client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.connected.clear()
