"""The plant simulator: its messages decode with the daemon's own decoders, in order, unbroken."""

from __future__ import annotations

import numpy as np
import pytest

from floorline.edge.decoders import BinaryDecoderConfig, JsonDecoderConfig, make_decoder
from floorline.edge.demo.signals import Condition
from floorline.edge.demo.simulator import Fault, PlantConfig, PlantSimulator, Truth

FEATURES = ["accel_x", "accel_y", "accel_z"]


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
