"""Issue 17, the example closes the loop: an unseen fault, drift, labels, retraining, a push.

The walk (``floorline.converter.examples.closed_loop --short``) runs against this test's own
mosquitto with the real gateway, simulator, capture export, trainer and fleet commands as
subprocesses. The checks on ``pdm --extra-data`` that need no training run without TensorFlow.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from floorline.converter.examples import pdm
from floorline.edge.bundle.manifest import Manifest
from floorline.edge.demo.signals import CONDITIONS, Condition

TRAINED = [c.value for c in CONDITIONS]
NEW = Condition.BEARING_INNER_RACE.value


def _capture_file(path: Path, n: int, labels: list[str], *, window: int = 64,
                  end: np.ndarray | None = None) -> Path:
    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = {
        "x": rng.normal(0, 0.1, (n, window, 3)).astype(np.float32),
        "y": np.array(labels, dtype=str),
    }
    if end is not None:
        arrays["end"] = end
    np.savez(path, **arrays)
    return path


def test_extra_data_appends_new_labels_after_the_trained_ones_and_leaves_unlabelled_out(
        tmp_path: Path) -> None:
    labels = ["zz_new"] * 20 + [""] * 5 + [NEW] * 20 + ["imbalance"] * 10
    extra = pdm.load_extra([_capture_file(tmp_path / "a.npz", len(labels), labels)])
    assert extra.labels == [*TRAINED, NEW, "zz_new"]
    assert extra.counts == {NEW: 20, "zz_new": 20, "imbalance": 10}
    assert extra.ignored == 5
    _, y_train = extra.splits["train"]
    assert np.bincount(y_train, minlength=6).tolist() == [0, 7, 0, 0, 14, 14]
    held = sum(len(extra.splits[s][1]) for s in ("validation", "parity"))
    assert held + len(y_train) == 50


def test_captured_windows_are_split_in_time_order(tmp_path: Path) -> None:
    # Overlapping neighbours must not judge each other: training takes the earliest windows.
    n = 20
    end = np.arange(n, dtype=np.float64)[::-1].copy()  # the file is newest first
    path = _capture_file(tmp_path / "a.npz", n, [NEW] * n, end=end)
    with np.load(path) as npz:
        x = npz["x"]
    extra = pdm.load_extra([path])
    oldest_first = x[::-1]
    np.testing.assert_array_equal(extra.splits["train"][0], oldest_first[:14])
    np.testing.assert_array_equal(extra.splits["parity"][0], oldest_first[17:])


def test_extra_data_of_another_window_shape_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = _capture_file(tmp_path / "other.npz", 10, [NEW] * 10, window=32)
    with pytest.raises(pdm.ExtraDataError, match=r"shape \(32, 3\).*takes \(64, 3\).*--pipeline"):
        pdm.load_extra([path])


def test_extra_data_without_labels_is_refused(tmp_path: Path) -> None:
    path = _capture_file(tmp_path / "none.npz", 10, [""] * 10)
    with pytest.raises(pdm.ExtraDataError, match=r"no labelled windows.*10 without a label"):
        pdm.load_extra([path])


def test_too_little_reference_data_is_refused_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _capture_file(tmp_path / "normal.npz", 10, [""] * 10)
    code = pdm.main(["--out", str(tmp_path / "b"), "--work", str(tmp_path / "w"),
                     "--reference-data", str(path), "--targets", "onnx,tflite-int8"])
    assert code == 2
    assert "10 windows, too few for a drift reference" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert not (tmp_path / "w").exists()  # refused before anything was trained or written


def test_a_retrained_card_has_the_new_labels_and_a_minor_version_up(tmp_path: Path) -> None:
    labels = [NEW] * 10
    extra = pdm.load_extra([_capture_file(tmp_path / "a.npz", 10, labels)])
    card = pdm.write_card(tmp_path / "card.yaml", [0.0] * 3, [1.0] * 3, extra=extra)
    assert card["labels"] == [*TRAINED, NEW]
    assert card["version"] == "1.1.0"
    assert "captured" in card["description"]
    plain = pdm.write_card(tmp_path / "plain.yaml", [0.0] * 3, [1.0] * 3)
    assert plain["labels"] == TRAINED
    assert plain["version"] == "1.0.0"


@pytest.mark.tensorflow
@pytest.mark.slow
def test_the_short_walk_teaches_the_gateway_the_unseen_fault(mosquitto: Any,
                                                            tmp_path: Path) -> None:
    from floorline.converter.examples import closed_loop  # noqa: PLC0415

    printed = io.StringIO()
    try:
        o = closed_loop.walk(tmp_path, "127.0.0.1", mosquitto.port, closed_loop.SHORT,
                             out=printed)
    finally:
        print(printed.getvalue())  # shown by pytest when the test fails
    faulty = closed_loop.FAULTY

    # The healthy plant was judged against its own normal operation: no drift before the fault.
    assert all(d["status"] == "ok" for d in o.healthy_drift), o.healthy_drift
    # The unseen fault moved the window statistics: the pipeline's alert, on vibration energy.
    assert o.alert is not None
    assert o.alert["pipeline"] == closed_loop.PIPELINE
    assert o.alert["state"] == "drift"
    assert o.alert["score"] >= o.alert["level"]
    assert o.alert["top"][0]["statistic"] == "std", o.alert
    # The first model, which knows no inner race, named something it knows for the faulty pump.
    assert sum(o.old_labels.values()) > 0
    assert NEW not in o.old_labels

    # The operator's label reached the stored windows, and the export has them, labelled.
    assert o.exported["labels"] == {NEW: o.exported["windows"]}
    assert o.exported["assets"] == {faulty: o.exported["windows"]}
    assert o.exported["windows"] >= 100
    with np.load(tmp_path / "captured.npz") as npz:
        assert npz["x"].shape == (o.exported["windows"], 64, 3)
        assert set(npz["y"].tolist()) == {NEW}

    # The retrained bundle has the new class after the trained ones, and the plant's reference.
    manifest = Manifest.model_validate(o.new_manifest)
    assert [h.labels for h in manifest.heads] == [[*TRAINED, NEW]]
    assert manifest.version == "1.1.0"
    assert manifest.reference is not None
    assert manifest.reference.windows == o.reference_windows

    # Both pushes were applied (fleet push --wait exit 0), and the fleet says so.
    assert o.push_codes == [0, 0]
    assert "pdm-classifier 1.1.0" in o.fleet_status
    assert "applied" in o.fleet_status

    # The new bundle names the fault; the healthy pumps stay healthy.
    final = o.final_labels
    assert set(final) == {f"pump-{i:02d}" for i in range(1, closed_loop.ASSETS + 1)}, final
    for asset, labels in final.items():
        n = sum(labels.values())
        assert n >= 20, (asset, labels)
        expected = NEW if asset == faulty else "healthy"
        assert labels[expected] / n >= 0.8, (asset, labels)
    summary = {k: v for k, v in vars(o).items()
               if k in ("seconds", "drift_scores", "old_labels", "final_labels", "training")}
    print(json.dumps(summary, default=str))
