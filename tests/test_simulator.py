"""The plant simulator: its messages decode with the daemon's own decoders, in order, unbroken."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import orjson
import pytest

from floorline.edge.decoders import BinaryDecoderConfig, JsonDecoderConfig, make_decoder
from floorline.edge.demo.signals import (
    CONDITIONS,
    UNSEEN_CONDITIONS,
    AssetParams,
    AssetSignal,
    Condition,
    make_dataset,
)
from floorline.edge.demo.simulator import Fault, PlantConfig, PlantSimulator, Truth

FEATURES = ["accel_x", "accel_y", "accel_z"]
EXAMPLE = Path(__file__).resolve().parent.parent / "edge" / "models" / "pdm-classifier"


def collect(config: PlantConfig, steps: list[int]) -> list[tuple[str, bytes]]:
    sent: list[tuple[str, bytes]] = []
    sim = PlantSimulator(config, lambda t, p: sent.append((t, p)))
    for n in steps:
        sim.step(n)
    sim.flush()
    return sent


@pytest.mark.parametrize("fmt", ["json", "binary"])
def test_block_messages_carry_consecutive_sequence_numbers(fmt):
    config = PlantConfig(assets=2, mode="block", fmt=fmt, block=64, temperature=False,
                         start_time=100.0)
    # Uneven steps: blocks are cut across step boundaries and several per step.
    sent = collect(config, [10, 150, 3, 200, 1])
    if fmt == "json":
        decoder = make_decoder(
            JsonDecoderConfig(samples="samples", timestamp="ts", sequence="seq"), FEATURES)
    else:
        decoder = make_decoder(
            BinaryDecoderConfig(header="timestamp_sequence", sample_interval_ms=1.0), FEATURES)
    per_asset: dict[str, list[int]] = {}
    for topic, payload in sent:
        samples = decoder.decode(payload)
        assert samples.first_seq is not None
        assert samples.timestamps is not None
        assert samples.timestamps[0] == pytest.approx(100.0 + samples.first_seq / 1000.0)
        seqs = per_asset.setdefault(topic.split("/")[2], [])
        seqs.extend(range(samples.first_seq, samples.first_seq + len(samples.values)))
    for seqs in per_asset.values():
        assert seqs == list(range(364))


def test_sample_messages_decode_to_the_generated_values():
    sent = collect(PlantConfig(assets=1, temperature=False, start_time=0.0), [5])
    decoder = make_decoder(JsonDecoderConfig(timestamp="ts", sequence="seq"), FEATURES)
    decoded = [decoder.decode(p) for _, p in sent]
    assert [d.first_seq for d in decoded] == [0, 1, 2, 3, 4]
    assert all(d.values.shape == (1, 3) and np.isfinite(d.values).all() for d in decoded)


def test_temperature_is_published_once_per_simulated_second():
    sent = collect(PlantConfig(assets=1, start_time=0.0), [2500])
    temps = [t for t, _ in sent if t.endswith("/temperature")]
    assert len(temps) == 3  # seconds 0, 1 and 2


def test_faults_ramp_from_their_start():
    fault = Fault.parse("pump-01=bearing_outer_race@10+20:0.8")
    assert (fault.asset, fault.condition) == ("pump-01", Condition.BEARING_OUTER_RACE)
    assert fault.severity_at(5) == 0
    assert fault.severity_at(20) == pytest.approx(0.4)
    assert fault.severity_at(60) == pytest.approx(0.8)


@pytest.mark.parametrize("text", ["pump-01", "pump-01=melted", "=imbalance", "pump-01=imbalance@x"])
def test_bad_fault_specs_are_refused(text):
    with pytest.raises(ValueError, match="fault"):
        Fault.parse(text)


def test_faults_on_unknown_assets_and_binary_samples_are_refused():
    with pytest.raises(ValueError, match="unknown assets"):
        PlantSimulator(PlantConfig(assets=2, faults=[Fault.parse("pump-09=imbalance")]),
                       lambda *_: None)
    with pytest.raises(ValueError, match="binary"):
        PlantSimulator(PlantConfig(mode="sample", fmt="binary"), lambda *_: None)


def test_fault_spec_round_trips_through_parse():
    for text in ["pump-01=imbalance@0.6+1.8", "pump-03=looseness@10+0:0.5"]:
        assert Fault.parse(text).spec() == text


def test_the_truth_of_every_sample_is_kept_as_the_fault_ramps():
    sent: list[tuple[str, bytes]] = []
    plant = PlantConfig(assets=2, rate=1000.0, temperature=False,
                        faults=[Fault.parse("pump-02=looseness@0+0.2")])
    sim = PlantSimulator(plant, lambda t, p: sent.append((t, p)))
    sim.run(max_samples=400)  # paced at 1000 samples/s: the 0.2 s ramp ends half-way
    ramp = [sim.truth_at("pump-02", n) for n in range(400)]
    assert {t.condition for t in ramp} == {Condition.LOOSENESS}
    assert ramp[0].severity < 0.05  # the first tick comes a moment after the fault's start
    assert ramp[0].ramping
    severities = [t.severity for t in ramp]
    assert severities == sorted(severities)
    assert (ramp[-1].severity, ramp[-1].ramping) == (1.0, False)
    assert sim.truth_at("pump-01", 399) == Truth(Condition.HEALTHY, 0.0, ramping=False)
    # Message timestamps lead back to the sample numbers the truth is kept by.
    decoder = make_decoder(JsonDecoderConfig(timestamp="ts", sequence="seq"), FEATURES)
    for _, payload in sent[::37]:
        samples = decoder.decode(payload)
        assert samples.timestamps is not None
        assert sim.sample_index(float(samples.timestamps[0])) == samples.first_seq


# -- the unseen fault (issue 17): a condition the example model was not trained on --------------


def test_an_inner_race_fault_is_scheduled_like_any_other_but_is_not_a_trained_class():
    fault = Fault.parse("pump-07=bearing_inner_race@30+20")
    assert (fault.condition, fault.start_s, fault.ramp_s) == (Condition.BEARING_INNER_RACE, 30, 20)
    assert fault.spec() == "pump-07=bearing_inner_race@30+20"
    assert Condition.BEARING_INNER_RACE in UNSEEN_CONDITIONS
    assert Condition.BEARING_INNER_RACE not in CONDITIONS
    # The committed example bundle's classes are still exactly the trained conditions.
    manifest = orjson.loads((EXAMPLE / "manifest.json").read_bytes())
    assert manifest["output"]["labels"] == [c.value for c in CONDITIONS]
    _, y = make_dataset(5, 64, np.random.default_rng(0))
    assert set(y.tolist()) == set(range(len(CONDITIONS)))


def _envelope_spectrum(x: np.ndarray, fs: float, above_hz: float) -> tuple[np.ndarray, np.ndarray]:
    # Demodulation as an analyst does it: high-pass (FFT mask), Hilbert envelope, its spectrum.
    n = len(x)
    spec = np.fft.fft(x - x.mean())
    freqs = np.fft.fftfreq(n, 1 / fs)
    spec[np.abs(freqs) < above_hz] = 0
    spec[freqs < 0] = 0  # analytic signal: positive frequencies, doubled
    env = np.abs(np.fft.ifft(2 * spec))
    return np.fft.rfftfreq(n, 1 / fs), np.abs(np.fft.rfft(env - env.mean()))


def _line(freqs: np.ndarray, power: np.ndarray, hz: float) -> float:
    return float(power[np.abs(freqs - hz) < 1.5].max())


@pytest.mark.parametrize(("condition", "order_of"), [
    (Condition.BEARING_INNER_RACE, "bpfi_order"), (Condition.BEARING_OUTER_RACE, "bpfo_order")])
def test_bearing_impacts_come_at_their_race_frequency_and_only_inner_race_ones_swing_with_the_shaft(
        condition, order_of):
    rng = np.random.default_rng(7)
    # A steady machine: no speed wander, no tones beside the shaft's, so the lines are sharp.
    params = dataclasses.replace(AssetParams.random(rng), speed_drift=0.0, vane_g=0.0,
                                 neighbour_g=0.0)
    signal = AssetSignal(params, np.random.default_rng(1))
    signal.set_condition(condition, 1.0)
    x = signal.next_block(16384)[:, 0].astype(np.float64)
    freqs, power = _envelope_spectrum(x, signal.sample_rate_hz, 120.0)
    floor = float(np.median(power[(freqs > 10) & (freqs < 450)]))
    shaft = params.shaft_hz
    ball_pass = getattr(params, order_of) * shaft
    assert params.bpfi_order + params.bpfo_order == pytest.approx(params.n_balls)
    assert 5.0 < params.bpfi_order < 6.0
    assert 3.0 < params.bpfo_order < 4.0
    assert _line(freqs, power, ball_pass) > 10 * floor
    shaft_line = _line(freqs, power, shaft) / floor
    if condition is Condition.BEARING_INNER_RACE:
        # The defect turns through the load zone once a revolution: 1x and sidebands of BPFI.
        assert shaft_line > 50
        assert _line(freqs, power, ball_pass - shaft) > 10 * floor
    else:
        assert shaft_line < 50


def test_an_inner_race_defect_heats_the_bearing_like_an_outer_race_one():
    temps = {}
    for condition in (Condition.HEALTHY, Condition.BEARING_INNER_RACE,
                      Condition.BEARING_OUTER_RACE):
        signal = AssetSignal(AssetParams(thermal_tau_s=1.0), np.random.default_rng(0))
        signal.set_condition(condition, 1.0)
        signal.next_block(10_000)
        temps[condition] = signal.temperature_c()
    assert temps[Condition.BEARING_INNER_RACE] == pytest.approx(
        temps[Condition.BEARING_OUTER_RACE])
    assert temps[Condition.BEARING_INNER_RACE] > temps[Condition.HEALTHY] + 4
