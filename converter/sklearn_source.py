"""Loading a fitted scikit-learn model (``.joblib`` / ``.pkl``) as a conversion source.

A source is one estimator, bare or as the last step of a ``Pipeline`` whose earlier steps are
StandardScaler, MinMaxScaler or PCA. Those steps become part of the ONNX graph, so the gateway
feeds raw feature values and the manifest carries no normalization. Only the estimators listed in
``FINAL_ESTIMATORS`` are accepted: each one's ONNX conversion is tested for parity, and a
subclass or a look-alike could predict differently from what the converter writes.

Unpickling runs code from the file; the caller shows ``JOBLIB_WARNING`` before loading.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from floorline.converter.errors import SourceModelError
from floorline.edge.bundle.hashing import sha256_file

JOBLIB_WARNING = "loading a joblib/pickle file runs code from it: convert only models you trust"

Kind = Literal["classifier", "regressor", "anomaly", "transform"]

FINAL_ESTIMATORS: dict[str, Kind] = {
    "IsolationForest": "anomaly",
    "RandomForestClassifier": "classifier",
    "RandomForestRegressor": "regressor",
    "GradientBoostingClassifier": "classifier",
    "GradientBoostingRegressor": "regressor",
    "HistGradientBoostingClassifier": "classifier",
    "HistGradientBoostingRegressor": "regressor",
    "LogisticRegression": "classifier",
    "PCA": "transform",
}
"""Estimators accepted as the model (the last pipeline step), by class name, and their kind."""

PREPROCESSORS = ("StandardScaler", "MinMaxScaler", "PCA")
"""Steps allowed before the last one in a Pipeline."""

_SUFFIXES = (".joblib", ".pkl", ".pickle")

_HEADS: dict[Kind, tuple[str, str]] = {
    "classifier": ("probabilities", "classification"),
    "regressor": ("value", "regression"),
    "anomaly": ("anomaly_score", "anomaly"),
    "transform": ("components", "regression"),
}

# A model fitted on a DataFrame warns on every ndarray it is given; the gateway feeds ndarrays.
_FEATURE_NAMES_WARNING = "X does not have valid feature names"


@dataclass(kw_only=True)
class SklearnSource:
    """A loaded scikit-learn model and what the manifest records about it.

    Every list is per head; the supported estimators all have exactly one head.
    """

    path: Path
    format: str = "sklearn"
    sha256: str
    model: Any
    """The fitted estimator or Pipeline, as unpickled."""
    estimator: str
    """What the model is, e.g. ``Pipeline(StandardScaler, PCA, IsolationForest)``."""
    kind: Kind
    input_shape: tuple[int | None, ...]
    output_shapes: list[tuple[int | None, ...]]
    output_names: list[str]
    normalization: None = None
    notes: list[str] = field(default_factory=list)
    tasks: list[str]
    labels: list[list[str] | None]
    feature_names: list[str] | None = None
    default_thresholds: list[dict[str, float]]
    """Per head, the thresholds a card gets unless it sets its own (anomaly: 0.0, sklearn's)."""

    def predict(self, x: NDArray[np.float32]) -> list[NDArray[np.float32]]:
        """The model's outputs per head, computed on float32 inputs as the gateway feeds them."""
        batch = np.asarray(x, dtype=np.float32)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_FEATURE_NAMES_WARNING)
            out = _run(self.model, self.kind, batch)
        return [np.asarray(out, dtype=np.float32).reshape(len(batch), -1)]

    def export_onnx(self, out: Path, *, opset: int) -> int:
        """Write the model as ONNX (one float input, float heads); return the opset it uses."""
        # skl2onnx takes a second to import: only conversions that write ONNX pay for it.
        from floorline.converter.sklearn_export import export_sklearn  # noqa: PLC0415

        return export_sklearn(
            self.model,
            out,
            kind=self.kind,
            n_features=_int(self.input_shape[1]),
            head=self.output_names[0],
            width=_int(self.output_shapes[0][1]),
            opset=opset,
        )


def _int(value: int | None) -> int:
    if value is None:
        raise ValueError("only the batch dimension may be unknown")
    return value


def _run(model: Any, kind: Kind, x: NDArray[np.float32]) -> Any:
    if kind == "classifier":
        return model.predict_proba(x)
    if kind == "regressor":
        return model.predict(x)
    if kind == "anomaly":
        # sklearn's decision_function is high for inliers; a score that rises with trouble reads
        # the same way as a reconstruction error, so the gateway's anomaly threshold is "above".
        return -np.asarray(model.decision_function(x), dtype=np.float64)
    return model.transform(x)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _import_sklearn() -> tuple[Any, Any]:
    try:
        import joblib  # type: ignore[import-untyped]  # noqa: PLC0415
        import sklearn  # type: ignore[import-untyped]  # noqa: PLC0415
    except ImportError as exc:
        raise SourceModelError(
            "converting scikit-learn models needs scikit-learn and joblib: "
            "pip install 'floorline[sklearn]'"
        ) from exc
    return joblib, sklearn


def _unpickle(path: Path, joblib: Any, sklearn_version: str) -> tuple[Any, list[str]]:
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            obj = joblib.load(path)
        except ModuleNotFoundError as exc:
            raise SourceModelError(
                f"{path}: the file needs Python module {exc.name!r}, which is not installed"
            ) from exc
        except Exception as exc:  # unpickling a foreign file fails in many ways
            raise SourceModelError(
                f"{path}: not a joblib/pickle file scikit-learn can read ({_first_line(exc)})"
            ) from exc
    for w in caught:
        saved = getattr(w.message, "original_sklearn_version", None)
        if saved is not None:
            notes.append(
                f"{getattr(w.message, 'estimator_name', 'the model')} was saved with "
                f"scikit-learn {saved} and loaded with {sklearn_version}; sklearn does not "
                "promise the same predictions across versions"
            )
    return obj, notes


def _steps(path: Path, obj: Any) -> tuple[list[tuple[str, Any]], str]:
    """The pipeline's steps (name, estimator) with passthroughs dropped, and a description."""
    from sklearn.base import BaseEstimator  # type: ignore[import-untyped]  # noqa: PLC0415
    from sklearn.pipeline import Pipeline  # type: ignore[import-untyped]  # noqa: PLC0415

    if not isinstance(obj, BaseEstimator):
        kind = type(obj)
        raise SourceModelError(
            f"{path}: holds a {kind.__module__}.{kind.__qualname__}, not a scikit-learn estimator"
        )
    if type(obj) is Pipeline:
        steps = [(n, s) for n, s in obj.steps if s is not None and s != "passthrough"]
        if not steps:
            raise SourceModelError(f"{path}: the Pipeline has no steps")
        names = ", ".join(type(s).__name__ for _, s in steps)
        return steps, f"Pipeline({names})"
    return [(type(obj).__name__, obj)], type(obj).__name__


def _check_classes(path: Path, steps: list[tuple[str, Any]]) -> Kind:
    import sklearn.decomposition  # type: ignore[import-untyped]  # noqa: PLC0415
    import sklearn.ensemble  # type: ignore[import-untyped]  # noqa: PLC0415
    import sklearn.linear_model  # type: ignore[import-untyped]  # noqa: PLC0415
    import sklearn.preprocessing  # type: ignore[import-untyped]  # noqa: PLC0415

    modules = (
        sklearn.decomposition,
        sklearn.ensemble,
        sklearn.linear_model,
        sklearn.preprocessing,
    )

    def exact(est: Any, names: tuple[str, ...]) -> bool:
        # The class itself, not a subclass: an override of predict would not be in the ONNX graph.
        return any(type(est) is getattr(m, n, None) for m in modules for n in names)

    *before, (_, final) = steps
    if not exact(final, tuple(FINAL_ESTIMATORS)):
        raise SourceModelError(
            f"{path}: {type(final).__name__} is not supported; the model (or a Pipeline's last "
            f"step) must be one of {', '.join(FINAL_ESTIMATORS)}, optionally after "
            f"{', '.join(PREPROCESSORS)} steps"
        )
    for name, step in before:
        if not exact(step, PREPROCESSORS):
            raise SourceModelError(
                f"{path}: pipeline step {name!r} is a {type(step).__name__}; only "
                f"{', '.join(PREPROCESSORS)} may come before the final estimator"
            )
    return FINAL_ESTIMATORS[type(final).__name__]


def _check_fitted(path: Path, steps: list[tuple[str, Any]]) -> None:
    from sklearn.exceptions import NotFittedError  # type: ignore[import-untyped]  # noqa: PLC0415
    from sklearn.utils.validation import (  # type: ignore[import-untyped]  # noqa: PLC0415
        check_is_fitted,
    )

    def fitted(step: Any) -> bool:
        try:
            check_is_fitted(step)
        except NotFittedError:
            return False
        return True

    unfitted = [(name, step) for name, step in steps if not fitted(step)]
    if unfitted:
        name, step = unfitted[0]
        where = "" if len(steps) == 1 else f" (pipeline step {name!r})"
        raise SourceModelError(
            f"{path}: the {type(step).__name__}{where} is not fitted; fit it before saving"
        )


def _check_final(path: Path, final: Any) -> None:
    """Refuse the fitted settings the ONNX conversion cannot express."""
    name = type(final).__name__
    if getattr(final, "n_outputs_", 1) != 1 and name.endswith("Classifier"):
        raise SourceModelError(f"{path}: multi-output {name} is not supported")
    categorical = getattr(final, "is_categorical_", None)
    if categorical is not None and bool(np.any(categorical)):
        raise SourceModelError(
            f"{path}: the {name} uses native categorical features, which ONNX cannot express; "
            "one-hot encode them before fitting"
        )
    if name.startswith("GradientBoosting") and getattr(final, "init", None) not in (None, "zero"):
        raise SourceModelError(
            f"{path}: the {name} has an estimator as init, which the ONNX conversion does not "
            "support; use init=None or 'zero'"
        )


def _probe(model: Any, kind: Kind, n_features: int) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FEATURE_NAMES_WARNING)
        return _run(model, kind, np.zeros((1, n_features), dtype=np.float32))


def _width(path: Path, model: Any, kind: Kind, n_features: int) -> int:
    # One sample through the real model: it proves the model runs here, and gives the output
    # width without knowing each estimator's attribute for it.
    try:
        out = _probe(model, kind, n_features)
    except Exception as exc:  # any estimator's failure: the model cannot be used as is
        raise SourceModelError(
            f"{path}: the model fails on a sample input: {_first_line(exc)}"
        ) from exc
    return int(np.asarray(out).reshape(1, -1).shape[1])


def load_sklearn(path: Path) -> SklearnSource:
    """Load PATH and check it is a fitted model the converter can export and describe.

    Raises SourceModelError with a one-line message for a missing, foreign, unfitted or
    unsupported model.
    """
    if not path.is_file():
        raise SourceModelError(f"{path}: no such model file")
    if path.suffix.lower() not in _SUFFIXES:
        raise SourceModelError(
            f"{path}: unknown model format {path.suffix!r}; expected a scikit-learn model saved "
            f"with joblib or pickle ({', '.join(_SUFFIXES)})"
        )
    joblib, sklearn = _import_sklearn()
    obj, notes = _unpickle(path, joblib, str(sklearn.__version__))
    steps, description = _steps(path, obj)
    kind = _check_classes(path, steps)
    _check_fitted(path, steps)
    final = steps[-1][1]
    _check_final(path, final)
    first = steps[0][1]
    n_features = getattr(first, "n_features_in_", None)
    if not isinstance(n_features, (int, np.integer)) or n_features < 1:
        raise SourceModelError(f"{path}: the model does not record its number of input features")
    n_features = int(n_features)
    names = getattr(first, "feature_names_in_", None)
    feature_names = [str(n) for n in names] if names is not None else None
    width = _width(path, obj, kind, n_features)
    head, task = _HEADS[kind]
    labels = [str(c) for c in final.classes_] if kind == "classifier" else None
    thresholds: dict[str, float] = {}
    if kind == "anomaly":
        thresholds = {"anomaly": 0.0}
        notes.append(
            "anomaly_score is IsolationForest's decision_function negated: higher is more "
            "anomalous, and above 0.0 is where scikit-learn calls a sample an outlier "
            f"(contamination={final.contamination!r}); the default threshold is 0.0"
        )
    if kind == "regressor":
        notes.append(
            "the gateway sums the trees' leaf values in float32: expect values to differ from "
            "sklearn's by a few float32 steps (about 2e-7 x |value|)"
        )
    before = [type(s).__name__ for _, s in steps[:-1]]
    if type(final).__name__.startswith("HistGradientBoosting") and "PCA" in before:
        notes.append(
            "sklearn's HistGradientBoosting compares PCA outputs in float64, the gateway in "
            "float32: a sample within one float32 step of a split can take the other branch"
        )
    if len(steps) > 1:
        notes.append(
            f"the {', '.join(before)} step(s) run inside the "
            "ONNX graph: the gateway feeds raw feature values, and the bundle has no normalization"
        )
    return SklearnSource(
        path=path,
        sha256=sha256_file(path),
        model=obj,
        estimator=description,
        kind=kind,
        input_shape=(None, n_features),
        output_shapes=[(None, width)],
        output_names=[head],
        notes=notes,
        tasks=[task],
        labels=[labels],
        feature_names=feature_names,
        default_thresholds=[thresholds],
    )
