"""Small fitted scikit-learn models for the sklearn converter tests, each fitted in well under 1 s.

The data imitates what a vibration gateway computes per window: engineered features (RMS, peak,
crest factor, kurtosis, temperature, dominant frequency), three machine states for classifiers
and a continuous wear target for regressors. Classes overlap, so probabilities are not all 0/1
and parity compares real numbers rather than saturated ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    IsolationForest,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from threadpoolctl import threadpool_limits

FEATURES = ("rms_g", "peak_g", "crest_factor", "kurtosis", "temperature_c", "dominant_hz")
STATES = ("normal", "imbalance", "bearing_wear")


def features(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (n, 6) float64 in raw units, state index (n,), wear in % (n,))."""
    rng = np.random.default_rng(seed)
    state = rng.integers(0, 3, n)
    rms = rng.gamma(4.0, 0.05, n) * (1 + 0.8 * (state == 1))
    crest = rng.normal(3.0, 0.4, n) + 1.2 * (state == 2)
    peak = rms * crest
    kurt = rng.lognormal(1.1, 0.25, n) + 2.0 * (state == 2)
    temp = rng.normal(45.0, 4.0, n) + 6.0 * (state == 2) + 30 * rms
    hz = np.where(state == 1, rng.normal(25, 2, n), rng.normal(120, 30, n))
    x = np.column_stack([rms, peak, crest, kurt, temp, hz])
    wear = 20 * kurt + 0.8 * (temp - 45) + 40 * rms + rng.normal(0, 3, n)
    return x, state, wear


def held_out(n: int = 512, seed: int = 99) -> np.ndarray:
    """Continuous held-out inputs (float32, as a gateway feeds them), plus 2 % outliers."""
    x, _, _ = features(n, seed)
    rng = np.random.default_rng(seed + 1)
    rows = rng.choice(n, max(1, n // 50), replace=False)
    x[rows] *= rng.uniform(1.5, 3.0, (len(rows), x.shape[1]))
    return x.astype(np.float32)


def _train(seed: int = 0, n: int = 600) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return features(n, seed)


def _one_thread(make: Callable[[], Any]) -> Callable[[], Any]:
    # HistGradientBoosting fits with OpenMP threads that spin while waiting; on a busy 2-core
    # machine that took a 0.1 s fit to 5-15 s. One thread is also deterministic.
    @functools.wraps(make)
    def fit() -> Any:
        with threadpool_limits(1):
            return make()

    return fit


def _labels(state: np.ndarray) -> np.ndarray:
    return np.asarray(STATES)[state]


@_one_thread
def rf_classifier() -> Any:
    x, s, _ = _train()
    return RandomForestClassifier(n_estimators=30, max_depth=8, random_state=0).fit(x, _labels(s))


@_one_thread
def rf_regressor() -> Any:
    x, _, w = _train()
    return RandomForestRegressor(n_estimators=30, max_depth=8, random_state=0).fit(x, w)


@_one_thread
def rf_regressor_2out() -> Any:
    """Two targets at once: wear and the temperature 10 minutes ahead."""
    x, _, w = _train()
    y = np.column_stack([w, x[:, 4] + 0.5 * x[:, 0]])
    return RandomForestRegressor(n_estimators=20, max_depth=6, random_state=0).fit(x, y)


@_one_thread
def gb_classifier() -> Any:
    x, s, _ = _train()
    return GradientBoostingClassifier(n_estimators=40, max_depth=3, random_state=0).fit(x, s)


@_one_thread
def gb_regressor() -> Any:
    x, _, w = _train()
    return GradientBoostingRegressor(n_estimators=60, max_depth=3, random_state=0).fit(x, w)


@_one_thread
def hgb_classifier() -> Any:
    x, s, _ = _train()
    return HistGradientBoostingClassifier(max_iter=40, random_state=0).fit(x, _labels(s))


@_one_thread
def hgb_regressor() -> Any:
    x, _, w = _train()
    return HistGradientBoostingRegressor(max_iter=60, random_state=0).fit(x, w)


@_one_thread
def logistic() -> Any:
    x, s, _ = _train()
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, s)


@_one_thread
def logistic_binary() -> Any:
    """Two classes, so the probabilities head is (None, 2), not a single sigmoid column."""
    x, s, _ = _train()
    return make_pipeline(MinMaxScaler(), LogisticRegression(max_iter=500)).fit(x, s == 2)


@_one_thread
def isolation_forest() -> Any:
    x, s, _ = _train()
    return IsolationForest(n_estimators=50, random_state=0).fit(x[s == 0])


@_one_thread
def scaler_pca_iforest() -> Any:
    x, s, _ = _train()
    iforest = IsolationForest(n_estimators=50, random_state=0)
    return make_pipeline(StandardScaler(), PCA(n_components=4, random_state=0), iforest).fit(
        x[s == 0]
    )


@_one_thread
def scaler_gb_classifier() -> Any:
    x, s, _ = _train()
    gb = GradientBoostingClassifier(n_estimators=40, max_depth=3, random_state=0)
    return make_pipeline(StandardScaler(), gb).fit(x, _labels(s))


@_one_thread
def scaler_pca() -> Any:
    x, _, _ = _train()
    return make_pipeline(StandardScaler(), PCA(n_components=3, random_state=0)).fit(x)


@_one_thread
def pca() -> Any:
    x, _, _ = _train()
    return PCA(n_components=2, random_state=0).fit(x)


@_one_thread
def named_features() -> Any:
    """A model that remembers its column names, as if fitted on a DataFrame.

    sklearn sets ``feature_names_in_`` from a DataFrame's columns; pandas is not a test
    dependency, so the attribute is set the way sklearn's own check sets it.
    """
    model = hgb_regressor()
    model.feature_names_in_ = np.asarray(FEATURES, dtype=object)
    return model


@dataclass(frozen=True)
class Case:
    """A zoo model and what the converter should infer for its one head."""

    make: Callable[[], Any]
    head: str
    task: str
    width: int


ZOO: dict[str, Case] = {
    "rf_classifier": Case(rf_classifier, "probabilities", "classification", 3),
    "rf_regressor": Case(rf_regressor, "value", "regression", 1),
    "rf_regressor_2out": Case(rf_regressor_2out, "value", "regression", 2),
    "gb_classifier": Case(gb_classifier, "probabilities", "classification", 3),
    "gb_regressor": Case(gb_regressor, "value", "regression", 1),
    "hgb_classifier": Case(hgb_classifier, "probabilities", "classification", 3),
    "hgb_regressor": Case(hgb_regressor, "value", "regression", 1),
    "logistic": Case(logistic, "probabilities", "classification", 3),
    "logistic_binary": Case(logistic_binary, "probabilities", "classification", 2),
    "isolation_forest": Case(isolation_forest, "anomaly_score", "anomaly", 1),
    "scaler_pca_iforest": Case(scaler_pca_iforest, "anomaly_score", "anomaly", 1),
    "scaler_gb_classifier": Case(scaler_gb_classifier, "probabilities", "classification", 3),
    "scaler_pca": Case(scaler_pca, "components", "regression", 3),
    "pca": Case(pca, "components", "regression", 2),
}


def save(model: Any, directory: Path, name: str, suffix: str = ".joblib") -> Path:
    """Dump MODEL with joblib (a .pkl suffix still gets joblib's pickle-compatible format)."""
    path = directory / f"{name}{suffix}"
    joblib.dump(model, path)
    return path
