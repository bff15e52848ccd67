"""ONNX exporter, through Keras 3's own ``model.export(format="onnx")`` (tf2onnx underneath).

``tf2onnx.convert.from_keras`` does not understand Keras 3 models; Keras' exporter traces the model
to a tf.function and hands that to tf2onnx, which works for .keras, .h5 and wrapped SavedModels.
The model is the prepared one (:mod:`floorline.converter.keras_prep`): one float32 input with a
free batch, one ONNX output per head in model output order.
"""

from __future__ import annotations

from pathlib import Path

from floorline.converter.errors import ExportError
from floorline.converter.native_output import captured
from floorline.converter.source import SourceModel
from floorline.converter.tensorflow_import import import_tensorflow

DEFAULT_OPSET = 17


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:200]


def export_onnx(source: SourceModel, out: Path, *, opset: int = DEFAULT_OPSET) -> int:
    """Write SOURCE as ONNX with a dynamic batch dimension; return the opset actually used."""
    _, keras = import_tensorflow()
    spec = keras.InputSpec(shape=source.input_shape, dtype="float32")
    failure: Exception | None = None
    with captured() as log:
        try:
            source.model.export(
                str(out), format="onnx", input_signature=[spec], opset_version=opset, verbose=False
            )
        except ImportError as exc:
            raise ExportError(
                "onnx: ONNX export needs tf2onnx and onnx: pip install 'floorline[convert]'"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - tf2onnx raises assorted types; raised below
            failure = exc
    if failure is not None:
        raise ExportError(
            f"onnx: ONNX export (opset {opset}) of {source.path.name} failed: "
            f"{_first_line(failure)} (run with -v for the exporter's output)",
            details=f"{failure}\n{log.tail(200)}",
        ) from failure
    if not out.is_file():
        raise ExportError(
            f"onnx: the ONNX exporter wrote nothing for {source.path.name} (run with -v for its "
            "output)",
            details=log.tail(200),
        )
    import onnx  # noqa: PLC0415 - only the converter needs it

    model = onnx.load(str(out), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    outputs = [o.name for o in model.graph.output]
    if len(inputs) != 1 or len(outputs) != len(source.output_shapes):
        raise ExportError(
            f"onnx: the exported graph has {len(inputs)} inputs and {len(outputs)} outputs, the "
            f"model 1 input and {len(source.output_shapes)} outputs "
            f"({', '.join(source.output_names)}); a layer's constants probably became inputs: "
            "remove preprocessing layers from inside the model or convert to TFLite only",
            details=f"ONNX inputs: {inputs}\nONNX outputs: {outputs}",
        )
    return int(next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset))
