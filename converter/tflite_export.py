"""TFLite exporter: float32, float16, dynamic-range and full-integer int8 artifacts.

Only TFLite's built-in ops are allowed. "Select TF ops" (Flex) would need TensorFlow's kernels on
the gateway, which is exactly what a gateway does not have; such a model fails here with the ops
named, not later on the shop floor.

Recurrent layers arrive unrolled (:mod:`floorline.converter.keras_prep`), so every artifact keeps
a free, resizable batch dimension. A model with several outputs gets its output tensors in model
output order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from floorline.converter.errors import ExportError, UnsupportedOpError
from floorline.converter.native_output import captured
from floorline.converter.progress import Progress
from floorline.converter.source import SourceModel
from floorline.converter.tensorflow_import import import_tensorflow
from floorline.edge.bundle.manifest import Quantization

IntegerIO = Literal["int8", "uint8", "float32"]

_SELECT_OPS = re.compile(r"TF Select ops: ([^\n]+)")
_NOT_CUSTOM = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")
_CUSTOM_OPS = re.compile(r"Custom ops: ([^\n]+)")
_SIGNATURE_OUTPUT = re.compile(r"output_(\d+)")

_TARGET = {
    "float32": "tflite",
    "float16": "tflite-fp16",
    "dynamic": "tflite-dynamic",
    "int8": "tflite-int8",
}
# TensorType codes in the TFLite schema.
_QUANTIZED_TYPES = {"float16": (1,), "dynamic": (9,), "int8": (9, 17), "float32": ()}


@dataclass
class ExportInfo:
    """What an export wrote, beyond the file."""

    quantized_tensors: int
    """Weight (constant) tensors stored as int8/int4 (dynamic, int8) or float16 (float16)."""
    notes: list[str] = field(default_factory=list)


def unsupported_ops(message: str) -> list[str]:
    """The op names a TFLite ConverterError message blames, in order, without duplicates."""
    found: list[str] = []
    for match in _SELECT_OPS.findall(message) + _CUSTOM_OPS.findall(message):
        found.extend(op.strip() for op in match.split(","))
    found.extend(_NOT_CUSTOM.findall(message))
    return list(dict.fromkeys(op for op in found if op))


def _reason(text: str) -> str:
    """The first compiler error of TEXT as one short line, without MLIR locations."""
    for line in text.splitlines():
        if "error:" in line:
            reason = _strip_location(line[line.index("error:") + len("error:") :].strip())
            reason = reason.split(" during TF Lite transformation pass")[0]
            return reason[:200]
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return first[:200]


def _strip_location(text: str) -> str:
    """TEXT without a leading MLIR ``loc(...)``: and its nested parentheses."""
    if not text.startswith("loc("):
        return text
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and char == ")":
            return text[i + 1 :].lstrip(": ").strip()
    return text


def _recurrent_layers(model: Any) -> list[Any]:
    """The model's recurrent layers, a Bidirectional as one (not its inner two)."""
    _, keras = import_tensorflow()
    flatten = getattr(model, "_flatten_layers", None)
    layers = list(flatten(include_self=False) if flatten else getattr(model, "layers", []))
    inner = {
        id(part)
        for layer in layers
        if isinstance(layer, keras.layers.Bidirectional)
        for part in (layer.forward_layer, layer.backward_layer)
    }
    return [
        layer
        for layer in layers
        if isinstance(layer, (keras.layers.RNN, keras.layers.Bidirectional))
        and id(layer) not in inner
    ]


def _unrolled(layer: Any) -> bool:
    forward = getattr(layer, "forward_layer", None)  # a Bidirectional
    return bool(getattr(forward if forward is not None else layer, "unroll", False))


def _failure(
    exc: Exception, log: str, source: SourceModel, quantization: Quantization
) -> Exception:
    """The one-line error for a failed conversion; the compiler's words go to ``details``."""
    message = f"{exc}\n{log}"
    target = _TARGET[quantization]
    ops = unsupported_ops(message)
    if ops or "not supported by the native TFLite runtime" in message:
        return UnsupportedOpError(ops, details=message)
    recurrent = _recurrent_layers(source.model)
    names = ", ".join(repr(layer.name) for layer in recurrent)
    if "TensorList" in message:
        looped = ", ".join(repr(layer.name) for layer in recurrent if not _unrolled(layer))
        where = f"recurrent layer {looped}" if looped else "a loop over time (a recurrent layer)"
        return ExportError(
            f"{target}: {where} in {source.path.name} was not unrolled, and TFLite's built-in "
            "ops cannot express the loop with a free batch; unrolling needs a fixed window "
            "length (keras.Input((window, features))) and a functional or Sequential .keras/.h5 "
            "model, or convert to ONNX only (--targets onnx)",
            details=message,
        )
    if quantization == "int8" and recurrent:
        return ExportError(
            f"tflite-int8: recurrent layer {names} cannot be fully int8-quantized by TFLite; use "
            f"tflite-dynamic or tflite (float) (TFLite: {_reason(message)})",
            details=message,
        )
    return ExportError(
        f"{target}: TFLite {quantization} conversion of {source.path.name} failed: "
        f"{_reason(message)} (run with -v for the converter's output)",
        details=message,
    )


def export_tflite(
    source: SourceModel,
    quantization: Quantization,
    out: Path,
    *,
    calibration: NDArray[np.float32] | None = None,
    integer_io: IntegerIO = "int8",
) -> ExportInfo:
    """Convert SOURCE to a .tflite file at OUT with the given quantization."""
    tf, _ = import_tensorflow()
    converter = tf.lite.TFLiteConverter.from_keras_model(source.model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    progress: Progress | None = None
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantization == "int8":
        if calibration is None or len(calibration) == 0:
            raise ExportError(
                "tflite-int8: int8 quantization needs representative data (--calibration FILE)"
            )
        progress = Progress("calibrating int8", len(calibration))
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _representative(calibration, progress)
        # Full-integer: every op int8, or the conversion fails rather than silently falling back
        # to float kernels the int8 artifact's users did not ask for.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io_type = {"int8": tf.int8, "uint8": tf.uint8, "float32": tf.float32}[integer_io]
        converter.inference_input_type = io_type
        converter.inference_output_type = io_type
    failure: Exception | None = None
    with captured() as log:
        try:
            flatbuffer = converter.convert()
        except Exception as exc:  # noqa: BLE001 - TF raises assorted types; raised below with the log
            failure = exc
        finally:
            if progress is not None:
                progress.__exit__(None, None, None)
    if failure is not None:
        raise _failure(failure, log.tail(200), source, quantization) from failure
    flatbuffer = _outputs_in_model_order(bytes(flatbuffer), len(source.output_shapes))
    out.write_bytes(flatbuffer)
    quantized = _count_quantized(flatbuffer, quantization)
    notes: list[str] = []
    if quantized == 0 and quantization in ("float16", "dynamic"):
        notes.append(
            f"{_TARGET[quantization]}: no weight tensor was large enough to quantize (TFLite "
            "skips tensors under 1024 elements); this artifact is float32 in all but name"
        )
    return ExportInfo(quantized, notes)


def _schema() -> Any:
    try:
        from tensorflow.lite.python import schema_py_generated  # noqa: PLC0415
    except ImportError:  # pragma: no cover - every TensorFlow with tf.lite has it
        return None
    return schema_py_generated


def _count_quantized(flatbuffer: bytes, quantization: Quantization) -> int:
    """How many constant (weight) tensors of the main graph have a quantized type."""
    schema = _schema()
    wanted = _QUANTIZED_TYPES[quantization]
    if schema is None or not wanted:
        return 0
    model = schema.Model.GetRootAs(flatbuffer, 0)
    count = 0
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            if tensor.Type() not in wanted or tensor.Buffer() <= 0:
                continue
            buffer = model.Buffers(tensor.Buffer())
            if buffer.DataLength() > 0 or buffer.Size() > 0:
                count += 1
    return count


def _outputs_in_model_order(flatbuffer: bytes, heads: int) -> bytes:
    """FLATBUFFER with the main graph's outputs permuted into the signature's output_0.. order.

    The converter orders a multi-output graph's outputs as it likes; its signature still maps
    ``output_<i>`` (the model's i-th output) to a tensor. The permutation is written in place: the
    vector keeps its length, so no offset moves.
    """
    schema = _schema()
    if heads < 2 or schema is None:
        return flatbuffer
    model = schema.Model.GetRootAs(flatbuffer, 0)
    if model.SignatureDefsLength() != 1 or model.SubgraphsLength() < 1:
        return flatbuffer
    signature = model.SignatureDefs(0)
    by_position: dict[int, int] = {}
    for j in range(signature.OutputsLength()):
        entry = signature.Outputs(j)
        match = _SIGNATURE_OUTPUT.fullmatch(entry.Name().decode())
        if match is None:
            return flatbuffer
        by_position[int(match.group(1))] = int(entry.TensorIndex())
    graph = model.Subgraphs(signature.SubgraphIndex())
    current = [int(graph.Outputs(j)) for j in range(graph.OutputsLength())]
    wanted = [by_position.get(i, -1) for i in range(len(current))]
    if sorted(wanted) != sorted(current) or wanted == current:
        return flatbuffer
    table = graph._tab  # noqa: SLF001 - flatbuffers' generated accessors expose no writer
    start = table.Vector(table.Offset(8))  # field 8: SubGraph.outputs
    patched = bytearray(flatbuffer)
    for j, index in enumerate(wanted):
        patched[start + 4 * j : start + 4 * j + 4] = int(index).to_bytes(4, "little", signed=True)
    return bytes(patched)


def _representative(data: NDArray[np.float32], progress: Progress) -> Any:
    def generate() -> Any:
        for i in range(len(data)):
            progress.advance()
            yield [data[i : i + 1]]

    return generate
