"""Preparing a loaded Keras model for export: one float32 input, a free batch, no TFLite traps.

``prepare`` refuses what a gateway cannot honour (integer inputs, masking, stateful recurrent
layers, preprocessing layers inside the graph) and rewrites what it can convert faithfully:

* a ``Normalization`` or ``Rescaling`` layer right after the input is folded out of the model and
  returned as a per-feature ``(mean, std)``, which the gateway applies before inference. Left in,
  its constants become extra ONNX inputs, and int8 would share one input scale between features
  of very different ranges;
* every recurrent layer (``SimpleRNN``, ``GRU``, ``LSTM``, ``Bidirectional``, stacked) is rebuilt
  with ``unroll=True`` and the same weights: a symbolic loop over time becomes a ``tf.TensorList``
  that TFLite's built-in ops cannot express with a free batch, while the unrolled graph is plain
  matmuls that convert to every TFLite quantization with a resizable batch;
* a fixed batch dimension (``Input(batch_size=...)``) or a float16/float64 input is re-traced
  with a free batch and a float32 input.

Whatever was rewritten is proved at load: the prepared model on normalized inputs must give the
original model's outputs on the raw inputs, or the model is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from floorline.converter.errors import SourceModelError

_PROOF_SAMPLES = 16
_PROOF_RTOL = 1e-5

_CARD_HINT = (
    "move normalization into the model card: remove the layer and put its values under "
    "`normalization: {mean: [...], std: [...]}` in the card"
)


@dataclass
class Prepared:
    """The model to export, and what was folded out of it."""

    model: Any
    normalization: tuple[list[float], list[float]] | None = None
    notes: list[str] = field(default_factory=list)


def _describe(layer: Any) -> str:
    return f"layer {layer.name!r} ({type(layer).__name__})"


def _all_layers(model: Any) -> list[Any]:
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is None:
        return list(getattr(model, "layers", []))
    return list(flatten(include_self=False, recursive=True))


def _input_consumers(model: Any, keras: Any) -> list[Any]:
    """The layers that read the model input directly."""
    if isinstance(model, keras.Sequential):
        return list(model.layers[:1])
    tensor = model.inputs[0]
    nodes_by_depth = getattr(model, "_nodes_by_depth", {}) or {}
    found: list[Any] = []
    for nodes in nodes_by_depth.values():
        for node in nodes:
            if any(t is tensor for t in node.input_tensors) and node.operation not in found:
                found.append(node.operation)
    return found


def _card_hint(layer: Any, keras: Any) -> str:
    if isinstance(layer, keras.layers.Rescaling):
        return f"{_CARD_HINT} (per feature: mean = -offset/scale, std = 1/scale)"
    return f"{_CARD_HINT} (per feature: mean = layer.mean, std = sqrt(layer.variance))"


def _features(values: Any, shape: tuple[int | None, ...], what: str) -> NDArray[np.float64]:
    """VALUES broadcast over one window and reduced to one value per feature, or ValueError."""
    window = tuple(int(d) for d in shape[1:] if d is not None)
    if len(window) != len(shape) - 1:
        raise ValueError(f"the input shape {shape} has an unknown dimension")
    arr = np.asarray(values, dtype=np.float64)
    arr = arr.reshape(arr.shape[1:]) if arr.ndim == len(shape) and arr.shape[0] == 1 else arr
    full = np.broadcast_to(arr, window).reshape(-1, window[-1])
    if not np.all(full == full[:1]):
        raise ValueError(f"its {what} differs along an axis other than the last (feature) axis")
    result: NDArray[np.float64] = full[0].copy()
    return result


def _fold_values(
    layer: Any, keras: Any, shape: tuple[int | None, ...]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(mean, std) reproducing LAYER as (x - mean) / std, or ValueError saying why not."""
    if isinstance(layer, keras.layers.Normalization):
        if layer.invert:
            raise ValueError("it has invert=True (it un-normalizes)")
        ndim = len(shape)
        kept = sorted(a % ndim for a in layer.axis)
        if kept not in ([], [ndim - 1]):
            raise ValueError(f"it normalizes over axis {tuple(layer.axis)}, not the feature axis")
        mean = _features(np.asarray(layer.mean), shape, "mean")
        variance = _features(np.asarray(layer.variance), shape, "variance")
        # Keras 3: (x - mean) / maximum(sqrt(variance), epsilon()).
        std = np.maximum(np.sqrt(variance), keras.backend.epsilon())
        return mean, std
    scale = _features(np.asarray(layer.scale, dtype=np.float64), shape, "scale")
    offset = _features(np.asarray(layer.offset, dtype=np.float64), shape, "offset")
    if not np.all(scale > 0):
        raise ValueError(f"its scale {scale.tolist()} is not > 0 for every feature")
    # Rescaling computes x * scale + offset, which is (x - mean) / std for these two.
    return -offset / scale, 1.0 / scale


def _check_input(model: Any, keras: Any, name: str) -> tuple[tuple[int | None, ...], str]:
    try:
        inputs = list(model.inputs)
    except (AttributeError, ValueError) as exc:  # a Sequential never built, a subclassed model
        raise SourceModelError(
            f"{name}: the model has no defined input (a Sequential never built, or a subclassed "
            "model); build it on keras.Input((window, features)) and save it again"
        ) from exc
    if len(inputs) != 1:
        raise SourceModelError(
            f"{name}: the model has {len(inputs)} inputs; a bundle needs exactly one "
            "(one window of features)"
        )
    if not model.outputs:
        raise SourceModelError(f"{name}: the model has no outputs")
    tensor = inputs[0]
    shape = tuple(None if d is None else int(d) for d in tensor.shape)
    dtype = str(keras.backend.standardize_dtype(tensor.dtype))
    if dtype != "float32" and not dtype.startswith("float"):
        raise SourceModelError(
            f"{name}: the model input is {dtype}, but the gateway feeds float32 windows; rebuild "
            'the model with keras.Input(..., dtype="float32") (cast inside the model if it needs '
            f"{dtype}) and save it again"
        )
    if len(shape) < 2:
        raise SourceModelError(f"{name}: input shape {shape} has no feature axis")
    return shape, dtype


def _refuse_masking_and_state(layers: list[Any], keras: Any, name: str) -> None:
    for layer in layers:
        masks = isinstance(layer, keras.layers.Masking) or (
            isinstance(layer, keras.layers.Embedding) and getattr(layer, "mask_zero", False)
        )
        if masks:
            masking = isinstance(layer, keras.layers.Masking)
            what = "masks timesteps" if masking else "has mask_zero=True"
            raise SourceModelError(
                f"{name}: {_describe(layer)} {what}, but gateway windows are always complete, so "
                "masking has no meaning there; remove it and save the model again"
            )
        if isinstance(layer, keras.layers.RNN) and getattr(layer, "stateful", False):
            raise SourceModelError(
                f"{name}: {_describe(layer)} is stateful=True, carrying state from one window to "
                "the next; gateway windows are independent: rebuild it with stateful=False"
            )


def _is_recurrent(layer: Any, keras: Any) -> bool:
    return isinstance(layer, (keras.layers.RNN, keras.layers.Bidirectional))


def _unrolled_clone(layer: Any, keras: Any) -> Any:
    config = layer.get_config()
    if isinstance(layer, keras.layers.Bidirectional):
        for key in ("layer", "backward_layer"):
            inner = config.get(key)
            if isinstance(inner, dict) and isinstance(inner.get("config"), dict):
                inner["config"]["unroll"] = True
    else:
        config["unroll"] = True
    return type(layer).from_config(config)


def _already_unrolled(layer: Any, keras: Any) -> bool:
    if isinstance(layer, keras.layers.Bidirectional):
        return bool(layer.forward_layer.unroll and layer.backward_layer.unroll)
    return bool(getattr(layer, "unroll", False))


class _Rebuilder:
    """One pass over the model: float32 free-batch input, folded layer skipped, RNNs unrolled."""

    def __init__(self, keras: Any, fold: Any) -> None:
        self.keras = keras
        self.fold = fold
        self.copies: list[tuple[Any, Any]] = []
        self.unrolled: list[str] = []

    def _contains_recurrent(self, model: Any) -> bool:
        return any(_is_recurrent(layer, self.keras) for layer in _all_layers(model))

    def clone(self, layer: Any) -> Any:
        keras = self.keras
        if _is_recurrent(layer, keras) and not _already_unrolled(layer, keras):
            new = _unrolled_clone(layer, keras)
            self.copies.append((layer, new))
            self.unrolled.append(layer.name)
            return new
        if isinstance(layer, keras.Model) and self._contains_recurrent(layer):
            try:
                return keras.models.clone_model(layer, clone_function=self.clone)
            except ValueError:  # a subclassed model: its recurrent layers stay as they are
                return layer
        return layer  # shared: same instance, same weights

    def call(self, layer: Any, *args: Any, **kwargs: Any) -> Any:
        if layer is self.fold:
            return args[0]
        return layer(*args, **kwargs)

    def rebuild(self, model: Any, shape: tuple[int | None, ...]) -> Any:
        keras = self.keras
        inp = keras.Input(shape=shape[1:], dtype="float32", name=model.inputs[0].name)
        if isinstance(model, keras.Sequential):
            x = inp
            for layer in model.layers:
                x = self.call(self.clone(layer), x)
            outputs = [x]
        else:
            structure = keras.tree.map_structure(lambda _t: inp, model.input)
            cloned = keras.models.clone_model(
                model,
                input_tensors=structure,
                clone_function=self.clone,
                call_function=self.call,
            )
            outputs = list(cloned.outputs)
        for old, new in self.copies:
            new.set_weights(old.get_weights())
        return keras.Model(inp, outputs[0] if len(outputs) == 1 else outputs, name=model.name)


def _call(model: Any, keras: Any, x: NDArray[Any], batch: int | None) -> list[NDArray[np.float64]]:
    step = batch or len(x)
    parts: list[list[NDArray[np.float64]]] = []
    for i in range(0, len(x), step):
        out = keras.tree.flatten(model(x[i : i + step], training=False))
        parts.append([np.asarray(o, dtype=np.float64) for o in out])
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def _prove(
    original: Any,
    prepared: Any,
    keras: Any,
    shape: tuple[int | None, ...],
    dtype: str,
    norm: tuple[NDArray[np.float64], NDArray[np.float64]] | None,
    name: str,
    what: str,
    hint: str,
) -> None:
    """The prepared model on normalized inputs must equal the original on raw inputs."""
    batch = shape[0]
    n = batch * max(1, _PROOF_SAMPLES // batch) if batch else _PROOF_SAMPLES
    rng = np.random.default_rng(0)
    z = rng.standard_normal((n, *(int(d or 1) for d in shape[1:]))).astype(np.float32)
    mean = np.zeros(1, np.float32) if norm is None else np.asarray(norm[0], np.float32)
    std = np.ones(1, np.float32) if norm is None else np.asarray(norm[1], np.float32)
    raw = (z * std + mean).astype(np.float32)
    # Values the source dtype represents exactly, so a float16/float64 input is compared fairly.
    raw = raw.astype(dtype).astype(np.float32)
    fed = ((raw - mean) / std).astype(np.float32)  # as floorline.edge.stream.normalization does
    try:
        expected = _call(original, keras, raw.astype(dtype), batch)
        got = _call(prepared, keras, fed, None)
    except Exception as exc:  # Keras raises many types from a model it cannot run
        raise SourceModelError(
            f"{name}: the model could not be prepared for export ({what}): running it failed; "
            "save it as a plain functional model and try again",
            details=str(exc),
        ) from exc
    for k, (want, have) in enumerate(zip(expected, got, strict=True)):
        scale = max(1.0, float(np.max(np.abs(want))))
        err = float(np.max(np.abs(want - have)))
        if want.shape != have.shape or not err <= _PROOF_RTOL * scale:
            raise SourceModelError(
                f"{name}: the model could not be prepared for export ({what}): output {k} "
                f"differs by {err:.3g} from the original; {hint}"
            )


def prepare(model: Any, keras: Any, *, name: str = "model") -> Prepared:
    """Check MODEL and return the model to export; NAME prefixes every message (the file)."""
    shape, dtype = _check_input(model, keras, name)
    layers = _all_layers(model)
    _refuse_masking_and_state(layers, keras, name)

    preprocessing = [
        layer
        for layer in layers
        if isinstance(layer, (keras.layers.Normalization, keras.layers.Rescaling))
    ]
    consumers = _input_consumers(model, keras)
    fold = None
    norm: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None
    for layer in preprocessing:
        top_level = any(layer is other for other in getattr(model, "layers", []))
        if top_level and len(consumers) == 1 and consumers[0] is layer and fold is None:
            try:
                norm = _fold_values(layer, keras, shape)
            except ValueError as exc:
                raise SourceModelError(
                    f"{name}: {_describe(layer)} cannot be folded out of the model: {exc}; "
                    + _card_hint(layer, keras)
                ) from exc
            fold = layer
            continue
        where = "is not the first layer after the input"
        if len(consumers) > 1 and any(layer is c for c in consumers):
            where = "is not the only layer reading the input"
        raise SourceModelError(
            f"{name}: {_describe(layer)} {where}, so it cannot be folded out; "
            + _card_hint(layer, keras)
        )

    recurrent = [
        layer
        for layer in layers
        if _is_recurrent(layer, keras) and not _already_unrolled(layer, keras)
    ]
    notes: list[str] = []
    if recurrent and any(d is None for d in shape[1:]):
        notes.append(
            f"{_describe(recurrent[0])} is not unrolled: the input shape {shape} has no fixed "
            "window length, so TFLite targets will fail; build the model on "
            "keras.Input((window, features)) for TFLite (ONNX works as it is)"
        )
        recurrent = []
    multi_output = len(model.outputs) > 1
    needs = {
        "fixed batch": shape[0] is not None,
        "input dtype": dtype != "float32",
        "fold": fold is not None,
        "unroll": bool(recurrent),
        "outputs": multi_output and not isinstance(model.output, list),
    }
    if not any(needs.values()):
        return Prepared(model, None, notes)

    what = ", ".join(k for k, v in needs.items() if v)
    rebuilder = _Rebuilder(keras, fold)
    try:
        prepared = rebuilder.rebuild(model, shape)
    except Exception as exc:  # Keras raises many types when a graph cannot be re-traced
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if needs["fixed batch"]:
            message = (
                f"{name}: the input has a fixed batch dimension {shape[0]} and the model cannot "
                f"be re-traced with a free one ({detail}); rebuild it with keras.Input(shape) "
                "(no batch_size) and save it again"
            )
        elif needs["unroll"]:
            message = (
                f"{name}: {_describe(recurrent[0])} cannot be unrolled for TFLite ({detail}); "
                "convert to ONNX only (--targets onnx)"
            )
        else:
            message = f"{name}: the model cannot be re-traced for export ({detail})"
        raise SourceModelError(message, details=str(exc)) from exc
    if dtype != "float32":
        out_types = {str(keras.backend.standardize_dtype(o.dtype)) for o in prepared.outputs}
        if out_types != {"float32"}:
            raise SourceModelError(
                f"{name}: the model input is {dtype} and its layers compute in "
                f"{', '.join(sorted(out_types))}; the gateway feeds float32 windows: rebuild the "
                'model with keras.Input(..., dtype="float32") and float32 layers'
            )
    if dtype != "float32":
        hint = 'rebuild the model with keras.Input(..., dtype="float32") and save it again'
    elif fold is not None:
        hint = _card_hint(fold, keras)
    else:
        hint = "convert to ONNX only (--targets onnx) and report this model to Floorline"
    _prove(model, prepared, keras, shape, dtype, norm, name, what, hint)

    normalization = None
    if fold is not None and norm is not None:
        normalization = ([float(v) for v in norm[0]], [float(v) for v in norm[1]])
        notes.append(
            f"folded {_describe(fold)} out of the model into the manifest's input normalization "
            "(the gateway applies it before inference)"
        )
    if rebuilder.unrolled:
        unrolled = [layer.name for layer in layers if layer.name in rebuilder.unrolled]
        notes.append(
            f"unrolled recurrent layer(s) {', '.join(unrolled)} over their time steps, so TFLite "
            "artifacts use built-in ops only and keep a resizable batch"
        )
    if needs["fixed batch"]:
        notes.append(f"re-traced the model with a free batch dimension (source fixed {shape[0]})")
    if dtype != "float32":
        notes.append(f"re-traced the model with a float32 input (source input was {dtype})")
    return Prepared(prepared, normalization, notes)
