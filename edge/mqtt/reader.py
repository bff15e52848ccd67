"""paho's client with a faster receive path: a buffered socket and PUBLISH packets split in bulk.

Stock paho reads every packet with a ``select`` and three or more ``recv`` calls (the type
byte, the remaining length byte by byte, then the body), builds an ``MQTTMessage`` (and on
MQTT 5 a ``Properties`` object), looks for per-topic callbacks under a lock, and only then calls
``on_message``: about 18 µs per message on MQTT 3.1.1 and 42 µs on MQTT 5 on the benchmark
machine (docs/benchmarks.md), more than the whole pipeline spends on a message.

Here the socket is read through a 64 KiB buffer, so a burst costs one ``recv``; the complete
PUBLISH packets at QoS 0 and 1 found in the buffer are split by ``split_publishes`` and handed
over as one list, and plain PUBACKs (the broker's answer to every prediction) are matched to
paho's outgoing messages without building a reason code and properties for each. Everything
else (CONNACK, SUBACK, PINGRESP, QoS 2, a PUBACK with a reason or properties, a packet cut by
the end of the buffer, anything malformed or odd) goes through paho's own ``_packet_read``
unchanged, which reads from the same buffer. So paho keeps the protocol state; this module only
takes over the common packet, in order.

This leans on paho 2.x internals (``_create_socket``, ``_packet_read``, ``_in_packet``,
``_send_puback``, ``_do_on_publish``, ``_out_messages``, ``_loop_rc_handle``,
``_last_bytes_received``); paho is pinned ``<3`` and
tests/test_mqtt_reader.py checks the split against paho's own decoder.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

Publish = tuple[str, bytes, int, int]
"""(topic, payload, packet id, qos) of a received PUBLISH."""

PublishBatch = Callable[[list[Publish], float], None]
"""Called on the network thread with the PUBLISH packets of one read and its monotonic time."""

_CHUNK = 65536
_TURNS = 64  # packets paho handles per loop_read at most, so writes and keepalive get a turn
_PUBLISH = 0x30
_PUBACK = 0x40
# Shared by every plain PUBACK handled here; on_publish callbacks only read them.
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
_TOPIC_CACHE = 10_000  # distinct topics whose str is shared; beyond, each message decodes its own


def split_publishes(
    buf: bytes, pos: int, v5: bool, out: list[Publish], topics: dict[bytes, str] | None = None
) -> int:
    """Append every complete QoS 0/1 PUBLISH in BUF from POS to OUT; return where they end.

    Stops at the first packet that is not one (another type, QoS 2, cut off by the end of BUF,
    a topic alias, a topic that is not UTF-8, a length that does not add up): paho reads that one.
    MQTT 5 properties are skipped: the daemon uses none, and it never allows topic aliases.
    TOPICS, if given, maps topic bytes to one shared str per topic (bounded by the caller's
    _TOPIC_CACHE): a queued message then holds no topic string of its own.
    """
    end = len(buf)
    while pos + 2 <= end:
        header = buf[pos]
        qos = (header >> 1) & 3
        if header & 0xF0 != _PUBLISH or qos > 1:
            break
        # Remaining length: a varint of up to 4 bytes, nearly always 1 or 2 here.
        length = buf[pos + 1]
        i = pos + 2
        if length >= 0x80:
            length, i = _varint(buf, pos + 1, end)
            if i < 0:
                break
        stop = i + length
        if stop > end or length < 2:
            break
        tlen = (buf[i] << 8) | buf[i + 1]
        i += 2 + tlen
        if tlen == 0 or i > stop:
            break
        raw = buf[i - tlen : i]
        topic = topics.get(raw) if topics is not None else None
        if topic is None:
            try:
                topic = raw.decode()
            except UnicodeDecodeError:
                break
            if topics is not None and len(topics) < _TOPIC_CACHE:
                topics[raw] = topic
        mid = 0
        if qos:
            if i + 2 > stop:
                break
            mid = (buf[i] << 8) | buf[i + 1]
            i += 2
        if v5:
            # Property length (a varint, nearly always the single byte 0), then the properties,
            # which are skipped.
            if i >= stop:
                break
            plen = buf[i]
            i += 1
            if plen >= 0x80:
                plen, i = _varint(buf, i - 1, stop)
                if i < 0:
                    break
            i += plen
            if i > stop:
                break
        out.append((topic, buf[i:stop], mid, qos))
        pos = stop
    return pos


def _varint(buf: bytes, i: int, end: int) -> tuple[int, int]:
    """MQTT's variable byte integer at BUF[i:end]: (value, index after it).

    The index is -1 when the integer is cut off by END or longer than the 4 bytes allowed.
    """
    value = 0
    for shift in (0, 7, 14, 21):
        if i >= end:
            return 0, -1
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
    return 0, -1


class BufferedSocket:
    """A connected socket (plain or TLS) read through a 64 KiB buffer.

    ``pending()`` is what paho already asks of TLS sockets: while it is non-zero, paho's loop
    reads without waiting in ``select``.
    """

    def __init__(self, sock: Any) -> None:
        self.raw = sock
        self.buf = b""
        self.pos = 0
        # Bound once: paho calls these on every write and select.
        self.send = sock.send
        self.fileno = sock.fileno
        self._tls_pending: Callable[[], int] | None = getattr(sock, "pending", None)

    def recv(self, n: int) -> bytes:
        """Up to N bytes, from the buffer when it holds any."""
        pos = self.pos
        if pos < len(self.buf):
            chunk = self.buf[pos : pos + n]
            self.pos = pos + len(chunk)
            return chunk
        data: bytes = self.raw.recv(_CHUNK)
        if len(data) <= n:
            return data
        self.buf = data
        self.pos = n
        return data[:n]

    def buffered(self) -> int:
        """Bytes in the buffer not yet consumed."""
        return len(self.buf) - self.pos

    def pending(self) -> int:
        """Bytes readable without touching the network: buffered, or decrypted by TLS."""
        left = len(self.buf) - self.pos
        if left or self._tls_pending is None:
            return left
        return self._tls_pending()

    def close(self) -> None:
        """Close the socket; drop what was buffered."""
        self.buf = b""
        self.pos = 0
        self.raw.close()

    def setblocking(self, flag: bool) -> None:
        """As ``socket.setblocking``."""
        self.raw.setblocking(flag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class BufferedClient(mqtt.Client):
    """paho's client on a ``BufferedSocket``, QoS 0/1 PUBLISH packets split in bulk.

    ``on_publishes`` receives them; paho's ``on_message`` still receives any PUBLISH that paho
    itself reads (QoS 2, the first of a read, one cut by the end of the buffer), so set both.
    """

    on_publishes: PublishBatch | None = None
    _topics: dict[bytes, str] | None = None

    def _create_socket(self) -> Any:
        return BufferedSocket(super()._create_socket())

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
            data: bytes = sock.raw.recv(_CHUNK)
        except (BlockingIOError, ssl.SSLWantReadError):
            return MQTTErrorCode.MQTT_ERR_SUCCESS  # select saw TLS bytes that are no record yet
        except ssl.SSLWantWriteError:
            self._call_socket_register_write()
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        except OSError as exc:
            log.debug("failed to receive on socket: %s", exc)
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        if not data:  # the broker closed the connection
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        sock.buf = data
        sock.pos = 0
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
        now = time.monotonic()
        with self._msgtime_mutex:
            self._last_bytes_received = now
        assert self.on_publishes is not None  # noqa: S101 - checked by loop_read
        # Under paho's callback lock, as on_message is called: what the handler publishes (and
        # the PUBACKs) is queued for this loop's write turn rather than written there and then.
        with self._in_callback_mutex:
            self.on_publishes(batch, now)
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
        seen = False
        while pos + 4 <= end and buf[pos] == _PUBACK and buf[pos + 1] == 2:
            mid = (buf[pos + 2] << 8) | buf[pos + 3]
            pos += 4
            seen = True
            with self._out_message_mutex:
                if mid in self._out_messages:
                    rc = self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        sock.pos = pos
        if seen:
            with self._msgtime_mutex:
                self._last_bytes_received = time.monotonic()
        return rc
