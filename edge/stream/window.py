"""Per-asset sliding windows over decoded samples: the second pipeline stage.

Each asset gets a preallocated ring buffer of ``size`` samples. Once ``size`` samples are held a
window is emitted, then one every ``hop`` samples (``hop == size``: tumbling windows). A window
never spans a discontinuity: a timestamp jump beyond ``max_gap_s``, time going backwards, or a
sequence jump beyond ``max_seq_gap`` empties the asset's buffer before the sample after the gap,
whether the gap falls between two messages or inside one block. Samples whose sequence number was
already seen (QoS 1 redelivery) are dropped and counted.

Sequence numbers are unsigned 64-bit counters (the binary header's uint64), so they wrap: the
number after 2**64 - 1 is 0, and every distance between two of them is taken modulo 2**64, the
short way round (RFC 1982 serial-number arithmetic). A jump of 2**63 or more forward therefore
reads as a jump backwards, a device restart or a redelivery. A number outside [0, 2**64 - 1] is
refused (``bad_sequence``), whatever decoder produced it.

Blocks are copied into the ring with slice assignments, never sample by sample; Python loops run
once per emitted window or per gap inside a block.

Window counters (a prediction's ``seq``) are kept apart from the samples: they never go backwards
for an asset, while the samples are dropped at every discontinuity. ``seed`` gives each asset a
*floor*, a counter above every one already used (the daemon's own after a configuration switch;
after a restart the outbox's reservation, stored with the predictions in their transaction, see
``floorline.edge.delivery.outbox``). A new asset starts at its floor. An asset restored from the
window journal (``ack: durable``) keeps its journaled counter, lower than the floor when
predictions were published after the journal was saved: the broker redelivers the input since,
in order, and those windows are rebuilt with the numbers they were published with, resets
included, so a consumer recognises them as repeats. That is why a reset does not jump to the
floor: a gap the first run saw comes back in the replay, and windows after it must keep their
numbers too. The price is paid only by a broker that redelivers out of order (nats-server, see
docs/reliability.md): there the few windows rebuilt after the crash can reuse the numbers of
windows published just before it.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from floorline.edge.decoders.base import Samples
from floorline.edge.errors import ConfigError, DecodeError

__all__ = ["RESET_CAUSES", "SEQ_MAX", "Window", "WindowConfig", "Windower"]

RESET_CAUSES = ("time_gap", "time_backwards", "seq_gap", "seq_restart")
"""Why an asset's buffer was emptied; the keys of :attr:`Windower.resets`."""

SEQ_MAX = (1 << 64) - 1
"""The largest sequence number; the next one is 0."""
_SEQ_HALF = 1 << 63


@dataclass(slots=True)
class Window:
    """``size`` consecutive samples of one asset, ready for the model."""

    asset: str
    values: NDArray[np.float32]
    """(size, F) raw units; a copy the caller owns."""
    start: float | None
    """Timestamp of the first sample (epoch seconds), if the format carries time."""
    end: float | None
    """Timestamp of the last sample."""
    received: float
    """The ``received`` (monotonic seconds) passed with the push that completed the window."""
    index: int
    """Per-asset window counter from 0 (or the asset's floor, see :meth:`Windower.seed`); gaps
    do not reset it, and it never goes backwards but to rebuild windows already published."""


class WindowConfig(BaseModel):
    """How samples become windows; the window size itself comes from the model's manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    hop: int | None = Field(
        default=None,
        ge=1,
        description="Samples between the starts of consecutive windows (1..window size); null "
        "means the window size (tumbling windows, no overlap).",
    )
    max_gap_s: float | None = Field(
        default=5.0,
        gt=0,
        description="A timestamp jump between consecutive samples larger than this (seconds) "
        "starts the asset's window afresh; null disables the check. Time going backwards always "
        "starts afresh. The default, 5 s, catches outages in any stream and suits streams down "
        "to one sample every few seconds, jitter included; set a few sample intervals for fast "
        "streams (0.05 at 1 kHz) and more for slower ones. Only with timestamps in the input.",
    )
    max_seq_gap: int | None = Field(
        default=1,
        ge=1,
        description="A sequence-number jump larger than this starts the asset's window afresh "
        "(1: any lost sample does); null disables the check.",
    )
    max_seq_rewind: int | None = Field(
        default=10000,
        ge=1,
        description="A sequence number at least this far below the last one seen is a device "
        "restart (its counter started over): the window starts afresh instead of the samples "
        "being dropped as duplicates. Null: always duplicates.",
    )
    max_assets: int = Field(
        default=10000,
        ge=1,
        description="Assets tracked at most; a message for one more is refused "
        "(too_many_assets) so an unbounded set of asset keys cannot exhaust memory.",
    )


class _AssetState:
    """One asset's ring buffer and stream position."""

    __slots__ = ("head", "index", "last_seq", "last_ts", "ring", "times", "until_emit")

    def __init__(self, size: int, features: int) -> None:
        self.ring = np.empty((size, features), dtype=np.float32)
        # NaN marks a sample without time, so a window's start/end can say "unknown".
        self.times = np.full(size, np.nan, dtype=np.float64)
        self.head = 0  # ring slot of the next sample
        self.until_emit = size  # samples still needed before the next window
        self.last_ts: float | None = None
        self.last_seq: int | None = None
        self.index = 0

    def clear(self, size: int) -> None:
        # Emptying is bookkeeping only: slots are overwritten before a window can read them again.
        self.head = 0
        self.until_emit = size


def _time(value: float) -> float | None:
    return None if math.isnan(value) else value


class Windower:
    """Turns each asset's samples into fixed-size windows; one instance per pipeline.

    Not thread-safe: the pipeline's worker thread is its only caller.
    """

    def __init__(self, size: int, features: int, config: WindowConfig) -> None:
        if size < 1 or features < 1:
            raise ConfigError(f"window size {size} and features {features} must be >= 1")
        hop = size if config.hop is None else config.hop
        if not 1 <= hop <= size:
            raise ConfigError(f"window hop {hop} must be between 1 and the window size {size}")
        self._size = size
        self._features = features
        self._hop = hop
        self._max_gap = config.max_gap_s
        self._max_seq_gap = config.max_seq_gap
        self._max_rewind = config.max_seq_rewind
        self._max_assets = config.max_assets
        self._assets: dict[str, _AssetState] = {}
        self._floors: dict[str, int] = {}  # asset -> its lowest next counter (see ``seed``)
        self.resets: dict[str, int] = dict.fromkeys(RESET_CAUSES, 0)
        """Buffer resets so far, by cause (see :data:`RESET_CAUSES`)."""
        self.duplicates = 0
        """Samples dropped because their sequence number had been seen (QoS 1 redelivery)."""

    def push(self, asset: str, samples: Samples, received: float) -> list[Window]:
        """Add one message's SAMPLES for ASSET; return the windows they complete, oldest first.

        RECEIVED (monotonic seconds) is carried into those windows for latency accounting.
        Raises DecodeError ``too_many_assets`` for a new asset beyond ``max_assets``, and
        ``bad_sequence`` for a sequence number outside [0, 2**64 - 1].
        """
        values = samples.values
        if values.ndim != 2 or values.shape[1] != self._features:
            raise ValueError(f"samples of shape {values.shape}, expected (n, {self._features})")
        n = len(values)
        if n == 0:
            return []
        first_seq = samples.first_seq
        if first_seq is not None and not 0 <= first_seq <= SEQ_MAX:
            # Any decoder's numbers, not only the binary header's: a wider one cannot be journaled.
            what = "negative" if first_seq < 0 else f"{first_seq.bit_length()} bits"
            raise DecodeError("bad_sequence", f"{what}: not in [0, 2**64-1]")
        state = self._assets.get(asset)
        if state is None:
            if len(self._assets) >= self._max_assets:
                raise DecodeError("too_many_assets", f"already tracking {len(self._assets)}")
            state = self._assets[asset] = _AssetState(self._size, self._features)
            if self._floors:
                state.index = self._floors.get(asset, 0)
        times = samples.timestamps
        reset_cause: str | None = None  # why the buffer must be emptied before sample 0

        if first_seq is not None and state.last_seq is not None:
            # Samples at the front already seen (<= 0: a jump forward of 1 - behind), mod 2**64.
            behind = (state.last_seq + 1 - first_seq) & SEQ_MAX
            if behind >= _SEQ_HALF:
                behind -= SEQ_MAX + 1
            if self._max_rewind is not None and behind > self._max_rewind:
                reset_cause = "seq_restart"
            elif behind > 0:
                dropped = min(behind, n)
                self.duplicates += dropped
                if dropped == n:
                    return []
                values = values[dropped:]
                times = None if times is None else times[dropped:]
                first_seq = (first_seq + dropped) & SEQ_MAX
                n -= dropped
            elif self._max_seq_gap is not None and -behind >= self._max_seq_gap:
                reset_cause = "seq_gap"  # behind <= 0 means a jump of 1 - behind

        # Indices i where the buffer must be emptied before sample i (from time), with the cause.
        cuts: list[tuple[int, str]] = []
        if times is not None:
            cuts = self._time_cuts(state.last_ts, times, samples.step)
        if cuts and cuts[0][0] == 0:
            # One discontinuity before the first sample is one reset, whatever noticed it first.
            reset_cause = reset_cause or cuts[0][1]
            cuts = cuts[1:]
        if reset_cause is not None:
            self.resets[reset_cause] += 1
            state.clear(self._size)

        out: list[Window] = []
        if not cuts:
            self._append(asset, state, values, times, received, out)
        else:
            start = 0
            for cut, cause in cuts:
                seg_times = _slice(times, start, cut)
                self._append(asset, state, values[start:cut], seg_times, received, out)
                self.resets[cause] += 1
                state.clear(self._size)
                start = cut
            self._append(asset, state, values[start:], _slice(times, start, n), received, out)

        state.last_ts = None if times is None else float(times[-1])
        state.last_seq = None if first_seq is None else (first_seq + n - 1) & SEQ_MAX
        return out

    def seed(self, floors: dict[str, int]) -> None:
        """Raise each asset's floor to FLOORS[asset]: a window counter not used yet, nor any above.

        A new asset starts there. An asset with state keeps its own counter: a journaled
        (``ack: durable``) state rebuilds the windows published since it was saved with their
        old numbers (see the module docstring).
        Floors only rise. Call before ``push`` (the worker thread, or no thread, owns this).
        """
        own = self._floors
        for asset, floor in floors.items():
            if floor > own.get(asset, 0):
                own[asset] = floor

    def _time_cuts(
        self, last: float | None, times: NDArray[np.float64], step: float | None
    ) -> list[tuple[int, str]]:
        # Per message, so in plain floats where it can be: numpy's call overhead is most of the
        # cost at these sizes. Inside the message, a fixed step (binary blocks) within bounds
        # cannot cut, and for other blocks one min and one max say whether anything does.
        n = len(times)
        inner_ok = n == 1 or (
            step is not None and step >= 0 and (self._max_gap is None or step <= self._max_gap)
        )
        if not inner_ok:
            d = times[1:] - times[:-1]
            inner_ok = bool(d.min() >= 0) and (
                self._max_gap is None or bool(d.max() <= self._max_gap)
            )
        if inner_ok:
            if last is None:
                return []
            into = float(times[0]) - last
            if into < 0:
                return [(0, "time_backwards")]
            if self._max_gap is not None and into > self._max_gap:
                return [(0, "time_gap")]
            return []
        steps = np.diff(times, prepend=times[0] if last is None else last)
        backwards = steps < 0
        bad = backwards if self._max_gap is None else backwards | (steps > self._max_gap)
        where = np.flatnonzero(bad)
        return [
            (int(i), "time_backwards" if back else "time_gap")
            for i, back in zip(where.tolist(), backwards[where].tolist(), strict=True)
        ]

    def _append(
        self,
        asset: str,
        state: _AssetState,
        values: NDArray[np.float32],
        times: NDArray[np.float64] | None,
        received: float,
        out: list[Window],
    ) -> None:
        """Emit the windows VALUES complete, then keep VALUES' tail in the ring."""
        m = len(values)
        if m == 0:
            return
        size = self._size
        if m >= state.until_emit:
            # Window ends, as indices into VALUES; everything before VALUES comes from the ring.
            ends = range(state.until_emit - 1, m, self._hop)
            out.extend(self._window(asset, state, values, times, end, received) for end in ends)
            state.until_emit = self._hop - (m - 1 - ends[-1])
        else:
            state.until_emit -= m

        if m == 1:  # the per-sample message: one row assignment, no slicing arithmetic
            head = state.head
            state.ring[head] = values[0]
            state.times[head] = math.nan if times is None else times[0]
            state.head = (head + 1) % size
            return
        # Only the last `size` samples can ever be part of a later window.
        keep = min(m, size)
        pos = (state.head + m - keep) % size
        first = min(keep, size - pos)
        tail = values[m - keep :]
        state.ring[pos : pos + first] = tail[:first]
        state.ring[: keep - first] = tail[first:]
        if times is None:
            state.times[pos : pos + first] = np.nan
            state.times[: keep - first] = np.nan
        else:
            tail_t = times[m - keep :]
            state.times[pos : pos + first] = tail_t[:first]
            state.times[: keep - first] = tail_t[first:]
        state.head = (state.head + m) % size

    def _window(
        self,
        asset: str,
        state: _AssetState,
        values: NDArray[np.float32],
        times: NDArray[np.float64] | None,
        end: int,
        received: float,
    ) -> Window:
        size = self._size
        begin = end + 1 - size
        end_t = None if times is None else float(times[end])
        if begin >= 0:
            window = values[begin : end + 1].copy()
            start_t = None if times is None else float(times[begin])
        else:
            old = -begin  # samples from before VALUES, the newest `old` in the ring
            window = np.empty((size, self._features), dtype=np.float32)
            at = (state.head - old) % size
            first = min(old, size - at)
            window[:first] = state.ring[at : at + first]
            window[first:old] = state.ring[: old - first]
            window[old:] = values[: end + 1]
            start_t = _time(float(state.times[at]))
        state.index += 1
        return Window(asset, window, start_t, end_t, received, state.index - 1)

    # -- durable state (floorline.edge.daemon.journal)
    # -------------------------------------------------------

    # head, until_emit, index, last_ts, last_seq (uint64: any sequence number), has_seq. The
    # sequence was an int64 once; for numbers below 2**63 the bytes are the same, so journals
    # written then still load.
    _HEADER = struct.Struct("<qqqdQ?")

    def export_state(self, asset: str) -> bytes | None:
        """ASSET's exact buffer and stream position as bytes (None if the asset is unknown).

        With :meth:`import_state` a restarted daemon continues every asset's windows where the
        journal left them: same held samples, same next window index, same duplicate detection.
        """
        s = self._assets.get(asset)
        if s is None:
            return None
        header = self._HEADER.pack(
            s.head,
            s.until_emit,
            s.index,
            math.nan if s.last_ts is None else s.last_ts,
            0 if s.last_seq is None else s.last_seq,
            s.last_seq is not None,
        )
        return header + s.ring.tobytes() + s.times.tobytes()

    def import_state(self, asset: str, blob: bytes) -> None:
        """Restore what :meth:`export_state` produced; a blob of another shape is refused."""
        size, feats = self._size, self._features
        expected = self._HEADER.size + size * feats * 4 + size * 8
        if len(blob) != expected:
            raise ValueError(f"state of {len(blob)} bytes, expected {expected} for this window")
        head, until_emit, index, last_ts, last_seq, has_seq = self._HEADER.unpack_from(blob)
        s = _AssetState(size, feats)
        off = self._HEADER.size
        s.ring[:] = np.frombuffer(blob, np.float32, size * feats, off).reshape(size, feats)
        s.times[:] = np.frombuffer(blob, np.float64, size, off + size * feats * 4)
        s.head, s.until_emit, s.index = int(head), int(until_emit), int(index)
        s.last_ts = None if math.isnan(last_ts) else float(last_ts)
        s.last_seq = int(last_seq) if has_seq else None
        self._assets[asset] = s

    def assets(self) -> list[str]:
        """Assets with state."""
        return list(self._assets)

    def pending(self) -> dict[str, int]:
        """Samples each asset holds towards its next window (for state reports)."""
        size = self._size
        # A list copy: metrics scrapes call this from another thread while assets are added.
        return {asset: size - s.until_emit for asset, s in list(self._assets.items())}

    def forget(self, asset: str) -> None:
        """Drop ASSET's buffer and stream position (the asset was retired); no-op if unknown.

        Its window counter stays as its floor: should the asset come back, its numbers go on.
        """
        state = self._assets.pop(asset, None)
        if state is not None and state.index > self._floors.get(asset, 0):
            self._floors[asset] = state.index

    def __len__(self) -> int:
        """Assets tracked."""
        return len(self._assets)


def _slice(times: NDArray[np.float64] | None, start: int, stop: int) -> NDArray[np.float64] | None:
    return None if times is None else times[start:stop]
