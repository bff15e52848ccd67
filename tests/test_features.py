"""The feature stage: each feature against an independent computation, the manifest's rules, and a
scikit-learn model on features converted by the real converter and run by the real daemon.

Independent references: closed forms (a sine's RMS A/√2, crest √2, kurtosis 1.5; a bin-centred
tone's band energy A²/2; an impulse train's envelope spectrum peaks at its repetition rate) and
scipy (``scipy.stats``, ``scipy.signal.hilbert``), which the gateway's code never uses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import yaml

from floorline.edge.bundle.bundle import Bundle
from floorline.edge.bundle.manifest import FEATURES_SCHEMA, FeatureStage, InputSpec, Manifest
from floorline.edge.errors import ManifestError
from floorline.edge.stream import features
from floorline.edge.stream.normalization import model_input

FS = 1000.0
N = 256
CHANNELS = ["x", "y", "rpm"]


def stage(blocks: list[dict[str, Any]], *, speed: dict[str, Any] | None = None,
          fs: float = FS, channels: list[str] = CHANNELS) -> FeatureStage:
    """A valid stage with its names computed."""
    raw: dict[str, Any] = {"sample_rate": fs, "speed": speed, "blocks": blocks, "names": ["?"]}
    parsed = FeatureStage.model_validate(raw)  # names are checked against the input's channels
    names = features.feature_names(parsed, channels)
    return FeatureStage.model_validate({**raw, "names": names})


def windows_of(*signals: np.ndarray) -> np.ndarray:
    """One window (1, N, channels) of the given per-channel signals."""
    return np.stack(signals, axis=-1)[None].astype(np.float32)


def t() -> np.ndarray:
    return np.arange(N) / FS


# --- each feature against an independent computation --------------------------------------------


def test_a_sines_statistics_are_the_closed_forms() -> None:
    a = 2.0
    x = a * np.sin(2 * np.pi * 125.0 * t())  # 32 whole periods: exact moments
    st = stage([{"type": "stats", "channels": ["x"]}])
    rms, peak, crest, kurt, skew = features.compute(windows_of(x, x, x), st, CHANNELS)[0]
    assert rms == pytest.approx(a / np.sqrt(2), rel=1e-6)
    assert peak == pytest.approx(a, rel=1e-6)
    assert crest == pytest.approx(np.sqrt(2), rel=1e-6)
    assert kurt == pytest.approx(1.5, rel=1e-5)
    assert skew == pytest.approx(0.0, abs=1e-5)


def test_statistics_agree_with_scipy_on_random_windows() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((20, N, 3)) ** 3).astype(np.float32)  # skewed, heavy-tailed
    st = stage([{"type": "stats"}], channels=["a", "b", "c"])
    got = features.compute(w, st, ["a", "b", "c"]).reshape(20, 3, 5)
    x = np.swapaxes(w.astype(np.float64), 1, 2)
    rms = np.sqrt(np.mean(x**2, axis=-1))
    np.testing.assert_allclose(got[..., 0], rms, rtol=1e-6)
    np.testing.assert_allclose(got[..., 1], np.abs(x).max(-1), rtol=1e-6)
    np.testing.assert_allclose(got[..., 2], np.abs(x).max(-1) / rms, rtol=1e-6)
    np.testing.assert_allclose(got[..., 3], stats.kurtosis(x, axis=-1, fisher=False), rtol=1e-5)
    np.testing.assert_allclose(got[..., 4], stats.skew(x, axis=-1), rtol=1e-5, atol=1e-6)


def test_constant_and_zero_windows_have_defined_features() -> None:
    st = stage([{"type": "stats"}, {"type": "bands", "bands": [[0, 100], [100, 500]]}],
               channels=["a", "b"])
    w = windows_of(np.full(N, 0.7), np.zeros(N))
    got = features.compute(w, st, ["a", "b"])[0]
    names = features.feature_names(st, ["a", "b"])
    values = dict(zip(names, got.tolist(), strict=True))
    assert np.isfinite(got).all()
    assert values["a_rms"] == pytest.approx(0.7)
    assert values["a_crest"] == pytest.approx(1.0)
    # A constant has no shape: kurtosis and skewness are 0 (documented), not NaN.
    assert values["a_kurtosis"] == 0.0
    assert values["a_skewness"] == 0.0
    assert values["b_rms"] == 0.0
    assert values["b_crest"] == 0.0
    assert values["b_kurtosis"] == 0.0
    # All of a constant's energy is DC, in the band starting at 0 Hz.
    assert values["a_band_0_100hz"] == pytest.approx(0.49, rel=1e-6)
    assert values["a_band_100_500hz"] == pytest.approx(0.0, abs=1e-12)


def test_band_energy_of_a_tone_is_half_its_amplitude_squared_and_bands_add_up_to_the_mean_square(
) -> None:
    a, f = 1.5, 125.0  # on a bin: 125 Hz at 1000 Hz over 256 samples is bin 32
    x = a * np.sin(2 * np.pi * f * t()) + 0.3 * np.sin(2 * np.pi * 312.5 * t())  # bin 80
    st = stage([{"type": "bands", "channels": ["x"],
                 "bands": [[0, 100], [100, 200], [200, 500]]}])
    low, tone, high = features.compute(windows_of(x, x, x), st, CHANNELS)[0]
    assert low == pytest.approx(0.0, abs=1e-9)
    assert high == pytest.approx(0.3 * 0.3 / 2, rel=1e-5)
    assert tone == pytest.approx(a * a / 2, rel=1e-6)
    assert low + tone + high == pytest.approx(float(np.mean(x**2)), rel=1e-6)  # Parseval


def test_envelope_spectrum_of_an_impulse_train_peaks_at_its_repetition_rate() -> None:
    hilbert = pytest.importorskip("scipy.signal").hilbert
    n, rate, carrier = 2048, 37.0, 300.0
    time = np.arange(n) / FS
    # Decaying bursts of a 300 Hz resonance, repeated 37 times a second: an outer-race fault.
    phase = (time * rate) % 1.0 / rate
    x = np.exp(-phase * 400.0) * np.sin(2 * np.pi * carrier * time)
    bands = [[30, 44], [44, 70], [70, 80], [5, 30]]
    st = stage([{"type": "envelope", "channels": ["x"], "band": [200, 400], "bands": bands}])
    w = np.stack([x, x, x], axis=-1)[None].astype(np.float32)
    got = features.compute(w, st, CHANNELS)[0]
    assert got[0] > 5 * got[1]
    assert got[2] > got[1]
    assert got[0] > 5 * got[3]
    # Independently: scipy's band-pass-free Hilbert envelope of the same band-passed signal.
    spec = np.fft.rfft(x.astype(np.float32).astype(np.float64))
    freqs = np.fft.rfftfreq(n, 1 / FS)
    spec[(freqs < 200) | (freqs >= 400)] = 0
    env = np.abs(hilbert(np.fft.irfft(spec, n)))
    env -= env.mean()
    power = np.abs(np.fft.rfft(env)) ** 2 / n**2
    power[1:-1] *= 2
    ref = [power[(freqs >= lo) & (freqs < hi)].sum() for lo, hi in bands]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-12)


def test_order_bands_follow_the_shaft_speed() -> None:
    # The same 3rd-order tone at two speeds lands in the same order band: 1800 and 2400 rpm.
    st = stage([{"type": "order_bands", "bands": [[0.5, 1.5], [2.5, 3.5]]}],
               speed={"channel": "rpm", "unit": "rpm"})
    rows = []
    for rpm in (1800.0, 2400.0, 0.0):
        shaft = rpm / 60.0
        x = np.sin(2 * np.pi * 3 * shaft * t())
        rows.append(windows_of(x, 0.1 * x, np.full(N, rpm))[0])
    got = features.compute(np.stack(rows), st, CHANNELS)
    assert features.feature_names(st, CHANNELS) == [
        "x_order_0.5_1.5", "x_order_2.5_3.5", "y_order_0.5_1.5", "y_order_2.5_3.5"]
    for row in got[:2]:
        assert row[1] > 100 * row[0]
        assert row[1] == pytest.approx(0.5, rel=0.05)
        assert row[3] == pytest.approx(0.005, rel=0.05)
    assert (got[2] == 0).all()  # stopped: every order band is 0 (documented)


def test_vectorised_over_a_batch_equals_window_by_window() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((33, N, 3)).astype(np.float32)
    w[..., 2] = np.abs(w[..., 2]) * 1000 + 600  # a speed channel in rpm
    st = stage(
        [{"type": "stats"},
         {"type": "bands", "bands": [[0, 50], [50, 200], [200, 500]]},
         {"type": "envelope", "channels": ["x"], "band": [100, 400], "bands": [[1, 50]]},
         {"type": "order_bands", "bands": [[0.5, 1.5], [1.5, 4]]}],
        speed={"channel": "rpm", "unit": "rpm"},
    )
    batch = features.compute(w, st, CHANNELS)
    one_by_one = np.concatenate([features.compute(w[i : i + 1], st, CHANNELS) for i in range(33)])
    assert batch.dtype == np.float32
    assert batch.shape == (33, len(st.names))
    np.testing.assert_array_equal(batch, one_by_one)
    np.testing.assert_array_equal(batch, features.compute(w, st, CHANNELS))  # deterministic


def test_model_input_is_features_then_the_models_normalization() -> None:
    st = stage([{"type": "stats", "channels": ["x"], "stats": ["rms", "peak"]}])
    spec = InputSpec(
        shape=[None, N, 3], window=N, features=[{"name": c} for c in CHANNELS],
        normalization={"mean": [1.0, 2.0], "std": [2.0, 4.0]}, preprocessing=st,
    )
    assert spec.model_shape == [None, 2]
    w = windows_of(np.full(N, 3.0), np.zeros(N), np.zeros(N))
    np.testing.assert_allclose(model_input(w, spec), [[(3 - 1) / 2, (3 - 2) / 4]])


# --- the manifest's rules ---------------------------------------------------------------------


def _spec_dict(blocks: list[dict[str, Any]], **stage_keys: Any) -> dict[str, Any]:
    return {
        "shape": [None, N, 3], "window": N, "features": [{"name": c} for c in CHANNELS],
        "preprocessing": {"sample_rate": FS, "blocks": blocks, "names": ["?"], **stage_keys},
    }


@pytest.mark.parametrize(("blocks", "keys", "message"), [
    ([{"type": "wavelets"}], {}, "Input should be 'stats', 'bands', 'envelope' or 'order_bands'"),
    ([{"type": "bands", "bands": [[100, 600]]}], {}, "above Nyquist (500 Hz"),
    ([{"type": "bands", "bands": [[10, 20]]}], {"sample_rate": 0}, "greater than 0"),
    ([{"type": "bands", "bands": [[20, 10]]}], {}, "0 <= lo < hi"),
    ([{"type": "order_bands", "bands": [[1, 2]]}], {}, "need speed"),
    ([{"type": "stats", "channels": ["z"]}], {}, "channel(s) z not in the input"),
    ([{"type": "stats"}], {}, "names must be the 15 features"),
    ([{"type": "envelope", "band": [200, 300], "bands": [[1, 150]]}], {}, "width"),
])
def test_the_manifest_refuses_a_wrong_stage(
    blocks: list[dict[str, Any]], keys: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=None) as err:
        InputSpec.model_validate(_spec_dict(blocks, **keys))
    assert message in str(err.value)


def test_a_stage_needs_schema_3_and_a_schema_2_manifest_keeps_its_bytes(
    feature_bundle: Path,
) -> None:
    raw = json.loads((feature_bundle / "manifest.json").read_text())
    assert raw["schema_version"] == FEATURES_SCHEMA
    raw["schema_version"] = 2
    with pytest.raises(ManifestError, match="needs schema_version 3"):
        Manifest.from_bytes(json.dumps(raw).encode())
    # An unknown feature type is refused by a gateway, one line naming it.
    raw["schema_version"] = 3
    raw["input"]["preprocessing"]["blocks"][0]["type"] = "wavelets"
    with pytest.raises(ManifestError) as err:
        Manifest.from_bytes(json.dumps(raw).encode())
    assert "input.preprocessing.blocks.0.type" in str(err.value)
    assert "\n" not in str(err.value)
    # A bundle without a stage writes no preprocessing key at all: schema 2 gateways read it.
    example = Path(__file__).resolve().parent.parent / "edge/models/pdm-classifier"
    data = (example / "manifest.json").read_bytes()
    assert b"preprocessing" not in Manifest.from_bytes(data).to_bytes()


# --- converter and daemon end to end ----------------------------------------------------------

WINDOW = 256
CARD = {
    "name": "pdm-features",
    "version": "1.0.0",
    "description": "Random forest on vibration features of raw 256-sample windows.",
    "window": WINDOW,
    "features": [{"name": "accel_x", "unit": "g"}, {"name": "accel_y", "unit": "g"},
                 {"name": "accel_z", "unit": "g"}],
    "preprocessing": {
        "sample_rate": 1000,
        "blocks": [
            {"type": "stats"},
            {"type": "bands", "bands": [[5, 50], [50, 150], [150, 250], [250, 450]]},
            {"type": "envelope", "channels": ["accel_x"], "band": [200, 450],
             "bands": [[2, 60], [60, 120], [120, 240]]},
        ],
    },
}


def _convert(argv: list[str]) -> tuple[int, str, str]:
    import contextlib  # noqa: PLC0415
    import io  # noqa: PLC0415

    from floorline.converter import cli  # noqa: PLC0415

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def feature_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RandomForest on features of the simulator's windows, converted by floorline-convert."""
    pytest.importorskip("sklearn")
    pytest.importorskip("skl2onnx")
    import joblib  # noqa: PLC0415
    from sklearn.ensemble import RandomForestClassifier  # noqa: PLC0415

    from floorline.edge.demo.signals import CONDITIONS, make_dataset  # noqa: PLC0415

    root = tmp_path_factory.mktemp("features")
    rng = np.random.default_rng(7)
    x, y = make_dataset(60, WINDOW, rng)
    card = root / "card.yaml"
    card.write_text(yaml.safe_dump(CARD))
    axes = ["accel_x", "accel_y", "accel_z"]
    st = stage(CARD["preprocessing"]["blocks"], channels=axes)
    feats = features.compute(x, st, axes)  # how the model was trained: the same function
    labels = np.array([CONDITIONS[i].value for i in y])
    model = RandomForestClassifier(n_estimators=20, max_depth=8, random_state=0).fit(feats, labels)
    joblib.dump(model, root / "forest.joblib")
    x_cal, _ = make_dataset(20, WINDOW, np.random.default_rng(8))
    np.save(root / "calib.npy", x_cal)
    out = root / "bundle"
    code, _stdout, stderr = _convert(["sklearn", str(root / "forest.joblib"), "--card", str(card),
                                     "--out", str(out), "--calibration", str(root / "calib.npy")])
    assert code == 0, stderr
    return out


def test_a_forest_on_features_converts_and_the_gateway_self_test_runs_the_features(
    feature_bundle: Path,
) -> None:
    from floorline.edge.bundle import selftest  # noqa: PLC0415

    with Bundle.open(feature_bundle) as bundle:
        m = bundle.manifest
        assert m.schema_version == FEATURES_SCHEMA
        assert m.input.shape == [None, WINDOW, 3]  # the raw window the decoders fill
        assert m.input.model_shape == [None, 30]
        assert m.input.preprocessing is not None
        assert m.input.preprocessing.names[:2] == ["accel_x_rms", "accel_x_peak"]
        assert bundle.golden.inputs.shape[1:] == (WINDOW, 3)  # golden holds raw windows
        parity = m.artifacts[0].parity
        assert parity is not None
        assert parity.passed
        assert parity.top1_agreement == 1.0
        loaded = selftest.load(bundle)
        assert loaded.selftest.passed
        loaded.backend.close()
        from floorline.edge.bundle.report import describe  # noqa: PLC0415

        assert "features   30 computed at 1000 Hz by stats, bands, envelope" in describe(bundle)


def test_the_self_test_fails_when_the_gateways_features_differ(
    feature_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from floorline.edge.bundle import selftest  # noqa: PLC0415
    from floorline.edge.errors import SelfTestError  # noqa: PLC0415

    real = features.compute
    monkeypatch.setattr(features, "compute", lambda w, s, c: real(w, s, c) * 1.5)
    with Bundle.open(feature_bundle) as bundle, pytest.raises(SelfTestError):
        selftest.load(bundle)


@pytest.mark.parametrize(("edit", "message"), [
    ({"blocks": [{"type": "bands", "bands": [[100, 600]]}]}, "above Nyquist (500 Hz"),
    ({"sample_rate": 0}, "preprocessing.sample_rate"),
    ({"blocks": [{"type": "fft"}]}, "preprocessing.blocks[0].type"),
])
def test_hostile_stage_parameters_are_refused_at_conversion_in_one_line(
    tmp_path: Path, edit: dict[str, Any], message: str, feature_bundle: Path
) -> None:
    card = json.loads(json.dumps(CARD))
    card["preprocessing"].update(edit)
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(card))
    model = feature_bundle.parent / "forest.joblib"
    code, _, err = _convert(["sklearn", str(model), "--card",
                             str(tmp_path / "card.yaml"), "--out", str(tmp_path / "out")])
    lines = [ln for ln in err.splitlines() if ln.startswith("floorline-convert: error")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]


def test_a_model_fitted_on_features_in_another_order_is_refused(
    tmp_path: Path, feature_bundle: Path
) -> None:
    import joblib  # noqa: PLC0415

    model = joblib.load(feature_bundle.parent / "forest.joblib")
    with Bundle.open(feature_bundle) as bundle:
        assert bundle.manifest.input.preprocessing is not None
        names = list(bundle.manifest.input.preprocessing.names)
    # As if fitted on a DataFrame whose columns were in another order (pandas is not needed).
    model.feature_names_in_ = np.asarray([names[1], names[0], *names[2:]], dtype=object)
    joblib.dump(model, tmp_path / "swapped.joblib")
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(CARD))
    code, _, err = _convert(["sklearn", str(tmp_path / "swapped.joblib"), "--card",
                             str(tmp_path / "card.yaml"), "--out", str(tmp_path / "out")])
    assert code == 1
    assert "fitted on features in another order (column 0 is 'accel_x_peak'" in err
    assert not (tmp_path / "out").exists()
    model.feature_names_in_ = np.asarray(names, dtype=object)  # the right order converts
    joblib.dump(model, tmp_path / "named.joblib")
    code, _, err = _convert(["sklearn", str(tmp_path / "named.joblib"), "--card",
                             str(tmp_path / "card.yaml"), "--out", str(tmp_path / "out")])
    assert code == 0, err


def test_the_daemon_runs_the_feature_stage_on_raw_windows_against_mosquitto(
    feature_bundle: Path, mosquitto: Any, mqtt_client: Any, unique_topic: str
) -> None:
    from floorline.edge.backends import create  # noqa: PLC0415
    from floorline.edge.demo.signals import Condition  # noqa: PLC0415
    from tests.daemon_harness import (  # noqa: PLC0415
        asset_samples,
        config_text,
        running,
        sample_payload,
        vibration_pipeline,
    )

    streams = {
        "pump-a": asset_samples(512, seed=1),
        "pump-b": asset_samples(512, seed=2, condition=Condition.BEARING_OUTER_RACE),
    }
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    cfg = config_text(mosquitto, vibration_pipeline(unique_topic, backend="onnx",
                                                    bundle=feature_bundle))
    windows_each = (512 - WINDOW) // 32 + 1
    with running(cfg):
        for i in range(512):
            for n, (asset, samples) in enumerate(streams.items()):
                probe.publish(f"{unique_topic}/{asset}/vibration",
                              sample_payload(1000.0 * (n + 1) + i / 1000, i, samples[i]), qos=1)
        msgs = probe.wait_for(2 * windows_each, "floorline/gw-test/pred/vibration/+", timeout=30)
    with Bundle.open(feature_bundle) as bundle:
        spec, labels = bundle.manifest.input, bundle.manifest.heads[0].labels
        runner = create("onnx", bundle.path / "model.onnx")
        try:
            for asset, samples in streams.items():
                got = sorted((b for b in (orjson.loads(m.payload) for m in msgs)
                              if b["asset"] == asset), key=lambda b: b["seq"])
                assert [b["seq"] for b in got] == list(range(windows_each))
                x = np.stack([samples[s : s + WINDOW] for s in range(0, 512 - WINDOW + 1, 32)])
                want = runner.infer(model_input(x, spec))
                for body, row in zip(got, want, strict=True):
                    scores = np.array([body["scores"][label] for label in labels or []])
                    assert np.abs(scores - row).max() <= 1e-6
        finally:
            runner.close()
    assert labels is not None
    verdicts = {b["asset"]: b["label"] for b in (orjson.loads(m.payload) for m in msgs)}
    assert verdicts["pump-b"] == Condition.BEARING_OUTER_RACE.value


def test_the_bundle_without_a_stage_is_unchanged_by_the_stage_code(tmp_path: Path) -> None:
    # Backward compatibility: the committed example bundle's model input is its normalization.
    from floorline.edge.stream.normalization import normalize  # noqa: PLC0415

    example = Path(__file__).resolve().parent.parent / "edge/models/pdm-classifier"
    shutil.copytree(example, tmp_path / "b")
    with Bundle.open(tmp_path / "b") as bundle:
        spec = bundle.manifest.input
        assert spec.preprocessing is None
        assert spec.model_shape == spec.shape
        w = np.random.default_rng(0).standard_normal((4, *spec.shape[1:])).astype(np.float32)
        np.testing.assert_array_equal(model_input(w, spec), normalize(w, spec))
