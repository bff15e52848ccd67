"""Which output tensor of an artifact is which head of the model.

Exporters do not keep a model's output order or names: TFLite names outputs after the traced
function (``StatefulPartitionedCall:1``) and may reorder them. So every artifact with several
outputs is run on real inputs and each head is matched to the output tensor with its shape whose
values are closest to the source model's for that head. The names found go into the manifest
(``Artifact.outputs``) and a gateway asks its runtime for exactly those, in head order.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from floorline.converter.errors import ExportError
from floorline.edge import backends
from floorline.edge.backends import BackendOptions
from floorline.edge.backends.base import ALL_OUTPUTS
from floorline.edge.bundle.manifest import ArtifactFormat, Head

_PROBE = 64


def match_outputs(
    path: Path,
    fmt: ArtifactFormat,
    heads: list[Head],
    inputs: NDArray[np.float32],
    source_parts: list[NDArray[np.float32]],
) -> list[str] | None:
    """The artifact's output names in head order; None when it has one output for one head."""
    backend = backends.create(
        backends.backend_for_format(fmt), path, BackendOptions(outputs=ALL_OUTPUTS)
    )
    try:
        specs = backend.output_specs
        if len(specs) == 1 and len(heads) == 1:
            return None
        probe = inputs[:_PROBE]
        joined = backend.infer(probe).reshape(len(probe), -1)
    finally:
        backend.close()
    sizes = [math.prod(int(d or 1) for d in spec.shape[1:]) for spec in specs]
    bounds = np.cumsum([0, *sizes])
    outs = [joined[:, bounds[i] : bounds[i + 1]] for i in range(len(specs))]
    chosen: list[str] = []
    for head, expected in zip(heads, source_parts, strict=True):
        want = expected[: len(probe)].reshape(len(probe), -1)
        candidates = [
            (float(np.max(np.abs(out - want))), spec.name)
            for spec, out in zip(specs, outs, strict=True)
            if out.shape == want.shape and spec.name not in chosen
        ]
        if not candidates:
            shapes = ", ".join(f"{s.name} {tuple(s.shape)}" for s in specs)
            raise ExportError(
                f"{path.name}: no output tensor has the shape of head {head.name} "
                f"{tuple(head.shape)} (outputs: {shapes})"
            )
        chosen.append(min(candidates)[1])
    return chosen
