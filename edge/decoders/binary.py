"""The ``binary`` decoder: raw little-endian float32 or int16 arrays, samples row-major.

An optional header holds the first sample's timestamp (float64 epoch seconds) and sequence number
(uint64); later samples' times follow from ``sample_interval_ms``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import Field, model_validator

from floorline.edge.decoders.base import (
    F32_MAX,
    DecoderConfigBase,
    DecoderPlugin,
    Samples,
    check_features,
)
from floorline.edge.errors import DecodeError


class BinaryDecoderConfig(DecoderConfigBase):
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

    def has_sequence(self) -> bool:
        """Whether the header carries sequence numbers."""
        return self.header == "timestamp_sequence"

    def has_timestamps(self) -> bool:
        """Whether a header carries the first sample's time."""
        return self.header != "none"

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
        if abs(self.scale) * 32768 > F32_MAX:
            raise ValueError("scale is so large that int16 values overflow float32")
        return self


_HEADER_BYTES = {"none": 0, "timestamp": 8, "timestamp_sequence": 16}
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "int16": np.dtype("<i2")}


class BinaryDecoder:
    """Decodes raw binary messages as configured by :class:`BinaryDecoderConfig`."""

    def __init__(self, config: BinaryDecoderConfig, features: Sequence[str]) -> None:
        self._features = len(check_features(features))
        self._dtype = _WIRE_DTYPES[config.dtype]
        self._row_bytes = self._features * self._dtype.itemsize
        self._header = _HEADER_BYTES[config.header]
        self._has_seq = config.header == "timestamp_sequence"
        self._scale = np.float32(config.scale)
        self._int = config.dtype == "int16"
        self._interval_s = (config.sample_interval_ms or 0.0) / 1000.0
        self._offsets: dict[int, NDArray[np.float64]] = {}  # i * interval, by block length

    def decode(self, payload: bytes, topic: str = "") -> Samples:  # noqa: ARG002 - protocol
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
            # and summed in float64 no count of finite float32 values can overflow. (inf + -inf
            # is NaN, which numpy would warn about: that is the answer sought, not a problem.)
            with np.errstate(invalid="ignore"):
                total = np.add.reduce(values, axis=None, dtype=np.float64)
            if not math.isfinite(total):
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


PLUGIN = DecoderPlugin(
    type="binary",
    config=BinaryDecoderConfig,
    factory=lambda config, context: BinaryDecoder(config, context.features),
)
