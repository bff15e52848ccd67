"""The records that travel between the daemon's stages.

``Inbound`` is a sensor message on its way from the network thread to a pipeline's worker;
``Outbound`` is anything the gateway sends (predictions, dead letters, state, stats, fleet
reports), all of which take one path: ``Daemon.send`` → the publisher (and its outbox for QoS ≥ 1)
→ the connection. Windows (``stream.window.Window``) travel between the windower, the batcher and
the outputs. They are named tuples: built once per message on the hot path, unpacked like tuples.
"""

from __future__ import annotations

from typing import NamedTuple

Token = tuple[int, int] | None
"""(mid, qos) of an input message awaiting acknowledgement, or None when nothing is owed."""


class Inbound(NamedTuple):
    """A sensor message queued for a pipeline."""

    topic: str
    payload: bytes
    received: float
    """``time.monotonic()`` when the network thread read it."""
    token: Token = None
    """Set when the pipeline must release the message for acknowledgement (``ack: durable``)."""


class Outbound(NamedTuple):
    """A message for the broker."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
