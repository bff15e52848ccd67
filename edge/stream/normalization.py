"""The model's input normalization, applied identically by the converter and the gateway."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from floorline.edge.bundle.manifest import InputSpec


def normalize(data: NDArray[np.float32], spec: InputSpec) -> NDArray[np.float32]:
    """(x - mean) / std over the last (feature) axis, in float32; unchanged without normalization.

    The converter calibrates and checks parity through this same function, so a gateway feeds the
    model exactly what it was validated on.
    """
    if spec.normalization is None:
        return data
    mean = np.asarray(spec.normalization.mean, dtype=np.float32)
    std = np.asarray(spec.normalization.std, dtype=np.float32)
    out: NDArray[np.float32] = ((data - mean) / std).astype(np.float32)
    return out


def model_input(windows: NDArray[np.float32], spec: InputSpec) -> NDArray[np.float32]:
    """What the model is fed for raw WINDOWS: the bundle's feature stage if any, then ``normalize``.

    Without a stage it is ``normalize`` (WINDOWS already shaped as the model's input). Features
    first: a bundle's normalization is that of the model's inputs, which are the
    features when there is a stage.
    """
    if spec.preprocessing is not None:
        from floorline.edge.stream.features import compute  # noqa: PLC0415 - only with a stage

        names = [f.name for f in spec.features]
        windows = compute(windows, spec.preprocessing, names)
    return normalize(windows, spec)
