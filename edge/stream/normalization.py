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
