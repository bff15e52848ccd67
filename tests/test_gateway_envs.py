"""The gateway side in the environments a gateway really has, without TensorFlow.

``scripts/bootstrap`` builds two virtual environments beside the development one:
- ``.venv-edge``: ``pip install 'floorline[litert,onnx,demo,metrics]'`` (numpy 2,
  ai-edge-litert, onnxruntime);
- ``.venv-tflite``: ``pip install 'floorline[tflite]'`` (tflite-runtime 2.14, which needs numpy<2).
``make test`` points FLOORLINE_EDGE_PYTHON and FLOORLINE_TFLITE_PYTHON at them. Without those
variables these tests skip, except in CI (CI=true), where a missing environment is a failure.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "edge" / "models" / "pdm-classifier"


def _python(variable: str) -> Path:
    value = os.environ.get(variable)
    if not value or not Path(value).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{variable} must name a bootstrap venv python in CI (run make test)")
        pytest.skip(f"{variable} not set; run `make test` to build the gateway environments")
    return Path(value)


def _run(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), *args], capture_output=True, text=True, timeout=120, check=False
    )


def _floorline(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(python, "-m", "floorline.edge", *args)


def test_edge_environment_has_no_tensorflow():
    python = _python("FLOORLINE_EDGE_PYTHON")
    result = _run(python, "-c", "import tensorflow")
    assert result.returncode != 0
    assert "No module named 'tensorflow'" in result.stderr


@pytest.mark.parametrize("backend", ["litert", "onnx"])
def test_edge_environment_runs_the_bundle_on_each_runtime(backend):
    python = _python("FLOORLINE_EDGE_PYTHON")
    result = _floorline(python, "selftest", str(EXAMPLE), "--backend", backend)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hashes verified" in result.stdout
    runtime = "ai_edge_litert" if backend == "litert" else "onnxruntime"
    assert runtime in result.stdout
    assert "FAIL" not in result.stdout


def test_edge_environment_never_imports_tensorflow_while_running():
    python = _python("FLOORLINE_EDGE_PYTHON")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from floorline.edge.bundle import selftest\n"
        "from floorline.edge.bundle.bundle import Bundle\n"
        f"b = Bundle.open(Path({str(EXAMPLE)!r}))\n"
        "for a in b.manifest.artifacts:\n"
        "    selftest.load(b, artifact=a.file).backend.close()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]\n"
        "print('imported:', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = _run(python, "-c", script)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tflite_runtime_environment_runs_the_tflite_artifacts():
    python = _python("FLOORLINE_TFLITE_PYTHON")
    versions = _run(python, "-c", "import numpy, tflite_runtime; print(numpy.__version__)")
    assert versions.returncode == 0, versions.stderr
    assert versions.stdout.startswith("1."), "tflite-runtime must be tested on numpy<2"
    result = _floorline(
        python, "selftest", str(EXAMPLE), "--backend", "litert", "--interpreter", "tflite_runtime"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tflite_runtime 2.14" in result.stdout
    assert result.stdout.count(" ok ") >= 2  # float and int8 TFLite artifacts


def test_tflite_runtime_environment_refuses_onnx_with_the_extra_named():
    python = _python("FLOORLINE_TFLITE_PYTHON")
    result = _floorline(python, "selftest", str(EXAMPLE), "--backend", "onnx")
    assert result.returncode == 1
    assert "floorline[onnx]" in result.stdout + result.stderr


DATA = Path(__file__).resolve().parent / "data"
SCHEMA_2 = ["pump-heads", "vib-autoencoder", "vib-lstm"]


@pytest.mark.parametrize("bundle", SCHEMA_2)
@pytest.mark.parametrize("backend", ["litert", "onnx"])
def test_edge_environment_runs_schema_2_bundles(bundle, backend):
    # Several heads, an autoencoder scored on the gateway, an unrolled LSTM (float and int8).
    python = _python("FLOORLINE_EDGE_PYTHON")
    result = _floorline(python, "selftest", str(DATA / bundle), "--backend", backend)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " ok " in result.stdout
    assert "FAIL" not in result.stdout


def test_tflite_runtime_runs_schema_2_float_artifacts_and_refuses_what_it_cannot_reproduce():
    python = _python("FLOORLINE_TFLITE_PYTHON")
    for bundle in ("pump-heads", "vib-autoencoder"):
        result = _floorline(python, "selftest", str(DATA / bundle), "--backend", "litert",
                            "--interpreter", "tflite_runtime")
        assert result.returncode == 0, result.stdout + result.stderr
    # tflite-runtime 2.14's int8 kernels compute the unrolled LSTM differently from the LiteRT
    # the converter checked it on (15 of 16 golden windows agree with the source model, against
    # 16 of 16): the golden self-test refuses that artifact there instead of running it.
    result = _floorline(python, "selftest", str(DATA / "vib-lstm"), "--backend", "litert",
                        "--interpreter", "tflite_runtime")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any("model.tflite" in line and " ok " in line for line in lines), result.stdout
    assert any("model.int8.tflite" in line and "FAIL" in line for line in lines), result.stdout
    assert "does not reproduce the converted model" in result.stdout
