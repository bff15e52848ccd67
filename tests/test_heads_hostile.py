"""Hostile schema 2 bundles, configs and cards: each is refused at load with a clear error.

A gateway runs unattended: a tampered or hand-made manifest (re-signed, so its hashes verify)
must fail when the bundle is opened or self-tested, naming what is wrong, never deep in the
pipeline at run time and never as a silently wrong prediction. The committed bundles under
tests/data are copied and edited in tmp_path, never changed.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from floorline.edge.backends.base import TensorSpec
from floorline.edge.bundle import selftest
from floorline.edge.bundle.bundle import GOLDEN_FILE, MANIFEST_FILE, SIGNATURE_FILE, Bundle
from floorline.edge.bundle.hashing import sha256_file
from floorline.edge.bundle.manifest import Manifest
from floorline.edge.bundle.signing import load_private_key, sign
from floorline.edge.config.fit import check_fit
from floorline.edge.config.model import PipelineConfig
from floorline.edge.errors import (
    BackendError,
    ConfigError,
    FloorlineError,
    ManifestError,
    SelfTestError,
)
from floorline.edge.stream.encode import PredictionEncoder
from floorline.edge.stream.heads import HeadLayout
from floorline.edge.stream.window import Window
from tests.bundle_factory import FEATURES, WINDOW, manifest_dict
from tests.test_fleet import fleet  # noqa: F401 - the fixture, used by name

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
PUMP = DATA / "pump-heads"
AUTOENCODER = DATA / "vib-autoencoder"
TEMP = DATA / "temp-anomaly"

Arrays = dict[str, np.ndarray]


def tampered(
    dest: Path,
    source: Path,
    manifest: Callable[[dict[str, Any]], None] | None = None,
    golden: Callable[[Arrays], None] | None = None,
    key_file: Path | None = None,
) -> Path:
    """A copy of SOURCE with its manifest (and golden arrays) edited and every hash fixed.

    Signed with KEY_FILE if given, else unsigned: the hashes verify, so only the manifest's
    meaning (and the self-test) can catch the change.
    """
    shutil.copytree(source, dest)
    raw = json.loads((dest / MANIFEST_FILE).read_text())
    if golden is not None:
        with np.load(dest / GOLDEN_FILE) as npz:
            arrays = {k: npz[k] for k in npz.files}
        golden(arrays)
        with (dest / GOLDEN_FILE).open("wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        raw["golden"]["sha256"] = sha256_file(dest / GOLDEN_FILE)
    if manifest is not None:
        manifest(raw)
    data = (json.dumps(raw, indent=2, sort_keys=True) + "\n").encode()
    (dest / MANIFEST_FILE).write_bytes(data)
    (dest / SIGNATURE_FILE).unlink(missing_ok=True)
    if key_file is not None:
        (dest / SIGNATURE_FILE).write_bytes(sign(data, load_private_key(key_file)).to_bytes())
    return dest


def load_each(path: Path) -> list[FloorlineError]:
    """Open PATH and load every artifact; the error each raised (a test wants one per artifact)."""
    with Bundle.open(path) as bundle:
        return [e for art in bundle.manifest.artifacts if (e := _load_error(bundle, art.file))]


def _load_error(bundle: Bundle, file: str) -> FloorlineError | None:
    try:
        loaded = selftest.load(bundle, artifact=file)
    except FloorlineError as exc:
        return exc
    loaded.backend.close()
    return None


def _outputs(edit: Callable[[list[str]], list[str]]) -> Callable[[dict[str, Any]], None]:
    def apply(raw: dict[str, Any]) -> None:
        for art in raw["artifacts"]:
            art["outputs"] = edit(list(art["outputs"]))

    return apply


# --- artifact outputs and heads that do not fit the model -----------------------------------------


def test_an_output_tensor_that_does_not_exist_is_a_backend_error_naming_it(tmp_path):
    path = tampered(tmp_path / "b", PUMP, _outputs(lambda o: [o[0], "nope:0"]))
    errors = load_each(path)
    assert len(errors) == 2
    for exc in errors:
        assert isinstance(exc, BackendError)
        assert "no output tensor named nope:0" in str(exc)


def test_an_output_tensor_named_twice_is_refused_by_the_manifest(tmp_path):
    def same_twice(raw: dict[str, Any]) -> None:
        # rms made as wide as fault, so the sizes alone would not give it away.
        raw["outputs"][1].update(shape=[None, 4], units=None)
        for art in raw["artifacts"]:
            art["outputs"] = [art["outputs"][0], art["outputs"][0]]

    path = tampered(tmp_path / "b", PUMP, same_twice)
    with pytest.raises(ManifestError, match="names a tensor twice"):
        Bundle.open(path)


def _widen_rms(raw: dict[str, Any]) -> None:
    raw["outputs"][1].update(shape=[None, 2], units=["g", "g"])


def _pad_golden(arrays: Arrays) -> None:
    # Golden outputs as wide as the (wrong) heads say: the self-test's shape check cannot catch it.
    for k in arrays:
        if k != "inputs":
            arrays[k] = np.concatenate([arrays[k], arrays[k][:, -1:]], axis=1)


def test_heads_wider_than_the_model_outputs_fail_at_load_not_in_the_pipeline(tmp_path):
    # Was: a bare ValueError ("cannot reshape array") from the self-test's head split, and with
    # golden data matching the heads, from the pipeline's first batch.
    path = tampered(tmp_path / "b", PUMP, _widen_rms, _pad_golden)
    errors = load_each(path)
    assert len(errors) == 2
    for exc in errors:
        assert isinstance(exc, BackendError)
        assert "head rms has 2" in str(exc)
        assert "has 1 values per window" in str(exc)


def test_heads_in_the_wrong_order_with_golden_to_match_fail_at_load(tmp_path):
    def reorder(arrays: Arrays) -> None:
        for k in arrays:
            if k != "inputs":
                arrays[k] = np.concatenate([arrays[k][:, 4:], arrays[k][:, :4]], axis=1)

    path = tampered(tmp_path / "b", PUMP, _outputs(lambda o: o[::-1]), reorder)
    errors = load_each(path)
    assert len(errors) == 2
    assert all(isinstance(e, BackendError) and "head fault has 4" in str(e) for e in errors)


def test_a_schema1_output_wider_than_the_model_fails_at_load(tmp_path):
    # One head: nothing used to compare its width with the model's; the extra value was read as
    # garbage or silently ignored.
    def wider(raw: dict[str, Any]) -> None:
        raw["output"]["shape"] = [None, 2]

    path = tampered(tmp_path / "b", TEMP, wider, _pad_golden)
    errors = load_each(path)
    assert len(errors) == 2
    assert all(isinstance(e, BackendError) and "head output has 2" in str(e) for e in errors)


def test_a_row_width_the_heads_do_not_add_up_to_is_a_selftest_error(tmp_path):
    # A runtime that does not report static output shapes (dims unknown) is caught on the golden
    # run by the row width.
    path = tampered(tmp_path / "b", PUMP, _widen_rms, _pad_golden)
    with Bundle.open(path) as bundle:
        art = bundle.artifact("model.onnx")

        class Dynamic:
            name = runtime = "fake"
            input_spec = TensorSpec("x", (None, 32, 3), np.dtype(np.float32))
            output_specs = ()

            def infer(self, batch: np.ndarray) -> np.ndarray:
                return np.zeros((len(batch), 5), np.float32)

        with pytest.raises(SelfTestError, match=r"returns 5 values .* add up to 6"):
            selftest.run(Dynamic(), bundle, art)  # type: ignore[arg-type]


def test_a_manifest_window_the_model_does_not_take_fails_at_load_not_per_batch(tmp_path):
    # Was: loaded (the golden inputs fit the model), then every window the pipeline built from
    # the manifest's shape failed in the backend, batch after batch.
    def window16(raw: dict[str, Any]) -> None:
        raw["input"].update(shape=[None, 16, 3], window=16)

    errors = load_each(tampered(tmp_path / "pump", PUMP, window16))
    assert len(errors) == 2
    assert all(isinstance(e, BackendError) and "the model takes inputs ('n', 32, 3), but the "
               "manifest's input is ('n', 16, 3)" in str(e) for e in errors)

    def same_size(raw: dict[str, Any]) -> None:
        # 16 x 6 is 32 x 3: the reconstruction's size still fits; only the shape tells.
        raw["input"].update(shape=[None, 16, 6], window=16, normalization=None)
        raw["input"]["features"] += [{"name": f"x{i}", "unit": ""} for i in range(3)]
        raw["outputs"][0]["shape"] = [None, 16, 6]

    errors = load_each(tampered(tmp_path / "ae", AUTOENCODER, same_size))
    assert len(errors) == 2
    assert all(isinstance(e, BackendError) and "('n', 16, 6)" in str(e) for e in errors)


def test_the_committed_bundles_still_load_on_every_artifact():
    for name in ("pump-heads", "vib-autoencoder", "vib-lstm", "temp-anomaly"):
        assert load_each(DATA / name) == [], name


# --- manifest rules -------------------------------------------------------------------------------


def _raw(heads: list[dict[str, Any]], task: str, **input_: Any) -> dict[str, Any]:
    raw = manifest_dict()
    raw["task"] = task
    raw["outputs"] = heads
    raw["input"].update(input_)
    for art in raw["artifacts"]:
        art["outputs"] = [f"t{i}" for i in range(len(heads))] if len(heads) > 1 else None
    return raw


def _recon(shape: list[int | None], threshold: float = 0.5) -> dict[str, Any]:
    return {"name": "reconstruction", "task": "anomaly", "shape": shape,
            "score": {"metric": "mse", "threshold": threshold}}


def test_a_reconstruction_head_on_a_per_sample_model_must_match_its_input():
    per_sample = {"shape": [None, 3], "window": 1, "normalization": None}
    with pytest.raises(ManifestError, match="must equal the input's"):
        Manifest.from_bytes(json.dumps(_raw([_recon([None, WINDOW, 3])], "anomaly",
                                            **per_sample)).encode())
    # A per-sample autoencoder reconstructing its one sample is fine: score, then 3 shares.
    m = Manifest.model_validate(_raw([_recon([None, 3])], "anomaly", **per_sample))
    assert HeadLayout(m).widths == [4]


def test_a_score_threshold_of_zero_is_refused_it_would_flag_every_window(tmp_path):
    def zero(raw: dict[str, Any]) -> None:
        raw["outputs"][0]["score"]["threshold"] = 0.0

    path = tampered(tmp_path / "b", AUTOENCODER, zero)
    with pytest.raises(ManifestError, match=r"outputs\.0\.score\.threshold.*greater than 0"):
        Bundle.open(path)


@pytest.mark.parametrize(
    ("head", "words"),
    [
        ({"name": "fault", "task": "classification", "shape": [None, 2], "labels": ["ok", "bad"],
          "thresholds": {"bda": 0.5}}, "thresholds bda name nothing"),
        ({"name": "rul", "task": "regression", "shape": [None, 1], "thresholds": {"rul": 9.0}},
         "thresholds rul name nothing"),
        (dict(_recon([None, WINDOW, 3]), thresholds={"anomaly": 0.1}),
         "thresholds anomaly name nothing"),
    ],
)
def test_a_head_threshold_the_gateway_would_never_read_is_refused(head, words):
    with pytest.raises(ManifestError, match=words):
        Manifest.from_bytes(json.dumps(_raw([head], head["task"])).encode())


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda r: r.update(outputs=[dict(r["output"], task="classification")]),
         "has 'output' and no 'outputs'"),
        (lambda r: r["artifacts"][0].update(outputs=["x"]), "have no 'outputs'"),
        (lambda r: r["output"].update(score={"metric": "mse", "threshold": 1.0}),
         "output.score: Extra inputs"),
    ],
)
def test_a_schema1_manifest_with_schema2_keys_is_refused(edit, words):
    raw = manifest_dict(schema=1)
    edit(raw)
    with pytest.raises(ManifestError, match=words):
        Manifest.from_bytes(json.dumps(raw).encode())


def test_a_schema2_manifest_with_the_schema1_output_is_refused():
    raw = manifest_dict()
    raw["output"] = {"name": "output", "shape": [None, 2], "labels": ["ok", "bad"]}
    with pytest.raises(ManifestError, match="has 'outputs' and no 'output'"):
        Manifest.from_bytes(json.dumps(raw).encode())
    del raw["outputs"]
    raw["schema_version"] = 2
    with pytest.raises(ManifestError, match="has 'outputs' and no 'output'"):
        Manifest.from_bytes(json.dumps(raw).encode())


def test_a_huge_number_of_heads_is_refused_by_the_manifest():
    heads = [{"name": f"h{i}", "task": "regression", "shape": [None, 1]} for i in range(10_000)]
    with pytest.raises(ManifestError, match="outputs: List should have at most 256 items"):
        Manifest.from_bytes(json.dumps(_raw(heads, "regression")).encode())


def test_many_heads_that_the_model_does_not_have_fail_at_load(tmp_path):
    def many(raw: dict[str, Any]) -> None:
        raw["outputs"] += [dict(raw["outputs"][1], name=f"extra{i}") for i in range(200)]
        for art in raw["artifacts"]:
            art["outputs"] += [f"ghost{i}" for i in range(200)]

    errors = load_each(tampered(tmp_path / "b", PUMP, many))
    assert len(errors) == 2
    assert all(isinstance(e, BackendError) and "no output tensor named ghost0" in str(e)
               for e in errors)


# --- NaN and infinity in what the model returns ---------------------------------------------------


def _windows(n: int) -> list[Window]:
    return [Window(f"a{i}", np.zeros((WINDOW, 3), np.float32), 1.0 + i, 2.0 + i, 5.0, i)
            for i in range(n)]


def test_nan_and_inf_in_a_reconstruction_or_a_head_keep_the_json_valid_and_flag_anomalous():
    heads = [
        _recon([None, WINDOW, len(FEATURES)]),
        {"name": "rul", "task": "regression", "shape": [None, 1], "units": ["h"]},
        {"name": "fault", "task": "classification", "shape": [None, 2], "labels": ["ok", "bad"],
         "thresholds": {"bad": 0.5}},
    ]
    manifest = Manifest.model_validate(_raw(heads, "anomaly"))
    inputs = np.zeros((3, WINDOW, 3), np.float32)
    recon = inputs.copy()
    recon[0, 0, 0], recon[1, 0, 0] = np.nan, np.inf
    raw = np.concatenate([
        recon.reshape(3, -1),
        np.array([[np.nan], [np.inf], [1.0]], np.float32),
        np.array([[np.nan, 0.2], [np.inf, -np.inf], [0.1, 0.9]], np.float32),
    ], axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        values = HeadLayout(manifest).values(inputs, raw)
    encoder = PredictionEncoder(gateway="g", pipeline="p", manifest=manifest,
                                artifact=manifest.artifacts[0], topic_template="t/{asset}")
    messages = [orjson.loads(m) for m in
                encoder.encode_batch(_windows(3), values, inference_ms=1.0, now=6.0)]
    for msg in messages:
        json.loads(json.dumps(msg, allow_nan=False))  # strict JSON: null, never NaN
        assert type(msg["heads"]["reconstruction"]["anomaly"]["anomalous"]) is bool
    nan, inf, ok = (m["heads"] for m in messages)
    # Was: a NaN score (null) said anomalous: false, as if the window were normal.
    assert nan["reconstruction"]["anomaly"]["score"] is None
    assert nan["reconstruction"]["anomaly"]["anomalous"] is True
    assert inf["reconstruction"]["anomaly"]["anomalous"] is True
    assert ok["reconstruction"]["anomaly"] == {
        "score": 0.0, "threshold": 0.5, "anomalous": False, "metric": "mse",
        "features": dict.fromkeys(FEATURES, 0.0)}
    assert nan["rul"] == {"value": None, "unit": "h"}
    assert nan["fault"]["label"] == "ok"
    assert nan["fault"]["scores"]["ok"] is None
    assert ok["fault"] == {"label": "bad", "score": pytest.approx(0.9),
                           "scores": {"ok": pytest.approx(0.1), "bad": pytest.approx(0.9)},
                           "alerts": ["bad"]}


def test_a_nan_score_of_a_schema1_anomaly_model_is_flagged_too():
    raw = manifest_dict(schema=1)
    raw["task"] = "anomaly"
    raw["output"].update(labels=None, shape=[None, 1], thresholds={"anomaly": 0.5})
    manifest = Manifest.model_validate(raw)
    encoder = PredictionEncoder(gateway="g", pipeline="p", manifest=manifest,
                                artifact=manifest.artifacts[0], topic_template="t")
    (msg,) = encoder.encode_batch(_windows(1), np.array([[math.nan]], np.float32),
                                  inference_ms=1.0, now=6.0)
    assert orjson.loads(msg)["anomaly"] == {"score": None, "threshold": 0.5, "anomalous": True}


# --- check / config fit ---------------------------------------------------------------------------


def _pipeline(bundle: Path, **extra: Any) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "name": "p", "subscribe": ["a/+"], "bundle": str(bundle),
        "decoder": {"type": "json", "timestamp": "ts"}, **extra,
    })


@pytest.mark.parametrize(("key", "value"), [("labels", ["a", "b", "c", "d"]),
                                            ("thresholds", {"imbalance": 0.5})])
def test_pipeline_labels_or_thresholds_for_a_multi_head_bundle_are_refused(key, value):
    manifest = Bundle.open(PUMP).manifest
    with pytest.raises(ConfigError, match=rf"^{key}: the model has 2 heads \(fault, rms\)"):
        check_fit(_pipeline(PUMP, **{key: value}), manifest)


def test_an_autoencoder_pipeline_threshold_overrides_labels_and_bad_ones_are_refused():
    manifest = Bundle.open(AUTOENCODER).manifest
    check_fit(_pipeline(AUTOENCODER, thresholds={"anomaly": 2.5}), manifest)
    encoder = PredictionEncoder(gateway="g", pipeline="p", manifest=manifest,
                                artifact=manifest.artifacts[0], topic_template="t",
                                thresholds={"anomaly": 2.5})
    row = np.array([[2.0, 0.5, 0.25, 0.25]], np.float32)
    (msg,) = encoder.encode_batch(_windows(1), row, inference_ms=1.0, now=6.0)
    anomaly = orjson.loads(msg)["anomaly"]
    assert (anomaly["threshold"], anomaly["anomalous"]) == (2.5, False)
    with pytest.raises(ConfigError, match=r"^labels: the model is an autoencoder"):
        check_fit(_pipeline(AUTOENCODER, labels=["x"]), manifest)
    with pytest.raises(ConfigError, match=r"^thresholds: 'score' is not a label"):
        check_fit(_pipeline(AUTOENCODER, thresholds={"score": 2.5}), manifest)
    with pytest.raises(ConfigError, match=r"^thresholds: anomaly 0\.0 would flag every window"):
        check_fit(_pipeline(AUTOENCODER, thresholds={"anomaly": 0.0}), manifest)


def test_floorline_check_names_the_key_for_a_multi_head_bundle(tmp_path, capsys):
    from tests.test_check import check, pipeline, write_config  # noqa: PLC0415

    entry = pipeline(extra="    thresholds: {imbalance: 0.5}\n").replace(
        str(ROOT / "edge" / "models" / "pdm-classifier"), str(PUMP))
    entry = entry.replace("{type: json, timestamp: ts, sequence: seq}",
                          "{type: json, timestamp: ts, sequence: seq}\n    window: {hop: 32}")
    cfg = write_config(tmp_path, entry)
    assert check(cfg) == 1
    out = capsys.readouterr().out
    assert (f"{cfg}:11: pipelines[0] (vibration): thresholds: the model has 2 heads "
            "(fault, rms)") in out
    cfg = write_config(tmp_path, entry.replace("    thresholds: {imbalance: 0.5}\n", ""))
    assert check(cfg) == 0
    assert "pipeline vibration: ok  pump-heads 0.1.0" in capsys.readouterr().out


# --- the fleet ------------------------------------------------------------------------------------


def test_a_schema2_bundle_pushed_through_the_fleet_runs_and_a_failing_one_is_refused(
    fleet, tmp_path, mqtt_client, mosquitto  # noqa: F811 - the imported fixture
):
    from tests.daemon_harness import asset_samples, sample_payload  # noqa: PLC0415
    from tests.mqtt_broker import wait_until  # noqa: PLC0415
    from tests.test_fleet import GW, model_versions, wait_result  # noqa: PLC0415

    svc = fleet.start()
    probe = mqtt_client(mosquitto)

    def scramble(arrays: Arrays) -> None:
        for k in arrays:
            if k.startswith("expected:"):
                arrays[k] = arrays[k][:, ::-1].copy()

    bad = tampered(tmp_path / "bad", PUMP, golden=scramble, key_file=fleet.key)
    fleet.push(bad)
    result = wait_result(svc, 1)
    assert result["result"] == "rejected", result
    assert "does not reproduce" in result["reason"]
    assert model_versions(svc) == ["1.0.0"]

    good = tampered(tmp_path / "good", PUMP, key_file=fleet.key)
    fleet.push(good)
    result = wait_result(svc, 2)
    assert result["result"] == "applied", result
    wait_until(lambda: model_versions(svc) == ["0.1.0"], 20, "switch to pump-heads")
    probe.subscribe(f"floorline/{GW}/pred/#", qos=1)
    topic = f"{fleet.prefix}/pump-h/vibration"
    for i, row in enumerate(asset_samples(64, seed=72)):
        probe.publish(topic, sample_payload(7000.0 + i / 1000, i, row), qos=1)
    msgs = probe.wait_for(2, f"floorline/{GW}/pred/#", timeout=10)
    for msg in msgs:
        pred = orjson.loads(msg.payload)
        assert pred["model"]["name"] == "pump-heads"
        assert set(pred["heads"]) == {"fault", "rms"}
        assert pred["heads"]["fault"]["label"] in {"healthy", "imbalance",
                                                   "bearing_outer_race", "looseness"}
        assert isinstance(pred["heads"]["rms"]["value"], float)


def test_a_fleet_push_of_a_multi_head_bundle_with_pipeline_thresholds_is_refused(
    fleet, tmp_path  # noqa: F811 - the imported fixture
):
    from tests.test_fleet import model_versions, wait_result  # noqa: PLC0415

    svc = fleet.start()
    good = tampered(tmp_path / "good", PUMP, key_file=fleet.key)
    fleet.push(good, thresholds="{imbalance: 0.5}")
    result = wait_result(svc, 1)
    assert result["result"] == "rejected", result
    assert "thresholds: the model has 2 heads" in result["reason"]
    assert model_versions(svc) == ["1.0.0"]



# --- the converter: cards through floorline-convert -----------------------------------------------


def _convert(capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str, model: Path,
             card: str, *flags: str) -> tuple[int, str]:
    from floorline.converter import cli  # noqa: PLC0415

    path = tmp_path / "card.yaml"
    path.write_text(card)
    code = cli.main([command, str(model), "--out", str(tmp_path / "out"), "--force",
                     "--card", str(path), *flags])
    return code, capsys.readouterr().err


def _one_error(err: str, *words: str) -> str:
    line = err.strip().splitlines()[-1]
    assert line.startswith("floorline-convert: error: "), err
    assert "Traceback" not in err, err
    assert "pydantic" not in err, err
    for word in words:
        assert word in line, (word, line)
    return line


@pytest.fixture(scope="module")
def sk_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests import sklearn_zoo  # noqa: PLC0415

    root = tmp_path_factory.mktemp("sk")
    return {
        "rf": sklearn_zoo.save(sklearn_zoo.rf_classifier(), root, "rf"),
        "iso": sklearn_zoo.save(sklearn_zoo.isolation_forest(), root, "iso"),
    }


def test_sklearn_targets_all_means_onnx(capsys, tmp_path, sk_models):
    # Was: refused ("converts to onnx only"), though --help offers 'all' for every command.
    code, err = _convert(capsys, tmp_path, "sklearn", sk_models["rf"], "name: rf\n",
                         "--targets", "all")
    assert code == 0, err
    manifest = Bundle.open(tmp_path / "out").manifest
    assert [a.format for a in manifest.artifacts] == ["onnx"]


def test_a_sklearn_card_with_the_wrong_feature_count_is_one_clear_error(capsys, tmp_path,
                                                                         sk_models):
    card = "name: rf\nfeatures: [{name: a}, {name: b}, {name: c}]\n"
    code, err = _convert(capsys, tmp_path, "sklearn", sk_models["rf"], card)
    assert code == 1
    _one_error(err, "card features: 3 named, but the model takes 6 per sample")


def test_a_sklearn_card_task_contradicting_the_classifier_is_blamed_on_task(capsys, tmp_path,
                                                                           sk_models):
    # Was: "card labels: [...] given for a regression output" about labels the card never had.
    code, err = _convert(capsys, tmp_path, "sklearn", sk_models["rf"],
                         "name: rf\ntask: regression\n")
    assert code == 2
    _one_error(err, "card task: regression, but the model is a classification model")


def test_a_score_on_an_isolation_forest_says_there_is_nothing_to_reconstruct(capsys, tmp_path,
                                                                             sk_models):
    # Was: "card thresholds.anomaly: 0.0 given next to score", a threshold the card never had.
    code, err = _convert(capsys, tmp_path, "sklearn", sk_models["iso"],
                         "name: iso\ntask: anomaly\nscore: {threshold: 1}\n")
    assert code == 1
    _one_error(err, "card score: the model's output (None, 1) is not a reconstruction")


def test_a_card_score_threshold_of_zero_is_refused_before_conversion(capsys, tmp_path):
    model = tmp_path / "model.keras"
    model.write_bytes(b"never loaded")
    code, err = _convert(capsys, tmp_path, "keras", model,
                         "name: ae\ntask: anomaly\nscore: {threshold: 0}\n")
    assert code == 2
    _one_error(err, "card score.threshold: 0.0 would flag every window", "> 0")


@pytest.fixture(scope="module")
def keras_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests import keras_zoo  # noqa: PLC0415

    root = tmp_path_factory.mktemp("keras")
    keras = keras_zoo._keras()
    keras.utils.set_random_seed(5)
    inp = keras.Input((keras_zoo.WINDOW, keras_zoo.FEATURES))
    flat = keras.layers.Flatten()(inp)
    two = keras.Model(inp, [keras.layers.Dense(1, name="temp")(flat),
                            keras.layers.Dense(1, name="rul")(flat)])
    two.save(root / "two_regressions.keras")
    return {
        "autoencoder": keras_zoo.make_dense_autoencoder(root).path,
        "two_head": keras_zoo.make_two_head(root).path,
        "two_regressions": root / "two_regressions.keras",
    }


FEATURES_CARD = "features: [{name: a}, {name: b}, {name: c}]\nwindow: 32\n"


@pytest.mark.tensorflow
def test_autoencoder_thresholds_anomaly_is_its_score_threshold(capsys, tmp_path, keras_models):
    card = "name: ae\ntask: anomaly\nthresholds: {anomaly: 0.75}\n" + FEATURES_CARD
    code, err = _convert(capsys, tmp_path, "keras", keras_models["autoencoder"], card,
                         "--targets", "tflite")
    assert code == 0, err
    (head,) = Bundle.open(tmp_path / "out").manifest.heads
    assert head.score is not None
    assert (head.score.metric, head.score.threshold, head.thresholds) == ("mse", 0.75, {})
    assert load_each(tmp_path / "out") == []


@pytest.mark.tensorflow
@pytest.mark.parametrize("value", ["0", "-1"])
def test_autoencoder_thresholds_anomaly_of_zero_or_less_is_one_clear_error(
    capsys, tmp_path, keras_models, value
):
    # Was: a pydantic ValidationError traceback out of floorline-convert (for -1 too).
    card = f"name: ae\ntask: anomaly\nthresholds: {{anomaly: {value}}}\n" + FEATURES_CARD
    code, err = _convert(capsys, tmp_path, "keras", keras_models["autoencoder"], card,
                         "--targets", "tflite")
    assert code == 1
    _one_error(err, "card thresholds.anomaly:", "would flag every window")


@pytest.mark.tensorflow
def test_an_autoencoder_card_as_a_classifier_names_the_task_key(capsys, tmp_path, keras_models):
    card = "name: ae\ntask: classification\nlabels: [a, b, c]\n" + FEATURES_CARD
    code, err = _convert(capsys, tmp_path, "keras", keras_models["autoencoder"], card,
                         "--targets", "tflite")
    assert code == 1
    # Was: "card : the model's output ..." (no key).
    _one_error(err, "card task: the model's output 'output' has shape (None, 32, 3)")


@pytest.mark.tensorflow
def test_two_heads_in_the_wrong_order_with_different_shapes_are_one_clear_error(
    capsys, tmp_path, keras_models
):
    card = ("name: two\n" + FEATURES_CARD + "outputs:\n"
            "  - {name: rul, task: regression, units: [h]}\n"
            "  - {name: fault, task: classification, labels: [ok, bearing, imbalance]}\n")
    code, err = _convert(capsys, tmp_path, "keras", keras_models["two_head"], card,
                         "--targets", "tflite")
    assert code == 1
    _one_error(err, "card outputs:", "fault, rul in that order")


@pytest.mark.tensorflow
def test_two_same_shape_heads_named_in_the_wrong_order_are_refused(capsys, tmp_path,
                                                                   keras_models):
    # Was: converted, each head reading the other's tensor; parity cannot see it (the source
    # model and the artifacts are read the same wrong way).
    card = ("name: two\n" + FEATURES_CARD + "outputs:\n"
            "  - {name: rul, task: regression}\n  - {name: temp, task: regression}\n")
    code, err = _convert(capsys, tmp_path, "keras", keras_models["two_regressions"], card,
                         "--targets", "tflite")
    assert code == 1
    _one_error(err, "card outputs: named rul, temp, but the model's outputs are temp, rul")


@pytest.mark.tensorflow
def test_a_two_head_bundle_converted_in_order_loads_on_every_artifact(capsys, tmp_path,
                                                                      keras_models):
    card = ("name: two\n" + FEATURES_CARD + "outputs:\n"
            "  - {name: fault, task: classification, labels: [ok, bearing, imbalance]}\n"
            "  - {name: rul, task: regression, units: [h]}\n")
    code, err = _convert(capsys, tmp_path, "keras", keras_models["two_head"], card,
                         "--targets", "tflite,tflite-int8,onnx", "--calibration",
                         str(_calibration(tmp_path)))
    assert code == 0, err
    assert load_each(tmp_path / "out") == []


def _calibration(tmp_path: Path) -> Path:
    from tests import keras_zoo  # noqa: PLC0415

    path = tmp_path / "calib.npy"
    np.save(path, keras_zoo.windows(600, seed=7)[0])
    return path


@pytest.mark.parametrize("recon", ["exact", "nan"])
def test_a_percentile_threshold_of_zero_or_nan_is_a_calibration_error(recon):
    # Was: a pydantic ValidationError out of the converter (NaN), or (0) a bundle flagging every
    # window.
    from floorline.converter.errors import CalibrationDataError  # noqa: PLC0415
    from floorline.converter.specs import HeadDraft, finish_heads  # noqa: PLC0415
    from floorline.edge.bundle.manifest import Task  # noqa: PLC0415

    calibration = np.ones((20, WINDOW, 3), np.float32)
    reconstruction = calibration.copy()
    if recon == "nan":
        reconstruction[:] = np.nan
    draft = HeadDraft("reconstruction", Task.ANOMALY, [None, WINDOW, 3], None, None, {}, "mse",
                      None, 99.0)
    with pytest.raises(CalibrationDataError, match="p99 of the calibration data's mse is"):
        finish_heads([draft], calibration, [reconstruction])
