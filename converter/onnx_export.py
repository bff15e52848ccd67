"""ONNX exporter, through Keras 3's own ``model.export(format="onnx")`` (tf2onnx underneath).

``tf2onnx.convert.from_keras`` does not understand Keras 3 models; Keras' exporter traces the model
to a tf.function and hands that to tf2onnx, which works for .keras, .h5 and wrapped SavedModels.
"""

from __future__ import annotations

from pathlib import Path

from floorline.converter.errors import ExportError
from floorline.converter.native_output import captured
from floorline.converter.source import SourceModel
from floorline.converter.tensorflow_import import import_tensorflow

DEFAULT_OPSET = 17


def export_onnx(source: SourceModel, out: Path, *, opset: int = DEFAULT_OPSET) -> int:
    """Write SOURCE as ONNX with a dynamic batch dimension; return the opset actually used."""
    _, keras = import_tensorflow()
    spec = keras.InputSpec(shape=source.input_shape, dtype="float32")
    with captured() as log:
        try:
            source.model.export(
                str(out), format="onnx", input_signature=[spec], opset_version=opset, verbose=False
            )
        except ImportError as exc:
            raise ExportError(
                "ONNX export needs tf2onnx and onnx: pip install 'floorline[convert]'"
            ) from exc
        except Exception as exc:  # tf2onnx raises assorted types
            raise ExportError(
                f"ONNX export (opset {opset}) failed: {str(exc).strip()[:500]}\n{log.tail()}"
            ) from exc
    if not out.is_file():
        raise ExportError(f"ONNX export wrote nothing:\n{log.tail()}")
    import onnx  # noqa: PLC0415 - only the converter needs it

    model = onnx.load(str(out), load_external_data=False)
    return int(next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset))
