"""TFLite exporter: float32, float16, dynamic-range and full-integer int8 artifacts.

Only TFLite's built-in ops are allowed. "Select TF ops" (Flex) would need TensorFlow's kernels on
the gateway, which is exactly what a gateway does not have; such a model fails here with the ops
named, not later on the shop floor.
"""

from __future__ import annotations

import re
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


def unsupported_ops(message: str) -> list[str]:
    """The op names a TFLite ConverterError message blames, in order, without duplicates."""
    found: list[str] = []
    for match in _SELECT_OPS.findall(message) + _CUSTOM_OPS.findall(message):
        found.extend(op.strip() for op in match.split(","))
    found.extend(_NOT_CUSTOM.findall(message))
    return list(dict.fromkeys(op for op in found if op))


def export_tflite(
    source: SourceModel,
    quantization: Quantization,
    out: Path,
    *,
    calibration: NDArray[np.float32] | None = None,
    integer_io: IntegerIO = "int8",
) -> None:
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
            raise ExportError("int8 quantization needs representative data (--calibration FILE)")
        progress = Progress("calibrating int8", len(calibration))
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _representative(calibration, progress)
        # Full-integer: every op int8, or the conversion fails rather than silently falling back
        # to float kernels the int8 artifact's users did not ask for.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io_type = {"int8": tf.int8, "uint8": tf.uint8, "float32": tf.float32}[integer_io]
        converter.inference_input_type = io_type
        converter.inference_output_type = io_type
    with captured() as log:
        try:
            flatbuffer = converter.convert()
        except Exception as exc:  # TF raises ConverterError and friends with the reason inside
            message = f"{exc}\n{log.tail(200)}"
            ops = unsupported_ops(message)
            if ops or "not supported by the native TFLite runtime" in message:
                raise UnsupportedOpError(ops) from exc
            raise ExportError(
                f"TFLite {quantization} conversion failed: {str(exc).strip()[:500]}"
            ) from exc
        finally:
            if progress is not None:
                progress.__exit__(None, None, None)
    out.write_bytes(flatbuffer)


def _representative(data: NDArray[np.float32], progress: Progress) -> Any:
    def generate() -> Any:
        for i in range(len(data)):
            progress.advance()
            yield [data[i : i + 1]]

    return generate
