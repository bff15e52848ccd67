"""Both backends on the committed example bundle: self-test, batches, quantized I/O, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from floorline.edge.backends import BackendOptions, create
from floorline.edge.bundle import selftest
from floorline.edge.bundle.bundle import Bundle, Golden
from floorline.edge.errors import BackendError, RuntimeMissingError, SelfTestError

EXAMPLE = Path(__file__).resolve().parent.parent / "edge" / "models" / "pdm-classifier"


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return Bundle.open(EXAMPLE)


def test_example_bundle_has_float_tflite_onnx_and_int8_artifacts(bundle):
    kinds = {(a.format, a.quantization) for a in bundle.manifest.artifacts}
    assert {("tflite", "float32"), ("onnx", "float32"), ("tflite", "int8")} <= kinds


@pytest.mark.parametrize("file", ["model.tflite", "model.int8.tflite", "model.onnx"])
def test_every_artifact_passes_its_golden_self_test(bundle, file):
    loaded = selftest.load(bundle, artifact=file)
    try:
        assert loaded.selftest.passed
        assert loaded.selftest.max_abs_error <= loaded.artifact.selftest_atol
        assert loaded.selftest.samples == len(bundle.golden.inputs)
    finally:
        loaded.backend.close()


@pytest.mark.parametrize(("backend", "file"), [("litert", "model.tflite"), ("onnx", "model.onnx")])
def test_dynamic_batch_sizes_give_the_same_rows(bundle, backend, file):
    runner = create(backend, bundle.path / file)
    x = np.concatenate([bundle.golden.inputs] * 3)[:37]
    one_by_one = np.concatenate([runner.infer(x[i : i + 1]) for i in range(len(x))])
    for size in (37, 8, 1, 32):
        got = np.concatenate([runner.infer(x[i : i + size]) for i in range(0, len(x), size)])
        assert np.allclose(got, one_by_one, atol=1e-6), size
    runner.close()


def test_float_backends_agree_with_each_other(bundle):
    lite = create("litert", bundle.path / "model.tflite")
    onnx = create("onnx", bundle.path / "model.onnx")
    x = bundle.golden.inputs
    assert np.abs(lite.infer(x) - onnx.infer(x)).max() <= 1e-5


def test_int8_artifact_takes_and_returns_real_values(bundle):
    runner = create("litert", bundle.path / "model.int8.tflite")
    assert runner.input_spec.dtype in (np.dtype(np.int8), np.dtype(np.uint8))
    assert runner.input_spec.quant is not None
    out = runner.infer(bundle.golden.inputs)
    assert out.dtype == np.float32
    assert np.allclose(out.sum(1), 1.0, atol=0.05)
    source = bundle.golden.source_outputs
    assert np.mean(out.argmax(1) == source.argmax(1)) >= 0.9


@pytest.mark.parametrize(("backend", "file"), [("litert", "model.tflite"), ("onnx", "model.onnx")])
def test_wrong_input_shape_is_a_backend_error(bundle, backend, file):
    runner = create(backend, bundle.path / file)
    with pytest.raises(BackendError, match="does not fit"):
        runner.infer(np.zeros((2, 63, 3), np.float32))
    with pytest.raises(BackendError, match="does not fit"):
        runner.infer(np.zeros((64, 3), np.float32))


def test_missing_tflite_runtime_names_the_extra(bundle, monkeypatch):
    # None in sys.modules makes the import fail, as on a gateway without the package.
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(RuntimeMissingError, match=r"floorline\[litert\]"):
        create("litert", bundle.path / "model.tflite")


def test_tensorflow_is_never_an_automatic_fallback(bundle, monkeypatch):
    # TensorFlow is installed in the dev environment, so falling back to tf.lite would succeed
    # here; "auto" must refuse instead, and only an explicit choice may use it.
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(RuntimeMissingError):
        create("litert", bundle.path / "model.tflite", BackendOptions(interpreter="auto"))


def test_missing_onnxruntime_names_the_extra(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(RuntimeMissingError, match=r"floorline\[onnx\]"):
        create("onnx", bundle.path / "model.onnx")


def test_unknown_backend_and_missing_file_are_clear(bundle, tmp_path):
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'"):
        create("tensorrt", bundle.path / "model.onnx")
    with pytest.raises(BackendError, match="not found"):
        create("onnx", tmp_path / "absent.onnx")
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(BackendError, match="cannot load"):
        create("litert", garbage)


def test_self_test_fails_when_the_runtime_does_not_reproduce_golden_outputs(bundle):
    art = bundle.artifact("model.tflite")
    wrong = dict(bundle.golden.expected)
    wrong[art.file] = wrong[art.file] + 0.01  # as if the runtime computed something else
    doctored = Bundle(
        path=bundle.path,
        manifest=bundle.manifest,
        manifest_sha256=bundle.manifest_sha256,
        signed_by=None,
        golden=Golden(bundle.golden.inputs, bundle.golden.source_outputs, wrong),
        owned_dir=None,
    )
    runner = create("litert", bundle.path / art.file)
    report = selftest.run(runner, doctored, art)
    assert not report.passed
    with pytest.raises(SelfTestError, match="does not reproduce"):
        report.raise_for_failure()


def test_load_prefers_the_named_backend(bundle):
    loaded = selftest.load(bundle, backend="onnx")
    assert loaded.artifact.format == "onnx"
    assert loaded.backend.name == "onnx"
    loaded.backend.close()
    loaded = selftest.load(bundle)
    assert loaded.artifact.file == "model.tflite"  # LiteRT first by default
    loaded.backend.close()


@pytest.mark.tensorflow
def test_tf_lite_interpreter_is_used_when_explicitly_chosen(bundle):
    art = bundle.artifact("model.tflite")
    runner = create("litert", bundle.path / art.file, BackendOptions(interpreter="tensorflow"))
    assert runner.runtime.startswith("tensorflow")
    assert selftest.run(runner, bundle, art).passed
