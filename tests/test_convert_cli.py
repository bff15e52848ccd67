"""floorline-convert's command line without TensorFlow: the model card's rules, every flag checked
before TensorFlow is imported, one-line errors with the right exit status, and the sign and
inspect commands on real bundles."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from floorline.converter import cli
from floorline.converter.card import load_card
from floorline.converter.errors import ConversionError, ModelCardError
from floorline.converter.progress import step
from floorline.edge.bundle.archive import pack
from floorline.edge.bundle.bundle import SIGNATURE_FILE
from floorline.edge.bundle.manifest import Task
from tests.bundle_factory import make_bundle

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "edge" / "models" / "pdm-classifier"

GOOD = "name: demo\nversion: 1.0.0\n"
CLASSIFIER = GOOD + "task: classification\nlabels: [ok, bad]\n"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A model file that exists; nothing here gets far enough to load it."""
    path = tmp_path / "model.keras"
    path.write_bytes(b"not loaded")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def convert_with_card(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path, card: str, *flags: str
) -> tuple[int, str]:
    path = tmp_path / "card.yaml"
    path.write_text(textwrap.dedent(card))
    code, _, err = run(capsys, "keras", model, "--out", tmp_path / "out", "--card", path, *flags)
    return code, err


def assert_one_error(code: int, err: str, *words: str, status: int = 2) -> None:
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("floorline-convert: error: "), err
    assert "Traceback" not in err
    assert "should match" not in err.lower()  # no pydantic wording
    for word in words:
        assert word in lines[0], (word, lines[0])


# --- the model card ---------------------------------------------------------------------------

CARD_CASES = {
    "name-slug": (CLASSIFIER.replace("demo", "My Model"), ["card name:", "'My Model'", "my-model"]),
    "version-semver": (CLASSIFIER.replace("1.0.0", "1.0"), ["card version:", "'1.0'", "1.0.0"]),
    "task-choice": (GOOD + "task: classifier\n", ["card task:", "'classifier'", "classification"]),
    "classification-labels": (GOOD + "task: classification\n", ["card labels:", "missing"]),
    "labels-unique": (GOOD + "task: classification\nlabels: [a, b, a]\n", ["card labels[2]:"]),
    "labels-yaml-boolean": (
        GOOD + "task: classification\nlabels: [yes, no]\n",
        ["card labels[0]:", "quote"],
    ),
    "labels-not-for-regression": (GOOD + "task: regression\nlabels: [a]\n", ["card labels:"]),
    "anomaly-threshold": (GOOD + "task: anomaly\n", ["card thresholds.anomaly:", "score"]),
    "threshold-names-a-label": (
        CLASSIFIER + "thresholds: {bda: 0.5}\n",
        ["card thresholds.bda:", "'bad'"],
    ),
    "regression-no-thresholds": (
        GOOD + "task: regression\nthresholds: {x: 1}\n",
        ["card thresholds.x:"],
    ),
    "threshold-finite": (GOOD + "task: anomaly\nthresholds: {anomaly: .nan}\n", ["finite"]),
    "units-regression-only": (CLASSIFIER + "units: [h, h]\n", ["card units:", "regression"]),
    "score-anomaly-only": (
        GOOD + "task: regression\nscore: {threshold: 1}\n",
        ["card score:", "task: anomaly"],
    ),
    "score-one-of": (
        GOOD + "task: anomaly\nscore: {percentile: 99, threshold: 0.1}\n",
        ["card score.threshold:", "only one"],
    ),
    "score-needs-one": (GOOD + "task: anomaly\nscore: {metric: mae}\n", ["card score.threshold:"]),
    "score-percentile-range": (
        GOOD + "task: anomaly\nscore: {percentile: 100}\n",
        ["card score.percentile:", "100"],
    ),
    "score-threshold-positive": (
        GOOD + "task: anomaly\nscore: {threshold: -1}\n",
        ["card score.threshold:", "-1"],
    ),
    "score-metric": (
        GOOD + "task: anomaly\nscore: {metric: rmse, threshold: 1}\n",
        ["card score.metric:", "'rmse'", "mse"],
    ),
    "score-with-threshold": (
        GOOD + "task: anomaly\nthresholds: {anomaly: 1}\nscore: {threshold: 1}\n",
        ["card thresholds.anomaly:", "score"],
    ),
    "features-unique": (
        GOOD + "task: regression\nfeatures: [{name: a}, {name: a}]\n",
        ["card features[1]:", "'a'"],
    ),
    "normalization-per-feature": (
        GOOD + "task: regression\nfeatures: [{name: a}, {name: b}]\n"
        "normalization: {mean: [0], std: [1]}\n",
        ["card normalization.mean:", "2 features"],
    ),
    "normalization-lengths": (
        GOOD + "task: regression\nnormalization: {mean: [0, 0], std: [1]}\n",
        ["card normalization.std:"],
    ),
    "normalization-std-positive": (
        GOOD + "task: regression\nnormalization: {mean: [0, 0], std: [1, 0]}\n",
        ["card normalization.std[1]:", "> 0"],
    ),
    "window-positive": (GOOD + "task: regression\nwindow: 0\n", ["card window:"]),
    "window-number": (GOOD + "task: regression\nwindow: big\n", ["card window:", "'big'"]),
    "unknown-key": (CLASSIFIER + "labls: [a]\n", ["card labls:", "did you mean labels"]),
    "outputs-refuse-labels": (
        GOOD + "labels: [a, b]\noutputs: [{name: f, task: classification, labels: [a, b]}]\n",
        ["card labels:", "outputs[i]"],
    ),
    "outputs-refuse-thresholds": (
        GOOD + "thresholds: {a: 1}\noutputs: [{name: f, task: classification, labels: [a]}]\n",
        ["card thresholds:", "outputs[i]"],
    ),
    "outputs-refuse-units": (
        GOOD + "units: [h]\noutputs: [{name: r, task: regression}]\n",
        ["card units:", "outputs[i]"],
    ),
    "outputs-refuse-score": (
        GOOD + "score: {threshold: 1}\noutputs: [{name: r, task: regression}]\n",
        ["card score:"],
    ),
    "outputs-names-unique": (
        GOOD + "outputs: [{name: r, task: regression}, {name: r, task: regression}]\n",
        ["card outputs[1].name:", "'r'"],
    ),
    "outputs-name-slug": (
        GOOD + "outputs: [{name: r, task: regression}, {name: Fault X, task: regression}]\n",
        ["card outputs[1].name:", "fault-x"],
    ),
    "outputs-classification-labels": (
        GOOD + "outputs: [{name: r, task: regression}, {name: f, task: classification}]\n",
        ["card outputs[1].labels:", "missing"],
    ),
    "outputs-anomaly-threshold": (
        GOOD + "outputs: [{name: r, task: regression}, {name: a, task: anomaly}]\n",
        ["card outputs[1].thresholds.anomaly:", "missing"],
    ),
    "outputs-unknown-key": (
        GOOD + "outputs: [{name: r, task: regression, unit: [h]}]\n",
        ["card outputs[0].unit:", "did you mean units"],
    ),
    "outputs-empty": (GOOD + "outputs: []\n", ["card outputs:"]),
    "outputs-task-first-head": (
        GOOD + "task: classification\noutputs: [{name: r, task: regression}]\n",
        ["card task:", "outputs[0]"],
    ),
    "not-a-mapping": ("- name: demo\n", ["--card", "mapping"]),
    "bad-yaml": ("name: [demo\n", ["--card", "not valid YAML", "line"]),
}


@pytest.mark.parametrize("case", list(CARD_CASES))
def test_card_rules_name_the_key_the_value_and_the_fix(capsys, tmp_path, model, case):
    card, words = CARD_CASES[case]
    code, err = convert_with_card(capsys, tmp_path, model, card)
    assert_one_error(code, err, *words)
    assert not (tmp_path / "out").exists()


FLAG_CARD_CASES = {
    "name": (["--name", "My Model"], ["--name:", "'My Model'", "use --name my-model"]),
    "version": (["--model-version", "1.0"], ["--model-version:", "'1.0'", "1.0.0"]),
    "norm-std": (
        ["--norm-mean", "0,0", "--norm-std", "1,0"],
        ["--norm-std:", "0.0", "> 0"],
    ),
    "threshold": (["--threshold", "bda=0.5"], ["--threshold:", "'bda'", "'bad'"]),
    "units": (["--units", "h,h"], ["--units:", "regression"]),
    "labels-unique": (["--labels", "a,a"], ["--labels:", "'a'"]),
    "features-unique": (["--features", "x:g,x:g"], ["--features:", "'x'"]),
    "window": (["--window", "0"], ["--window:"]),
    "score-task": (["--score-threshold", "1"], ["--score-threshold", "task"]),
}


@pytest.mark.parametrize("case", list(FLAG_CARD_CASES))
def test_a_value_from_a_flag_is_blamed_on_the_flag(capsys, tmp_path, model, case):
    flags, words = FLAG_CARD_CASES[case]
    code, err = convert_with_card(capsys, tmp_path, model, CLASSIFIER, *flags)
    assert_one_error(code, err, *words)
    assert "card " not in err


def test_flags_without_a_card_are_blamed_on_flags(capsys, tmp_path, model):
    base = ["keras", model, "--out", tmp_path / "o", "--name", "demo"]
    code, _, err = run(capsys, *base, "--task", "classification")
    assert_one_error(code, err, "--labels:", "missing", "use --labels")
    code, _, err = run(capsys, *base, "--task", "anomaly")
    assert_one_error(code, err, "--threshold:", "anomaly=")
    code, _, err = run(capsys, *base, "--task", "anomaly", "--score-metric", "mae")
    assert_one_error(code, err, "--score-threshold:", "--score-percentile")
    code, _, err = run(capsys, *base, "--task", "anomaly", "--score-percentile", "100")
    assert_one_error(code, err, "--score-percentile:", "100")
    code, _, err = run(capsys, "keras", model, "--out", tmp_path / "o", "--task", "regression")
    assert_one_error(code, err, "--name: missing", "use --name")


def test_flags_override_and_merge_into_the_card(tmp_path):
    card = tmp_path / "card.yaml"
    card.write_text(
        CLASSIFIER + "thresholds: {ok: 0.2}\nnormalization: {mean: [0, 0], std: [1, 1]}\n"
    )
    loaded = load_card(
        card,
        {
            "name": "other",
            "thresholds": {"bad": 0.7},
            "normalization.std": [2.0, 3.0],
            "labels": None,
        },
    )
    assert loaded.name == "other"
    assert loaded.thresholds == {"ok": 0.2, "bad": 0.7}
    assert loaded.normalization is not None
    assert loaded.normalization.mean == [0.0, 0.0]
    assert loaded.normalization.std == [2.0, 3.0]


def test_valid_cards_load(tmp_path):
    card = tmp_path / "card.yaml"
    card.write_text(
        GOOD + "outputs:\n"
        "  - {name: fault, task: classification, labels: [ok, bad], thresholds: {bad: 0.6}}\n"
        "  - {name: rul, task: regression, units: [h]}\n"
        "  - {name: drift, task: anomaly, thresholds: {anomaly: 3}}\n"
    )
    loaded = load_card(card, {})
    assert loaded.task is Task.CLASSIFICATION  # outputs[0]'s
    assert [h.name for h in loaded.heads] == ["fault", "rul", "drift"]
    auto = load_card(None, {"name": "ae", "task": "anomaly", "score.percentile": 99.5})
    assert auto.score is not None
    assert (auto.score.metric, auto.score.percentile, auto.score.threshold) == ("mse", 99.5, None)
    assert auto.heads[0].task is Task.ANOMALY
    reg = load_card(
        None, {"name": "r", "version": "2.0.0-rc.1", "task": "regression", "units": ["h"]}
    )
    assert reg.units == ["h"]
    with pytest.raises(ModelCardError, match=r"^--name: missing"):
        load_card(None, {"task": "regression"})
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("task: regression\n")
    with pytest.raises(ModelCardError, match=r"^card name: missing"):
        load_card(nameless, {})


# --- flags, before TensorFlow -----------------------------------------------------------------


def test_flag_rules_name_the_flag_and_exit_2(capsys, tmp_path, model):
    out = tmp_path / "out"
    card = tmp_path / "card.yaml"
    card.write_text(CLASSIFIER)
    ok = ["keras", model, "--out", out, "--card", card]
    calib_txt = tmp_path / "calib.txt"
    calib_txt.write_text("1,2\n")
    public = tmp_path / "k.pub"
    cases: list[tuple[list[object], list[str]]] = [
        (["keras", tmp_path / "nope.keras", "--out", out, "--card", card], ["MODEL", "nope.keras"]),
        ([*ok, "--calibration", tmp_path / "nope.npy"], ["--calibration", "no such file"]),
        ([*ok, "--calibration", calib_txt], ["--calibration", "'.txt'", ".npy"]),
        ([*ok, "--parity-data", calib_txt], ["--parity-data", "'.txt'"]),
        ([*ok, "--parity-data", tmp_path], ["--parity-data", "not a file"]),
        ([*ok, "--targets", "tflite,tflite-int4"], ["--targets", "tflite-int4", "tflite-int8"]),
        ([*ok, "--targets", ","], ["--targets", "no targets"]),
        ([*ok, "--targets", "all"], ["--calibration", "tflite-int8"]),
        ([*ok, "--sign-key", tmp_path / "none.key"], ["--sign-key", "keygen"]),
        ([*ok, "--sign-key", model], ["--sign-key", "private key"]),
        ([*ok, "--sign-key", public], ["--sign-key", "public key"]),
        ([*ok, "--opset", "12"], ["--opset 12", "13 to 21"]),
        ([*ok, "--opset", "22"], ["--opset 22"]),
        ([*ok, "--seed", "-1"], ["--seed -1"]),
        ([*ok, "--atol", "0"], ["--atol 0.0", "> 0"]),
        ([*ok, "--atol", "nan"], ["--atol nan"]),
        ([*ok, "--quantized-atol", "-1"], ["--quantized-atol -1.0"]),
        ([*ok, "--min-agreement", "0"], ["--min-agreement 0.0"]),
        ([*ok, "--min-agreement", "1.01"], ["--min-agreement 1.01"]),
        (["keras", model, "--out", out, "--card", tmp_path / "none.yaml"], ["--card", "no such"]),
        ([*ok, "--opset", "x"], ["--opset", "'x'"]),  # argparse's own errors: one line too
        ([*ok, "--threshold", "bad"], ["--threshold", "NAME=VALUE"]),
        ([*ok, "--norm-mean", "a,b"], ["--norm-mean", "numbers"]),
        (["keras", model], ["--out"]),
    ]
    public.write_text("-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----\n")
    for argv, words in cases:
        code, _, err = run(capsys, *argv)
        assert_one_error(code, err, *words)
    autoencoder = tmp_path / "ae.yaml"
    autoencoder.write_text(GOOD + "task: anomaly\nscore: {percentile: 99.5}\n")
    code, _, err = run(capsys, "keras", model, "--out", out, "--card", autoencoder)
    assert_one_error(code, err, "--calibration", "percentile 99.5")
    assert not out.exists()
    out.mkdir()
    code, _, err = run(capsys, *ok)
    assert_one_error(code, err, "--out", "--force")


def test_boundary_values_pass_preflight(tmp_path, model):
    card = tmp_path / "card.yaml"
    card.write_text(CLASSIFIER)
    calib = tmp_path / "calib.npz"
    calib.write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    args = cli._parser().parse_args(
        [
            "keras", str(model), "--out", str(out), "--force", "--card", str(card),
            "--opset", "21", "--seed", "0", "--min-agreement", "1", "--atol", "1e-9",
            "--targets", "all", "--calibration", str(calib),
        ]
    )  # fmt: skip
    cli.preflight(args)
    args.opset = 13
    cli.preflight(args)
    args.card = None
    args.name, args.task, args.score_percentile = "ae", "anomaly", 99.0
    cli.preflight(args)  # a percentile threshold, with calibration data to take it from


def test_verbose_shows_details_only_when_asked(capsys, monkeypatch):
    def fail(_args: object) -> int:
        raise ConversionError("export failed: named here", details="tool line 1\ntool line 2")

    monkeypatch.setitem(cli._COMMANDS, "keygen", fail)
    code, _, err = run(capsys, "keygen", "x")
    assert_one_error(code, err, "export failed: named here (run with -v for details)", status=1)
    assert "tool line" not in err
    for argv in (["-v", "keygen", "x"], ["keygen", "x", "-v"]):
        code, _, err = run(capsys, *argv)
        assert code == 1
        lines = err.splitlines()
        assert lines[0] == "floorline-convert: error: export failed: named here"
        assert lines[1] == "details:"
        assert "tool line 1" in lines[2]
        assert "tool line 2" in lines[3]

    def plain(_args: object) -> int:
        raise ConversionError("plain")

    monkeypatch.setitem(cli._COMMANDS, "keygen", plain)
    code, _, err = run(capsys, "keygen", "x")
    assert err.strip() == "floorline-convert: error: plain"


def test_a_genuine_bug_keeps_its_traceback(monkeypatch):
    def bug(_args: object) -> int:
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(cli._COMMANDS, "keygen", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["keygen", "x"])


PROBE = """
import sys
from floorline.converter.cli import main
code = main(sys.argv[1:])
print("exit", code, "tensorflow" in sys.modules, "keras" in sys.modules)
"""


def test_bad_cards_and_flags_fail_before_tensorflow_is_imported(tmp_path, model):
    card = tmp_path / "card.yaml"
    card.write_text(GOOD + "task: anomaly\n")
    good = tmp_path / "good.yaml"
    good.write_text(CLASSIFIER)
    for flags in (
        ["--card", str(card)],
        ["--card", str(good), "--opset", "9"],
        ["--card", str(good), "--name", "Bad Name"],
    ):
        argv = ["keras", str(model), "--out", str(tmp_path / "o"), *flags]
        proc = subprocess.run(
            [sys.executable, "-c", PROBE, *argv],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.stdout.split() == ["exit", "2", "False", "False"], proc.stdout + proc.stderr
        assert_one_error(2, proc.stderr, "floorline-convert: error:")


def test_convert_module_does_not_import_tensorflow():
    code = "import sys, floorline.converter.convert; print('tensorflow' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip() == "False", proc.stderr


# --- sign and inspect -------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, tuple[Path, Path, str]]:
    made = {}
    for name in ("alice", "bob"):
        assert cli.main(["keygen", str(tmp_path / name)]) == 0
        key_id = capsys.readouterr().out.split("key id ")[1].rstrip(")\n")
        made[name] = (tmp_path / f"{name}.key", tmp_path / f"{name}.pub", key_id)
    return made


@pytest.fixture
def example(tmp_path: Path) -> Path:
    copy = tmp_path / "pdm"
    shutil.copytree(EXAMPLE, copy)
    return copy


def inspect_trusting(capsys, bundle: Path, public: Path) -> tuple[int, str, str]:
    return run(capsys, "inspect", bundle, "--trust", public, "--require-signature")


def test_sign_a_directory_in_place_and_verify_it(capsys, tmp_path, keys, example):
    alice_key, alice_pub, alice_id = keys["alice"]
    manifest_before = (example / "manifest.json").read_bytes()
    code, _, err = inspect_trusting(capsys, example, alice_pub)
    assert_one_error(code, err, "unsigned", status=1)

    code, out, err = run(capsys, "sign", example, "--key", alice_key)
    assert code == 0, err
    assert alice_id in out
    assert (example / "manifest.json").read_bytes() == manifest_before  # signed, not rewritten
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    code, out, err = inspect_trusting(capsys, example, alice_pub)
    assert code == 0, err
    assert f"signed by key {alice_id} (verified)" in out

    # Already signed: replacing the signature takes --force.
    bob_key, bob_pub, bob_id = keys["bob"]
    code, _, err = run(capsys, "sign", example, "--key", bob_key)
    assert_one_error(code, err, "already signed by key " + alice_id, "--force")
    code, out, err = run(capsys, "sign", example, "--key", bob_key, "--force")
    assert code == 0, err
    assert bob_id in out
    code, _, err = inspect_trusting(capsys, example, alice_pub)
    assert_one_error(code, err, bob_id, "not trusted", status=1)
    assert inspect_trusting(capsys, example, bob_pub)[0] == 0
    assert (EXAMPLE / SIGNATURE_FILE).exists() is False  # the committed example is untouched


def test_sign_refuses_a_bundle_whose_files_do_not_verify(capsys, keys, example):
    alice_key = keys["alice"][0]
    data = bytearray((example / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (example / "model.onnx").write_bytes(bytes(data))
    code, _, err = run(capsys, "sign", example, "--key", alice_key)
    assert_one_error(code, err, "refusing to sign", "model.onnx", status=1)
    assert not (example / SIGNATURE_FILE).exists()
    (example / "extra.bin").write_bytes(b"x")
    code, _, err = run(capsys, "sign", example, "--key", alice_key, "--force")
    assert_one_error(code, err, "refusing to sign", status=1)
    assert not (example / SIGNATURE_FILE).exists()


def test_sign_a_directory_to_another_directory(capsys, tmp_path, keys, example):
    alice_key, alice_pub, _ = keys["alice"]
    out = tmp_path / "signed"
    assert run(capsys, "sign", example, "--key", alice_key, "--out", out)[0] == 0
    assert not (example / SIGNATURE_FILE).exists()
    assert inspect_trusting(capsys, out, alice_pub)[0] == 0
    code, _, err = run(capsys, "sign", example, "--key", alice_key, "--out", out)
    assert_one_error(code, err, "--out", "--force")
    assert run(capsys, "sign", example, "--key", alice_key, "--out", out, "--force")[0] == 0


def test_sign_a_tar_in_place_and_to_another_file(capsys, tmp_path, keys):
    alice_key, alice_pub, alice_id = keys["alice"]
    bundle = make_bundle(tmp_path / "bundle")
    tar = pack(bundle, tmp_path / "bundle.tar")
    other = tmp_path / "signed.tar"
    code, out, err = run(capsys, "sign", tar, "--key", alice_key, "--out", other)
    assert code == 0, err
    assert inspect_trusting(capsys, tar, alice_pub)[0] == 1  # the source tar is unchanged
    code, out, err = inspect_trusting(capsys, other, alice_pub)
    assert code == 0, err
    assert f"signed by key {alice_id} (verified)" in out

    code, out, err = run(capsys, "sign", tar, "--key", alice_key)
    assert code == 0, err
    assert inspect_trusting(capsys, tar, alice_pub)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    code, _, err = run(capsys, "sign", tar, "--key", alice_key)
    assert_one_error(code, err, "already signed", "--force")


def test_sign_flag_errors(capsys, tmp_path, keys, example):
    code, _, err = run(capsys, "sign", example, "--key", tmp_path / "none.key")
    assert_one_error(code, err, "--key", "keygen")
    code, _, err = run(capsys, "sign", example, "--key", keys["alice"][1])
    assert_one_error(code, err, "--key", "public key")
    code, _, err = run(capsys, "sign", tmp_path / "nothing", "--key", keys["alice"][0])
    assert_one_error(code, err, "BUNDLE", "nothing")


def test_inspect_a_tar_shows_the_tar_path(capsys, tmp_path, example):
    tar = pack(example, tmp_path / "pdm.tar")
    code, out, err = run(capsys, "inspect", tar)
    assert code == 0, err
    assert f"path       {tar}" in out
    assert "floorline-bundle-" not in out
    code, _, err = run(capsys, "inspect", example, "--trust", tmp_path / "none.pub")
    assert_one_error(code, err, "--trust", "none.pub")


def test_bench_flag_errors(capsys, example):
    code, _, err = run(capsys, "bench", example, "--batches", "1,x")
    assert_one_error(code, err, "--batches")
    code, _, err = run(capsys, "bench", example, "--iterations", "0")
    assert_one_error(code, err, "--iterations 0")


# --- progress ---------------------------------------------------------------------------------


def test_step_says_start_duration_and_failure():
    said: list[str] = []
    with step("exporting tflite", said.append) as timer:
        pass
    assert said[0] == "exporting tflite ..."
    assert said[1].startswith("exporting tflite: ")
    assert said[1].endswith(" s")
    assert timer.elapsed >= 0
    with pytest.raises(KeyError), step("exporting onnx", said.append):
        raise KeyError("boom")
    assert said[2] == "exporting onnx ..."
    assert said[3].startswith("exporting onnx: failed after ")
