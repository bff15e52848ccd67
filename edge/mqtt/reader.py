"""The fast receive path's pure parts: PUBLISH packets split in bulk, and a buffered socket.

Stock paho reads every packet with a ``select`` and three or more ``recv`` calls (the type
byte, the remaining length byte by byte, then the body), builds an ``MQTTMessage`` (and on
MQTT 5 a ``Properties`` object), looks for per-topic callbacks under a lock, and only then calls
``on_message``: about 18 µs per message on MQTT 3.1.1 and 42 µs on MQTT 5 on the benchmark
machine (docs/benchmarks.md), more than the whole pipeline spends on a message.

Here the socket is read through a 64 KiB buffer (``BufferedSocket``), so a burst costs one
``recv``, and the complete PUBLISH packets at QoS 0 and 1 found in the buffer are split by
``split_publishes`` and handed over as one list. The same socket gathers what paho writes during
one loop turn and sends it with as few ``send`` calls as the kernel takes.

Nothing here touches paho: the client that uses these (and paho's private names) is
``edge/mqtt/paho_seam.py``, the one module that knows paho's insides.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

Publish = tuple[str, bytes, int, int]
"""(topic, payload, packet id, qos) of a received PUBLISH."""

PublishBatch = Callable[[list[Publish], float], None]
"""Called on the network thread with the PUBLISH packets of one read and its monotonic time."""

_CHUNK = 65536
# What one loop turn gathers before it sends; past it, paho's writes wait for the next turn (paho
# keeps the rest queued), so what is gathered never grows beyond about this.
_GATHER_BYTES = 256 * 1024
_CLOSE_FLUSH_S = 1.0  # what close() may wait for the last bytes (a DISCONNECT) to leave
_PUBLISH = 0x30
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
    """A connected socket (plain or TLS) read through a 64 KiB buffer, written in gathered sends.

    Reads: ``pending()`` is what paho already asks of TLS sockets: while it is non-zero, paho's
    loop reads without waiting in ``select``. ``received_at`` is the ``time.monotonic()`` of the
    last read that brought bytes (any bytes: the broker is alive), 0.0 before the first.

    Writes: paho calls ``send`` once per packet; each call only appends to ``out`` and ``flush``
    (the client's write turn) sends all of it at once. Only the network thread calls either. The
    bytes are handed to the kernel in order and a partial send keeps the rest at the head of
    ``out``: a TLS write that must be retried is retried with the same leading bytes, as OpenSSL
    requires.
    """

    def __init__(self, sock: Any) -> None:
        self.raw = sock
        self.buf = b""
        self.pos = 0
        self.out = bytearray()
        if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            # Writes are gathered here already: Nagle would only hold the next turn's send back
            # until the broker's delayed ACK (up to 40 ms) for the last one.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.received_at = 0.0
        # Bound once: paho calls fileno on every select.
        self.fileno = sock.fileno
        self._send = sock.send
        self._tls_pending: Callable[[], int] | None = getattr(sock, "pending", None)

    # -- reading ---------------------------------------------------------------------------

    def recv(self, n: int) -> bytes:
        """Up to N bytes, from the buffer when it holds any."""
        pos = self.pos
        if pos < len(self.buf):
            chunk = self.buf[pos : pos + n]
            self.pos = pos + len(chunk)
            return chunk
        data: bytes = self.raw.recv(_CHUNK)
        if data:
            self.received_at = time.monotonic()
        if len(data) <= n:
            return data
        self.buf = data
        self.pos = n
        return data[:n]

    def fill(self) -> bytes:
        """One ``recv`` of up to 64 KiB into the (consumed) buffer; what it read.

        Raises what the socket raises; b"" means the peer closed the connection.
        """
        data: bytes = self.raw.recv(_CHUNK)
        if data:
            self.received_at = time.monotonic()
            self.buf = data
            self.pos = 0
        return data

    def buffered(self) -> int:
        """Bytes in the buffer not yet consumed."""
        return len(self.buf) - self.pos

    def pending(self) -> int:
        """Bytes readable without touching the network: buffered, or decrypted by TLS."""
        left = len(self.buf) - self.pos
        if left or self._tls_pending is None:
            return left
        return self._tls_pending()

    # -- writing ---------------------------------------------------------------------------

    def send(self, data: bytes | bytearray) -> int:
        """Take DATA for the next ``flush``; all of it, or BlockingIOError when enough waits.

        BlockingIOError is what paho expects of a full socket: it keeps the packet queued and
        offers it again on the next write turn.
        """
        out = self.out
        if len(out) >= _GATHER_BYTES:
            self.flush()
            if len(out) >= _GATHER_BYTES:
                raise BlockingIOError
        out += data
        return len(data)

    def flush(self) -> bool:
        """Send what was gathered, in as few calls as the kernel takes; True when all went.

        Raises OSError when the connection is broken.
        """
        out = self.out
        while out:
            try:
                sent = self._send(out)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return False
            if not sent:
                return False
            del out[:sent]
        return True

    def wants_write(self) -> bool:
        """Whether gathered bytes still wait for the socket."""
        return bool(self.out)

    # -- the rest ----------------------------------------------------------------------------

    def close(self) -> None:
        """Send what is gathered (a final DISCONNECT), briefly and best effort; then close."""
        if self.out:
            try:
                if not self.flush():
                    self.raw.settimeout(_CLOSE_FLUSH_S)
                    self.raw.sendall(self.out)
            except OSError:
                pass  # the connection is gone: so is what it did not send
        self.out = bytearray()
        self.buf = b""
        self.pos = 0
        self.raw.close()

    def setblocking(self, flag: bool) -> None:
        """As ``socket.setblocking``."""
        self.raw.setblocking(flag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def __getattr__(name: str) -> Any:
    # BufferedClient lived here before the paho seam; tests/benchmark.py still imports it here.
    if name == "BufferedClient":
        from floorline.edge.mqtt.paho_seam import BufferedClient  # noqa: PLC0415

        return BufferedClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
