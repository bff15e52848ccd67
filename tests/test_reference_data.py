"""``floorline-convert --reference-data`` / ``--no-reference``: the drift reference's own data.

Calibration data covers every class (int8 needs it), a drift reference should be the plant's
normal operation: with ``--reference-data`` the reference is made of those windows alone. All on
the scikit-learn path (no TensorFlow).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from floorline.converter import cli
from floorline.converter.card import ModelCard
from floorline.converter.convert import ConvertRequest, convert
from floorline.converter.drift_summary import MIN_REFERENCE_WINDOWS
from floorline.converter.errors import CalibrationDataError
from floorline.edge.bundle.bundle import Bundle
from floorline.edge.bundle.manifest import FEATURES_SCHEMA, SCHEMA_VERSION, ReferenceSummary

SK_FEATURES = ["rms_g", "peak_g", "crest_factor", "kurtosis", "temperature_c", "dominant_hz"]
LABELS = ["bearing_wear", "imbalance", "normal"]
NORMAL = 0  # the state index of sklearn_zoo.features whose rows are left unchanged


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fitted classifier, balanced calibration and parity files, and one normal-state file."""
    from tests import sklearn_zoo  # noqa: PLC0415

    root = tmp_path_factory.mktemp("reference-data")
    sklearn_zoo.save(sklearn_zoo.ZOO["logistic"].make(), root, "logistic")
    np.save(root / "calibration.npy", sklearn_zoo.features(1000, 11)[0].astype(np.float32))
    np.save(root / "parity.npy", sklearn_zoo.features(400, 12)[0].astype(np.float32))
    x, state, _ = sklearn_zoo.features(3000, 13)
    np.save(root / "normal.npy", x[state == NORMAL].astype(np.float32))
    return root


def _request(work: Path, out: Path, **more: Any) -> ConvertRequest:
    card = ModelCard.model_validate({"name": "sk-ref", "task": "classification",
                                     "features": SK_FEATURES, "labels": LABELS})
    return ConvertRequest(source=work / "logistic.joblib", out=out, card=card, targets=["onnx"],
                          calibration=work / "calibration.npy",
                          parity_data=work / "parity.npy", kind="sklearn", **more)


def _reference(bundle: Path) -> ReferenceSummary:
    with Bundle.open(bundle) as opened:
        ref = opened.manifest.reference
    assert ref is not None
    return ref


@pytest.fixture(scope="module")
def default_bundle(work: Path) -> tuple[Path, list[str]]:
    said: list[str] = []
    convert(_request(work, work / "default"), say=said.append)
    return work / "default", said


def test_by_default_the_reference_is_calibration_and_parity_and_the_converter_says_so(
        default_bundle: tuple[Path, list[str]]) -> None:
    bundle, said = default_bundle
    ref = _reference(bundle)
    assert ref.data == "calibration+parity"
    assert ref.windows == 1400
    notes = [s for s in said if "made of the calibration+parity data" in s]
    assert len(notes) == 1, said
    assert "--reference-data" in notes[0]
    assert "normal operation" in notes[0]


def test_reference_data_alone_makes_the_reference(
        work: Path, default_bundle: tuple[Path, list[str]]) -> None:
    # Through the command line, as a user types it: the flag reaches the conversion.
    out = work / "referenced"
    code = cli.main(["sklearn", str(work / "logistic.joblib"), "--out", str(out),
                     "--name", "sk-ref", "--features", ",".join(SK_FEATURES),
                     "--calibration", str(work / "calibration.npy"),
                     "--parity-data", str(work / "parity.npy"),
                     "--reference-data", str(work / "normal.npy")])
    assert code == 0
    normal = np.load(work / "normal.npy")
    ref, default = _reference(out), _reference(default_bundle[0])
    assert ref.data == "reference"
    assert ref.windows == len(normal)
    by_key = {(h.kind, h.name, h.statistic): h for h in ref.histograms}
    old = {(h.kind, h.name, h.statistic): h for h in default.histograms}
    assert by_key.keys() == old.keys()
    # Deciles of the normal rows alone, not of the balanced classes: the edges moved, and the
    # normal rows fill the reference's own bins evenly.
    for f, name in enumerate(SK_FEATURES):
        hist = by_key["input", name, "mean"]
        assert hist.edges != old["input", name, "mean"].edges
        column = normal[:, f].astype(np.float64)
        expected = np.quantile(column, np.linspace(0, 1, 11)[1:-1])
        np.testing.assert_allclose(hist.edges, expected, rtol=1e-4)
    # The model's outputs on those windows: one class, where the balanced data had three.
    classes = by_key["output", "output", "class"].counts
    assert max(classes) > 0.9 * len(normal), classes
    assert min(old["output", "output", "class"].counts) > 300
    # Calibration and parity kept their roles: parity ran on the parity file.
    with Bundle.open(out) as opened:
        assert opened.manifest.artifacts[0].parity.samples == 400


def test_no_reference_writes_none_and_the_manifest_is_schema_2(
        work: Path, default_bundle: tuple[Path, list[str]]) -> None:
    said: list[str] = []
    out = work / "none"
    convert(_request(work, out, no_reference=True), say=said.append)
    raw = (out / "manifest.json").read_bytes()
    assert b'"reference"' not in raw
    manifest = json.loads(raw)
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert any(s.startswith("drift reference: none (--no-reference)") for s in said), said
    # The same manifest as the default one but for the reference and the schema it needed.
    default = json.loads((default_bundle[0] / "manifest.json").read_bytes())
    assert default["schema_version"] == FEATURES_SCHEMA
    for doc in (manifest, default):
        for key in ("created_at", "reference", "schema_version"):
            doc.pop(key, None)
    assert manifest == default


def test_reference_data_of_the_wrong_shape_is_refused_before_any_export(
        work: Path, tmp_path: Path) -> None:
    bad = tmp_path / "five.npy"
    np.save(bad, np.zeros((500, 5), dtype=np.float32))
    with pytest.raises(CalibrationDataError, match=r"reference data .*five.npy: shape \(500, 5\)"):
        convert(_request(work, tmp_path / "b", reference_data=[bad]), say=lambda _m: None)
    assert not (tmp_path / "b").exists()


def test_too_few_reference_windows_are_refused(work: Path, tmp_path: Path) -> None:
    few = tmp_path / "few.npy"
    np.save(few, np.load(work / "normal.npy")[: MIN_REFERENCE_WINDOWS - 1])
    with pytest.raises(CalibrationDataError,
                       match=rf"{MIN_REFERENCE_WINDOWS - 1} windows, too few for a drift "
                             rf"reference \(needs at least {MIN_REFERENCE_WINDOWS}"):
        convert(_request(work, tmp_path / "b", reference_data=[few]), say=lambda _m: None)
    assert not (tmp_path / "b").exists()


def test_reference_files_are_joined_and_the_minimum_counts_them_all(
        work: Path, tmp_path: Path) -> None:
    normal = np.load(work / "normal.npy")
    half = MIN_REFERENCE_WINDOWS // 2 + 1
    paths = [tmp_path / "a.npy", tmp_path / "b.npy"]
    np.save(paths[0], normal[:half])
    np.save(paths[1], normal[half : 2 * half])
    convert(_request(work, tmp_path / "out", reference_data=paths), say=lambda _m: None)
    assert _reference(tmp_path / "out").windows == 2 * half


def test_the_command_line_refuses_bad_reference_flags(
        work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["sklearn", str(work / "logistic.joblib"), "--out", str(tmp_path / "o"),
            "--name", "sk-ref", "--features", ",".join(SK_FEATURES)]
    assert cli.main([*base, "--reference-data", str(tmp_path / "missing.npy")]) == 2
    assert "--reference-data" in capsys.readouterr().err
    assert cli.main([*base, "--reference-data", str(work / "normal.npy"),
                     "--no-reference"]) == 2
    assert "--no-reference: cannot be combined with --reference-data" in capsys.readouterr().err
    bad = tmp_path / "five.npy"
    np.save(bad, np.zeros((500, 5), dtype=np.float32))
    assert cli.main([*base, "--reference-data", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "reference data" in err
    assert "does not fit the model input" in err
    assert not (tmp_path / "o").exists()
