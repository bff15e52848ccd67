"""The Sparkplug B payload: build and parse, metric values by datatype, seq and bdSeq.

A thin typed layer over the generated ``sparkplug_b_pb2`` (protobuf >= 6.30). Values follow the
spec's mapping of datatypes to the ``Metric.value`` oneof: Int8/16/32 and UInt8/16/32 in
``int_value`` (uint32), Int64/UInt64/DateTime in ``long_value`` (uint64), Float, Double, Boolean,
String/Text/UUID in ``string_value``, Bytes/File and the array types in ``bytes_value``. Signed
integers travel as two's complement in the unsigned field; they are read back from the low bits
of their width, so a sender that sign-extends an Int8 to 32 bits and one that does not both read
right. Timestamps are milliseconds since the epoch (UTC), as the spec has them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from enum import IntEnum
from typing import Final

from google.protobuf.message import DecodeError as _ProtobufDecodeError

from floorline.edge.sparkplug import sparkplug_b_pb2 as pb

Payload = pb.Payload
"""The protobuf message every Sparkplug B message carries."""
Metric = pb.Payload.Metric
PropertySet = pb.Payload.PropertySet

SEQ_MODULUS: Final = 256
"""``seq`` runs 0..255 and wraps to 0 (per edge node, over its node and device messages)."""
BDSEQ: Final = "bdSeq"
"""The metric NBIRTH and the NDEATH will carry to pair a birth with its death."""
REBIRTH: Final = "Node Control/Rebirth"
"""The NCMD metric (Boolean true) that asks an edge node to publish its births again."""

MetricValue = bool | int | float | str | bytes | None


class DataType(IntEnum):
    """Sparkplug B 3.0 datatypes (the ``DataType`` enum of Tahu's sparkplug_b.proto)."""

    Unknown = 0
    Int8 = 1
    Int16 = 2
    Int32 = 3
    Int64 = 4
    UInt8 = 5
    UInt16 = 6
    UInt32 = 7
    UInt64 = 8
    Float = 9
    Double = 10
    Boolean = 11
    String = 12
    DateTime = 13
    Text = 14
    UUID = 15
    DataSet = 16
    Bytes = 17
    File = 18
    Template = 19
    PropertySet = 20
    PropertySetList = 21
    Int8Array = 22
    Int16Array = 23
    Int32Array = 24
    Int64Array = 25
    UInt8Array = 26
    UInt16Array = 27
    UInt32Array = 28
    UInt64Array = 29
    FloatArray = 30
    DoubleArray = 31
    BooleanArray = 32
    StringArray = 33
    DateTimeArray = 34


class PayloadError(ValueError):
    """Bytes that are not a Sparkplug B payload, or a value that does not fit its datatype."""


_SIGNED_BITS: Final = {DataType.Int8: 8, DataType.Int16: 16, DataType.Int32: 32, DataType.Int64: 64}
_UNSIGNED_BITS: Final = {
    DataType.UInt8: 8, DataType.UInt16: 16, DataType.UInt32: 32, DataType.UInt64: 64,
    DataType.DateTime: 64,
}
VALUE_FIELD: Final[Mapping[int, str]] = {
    **dict.fromkeys(
        (DataType.Int8, DataType.Int16, DataType.Int32, DataType.UInt8, DataType.UInt16,
         DataType.UInt32), "int_value"),
    **dict.fromkeys((DataType.Int64, DataType.UInt64, DataType.DateTime), "long_value"),
    DataType.Float: "float_value",
    DataType.Double: "double_value",
    DataType.Boolean: "boolean_value",
    **dict.fromkeys((DataType.String, DataType.Text, DataType.UUID), "string_value"),
    **dict.fromkeys(
        (DataType.Bytes, DataType.File, *(DataType(t) for t in range(22, 35))), "bytes_value"),
    DataType.DataSet: "dataset_value",
    DataType.Template: "template_value",
}
"""The ``Metric.value`` oneof field each datatype's value travels in."""

NUMERIC: Final[frozenset[int]] = frozenset(
    {*_SIGNED_BITS, *(t for t in _UNSIGNED_BITS if t != DataType.DateTime), DataType.Float,
     DataType.Double}
)
"""Datatypes whose values are numbers (model features): the integers, Float and Double."""


def now_ms() -> int:
    """The current time in milliseconds since the epoch (UTC)."""
    return time.time_ns() // 1_000_000


def next_seq(seq: int) -> int:
    """The ``seq`` after SEQ (255 is followed by 0)."""
    return (seq + 1) % SEQ_MODULUS


def seq_gap(expected: int, seq: int) -> int:
    """How many messages were missed when SEQ arrived where EXPECTED was due (0: none)."""
    return (seq - expected) % SEQ_MODULUS


def parse(data: bytes) -> pb.Payload:
    """DATA as a Payload; PayloadError when it is not protobuf of that shape."""
    message = pb.Payload()
    try:
        message.ParseFromString(data)
    except _ProtobufDecodeError as exc:
        raise PayloadError(f"not a Sparkplug B payload: {exc}") from None
    return message


def build(
    metrics: Iterable[pb.Payload.Metric] = (),
    *,
    seq: int | None = None,
    timestamp: int | None = None,
) -> pb.Payload:
    """A Payload holding METRICS, with SEQ (if given) and TIMESTAMP (ms; default now)."""
    message = pb.Payload(timestamp=now_ms() if timestamp is None else timestamp)
    if seq is not None:
        if not 0 <= seq < SEQ_MODULUS:
            raise PayloadError(f"seq {seq} is not in 0..255")
        message.seq = seq
    message.metrics.extend(metrics)
    return message


def metric(
    name: str | None,
    datatype: DataType,
    value: MetricValue,
    *,
    alias: int | None = None,
    timestamp: int | None = None,
    properties: Mapping[str, MetricValue] | None = None,
) -> pb.Payload.Metric:
    """A Metric: NAME (births; None in data sent by alias), DATATYPE, VALUE (None: is_null)."""
    m = pb.Payload.Metric(datatype=int(datatype))
    if name is not None:
        m.name = name
    if alias is not None:
        m.alias = alias
    if timestamp is not None:
        m.timestamp = timestamp
    set_value(m, datatype, value)
    if properties:
        set_properties(m.properties, properties)
    return m


def set_value(m: pb.Payload.Metric, datatype: DataType, value: MetricValue) -> None:
    """Store VALUE in M's oneof field for DATATYPE (None: ``is_null``); PayloadError if unfit."""
    if value is None:
        m.is_null = True
        m.ClearField("value")
        return
    field = VALUE_FIELD.get(datatype)
    if field is None or field in ("dataset_value", "template_value"):
        raise PayloadError(f"datatype {datatype.name} is not supported by set_value")
    if isinstance(value, bool) != (datatype == DataType.Boolean):
        raise PayloadError(f"{value!r} is not a {datatype.name}")
    if datatype in _SIGNED_BITS or datatype in _UNSIGNED_BITS:
        if not isinstance(value, int):
            raise PayloadError(f"{value!r} is not a {datatype.name}")
        setattr(m, field, _to_wire_int(datatype, value))
    elif field in ("float_value", "double_value"):
        if not isinstance(value, (int, float)):
            raise PayloadError(f"{value!r} is not a {datatype.name}")
        setattr(m, field, float(value))
    elif field == "string_value":
        if not isinstance(value, str):
            raise PayloadError(f"{value!r} is not a {datatype.name}")
        m.string_value = value
    elif field == "bytes_value":
        if not isinstance(value, bytes):
            raise PayloadError(f"{value!r} is not {datatype.name} bytes")
        m.bytes_value = value
    else:
        m.boolean_value = bool(value)


def _to_wire_int(datatype: DataType, value: int) -> int:
    bits = _SIGNED_BITS.get(datatype)
    if bits is not None:
        if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
            raise PayloadError(f"{value} is out of range for {datatype.name}")
        # Two's complement, sign-extended to the field's width (uint32 or uint64), as Tahu does.
        return value & (0xFFFF_FFFF if bits <= 32 else 0xFFFF_FFFF_FFFF_FFFF)
    bits = _UNSIGNED_BITS[datatype]
    if not 0 <= value < 1 << bits:
        raise PayloadError(f"{value} is out of range for {datatype.name}")
    return value


def value_of(m: pb.Payload.Metric, datatype: int | None = None) -> MetricValue:
    """M's value read as DATATYPE (default: M's own ``datatype``); None when ``is_null``.

    PayloadError when the value is in another oneof field than DATATYPE's, or DATATYPE is one
    this layer does not read (DataSet, Template, PropertySet...).
    """
    kind = m.datatype if datatype is None else datatype
    if m.is_null:
        return None
    field = VALUE_FIELD.get(kind)
    which = m.WhichOneof("value")
    if field is None or field in ("dataset_value", "template_value"):
        raise PayloadError(f"datatype {kind} is not readable here")
    if which != field:
        raise PayloadError(f"datatype {_name(kind)} but the value is in {which or 'no field'}")
    if field in {"int_value", "long_value"}:
        raw: int = m.int_value if field == "int_value" else m.long_value
        bits = _SIGNED_BITS.get(DataType(kind))
        if bits is not None:
            raw &= (1 << bits) - 1
            return raw - (1 << bits) if raw >> (bits - 1) else raw
        return raw & ((1 << _UNSIGNED_BITS[DataType(kind)]) - 1)
    value: MetricValue = getattr(m, field)  # a float, bool, str or bytes field
    return value


def _name(kind: int) -> str:
    try:
        return DataType(kind).name
    except ValueError:
        return str(kind)


def set_properties(target: pb.Payload.PropertySet, values: Mapping[str, MetricValue]) -> None:
    """Add VALUES to the PropertySet TARGET: bool → Boolean, int → Int64, float → Double, str."""
    for key, value in values.items():
        target.keys.append(key)
        prop = target.values.add()
        if value is None:
            prop.type = DataType.String
            prop.is_null = True
        elif isinstance(value, bool):
            prop.type, prop.boolean_value = DataType.Boolean, value
        elif isinstance(value, int):
            prop.type, prop.long_value = DataType.Int64, _to_wire_int(DataType.Int64, value)
        elif isinstance(value, float):
            prop.type, prop.double_value = DataType.Double, value
        elif isinstance(value, str):
            prop.type, prop.string_value = DataType.String, value
        else:
            raise PayloadError(f"property {key!r}: {type(value).__name__} is not supported")


def bdseq_metric(bdseq: int, *, timestamp: int | None = None) -> pb.Payload.Metric:
    """The ``bdSeq`` metric (Int64, 0..255) for an NBIRTH or the NDEATH will."""
    if not 0 <= bdseq < SEQ_MODULUS:
        raise PayloadError(f"bdSeq {bdseq} is not in 0..255")
    return metric(BDSEQ, DataType.Int64, bdseq, timestamp=timestamp)


def bdseq_of(message: pb.Payload) -> int | None:
    """The ``bdSeq`` metric's value in MESSAGE (an NBIRTH or NDEATH), or None."""
    for m in message.metrics:
        if m.name == BDSEQ:
            try:
                value = value_of(m, m.datatype or DataType.Int64)
            except PayloadError:
                return None
            return value if isinstance(value, int) and not isinstance(value, bool) else None
    return None


def rebirth_request(timestamp: int | None = None) -> bytes:
    """The NCMD payload asking an edge node to rebirth: ``Node Control/Rebirth`` = true."""
    data: bytes = build([metric(REBIRTH, DataType.Boolean, True)], timestamp=timestamp)\
        .SerializeToString()
    return data


def is_rebirth_request(message: pb.Payload) -> bool:
    """Whether MESSAGE (an NCMD) asks for a rebirth."""
    return any(m.name == REBIRTH and m.WhichOneof("value") == "boolean_value"
               and m.boolean_value for m in message.metrics)
