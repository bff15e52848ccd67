"""Sparkplug B payloads an edge node publishes: births, data, deaths.

The edge node's side of the one Sparkplug codec, ``floorline.edge.sparkplug.payload`` (datatypes,
metric values, bdSeq, the rebirth request live there): this module only decides which metrics
each message carries. Imported only when a ``sparkplug`` output is configured
(``sparkplug_node`` imports it lazily), so a gateway without one never imports protobuf.

Metric values are plain Python values; ``None`` is a typed null (``is_null``). Datatypes come from
the device's schema (``MetricSpec``), set once from the model (``outputs.sparkplug``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from floorline.edge.sparkplug import payload as sp

DataType = sp.DataType
BOOLEAN = DataType.Boolean
STRING = DataType.String
DOUBLE = DataType.Double
INT64 = DataType.Int64

Value = str | float | int | bool | None


@dataclass(frozen=True)
class MetricSpec:
    """One metric a device announces: its name and Sparkplug datatype."""

    name: str
    datatype: DataType


def datatype_of(value: Value) -> DataType:
    """The datatype for a value found without a schema (a row stored under an older model)."""
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, int):
        return INT64
    if isinstance(value, str):
        return STRING
    return DOUBLE


def _fitting(name: str | None, datatype: DataType, value: Value, *, timestamp: int,
             alias: int | None = None) -> sp.Metric:
    """The metric, or a typed null when VALUE does not fit DATATYPE.

    A model changed under a stored row: an exception here would stall the node's session.
    """
    try:
        return sp.metric(name, datatype, value, alias=alias, timestamp=timestamp)
    except sp.PayloadError:
        return sp.metric(name, datatype, None, alias=alias, timestamp=timestamp)


def ndeath(bd_seq: int) -> bytes:
    """The NDEATH: the bdSeq metric only, no seq (also the connection's will)."""
    message = sp.build([sp.bdseq_metric(bd_seq)])
    message.ClearField("timestamp")  # a will is built long before it is sent
    data: bytes = message.SerializeToString()
    return data


def nbirth(timestamp_ms: int, bd_seq: int, node_metrics: Mapping[str, Value]) -> bytes:
    """The NBIRTH: seq 0, bdSeq, ``Node Control/Rebirth`` false, and NODE_METRICS (strings)."""
    metrics = [
        sp.bdseq_metric(bd_seq, timestamp=timestamp_ms),
        sp.metric(sp.REBIRTH, BOOLEAN, False, timestamp=timestamp_ms),
        *(_fitting(n, datatype_of(v), v, timestamp=timestamp_ms) for n, v in node_metrics.items()),
    ]
    data: bytes = sp.build(metrics, seq=0, timestamp=timestamp_ms).SerializeToString()
    return data


def dbirth(
    timestamp_ms: int, seq: int, specs: Iterable[MetricSpec], base: int,
    values: Mapping[str, Value], constants: Mapping[str, Value], values_ms: int | None = None,
) -> bytes:
    """A DBIRTH: every metric with its name, alias (BASE + its index + 1), datatype, value.

    The VALUES' metrics are stamped VALUES_MS (the time of the prediction they come from;
    default the birth's TIMESTAMP_MS), so a host files the first prediction under its window's
    time as it files the ones in DDATA. CONSTANTS (the model's name, version, sha256) are
    metrics without an alias: they never change within a session, so no DDATA carries them.
    """
    stamp = timestamp_ms if values_ms is None else values_ms
    metrics = [
        _fitting(spec.name, spec.datatype, values.get(spec.name), alias=base + index + 1,
                 timestamp=stamp)
        for index, spec in enumerate(specs)
    ]
    metrics += [_fitting(name, datatype_of(value), value, timestamp=timestamp_ms)
                for name, value in constants.items()]
    data: bytes = sp.build(metrics, seq=seq, timestamp=timestamp_ms).SerializeToString()
    return data


def ddata(
    timestamp_ms: int, seq: int, metric_ms: int, values: Mapping[str, Value],
    aliases: Mapping[str, tuple[int, DataType]], *, historical: bool,
) -> bytes:
    """A DDATA: VALUES by alias (ALIASES: name → (alias, datatype)), stamped METRIC_MS.

    A name without an alias (a row stored under an older model), or whose value no longer fits
    its alias's datatype, goes by name, with the datatype of its value.
    """
    metrics = []
    for name, value in values.items():
        known = aliases.get(name)
        m: sp.Metric | None = None
        if known is not None:
            with contextlib.suppress(sp.PayloadError):
                m = sp.metric(None, known[1], value, alias=known[0], timestamp=metric_ms)
        if m is None:
            m = _fitting(name, datatype_of(value), value, timestamp=metric_ms)
        if historical:
            m.is_historical = True
        metrics.append(m)
    data: bytes = sp.build(metrics, seq=seq, timestamp=timestamp_ms).SerializeToString()
    return data


def ddeath(timestamp_ms: int, seq: int) -> bytes:
    """A DDEATH: a timestamp and the seq, no metrics."""
    data: bytes = sp.build(seq=seq, timestamp=timestamp_ms).SerializeToString()
    return data


def rebirth_requested(payload: bytes) -> bool:
    """Whether an NCMD payload asks for a rebirth (``Node Control/Rebirth`` = true).

    Raises ValueError (``PayloadError``) for a payload that is not a Sparkplug protobuf.
    """
    return sp.is_rebirth_request(sp.parse(payload))
