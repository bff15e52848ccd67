"""ONNX exporter for scikit-learn models, shaped for the gateway's ONNX backend.

The graph has one float input ``input`` [None, n_features] and one float output, the head. The
final estimator goes through skl2onnx; its ``label`` output (int64 or string) is pruned, ZipMap
is off, and an IsolationForest's score is negated.

The preprocessing steps (StandardScaler, MinMaxScaler, PCA) are written here as plain ONNX ops
instead: tree splits must see the same float32 values as in sklearn, bit for bit, or a sample
near a threshold takes the other branch. skl2onnx's own versions compute in another order (its
Scaler op multiplies by 1/scale, its PCA centres before projecting), which flipped 1 sample in
20 000 of a StandardScaler+PCA+IsolationForest by 9e-4. Each step below does what sklearn's
``transform`` does on a float32 input, in the same dtypes:

- StandardScaler: float32 arithmetic with float32-cast parameters (sklearn >= 1.6 casts them;
  earlier versions computed in float64 and rounded, which can differ by one float32 step).
- MinMaxScaler: ``X *= scale_; X += min_`` in place: float64 arithmetic, rounded to float32 after
  each operation; then the clip, if set.
- PCA: a float32 input times float64 components is float64, centred after the projection.

Trees then read float32 (sklearn's trees cast to float32; HistGradientBoosting reads float64,
but ONNX Runtime has no double TreeEnsemble under ai.onnx.ml 3, so after a PCA its splits can
still rarely flip). LogisticRegression and a PCA head stay in double until a final Cast.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from floorline.converter.errors import ExportError
from floorline.converter.native_output import captured

_ML_OPSET = 3
"""ai.onnx.ml opset: TreeEnsemble*/LinearClassifier v3 run on every ONNX Runtime from 1.17."""

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


def _onnx() -> tuple[Any, Any, Any]:
    try:
        import onnx  # noqa: PLC0415 - only the converter needs it
        from onnx import helper, numpy_helper  # noqa: PLC0415
    except ImportError as exc:
        raise ExportError(
            "ONNX export of scikit-learn models needs skl2onnx and onnx: "
            "pip install 'floorline[sklearn]'"
        ) from exc
    return onnx, helper, numpy_helper


class _Graph:
    """Nodes and constants appended in order, with names that cannot meet skl2onnx's."""

    def __init__(self) -> None:
        _, self.helper, self.numpy_helper = _onnx()
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def _fresh(self, stem: str) -> str:
        self._count += 1
        return f"floorline_{stem}_{self._count}"

    def const(self, value: Any, dtype: np.dtype[Any]) -> str:
        name = self._fresh("const")
        array = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        self.initializers.append(self.numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        out = out or self._fresh(op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def cast(self, x: str, have: np.dtype[Any], want: np.dtype[Any]) -> str:
        if have == want:
            return x
        return self.op("Cast", [x], to=self.helper.np_dtype_to_tensor_dtype(want))


def _standard_scaler(g: _Graph, step: Any, x: str, dt: np.dtype[Any]) -> tuple[str, np.dtype[Any]]:
    if step.with_mean and step.mean_ is not None:
        x = g.op("Sub", [x, g.const(step.mean_, dt)])
    if step.with_std and step.scale_ is not None:
        x = g.op("Div", [x, g.const(step.scale_, dt)])
    return x, dt


def _min_max_scaler(g: _Graph, step: Any, x: str, dt: np.dtype[Any]) -> tuple[str, np.dtype[Any]]:
    wide = np.result_type(dt, step.scale_.dtype)
    for op, param in (("Mul", step.scale_), ("Add", step.min_)):
        x = g.cast(g.op(op, [g.cast(x, dt, wide), g.const(param, wide)]), wide, dt)
    if step.clip:
        low, high = step.feature_range
        x = g.op("Max", [x, g.const(low, dt)])
        x = g.op("Min", [x, g.const(high, dt)])
    return x, dt


def _pca(g: _Graph, step: Any, x: str, dt: np.dtype[Any]) -> tuple[str, np.dtype[Any]]:
    components = np.asarray(step.components_)
    wide = np.result_type(dt, components.dtype)
    x = g.op("MatMul", [g.cast(x, dt, wide), g.const(components.T, wide)])
    centre = np.reshape(step.mean_, (1, -1)) @ components.T
    x = g.op("Sub", [x, g.const(centre, wide)])
    if step.whiten:
        scale = np.sqrt(np.asarray(step.explained_variance_))
        eps = np.finfo(scale.dtype).eps
        x = g.op("Div", [x, g.const(np.maximum(scale, eps), wide)])
    return x, wide


_STEPS = {"StandardScaler": _standard_scaler, "MinMaxScaler": _min_max_scaler, "PCA": _pca}


@contextlib.contextmanager
def _hist_gradient_boosting_fixes() -> Iterator[None]:
    """Two skl2onnx 1.20 defects in HistGradientBoosting*, patched for one conversion.

    1. A leaf's ``nodes_missing_value_tracks_true`` is a Python bool, which protobuf >= 5 refuses
       in an int list ("Expected an int, got a boolean"): the conversion fails outright.
    2. Its thresholds are rounded to the nearest float32 instead of adjusted like every other
       tree's (``sklearn_threshold``): a float32 input equal to a threshold rounded up takes the
       other branch than in sklearn. Held-out data hit it (a 0.6 error in one sample of 512).

    A skl2onnx without these defects is unaffected by the patches.
    """
    from skl2onnx.common import tree_ensemble  # type: ignore[import-untyped]  # noqa: PLC0415
    from skl2onnx.operator_converters import (  # type: ignore[import-untyped]  # noqa: PLC0415
        random_forest,
    )

    add_node = tree_ensemble.add_node
    add_hist_tree = random_forest.add_tree_to_attribute_pairs_hist_gradient_boosting
    hist_signature = inspect.signature(add_hist_tree)

    @functools.wraps(add_node)
    def add_node_int_flags(*args: Any, nodes_missing_value_tracks_true: Any = 0, **kw: Any) -> Any:
        return add_node(
            *args, nodes_missing_value_tracks_true=int(nodes_missing_value_tracks_true), **kw
        )

    @functools.wraps(add_hist_tree)
    def add_hist_tree_adjusted(*args: Any, **kw: Any) -> Any:
        bound = hist_signature.bind(*args, **kw)
        bound.arguments["adjust_threshold_for_sklearn"] = True
        return add_hist_tree(*bound.args, **bound.kwargs)

    tree_ensemble.add_node = add_node_int_flags
    random_forest.add_tree_to_attribute_pairs_hist_gradient_boosting = add_hist_tree_adjusted
    try:
        yield
    finally:
        tree_ensemble.add_node = add_node
        random_forest.add_tree_to_attribute_pairs_hist_gradient_boosting = add_hist_tree


def _convert_final(estimator: Any, name: str, width: int, dt: np.dtype[Any], opset: int) -> Any:
    """The final estimator alone through skl2onnx, reading tensor NAME of dtype DT."""
    try:
        from skl2onnx import convert_sklearn  # type: ignore[import-untyped]  # noqa: PLC0415
        from skl2onnx.common.data_types import (  # type: ignore[import-untyped]  # noqa: PLC0415
            DoubleTensorType,
            FloatTensorType,
        )
    except ImportError as exc:
        raise ExportError(
            "ONNX export of scikit-learn models needs skl2onnx and onnx: "
            "pip install 'floorline[sklearn]'"
        ) from exc
    # No ZipMap: it turns probabilities into a sequence of maps, which is not a tensor.
    options = {id(estimator): {"zipmap": False}} if hasattr(estimator, "predict_proba") else None
    tensor = DoubleTensorType if dt == _F64 else FloatTensorType
    with captured() as log, _hist_gradient_boosting_fixes():
        try:
            return convert_sklearn(
                estimator,
                initial_types=[(name, tensor([None, width]))],
                target_opset={"": opset, "ai.onnx.ml": _ML_OPSET},
                options=options,
            )
        except Exception as exc:  # skl2onnx raises assorted types
            text = str(exc).strip()
            first = text.splitlines()[0][:300] if text else type(exc).__name__
            raise ExportError(
                f"skl2onnx cannot convert the {type(estimator).__name__} (opset {opset}): {first}",
                details=f"{text[:4000]}\n{log.tail()}",
            ) from exc


def _prune(graph: Any) -> None:
    """Drop every node, initializer and value_info the graph outputs do not depend on."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _steps(model: Any) -> list[Any]:
    steps = getattr(model, "steps", None)
    if steps is None:
        return [model]
    return [s for _, s in steps if s is not None and s != "passthrough"]


def export_sklearn(
    model: Any, out: Path, *, kind: str, n_features: int, head: str, width: int, opset: int
) -> int:
    """Write MODEL as ONNX with input ``input`` [None, n_features] and output HEAD [None, width].

    KIND is the source's ("classifier", "regressor", "anomaly", "transform"); an anomaly head is
    the estimator's score negated. Returns the main-domain opset the file uses.
    """
    onnx, helper, _ = _onnx()
    steps = _steps(model)
    before, final = (steps, None) if kind == "transform" else (steps[:-1], steps[-1])
    g = _Graph()
    x, dt = "input", _F32
    for step in before:
        x, dt = _STEPS[type(step).__name__](g, step, x, dt)
    if final is None:
        opsets = [helper.make_opsetid("", opset)]
        tail, tail_dt, nodes, inits = x, dt, [], []
    else:
        # sklearn's trees read float32; LogisticRegression computes in float64.
        want = _F64 if type(final).__name__ == "LogisticRegression" else _F32
        x = g.cast(x, dt, want)
        features = int(getattr(final, "n_features_in_", n_features))
        onx = _convert_final(final, x, features, want, opset)
        # skl2onnx's outputs follow sklearn's API: (label, probabilities) for classifiers,
        # (label, scores) for outlier detectors, a single tensor otherwise.
        outputs = list(onx.graph.output)
        index = 1 if kind in ("classifier", "anomaly") else 0
        if len(outputs) <= index:
            names = [o.name for o in outputs]
            raise ExportError(f"skl2onnx wrote outputs {names}; expected a {kind} head among them")
        tail = outputs[index].name
        tail_dt = np.dtype(
            helper.tensor_dtype_to_np_dtype(outputs[index].type.tensor_type.elem_type)
        )
        nodes, inits, opsets = list(onx.graph.node), list(onx.graph.initializer), onx.opset_import
        if any(head in node.output for node in nodes):
            # A classifier's own "probabilities": free the name for the head, added last.
            raw = f"floorline_{head}_raw"
            for node in nodes:
                node.input[:] = [raw if n == head else n for n in node.input]
                node.output[:] = [raw if n == head else n for n in node.output]
            tail = raw if tail == head else tail
    g.nodes.extend(nodes)
    g.initializers.extend(inits)
    y = g.cast(tail, tail_dt, _F32)
    if kind == "anomaly":
        # sklearn's decision_function is high for inliers; negated, it rises with trouble.
        g.op("Neg", [y], out=head)
    elif y != head:
        g.op("Identity", [y], out=head)
    graph = helper.make_graph(
        g.nodes,
        "floorline_sklearn",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info(head, onnx.TensorProto.FLOAT, [None, width])],
        initializer=g.initializers,
    )
    _prune(graph)
    # A pruned label branch may have been the only user of ai.onnx.ml: do not import it then.
    used = {node.domain or "" for node in graph.node} | {""}
    # skl2onnx lists the main domain twice for some trees: one entry per domain, the highest.
    versions: dict[str, int] = {}
    for o in opsets:
        domain = "" if o.domain in ("", "ai.onnx") else str(o.domain)
        if domain in used:
            versions[domain] = max(versions.get(domain, 0), int(o.version))
    versions.setdefault("", opset)
    imports = [helper.make_opsetid(d, v) for d, v in sorted(versions.items())]
    onx_out = helper.make_model(graph, opset_imports=imports, producer_name="floorline-convert")
    # The lowest IR version that carries these opsets, so older gateway runtimes load the file.
    onx_out.ir_version = helper.find_min_ir_version_for(imports)
    try:
        onnx.checker.check_model(onx_out, full_check=True)
    except Exception as exc:  # onnx raises ValidationError and shape-inference errors
        raise ExportError(
            f"the ONNX graph for the {kind} head {head!r} is invalid: {str(exc).strip()[:300]}"
        ) from exc
    onnx.save(onx_out, str(out))
    return versions[""]
