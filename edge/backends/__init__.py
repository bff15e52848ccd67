"""Runtimes behind one protocol, chosen through an explicit registry.

``create("litert", path)`` imports the runtime module only then, so a gateway with only ONNX
Runtime installed never touches TFLite, and nothing here ever imports TensorFlow unless a caller
names the ``tensorflow`` interpreter.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from floorline.edge.backends.base import (
    Backend,
    BackendOptions,
    FloatArray,
    QuantParams,
    TensorSpec,
)
from floorline.edge.errors import BackendError, RuntimeMissingError

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendInfo",
    "BackendOptions",
    "FloatArray",
    "QuantParams",
    "TensorSpec",
    "backend_for_format",
    "create",
]


@dataclass(frozen=True)
class BackendInfo:
    """Where a backend lives and what it runs."""

    module: str
    cls: str
    format: str
    extra: str


BACKENDS: dict[str, BackendInfo] = {
    "litert": BackendInfo("floorline.edge.backends.litert", "LiteRTBackend", "tflite", "litert"),
    "onnx": BackendInfo("floorline.edge.backends.onnx", "OnnxBackend", "onnx", "onnx"),
}
"""Every backend, by the name configs use (``backend: litert``)."""


def create(name: str, path: Path, options: BackendOptions | None = None) -> Backend:
    """Load the artifact at PATH on backend NAME."""
    info = BACKENDS.get(name)
    if info is None:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    module = importlib.import_module(info.module)
    backend: Backend = getattr(module, info.cls)(path, options or BackendOptions())
    return backend


def backend_for_format(fmt: str, prefer: Sequence[str] = ("litert", "onnx")) -> str:
    """The first preferred backend that runs artifacts of format FMT."""
    for name in prefer:
        info = BACKENDS.get(name)
        if info is None:
            raise BackendError(f"unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
        if info.format == fmt:
            return name
    raise RuntimeMissingError(f"none of the backends {list(prefer)} runs {fmt} artifacts")
