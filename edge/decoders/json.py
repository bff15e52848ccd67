"""The ``json`` decoder: JSON objects, one sample per message or a block of them.

Values are located by paths: keys separated by '.', array elements by a non-negative index in
brackets (``accel.x``, ``values[0]``, ``data.channels[2].value``). ``array: values`` is the
compact form for a sample whose features are the elements of one array, in model order. Per-sample
timestamp and sequence and a top-level asset are optional. ``extra_fields: reject`` refuses any key
or array element the config does not read.

Paths are compiled once into ``operator.itemgetter`` chains, so the usual layouts (flat keys, one
nested object, one array) cost a call or two in C per sample; why a path could not be followed is
worked out only after the fast read failed.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from itertools import chain
from operator import itemgetter
from typing import Annotated, Any, Literal, NoReturn

import numpy as np
import orjson
from numpy.typing import NDArray
from pydantic import AfterValidator, Field, model_validator

from floorline.edge.decoders.base import (
    NUMBER_TYPES,
    UNIT_SECONDS,
    DecoderConfigBase,
    DecoderPlugin,
    Samples,
    TimestampUnit,
    check_asset,
    check_features,
    epoch_times,
    floats32,
    short,
)
from floorline.edge.errors import ConfigError, DecodeError

_SEQ_MAX = (1 << 64) - 1  # sequence numbers are uint64 (floorline.edge.stream.window.SEQ_MAX)

_PATH = re.compile(r"[^.\[\]]+(?:\[\d{1,9}\])*(?:\.[^.\[\]]+(?:\[\d{1,9}\])*)*")
_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")

Steps = tuple[str | int, ...]
"""A parsed path: object keys (str) and array indices (int)."""


def _check_path(value: str) -> str:
    if not _PATH.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a dotted path like 'data.accel_x' or 'data.values[0]' (keys "
            "separated by '.', array elements by a non-negative index in brackets)"
        )
    return value


JsonPath = Annotated[str, AfterValidator(_check_path)]
"""Keys separated by '.', array elements by ``[index]``: 'accel.x', 'data.channels[2].value'."""


def parse_path(text: str) -> Steps:
    """A valid path's steps: ``'data.v[2]'`` → ``('data', 'v', 2)``."""
    return tuple(int(index) if index else key for key, index in _STEP.findall(text))


def show_path(path: Steps) -> str:
    """PATH written as in a config: ``('data', 'v', 2)`` → ``'data.v[2]'``."""
    text = ""
    for step in path:
        if isinstance(step, int):
            text += f"[{step}]"
        else:
            text += f".{step}" if text else step
    return text


class JsonDecoderConfig(DecoderConfigBase):
    """JSON objects: one sample per message, or a block of samples under ``samples``."""

    type: Literal["json"] = Field(default="json", description="Selects the JSON decoder.")
    fields: dict[str, JsonPath] = Field(
        default_factory=dict,
        description="Feature name -> path inside a sample object: keys separated by '.', array "
        "elements by index, e.g. 'accel.x', 'values[0]', 'data.channels[2].value'. A feature not "
        "listed is read from the key of its own name.",
    )
    array: JsonPath | None = Field(
        default=None,
        description="Path of an array holding every feature, in the model's feature order: "
        "'values' reads {\"ts\": ..., \"values\": [x, y, z]}. Short for fields {<feature 0>: "
        "'values[0]', <feature 1>: 'values[1]', ...}; not together with fields.",
    )
    samples: JsonPath | None = Field(
        default=None,
        description="Path of the list of sample objects in block messages; null when the "
        "message itself is one sample object.",
    )
    timestamp: JsonPath | None = Field(
        default=None, description="Path of each sample's timestamp (epoch), if any."
    )
    timestamp_unit: TimestampUnit = Field(
        default="s",
        description="Unit of the timestamp: 's' or 'ms' since the epoch (only with timestamp).",
    )
    sequence: JsonPath | None = Field(
        default=None,
        description="Path of each sample's sequence number (a non-negative integer, "
        "consecutive inside a block), if any.",
    )
    asset: JsonPath | None = Field(
        default=None,
        description="Path of the asset name at the message's top level, used with the "
        "pipeline's asset: {payload: true} (and only then).",
    )
    extra_fields: Literal["reject", "ignore"] = Field(
        default="reject",
        description="What to do with a sample key or array element that is neither a feature "
        "nor the timestamp/sequence/asset: 'reject' the message (extra_field) or 'ignore' it.",
    )

    def has_sequence(self) -> bool:
        """Whether a sequence path is configured."""
        return self.sequence is not None

    def has_timestamps(self) -> bool:
        """Whether a timestamp path is configured."""
        return self.timestamp is not None

    def names_asset(self) -> bool:
        """Whether an asset path is configured."""
        return self.asset is not None

    @model_validator(mode="after")
    def _consistent(self) -> JsonDecoderConfig:
        # Each message names the key it is about, so the config error points at that line.
        if self.array is not None and self.fields:
            raise ValueError("array: set array (every feature) or fields, not both")
        if "timestamp_unit" in self.model_fields_set and self.timestamp is None:
            raise ValueError("timestamp_unit: set, but there is no timestamp path to apply it to")
        return self


def not_features(key: str, unknown: Sequence[str], features: Sequence[str]) -> str:
    """The config error for names in KEY that are not among the model's FEATURES."""
    guesses = {n: near[0] for n in unknown if (near := difflib.get_close_matches(n, features, 1))}
    if len(unknown) == 1:
        what = f"{unknown[0]!r} is not a feature"
        hint = f"; did you mean {guesses[unknown[0]]!r}?" if guesses else ""
    else:
        what = f"{', '.join(map(repr, unknown))} are not features"
        hint = "; did you mean " + ", ".join(f"{g!r} for {n!r}" for n, g in guesses.items()) + "?"
        hint = hint if guesses else ""
    return f"{key}: {what} of the model{hint} (features: {', '.join(features)})"


_Trie = dict[str | int, "_Trie | None"]  # a leaf (a value the config reads) is None


def _trie_insert(trie: _Trie, path: Steps, key: str, what: str) -> None:
    node = trie
    for depth, step in enumerate(path):
        if node and isinstance(next(iter(node)), int) != isinstance(step, int):
            # One value cannot be both an object and an array.
            raise ConfigError(
                f"{key}: path {show_path(path)!r} of {what} overlaps another path "
                f"({show_path(path[:depth])!r} read both as an object and as an array)"
            )
        last = depth == len(path) - 1
        if step not in node:
            node[step] = None if last else {}
            child = node[step]
        else:
            child = node[step]
            if last or child is None:
                # Two reads of one value, or a number that would also have to be an object.
                raise ConfigError(
                    f"{key}: path {show_path(path)!r} of {what} overlaps another path"
                )
        if child is not None:
            node = child


def _containers(trie: _Trie, path: Steps = ()) -> list[tuple[Steps, int]]:
    # Every object or array the config reads into, with how many members it reads there.
    found = [(path, len(trie))]
    for step, sub in trie.items():
        if sub is not None:
            found += _containers(sub, (*path, step))
    return found


def _extra_key(obj: Any, trie: _Trie, prefix: Steps = ()) -> Steps | None:
    if type(obj) is dict:
        members: Any = obj.items()
    elif type(obj) is list:
        members = enumerate(obj)
    else:
        return None
    for step, value in members:
        if step not in trie:
            return (*prefix, step)
        sub = trie[step]
        if sub is not None:
            found = _extra_key(value, sub, (*prefix, step))
            if found is not None:
                return found
    return None


def _dig(obj: Any, path: Steps) -> Any:
    for step in path:
        obj = obj[step]
    return obj


def _row_getter(paths: Sequence[Steps]) -> Callable[[Any], tuple[Any, ...]]:
    # itemgetter does the lookups in C: the common flat layout costs one call per sample, a
    # nested object or an array (`array: values`) two.
    if all(len(p) == 1 for p in paths):
        keys = [p[0] for p in paths]
        if len(keys) == 1:
            key = keys[0]
            return lambda obj: (obj[key],)
        return itemgetter(*keys)
    parent = paths[0][:-1]
    if all(p[:-1] == parent for p in paths):
        outer = _value_getter(parent)
        if len(paths) == 1:
            leaf = paths[0][-1]
            return lambda obj: (outer(obj)[leaf],)
        inner = itemgetter(*(p[-1] for p in paths))
        return lambda obj: inner(outer(obj))
    getters = [_value_getter(p) for p in paths]
    return lambda obj: tuple(get(obj) for get in getters)


def _value_getter(path: Steps) -> Callable[[Any], Any]:
    if len(path) == 1:
        return itemgetter(path[0])
    if len(path) == 2:  # two steps: two C calls beat a Python loop
        first, second = itemgetter(path[0]), itemgetter(path[1])
        return lambda obj: second(first(obj))
    return lambda obj: _dig(obj, path)


def _find(obj: Any, path: Steps) -> tuple[bool, Any]:
    for step in path:
        if isinstance(step, int):
            if type(obj) is not list or step >= len(obj):
                return False, None
        elif type(obj) is not dict or step not in obj:
            return False, None
        obj = obj[step]
    return True, obj


def _unfollowable(obj: Any, path: Steps) -> tuple[str, str] | None:
    """Why PATH cannot be followed in OBJ, as (reason, detail); None when it can."""
    for depth, step in enumerate(path):
        if isinstance(step, int):
            if type(obj) is not list:
                kind = type(obj).__name__
                return "malformed", f"{show_path(path[:depth])} is a {kind}, not an array"
            if step >= len(obj):
                where = show_path(path[:depth])
                return "missing_field", f"no {show_path(path)} ({where} has {len(obj)} elements)"
        elif type(obj) is not dict or step not in obj:
            return "missing_field", f"no {show_path(path)}"
        obj = obj[step]
    return None


class JsonDecoder:
    """Decodes JSON messages as configured by :class:`JsonDecoderConfig`."""

    def __init__(self, config: JsonDecoderConfig, features: Sequence[str]) -> None:
        names = check_features(features)
        unknown = [n for n in config.fields if n not in names]
        if unknown:
            raise ConfigError(not_features("decoder.fields", unknown, names))
        self._config = config
        self._names = names
        if config.array is not None:
            base = parse_path(config.array)
            self._paths: list[Steps] = [(*base, i) for i in range(len(names))]
            fields_key = "decoder.array"
        else:
            self._paths = [
                parse_path(config.fields[n]) if n in config.fields
                else parse_path(n) if _PATH.fullmatch(n) else (n,)
                for n in names
            ]
            fields_key = "decoder.fields"
        self._block = parse_path(config.samples) if config.samples else None
        self._ts = parse_path(config.timestamp) if config.timestamp else None
        self._seq = parse_path(config.sequence) if config.sequence else None
        self._asset = parse_path(config.asset) if config.asset else None
        self._ts_scale = UNIT_SECONDS[config.timestamp_unit]
        self._get = _row_getter(self._paths)
        self._get_ts = _value_getter(self._ts) if self._ts else None
        self._get_seq = _value_getter(self._seq) if self._seq else None

        # Every path a sample object may hold; extra_fields=reject refuses anything else.
        trie: _Trie = {}
        for name, path in zip(names, self._paths, strict=True):
            _trie_insert(trie, path, fields_key, f"feature {name!r}")
        if self._ts:
            _trie_insert(trie, self._ts, "decoder.timestamp", "the timestamp")
        if self._seq:
            _trie_insert(trie, self._seq, "decoder.sequence", "the sequence")
        if self._asset and self._block is None:  # a single sample object is also the top level
            _trie_insert(trie, self._asset, "decoder.asset", "the asset")
        if self._block and self._asset:
            # Whole paths, step by step: 'data.device' is beside 'data.samples', not inside it.
            asset, block = show_path(self._asset), show_path(self._block)
            if self._asset[: len(self._block)] == self._block:
                raise ConfigError(
                    f"decoder.asset: {asset!r} lies inside the samples path {block!r}; the "
                    "asset is read once per message, beside the samples"
                )
            if self._block[: len(self._asset)] == self._asset:
                raise ConfigError(
                    f"decoder.asset: {asset!r} holds the samples path {block!r}; the asset "
                    "must be a string beside the samples"
                )
        self._trie = trie
        # Every path in the trie is required, so once they were all found, a sample has an extra
        # key or element exactly when one of the objects or arrays the trie reads into has more
        # members than the trie: a len() per container per sample (one for the flat layout).
        containers = _containers(trie)
        self._top_keys = containers[0][1]
        self._inner_sizes = [(_value_getter(p), n) for p, n in containers[1:]]
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
                raise DecodeError("malformed", f"{show_path(self._block)} is not a list of samples")
            if not objs:
                raise DecodeError("malformed", "empty block")

        values = self._values(objs)
        timestamps = self._timestamps(objs) if self._get_ts else None
        first_seq = self._sequence(objs) if self._get_seq else None
        asset = None
        if self._asset:
            found, raw = _find(top, self._asset)
            if not found:
                raise DecodeError("bad_asset", f"no {show_path(self._asset)} in the message")
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
            self._diagnose_type(objs, rows)
        return floats32(flat, len(rows), "value")

    def _diagnose_missing(self, objs: list[Any]) -> NoReturn:
        for i, obj in enumerate(objs):
            if type(obj) is not dict:
                kind = type(obj).__name__
                raise DecodeError("malformed", f"sample {i} is a {kind}, not an object")
            for name, path in zip(self._names, self._paths, strict=True):
                why = _unfollowable(obj, path)
                if why is not None:
                    raise DecodeError(why[0], f"sample {i}: {why[1]} ({name})")
        raise DecodeError("malformed", "unreadable sample")

    def _diagnose_type(self, objs: list[Any], rows: list[tuple[Any, ...]]) -> NoReturn:
        # An index into a string reads a character: that is a payload of the wrong shape, not a
        # non-numeric value.
        for i, obj in enumerate(objs):
            for name, path in zip(self._names, self._paths, strict=True):
                why = _unfollowable(obj, path)
                if why is not None:
                    raise DecodeError(why[0], f"sample {i}: {why[1]} ({name})")
        for i, row in enumerate(rows):
            for name, value in zip(self._names, row, strict=True):
                if type(value) not in NUMBER_TYPES:
                    raise DecodeError(
                        "non_numeric", f"sample {i} {name}: {type(value).__name__} {short(value)}"
                    )
        raise DecodeError("non_numeric", "unreadable value")

    def _check_extra(self, objs: list[Any]) -> None:
        keys = self._top_keys
        if all(len(o) == keys for o in objs):
            inner = self._inner_sizes
            if not inner or all(len(get(o)) == n for o in objs for get, n in inner):
                return
        for i, obj in enumerate(objs):
            extra = _extra_key(obj, self._trie)
            if extra is not None:
                what = "element" if isinstance(extra[-1], int) else "key"
                raise DecodeError(
                    "extra_field", f"sample {i}: unexpected {what} {short(show_path(extra))}"
                )

    @staticmethod
    def _column(objs: list[Any], get: Callable[[Any], Any], path: Steps) -> list[Any]:
        try:
            return list(map(get, objs))
        except (KeyError, TypeError, IndexError):
            # Sample objects are known to be dicts here: say where the path breaks off.
            for obj in objs:
                why = _unfollowable(obj, path)
                if why is not None:
                    raise DecodeError(*why) from None
            raise DecodeError("missing_field", f"no {show_path(path)}") from None

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
        # Exact type: True is not a sequence number. uint64, as the windows and journal hold.
        if {int} != set(map(type, raw)) or min(raw) < 0 or max(raw) > _SEQ_MAX:
            bad = next((v for v in raw if type(v) is not int or not 0 <= v <= _SEQ_MAX), raw[0])
            raise DecodeError("bad_sequence", f"not an integer in [0, 2**64-1]: {short(bad)}")
        first: int = raw[0]
        # One C-level list comparison checks a whole block for contiguity; the counter may wrap
        # from 2**64-1 to 0 inside a block.
        n = len(raw)
        if (n > 1 and raw != list(range(first, first + n))
                and raw != [(first + i) & _SEQ_MAX for i in range(n)]):
            raise DecodeError("bad_sequence", "sequence numbers in the block are not consecutive")
        return first


PLUGIN = DecoderPlugin(
    type="json",
    config=JsonDecoderConfig,
    factory=lambda config, context: JsonDecoder(config, context.features),
)
