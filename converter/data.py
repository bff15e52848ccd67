"""Reading calibration and parity data: .npy, .npz or .csv, in raw sensor units.

Data files hold what sensors produce, in the units the card names; the converter applies the
card's normalization exactly as a gateway will, so calibration sees the inputs the model will see.

Accepted layouts for a model taking windows of W samples of F features:
- an array (N, W, F): N windows;
- an array or CSV of rows (M, F): consecutive samples, cut into M // W non-overlapping windows.
For a per-sample model (input (batch, F)) both mean N samples. An .npz is read from its array
``x`` (or ``inputs``, or its only array).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from floorline.converter.errors import CalibrationDataError
from floorline.edge.bundle.manifest import InputSpec
from floorline.edge.stream.normalization import model_input


def _read(path: Path, origin: str) -> NDArray[np.generic]:
    try:
        if path.suffix == ".npy":
            return np.asarray(np.load(path, allow_pickle=False))
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                for key in ("x", "inputs"):
                    if key in npz.files:
                        return np.asarray(npz[key])
                if len(npz.files) == 1:
                    return np.asarray(npz[npz.files[0]])
                raise CalibrationDataError(
                    f"{origin} {path}: .npz holds {npz.files}; name the input array 'x'"
                )
        if path.suffix == ".csv":
            return _read_csv(path, origin)
    except (OSError, ValueError, EOFError) as exc:
        raise CalibrationDataError(f"{origin} {path}: cannot read: {exc}") from exc
    raise CalibrationDataError(f"{origin} {path}: unknown format; use .npy, .npz or .csv")


def _read_csv(path: Path, origin: str) -> NDArray[np.generic]:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise CalibrationDataError(f"{origin} {path}: empty file")
    # A header row is allowed; any other non-numeric cell is an error with its line number.
    start = 0 if _numeric(lines[0]) is not None else 1
    rows: list[list[float]] = []
    for number, line in enumerate(lines[start:], start=start + 1):
        row = _numeric(line)
        if row is None:
            raise CalibrationDataError(f"{origin} {path}:{number}: non-numeric value")
        rows.append(row)
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise CalibrationDataError(f"{origin} {path}: rows have different numbers of columns")
    return np.asarray(rows, dtype=np.float64)


def _numeric(line: str) -> list[float] | None:
    try:
        return [float(cell) for cell in line.split(",")]
    except ValueError:
        return None


def load_inputs(path: Path, spec: InputSpec, *, origin: str = "calibration data") -> NDArray[
    np.float32
]:
    """Read PATH as model inputs for SPEC: shaped, checked, featurized (a stage) and normalized."""
    return model_input(load_windows(path, spec, origin=origin), spec)


def load_windows(path: Path, spec: InputSpec, *, origin: str = "calibration data") -> NDArray[
    np.float32
]:
    """Read PATH as raw windows for SPEC (what a gateway's windows hold): shaped and checked."""
    if not path.is_file():
        raise CalibrationDataError(f"{origin} {path}: no such file")
    raw = _read(path, origin)
    if raw.dtype.kind not in "fiu":
        raise CalibrationDataError(
            f"{origin} {path}: dtype {raw.dtype} is not numeric (expected float or int values)"
        )
    sample_shape = tuple(d for d in spec.shape[1:] if d is not None)
    n_features = len(spec.features)
    if raw.shape[1:] == sample_shape:
        data = raw
    elif raw.ndim == 2 and raw.shape[1] == n_features and len(sample_shape) == 2:
        usable = (raw.shape[0] // spec.window) * spec.window
        data = raw[:usable].reshape(-1, *sample_shape)
    else:
        raise CalibrationDataError(
            f"{origin} {path}: shape {raw.shape} does not fit the model input "
            f"(N, {', '.join(map(str, sample_shape))}); rows of {n_features} features are also "
            "accepted and cut into windows"
        )
    if len(data) == 0:
        raise CalibrationDataError(
            f"{origin} {path}: holds no complete input (needs at least {spec.window} rows)"
        )
    if not np.isfinite(data).all():
        raise CalibrationDataError(f"{origin} {path}: contains NaN or infinite values")
    return data.astype(np.float32)

