"""scikit-learn models → ONNX: what load_sklearn infers, parity on the gateway's backend, refusals.

Each zoo model is saved with joblib, loaded, exported, and run by the gateway's own ONNX backend
on 512 held-out samples of continuous data (2 % of them outliers); its outputs must match
``SklearnSource.predict`` within the float32 bound.
"""

from __future__ import annotations

import pickle
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("skl2onnx")
pytest.importorskip("onnxruntime")

import joblib
import onnx
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from floorline.converter.errors import SourceModelError
from floorline.converter.sklearn_source import (
    FINAL_ESTIMATORS,
    JOBLIB_WARNING,
    load_sklearn,
)
from floorline.edge import backends
from floorline.edge.bundle.hashing import sha256_file
from tests import sklearn_zoo as zoo

ATOL = 1e-4
"""The project's float32 parity bound."""


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    return zoo.held_out(512)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_export_matches_predict_on_the_gateway_backend(
    name: str, tmp_path: Path, held_out: np.ndarray
) -> None:
    case = zoo.ZOO[name]
    path = zoo.save(case.make(), tmp_path, name)
    source = load_sklearn(path)

    assert source.format == "sklearn"
    assert source.sha256 == sha256_file(path)
    assert source.input_shape == (None, len(zoo.FEATURES))
    assert source.output_names == [case.head]
    assert source.output_shapes == [(None, case.width)]
    assert source.tasks == [case.task]
    assert source.normalization is None
    assert source.feature_names is None

    started = time.perf_counter()
    opset = source.export_onnx(tmp_path / "model.onnx", opset=17)
    seconds = time.perf_counter() - started
    assert 1 <= opset <= 17

    model = onnx.load(str(tmp_path / "model.onnx"))
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "input"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value or None for d in inp.type.tensor_type.shape.dim] == [None, 6]
    assert out.name == case.head
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value or None for d in out.type.tensor_type.shape.dim] == [None, case.width]
    assert not any(node.op_type == "ZipMap" for node in model.graph.node)

    backend = backends.create("onnx", tmp_path / "model.onnx")
    try:
        got = backend.infer(held_out)
    finally:
        backend.close()
    (expected,) = source.predict(held_out)
    assert expected.dtype == np.float32
    assert expected.shape == got.shape == (len(held_out), case.width)
    error = float(np.abs(got - expected).max())
    agreement = (
        float((got.argmax(1) == expected.argmax(1)).mean())
        if case.task == "classification"
        else None
    )
    print(f"{name}: max abs error {error:.2e}, agreement {agreement}, export {seconds:.2f} s")
    assert error <= ATOL
    if agreement is not None:
        assert agreement >= 0.99


def test_classifier_labels_are_its_classes_as_strings(tmp_path: Path) -> None:
    named = load_sklearn(zoo.save(zoo.rf_classifier(), tmp_path, "named"))
    numbered = load_sklearn(zoo.save(zoo.gb_classifier(), tmp_path, "numbered"))
    binary = load_sklearn(zoo.save(zoo.logistic_binary(), tmp_path, "binary"))
    regressor = load_sklearn(zoo.save(zoo.gb_regressor(), tmp_path, "regressor"))

    assert named.labels == [sorted(zoo.STATES)]
    assert numbered.labels == [["0", "1", "2"]]
    assert binary.labels == [["False", "True"]]
    assert regressor.labels == [None]
    assert regressor.default_thresholds == [{}]


def test_anomaly_score_is_negated_decision_function_with_threshold_zero(
    tmp_path: Path, held_out: np.ndarray
) -> None:
    model = zoo.scaler_pca_iforest()
    source = load_sklearn(zoo.save(model, tmp_path, "iforest"))

    (score,) = source.predict(held_out)
    np.testing.assert_allclose(score[:, 0], -model.decision_function(held_out), atol=1e-6)
    assert source.default_thresholds == [{"anomaly": 0.0}]
    assert any("0.0" in note and "higher is more anomalous" in note for note in source.notes)
    # The default threshold is sklearn's own verdict: outlier (-1) exactly when the score is > 0.
    assert np.array_equal(score[:, 0] > 0.0, model.predict(held_out) == -1)
    assert 0 < int((score > 0).sum()) < len(held_out)


def test_feature_names_from_a_dataframe_fit_are_kept(tmp_path: Path, held_out: np.ndarray) -> None:
    source = load_sklearn(zoo.save(zoo.named_features(), tmp_path, "named"))

    assert source.feature_names == list(zoo.FEATURES)
    # sklearn warns when a DataFrame-fitted model gets an ndarray; predict() feeds ndarrays.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        source.predict(held_out[:4])


def test_pickle_and_pkl_files_load(tmp_path: Path) -> None:
    model = zoo.gb_regressor()
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(model))

    assert load_sklearn(plain).output_names == ["value"]
    assert load_sklearn(zoo.save(model, tmp_path, "dumped", suffix=".pkl")).output_names == [
        "value"
    ]


def test_lower_opset(tmp_path: Path, held_out: np.ndarray) -> None:
    source = load_sklearn(zoo.save(zoo.scaler_gb_classifier(), tmp_path, "gb"))

    assert source.export_onnx(tmp_path / "model.onnx", opset=13) <= 13
    backend = backends.create("onnx", tmp_path / "model.onnx")
    try:
        got = backend.infer(held_out)
    finally:
        backend.close()
    assert float(np.abs(got - source.predict(held_out)[0]).max()) <= ATOL


def _refusal(path: Path) -> str:
    with pytest.raises(SourceModelError) as info:
        load_sklearn(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_unsupported_estimator_is_named_with_the_supported_ones(tmp_path: Path) -> None:
    x, state, _ = zoo.features(100, 0)
    message = _refusal(zoo.save(SVC().fit(x, state), tmp_path, "svc"))

    assert "SVC is not supported" in message
    assert all(name in message for name in FINAL_ESTIMATORS)


def test_unsupported_pipeline_step_is_named(tmp_path: Path) -> None:
    x, state, _ = zoo.features(100, 0)
    pipe = make_pipeline(Normalizer(), RandomForestClassifier(n_estimators=3)).fit(x, state)
    message = _refusal(zoo.save(pipe, tmp_path, "normalizer"))

    assert "'normalizer' is a Normalizer" in message
    assert "StandardScaler, MinMaxScaler, PCA" in message


def test_unfitted_models_are_refused(tmp_path: Path) -> None:
    bare = _refusal(zoo.save(RandomForestClassifier(), tmp_path, "bare"))
    pipe = _refusal(
        zoo.save(make_pipeline(StandardScaler(), RandomForestClassifier()), tmp_path, "pipe")
    )
    half = make_pipeline(StandardScaler(), RandomForestClassifier())
    half.steps[0][1].fit(np.ones((4, 3)))
    step = _refusal(zoo.save(half, tmp_path, "half"))

    assert "the RandomForestClassifier is not fitted" in bare
    assert "the StandardScaler (pipeline step 'standardscaler') is not fitted" in pipe
    assert "(pipeline step 'randomforestclassifier') is not fitted" in step


def test_a_file_that_is_not_a_pickle_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "model.joblib"
    text.write_text("rms,kurtosis\n0.1,3.0\n")
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")

    assert "not a joblib/pickle file" in _refusal(text)
    assert "not a joblib/pickle file" in _refusal(empty)


def test_a_pickle_of_something_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.joblib"
    joblib.dump({"weights": [1.0, 2.0]}, path)

    assert "holds a builtins.dict, not a scikit-learn estimator" in _refusal(path)


def test_missing_file_and_other_suffixes_are_refused(tmp_path: Path) -> None:
    assert "no such model file" in _refusal(tmp_path / "absent.joblib")
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"\x08\x07")
    assert "expected a scikit-learn model saved with joblib or pickle" in _refusal(onnx_file)


def test_native_categorical_features_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.integers(0, 4, 200), rng.normal(size=200)])
    model = HistGradientBoostingClassifier(categorical_features=[0], max_iter=5)
    with threadpool_limits(1):  # see sklearn_zoo._one_thread
        model.fit(x, (x[:, 0] > 1).astype(int))

    assert "categorical" in _refusal(zoo.save(model, tmp_path, "categorical"))


def test_the_warning_about_pickles_is_exported() -> None:
    assert "runs code" in JOBLIB_WARNING
