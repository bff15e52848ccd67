"""The ``json`` decoder: JSON objects, one sample per message or a block of them.

Fields are located by dotted paths; per-sample timestamp and sequence and a top-level asset are
optional. ``extra_fields: reject`` refuses any key the config does not read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import chain
from operator import itemgetter
from typing import Any, Literal, NoReturn

import numpy as np
import orjson
from numpy.typing import NDArray
from pydantic import Field

from floorline.edge.decoders.base import (
    NUMBER_TYPES,
    UNIT_SECONDS,
    DecoderConfigBase,
    DecoderPlugin,
    DottedPath,
    Samples,
    TimestampUnit,
    check_asset,
    check_features,
    epoch_times,
    floats32,
    short,
)
from floorline.edge.errors import ConfigError, DecodeError


class JsonDecoderConfig(DecoderConfigBase):
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

    def has_sequence(self) -> bool:
        """Whether a sequence path is configured."""
        return self.sequence is not None

    def names_asset(self) -> bool:
        """Whether an asset path is configured."""
        return self.asset is not None


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
        names = check_features(features)
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
        self._ts_scale = UNIT_SECONDS[config.timestamp_unit]
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

    def decode(self, payload: bytes, topic: str = "") -> Samples:  # noqa: ARG002 - protocol
        """The samples in one JSON message; DecodeError on any bad input."""
        try:
            top = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            # orjson refuses literals beyond float64 (1e400) as it does NaN; the JSON is well formed
            # but the number is not finite, which is the more useful thing to tell the sensor owner.
            if "infinity" in str(exc):
                raise DecodeError("non_finite", "a number overflows float64") from None
            raise DecodeError("malformed", f"not JSON: {short(str(exc))}") from None
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
        if not NUMBER_TYPES.issuperset(map(type, flat)):
            self._diagnose_type(rows)
        return floats32(flat, len(rows), "value")

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
                if type(value) not in NUMBER_TYPES:
                    raise DecodeError(
                        "non_numeric", f"sample {i} {name}: {type(value).__name__} {short(value)}"
                    )
        raise DecodeError("non_numeric", "unreadable value")

    def _check_extra(self, objs: list[Any]) -> None:
        keys = self._flat_keys
        if keys is not None and all(len(o) == keys for o in objs):
            return
        for i, obj in enumerate(objs):
            extra = _extra_key(obj, self._trie)
            if extra is not None:
                raise DecodeError("extra_field", f"sample {i}: unexpected key {short(extra)}")

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
        if not NUMBER_TYPES.issuperset(map(type, raw)):
            bad = next(v for v in raw if type(v) not in NUMBER_TYPES)
            raise DecodeError("bad_timestamp", f"not a number: {short(bad)}")
        return epoch_times(raw, self._ts_scale)

    def _sequence(self, objs: list[Any]) -> int:
        assert self._get_seq is not None  # noqa: S101 - narrowed by the caller
        assert self._seq is not None  # noqa: S101
        raw = self._column(objs, self._get_seq, self._seq)
        if {int} != set(map(type, raw)) or raw[0] < 0:  # exact type: True is not a sequence number
            bad = next((v for v in raw if type(v) is not int or v < 0), raw[0])
            raise DecodeError("bad_sequence", f"not a non-negative integer: {short(bad)}")
        first: int = raw[0]
        # One C-level list comparison checks a whole block for contiguity.
        if len(raw) > 1 and raw != list(range(first, first + len(raw))):
            raise DecodeError("bad_sequence", "sequence numbers in the block are not consecutive")
        return first


PLUGIN = DecoderPlugin(
    type="json",
    config=JsonDecoderConfig,
    factory=lambda config, context: JsonDecoder(config, context.features),
)
