"""The MQTT connection: the only module that imports paho.

Paho's network thread calls ``on_message`` under its own lock, so the callback given here must
only enqueue. Connection state is what the broker said in CONNACK, never an assumption:
``connected`` is set in ``on_connect`` after a success code and cleared in ``on_disconnect``.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge.config import BrokerConfig
from edge.errors import TransportError

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes, float], None]
"""Called on paho's thread with (topic, payload, monotonic receive time). Must only enqueue."""


@dataclass(frozen=True)
class Will:
    """The last-will message the broker publishes if this client vanishes."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class MqttTransport:
    """A paho client set up from a BrokerConfig, with subscriptions restored on every connect."""

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        on_message: MessageHandler,
        subscriptions: list[tuple[str, int]],
        will: Will | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self._broker = broker
        self._handler = on_message
        self._subscriptions = subscriptions
        self._on_connect_hook = on_connect
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        """Set when the broker acknowledged this connection's subscriptions."""
        self.connects = 0
        self._closing = False
        self.last_error: str | None = None
        protocol = mqtt.MQTTv5 if broker.protocol == "5" else mqtt.MQTTv311
        self._v5 = protocol == mqtt.MQTTv5
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
        )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_connect_fail = self._on_connect_fail
        self._failures = 0
        # Paho retries queued QoS>0 messages itself; a larger window keeps prediction bursts moving.
        self._client.max_inflight_messages_set(100)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(
            min_delay=max(1, round(broker.reconnect_min_s)),
            max_delay=max(1, round(broker.reconnect_max_s)),
        )
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
        for name, path in (("ca_file", tls.ca_file), ("cert_file", tls.cert_file),
                           ("key_file", tls.key_file)):
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

    # -- paho callbacks (network thread) ---------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        del userdata, flags, properties
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            log.error("%s", self.last_error)
            return
        self.connects += 1
        self._failures = 0
        self.last_error = None
        self.subscribed.clear()
        if self._subscriptions:
            client.subscribe(list(self._subscriptions))
        else:
            self.subscribed.set()
        self.connected.set()
        log.info(
            "connected to %s:%d (MQTT %s)",
            self._broker.host,
            self._broker.port,
            self._broker.protocol,
        )
        if self._on_connect_hook is not None:
            self._on_connect_hook()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # TCP or TLS failed before any CONNACK. Say it once per outage, not once per retry.
        del client, userdata
        self._failures += 1
        self.last_error = (
            f"cannot connect to {self._broker.host}:{self._broker.port} "
            f"(network or TLS handshake failed; {self._failures} attempts)"
        )
        if self._failures == 1:
            log.warning("%s; retrying with backoff", self.last_error)

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
            f for (f, _), code in zip(self._subscriptions, reason_codes, strict=False)
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
        if self.connected.is_set() and not self._closing:
            log.warning("disconnected from the broker: %s", reason_code)
        self.connected.clear()
        self.subscribed.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        del client, userdata
        # Paho hands over bytes (bytearray only for messages built locally): no copy needed.
        self._handler(msg.topic, cast("bytes", msg.payload), time.monotonic())

    # -- API (any thread) --------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; paho reconnects by itself after any loss."""
        try:
            self._client.connect_async(
                self._broker.host, self._broker.port, keepalive=self._broker.keepalive
            )
        except (OSError, ValueError) as exc:
            raise TransportError(
                f"cannot connect to {self._broker.host}:{self._broker.port}: {exc}"
            ) from exc
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """Block until the broker accepted the connection, or TIMEOUT seconds passed."""
        return self.connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> Any:
        """Queue a message; paho sends it now or after a reconnect (QoS>0 kept in memory)."""
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    def stop(
        self, final: list[tuple[str, bytes, int, bool]] | None = None, timeout: float = 2.0
    ) -> None:
        """Publish FINAL messages (waiting up to TIMEOUT for them), disconnect, stop the loop."""
        self._closing = True
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
        self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()
