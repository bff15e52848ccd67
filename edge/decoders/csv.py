"""The ``csv`` decoder: delimited text, one line per sample, columns named in the config."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from itertools import chain
from operator import itemgetter
from typing import Literal, NoReturn

from pydantic import Field, model_validator

from floorline.edge.decoders.base import (
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

_CSV_SPECIAL = ("timestamp", "sequence", "asset")


class CsvDecoderConfig(DecoderConfigBase):
    """Delimited text: one line per sample (several lines make a block), no header, no quoting."""

    type: Literal["csv"] = Field(default="csv", description="Selects the CSV decoder.")
    columns: list[str] = Field(
        min_length=1,
        description="What each column holds, in order: a feature name, 'timestamp', 'sequence', "
        "'asset' (used with the pipeline's asset: {payload: true}, and only then), or '_' for a "
        "column to ignore. Every feature appears exactly once.",
    )
    delimiter: str = Field(
        default=",", min_length=1, max_length=1, description="The one-character column separator."
    )
    timestamp_unit: TimestampUnit = Field(
        default="s",
        description="Unit of the timestamp column: 's' or 'ms' since the epoch (only with a "
        "timestamp column).",
    )

    def has_sequence(self) -> bool:
        """Whether a column holds sequence numbers."""
        return "sequence" in self.columns

    def has_timestamps(self) -> bool:
        """Whether a column holds timestamps."""
        return "timestamp" in self.columns

    def names_asset(self) -> bool:
        """Whether a column holds the asset."""
        return "asset" in self.columns

    @model_validator(mode="after")
    def _consistent(self) -> CsvDecoderConfig:
        named = [c for c in self.columns if c != "_"]
        repeated = sorted({c for c in named if named.count(c) > 1})
        # Each message names the key it is about, so the config error points at that line.
        if repeated:
            raise ValueError(f"columns: {repeated} appear more than once")
        if self.delimiter in "\r\n\"'" or self.delimiter.isalnum() or self.delimiter in ".-+_":
            raise ValueError(f"delimiter: {self.delimiter!r} would collide with the data")
        if "timestamp_unit" in self.model_fields_set and not self.has_timestamps():
            raise ValueError("timestamp_unit: set, but no column holds a timestamp")
        return self


class CsvDecoder:
    """Decodes CSV lines as configured by :class:`CsvDecoderConfig`."""

    def __init__(self, config: CsvDecoderConfig, features: Sequence[str]) -> None:
        names = check_features(features)
        clash = sorted(set(names) & {*_CSV_SPECIAL, "_"})
        if clash:
            raise ConfigError(
                f"decoder.columns: the model's features {clash} clash with the reserved column "
                "names timestamp/sequence/asset/_; the csv decoder cannot feed this model"
            )
        known = [*names, *_CSV_SPECIAL, "_"]
        unknown = [c for c in config.columns if c not in known]
        if unknown:
            near = {c: difflib.get_close_matches(c, known, 1) for c in unknown}
            hint = ", ".join(f"{g[0]!r} for {c!r}" for c, g in near.items() if g)
            hint = f"; did you mean {hint}?" if hint else ""
            raise ConfigError(
                f"decoder.columns: {', '.join(map(repr, unknown))} "
                f"{'is not a feature' if len(unknown) == 1 else 'are not features'} of the model "
                f"nor timestamp/sequence/asset/_{hint} (features: {', '.join(names)})"
            )
        missing = [n for n in names if n not in config.columns]
        if missing:
            raise ConfigError(
                f"decoder.columns: no column for the model's "
                f"{'feature' if len(missing) == 1 else 'features'} {', '.join(map(repr, missing))} "
                f"(features: {', '.join(names)}); every feature needs exactly one column"
            )
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
        self._ts_scale = UNIT_SECONDS[config.timestamp_unit]

    def decode(self, payload: bytes, topic: str = "") -> Samples:  # noqa: ARG002 - protocol
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
            timestamps = epoch_times(raw, self._ts_scale)
        first_seq = None
        if self._seq_col is not None:
            first_seq = _csv_sequence([row[self._seq_col] for row in cells])
        asset = None
        if self._asset_col is not None:
            names = {row[self._asset_col] for row in cells}
            if len(names) != 1:
                raise DecodeError("bad_asset", "one message names several assets")
            asset = check_asset(names.pop())
        return Samples(floats32(flat, n, "value"), timestamps, first_seq, asset)

    def _diagnose_number(self, cells: list[list[str]]) -> NoReturn:
        for i, row in enumerate(cells):
            for name, col in zip(self._names, self._feature_cols, strict=True):
                if not _parses(row[col]):
                    raise DecodeError("non_numeric", f"line {i} {name}: {short(row[col])}")
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


PLUGIN = DecoderPlugin(
    type="csv",
    config=CsvDecoderConfig,
    factory=lambda config, context: CsvDecoder(config, context.features),
)
