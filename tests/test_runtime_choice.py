"""Which artifact runs where: ``backend: auto`` takes only what this gateway has a runtime for.

The dev environment has every runtime, so a gateway with one runtime is imitated by making the
registry's availability check (``backends._findable``) find only that runtime's modules.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from floorline.edge import backends
from floorline.edge.backends import BackendOptions
from floorline.edge.bundle import selftest
from floorline.edge.bundle.bundle import Bundle
from floorline.edge.cli.main import main as floorline
from floorline.edge.errors import BackendError, RuntimeMissingError

EXAMPLE = Path(__file__).resolve().parent.parent / "edge" / "models" / "pdm-classifier"
LITERT_MODULES = {"ai_edge_litert", "tflite_runtime"}
ONNX_MODULES = {"onnxruntime"}


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return Bundle.open(EXAMPLE)


@pytest.fixture
def only(monkeypatch: pytest.MonkeyPatch) -> Callable[[set[str]], None]:
    """``only({"onnxruntime"})``: the registry finds these runtime modules and no others."""

    def install(modules: set[str]) -> None:
        monkeypatch.setattr(backends, "_findable", lambda module: module in modules)

    return install


def test_auto_order_is_float_tflite_then_quantized_tflite_then_onnx(bundle):
    order = [(a.file, name) for a, name in selftest.auto_order(bundle)]
    assert order == [
        ("model.tflite", "litert"),
        ("model.int8.tflite", "litert"),
        ("model.onnx", "onnx"),
    ]


def test_auto_prefers_float_over_quantized_whatever_the_manifest_order(bundle):
    artifacts = list(reversed(bundle.manifest.artifacts))  # int8 before float
    flipped = Bundle(
        path=bundle.path,
        manifest=bundle.manifest.model_copy(update={"artifacts": artifacts}),
        manifest_sha256=bundle.manifest_sha256,
        signed_by=None,
        golden=bundle.golden,
        owned_dir=None,
    )
    assert selftest.auto_order(flipped)[0][0].file == "model.tflite"


def test_auto_runs_onnx_when_only_onnxruntime_is_installed(bundle, only):
    only(ONNX_MODULES)
    loaded = selftest.load(bundle)
    try:
        assert (loaded.artifact.file, loaded.backend.name) == ("model.onnx", "onnx")
        assert loaded.selftest.passed
    finally:
        loaded.backend.close()


def test_auto_runs_float_tflite_when_only_litert_is_installed(bundle, only):
    only(LITERT_MODULES)
    loaded = selftest.load(bundle)
    try:
        assert (loaded.artifact.file, loaded.backend.name) == ("model.tflite", "litert")
    finally:
        loaded.backend.close()


def test_auto_without_any_runtime_names_the_extras_to_install(bundle, only):
    only(set())
    with pytest.raises(RuntimeMissingError) as info:
        selftest.load(bundle)
    message = str(info.value)
    assert "pip install 'floorline[litert]' or 'floorline[onnx]'" in message
    assert "model.onnx" in message


def test_an_explicit_backend_without_its_runtime_fails_clearly(bundle, only, monkeypatch):
    only(LITERT_MODULES)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the import fails, as when absent
    with pytest.raises(RuntimeMissingError, match=r"pip install 'floorline\[onnx\]'"):
        selftest.load(bundle, backend="onnx")
    with pytest.raises(RuntimeMissingError, match=r"pip install 'floorline\[onnx\]'"):
        selftest.load(bundle, artifact="model.onnx")


def test_backend_and_artifact_of_different_formats_is_a_format_mismatch(bundle):
    with pytest.raises(BackendError) as info:
        selftest.load(bundle, backend="onnx", artifact="model.tflite")
    assert str(info.value) == "artifact model.tflite is tflite; backend onnx runs onnx artifacts"
    assert not isinstance(info.value, RuntimeMissingError)


def test_a_named_tflite_interpreter_decides_whether_litert_is_installed(only):
    only({"ai_edge_litert"})
    assert backends.installed("litert")
    assert backends.installed("litert", BackendOptions(interpreter="ai_edge_litert"))
    assert not backends.installed("litert", BackendOptions(interpreter="tflite_runtime"))
    assert not backends.installed("onnx")


def test_installed_finds_a_runtime_without_importing_it():
    script = (
        "import sys\n"
        "from floorline.edge import backends\n"
        "found = {n: backends.installed(n) for n in backends.BACKENDS}\n"
        "loaded = [m for m in ('onnxruntime', 'ai_edge_litert', 'tflite_runtime') "
        "if m in sys.modules]\n"
        "print(found, loaded)\n"
        "sys.exit(1 if loaded or not all(found.values()) else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_install_hint_names_the_extra():
    assert backends.install_hint("onnx") == "pip install 'floorline[onnx]'"
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'"):
        backends.installed("tensorrt")


# -- floorline selftest: skipped, passed and failed artifacts decide the exit code ---------------


def test_selftest_skips_artifacts_without_a_runtime_and_passes(only, capsys):
    only(ONNX_MODULES)
    assert floorline(["selftest", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped: no runtime (pip install 'floorline[litert]')") == 2
    assert "model.onnx             ok" in out


def test_selftest_with_no_runtime_at_all_fails_and_says_what_to_install(only, capsys):
    only(set())
    assert floorline(["selftest", str(EXAMPLE)]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("skipped: no runtime") == 3
    assert "no artifact could run" in captured.err
    assert "pip install 'floorline[litert]' or 'floorline[onnx]'" in captured.err


def test_selftest_fails_when_an_artifact_that_ran_fails(monkeypatch, capsys):
    real_run = selftest.run

    def int8_disagrees(backend, bundle, artifact):
        report = real_run(backend, bundle, artifact)
        if artifact.file == "model.int8.tflite":
            return dataclasses.replace(report, max_abs_error=1.0, passed=False)
        return report

    monkeypatch.setattr(selftest, "run", int8_disagrees)
    assert floorline(["selftest", str(EXAMPLE)]) == 1
    out = capsys.readouterr().out
    assert "model.int8.tflite      FAIL" in out
    assert "model.tflite           ok" in out


def test_selftest_of_a_named_backend_without_its_runtime_fails(only, monkeypatch, capsys):
    only(LITERT_MODULES)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert floorline(["selftest", str(EXAMPLE), "--backend", "onnx"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out
    assert "floorline[onnx]" in out
    assert "skipped" not in out
