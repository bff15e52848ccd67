"""ONNX artifacts on ONNX Runtime. The only module that imports onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from floorline.edge.backends.base import (
    BackendOptions,
    BackendPlugin,
    FloatArray,
    TensorSpec,
    check_batch,
    file_must_exist,
    join_outputs,
    pick_outputs,
)
from floorline.edge.errors import BackendError, RuntimeMissingError

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
}


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in arg.shape)
    if arg.type not in _ORT_TYPES:
        raise BackendError(f"tensor {arg.name!r} has unsupported type {arg.type}")
    return TensorSpec(name=str(arg.name), shape=shape, dtype=np.dtype(_ORT_TYPES[arg.type]))


class OnnxBackend:
    """Runs a .onnx artifact on the CPU execution provider."""

    name = "onnx"

    def __init__(self, path: Path, options: BackendOptions) -> None:
        file_must_exist(path)
        try:
            import onnxruntime as ort  # noqa: PLC0415 - a runtime is imported only when used
        except ImportError as exc:
            raise RuntimeMissingError(
                "this bundle's artifact is ONNX but onnxruntime is not installed: "
                "pip install 'floorline[onnx]'"
            ) from exc
        self.runtime = f"onnxruntime {ort.__version__}"
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning threads burn a core waiting for work; on a gateway that core belongs to MQTT.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=so, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped family
            raise BackendError(f"{path}: onnxruntime cannot load it: {exc}") from exc
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1:
            raise BackendError(f"{path}: expected one input tensor, the model has {len(inputs)}")
        chosen = [
            outputs[i] for i in pick_outputs(path, [o.name for o in outputs], options.outputs)
        ]
        self.input_spec = _spec(inputs[0])
        self.output_specs = tuple(_spec(o) for o in chosen)
        self.output_spec = self.output_specs[0]
        self._out_names = [o.name for o in chosen]

    def infer(self, batch: FloatArray) -> FloatArray:
        """See Backend.infer."""
        check_batch(self.input_spec, batch)
        feed = {self.input_spec.name: batch.astype(self.input_spec.dtype, copy=False)}
        try:
            outs = self._session.run(self._out_names, feed)
        except Exception as exc:  # onnxruntime raises its own untyped family
            raise BackendError(f"{self.runtime}: inference failed: {exc}") from exc
        return join_outputs([np.asarray(out, dtype=np.float32) for out in outs])

    def close(self) -> None:
        """See Backend.close."""
        self._session = None


PLUGIN = BackendPlugin(
    type="onnx", factory=OnnxBackend, format="onnx", extra="onnx", runtimes=("onnxruntime",), rank=1
)
