"""Loading the source model: a Keras v3 ``.keras`` file, a legacy ``.h5`` file, or a SavedModel.

Every form becomes a single-input, single-output Keras model, so each exporter has one path. A
SavedModel is wrapped in ``keras.layers.TFSMLayer`` around its serving signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from floorline.converter.errors import SourceModelError
from floorline.converter.native_output import captured
from floorline.converter.tensorflow_import import import_tensorflow
from floorline.edge.bundle.hashing import sha256_bytes, sha256_file
from floorline.edge.bundle.manifest import SourceFormat

_PREDICT_BATCH = 256


@dataclass
class SourceModel:
    """A loaded source model and what the manifest records about it."""

    path: Path
    format: SourceFormat
    sha256: str
    model: Any
    """A keras.Model with one input and one output."""
    input_shape: tuple[int | None, ...]
    output_shape: tuple[int | None, ...]

    def predict(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """The source model's outputs, computed in batches."""
        parts = [
            np.asarray(self.model(x[i : i + _PREDICT_BATCH], training=False), dtype=np.float32)
            for i in range(0, len(x), _PREDICT_BATCH)
        ]
        return np.concatenate(parts)


def _hash_tree(root: Path) -> str:
    # A SavedModel is a directory: hash each file's relative path and content, in sorted order.
    lines = [
        f"{p.relative_to(root).as_posix()} {sha256_file(p)}"
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]
    return sha256_bytes("\n".join(lines).encode())


def _shape(value: Any) -> tuple[int | None, ...]:
    return tuple(None if d is None else int(d) for d in value)


def load_source(path: Path) -> SourceModel:
    """Load PATH and check it is a model the bundle format can describe."""
    if not path.exists():
        raise SourceModelError(f"{path}: no such model file or SavedModel directory")
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise SourceModelError(f"{path}: a directory, but not a SavedModel (no saved_model.pb)")
        fmt: SourceFormat = "savedmodel"
    elif path.suffix == ".keras":
        fmt = "keras"
    elif path.suffix in (".h5", ".hdf5"):
        fmt = "h5"
    else:
        raise SourceModelError(
            f"{path}: unknown model format {path.suffix!r}; expected .keras, .h5 or a SavedModel "
            "directory"
        )
    tf, keras = import_tensorflow()
    with captured() as out:
        try:
            model = _load(path, fmt, tf, keras)
        except Exception as exc:  # Keras and TF raise many unrelated types for a bad file
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SourceModelError(f"{path}: cannot load the model: {detail}") from exc
    del out
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise SourceModelError(
            f"{path}: the model has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            "a bundle needs exactly one of each"
        )
    input_shape = _shape(model.inputs[0].shape)
    output_shape = _shape(model.outputs[0].shape)
    if input_shape[0] is not None:
        raise SourceModelError(f"{path}: input shape {input_shape} has a fixed batch dimension")
    digest = _hash_tree(path) if path.is_dir() else sha256_file(path)
    return SourceModel(path, fmt, digest, model, input_shape, output_shape)


def _load(path: Path, fmt: SourceFormat, tf: Any, keras: Any) -> Any:
    if fmt != "savedmodel":
        return keras.models.load_model(path, compile=False)
    loaded = tf.saved_model.load(str(path))
    signatures = dict(loaded.signatures)
    if not signatures:
        raise SourceModelError(f"{path}: the SavedModel has no serving signature")
    endpoint = "serving_default" if "serving_default" in signatures else next(iter(signatures))
    fn = signatures[endpoint]
    specs = list(fn.structured_input_signature[1].values()) or list(
        fn.structured_input_signature[0]
    )
    if len(specs) != 1:
        raise SourceModelError(f"{path}: signature {endpoint!r} takes {len(specs)} inputs, not 1")
    outputs = fn.structured_outputs
    if isinstance(outputs, dict) and len(outputs) != 1:
        raise SourceModelError(f"{path}: signature {endpoint!r} has {len(outputs)} outputs, not 1")
    inp = keras.Input(shape=tuple(specs[0].shape[1:]), dtype=specs[0].dtype.name)
    out = keras.layers.TFSMLayer(str(path), call_endpoint=endpoint)(inp)
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return keras.Model(inp, out)
