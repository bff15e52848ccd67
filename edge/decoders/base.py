"""What every decoder shares: the samples record, the protocol, the plugin record, the checks.

A decoder turns one MQTT payload into :class:`Samples` (one sample, or a block of them) with the
columns in the model's feature order, or raises :class:`~floorline.edge.errors.DecodeError` with a
reason code from :data:`REASONS`. Nothing else ever escapes ``decode``: the pipeline dead-letters
the message by its reason and carries on, so a hostile or broken sensor cannot stop a pipeline.
Each wire format is one module beside this one (see ``decoders/__init__.py``).
"""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray
from pydantic import AfterValidator, BaseModel, ConfigDict

from floorline.edge.errors import ConfigError, DecodeError
from floorline.edge.messages import Outbound

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
        "internal_error",  # an unexpected error in the worker on this message or window (daemon)
        # Sparkplug B (decoders/sparkplug.py); the last three also ask the node for a rebirth.
        "sparkplug_bad_topic",  # not an spBv1.0 topic of a known message type
        "sparkplug_bad_payload",  # not a Sparkplug B protobuf payload, or one the spec forbids
        "sparkplug_wrong_type",  # a feature's metric is not a number (or not of its datatype)
        "sparkplug_no_birth",  # data from a node or device whose birth certificate is unknown
        "sparkplug_unknown_alias",  # a metric alias or name its birth certificate did not define
        "sparkplug_seq_gap",  # the node's seq skipped: messages from it were lost
    }
)
"""Every reason code any stage may give a DecodeError: a fixed set, so metrics stay bounded."""

F32_MAX = float(np.finfo(np.float32).max)
UNIT_SECONDS = {"s": 1.0, "ms": 1e-3}
NUMBER_TYPES = frozenset({int, float})  # exact types: bool is an int subclass and is not a number
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

    Built once per pipeline by its plugin's factory, from the decoder config and a
    :class:`DecoderContext`; construction raises ConfigError when the two do not fit. ``decode`` is
    then called for every message, in arrival order, from the pipeline's one worker thread, so a
    decoder may keep state between calls without locks (Sparkplug B keeps the alias tables its
    birth certificates announce).
    """

    def decode(self, payload: bytes, topic: str = "") -> Samples | None:
        """The samples in PAYLOAD (which arrived on TOPIC), or None.

        None means the message was understood but carries no samples (a birth certificate, say).
        Any bad input raises DecodeError, and nothing else escapes.
        """
        ...


@dataclass(frozen=True)
class DecoderContext:
    """What a decoder is built for."""

    features: tuple[str, ...]
    """The model's feature names, in model order: the columns of every :class:`Samples`."""
    pipeline: str = ""
    """The pipeline's name, for messages."""
    send: Callable[[Sequence[Outbound]], None] | None = None
    """The gateway's one publish path, for a decoder that must answer its senders (Sparkplug B
    asks an edge node for a rebirth); called on the worker thread. None: nothing may be sent."""


class DecoderConfigBase(BaseModel):
    """Base of every decoder's config model: strict, immutable, selected by ``type``."""

    # Unknown keys are errors: a misspelt option must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    type: str

    def has_sequence(self) -> bool:
        """Whether decoded samples carry sequence numbers (``ack: durable`` needs them)."""
        return False

    def names_asset(self) -> bool:
        """Whether the payload names the asset (so ``asset: {payload: true}`` can be used)."""
        return False

    def has_timestamps(self) -> bool | None:
        """Whether decoded samples carry timestamps (``window.max_gap_s`` needs them).

        None: the decoder cannot tell from its config (then no window option is refused).
        """
        return None


@dataclass(frozen=True)
class DecoderPlugin:
    """What a decoder module declares as ``PLUGIN`` (see :mod:`floorline.edge.plugins`)."""

    type: str
    config: builtins.type[DecoderConfigBase]  # the field above shadows the builtin
    factory: Callable[[Any, DecoderContext], Decoder]


# --- helpers shared by the formats ---------------------------------------------------------------


def short(value: object) -> str:
    """VALUE's repr, cut to a bounded length (details go to dead letters and logs)."""
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
    raise DecodeError("bad_asset", f"not a usable asset name: {short(value)}")


def check_features(features: Sequence[str]) -> tuple[str, ...]:
    """FEATURES as a tuple; ConfigError when empty or repeated."""
    names = tuple(features)
    if not names:
        raise ConfigError("a decoder needs at least one feature")
    if len(set(names)) != len(names):
        raise ConfigError(f"feature names must be unique, got {list(names)}")
    return names


def floats32(flat: Sequence[float], n: int, what: str) -> NDArray[np.float32]:
    """FLAT (Python numbers, n rows of features, row-major) as an (n, F) float32 array.

    Raises ``non_finite`` for NaN, infinities and values beyond float32's range. The range check
    runs before the cast, so the cast never overflows (and never warns on the hot path).
    """
    if len(flat) <= _SMALL:
        if not all(map(F32_MAX.__ge__, map(abs, flat))):  # NaN compares False, so it fails too
            bad = next(v for v in flat if not abs(v) <= F32_MAX)
            raise DecodeError("non_finite", f"{what}: {short(bad)}")
        return np.array(flat, dtype=np.float32).reshape(n, -1)
    values = np.fromiter(flat, dtype=np.float64, count=len(flat))
    ok = np.abs(values) <= F32_MAX
    if not ok.all():
        raise DecodeError("non_finite", f"{what}: {short(float(values[~ok][0]))}")
    return values.astype(np.float32).reshape(n, -1)


def epoch_times(raw: Sequence[float], scale: float) -> NDArray[np.float64]:
    """RAW timestamps times SCALE as epoch seconds; ``bad_timestamp`` unless finite and >= 0."""
    # Negative epoch seconds are no real sensor's clock: treat them like NaN, not as a time.
    if len(raw) <= _SMALL:
        if not all(map(_is_epoch, raw)):
            bad = next(v for v in raw if not _is_epoch(v))
            raise DecodeError("bad_timestamp", f"not a finite epoch time: {short(bad)}")
        times = np.array(raw, dtype=np.float64)
    else:
        times = np.fromiter(raw, dtype=np.float64, count=len(raw))
        ok = np.isfinite(times) & (times >= 0)
        if not ok.all():
            bad = float(times[~ok][0])
            raise DecodeError("bad_timestamp", f"not a finite epoch time: {short(bad)}")
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
