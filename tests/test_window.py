"""Windower: per-asset rings, hops, gaps, duplicates; block pushes equal per-sample pushes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from floorline.edge.decoders import Samples
from floorline.edge.errors import ConfigError, DecodeError
from floorline.edge.stream.window import RESET_CAUSES, Window, WindowConfig, Windower

F = 2


def _samples(
    ids: Sequence[float], times: Sequence[float] | None = None, first_seq: int | None = None
) -> Samples:
    """Sample i has the values (ids[i], -ids[i]), so every window shows where its rows came from."""
    col = np.asarray(ids, dtype=np.float32)
    values = np.stack([col, -col], axis=1)
    ts = None if times is None else np.asarray(times, dtype=np.float64)
    return Samples(values, ts, first_seq, None)


def _ids(window: Window) -> list[float]:
    assert window.values.shape[1] == F
    assert (window.values[:, 1] == -window.values[:, 0]).all()
    return [float(v) for v in window.values[:, 0]]


def _windower(size: int, **config: object) -> Windower:
    return Windower(size, F, WindowConfig.model_validate(config))


def _push_each(
    windower: Windower, asset: str, ids: Sequence[float], times: Sequence[float] | None = None
) -> list[Window]:
    out: list[Window] = []
    for i, v in enumerate(ids):
        out += windower.push(asset, _samples([v], None if times is None else [times[i]]), 0.0)
    return out


# --- emission ------------------------------------------------------------------------------------


def test_tumbling_windows_do_not_overlap() -> None:
    windower = _windower(3)
    windows = _push_each(windower, "a", range(10))
    assert [_ids(w) for w in windows] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert [w.index for w in windows] == [0, 1, 2]
    assert windower.pending() == {"a": 1}


def test_window_k_starts_at_sample_k_times_hop() -> None:
    windower = _windower(4, hop=2)
    windows = _push_each(windower, "a", range(11))
    assert [_ids(w) for w in windows] == [[k * 2 + j for j in range(4)] for k in range(4)]
    assert windower.pending() == {"a": 3}  # samples 8, 9, 10 wait for the window starting at 8


def test_hop_of_one_slides_by_one_sample() -> None:
    windows = _windower(3, hop=1).push("a", _samples(range(5)), 0.0)
    assert [_ids(w) for w in windows] == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]


def test_window_of_one_sample_per_push() -> None:
    windows = _push_each(_windower(1), "a", [5, 6])
    assert [_ids(w) for w in windows] == [[5], [6]]


def test_one_block_may_emit_several_windows_and_reuse_held_samples() -> None:
    windower = _windower(4, hop=2)
    assert windower.push("a", _samples([0, 1, 2]), 1.0) == []
    windows = windower.push("a", _samples(range(3, 10)), 2.0)
    assert [_ids(w) for w in windows] == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert {w.received for w in windows} == {2.0}


def test_window_carries_times_of_its_first_and_last_sample() -> None:
    windower = _windower(3)
    windows = windower.push("a", _samples(range(4), times=[10.0, 10.5, 11.0, 11.5]), 7.0)
    assert len(windows) == 1
    assert (windows[0].start, windows[0].end, windows[0].received) == (10.0, 11.0, 7.0)
    untimed = _windower(2).push("a", _samples([1, 2]), 0.0)[0]
    assert (untimed.start, untimed.end) == (None, None)


def test_interleaved_assets_get_separate_windows() -> None:
    windower = _windower(3)
    windows: list[Window] = []
    for i in range(6):
        windows += windower.push("a", _samples([i]), 0.0)
        windows += windower.push("b", _samples([100 + i]), 0.0)
    by_asset = {(w.asset, w.index): _ids(w) for w in windows}
    assert by_asset == {
        ("a", 0): [0, 1, 2],
        ("b", 0): [100, 101, 102],
        ("a", 1): [3, 4, 5],
        ("b", 1): [103, 104, 105],
    }


def test_windows_are_copies_the_caller_owns() -> None:
    windower = _windower(3, hop=1)
    block = _samples([0, 1, 2, 3])
    first, second = windower.push("a", block, 0.0)
    first.values[:] = -99
    block.values[:] = -99
    assert _ids(second) == [1, 2, 3]
    (third,) = windower.push("a", _samples([4]), 0.0)
    assert _ids(third) == [2, 3, 4]


def test_read_only_sample_arrays_are_accepted() -> None:
    samples = _samples([0, 1, 2])
    samples.values.setflags(write=False)
    (window,) = _windower(3).push("a", samples, 0.0)
    window.values[0, 0] = 5  # the window is writable all the same


# --- gaps and duplicates -------------------------------------------------------------------------


def _assert_no_window_spans(windows: list[Window], boundary: float) -> None:
    for w in windows:
        ids = _ids(w)
        assert max(ids) < boundary or min(ids) >= boundary


def test_time_gap_inside_a_block_resets_before_the_sample_after_it() -> None:
    windower = _windower(3, max_gap_s=1.5)
    times = [0, 1, 2, 3, 10, 11, 12]
    windows = windower.push("a", _samples(range(7), times=times), 0.0)
    assert [_ids(w) for w in windows] == [[0, 1, 2], [4, 5, 6]]
    assert [w.index for w in windows] == [0, 1]  # gaps never reset the window counter
    assert windower.resets["time_gap"] == 1
    _assert_no_window_spans(windows, 4)


def test_time_gap_between_pushes_resets() -> None:
    windower = _windower(3, hop=1, max_gap_s=1.5)
    windows = _push_each(windower, "a", range(6), times=[0, 1, 2, 5, 6, 7])
    assert [_ids(w) for w in windows] == [[0, 1, 2], [3, 4, 5]]
    assert windower.resets == {"time_gap": 1, "time_backwards": 0, "seq_gap": 0, "seq_restart": 0}


def test_time_going_backwards_resets() -> None:
    windower = _windower(3, hop=1)
    times = [0, 1, 2, 3, 1.5, 2.5, 3.5]
    windows = windower.push("a", _samples(range(7), times=times), 0.0)
    assert [_ids(w) for w in windows] == [[0, 1, 2], [1, 2, 3], [4, 5, 6]]
    assert windower.resets["time_backwards"] == 1
    _assert_no_window_spans(windows, 4)


def test_equal_timestamps_are_not_a_gap() -> None:
    windower = _windower(3, max_gap_s=0.5)
    windows = windower.push("a", _samples(range(3), times=[5, 5, 5]), 0.0)
    assert len(windows) == 1
    assert sum(windower.resets.values()) == 0


def test_sequence_gap_resets() -> None:
    windower = _windower(3, hop=1)
    assert windower.push("a", _samples([0, 1], first_seq=10), 0.0) == []
    windows = windower.push("a", _samples([2, 3, 4], first_seq=13), 0.0)  # 12 was lost
    assert [_ids(w) for w in windows] == [[2, 3, 4]]
    assert windower.resets["seq_gap"] == 1


def test_sequence_gap_within_the_limit_is_tolerated() -> None:
    windower = _windower(3, max_seq_gap=2)
    windower.push("a", _samples([0, 1], first_seq=10), 0.0)
    windows = windower.push("a", _samples([2], first_seq=13), 0.0)
    assert [_ids(w) for w in windows] == [[0, 1, 2]]


def test_sequence_check_can_be_disabled() -> None:
    windower = _windower(2, max_seq_gap=None)
    windower.push("a", _samples([0], first_seq=1), 0.0)
    assert len(windower.push("a", _samples([1], first_seq=500), 0.0)) == 1


def test_redelivered_samples_are_dropped_and_the_rest_kept() -> None:
    windower = _windower(3, hop=1)
    windower.push("a", _samples([0, 1, 2, 3], first_seq=0), 0.0)
    windows = windower.push("a", _samples([2, 3, 4, 5], first_seq=2), 0.0)  # 2, 3 redelivered
    assert [_ids(w) for w in windows] == [[2, 3, 4], [3, 4, 5]]
    assert windower.duplicates == 2
    assert windower.push("a", _samples([4, 5], first_seq=4), 0.0) == []
    assert windower.duplicates == 4
    assert sum(windower.resets.values()) == 0


def test_redelivery_does_not_count_as_time_going_backwards() -> None:
    windower = _windower(2)
    windower.push("a", _samples([0, 1], times=[1, 2], first_seq=0), 0.0)
    windows = windower.push("a", _samples([1, 2, 3], times=[2, 3, 4], first_seq=1), 0.0)
    assert [_ids(w) for w in windows] == [[2, 3]]
    assert windower.resets["time_backwards"] == 0


def test_counter_far_behind_is_a_device_restart_not_duplicates() -> None:
    windower = _windower(2, max_seq_rewind=100)
    windower.push("a", _samples([0, 1, 2], first_seq=5000), 0.0)
    windows = windower.push("a", _samples([3, 4], first_seq=0), 0.0)
    assert [_ids(w) for w in windows] == [[3, 4]]
    assert windower.resets["seq_restart"] == 1
    assert windower.duplicates == 0


def test_one_discontinuity_counts_once() -> None:
    windower = _windower(2, max_gap_s=1.0)
    windower.push("a", _samples([0], times=[0], first_seq=0), 0.0)
    windower.push("a", _samples([1], times=[50], first_seq=9), 0.0)
    assert sum(windower.resets.values()) == 1


# --- uint64 sequence numbers --------------------------------------------------------------------

TOP = 2**64 - 1  # the binary header's largest sequence number


@pytest.mark.parametrize("last", [2**63 - 1, 2**63, 2**64 - 2, TOP])
def test_sequences_across_the_int64_range_continue_and_detect_duplicates(last: int) -> None:
    windower = _windower(3, hop=1)
    assert windower.push("a", _samples([0, 1], first_seq=last - 1), 0.0) == []
    nxt = (last + 1) % 2**64
    assert [_ids(w) for w in windower.push("a", _samples([2], first_seq=nxt), 0.0)] == [[0, 1, 2]]
    assert windower.push("a", _samples([1, 2], first_seq=last), 0.0) == []  # redelivered
    assert windower.duplicates == 2
    assert sum(windower.resets.values()) == 0


@pytest.mark.parametrize("seq", [2**64, 2**64 + 5, 10**30, -1, -(2**63)])
def test_a_sequence_number_outside_uint64_is_bad_sequence_and_leaves_the_asset_alone(
    seq: int,
) -> None:
    windower = _windower(2)
    windower.push("a", _samples([0], first_seq=TOP), 0.0)
    with pytest.raises(DecodeError) as info:
        windower.push("a", _samples([1], first_seq=seq), 0.0)
    assert info.value.reason == "bad_sequence"
    with pytest.raises(DecodeError):
        windower.push("new", _samples([1], first_seq=seq), 0.0)
    assert windower.assets() == ["a"]  # no state for an asset whose first message was refused
    assert [_ids(w) for w in windower.push("a", _samples([1], first_seq=0), 0.0)] == [[0, 1]]


def test_the_counter_wraps_from_the_top_to_zero_inside_a_block_and_between_messages() -> None:
    windower = _windower(4)
    windows = windower.push("a", _samples([0, 1, 2], first_seq=TOP - 1), 0.0)  # TOP-1, TOP, 0
    windows += windower.push("a", _samples([3, 4, 5, 6, 7], first_seq=1), 0.0)
    assert [_ids(w) for w in windows] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sum(windower.resets.values()) == 0
    assert windower.push("a", _samples([6, 7], first_seq=4), 0.0) == []  # redelivered past zero
    assert windower.duplicates == 2


def test_a_gap_across_the_top_resets_and_a_far_jump_back_is_a_restart() -> None:
    windower = _windower(2, max_seq_rewind=100)
    windower.push("a", _samples([0], first_seq=TOP - 1), 0.0)
    assert windower.push("a", _samples([1], first_seq=0), 0.0) == []  # TOP was lost
    assert windower.resets["seq_gap"] == 1
    windower.push("a", _samples([2], first_seq=1), 0.0)
    windower.push("a", _samples([3], first_seq=TOP - 500), 0.0)  # 503 behind, the short way round
    assert windower.resets["seq_restart"] == 1
    assert windower.duplicates == 0


@pytest.mark.parametrize("last", [2**63 - 1, 2**63, TOP])
def test_state_with_any_uint64_sequence_survives_the_journal(tmp_path, last: int) -> None:
    from floorline.edge.daemon.journal import WindowJournal  # noqa: PLC0415

    before = _windower(3)
    before.push("a", _samples([0, 1], first_seq=last - 1), 0.0)
    journal = WindowJournal(tmp_path / "windows.sqlite")
    state = before.export_state("a")
    assert state is not None
    assert journal.save("p", {"a": state})
    journal.close()
    after = _windower(3)
    for asset, blob in WindowJournal(tmp_path / "windows.sqlite").load("p").items():
        after.import_state(asset, blob)
    assert after.push("a", _samples([1], first_seq=last), 0.0) == []  # a redelivery: dropped
    nxt = (last + 1) % 2**64
    assert [_ids(w) for w in after.push("a", _samples([2], first_seq=nxt), 0.0)] == [[0, 1, 2]]


def test_state_saved_before_sequences_were_unsigned_still_loads() -> None:
    import struct  # noqa: PLC0415

    windower = _windower(2)
    windower.push("a", _samples([0], first_seq=41), 0.0)
    windower.push("b", _samples([0]), 0.0)
    for asset, seq in (("a", 41), ("b", -1)):
        state = windower.export_state(asset)
        assert state is not None
        old = struct.pack("<qqqdq?", *struct.unpack_from("<qqqdQ?", state)[:4], seq, seq >= 0)
        restored = _windower(2)
        restored.import_state(asset, old + state[len(old):])
        assert restored.push(asset, _samples([1], first_seq=42), 0.0) != []


# --- bounds and config ---------------------------------------------------------------------------


def test_new_asset_beyond_the_bound_is_refused_until_one_is_forgotten() -> None:
    windower = _windower(2, max_assets=2)
    windower.push("a", _samples([0]), 0.0)
    windower.push("b", _samples([0]), 0.0)
    with pytest.raises(DecodeError) as info:
        windower.push("c", _samples([0]), 0.0)
    assert info.value.reason == "too_many_assets"
    assert windower.push("a", _samples([1]), 0.0) != []  # known assets carry on
    windower.forget("b")
    windower.push("c", _samples([0]), 0.0)
    assert set(windower.pending()) == {"a", "c"}


def test_forget_starts_the_asset_afresh() -> None:
    windower = _windower(2)
    windower.push("a", _samples([0]), 0.0)
    windower.forget("a")
    windower.forget("never-seen")
    assert windower.push("a", _samples([1]), 0.0) == []
    assert [_ids(w) for w in windower.push("a", _samples([2]), 0.0)] == [[1, 2]]


def test_hop_must_fit_the_window() -> None:
    with pytest.raises(ConfigError, match="hop"):
        _windower(4, hop=5)
    with pytest.raises(ValidationError):
        WindowConfig(hop=0)
    with pytest.raises(ValidationError):
        WindowConfig.model_validate({"hop": 2, "max_gap": 1})


def test_samples_of_the_wrong_width_are_a_programming_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        _windower(2).push("a", Samples(np.zeros((2, 3), np.float32), None, None, None), 0.0)


# --- block pushes equal per-sample pushes equal a naive reference --------------------------------


@dataclass
class _Reference:
    """The windowing rules, one sample at a time, with plain lists: slow and obviously right."""

    size: int
    hop: int
    config: WindowConfig
    buffers: dict[str, list[float]] = field(default_factory=dict)
    until: dict[str, int] = field(default_factory=dict)
    last: dict[str, tuple[float | None, int | None]] = field(default_factory=dict)
    index: dict[str, int] = field(default_factory=dict)
    resets: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESET_CAUSES, 0))
    duplicates: int = 0

    def push(self, asset: str, v: float, t: float | None, s: int | None) -> list[list[float]]:
        buf = self.buffers.setdefault(asset, [])
        self.until.setdefault(asset, self.size)
        self.index.setdefault(asset, 0)
        last_t, last_s = self.last.get(asset, (None, None))
        cause = None
        c = self.config
        if s is not None and last_s is not None:
            if c.max_seq_rewind is not None and last_s - s >= c.max_seq_rewind:
                cause = "seq_restart"
            elif s <= last_s:
                self.duplicates += 1
                return []
            elif c.max_seq_gap is not None and s - last_s > c.max_seq_gap:
                cause = "seq_gap"
        if cause is None and t is not None and last_t is not None:
            if t < last_t:
                cause = "time_backwards"
            elif c.max_gap_s is not None and t - last_t > c.max_gap_s:
                cause = "time_gap"
        if cause:
            self.resets[cause] += 1
            buf.clear()
            self.until[asset] = self.size
        buf.append(v)
        self.last[asset] = (t, s)
        self.until[asset] -= 1
        if self.until[asset] == 0:
            self.until[asset] = self.hop
            self.index[asset] += 1
            return [buf[-self.size :]]
        return []


@dataclass
class _Block:
    asset: str
    ids: list[float]
    times: list[float] | None
    first_seq: int | None


@st.composite
def _streams(draw: st.DrawFn) -> tuple[int, WindowConfig, list[_Block]]:
    size = draw(st.integers(1, 5))
    config = WindowConfig(
        hop=draw(st.integers(1, size)),
        max_gap_s=draw(st.sampled_from([None, 1.0])),
        max_seq_gap=draw(st.sampled_from([None, 1, 2])),
        max_seq_rewind=draw(st.sampled_from([None, 10])),
    )
    timed, sequenced = draw(st.booleans()), draw(st.booleans())
    t = 0.0
    next_seq = {"a": 20, "b": 20}
    next_id = 0
    blocks = []
    for _ in range(draw(st.integers(1, 10))):
        asset = draw(st.sampled_from(["a", "b"]))
        n = draw(st.integers(1, 7))
        times = None
        if timed:
            times = []
            for _ in range(n):
                t += draw(st.sampled_from([0.25, 0.25, 0.25, 0.0, 2.0, -0.75]))
                times.append(t)
        first_seq = None
        if sequenced:
            first_seq = max(0, next_seq[asset] + draw(st.sampled_from([0, 0, 0, 1, 2, -2, -15])))
            next_seq[asset] = first_seq + n
        blocks.append(_Block(asset, [float(next_id + i) for i in range(n)], times, first_seq))
        next_id += n
    return size, config, blocks


def _summary(windows: list[Window]) -> list[tuple[str, int, list[float], float]]:
    return [(w.asset, w.index, _ids(w), w.received) for w in windows]


@settings(max_examples=200, deadline=None)
@given(_streams())
def test_block_pushes_equal_per_sample_pushes_and_the_reference(
    stream: tuple[int, WindowConfig, list[_Block]],
) -> None:
    size, config, blocks = stream
    by_block, by_sample = Windower(size, F, config), Windower(size, F, config)
    reference = _Reference(size, config.hop or size, config)
    got_blocks: list[Window] = []
    got_samples: list[Window] = []
    expected: list[tuple[str, list[float]]] = []
    for received, b in enumerate(blocks):
        got_blocks += by_block.push(b.asset, _samples(b.ids, b.times, b.first_seq), received)
        for i, v in enumerate(b.ids):
            t = None if b.times is None else b.times[i]
            s = None if b.first_seq is None else b.first_seq + i
            one = _samples([v], None if t is None else [t], s)
            got_samples += by_sample.push(b.asset, one, received)
            expected += [(b.asset, w) for w in reference.push(b.asset, v, t, s)]

    assert _summary(got_blocks) == _summary(got_samples)
    assert [(w.asset, _ids(w)) for w in got_blocks] == expected
    assert [(w.start, w.end) for w in got_blocks] == [(w.start, w.end) for w in got_samples]
    assert by_block.resets == by_sample.resets == reference.resets
    assert by_block.duplicates == by_sample.duplicates == reference.duplicates
    assert by_block.pending() == by_sample.pending()


@settings(max_examples=200, deadline=None)
@given(_streams(), st.sampled_from([2**63 - 30, 2**64 - 30, 2**64 - 1]))
def test_shifting_every_sequence_number_across_the_top_changes_nothing(
    stream: tuple[int, WindowConfig, list[_Block]], shift: int
) -> None:
    # Sequences start near 20 and wander over ~100; shifted, they cross 2**63 or wrap past 2**64.
    size, config, blocks = stream
    plain, shifted = Windower(size, F, config), Windower(size, F, config)
    got_plain: list[Window] = []
    got_shifted: list[Window] = []
    for received, b in enumerate(blocks):
        moved = None if b.first_seq is None else (b.first_seq + shift) % 2**64
        got_plain += plain.push(b.asset, _samples(b.ids, b.times, b.first_seq), received)
        got_shifted += shifted.push(b.asset, _samples(b.ids, b.times, moved), received)
        for asset in shifted.assets():  # and through export/import after every message
            state = shifted.export_state(asset)
            assert state is not None
            shifted.import_state(asset, state)
    assert _summary(got_plain) == _summary(got_shifted)
    assert plain.resets == shifted.resets
    assert plain.duplicates == shifted.duplicates


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 6),
    max_gap=st.sampled_from([None, 0.5, 1.0]),
    step=st.sampled_from([0.0, 0.25, 0.5, 2.0]),
    blocks=st.lists(
        st.tuples(st.integers(1, 8), st.sampled_from([0.25, 0.0, 3.0, -1.0, -10.0])),
        min_size=1, max_size=8,
    ),
)
def test_a_declared_fixed_step_changes_nothing_but_the_cost(
    size: int, max_gap: float | None, step: float, blocks: list[tuple[int, float]]
) -> None:
    # Binary blocks declare their step (Samples.step); the windower then checks only the step
    # into each block. Same windows, same resets as checking every sample.
    config = WindowConfig.model_validate({"hop": None, "max_gap_s": max_gap})
    declared, checked = Windower(size, F, config), Windower(size, F, config)
    got_declared: list[Window] = []
    got_checked: list[Window] = []
    t, next_id = 100.0, 0
    for n, jump in blocks:
        t += jump
        times = [t + i * step for i in range(n)]
        t = times[-1]
        ids = [float(next_id + i) for i in range(n)]
        next_id += n
        fixed = _samples(ids, times)
        fixed.step = step
        got_declared += declared.push("a", fixed, 0.0)
        got_checked += checked.push("a", _samples(ids, times), 0.0)
    assert _summary(got_declared) == _summary(got_checked)
    assert [(w.start, w.end) for w in got_declared] == [(w.start, w.end) for w in got_checked]
    assert declared.resets == checked.resets
