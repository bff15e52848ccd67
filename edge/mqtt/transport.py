"""The MQTT connection: with paho_seam.py and reader.py beside it, the only modules importing paho.

Paho's network thread calls ``on_message`` under its own lock, so the callback given here must
only enqueue. Connection state is what the broker said in CONNACK, never an assumption:
``connected`` is set in ``on_connect`` after a success code and cleared in ``on_disconnect``.

The network loop is ours (paho's external-loop API: ``loop_read``, ``loop_write``,
``loop_misc``) rather than paho's ``loop_start``, for reasons paho does not cover: reconnects
back off exponentially *with jitter* (a plant full of gateways that lost the same broker must not
reconnect in lockstep), a silently dead connection (a broker or a NAT that stopped answering) is
detected within 1.5 x keepalive rather than paho's 2 x while any packet at all from the broker
counts as a sign of life, an outage is reported at growing intervals, and an exception anywhere
in the loop resets the connection instead of ending the thread.

One thread writes: only the network thread touches the socket. ``publish``, ``publish_tracked``,
``ack``, subscription changes and ``stop`` queue their packets from any thread (paho's
``on_socket_register_write`` hook is set, so paho never writes from the caller's thread; the hook
wakes the loop), and the loop writes them in the order they were queued, gathered into as few
``send`` calls as the kernel takes (``edge/mqtt/reader.py`` ``BufferedSocket``).

Runs of messages that must keep their order across a reconnect go through ``publishing()``: it
holds the send lock, which the network thread also takes to clear ``connected`` before it opens a
new connection. So a run queued while ``connected`` is set belongs to the connection that was up
when it began (paho resends what it did not get acknowledged, oldest first), never to a new
socket before its CONNACK (paho resends the older messages only then: a newer one would overtake
them). A run wakes the network thread once, at its end, so it leaves in one write turn.

Liveness, for the daemon's health check: ``last_loop`` is the ``time.monotonic()`` of the network
thread's last turn (it turns at least every 0.5 s, connected or not, except while a connect
attempt blocks, at most paho's 5 s connect timeout); ``is_alive(max_age_s)`` is True while the
thread runs and turned within MAX_AGE_S; ``loop_errors`` counts exceptions the loop survived.
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from floorline.edge.config.model import BrokerConfig
from floorline.edge.errors import TransportError
from floorline.edge.mqtt.paho_seam import make_client
from floorline.edge.mqtt.reader import BufferedSocket, PublishBatch

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes, float, int, int], None]
"""Called on the network thread with (topic, payload, monotonic receive time, mid, qos).

It must only enqueue. With ``manual_ack`` the message stays unacknowledged until ``ack(mid, qos)``.
"""

LIVENESS_S = 60.0
"""``is_alive()``'s default: a network thread without a turn for this long counts as dead."""
OUTAGE_NOTICES: tuple[tuple[float, str], ...] = (
    (1.0, "no broker connection for %.0f s (%s, %d attempts); last error: %s"),
    (10.0, "still no broker connection after %.0f s (%s, %d attempts); last error: %s"),
    (60.0, ("broker unreachable for over a minute (%.0f s, %s, %d attempts); last error: %s; "
            "QoS 1 messages wait in the outbox")),
)
"""While disconnected: (seconds into the outage, warning). Each stage has its own message, so the
log's rate limiter (keyed by message) never folds one stage into another."""
OUTAGE_REPEAT_S = 300.0
"""After the last stage, a warning this often for as long as the outage lasts."""
_OUTAGE_REPEAT = "broker still unreachable after %.0f s (%s, %d attempts); last error: %s"

_LOOP_TIMEOUT_S = 0.05
_WAIT_SLICE_S = 0.5  # backoff waits in slices, so last_loop moves while disconnected too
_LOOP_ERROR_LOG_S = 60.0  # after the first (with its traceback), one line per this at most
_FINAL_WRITE_S = 1.0  # what stop() gives the loop to send DISCONNECT
_QUIET_START_S = 1.0  # a first connect quicker than this says nothing about an outage


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


def backoff_delays(minimum: float, maximum: float, rng: random.Random) -> Iterator[float]:
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
        read together go there as one list instead (edge/mqtt/reader.py), in order with those
        ON_MESSAGE still gets. (If the installed paho lacks what the fast path needs, everything
        goes to ON_MESSAGE: see edge/mqtt/paho_seam.py.)
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
        self.loop_errors = 0
        """Exceptions the network loop caught (each reset the connection)."""
        self.last_loop_error: str | None = None
        """The last of them, as ``Type: message``."""
        self.last_loop = time.monotonic()
        """``time.monotonic()`` of the network thread's last turn."""
        self.down_since: float | None = None
        """``time.monotonic()`` when the current outage began; None while connected."""
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography
        self._v5 = broker.protocol == "5"
        self._outage_attempts = 0  # connection_attempts when the outage began
        self._outage_stage = 0
        self._outage_next = 0.0
        self._loop_error_logged = 0.0
        self._client = make_client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            clean_session=None if self._v5 else broker.clean_start,
            manual_ack=self._session.manual_ack,
        )
        # paho's hook for an external loop: with it set, publish() and friends only queue and
        # never write from the caller's thread; the network thread writes everything, in order.
        # paho calls it once per write turn (for the first packet queued after one), and it wakes
        # the loop through a socket pair of our own (start() makes it): one wake-up per turn,
        # not one per message as paho's own socket pair would.
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._client.on_socket_register_write = self._wake_loop
        # Held by publishing() and by the network thread while it clears `connected` before a
        # new connection (see the module docstring). Order: a caller's own locks, then this one,
        # then paho's; the network thread takes it holding none of paho's.
        self._send_lock = threading.Lock()
        self._run_owner: int | None = None  # the thread in publishing(): its wake-up waits
        self._wake_due = False
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
        back = self._outage_over(time.monotonic())
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
            "connected to %s:%d (MQTT %s%s)%s",
            self._broker.host,
            self._broker.port,
            self._broker.protocol,
            ", session resumed" if self.session_present else "",
            back,
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
            self.last_error = f"disconnected: {reason_code}"
            log.warning("disconnected from the broker: %s; reconnecting", reason_code)
        self.connected.clear()
        self.subscribed.clear()
        if not self._closing.is_set():
            self._outage_begins(time.monotonic())

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
        delays = self._delays()
        first = True
        self._outage_begins(time.monotonic())
        while not self._closing.is_set():
            try:
                opened = self._open(first=first)
            except Exception as exc:  # noqa: BLE001 - the thread must outlive anything
                self._loop_failed(exc)
                opened = False
            if opened:
                first = False
                if self._serve():
                    delays = self._delays()  # it was up: the next outage starts from the minimum
            with self._send_lock:  # no publishing() run may straddle the next connection
                self.connected.clear()
            self.subscribed.clear()
            if not self._closing.is_set():
                self._outage_begins(time.monotonic())
                self._wait(next(delays))
        self._finish()

    def _delays(self) -> Iterator[float]:
        return backoff_delays(self._broker.reconnect_min_s, self._broker.reconnect_max_s, self._rng)

    def _wake_loop(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # paho's on_socket_register_write, on whichever thread queued a packet.
        del client, userdata, sock
        if self._run_owner is not None and self._run_owner == threading.get_ident():
            self._wake_due = True  # publishing() wakes the loop once, when its run is queued
            return
        wake = self._wake
        if wake is not None:
            with contextlib.suppress(OSError):  # full: a wake-up is pending anyway; closed: stopped
                wake[1].send(b"\0")

    def _turn(self, timeout: float) -> MQTTErrorCode:
        """One turn of the loop: wait for the socket or a wake-up, read, write, keepalive.

        paho's ``loop()`` with this loop's own wake-up (paho's writes a byte to its socket pair
        for every packet queued) and with writes made in the same turn as the reads that queued
        them (a handler's publications, PUBACKs).
        """
        client = self._client
        sock = client.socket()
        wake = self._wake
        if sock is None or wake is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        pending = getattr(sock, "pending", None)
        buffered = pending is not None and pending() > 0
        wlist = [sock] if client.want_write() or client.unsent() else []
        try:
            # Buffered (or decrypted) bytes are read without waiting.
            readable, _, _ = select.select([sock, wake[0]], wlist, [], 0.0 if buffered else timeout)
        except (OSError, ValueError, TypeError):  # closed under us: a lost connection
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        if wake[0] in readable:
            with contextlib.suppress(OSError):  # drained: nothing more to read
                while wake[0].recv(4096):
                    pass
        if buffered or sock in readable:
            rc = client.loop_read()
            if rc or client.socket() is None:
                return rc
        if client.want_write() or client.unsent():
            rc = client.loop_write()
            if rc or client.socket() is None:
                return rc
        return client.loop_misc()

    def _serve(self) -> bool:
        """Turn the loop until the connection ends or stop(); whether it was up at some point."""
        client = self._client
        was_up = False
        while not self._closing.is_set():
            try:
                rc = self._turn(_LOOP_TIMEOUT_S)
                now = time.monotonic()
                self.last_loop = now
                if self.connected.is_set():
                    was_up = True
                    if client.ping_sent and self._dead_connection(now):
                        break
                elif now >= self._outage_next:
                    self._outage_notice(now)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            except Exception as exc:  # noqa: BLE001 - a bug in a handler must not end the thread
                self._loop_failed(exc)
                break
        return was_up

    def _wait(self, delay: float) -> None:
        deadline = time.monotonic() + delay
        while not self._closing.is_set():
            now = time.monotonic()
            self.last_loop = now
            if now >= self._outage_next:
                self._outage_notice(now)
            if now >= deadline:
                return
            self._closing.wait(min(deadline - now, _WAIT_SLICE_S))

    def _finish(self) -> None:
        # Let a final DISCONNECT (queued by stop, maybe a moment after _closing was set) leave
        # the socket: paho closes the socket once it is written.
        deadline = time.monotonic() + _FINAL_WRITE_S
        try:
            while self._client.socket() is not None and time.monotonic() < deadline:
                self.last_loop = time.monotonic()
                if self._turn(_LOOP_TIMEOUT_S) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
        except Exception:  # stopping anyway: say so, and let stop() finish
            log.exception("network loop failed while disconnecting")

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

    def _dead_connection(self, now: float) -> bool:
        # Called while a PINGREQ is out. Any bytes from the broker since then mean it is alive,
        # however long its PINGRESP queues behind what it is sending us. Nothing at all for half
        # a keepalive after the PINGREQ means dead: 1.5 x keepalive in all, where paho alone
        # would wait for 2 x.
        client = self._client
        sent = client.ping_sent
        if client.received_at() >= sent:
            client.ping_heard()
            return False
        if now - sent <= self._broker.keepalive / 2:
            return False
        log.warning(
            "nothing from the broker for %.1f s after a keepalive ping: connection presumed dead",
            now - sent,
        )
        self.last_error = "the broker stopped answering (keepalive)"
        self._reset_socket()
        return True

    def _reset_socket(self) -> None:
        # Shut down, not close: paho closes its socket itself on the next reconnect.
        sock = self._client.socket()
        if isinstance(sock, BufferedSocket):
            sock = sock.raw
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):  # already closed: just as dead
                sock.shutdown(socket.SHUT_RDWR)

    def _loop_failed(self, exc: Exception) -> None:
        # Called in an except block. A handler that raised may have left its read half done:
        # the connection starts afresh, and the broker redelivers what was not acknowledged.
        self.loop_errors += 1
        self.last_loop_error = f"{type(exc).__name__}: {exc}"
        self.last_error = f"network loop error: {self.last_loop_error}"
        now = time.monotonic()
        if self.loop_errors == 1:
            log.error("network loop failed; resetting the connection", exc_info=exc)
            self._loop_error_logged = now
        elif now - self._loop_error_logged >= _LOOP_ERROR_LOG_S:
            log.error("network loop failed again (%d errors so far): %s; resetting the connection",
                      self.loop_errors, self.last_error)
            self._loop_error_logged = now
        self._reset_socket()

    # -- outages (network thread) ------------------------------------------------------------

    def _outage_begins(self, now: float) -> None:
        if self.down_since is not None:
            return
        self.down_since = now
        self._outage_attempts = self.connection_attempts
        self._outage_stage = 0
        self._outage_next = now + OUTAGE_NOTICES[0][0] if OUTAGE_NOTICES else now + OUTAGE_REPEAT_S

    def _outage_notice(self, now: float) -> None:
        since = self.down_since
        if since is None:
            self._outage_next = float("inf")
            return
        stage = self._outage_stage
        if stage < len(OUTAGE_NOTICES):
            template = OUTAGE_NOTICES[stage][1]
            self._outage_stage = stage + 1
            if stage + 1 < len(OUTAGE_NOTICES):
                self._outage_next = since + OUTAGE_NOTICES[stage + 1][0]
            else:
                self._outage_next = now + OUTAGE_REPEAT_S
        else:
            template = _OUTAGE_REPEAT
            self._outage_next = now + OUTAGE_REPEAT_S
        log.warning(
            template,
            now - since,
            f"{self._broker.host}:{self._broker.port}",
            self.connection_attempts - self._outage_attempts,
            self.last_error or "no answer yet",
        )

    def _outage_over(self, now: float) -> str:
        since = self.down_since
        self.down_since = None
        self._outage_next = float("inf")
        if since is None or (self.connects == 1 and now - since < _QUIET_START_S):
            return ""
        return (f"; after {now - since:.1f} s without a connection "
                f"({self.connection_attempts - self._outage_attempts} attempts)")

    # -- API (any thread) --------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background and keep reconnecting until stop()."""
        if self._thread is not None:
            return
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake = (wake_r, wake_w)
        self.last_loop = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="mqtt-network", daemon=True)
        self._thread.start()

    def is_alive(self, max_age_s: float = LIVENESS_S) -> bool:
        """Whether the network thread runs and turned within MAX_AGE_S seconds.

        It turns every 50 ms while connected and every 0.5 s while it waits to reconnect; only a
        blocking connect attempt (up to paho's 5 s connect timeout) pauses it. False before
        start() and after stop().
        """
        thread = self._thread
        return (
            thread is not None
            and thread.is_alive()
            and time.monotonic() - self.last_loop <= max_age_s
        )

    def wait_connected(self, timeout: float) -> bool:
        """Block until the broker accepted the connection, or TIMEOUT seconds passed."""
        return self.connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> Any:
        """Queue a message; returns paho's MQTTMessageInfo (its ``mid`` names the PUBACK)."""
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    @contextlib.contextmanager
    def publishing(self) -> Iterator[bool]:
        """Hold the connection still while queueing a run of messages; yields ``connected``.

        While inside, the network thread cannot begin a new connection, so everything queued
        here while ``connected`` was set is ahead of anything a later connection sends, and
        paho's resends after a reconnect keep it in order (see the module docstring). Inside,
        ``publish`` and ``publish_tracked`` only queue; the network thread is woken once, at the
        end, and writes the run in one turn. Keep the run short: other publishing threads, and a
        reconnect, wait for it.
        """
        with self._send_lock:
            self._run_owner = threading.get_ident()
            try:
                yield self.connected.is_set()
            finally:
                self._run_owner = None
                if self._wake_due:
                    self._wake_due = False
                    self._wake_loop(self._client, None, None)

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
        # Closing first, so the loop reads the DISCONNECT's end of the socket as the end, not
        # as a loss to recover from; the network thread writes the DISCONNECT (_finish).
        self._closing.set()
        self._client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout + _FINAL_WRITE_S)
            self._thread = None
        self.connected.clear()
        wake, self._wake = self._wake, None
        if wake is not None:
            for end in wake:
                end.close()
