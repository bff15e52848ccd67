"""The Keras model shapes plants train, through load_source and every exporter.

Recurrent classifiers, autoencoders, two heads, leading Normalization/Rescaling, a fixed source
batch; and the refusals (integer input, masking, normalization mid-graph) with one-line messages.
Artifacts run on the gateway's backends where they have one output, on ai_edge_litert and
onnxruntime directly where they have several.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from floorline.converter.errors import ExportError, SourceModelError
from floorline.converter.onnx_export import export_onnx
from floorline.converter.source import SourceModel, load_source
from floorline.converter.tflite_export import _failure, export_tflite
from floorline.edge.backends import create
from tests import keras_zoo

pytestmark = pytest.mark.tensorflow

HELD_OUT = 256
QUANTIZATIONS = ("float32", "float16", "dynamic", "int8")


class Zoo:
    """Each model trained once per module, on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[str, keras_zoo.Made] = {}

    def __call__(self, name: str) -> keras_zoo.Made:
        if name not in self._made:
            maker: Callable[[Path], keras_zoo.Made] = getattr(keras_zoo, f"make_{name}")
            self._made[name] = maker(self.root)
        return self._made[name]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("keras-zoo"))


def normalized(source: SourceModel, x: np.ndarray) -> np.ndarray:
    """X as the gateway feeds it: (x - mean) / std in float32 when the source folded a layer."""
    if source.normalization is None:
        return x
    mean, std = (np.asarray(v, dtype=np.float32) for v in source.normalization)
    return ((x - mean) / std).astype(np.float32)


def max_rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """Max abs error relative to the output's scale (float32 resolves ~1e-7 of a value)."""
    return float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))


def agreement(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean(got.argmax(-1) == want.argmax(-1)))


def run_tflite_all(path: Path, x: np.ndarray) -> list[np.ndarray]:
    """Every output of a .tflite file, in the file's output order, dequantized."""
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415

    interp = Interpreter(model_path=str(path))
    (detail,) = interp.get_input_details()
    assert detail["shape_signature"][0] == -1  # a free, resizable batch
    interp.resize_tensor_input(detail["index"], list(x.shape))
    interp.allocate_tensors()
    feed = x
    if detail["dtype"] != np.float32:
        scale, zero = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        feed = np.clip(np.round(x / scale + zero), info.min, info.max).astype(detail["dtype"])
    interp.set_tensor(detail["index"], feed)
    interp.invoke()
    outs = []
    for out in interp.get_output_details():
        raw = interp.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            raw = (raw.astype(np.float32) - zero) * scale
        outs.append(np.asarray(raw, dtype=np.float32))
    return outs


def run_onnx_all(path: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort  # noqa: PLC0415

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    return [np.asarray(o, dtype=np.float32) for o in session.run(None, {inp.name: x})]


def export(source: SourceModel, target: str, out: Path, calibration: np.ndarray) -> Any:
    if target == "onnx":
        return export_onnx(source, out)
    return export_tflite(source, target, out, calibration=calibration)  # type: ignore[arg-type]


def suffix(target: str) -> str:
    return "onnx" if target == "onnx" else f"{target}.tflite"


# One recurrent type and one autoencoder here, on the exporters directly; every type goes through
# convert() to every target in tests/test_zoo.py (each costs 10-35 s: run once, not twice).
@pytest.mark.parametrize("kind", ["lstm"])
def test_recurrent_classifier_converts_to_every_target_with_a_free_batch(zoo, tmp_path, kind):
    made = zoo(kind)
    source = load_source(made.path)
    assert any("unrolled" in note for note in source.notes)
    assert source.input_shape == (None, keras_zoo.WINDOW, keras_zoo.FEATURES)
    assert source.output_shapes == [(None, keras_zoo.CLASSES)]
    x, _ = keras_zoo.windows(HELD_OUT, seed=1000)
    (expected,) = source.predict(x)
    # The unrolled model is the original model: same outputs.
    import keras  # noqa: PLC0415

    original = np.asarray(keras.models.load_model(made.path, compile=False)(x), np.float32)
    assert max_rel_error(expected, original) <= 1e-5
    calibration = made.x[:200]
    for target in (*QUANTIZATIONS, "onnx"):
        path = tmp_path / f"{kind}.{suffix(target)}"
        info = export(source, target, path, calibration)
        backend = create("onnx" if target == "onnx" else "litert", path)
        try:
            assert backend.input_spec.shape[0] is None, target
            got = backend.infer(x)
            assert backend.infer(x[:7]).shape == (7, keras_zoo.CLASSES)  # resized batch
        finally:
            backend.close()
        if target in ("float32", "onnx"):
            assert max_rel_error(got, expected) <= 1e-5, (kind, target)
        else:
            assert agreement(got, expected) >= 0.99, (kind, target)
        if target == "dynamic" and info.quantized_tensors == 0:
            assert any("float32 in all but name" in n for n in info.notes)
        if target == "int8":
            assert info.quantized_tensors > 0


@pytest.mark.parametrize("name", ["dense_autoencoder"])
def test_autoencoder_output_is_a_window(zoo, tmp_path, name):
    made = zoo(name)
    source = load_source(made.path)
    assert source.output_shapes == [source.input_shape]
    x, _ = keras_zoo.windows(64, seed=1001)
    (expected,) = source.predict(x)
    for target in ("float32", "int8", "onnx"):
        path = tmp_path / f"{name}.{suffix(target)}"
        export(source, target, path, made.x[:128])
        backend = create("onnx" if target == "onnx" else "litert", path)
        try:
            got = backend.infer(x)
        finally:
            backend.close()
        assert got.shape == x.shape
        if target == "int8":
            assert np.abs(got - expected).mean() <= 0.05 * np.ptp(expected), name
        else:
            assert max_rel_error(got, expected) <= 1e-5, (name, target)


def test_two_head_model_keeps_its_heads_in_model_order(zoo, tmp_path):
    made = zoo("two_head")
    source = load_source(made.path)
    assert source.output_names == ["fault", "rul"]
    assert source.output_shapes == [(None, keras_zoo.CLASSES), (None, 1)]
    x, _ = keras_zoo.windows(HELD_OUT, seed=1002)
    fault, life = source.predict(x)
    assert fault.shape == (HELD_OUT, 3)
    assert life.shape == (HELD_OUT, 1)
    for target in ("float32", "int8", "onnx"):
        path = tmp_path / f"two_head.{suffix(target)}"
        export(source, target, path, made.x[:200])
        outs = run_onnx_all(path, x) if target == "onnx" else run_tflite_all(path, x)
        assert [o.shape for o in outs] == [fault.shape, life.shape], target
        if target == "int8":
            assert agreement(outs[0], fault) >= 0.99
            assert np.abs(outs[1] - life).mean() <= 0.05 * np.ptp(life)
        else:
            assert max_rel_error(outs[0], fault) <= 1e-5, target
            assert max_rel_error(outs[1], life) <= 1e-5, target


def test_leading_normalization_is_folded_into_the_manifest(zoo, tmp_path):
    import keras  # noqa: PLC0415

    made = zoo("normalized")
    original = keras.models.load_model(made.path, compile=False)
    layer = next(la for la in original.layers if isinstance(la, keras.layers.Normalization))
    source = load_source(made.path)
    assert source.normalization is not None
    mean, std = source.normalization
    np.testing.assert_allclose(mean, np.ravel(layer.mean), rtol=1e-6)
    np.testing.assert_allclose(
        std, np.maximum(np.sqrt(np.ravel(layer.variance)), keras.backend.epsilon()), rtol=1e-6
    )
    assert any("folded" in n and "Normalization" in n for n in source.notes)
    flat = source.model._flatten_layers(include_self=False)
    assert not any(isinstance(la, keras.layers.Normalization) for la in flat)

    raw, _ = keras_zoo.raw_windows(HELD_OUT, seed=1003)
    x = normalized(source, raw)
    (expected,) = source.predict(x)
    assert max_rel_error(expected, np.asarray(original(raw), np.float32)) <= 1e-5
    calibration = normalized(source, made.x[:200])
    for target in ("float32", "int8", "onnx"):  # ONNX and int8 both failed with the layer inside
        path = tmp_path / f"normalized.{suffix(target)}"
        export(source, target, path, calibration)
        backend = create("onnx" if target == "onnx" else "litert", path)
        try:
            got = backend.infer(x)
        finally:
            backend.close()
        if target == "int8":
            assert agreement(got, expected) >= 0.99
        else:
            assert max_rel_error(got, expected) <= 1e-5, target


def test_leading_rescaling_is_folded_into_the_manifest(zoo, tmp_path):
    import keras  # noqa: PLC0415

    made = zoo("rescaled")
    original = keras.models.load_model(made.path, compile=False)
    source = load_source(made.path)
    assert source.normalization is not None
    span = keras_zoo.RAW_HIGH - keras_zoo.RAW_LOW
    scale, offset = 2.0 / span, -1.0 - 2.0 * keras_zoo.RAW_LOW / span
    np.testing.assert_allclose(source.normalization[0], -offset / scale, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(source.normalization[1], 1.0 / scale, rtol=1e-5)
    raw, _ = keras_zoo.raw_windows(64, seed=1004)
    x = normalized(source, raw)
    (expected,) = source.predict(x)
    assert max_rel_error(expected, np.asarray(original(raw), np.float32)) <= 1e-5
    for target in ("float32", "onnx"):
        path = tmp_path / f"rescaled.{suffix(target)}"
        export(source, target, path, x)
        (got,) = run_onnx_all(path, x) if target == "onnx" else run_tflite_all(path, x)
        assert max_rel_error(got, expected) <= 1e-5, target


def test_fixed_source_batch_is_retraced_free(zoo, tmp_path):
    import keras  # noqa: PLC0415

    made = zoo("fixed_batch")
    source = load_source(made.path)
    assert source.input_shape[0] is None
    assert any("free batch" in n for n in source.notes)
    x = made.x[:8]
    original = keras.models.load_model(made.path, compile=False)
    want = np.concatenate([np.asarray(original(x[i : i + 4])) for i in (0, 4)])
    (got,) = source.predict(x)
    assert max_rel_error(got, want) <= 1e-5
    export_tflite(source, "float32", tmp_path / "fixed.tflite")
    (tflite,) = run_tflite_all(tmp_path / "fixed.tflite", x[:5])
    assert max_rel_error(tflite, got[:5]) <= 1e-5


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("integer_input", ["uint8", "float32", 'keras.Input(..., dtype="float32")']),
        ("masking", ["Masking", "masking has no meaning", "remove it"]),
        (
            "mid_graph_normalization",
            ["Normalization", "normalization: {mean: [...], std: [...]}", "sqrt(layer.variance)"],
        ),
    ],
)
def test_models_the_gateway_cannot_honour_are_refused_in_one_line(zoo, name, words):
    made = zoo(name)
    with pytest.raises(SourceModelError) as info:
        load_source(made.path)
    message = str(info.value)
    assert "\n" not in message
    assert str(made.path) in message
    for word in words:
        assert word in message, (word, message)


def test_compiler_failures_become_one_line_messages(zoo):
    source = load_source(zoo("gru").path)
    dump = (
        '<unknown>:0: error: loc(callsite(fused["TensorListReserve:", "f/gru/TensorArrayV2"] at '
        'fused["StatefulPartitionedCall:", "x"])): \'tf.TensorListReserve\' op requires '
        "element_shape to be static during TF Lite transformation pass\nmore MLIR\n"
    )
    error = _failure(RuntimeError(dump), "", source, "float32")
    assert isinstance(error, ExportError)
    assert "\n" not in str(error)
    assert "loc(" not in str(error)
    assert "--targets onnx" in str(error)
    assert "TensorListReserve" in error.details

    quant = "<unknown>:0: error: loc(fused[\"x\"]): quantization failed for op 'tfl.while'\n"
    error = _failure(RuntimeError(quant), "", source, "int8")
    message = str(error)
    assert "\n" not in message
    assert re.search(
        r"recurrent layer 'gru\w*' cannot be fully int8-quantized by TFLite; use", message
    )
    assert "use tflite-dynamic or tflite (float)" in message
    assert "quantization failed for op 'tfl.while'" in message
