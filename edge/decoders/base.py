"""Payload bytes to samples: the first pipeline stage, one decoder per wire format.

A decoder turns one MQTT payload into :class:`Samples` (one sample, or a block of them) with the
columns in the model's feature order, or raises :class:`~floorline.edge.errors.DecodeError` with a
reason
code from :data:`REASONS`. Nothing else ever escapes ``decode``: the daemon dead-letters the
message by its reason and carries on, so a hostile or broken sensor cannot stop a pipeline.

Formats, selected by the config's ``type`` through :data:`DECODERS`:

- ``json``: an object per sample, or a list of them under a dotted path (a block); fields located by
  dotted paths, optional per-sample timestamp and sequence, optional asset at the top level;
- ``binary``: raw little-endian float32 or int16 arrays, samples row-major, optional header with the
  first sample's timestamp (and sequence number);
- ``csv``: one line per sample, columns named in the config.

Decoders are pure and hold no per-message state, so one instance serves a pipeline for its lifetime.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Annotated, Any, Literal, NoReturn, Protocol

import numpy as np
import orjson
from numpy.typing import NDArray
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from floorline.edge.errors import ConfigError, DecodeError

__all__ = [
    "DECODERS",
    "REASONS",
    "BinaryDecoder",
    "BinaryDecoderConfig",
    "CsvDecoder",
    "CsvDecoderConfig",
    "Decoder",
    "DecoderConfig",
    "JsonDecoder",
    "JsonDecoderConfig",
    "Samples",
    "check_asset",
    "make_decoder",
]

REASONS: frozenset[str] = frozenset(
    {
        "too_large",  # payload over the pipeline's size limit (checked by the daemon)
        "malformed",  # not the configured format at all
        "missing_field",
        "extra_field",
        "non_numeric",
        "non_finite",
        "wrong_length",
        "bad_timestamp",
        "bad_sequence",
        "bad_asset",
        "unroutable",  # no pipeline or asset for the topic (daemon)
        "too_many_assets",  # the windower's asset bound is reached
        "inference_failed",  # the backend failed on the batch holding this window (daemon)
    }
)
"""Every reason code any stage may give a DecodeError: a fixed set, so metrics stay bounded."""

_F32_MAX = float(np.finfo(np.float32).max)
_UNIT_SECONDS = {"s": 1.0, "ms": 1e-3}
_NUMBER_TYPES = frozenset({int, float})  # exact types: bool is an int subclass and is not a number
_DETAIL_MAX = 60
# Up to this many numbers, plain Python checks beat numpy's fixed cost per call; most messages
# carry one sample, where that fixed cost would dominate.
_SMALL = 32
# Assets end up in topic levels, metric labels and log lines: no MQTT wildcards or separators, no
# control characters, no leading '$' (reserved topics), no surrounding whitespace, at most 128.
_ASSET = re.compile(r"(?![\s$])[^/+#\x00-\x1f\x7f-\x9f]{1,128}(?<!\s)")
_RESERVED_ASSETS = frozenset({".", ".."})


@dataclass(slots=True)
class Samples:
    """One message's samples, columns in the model's feature order.

    ``values`` may be a read-only view of the payload (binary float32): copy before mutating.
    """

    values: NDArray[np.float32]
    """(n, F) raw units, n >= 1, columns in the model's feature order."""
    timestamps: NDArray[np.float64] | None
    """(n,) seconds since the epoch, or None when the format carries no time."""
    first_seq: int | None
    """Sequence number of ``values[0]``; sample i has ``first_seq + i``. None without sequence."""
    asset: str | None
    """The asset named by the payload when the asset key is a payload field, else None."""
    step: float | None = None
    """Seconds between consecutive timestamps when the format fixes it (binary blocks): the
    windower then checks only the step into the message, not each one inside it."""


class Decoder(Protocol):
    """Turns one payload into samples.

    Built once per pipeline with the decoder config and the model's feature names (in model order);
    construction raises ConfigError when the two do not fit. :meth:`decode` is then called for every
    message from one worker thread; it keeps no state between calls.
    """

    def decode(self, payload: bytes) -> Samples:
        """The samples in PAYLOAD; raises DecodeError (and nothing else) for any bad input."""
        ...


# --- helpers shared by the formats ---------------------------------------------------------------


def _short(value: object) -> str:
    # Details go to dead-letter topics and logs: never echo an unbounded piece of the payload.
    text = repr(value)
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 3] + "..."


def check_asset(value: object) -> str:
    """VALUE as an asset key, or DecodeError ``bad_asset``.

    A non-empty string of at most 128 characters without '/', '+', '#', control characters,
    surrounding whitespace or a leading '$', and not '.' or '..'.
    """
    if type(value) is str and _ASSET.fullmatch(value) and value not in _RESERVED_ASSETS:
        return value
    raise DecodeError("bad_asset", f"not a usable asset name: {_short(value)}")


def _check_features(features: Sequence[str]) -> tuple[str, ...]:
    names = tuple(features)
    if not names:
        raise ConfigError("a decoder needs at least one feature")
    if len(set(names)) != len(names):
        raise ConfigError(f"feature names must be unique, got {list(names)}")
    return names


def _floats32(flat: Sequence[float], n: int, what: str) -> NDArray[np.float32]:
    """FLAT (Python numbers, n rows of features, row-major) as an (n, F) float32 array.

    Raises ``non_finite`` for NaN, infinities and values beyond float32's range. The range check
    runs before the cast, so the cast never overflows (and never warns on the hot path).
    """
    if len(flat) <= _SMALL:
        if not all(map(_F32_MAX.__ge__, map(abs, flat))):  # NaN compares False, so it fails too
            bad = next(v for v in flat if not abs(v) <= _F32_MAX)
            raise DecodeError("non_finite", f"{what}: {_short(bad)}")
        return np.array(flat, dtype=np.float32).reshape(n, -1)
    values = np.fromiter(flat, dtype=np.float64, count=len(flat))
    ok = np.abs(values) <= _F32_MAX
    if not ok.all():
        raise DecodeError("non_finite", f"{what}: {_short(float(values[~ok][0]))}")
    return values.astype(np.float32).reshape(n, -1)


def _epoch_times(raw: Sequence[float], scale: float) -> NDArray[np.float64]:
    """RAW timestamps times SCALE as epoch seconds; ``bad_timestamp`` unless finite and >= 0."""
    # Negative epoch seconds are no real sensor's clock: treat them like NaN, not as a time.
    if len(raw) <= _SMALL:
        if not all(map(_is_epoch, raw)):
            bad = next(v for v in raw if not _is_epoch(v))
            raise DecodeError("bad_timestamp", f"not a finite epoch time: {_short(bad)}")
        times = np.array(raw, dtype=np.float64)
    else:
        times = np.fromiter(raw, dtype=np.float64, count=len(raw))
        ok = np.isfinite(times) & (times >= 0)
        if not ok.all():
            bad = float(times[~ok][0])
            raise DecodeError("bad_timestamp", f"not a finite epoch time: {_short(bad)}")
    if scale != 1.0:
        times *= scale
    return times


def _is_epoch(value: float) -> bool:
    return 0 <= value < math.inf


TimestampUnit = Literal["s", "ms"]


def _check_path(value: str) -> str:
    if not value or any(not part for part in value.split(".")):
        raise ValueError(f"{value!r} is not a dotted path like 'data.accel_x'")
    return value


DottedPath = Annotated[str, AfterValidator(_check_path)]
"""Keys separated by '.', e.g. 'data.accel.x'; a key that itself holds a '.' is not addressable."""


class _DecoderConfigBase(BaseModel):
    # Unknown keys are errors: a misspelt option must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --- JSON ----------------------------------------------------------------------------------------


class JsonDecoderConfig(_DecoderConfigBase):
    """JSON objects: one sample per message, or a block of samples under ``samples``."""

    type: Literal["json"] = Field(default="json", description="Selects the JSON decoder.")
    fields: dict[str, DottedPath] = Field(
        default_factory=dict,
        description="Feature name -> dotted path inside a sample object. A feature not listed is "
        "read from the key of its own name.",
    )
    samples: DottedPath | None = Field(
        default=None,
        description="Dotted path of the list of sample objects in block messages; null when the "
        "message itself is one sample object.",
    )
    timestamp: DottedPath | None = Field(
        default=None, description="Dotted path of each sample's timestamp (epoch), if any."
    )
    timestamp_unit: TimestampUnit = Field(
        default="s", description="Unit of the timestamp: 's' or 'ms' since the epoch."
    )
    sequence: DottedPath | None = Field(
        default=None,
        description="Dotted path of each sample's sequence number (a non-negative integer, "
        "consecutive inside a block), if any.",
    )
    asset: DottedPath | None = Field(
        default=None,
        description="Dotted path of the asset name at the message's top level; null when the "
        "asset comes from the topic.",
    )
    extra_fields: Literal["reject", "ignore"] = Field(
        default="reject",
        description="What to do with a sample key that is neither a feature nor the "
        "timestamp/sequence/asset: 'reject' the message (extra_field) or 'ignore' it.",
    )


_Trie = dict[str, "_Trie | None"]  # a leaf (a value the config reads) is None


def _trie_insert(trie: _Trie, path: tuple[str, ...], label: str) -> None:
    node = trie
    for depth, key in enumerate(path):
        last = depth == len(path) - 1
        if key not in node:
            node[key] = None if last else {}
            child = node[key]
        else:
            child = node[key]
            if last or child is None:
                # Two reads of one value, or a number that would also have to be an object.
                raise ConfigError(f"JSON path {'.'.join(path)!r} of {label} overlaps another path")
        if child is not None:
            node = child


def _extra_key(obj: dict[str, Any], trie: _Trie, prefix: str = "") -> str | None:
    for key, value in obj.items():
        if key not in trie:
            return prefix + key
        sub = trie[key]
        if sub is not None and type(value) is dict:
            found = _extra_key(value, sub, f"{prefix}{key}.")
            if found is not None:
                return found
    return None


def _dig(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _row_getter(paths: Sequence[tuple[str, ...]]) -> Callable[[Any], tuple[Any, ...]]:
    # itemgetter does the lookups in C: the common flat layout costs one call per sample.
    if all(len(p) == 1 for p in paths):
        keys = [p[0] for p in paths]
        if len(keys) == 1:
            key = keys[0]
            return lambda obj: (obj[key],)
        return itemgetter(*keys)
    return lambda obj: tuple(_dig(obj, p) for p in paths)


def _value_getter(path: tuple[str, ...]) -> Callable[[Any], Any]:
    if len(path) == 1:
        return itemgetter(path[0])
    return lambda obj: _dig(obj, path)


def _find(obj: Any, path: tuple[str, ...]) -> tuple[bool, Any]:
    for key in path:
        if type(obj) is not dict or key not in obj:
            return False, None
        obj = obj[key]
    return True, obj


class JsonDecoder:
    """Decodes JSON messages as configured by :class:`JsonDecoderConfig`."""

    def __init__(self, config: JsonDecoderConfig, features: Sequence[str]) -> None:
        names = _check_features(features)
        unknown = sorted(set(config.fields) - set(names))
        if unknown:
            raise ConfigError(
                f"json decoder: fields {unknown} are not features of the model "
                f"(features: {list(names)})"
            )
        self._config = config
        self._names = names
        self._paths = [tuple(config.fields.get(n, n).split(".")) for n in names]
        self._block = tuple(config.samples.split(".")) if config.samples else None
        self._ts = tuple(config.timestamp.split(".")) if config.timestamp else None
        self._seq = tuple(config.sequence.split(".")) if config.sequence else None
        self._asset = tuple(config.asset.split(".")) if config.asset else None
        self._ts_scale = _UNIT_SECONDS[config.timestamp_unit]
        self._get = _row_getter(self._paths)
        self._get_ts = _value_getter(self._ts) if self._ts else None
        self._get_seq = _value_getter(self._seq) if self._seq else None

        # Every path a sample object may hold; extra_fields=reject refuses anything else.
        trie: _Trie = {}
        for name, path in zip(names, self._paths, strict=True):
            _trie_insert(trie, path, f"feature {name!r}")
        if self._ts:
            _trie_insert(trie, self._ts, "timestamp")
        if self._seq:
            _trie_insert(trie, self._seq, "sequence")
        if self._asset and self._block is None:  # a single sample object is also the top level
            _trie_insert(trie, self._asset, "asset")
        if self._block and self._asset and self._asset[0] == self._block[0]:
            raise ConfigError("json decoder: the asset path lies inside the samples path")
        self._trie = trie
        # Every path in the trie is required, so once they were all found, a flat sample object
        # has an extra key exactly when it has more keys than the trie: a len() per sample.
        self._flat_keys = len(trie) if all(v is None for v in trie.values()) else None
        self._reject_extra = config.extra_fields == "reject"

    def decode(self, payload: bytes) -> Samples:
        """The samples in one JSON message; DecodeError on any bad input."""
        try:
            top = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            # orjson refuses literals beyond float64 (1e400) as it does NaN; the JSON is well formed
            # but the number is not finite, which is the more useful thing to tell the sensor owner.
            if "infinity" in str(exc):
                raise DecodeError("non_finite", "a number overflows float64") from None
            raise DecodeError("malformed", f"not JSON: {_short(str(exc))}") from None
        except RecursionError:  # defensive: orjson caps nesting itself today
            raise DecodeError("malformed", "nested too deeply") from None
        if type(top) is not dict:
            raise DecodeError("malformed", f"top level is a {type(top).__name__}, not an object")

        if self._block is None:
            objs: list[Any] = [top]
        else:
            found, objs = _find(top, self._block)
            if not found or type(objs) is not list:
                raise DecodeError("malformed", f"{'.'.join(self._block)} is not a list of samples")
            if not objs:
                raise DecodeError("malformed", "empty block")

        values = self._values(objs)
        timestamps = self._timestamps(objs) if self._get_ts else None
        first_seq = self._sequence(objs) if self._get_seq else None
        asset = None
        if self._asset:
            found, raw = _find(top, self._asset)
            if not found:
                raise DecodeError("bad_asset", f"no {'.'.join(self._asset)} in the message")
            asset = check_asset(raw)
        if self._reject_extra:  # last: it relies on every configured path having been found
            self._check_extra(objs)
        return Samples(values, timestamps, first_seq, asset)

    def _values(self, objs: list[Any]) -> NDArray[np.float32]:
        try:
            rows = list(map(self._get, objs))
        except (KeyError, TypeError, IndexError):
            self._diagnose_missing(objs)
        flat = rows[0] if len(rows) == 1 else list(chain.from_iterable(rows))
        if not _NUMBER_TYPES.issuperset(map(type, flat)):
            self._diagnose_type(rows)
        return _floats32(flat, len(rows), "value")

    def _diagnose_missing(self, objs: list[Any]) -> NoReturn:
        for i, obj in enumerate(objs):
            if type(obj) is not dict:
                kind = type(obj).__name__
                raise DecodeError("malformed", f"sample {i} is a {kind}, not an object")
            for name, path in zip(self._names, self._paths, strict=True):
                if not _find(obj, path)[0]:
                    raise DecodeError("missing_field", f"sample {i}: no {'.'.join(path)} ({name})")
        raise DecodeError("malformed", "unreadable sample")

    def _diagnose_type(self, rows: list[tuple[Any, ...]]) -> NoReturn:
        for i, row in enumerate(rows):
            for name, value in zip(self._names, row, strict=True):
                if type(value) not in _NUMBER_TYPES:
                    raise DecodeError(
                        "non_numeric", f"sample {i} {name}: {type(value).__name__} {_short(value)}"
                    )
        raise DecodeError("non_numeric", "unreadable value")

    def _check_extra(self, objs: list[Any]) -> None:
        keys = self._flat_keys
        if keys is not None and all(len(o) == keys for o in objs):
            return
        for i, obj in enumerate(objs):
            extra = _extra_key(obj, self._trie)
            if extra is not None:
                raise DecodeError("extra_field", f"sample {i}: unexpected key {_short(extra)}")

    @staticmethod
    def _column(objs: list[Any], get: Callable[[Any], Any], path: tuple[str, ...]) -> list[Any]:
        try:
            return list(map(get, objs))
        except (KeyError, TypeError, IndexError):
            # Sample objects are known to be dicts here, so the path itself is absent.
            raise DecodeError("missing_field", f"no {'.'.join(path)}") from None

    def _timestamps(self, objs: list[Any]) -> NDArray[np.float64]:
        assert self._get_ts is not None  # noqa: S101 - narrowed by the caller
        assert self._ts is not None  # noqa: S101
        raw = self._column(objs, self._get_ts, self._ts)
        if not _NUMBER_TYPES.issuperset(map(type, raw)):
            bad = next(v for v in raw if type(v) not in _NUMBER_TYPES)
            raise DecodeError("bad_timestamp", f"not a number: {_short(bad)}")
        return _epoch_times(raw, self._ts_scale)

    def _sequence(self, objs: list[Any]) -> int:
        assert self._get_seq is not None  # noqa: S101 - narrowed by the caller
        assert self._seq is not None  # noqa: S101
        raw = self._column(objs, self._get_seq, self._seq)
        if {int} != set(map(type, raw)) or raw[0] < 0:  # exact type: True is not a sequence number
            bad = next((v for v in raw if type(v) is not int or v < 0), raw[0])
            raise DecodeError("bad_sequence", f"not a non-negative integer: {_short(bad)}")
        first: int = raw[0]
        # One C-level list comparison checks a whole block for contiguity.
        if len(raw) > 1 and raw != list(range(first, first + len(raw))):
            raise DecodeError("bad_sequence", "sequence numbers in the block are not consecutive")
        return first


# --- binary --------------------------------------------------------------------------------------


class BinaryDecoderConfig(_DecoderConfigBase):
    """Raw little-endian arrays: samples row-major (features interleaved), optional header."""

    type: Literal["binary"] = Field(default="binary", description="Selects the binary decoder.")
    dtype: Literal["float32", "int16"] = Field(
        default="float32", description="Element type of the sample values."
    )
    scale: float = Field(
        default=1.0,
        description="Multiplied into int16 values to get the features' units (float32: must be 1).",
    )
    header: Literal["none", "timestamp", "timestamp_sequence"] = Field(
        default="none",
        description="'timestamp': the data starts after a float64 epoch-seconds timestamp of the "
        "first sample; 'timestamp_sequence': after that and a uint64 first sequence number.",
    )
    sample_interval_ms: float | None = Field(
        default=None,
        gt=0,
        description="Time between samples, giving every sample after the first its timestamp. "
        "Required with a timestamp header.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> BinaryDecoderConfig:
        if self.header != "none" and self.sample_interval_ms is None:
            raise ValueError("a timestamp header needs sample_interval_ms")
        if self.header == "none" and self.sample_interval_ms is not None:
            raise ValueError("sample_interval_ms needs a timestamp header")
        if self.dtype == "float32" and self.scale != 1.0:
            raise ValueError("scale applies to int16 data only")
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        # Checked here once so no scaled int16 can overflow float32 at run time.
        if abs(self.scale) * 32768 > _F32_MAX:
            raise ValueError("scale is so large that int16 values overflow float32")
        return self


_HEADER_BYTES = {"none": 0, "timestamp": 8, "timestamp_sequence": 16}
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "int16": np.dtype("<i2")}


class BinaryDecoder:
    """Decodes raw binary messages as configured by :class:`BinaryDecoderConfig`."""

    def __init__(self, config: BinaryDecoderConfig, features: Sequence[str]) -> None:
        self._features = len(_check_features(features))
        self._dtype = _WIRE_DTYPES[config.dtype]
        self._row_bytes = self._features * self._dtype.itemsize
        self._header = _HEADER_BYTES[config.header]
        self._has_seq = config.header == "timestamp_sequence"
        self._scale = np.float32(config.scale)
        self._int = config.dtype == "int16"
        self._interval_s = (config.sample_interval_ms or 0.0) / 1000.0
        self._offsets: dict[int, NDArray[np.float64]] = {}  # i * interval, by block length

    def decode(self, payload: bytes) -> Samples:
        """The samples in one binary message; DecodeError on any bad input."""
        data_bytes = len(payload) - self._header
        if data_bytes <= 0 or data_bytes % self._row_bytes:
            raise DecodeError(
                "wrong_length",
                f"{len(payload)} bytes is not a {self._header}-byte header plus a positive "
                f"multiple of {self._row_bytes}",
            )
        n = data_bytes // self._row_bytes
        raw = np.frombuffer(payload, dtype=self._dtype, offset=self._header).reshape(n, -1)
        if self._int:
            # Always finite: int16 is, and the config bounds the scale.
            values: NDArray[np.float32] = raw.astype(np.float32)
            if self._scale != 1:
                values *= self._scale
        else:
            # Zero-copy view of the payload; the windower copies it into its ring anyway.
            values = raw.astype(np.float32, copy=False)
            # One reduction instead of an isfinite array: a NaN or inf makes the sum non-finite,
            # and summed in float64 no count of finite float32 values can overflow.
            if not math.isfinite(np.add.reduce(values, axis=None, dtype=np.float64)):
                bad = float(values[~np.isfinite(values)][0])
                raise DecodeError("non_finite", f"value {bad}")
        timestamps = None
        first_seq = None
        if self._header:
            (start,) = struct.unpack_from("<d", payload, 0)
            if not 0 <= start < math.inf or not start + (n - 1) * self._interval_s < math.inf:
                raise DecodeError("bad_timestamp", f"header timestamp {start!r}")
            offsets = self._offsets.get(n)
            if offsets is None:
                offsets = np.arange(n, dtype=np.float64) * self._interval_s
                if len(self._offsets) < 64:  # a few block lengths in practice
                    self._offsets[n] = offsets
            timestamps = start + offsets
            if self._has_seq:
                (first_seq,) = struct.unpack_from("<Q", payload, 8)
        return Samples(values, timestamps, first_seq, None,
                       self._interval_s if timestamps is not None else None)


# --- CSV -----------------------------------------------------------------------------------------

_CSV_SPECIAL = ("timestamp", "sequence", "asset")


class CsvDecoderConfig(_DecoderConfigBase):
    """Delimited text: one line per sample (several lines make a block), no header, no quoting."""

    type: Literal["csv"] = Field(default="csv", description="Selects the CSV decoder.")
    columns: list[str] = Field(
        min_length=1,
        description="What each column holds, in order: a feature name, 'timestamp', 'sequence', "
        "'asset', or '_' for a column to ignore. Every feature appears exactly once.",
    )
    delimiter: str = Field(
        default=",", min_length=1, max_length=1, description="The one-character column separator."
    )
    timestamp_unit: TimestampUnit = Field(
        default="s", description="Unit of the timestamp column: 's' or 'ms' since the epoch."
    )

    @model_validator(mode="after")
    def _consistent(self) -> CsvDecoderConfig:
        named = [c for c in self.columns if c != "_"]
        repeated = sorted({c for c in named if named.count(c) > 1})
        if repeated:
            raise ValueError(f"columns {repeated} appear more than once")
        if self.delimiter in "\r\n\"'" or self.delimiter.isalnum() or self.delimiter in ".-+_":
            raise ValueError(f"delimiter {self.delimiter!r} would collide with the data")
        return self


class CsvDecoder:
    """Decodes CSV lines as configured by :class:`CsvDecoderConfig`."""

    def __init__(self, config: CsvDecoderConfig, features: Sequence[str]) -> None:
        names = _check_features(features)
        clash = sorted(set(names) & {*_CSV_SPECIAL, "_"})
        if clash:
            raise ConfigError(f"csv decoder: features named {clash} clash with reserved columns")
        known = {*names, *_CSV_SPECIAL, "_"}
        unknown = [c for c in config.columns if c not in known]
        if unknown:
            raise ConfigError(
                f"csv decoder: columns {unknown} are not features of the model "
                f"(features: {list(names)}) nor timestamp/sequence/asset/_"
            )
        missing = [n for n in names if n not in config.columns]
        if missing:
            raise ConfigError(f"csv decoder: features {missing} have no column")
        index = {c: i for i, c in enumerate(config.columns)}
        self._names = names
        self._feature_cols = [index[n] for n in names]
        cols = self._feature_cols
        self._get: Callable[[list[str]], tuple[str, ...]] = (
            itemgetter(*cols) if len(cols) > 1 else lambda row: (row[cols[0]],)
        )
        self._ts_col = index.get("timestamp")
        self._seq_col = index.get("sequence")
        self._asset_col = index.get("asset")
        self._ncols = len(config.columns)
        self._delimiter = config.delimiter
        self._ts_scale = _UNIT_SECONDS[config.timestamp_unit]

    def decode(self, payload: bytes) -> Samples:
        """The samples in one CSV message; DecodeError on any bad input."""
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("malformed", "not UTF-8 text") from None
        # Blank lines (a trailing newline, CRLF endings) carry nothing; any other line is a sample.
        lines = [line for line in text.replace("\r", "").split("\n") if line]
        if not lines:
            raise DecodeError("malformed", "no lines")
        d = self._delimiter
        cells = [line.split(d) for line in lines]
        for i, row in enumerate(cells):
            if len(row) != self._ncols:
                raise DecodeError(
                    "wrong_length", f"line {i} has {len(row)} columns, expected {self._ncols}"
                )
        # Numbers are parsed by float() under map, in C, one pass over the payload; never via a
        # fixed-width numpy string array, whose size one long cell could inflate n-fold.
        n = len(cells)
        try:
            flat = list(map(float, chain.from_iterable(map(self._get, cells))))
        except ValueError:
            self._diagnose_number(cells)
        timestamps = None
        if self._ts_col is not None:
            try:
                raw = list(map(float, map(itemgetter(self._ts_col), cells)))
            except ValueError:
                raise DecodeError("bad_timestamp", "not a number") from None
            timestamps = _epoch_times(raw, self._ts_scale)
        first_seq = None
        if self._seq_col is not None:
            first_seq = _csv_sequence([row[self._seq_col] for row in cells])
        asset = None
        if self._asset_col is not None:
            names = {row[self._asset_col] for row in cells}
            if len(names) != 1:
                raise DecodeError("bad_asset", "one message names several assets")
            asset = check_asset(names.pop())
        return Samples(_floats32(flat, n, "value"), timestamps, first_seq, asset)

    def _diagnose_number(self, cells: list[list[str]]) -> NoReturn:
        for i, row in enumerate(cells):
            for name, col in zip(self._names, self._feature_cols, strict=True):
                if not _parses(row[col]):
                    raise DecodeError("non_numeric", f"line {i} {name}: {_short(row[col])}")
        raise DecodeError("non_numeric", "unreadable value")


def _parses(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _csv_sequence(column: list[str]) -> int:
    try:
        # int() under map is C code; comparing with the expected run checks contiguity at once.
        run = list(map(int, column))
    except ValueError:
        raise DecodeError("bad_sequence", "not an integer") from None
    first = run[0]
    if first < 0:
        raise DecodeError("bad_sequence", f"negative: {first}")
    if len(run) > 1 and run != list(range(first, first + len(run))):
        raise DecodeError("bad_sequence", "sequence numbers are not consecutive")
    return first


# --- registry ------------------------------------------------------------------------------------

DecoderConfig = Annotated[
    JsonDecoderConfig | BinaryDecoderConfig | CsvDecoderConfig, Field(discriminator="type")
]
"""Any decoder config, chosen by its ``type`` key."""

DECODERS: dict[str, Callable[[Any, Sequence[str]], Decoder]] = {
    "json": JsonDecoder,
    "binary": BinaryDecoder,
    "csv": CsvDecoder,
}
"""Every decoder, by the ``type`` its config names."""


def make_decoder(
    config: JsonDecoderConfig | BinaryDecoderConfig | CsvDecoderConfig, features: Sequence[str]
) -> Decoder:
    """The decoder CONFIG selects, for a model with FEATURES (names in model order).

    Raises ConfigError when the config does not fit the features.
    """
    factory = DECODERS.get(config.type)
    if factory is None:  # only reachable with a config class that was never registered
        raise ConfigError(f"unknown decoder type {config.type!r}; known: {sorted(DECODERS)}")
    return factory(config, features)
