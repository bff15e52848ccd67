"""Sparkplug B topics: ``spBv1.0/{group}/{type}/{node}[/{device}]`` and ``spBv1.0/STATE/{host}``.

Pure string work, no protobuf. Ids are Sparkplug's: UTF-8 strings without the MQTT separators
and wildcards ``/``, ``+``, ``#`` (spec 3.0, "Topic Namespace Elements"); empty ids are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, cast, get_args

NAMESPACE: Final = "spBv1.0"

MessageType = Literal[
    "NBIRTH", "NDEATH", "NDATA", "NCMD", "DBIRTH", "DDEATH", "DDATA", "DCMD", "STATE"
]
"""Every Sparkplug B message type (STATE: a host application's state, on its own topic)."""

MESSAGE_TYPES: Final[frozenset[str]] = frozenset(get_args(MessageType))
NODE_TYPES: Final[frozenset[str]] = frozenset({"NBIRTH", "NDEATH", "NDATA", "NCMD"})
"""Types whose topic ends at the edge node id."""
DEVICE_TYPES: Final[frozenset[str]] = frozenset({"DBIRTH", "DDEATH", "DDATA", "DCMD"})
"""Types whose topic carries a device id after the edge node id."""

_FORBIDDEN = frozenset("/+#")


def id_error(value: str) -> str | None:
    """Why VALUE is not a usable Sparkplug id (group, edge node, device, host), or None."""
    if not value:
        return "is empty"
    if any(c in _FORBIDDEN for c in value):
        return f"{value!r} contains '/', '+' or '#'"
    if "\x00" in value:
        return f"{value!r} contains a NUL character"
    return None


def check_id(value: str, what: str) -> str:
    """VALUE if it is a usable Sparkplug id; ValueError naming WHAT otherwise."""
    error = id_error(value)
    if error is not None:
        raise ValueError(f"{what} {error}: Sparkplug ids are non-empty and have no '/', '+', '#'")
    return value


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed Sparkplug B topic.

    For ``STATE`` topics ``group`` is empty and ``node`` holds the host application id.
    """

    group: str
    type: MessageType
    node: str
    device: str | None = None

    def __str__(self) -> str:
        if self.type == "STATE":
            return state_topic(self.node)
        if self.device is None:
            return node_topic(self.group, self.type, self.node)
        return device_topic(self.group, self.type, self.node, self.device)


def parse_topic(topic: str) -> Topic | None:  # noqa: PLR0911 - one return per shape refused
    """TOPIC as a Sparkplug B topic, or None when it is not one (wrong shape, type or ids)."""
    levels = topic.split("/")
    if len(levels) < 3 or levels[0] != NAMESPACE:
        return None
    if levels[1] == "STATE":
        if len(levels) != 3 or id_error(levels[2]) is not None:
            return None
        return Topic("", "STATE", levels[2])
    kind = levels[2]
    if kind in NODE_TYPES:
        if len(levels) != 4:
            return None
        device = None
    elif kind in DEVICE_TYPES:
        if len(levels) != 5:
            return None
        device = levels[4]
        if id_error(device) is not None:
            return None
    else:
        return None
    group, node = levels[1], levels[3]
    if id_error(group) is not None or id_error(node) is not None:
        return None
    return Topic(group, cast("MessageType", kind), node, device)


def node_topic(group: str, kind: MessageType, node: str) -> str:
    """``spBv1.0/{group}/{kind}/{node}`` (NBIRTH, NDEATH, NDATA, NCMD)."""
    return f"{NAMESPACE}/{group}/{kind}/{node}"


def device_topic(group: str, kind: MessageType, node: str, device: str) -> str:
    """``spBv1.0/{group}/{kind}/{node}/{device}`` (DBIRTH, DDEATH, DDATA, DCMD)."""
    return f"{NAMESPACE}/{group}/{kind}/{node}/{device}"


def state_topic(host: str) -> str:
    """``spBv1.0/STATE/{host}``: a host application's retained online/offline state (3.0)."""
    return f"{NAMESPACE}/STATE/{host}"
