"""Runtimes behind one protocol: one plugin module per runtime, found by ``plugins.discover``.

``create("litert", path)`` imports the runtime module only then, so a gateway with only ONNX
Runtime installed never touches TFLite, and nothing here ever imports TensorFlow unless a caller
names the ``tensorflow`` interpreter. ``installed("litert")`` says whether a backend's runtime is
there by finding its module, without importing it, so ``backend: auto`` can pass over artifacts
this gateway cannot run.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

from floorline.edge.backends.base import (
    Backend,
    BackendOptions,
    BackendPlugin,
    FloatArray,
    QuantParams,
    TensorSpec,
)
from floorline.edge.errors import BackendError, RuntimeMissingError
from floorline.edge.plugins import discover

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendInfo",
    "BackendOptions",
    "BackendPlugin",
    "FloatArray",
    "QuantParams",
    "TensorSpec",
    "backend_for_format",
    "create",
    "install_hint",
    "installed",
]


BackendInfo = BackendPlugin
"""The record each backend module declares (the older name, kept for callers)."""

BACKENDS: dict[str, BackendPlugin] = dict(
    sorted(discover(__name__, BackendPlugin).items(), key=lambda item: item[1].rank)
)
"""Every backend plugin, by the name configs use (``backend: litert``), in the order
``backend: auto`` prefers them."""


def _info(name: str) -> BackendInfo:
    info = BACKENDS.get(name)
    if info is None:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    return info


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or a module without a spec
        return False


def installed(name: str, options: BackendOptions | None = None) -> bool:
    """Whether backend NAME's runtime is installed, found without importing it.

    Finding is not loading: a runtime that is present but broken still fails in ``create``.
    """
    info = _info(name)
    modules = info.runtimes
    if info.interpreter_option and options is not None and options.interpreter != "auto":
        modules = (options.interpreter,)
    return any(_findable(m) for m in modules)


def install_hint(name: str) -> str:
    """What to run to get backend NAME's runtime, e.g. ``pip install 'floorline[onnx]'``."""
    return f"pip install 'floorline[{_info(name).extra}]'"


def create(name: str, path: Path, options: BackendOptions | None = None) -> Backend:
    """Load the artifact at PATH on backend NAME."""
    return _info(name).factory(path, options or BackendOptions())


def backend_for_format(fmt: str, prefer: Sequence[str] = tuple(BACKENDS)) -> str:
    """The first preferred backend that runs artifacts of format FMT."""
    for name in prefer:
        if _info(name).format == fmt:
            return name
    raise RuntimeMissingError(f"none of the backends {list(prefer)} runs {fmt} artifacts")
