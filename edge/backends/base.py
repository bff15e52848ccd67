"""The Backend protocol every runtime implements, and helpers they share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from floorline.edge.errors import BackendError

FloatArray = NDArray[np.float32]


@dataclass(frozen=True)
class QuantParams:
    """Affine quantization of an integer tensor: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int


@dataclass(frozen=True)
class TensorSpec:
    """A model tensor as the runtime sees it. ``shape[0]`` is None when the batch is dynamic."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype[np.generic]
    quant: QuantParams | None = None


@dataclass(frozen=True)
class BackendOptions:
    """Runtime settings common to every backend.

    ``threads`` defaults to 1: on a 2-4 core gateway the MQTT and worker threads need the other
    cores, and small sensor models gain little from intra-op parallelism.
    """

    threads: int = 1
    # LiteRT only: which Python module provides the interpreter. "auto" tries ai_edge_litert, then
    # tflite_runtime; "tensorflow" (tf.lite) is used only when named, because importing TensorFlow
    # costs ~500 MB, which a gateway does not have to spare.
    interpreter: str = "auto"
    # Which output tensors to return, in this order (a bundle's heads: Artifact.outputs). Empty:
    # the model must have exactly one output. Several: each row is the outputs flattened and
    # joined in this order, every one dequantized with its own parameters first.
    outputs: tuple[str, ...] = ()


class Backend(Protocol):
    """A loaded artifact that turns float32 model inputs into float32 model outputs.

    Lifecycle: the registry constructs it with the artifact path (loading the model), the caller
    warms it up with the bundle's golden input, then calls :meth:`infer` from one thread at a time
    for as long as the pipeline runs, and :meth:`close` once at the end.
    """

    name: str
    """Registry name, e.g. "litert" or "onnx"."""
    runtime: str
    """The module and version actually doing the work, e.g. "ai_edge_litert 2.3.0"."""
    input_spec: TensorSpec
    output_spec: TensorSpec
    """The first (usually the only) output returned."""
    output_specs: tuple[TensorSpec, ...]
    """Every output returned, in order (``BackendOptions.outputs``)."""

    def infer(self, batch: FloatArray) -> FloatArray:
        """Run a batch of shape (n, *input_spec.shape[1:]), n >= 1; return (n, *outputs).

        With several outputs the result is (n, total): each row holds every output flattened, in
        ``output_specs`` order (see ``join_outputs``).

        Quantized artifacts take and return real values: the backend quantizes inputs and
        dequantizes outputs with the tensors' own parameters. Raises InferenceError on failure.
        """
        ...

    def close(self) -> None:
        """Release the runtime's resources. The backend is unusable afterwards."""
        ...


def check_batch(spec: TensorSpec, batch: FloatArray) -> None:
    """Refuse a batch whose per-sample shape differs from the model's, naming both."""
    if batch.ndim != len(spec.shape) or tuple(batch.shape[1:]) != tuple(spec.shape[1:]):
        raise BackendError(
            f"input shape {tuple(batch.shape)} does not fit the model's "
            f"{('n', *spec.shape[1:])}"
        )
    if batch.shape[0] < 1:
        raise BackendError("empty batch")


def quantize(values: FloatArray, quant: QuantParams, dtype: np.dtype[np.generic]) -> NDArray[
    np.generic
]:
    """Real values to integers of DTYPE, rounding to nearest and saturating at the type's range."""
    info = np.iinfo(dtype)  # type: ignore[type-var]
    q = np.round(values / quant.scale) + quant.zero_point
    out: NDArray[np.generic] = np.clip(q, info.min, info.max).astype(dtype)
    return out


def dequantize(values: NDArray[np.generic], quant: QuantParams) -> FloatArray:
    """Integers back to real values."""
    return ((values.astype(np.float32) - quant.zero_point) * quant.scale).astype(np.float32)


ALL_OUTPUTS = ("*",)
"""``BackendOptions.outputs`` meaning every output in the file's order (the converter uses it to
find which tensor is which head)."""


def pick_outputs(path: Path, available: list[str], wanted: tuple[str, ...]) -> list[int]:
    """Indices into AVAILABLE (a model's output names) of WANTED, in WANTED's order.

    Nothing wanted means the model's only output; a model with several outputs must be told which
    (a bundle's artifact names them), never guessed.
    """
    if wanted == ALL_OUTPUTS:
        return list(range(len(available)))
    if not wanted:
        if len(available) != 1:
            raise BackendError(
                f"{path}: the model has {len(available)} outputs ({', '.join(available)}) and "
                "the bundle does not say which to use"
            )
        return [0]
    missing = [name for name in wanted if name not in available]
    if missing:
        raise BackendError(
            f"{path}: no output tensor named {', '.join(missing)} (it has {', '.join(available)})"
        )
    return [available.index(name) for name in wanted]


def join_outputs(parts: list[FloatArray]) -> FloatArray:
    """One output as it is; several as (n, total): each row's outputs flattened, in order."""
    if len(parts) == 1:
        return parts[0]
    n = len(parts[0])
    return np.concatenate([p.reshape(n, -1) for p in parts], axis=1)


def file_must_exist(path: Path) -> None:
    """A clear error instead of a runtime's own message for a missing file."""
    if not path.is_file():
        raise BackendError(f"{path}: artifact file not found")


@dataclass(frozen=True)
class BackendPlugin:
    """What a backend module declares as ``PLUGIN`` (see :mod:`floorline.edge.plugins`).

    Backend modules import their runtime only when an artifact is loaded, so finding the plugins
    imports no runtime.
    """

    type: str
    """The name configs use: ``backend: litert``."""
    factory: Callable[[Path, BackendOptions], Backend]
    """Loads an artifact; the runtime is imported here, never at module import."""
    format: str
    """The artifact format it runs (the manifest's ``format``)."""
    extra: str
    """The pip extra that installs the runtime: ``pip install 'floorline[EXTRA]'``."""
    runtimes: tuple[str, ...]
    """Top-level modules any one of which provides the runtime (as the factory would look)."""
    rank: int
    """Preference of ``backend: auto``, lowest first."""
    interpreter_option: bool = False
    """Whether ``BackendOptions.interpreter``, when not "auto", names the one module to use."""
