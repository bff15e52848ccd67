"""The ``sparkplug`` decoder: Sparkplug B sensor data from other edge nodes becomes samples.

Sparkplug B (Eclipse Sparkplug 3.0) edge nodes announce their metrics in birth certificates
(NBIRTH for the node, DBIRTH per device: name, alias, datatype, current value) and then send
NDATA/DDATA, usually by alias and by exception (only the metrics that changed). This decoder
keeps, per edge node, what the births announced and turns data into samples:

- Features are metrics found by name: ``metrics`` maps a feature to its metric name (default:
  the feature's own name). Other metrics are ignored. A feature absent from a data message keeps
  its last value (report by exception); the birth gives the first values.
- A message holding several values of a feature (a block, each with its own timestamp) gives one
  sample per value: the k-th value of every feature forms sample k.
- Timestamps: each metric's ``timestamp`` (ms), else the payload's. The asset comes from the
  topic's ids (``asset`` / ``node_asset`` templates), so pipelines use ``asset: {payload: true}``.
- Sequence: the node's ``seq`` (0..255, one counter over the node's and its devices' messages) is
  checked here. Samples get a per-asset sequence the decoder numbers itself, with a step left out
  at every seq gap and every birth, so the windower starts that asset's window afresh there and
  a window never spans lost messages or a rebirth (reset cause ``seq_gap``). It cannot recognise
  a redelivered message, so ``has_sequence`` is False (no ``ack: durable``).

Control messages (births, deaths, other hosts' NCMD/DCMD, STATE) return None. Data whose birth is
unknown (``sparkplug_no_birth``), an alias or name the birth did not define
(``sparkplug_unknown_alias``) or a skipped ``seq`` (``sparkplug_seq_gap``) is dead-lettered and
the node is asked for a rebirth: an NCMD ``Node Control/Rebirth`` = true to
``spBv1.0/{group}/NCMD/{node}`` (QoS 0), at most once per node per ``rebirth_interval_s`` and at
most ``_REBIRTH_BURST`` per second in all, so a flood of bad data costs a few commands. Deaths
drop what the births announced; an NDEATH whose ``bdSeq`` differs from the live NBIRTH's is a
stale will from an older session and is ignored. protobuf is imported when the decoder is built,
so a gateway without the ``sparkplug`` extra runs every other decoder.
"""

from __future__ import annotations

import logging
import string
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from floorline.edge.decoders.base import (
    DecoderConfigBase,
    DecoderContext,
    DecoderPlugin,
    Samples,
    check_asset,
    check_features,
    floats32,
    short,
)
from floorline.edge.errors import ConfigError, DecodeError
from floorline.edge.messages import Outbound
from floorline.edge.sparkplug import require
from floorline.edge.sparkplug.topics import Topic, node_topic, parse_topic

if TYPE_CHECKING:
    from floorline.edge.sparkplug import payload as sp

log = logging.getLogger(__name__)

_DEVICE_FIELDS = frozenset({"group", "node", "device"})
_NODE_FIELDS = frozenset({"group", "node"})
_MAX_NODES = 10_000  # edge nodes tracked; births of more are refused (too_many_assets)
_MAX_ENTRIES = 1_000_000  # birth metrics held over all nodes and devices
_MAX_TOPICS = 100_000  # parsed-topic cache
_REBIRTH_BURST = 10  # rebirth requests per second at most, over all nodes
_LOG_EVERY_S = 10.0


def _template_error(value: str, allowed: frozenset[str]) -> str | None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
    except ValueError as exc:
        return f"{value!r} is not a template ({exc})"
    bad = [f for f in fields if f not in allowed]
    if bad:
        return f"{value!r} uses {{{bad[0]}}}; placeholders: {', '.join(sorted(allowed))}"
    return None


class SparkplugDecoderConfig(DecoderConfigBase):
    """Sparkplug B data (NDATA/DDATA by their births' aliases) as samples."""

    type: Literal["sparkplug"] = "sparkplug"
    metrics: dict[str, str] = Field(
        default_factory=dict,
        description="Feature name -> Sparkplug metric name; a feature not listed is the metric "
        "of the same name.",
    )
    asset: str = Field(
        default="{node}.{device}",
        description="The asset of device data (DBIRTH/DDATA): a template over {group}, {node}, "
        "{device}; it must hold {device}. The result must be a valid asset name (no '/').",
    )
    node_asset: str = Field(
        default="{node}",
        description="The asset of node data (NBIRTH/NDATA): a template over {group}, {node}.",
    )
    rebirth: bool = Field(
        default=True,
        description="Ask an edge node for a rebirth (NCMD Node Control/Rebirth) when its data "
        "cannot be read: unknown birth or alias, or a seq gap. false where this gateway may not "
        "command edge nodes (only the primary host application should, in some plants).",
    )
    rebirth_interval_s: float = Field(
        default=10.0, ge=0.1, le=3600,
        description="At most one rebirth request per edge node in this many seconds.",
    )
    max_metrics: int = Field(
        default=10_000, ge=1, le=1_000_000,
        description="Metrics one Sparkplug message may hold; more is dead-lettered "
        "(sparkplug_bad_payload).",
    )

    @field_validator("metrics")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        for feature, name in value.items():
            if not name:
                raise ValueError(f"{feature}: the metric name is empty")
        return value

    @model_validator(mode="after")
    def _templates(self) -> SparkplugDecoderConfig:
        if (error := _template_error(self.asset, _DEVICE_FIELDS)) is not None:
            raise ValueError(f"asset: {error}")
        if "{device}" not in self.asset:
            raise ValueError(f"asset: {self.asset!r} lacks {{device}}, so all devices of a node "
                             "would share one asset and their samples would mix")
        if (error := _template_error(self.node_asset, _NODE_FIELDS)) is not None:
            raise ValueError(f"node_asset: {error}")
        return self

    def names_asset(self) -> bool:
        """The asset comes from the Sparkplug ids, through the decoder (``asset.payload``)."""
        return True

    def has_timestamps(self) -> bool:
        """Sparkplug payloads and metrics carry timestamps."""
        return True


class _Table:
    """What one birth certificate announced (an NBIRTH's or a DBIRTH's metrics)."""

    __slots__ = ("aliases", "asset", "known", "names", "size", "values")

    def __init__(self, asset: str, features: int) -> None:
        self.asset = asset
        self.aliases: dict[int, tuple[int, int]] = {}  # alias -> (feature column or -1, datatype)
        self.names: dict[str, tuple[int, int]] = {}  # name -> (feature column or -1, datatype)
        self.values = [0.0] * features  # each feature's last value (report by exception)
        self.known = [False] * features
        self.size = 0


class _Node:
    """One edge node's session as seen here: its seq, bdSeq and births."""

    __slots__ = ("bdseq", "devices", "expected", "table")

    def __init__(self) -> None:
        self.expected: int | None = None  # the seq due next
        self.bdseq: int | None = None
        self.table: _Table | None = None  # the NBIRTH's metrics
        self.devices: dict[str, _Table] = {}


# datatype -> (oneof field, bits of a signed integer or 0)
_NUMERIC_FIELDS: dict[int, tuple[str, int]] = {
    1: ("int_value", 8), 2: ("int_value", 16), 3: ("int_value", 32), 4: ("long_value", 64),
    5: ("int_value", 0), 6: ("int_value", 0), 7: ("int_value", 0), 8: ("long_value", 0),
    9: ("float_value", 0), 10: ("double_value", 0),
}


class SparkplugDecoder:
    """Decodes Sparkplug B messages as configured by :class:`SparkplugDecoderConfig`."""

    def __init__(self, config: SparkplugDecoderConfig, context: DecoderContext) -> None:
        features = check_features(context.features)
        unknown = sorted(set(config.metrics) - set(features))
        if unknown:
            raise ConfigError(f"decoder.metrics: {unknown[0]!r} is not a feature of the model "
                              f"(features: {', '.join(features)})")
        require("decoder type sparkplug")
        from floorline.edge.sparkplug import payload  # noqa: PLC0415 - protobuf only if used

        self._sp = payload
        self._features = features
        self._columns = {config.metrics.get(f, f): i for i, f in enumerate(features)}
        if len(self._columns) != len(features):
            raise ConfigError("decoder.metrics: two features read the same metric")
        self._config = config
        self._pipeline = context.pipeline
        self._send = context.send
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._entries = 0
        self._topics: dict[str, Topic | None] = {}
        self._sample_seq: dict[str, int] = {}  # asset -> the next sample's sequence number
        self._asked: dict[tuple[str, str], float] = {}  # node -> when a rebirth was last asked
        self._bucket = float(_REBIRTH_BURST)
        self._bucket_at = 0.0
        self._log_at = 0.0
        self._unlogged = 0
        self.clock: Callable[[], float] = time.monotonic
        """The rate limits' clock (tests step it)."""
        self.rebirth_requests = 0
        """Rebirth requests sent."""

    # -- the protocol ---------------------------------------------------------------------------

    def decode(self, payload: bytes, topic: str = "") -> Samples | None:
        """The samples in one Sparkplug message, None for control messages; DecodeError else."""
        t = self._topics.get(topic)
        if t is None:
            t = parse_topic(topic)
            if len(self._topics) < _MAX_TOPICS:
                self._topics[topic] = t
            if t is None:
                raise DecodeError("sparkplug_bad_topic",
                                  f"not spBv1.0/group/TYPE/node[/device]: {short(topic)}")
        kind = t.type
        if kind in ("NCMD", "DCMD", "STATE"):
            return None  # commands to edge nodes and host applications' state: not data
        try:
            message = self._sp.parse(payload)
        except self._sp.PayloadError as exc:
            raise DecodeError("sparkplug_bad_payload", str(exc)[:80]) from None
        key = (t.group, t.node)
        if kind == "NBIRTH":
            self._check_size(message)
            self._nbirth(key, t, message)
            return None
        node = self._nodes.get(key)
        if kind == "NDEATH":
            self._ndeath(key, node, message)
            return None
        if node is None or node.expected is None:
            self._ask_rebirth(key, "no NBIRTH seen")
            raise DecodeError("sparkplug_no_birth", f"{kind} from edge node {short(t.node)}, "
                              "whose NBIRTH was not seen; rebirth requested")
        if not message.HasField("seq"):
            raise DecodeError("sparkplug_bad_payload", f"{kind} without seq")
        seq = message.seq
        if seq > 255:
            raise DecodeError("sparkplug_bad_payload", f"seq {seq} is not in 0..255")
        expected = node.expected
        node.expected = (seq + 1) % 256
        if seq != expected:
            self._gap(key, node)
            if kind in ("DBIRTH", "DDEATH"):  # still valid: applied, and a rebirth asked for
                self._device_control(node, t, message)
                return None
            raise DecodeError("sparkplug_seq_gap",
                              f"seq {seq}, expected {expected}; rebirth requested")
        self._check_size(message)  # after the seq: a refused message still took its number
        if kind in ("DBIRTH", "DDEATH"):
            self._device_control(node, t, message)
            return None
        table = node.table if kind == "NDATA" else node.devices.get(t.device or "")
        if table is None:
            self._ask_rebirth(key, "no DBIRTH seen")
            raise DecodeError("sparkplug_no_birth", f"DDATA from device {short(t.device)}, "
                              "whose DBIRTH was not seen; rebirth requested")
        return self._samples(key, table, message)

    def _check_size(self, message: sp.Payload) -> None:
        if len(message.metrics) > self._config.max_metrics:
            raise DecodeError("sparkplug_bad_payload", f"{len(message.metrics)} metrics, over "
                              f"max_metrics {self._config.max_metrics}")

    # -- births and deaths ----------------------------------------------------------------------

    def _nbirth(self, key: tuple[str, str], t: Topic, message: sp.Payload) -> None:
        if not message.HasField("seq") or message.seq > 255:
            raise DecodeError("sparkplug_bad_payload", "NBIRTH without a seq in 0..255")
        node = self._nodes.get(key)
        if node is None:
            if len(self._nodes) >= _MAX_NODES:
                raise DecodeError("too_many_assets", f"already tracking {_MAX_NODES} edge nodes")
            node = self._nodes[key] = _Node()
        else:
            self._drop(node)  # a new session: every device births again after it
        table = self._table(t, message, self._config.node_asset)
        node.table = table
        node.bdseq = self._sp.bdseq_of(message)
        node.expected = (message.seq + 1) % 256

    def _ndeath(self, key: tuple[str, str], node: _Node | None, message: sp.Payload) -> None:
        if node is None:
            return
        bdseq = self._sp.bdseq_of(message)
        if node.bdseq is not None and bdseq is not None and bdseq != node.bdseq:
            log.debug("pipeline %s: NDEATH bdSeq %d of %s/%s is not the live session's %d: "
                      "a stale will, ignored", self._pipeline, bdseq, *key, node.bdseq)
            return
        self._drop(node)
        del self._nodes[key]

    def _device_control(self, node: _Node, t: Topic, message: sp.Payload) -> None:
        device = t.device or ""
        old = node.devices.pop(device, None)
        if old is not None:
            self._entries -= old.size
        if t.type == "DBIRTH":
            node.devices[device] = self._table(t, message, self._config.asset)

    def _drop(self, node: _Node) -> None:
        for table in (node.table, *node.devices.values()):
            if table is not None:
                self._entries -= table.size
        node.table = None
        node.devices = {}
        node.expected = None

    def _table(self, t: Topic, message: sp.Payload, template: str) -> _Table:
        """The metrics a birth announces, with the features' current values."""
        try:
            asset = check_asset(template.format(group=t.group, node=t.node, device=t.device))
        except DecodeError as exc:
            raise DecodeError("bad_asset", f"{t.type} gives {exc.detail}") from None
        if self._entries + len(message.metrics) > _MAX_ENTRIES or (
                len(self._sample_seq) >= _MAX_ENTRIES and asset not in self._sample_seq):
            raise DecodeError("too_many_assets", f"births hold {self._entries} metrics already")
        table = _Table(asset, len(self._features))
        columns = self._columns
        for m in message.metrics:
            name = m.name
            if not name:
                raise DecodeError("sparkplug_bad_payload", f"{t.type} metric without a name")
            if not m.HasField("datatype"):
                raise DecodeError("sparkplug_bad_payload",
                                  f"{t.type} metric {short(name)} without a datatype")
            entry = (columns.get(name, -1), m.datatype)
            table.names[name] = entry
            if m.HasField("alias"):
                table.aliases[m.alias] = entry
            col = entry[0]
            if col >= 0 and not m.is_null and m.datatype in _NUMERIC_FIELDS:
                try:
                    table.values[col] = self._number(m, m.datatype, name)
                    table.known[col] = True
                except DecodeError:
                    pass  # its data will say what is wrong; the birth stays usable
        table.size = 1 + len(table.names) + len(table.aliases)  # 1: even an empty birth counts
        self._entries += table.size
        # A birth starts a new stretch of samples: the window never spans it.
        self._sample_seq[asset] = self._sample_seq.get(asset, -1) + 1
        return table

    # -- data ------------------------------------------------------------------------------------

    def _gap(self, key: tuple[str, str], node: _Node) -> None:
        # Messages of unknown devices were lost: every asset of the node starts a new window.
        for table in (node.table, *node.devices.values()):
            if table is not None and table.asset in self._sample_seq:
                self._sample_seq[table.asset] += 1
        self._ask_rebirth(key, "seq gap")

    def _samples(self, key: tuple[str, str], table: _Table, message: sp.Payload) -> Samples | None:
        aliases, names = table.aliases, table.names
        width = len(self._features)
        # Per feature column, its values in this message with their timestamps (ms or None).
        rows: list[list[tuple[float, int | None]]] = [[] for _ in range(width)]
        found = False
        for m in message.metrics:
            if m.HasField("alias"):
                entry = aliases.get(m.alias)
                if entry is None:
                    self._ask_rebirth(key, "unknown alias")
                    raise DecodeError("sparkplug_unknown_alias",
                                      f"alias {m.alias} is not in the birth; rebirth requested")
            else:
                entry = names.get(m.name)
                if entry is None:
                    self._ask_rebirth(key, "unknown metric")
                    raise DecodeError("sparkplug_unknown_alias",
                                      f"metric {short(m.name)} is not in the birth; rebirth "
                                      "requested")
            col, datatype = entry
            if col < 0:
                continue
            found = True
            if m.is_null:
                table.known[col] = False
                raise DecodeError("missing_field", f"{self._features[col]} is null")
            value = self._number(m, datatype, self._features[col])
            rows[col].append((value, m.timestamp if m.HasField("timestamp") else None))
        if not found:
            return None  # no feature in it: other metrics of the node or device
        return self._rows(table, rows, message)

    def _rows(self, table: _Table, rows: list[list[tuple[float, int | None]]],
              message: sp.Payload) -> Samples:
        n = max(map(len, rows))
        current, known = table.values, table.known
        default = message.timestamp if message.HasField("timestamp") else None
        flat: list[float] = []
        times: list[float] = []
        for k in range(n):
            stamp: int | None = None
            for col, column in enumerate(rows):
                if k < len(column):
                    current[col], t = column[k]
                    known[col] = True
                    if t is not None and (stamp is None or t > stamp):
                        stamp = t
            if not all(known):
                missing = self._features[known.index(False)]
                raise DecodeError("missing_field", f"{missing}: no value since the birth")
            if stamp is None:
                stamp = default
            if stamp is None:
                raise DecodeError("bad_timestamp", "neither the metric nor the payload has one")
            flat.extend(current)
            times.append(stamp / 1000.0)
        array = floats32(flat, n, "metric value")
        seq = self._sample_seq.get(table.asset, 0)
        self._sample_seq[table.asset] = seq + n
        return Samples(array, np.array(times, dtype=np.float64), seq, table.asset)

    def _number(self, m: sp.Metric, datatype: int, what: str) -> float:
        spec = _NUMERIC_FIELDS.get(datatype)
        if spec is None:
            raise DecodeError("sparkplug_wrong_type",
                              f"{short(what)}: datatype {datatype} is not a number")
        field, bits = spec
        which = m.WhichOneof("value")
        if which != field:
            raise DecodeError("sparkplug_wrong_type",
                              f"{short(what)}: datatype {datatype} but value in {which}")
        if bits:
            raw: int = (m.long_value if bits == 64 else m.int_value) & ((1 << bits) - 1)
            return float(raw - (1 << bits) if raw >> (bits - 1) else raw)
        value: float = getattr(m, field)
        return float(value)

    # -- rebirth requests ------------------------------------------------------------------------

    def _ask_rebirth(self, key: tuple[str, str], why: str) -> None:
        """Ask the edge node KEY for a rebirth, unless one was asked for lately."""
        if not self._config.rebirth or self._send is None:
            return
        now = self.clock()
        last = self._asked.get(key)
        if last is not None and now - last < self._config.rebirth_interval_s:
            return
        self._bucket = min(float(_REBIRTH_BURST), self._bucket + (now - self._bucket_at)
                           * _REBIRTH_BURST)
        self._bucket_at = now
        if self._bucket < 1:
            return  # over the global rate: the node is asked on its next bad message
        self._bucket -= 1
        if len(self._asked) >= _MAX_NODES:
            horizon = now - self._config.rebirth_interval_s
            self._asked = {k: v for k, v in self._asked.items() if v > horizon}
            if len(self._asked) >= _MAX_NODES:
                return
        self._asked[key] = now
        group, node = key
        self._send([Outbound(node_topic(group, "NCMD", node), self._sp.rebirth_request(), 0,
                             False)])
        self.rebirth_requests += 1
        self._unlogged += 1
        if now >= self._log_at:
            log.info("pipeline %s: asked edge node %s/%s for a rebirth (%s); %d rebirth "
                     "requests since the last report", self._pipeline, group, node, why,
                     self._unlogged)
            self._unlogged = 0
            self._log_at = now + _LOG_EVERY_S


PLUGIN = DecoderPlugin(type="sparkplug", config=SparkplugDecoderConfig, factory=SparkplugDecoder)
