"""Loading the source model: a Keras v3 ``.keras`` file, a legacy ``.h5`` file, or a SavedModel.

Every form becomes a single-input Keras model with one or more outputs ("heads"), prepared for
export by :mod:`floorline.converter.keras_prep` (leading normalization folded out, recurrent
layers unrolled, a free float32 batch), so each exporter has one path. A SavedModel is wrapped in
``keras.layers.TFSMLayer`` around its serving signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from floorline.converter.errors import SourceModelError
from floorline.converter.keras_prep import prepare
from floorline.converter.native_output import captured
from floorline.converter.tensorflow_import import import_tensorflow
from floorline.edge.bundle.hashing import sha256_bytes, sha256_file
from floorline.edge.bundle.manifest import SourceFormat

_PREDICT_BATCH = 256


@dataclass
class SourceModel:
    """A loaded, prepared source model and what the manifest records about it."""

    path: Path
    format: SourceFormat
    sha256: str
    model: Any
    """A keras.Model with one float32 input and one or more outputs, after preparation."""
    input_shape: tuple[int | None, ...]
    """Batch first, None."""
    output_shapes: list[tuple[int | None, ...]]
    """One per output ("head"), in model output order: (batch, k) or (batch, window, features)."""
    output_names: list[str]
    """One per head: the Keras output layer's name."""
    normalization: tuple[list[float], list[float]] | None = None
    """(mean, std) folded out of the model: the gateway computes (x - mean) / std before it."""
    notes: list[str] = field(default_factory=list)
    """One-line notes for the user about what preparation changed."""

    def predict(self, x: NDArray[np.float32]) -> list[NDArray[np.float32]]:
        """The source model's outputs, one array per head, computed in batches."""
        _, keras = import_tensorflow()
        parts: list[list[NDArray[np.float32]]] = []
        for i in range(0, max(len(x), 1), _PREDICT_BATCH):
            out = keras.tree.flatten(self.model(x[i : i + _PREDICT_BATCH], training=False))
            parts.append([np.asarray(o, dtype=np.float32) for o in out])
        return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


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
    signature_names = getattr(model, "_floorline_output_names", None)
    prepared = prepare(model, keras, name=str(path))
    model = prepared.model
    input_shape = _shape(model.inputs[0].shape)
    output_shapes = [_shape(t.shape) for t in model.outputs]
    names = list(signature_names or [_output_name(t, i) for i, t in enumerate(model.outputs)])
    for name, shape in zip(names, output_shapes, strict=True):
        if len(shape) not in (2, 3):
            raise SourceModelError(
                f"{path}: output {name!r} has shape {shape}; a head must be (batch, k) or "
                "(batch, window, features): reshape it inside the model (e.g. "
                "keras.layers.Reshape((1,)) for a scalar per window)"
            )
    digest = _hash_tree(path) if path.is_dir() else sha256_file(path)
    return SourceModel(
        path,
        fmt,
        digest,
        model,
        input_shape,
        output_shapes,
        names,
        prepared.normalization,
        prepared.notes,
    )


def _output_name(tensor: Any, index: int) -> str:
    history = getattr(tensor, "_keras_history", None)
    layer = getattr(history, "operation", None) if history is not None else None
    if layer is None and isinstance(history, tuple) and history:
        layer = history[0]
    return str(getattr(layer, "name", f"output_{index}"))


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
    inp = keras.Input(shape=tuple(specs[0].shape[1:]), dtype=specs[0].dtype.name)
    out = keras.layers.TFSMLayer(str(path), call_endpoint=endpoint)(inp)
    keys: list[str] = []
    if isinstance(out, dict):
        keys = sorted(out)  # the order keras.tree.flatten (and so model.outputs) uses
        out = [out[k] for k in keys] if len(keys) > 1 else out[keys[0]]
    model = keras.Model(inp, out)
    # The signature's output names name the heads (the Keras layer is one TFSMLayer).
    model._floorline_output_names = keys or None  # noqa: SLF001
    return model
