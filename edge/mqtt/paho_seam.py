"""Every use of paho's private names, in one place, checked when this module is imported.

The daemon's fast path needs a little of paho's inside: the receive path (``BufferedClient``: a
buffered socket, QoS 0/1 PUBLISH runs split in bulk, plain PUBACKs matched without paho's
per-packet decoding, see ``edge/mqtt/reader.py``), the gathered writes, and what the dead
connection check needs (when a PINGREQ went out; forgetting it once the broker was heard). paho
keeps the protocol state; this module only takes over the common packets, in order.

Those names are not paho's API and can change in any release, so the names below are looked up on
import, on the class and on a client instance. If any is missing, ``make_client`` builds
``StockClient`` instead (paho's own read and write path, ``on_message`` per message, paho's own
keepalive) and logs one warning naming what is missing: slower, never broken. ``SEAM_MISSING``
says which (empty when the fast path is in use).

Verified against paho-mqtt 2.0.0, 2.1.0 and 2.2.0 (paho before 2.2 calls its receive stamp
``_last_msg_in``, 2.2 ``_last_bytes_received``; whichever the installed paho has is used).

Threads: the transport's network thread is the only one that reads or writes the socket.
``publish``, ``subscribe``, ``ack`` and ``disconnect`` from other threads only queue their packet:
``MqttTransport`` sets ``on_socket_register_write`` (paho's public hook for an external loop), so
paho never writes from the calling thread, and that hook wakes the loop.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from floorline.edge.mqtt.reader import BufferedSocket, Publish, PublishBatch, split_publishes

__all__ = ["SEAM_MISSING", "BufferedClient", "FloorlineClient", "StockClient", "make_client"]

log = logging.getLogger(__name__)

# -- the names, checked ----------------------------------------------------------------------

_METHODS = (
    "_create_socket",  # wrapped: the socket becomes a BufferedSocket
    "_packet_read",  # paho reads every packet the fast path leaves to it
    "_loop_rc_handle",  # a read or write error ends the connection as paho's own would
    "_send_puback",  # automatic acknowledgement of split QoS 1 messages
    "_do_on_publish",  # a plain PUBACK matched to paho's outgoing message
    "_send_pingreq",  # wrapped: when a PINGREQ went out
)
_STATE = (
    "_sock",
    "_in_packet",  # a dict; its "command" is 0 between packets
    "_out_messages",
    "_out_message_mutex",
    "_in_callback_mutex",
    "_msgtime_mutex",
    "_manual_ack",
    "_protocol",
    "_ping_t",  # cleared once the broker was heard after a PINGREQ
)
_RECEIVE_STAMPS = ("_last_bytes_received", "_last_msg_in")  # paho 2.2, paho 2.1


def _check() -> tuple[tuple[str, ...], str]:
    """The private names missing from the installed paho, and its receive stamp's name."""
    missing = [
        f"Client.{name}" for name in _METHODS if not callable(getattr(mqtt.Client, name, None))
    ]
    try:
        probe = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    except Exception as exc:  # noqa: BLE001 - any failure here means: do not rely on internals
        return (*missing, f"Client() failed: {exc}"), ""
    missing += [f"Client().{name}" for name in _STATE if not hasattr(probe, name)]
    in_packet = getattr(probe, "_in_packet", None)
    if not (isinstance(in_packet, dict) and "command" in in_packet):
        missing.append("Client()._in_packet['command']")
    stamp = next((name for name in _RECEIVE_STAMPS if hasattr(probe, name)), "")
    if not stamp:
        missing.append("Client()." + " or ".join(_RECEIVE_STAMPS))
    return tuple(missing), stamp


SEAM_MISSING, _RECEIVE_STAMP = _check()
"""The private names this paho lacks; empty when ``BufferedClient`` can be used."""

_TURNS = 64  # packets paho handles per loop_read at most, so writes and keepalive get a turn
_PUBACK = 0x40
# Shared by every plain PUBACK handled here; on_publish callbacks only read them.
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
_warned = False


class FloorlineClient(mqtt.Client):
    """What the transport uses beyond paho's API; this base class is paho's stock behaviour.

    Here no receive time and no PINGREQ time is known (``ping_sent`` stays 0), so the transport's
    dead-connection check never fires and paho's own keepalive (it closes a connection a whole
    keepalive after an unanswered PINGREQ) is all there is.
    """

    on_publishes: PublishBatch | None = None
    """Runs of QoS 0/1 PUBLISH packets read together (``BufferedClient`` only)."""
    ping_sent = 0.0
    """``time.monotonic()`` of a PINGREQ not yet followed by any bytes from the broker, else 0."""

    def received_at(self) -> float:
        """``time.monotonic()`` of the last read that brought bytes on this connection, or 0."""
        return 0.0

    def ping_heard(self) -> None:
        """The broker sent something after the PINGREQ: it is alive; stop waiting for PINGRESP."""

    def unsent(self) -> bool:
        """Whether bytes of a write turn still wait for the socket (paho's own: never)."""
        return False


class StockClient(FloorlineClient):
    """Paho as it comes, the fallback when the installed paho lacks a name the seam needs.

    Messages come one by one to ``on_message``, each packet is written with a ``send`` of its own
    (still only by the network thread), and paho's keepalive alone finds a dead connection.
    """


class BufferedClient(FloorlineClient):
    """paho's client on a ``BufferedSocket``, QoS 0/1 PUBLISH packets split in bulk.

    ``on_publishes`` receives them; paho's ``on_message`` still receives any PUBLISH that paho
    itself reads (QoS 2, one cut by the end of the buffer, the first after a connect), so set
    both. Writes gathered during a loop turn leave in one ``send`` where the kernel takes them.
    """

    _topics: dict[bytes, str] | None = None

    # -- the socket ------------------------------------------------------------------------

    def _create_socket(self) -> Any:
        return BufferedSocket(super()._create_socket())

    def reconnect(self) -> MQTTErrorCode:
        """As paho's; a PINGREQ of the previous connection is forgotten."""
        self.ping_sent = 0.0
        return super().reconnect()

    # -- liveness ----------------------------------------------------------------------------

    def received_at(self) -> float:
        """``time.monotonic()`` of the last read that brought bytes on this connection, or 0."""
        sock = self._sock
        return sock.received_at if isinstance(sock, BufferedSocket) else 0.0

    def ping_heard(self) -> None:
        """The broker sent something after the PINGREQ: stop waiting for its PINGRESP.

        paho would otherwise close the connection a keepalive after the PINGREQ even while bytes
        stream in: under load a PINGRESP queues behind everything the broker has for us.
        """
        self.ping_sent = 0.0
        self._ping_t = 0.0

    def _send_pingreq(self) -> MQTTErrorCode:
        rc = super()._send_pingreq()
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.ping_sent = time.monotonic()
        return rc

    # -- writing -----------------------------------------------------------------------------

    def unsent(self) -> bool:
        """Whether bytes gathered by a write turn still wait for the socket to take them.

        Not part of ``want_write()`` (packets paho still queues): paho re-arms
        ``on_socket_register_write`` for the next queued packet only when ``want_write()`` was
        False at the end of a write turn, and gathered bytes are flushed only after that.
        """
        sock = self._sock
        return isinstance(sock, BufferedSocket) and bool(sock.out)

    def loop_write(self) -> MQTTErrorCode:
        """Write: paho hands each queued packet to the socket's gathering ``send``; one flush."""
        sock = self._sock
        rc = super().loop_write()
        if self._sock is sock and isinstance(sock, BufferedSocket) and sock.out:
            try:
                sock.flush()
            except OSError as exc:
                log.debug("failed to send on socket: %s", exc)
                return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        return rc

    # -- reading -----------------------------------------------------------------------------

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """Read what the socket has: PUBLISH runs and PUBACKs here, other packets by paho."""
        current = self._sock
        if not isinstance(current, BufferedSocket) or self.on_publishes is None:
            return super().loop_read(max_packets)
        sock: BufferedSocket = current
        for _ in range(_TURNS):
            if self._in_packet["command"] == 0:
                done = self._fast_turn(sock)
                if done is not None:
                    return done
            # paho reads one packet: the next one that is not handled here, or the rest of one
            # cut off by the end of the last read.
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN or self._sock is not sock:
                break
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _fast_turn(self, sock: BufferedSocket) -> MQTTErrorCode | None:
        """Fill the buffer if it is consumed, then handle what is fast at its head.

        Returns what loop_read returns when this turn ends the read, or None when paho has a
        packet to read.
        """
        if sock.pos >= len(sock.buf):
            stop = self._fill(sock)
            if stop is not None:
                return stop
        self._deliver(sock)
        rc = self._pubacks(sock)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return self._loop_rc_handle(rc)
        if sock.pos >= len(sock.buf) or self._sock is not sock:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return None

    def _fill(self, sock: BufferedSocket) -> MQTTErrorCode | None:
        """One recv into the (consumed) buffer; an rc to return when there is nothing to do."""
        try:
            data = sock.fill()
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            # select saw TLS bytes that are no record yet (or TLS must write first): next turn.
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        except OSError as exc:
            log.debug("failed to receive on socket: %s", exc)
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        if not data:  # the broker closed the connection
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        # paho's keepalive reads its own stamp; the packets split here never reach paho's reader.
        with self._msgtime_mutex:
            setattr(self, _RECEIVE_STAMP, sock.received_at)
        return None

    def _deliver(self, sock: BufferedSocket) -> None:
        batch: list[Publish] = []
        if self._topics is None:
            self._topics = {}
        sock.pos = split_publishes(
            sock.buf, sock.pos, self._protocol == mqtt.MQTTv5, batch, self._topics
        )
        if not batch:
            return
        assert self.on_publishes is not None  # noqa: S101 - checked by loop_read
        # Under paho's callback lock, as on_message is called: what the handler publishes (and
        # the PUBACKs) is queued for this loop's write turn rather than written there and then.
        with self._in_callback_mutex:
            self.on_publishes(batch, sock.received_at)
            if not self._manual_ack:
                for _, _, mid, qos in batch:
                    if qos:
                        self._send_puback(mid)

    def _pubacks(self, sock: BufferedSocket) -> MQTTErrorCode:
        """Handle the run of plain PUBACKs (success, no properties: 4 bytes) at the buffer's head.

        What paho's _handle_pubackcomp does for them, without decoding a reason code and a
        Properties object per packet: the broker acknowledges every prediction this way.
        """
        buf, pos, end = sock.buf, sock.pos, len(sock.buf)
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        while pos + 4 <= end and buf[pos] == _PUBACK and buf[pos + 1] == 2:
            mid = (buf[pos + 2] << 8) | buf[pos + 3]
            pos += 4
            with self._out_message_mutex:
                if mid in self._out_messages:
                    rc = self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        sock.pos = pos
        return rc


def make_client(**kwargs: Any) -> FloorlineClient:
    """A ``BufferedClient`` (paho's keyword arguments), or ``StockClient`` if the seam is broken.

    The first fallback in a process logs one warning naming the missing names.
    """
    global _warned  # noqa: PLW0603 - one warning per process
    if not SEAM_MISSING:
        return BufferedClient(**kwargs)
    if not _warned:
        _warned = True
        log.warning(
            "paho-mqtt %s lacks what the fast receive path needs (%s): using paho's own read "
            "path, which is slower; install a paho-mqtt version floorline supports",
            getattr(paho.mqtt, "__version__", "?"), ", ".join(SEAM_MISSING),
        )
    return StockClient(**kwargs)
