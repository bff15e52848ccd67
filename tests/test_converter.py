"""The converter end to end: real Keras models → every target → parity → bundle → backends."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from floorline.converter.card import ModelCard
from floorline.converter.cli import main as convert_main
from floorline.converter.convert import TARGETS, ConvertRequest, convert
from floorline.converter.errors import (
    CalibrationDataError,
    ModelCardError,
    ParityError,
    SourceModelError,
    UnsupportedOpError,
)
from floorline.converter.parity import ParityPolicy, check_artifact
from floorline.edge.backends import create
from floorline.edge.bundle import selftest
from floorline.edge.bundle.bundle import Bundle
from floorline.edge.bundle.manifest import Task, Tolerance
from floorline.edge.bundle.signing import generate_keypair, load_private_key, load_public_key
from floorline.edge.errors import IntegrityError
from tests import tf_models

pytestmark = pytest.mark.tensorflow

CONV_CARD = {
    "name": "conv-test",
    "version": "1.2.3",
    "task": "classification",
    "features": [{"name": n, "unit": "g"} for n in ("a", "b", "c")],
    "labels": list(tf_models.CLASSES),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("models")
    conv = tf_models.make_conv_classifier(root)
    dense = tf_models.make_dense_regressor(root)
    norm = np.load(root / "conv_norm.npy")
    np.save(root / "conv_calib.npy", conv.x[:600])
    px, _ = tf_models.conv_data(400, seed=99)  # held out: other seed
    np.save(root / "conv_parity.npy", px)
    np.save(root / "dense_calib.npy", dense.x[:600])
    np.save(root / "dense_parity.npy", tf_models.dense_data(400, seed=98)[0])
    return {"root": root, "conv": conv, "dense": dense, "norm": norm}


def conv_card(models: dict[str, object], **changes: object) -> ModelCard:
    norm = models["norm"]
    assert isinstance(norm, np.ndarray)
    data = {**CONV_CARD, "normalization": {"mean": norm[0].tolist(), "std": norm[1].tolist()}}
    return ModelCard.model_validate({**data, **changes})


def conv_request(models: dict[str, object], out: Path, **changes: object) -> ConvertRequest:
    root = models["root"]
    assert isinstance(root, Path)
    conv = models["conv"]
    assert isinstance(conv, tf_models.Made)
    base: dict[str, object] = {
        "source": conv.path,
        "out": out,
        "card": conv_card(models),
        "targets": list(TARGETS),
        "calibration": root / "conv_calib.npy",
        "parity_data": root / "conv_parity.npy",
    }
    base.update(changes)
    return ConvertRequest(**base)  # type: ignore[arg-type]


def keras_predict(path: Path, x: np.ndarray) -> np.ndarray:
    import keras  # noqa: PLC0415

    return np.asarray(keras.models.load_model(path, compile=False)(x, training=False))


def test_conv1d_classifier_round_trips_to_every_target(models, tmp_path):
    out = tmp_path / "conv-bundle"
    result = convert(conv_request(models, out), say=lambda _m: None)
    conv = models["conv"]
    with Bundle.open(result.bundle) as bundle:
        files = {a.file: a for a in bundle.manifest.artifacts}
        assert set(files) == {t.file for t in TARGETS.values()}
        assert bundle.manifest.input.shape == [None, tf_models.WINDOW, 3]
        assert bundle.manifest.input.features[0].unit == "g"
        assert files["model.onnx"].opset == 17
        # Fresh inputs, not the parity set: the artifacts must agree with Keras in general.
        fresh, _ = tf_models.conv_data(64, seed=1234)
        from floorline.edge.stream.normalization import normalize  # noqa: PLC0415

        x = normalize(fresh, bundle.manifest.input)
        expected = keras_predict(conv.path, x)
        for art in bundle.manifest.artifacts:
            assert art.parity is not None
            assert art.parity.passed
            loaded = selftest.load(bundle, artifact=art.file)
            got = loaded.backend.infer(x)
            loaded.backend.close()
            agreement = np.mean(got.argmax(1) == expected.argmax(1))
            if art.quantization == "float32":
                assert np.abs(got - expected).max() <= 1e-5, art.file
            else:
                assert agreement >= 0.98, (art.file, agreement)


def test_dense_regressor_round_trips_to_every_target(models, tmp_path):
    root = models["root"]
    dense = models["dense"]
    out = tmp_path / "dense-bundle"
    card = ModelCard(name="dense-test", task=Task.REGRESSION)
    req = ConvertRequest(
        source=dense.path,
        out=out,
        card=card,
        targets=list(TARGETS),
        calibration=root / "dense_calib.npy",
        parity_data=root / "dense_parity.npy",
        # int8 saturates inputs outside the calibrated range; a regression's worst case shows it.
        policy=ParityPolicy(quantized_atol=1.0),
    )
    convert(req, say=lambda _m: None)
    x = tf_models.dense_data(50, seed=4321)[0]
    expected = keras_predict(dense.path, x)
    with Bundle.open(out) as bundle:
        assert bundle.manifest.input.window == 1
        assert [f.name for f in bundle.manifest.input.features][:2] == ["feature_0", "feature_1"]
        spread = float(np.ptp(expected))
        assert spread > 1.0  # a target with real range, so the bounds below mean something
        for art in bundle.manifest.artifacts:
            loaded = selftest.load(bundle, artifact=art.file)
            got = loaded.backend.infer(x)
            loaded.backend.close()
            err = np.abs(got - expected)
            if art.quantization == "float32":
                assert err.max() <= 1e-5, art.file
            else:
                assert err.max() <= 1.0, art.file
                assert err.mean() <= 0.02 * spread, art.file


@pytest.mark.parametrize("io", ["int8", "uint8"])
def test_int8_artifact_quantizes_inputs_and_dequantizes_outputs(models, tmp_path, io):
    out = tmp_path / f"int8-{io}"
    convert(
        conv_request(models, out, targets=["tflite-int8"], integer_io=io), say=lambda _m: None
    )
    with Bundle.open(out) as bundle:
        backend = create("litert", bundle.path / "model.int8.tflite")
        assert backend.input_spec.dtype == np.dtype(io)
        assert backend.input_spec.quant is not None
        assert backend.output_spec.quant is not None
        x = bundle.golden.inputs
        got = backend.infer(x)
        assert got.dtype == np.float32
        # Softmax outputs, dequantized: real probabilities, not raw integers.
        assert np.all(got >= -1e-6)
        assert np.all(got <= 1 + 1e-6)
        assert np.allclose(got.sum(1), 1.0, atol=0.05)
        agree = np.mean(got.argmax(1) == bundle.golden.source_outputs.argmax(1))
        assert agree >= 0.9


def test_h5_and_savedmodel_sources_convert(models, tmp_path):
    import keras  # noqa: PLC0415

    conv = models["conv"]
    model = keras.models.load_model(conv.path, compile=False)
    h5 = tmp_path / "conv.h5"
    model.save(h5)
    saved = tmp_path / "saved"
    model.export(saved, format="tf_saved_model", verbose=False)
    for source, fmt in ((h5, "h5"), (saved, "savedmodel")):
        out = tmp_path / f"from-{fmt}"
        convert(
            conv_request(models, out, source=source, targets=["tflite", "onnx"]),
            say=lambda _m: None,
        )
        with Bundle.open(out) as bundle:
            assert bundle.manifest.source.format == fmt
            for art in bundle.manifest.artifacts:
                assert art.parity is not None
                assert art.parity.max_abs_error <= 1e-5


def test_parity_detects_a_corrupted_onnx_artifact(models, tmp_path):
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    out = tmp_path / "ok"
    convert(conv_request(models, out, targets=["onnx"]), say=lambda _m: None)
    model = onnx.load(str(out / "model.onnx"))
    weights = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(weights).copy()
    arr.flat[: arr.size // 4] *= -1.0  # a quarter of the largest weight tensor flipped
    weights.CopyFrom(numpy_helper.from_array(arr, weights.name))
    corrupted = tmp_path / "corrupted.onnx"
    onnx.save(model, str(corrupted))
    with Bundle.open(out) as bundle:
        x = bundle.golden.inputs
        source = bundle.golden.source_outputs
        heads = bundle.manifest.heads
    report, backend = check_artifact(
        corrupted, "onnx", x, source, heads, [Tolerance(max_abs_error=1e-4)]
    )
    backend.close()
    assert not report.passed
    assert report.max_abs_error > 1e-4


def test_failed_parity_fails_the_conversion_and_writes_nothing(models, tmp_path, monkeypatch):
    import floorline.converter.convert as conv_mod  # noqa: PLC0415

    real_export = conv_mod.export_tflite

    def export_then_corrupt(source, quantization, out, **kwargs):
        # The exporter "corrupts" the weights: same graph and shapes, different numbers.
        import keras  # noqa: PLC0415

        clone = keras.models.clone_model(source.model)
        clone.set_weights([w * 1.3 + 0.05 for w in source.model.get_weights()])
        return real_export(dataclasses.replace(source, model=clone), quantization, out, **kwargs)

    monkeypatch.setattr(conv_mod, "export_tflite", export_then_corrupt)
    out = tmp_path / "never"
    with pytest.raises(ParityError) as info:
        convert(conv_request(models, out, targets=["tflite"]), say=lambda _m: None)
    assert not out.exists()
    assert not list(tmp_path.glob(".never.staging-*"))
    assert "model.tflite" in str(info.value)
    assert "FAIL" in str(info.value)


def test_parity_failure_message_names_artifact_and_bound(models, tmp_path):
    # An impossible float bound makes the honest artifact fail: the message shows the table.
    out = tmp_path / "strict"
    with pytest.raises(ParityError) as info:
        convert(
            conv_request(
                models, out, targets=["tflite-fp16"], policy=ParityPolicy(min_agreement=1.01)
            ),
            say=lambda _m: None,
        )
    assert "model.fp16.tflite" in str(info.value)
    assert "agree >= 101.0%" in str(info.value)
    assert not out.exists()


def test_unsupported_op_is_named_and_nothing_is_written(tmp_path):
    import tensorflow as tf  # noqa: PLC0415

    class Det(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.ones((16, 2)))

        @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32)])
        def serve(self, x):
            det = tf.linalg.det(tf.reshape(x, (-1, 4, 4)))
            return tf.matmul(x, self.w) + det[:, None]

    module = Det()
    saved = tmp_path / "det"
    tf.saved_model.save(module, str(saved), signatures={"serving_default": module.serve})
    out = tmp_path / "det-bundle"
    card = ModelCard(name="det", task=Task.REGRESSION)
    with pytest.raises(UnsupportedOpError) as info:
        convert(ConvertRequest(source=saved, out=out, card=card, targets=["tflite"]), say=print)
    assert "MatrixDeterminant" in str(info.value)
    assert not out.exists()


def test_missing_unreadable_and_unknown_models_are_clear_errors(models, tmp_path):
    card = conv_card(models)
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"this is not a zip file")
    cases = {
        tmp_path / "nope.keras": "no such model",
        garbage: "cannot load the model",
        tmp_path / "model.pt": "unknown model format",
    }
    (tmp_path / "model.pt").write_bytes(b"x")
    for path, words in cases.items():
        with pytest.raises(SourceModelError, match=words):
            convert(ConvertRequest(source=path, out=tmp_path / "o", card=card), say=print)
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (np.zeros((10, 31, 3), np.float32), "does not fit the model input"),
        (np.array([["a", "b", "c"]] * 40), "not numeric"),
        (np.full((5, 32, 3), np.nan, np.float32), "NaN"),
        (np.zeros((10, 3), np.float32), "no complete input"),
    ],
)
def test_bad_calibration_data_is_refused(models, tmp_path, content, words):
    path = tmp_path / "calib.npy"
    np.save(path, content)
    out = tmp_path / "out"
    with pytest.raises(CalibrationDataError, match=words):
        convert(
            conv_request(models, out, targets=["tflite-int8"], calibration=path, parity_data=None),
            say=lambda _m: None,
        )
    assert not out.exists()


def test_calibration_csv_rows_become_windows_and_bad_cells_are_located(models, tmp_path):
    conv = models["conv"]
    rows = conv.x[:200].reshape(-1, 3)
    good = tmp_path / "calib.csv"
    good.write_text("a,b,c\n" + "\n".join(",".join(f"{v:.5f}" for v in r) for r in rows))
    out = tmp_path / "csv-bundle"
    convert(
        conv_request(models, out, targets=["tflite-int8"], calibration=good), say=lambda _m: None
    )
    assert (out / "model.int8.tflite").is_file()
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,five,6\n")
    with pytest.raises(CalibrationDataError, match=r"bad\.csv:2"):
        convert(
            conv_request(models, tmp_path / "o2", targets=["tflite-int8"], calibration=bad),
            say=lambda _m: None,
        )


def test_int8_without_calibration_is_refused(models, tmp_path):
    with pytest.raises(CalibrationDataError, match="--calibration"):
        convert(
            conv_request(models, tmp_path / "o", targets=["tflite-int8"], calibration=None),
            say=lambda _m: None,
        )


def test_card_that_does_not_fit_the_model_is_refused(models, tmp_path):
    card = conv_card(models, labels=["only", "two"])
    with pytest.raises(ModelCardError, match="2 labels"):
        convert(conv_request(models, tmp_path / "o", card=card), say=lambda _m: None)
    card = conv_card(models, window=64)
    with pytest.raises(ModelCardError, match="card window: 64, but the model takes windows of"):
        convert(conv_request(models, tmp_path / "o", card=card), say=lambda _m: None)


def test_signed_bundle_verifies_and_tampering_is_refused(models, tmp_path):
    private, public = generate_keypair(tmp_path / "signer")
    out = tmp_path / "signed"
    convert(
        conv_request(models, out, targets=["tflite"], signing_key=load_private_key(private)),
        say=lambda _m: None,
    )
    key = load_public_key(public)
    with Bundle.open(out, trusted_keys=[key], require_signature=True) as bundle:
        assert bundle.signed_by is not None
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    data = bytearray((tampered / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / "model.tflite").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.tflite"):
        Bundle.open(tampered, trusted_keys=[key], require_signature=True)


def test_cli_converts_inspects_benches_and_refuses_overwrite(models, tmp_path, capsys):
    root = models["root"]
    conv = models["conv"]
    card = tmp_path / "card.yaml"
    norm = models["norm"]
    card.write_text(
        "name: cli-test\nversion: 0.3.0\ntask: classification\n"
        f"labels: [{', '.join(tf_models.CLASSES)}]\n"
        "features: [{name: a, unit: g}, {name: b, unit: g}, {name: c, unit: g}]\n"
        f"normalization: {{mean: {norm[0].tolist()}, std: {norm[1].tolist()}}}\n"
    )
    out = tmp_path / "cli-bundle"
    argv = ["keras", str(conv.path), "--card", str(card), "--out", str(out), "--pack",
            "--targets", "tflite,tflite-int8", "--calibration", str(root / "conv_calib.npy")]
    assert convert_main(argv) == 0
    printed = capsys.readouterr().out
    assert "parity against the source model" in printed
    assert "model.int8.tflite" in printed
    assert (tmp_path / "cli-bundle.tar").is_file()

    assert convert_main(["inspect", str(tmp_path / "cli-bundle.tar")]) == 0
    printed = capsys.readouterr().out
    assert "cli-test 0.3.0 (classification)" in printed
    assert "all file hashes verified" in printed

    assert convert_main(["bench", str(out), "--iterations", "5", "--batches", "1,8"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("model.")]
    assert len(rows) == 4  # two artifacts x two batch sizes

    assert convert_main(argv) == 2  # a usage error, found before TensorFlow loads
    assert "exists" in capsys.readouterr().err


@pytest.mark.slow
def test_example_model_trains_and_converts_to_every_target_within_bounds(tmp_path, capsys):
    from floorline.converter.examples.pdm import main as example_main  # noqa: PLC0415

    out = tmp_path / "pdm"
    argv = ["--out", str(out), "--work", str(tmp_path / "work"), "--targets", "all"]
    assert example_main(argv) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    with Bundle.open(out) as bundle:
        reports = {a.quantization + "/" + a.format: a.parity for a in bundle.manifest.artifacts}
    assert set(reports) == {
        "float32/tflite", "float16/tflite", "dynamic/tflite", "int8/tflite", "float32/onnx"
    }
    for key, parity in reports.items():
        assert parity is not None
        assert parity.passed, key
        if key.startswith("float32"):
            assert parity.max_abs_error <= 1e-5, key
        else:
            assert parity.top1_agreement is not None
            assert parity.top1_agreement >= 0.99, key
