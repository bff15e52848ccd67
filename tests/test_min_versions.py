"""The transport, reader, daemon and config tests on the oldest supported dependencies.

``scripts/bootstrap`` builds ``.venv-min`` with the versions pinned in ``tests/min-versions.txt``
(the lower bounds pyproject.toml declares); ``make test`` points FLOORLINE_MIN_PYTHON at it.
Without it these skip, except in CI (CI=true), where a missing environment is a failure.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PINS = ROOT / "tests" / "min-versions.txt"
SUITES = [
    "tests/test_transport.py",
    "tests/test_mqtt_reader.py",
    "tests/test_daemon.py",
    "tests/test_config.py",
    "tests/test_decode.py",
    "tests/test_plugins.py",
    # protobuf 6.30.0, the sparkplug extra's floor (the generated code's gencode version).
    "tests/test_sparkplug_input.py",
    "tests/test_sparkplug_output.py",
]


def _python() -> Path:
    value = os.environ.get("FLOORLINE_MIN_PYTHON")
    if not value or not Path(value).exists():
        if os.environ.get("CI"):
            pytest.fail("FLOORLINE_MIN_PYTHON must name .venv-min's python in CI (make test)")
        pytest.skip("FLOORLINE_MIN_PYTHON not set; run `make test` to build .venv-min")
    return Path(value)


def _pins() -> dict[str, str]:
    pins = {}
    for line in PINS.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            pins[match[1].lower()] = match[2]
    return pins


@pytest.mark.slow
def test_the_minimum_environment_has_exactly_the_pinned_versions() -> None:
    listed = subprocess.run(
        [str(_python()), "-m", "pip", "list", "--format=freeze"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    installed = {
        name.lower(): version
        for name, version in (line.split("==", 1) for line in listed.splitlines() if "==" in line)
    }
    pins = _pins()
    assert pins
    assert {name: installed.get(name) for name in pins} == pins


@pytest.mark.slow
def test_core_suites_pass_on_the_minimum_versions() -> None:
    run = subprocess.run(
        [str(_python()), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *SUITES],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},
    )
    tail = "\n".join(run.stdout.splitlines()[-30:])
    assert run.returncode == 0, tail + run.stderr[-2000:]
    assert re.search(r"\d+ passed", tail), tail
