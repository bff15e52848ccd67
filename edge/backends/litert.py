"""TFLite artifacts on LiteRT (ai-edge-litert), tflite-runtime, or, only when asked, tf.lite.

The only module that imports a TFLite interpreter. All three expose the same Interpreter API.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from floorline.edge.backends.base import (
    BackendOptions,
    BackendPlugin,
    FloatArray,
    QuantParams,
    TensorSpec,
    check_batch,
    dequantize,
    file_must_exist,
    join_outputs,
    pick_outputs,
    quantize,
)
from floorline.edge.errors import BackendError, RuntimeMissingError

# (interpreter module, distribution that provides it)
_PROVIDERS = {
    "ai_edge_litert": ("ai_edge_litert.interpreter", "ai-edge-litert"),
    "tflite_runtime": ("tflite_runtime.interpreter", "tflite-runtime"),
    "tensorflow": ("tensorflow.lite.python.interpreter", "tensorflow"),
}
_AUTO = ("ai_edge_litert", "tflite_runtime")


def _import_interpreter(choice: str) -> tuple[Any, str]:
    names = _AUTO if choice == "auto" else (choice,)
    if choice != "auto" and choice not in _PROVIDERS:
        raise BackendError(
            f"unknown TFLite interpreter {choice!r}; choose auto, {', '.join(_PROVIDERS)}"
        )
    for name in names:
        module_name, dist = _PROVIDERS[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = "unknown"
        return module.Interpreter, f"{name} {version}"
    if choice == "auto":
        raise RuntimeMissingError(
            "this bundle's artifact is TFLite but no TFLite runtime is installed: "
            "pip install 'floorline[litert]' (or 'floorline[tflite]' where numpy<2 is required)"
        )
    raise RuntimeMissingError(
        f"TFLite interpreter {choice!r} was requested but is not installed "
        f"(pip install {_PROVIDERS[choice][1]})"
    )


def _spec(detail: dict[str, Any]) -> TensorSpec:
    signature = detail.get("shape_signature")
    dims = list(signature if signature is not None and len(signature) else detail["shape"])
    shape = tuple(None if d < 0 else int(d) for d in dims)
    scale, zero_point = detail.get("quantization", (0.0, 0))
    dtype = np.dtype(detail["dtype"])
    quant = None
    if np.issubdtype(dtype, np.integer) and scale:
        quant = QuantParams(float(scale), int(zero_point))
    return TensorSpec(name=str(detail["name"]), shape=shape, dtype=dtype, quant=quant)


class LiteRTBackend:
    """Runs a .tflite artifact. Not thread-safe: one pipeline worker owns it."""

    name = "litert"

    def __init__(self, path: Path, options: BackendOptions) -> None:
        file_must_exist(path)
        interpreter_cls, self.runtime = _import_interpreter(options.interpreter)
        try:
            self._interp = interpreter_cls(model_path=str(path), num_threads=options.threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"{path}: {self.runtime} cannot load it: {exc}") from exc
        inputs = self._interp.get_input_details()
        outputs = self._interp.get_output_details()
        if len(inputs) != 1:
            raise BackendError(f"{path}: expected one input tensor, the model has {len(inputs)}")
        chosen = [
            outputs[i]
            for i in pick_outputs(path, [str(o["name"]) for o in outputs], options.outputs)
        ]
        self._in_index = int(inputs[0]["index"])
        self._out_indices = [int(o["index"]) for o in chosen]
        self.input_spec = _spec(inputs[0])
        self.output_specs = tuple(_spec(o) for o in chosen)
        self.output_spec = self.output_specs[0]
        # A model exported with a fixed batch of 1 cannot be resized; it runs row by row.
        self._fixed_batch = self.input_spec.shape[0] is not None
        self._batch = int(inputs[0]["shape"][0])

    def _resize(self, n: int) -> None:
        # Resizing reallocates tensors, so it happens only when the batch size changes.
        self._interp.resize_tensor_input(self._in_index, [n, *self.input_spec.shape[1:]])
        self._interp.allocate_tensors()
        self._batch = n

    def _run(self, batch: FloatArray) -> FloatArray:
        spec = self.input_spec
        feed = quantize(batch, spec.quant, spec.dtype) if spec.quant else batch.astype(spec.dtype)
        self._interp.set_tensor(self._in_index, feed)
        self._interp.invoke()
        # get_tensor copies; the interpreter may overwrite its buffer on the next invoke.
        parts = []
        for index, out_spec in zip(self._out_indices, self.output_specs, strict=True):
            raw = self._interp.get_tensor(index)
            quant = out_spec.quant
            parts.append(dequantize(raw, quant) if quant else np.asarray(raw, dtype=np.float32))
        return join_outputs(parts)

    def infer(self, batch: FloatArray) -> FloatArray:
        """See Backend.infer."""
        check_batch(self.input_spec, batch)
        try:
            if self._fixed_batch:
                return np.concatenate([self._run(batch[i : i + 1]) for i in range(len(batch))])
            if len(batch) != self._batch:
                self._resize(len(batch))
            return self._run(batch)
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"{self.runtime}: inference failed: {exc}") from exc

    def close(self) -> None:
        """See Backend.close."""
        self._interp = None


PLUGIN = BackendPlugin(
    type="litert",
    factory=LiteRTBackend,
    format="tflite",
    extra="litert",
    runtimes=_AUTO,
    rank=0,
    interpreter_option=True,
)
