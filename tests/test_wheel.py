"""The path a gateway takes from a wheel: build it, install it with one runtime, use it.

The wheel is built once from a copy of the source tree (no stale ``build/`` of the checkout can
leak into it), then installed with ``[litert]`` only and with ``[onnx]`` only into fresh virtual
environments. Each environment is driven as a new user would, by its ``floorline`` script, from a
directory outside the checkout: ``--version``, ``init``, ``check``, ``selftest``, checking a
shipped example config, and ``run`` against a test broker until a prediction arrives.

pip needs the package index for the wheel's build backend and the runtimes (its cache makes the
second run quick); nothing else leaves the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pytest

from tests.mqtt_broker import Mosquitto, MqttProbe, ProbeFactory

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("litert", "onnx")
# What a wheel is built from; everything else at the top of the checkout stays out of the copy.
SOURCE = ("pyproject.toml", "README.md", "LICENSE", "edge", "converter", "configs", "systemd")
BUNDLE_FILES = ("manifest.json", "golden.npz", "model.tflite", "model.int8.tflite", "model.onnx")


def _version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^version = "([^"]+)"', text, re.MULTILINE)
    assert match, "pyproject.toml has no version"
    return match.group(1)


Result = subprocess.CompletedProcess[str]


def _run(argv: list[str | Path], cwd: Path, timeout: float = 180) -> Result:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=_clean_env(), capture_output=True, text=True,
        timeout=timeout, check=False,
    )


def _clean_env() -> dict[str, str]:
    # Nothing of the development environment may leak in: the venv must stand on its own.
    drop = {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _must(result: Result) -> Result:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"
    return result


@dataclass(frozen=True)
class Gateway:
    """A fresh virtual environment with the wheel and one runtime extra installed."""

    extra: str
    venv: Path
    site: Path
    """Its site-packages, where the wheel's files landed."""
    home: Path
    """A working directory outside the checkout."""

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def floorline(self, *args: str | Path, timeout: float = 120) -> Result:
        return _run([self.venv / "bin" / "floorline", *args], self.home, timeout)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built once per session from a copy of the source tree."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in SOURCE:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.is_file():
            shutil.copy2(path, source / name)
    dist = work / "dist"
    # An absolute path: a bare "src" would be a package name to pip.
    _must(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, source],
               work, timeout=300))
    (built,) = dist.glob("floorline-*.whl")
    return built


def _install(wheel: Path, extra: str, root: Path) -> Gateway:
    venv = root / f"venv-{extra}"
    _must(_run([sys.executable, "-m", "venv", venv], root))
    python = venv / "bin" / "python"
    _must(_run([python, "-m", "pip", "install", "-q", f"{wheel}[{extra}]"], root, timeout=600))
    site = _must(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                      root)).stdout.strip()
    home = root / f"home-{extra}"
    home.mkdir()
    return Gateway(extra=extra, venv=venv, site=Path(site), home=home)


@pytest.fixture(scope="session")
def gateways(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Gateway]:
    """One environment per runtime extra, built side by side."""
    root = tmp_path_factory.mktemp("gateways")
    with ThreadPoolExecutor(len(EXTRAS)) as pool:
        made = list(pool.map(lambda extra: _install(wheel, extra, root), EXTRAS))
    return {g.extra: g for g in made}


@pytest.fixture(params=EXTRAS)
def gateway(request: pytest.FixtureRequest, gateways: dict[str, Gateway]) -> Gateway:
    return gateways[request.param]


def test_wheel_holds_both_packages_their_data_and_nothing_at_the_top(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "floorline/edge/__init__.py" in names
    assert "floorline/edge/cli/main.py" in names
    assert "floorline/converter/__init__.py" in names
    assert "floorline/converter/cli.py" in names
    assert "floorline/edge/examples/gateway.example.yaml" in names
    assert "floorline/edge/examples/gateway.minimal.yaml" in names
    assert "floorline/edge/examples/config.schema.json" in names
    assert "floorline/edge/units/floorline.service" in names
    assert {f"floorline/edge/models/pdm-classifier/{f}" for f in BUNDLE_FILES} <= names
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"floorline", f"floorline-{_version()}.dist-info"}, tops


def test_installed_commands_work_with_one_runtime(gateway):
    g, other = gateway, next(e for e in EXTRAS if e != gateway.extra)
    assert _must(g.floorline("--version")).stdout.strip() == f"floorline {_version()}"
    convert = _run([g.venv / "bin" / "floorline-convert", "--version"], g.home)
    assert _must(convert).stdout.strip() == f"floorline {_version()}"

    # The source folders' names are not importable: only floorline.edge / floorline.converter.
    for name in ("edge", "converter"):
        result = _run([g.python, "-c", f"import {name}"], g.home)
        assert result.returncode != 0
        assert f"No module named '{name}'" in result.stderr

    bundle = g.site / "floorline" / "edge" / "models" / "pdm-classifier"
    result = _must(g.floorline("selftest", bundle))
    assert result.stdout.count(f"skipped: no runtime (pip install 'floorline[{other}]')") == (
        1 if other == "onnx" else 2
    ), result.stdout
    assert " ok " in result.stdout
    assert "FAIL" not in result.stdout

    runtime = "ai_edge_litert" if g.extra == "litert" else "onnxruntime"
    examples = g.site / "floorline" / "edge" / "examples"
    for example in ("gateway.minimal.yaml", "gateway.example.yaml"):
        result = _must(g.floorline("check", "--config", examples / example))
        assert f"on {runtime}" in result.stdout
        assert "FAIL" not in result.stdout

    # `floorline examples` points at the installed files, and install-service finds its unit.
    listed = _must(g.floorline("examples")).stdout
    assert str(examples / "gateway.example.yaml") in listed, listed
    target = g.home / "root"
    result = _must(g.floorline("install-service", "--config", examples / "gateway.minimal.yaml",
                               "--prefix", target))
    unit = target / "etc" / "systemd" / "system" / "floorline.service"
    assert unit.is_file(), result.stdout
    assert "Type=notify" in unit.read_text()


def test_init_check_and_run_predict_with_one_runtime(
    gateway: Gateway, mosquitto: Mosquitto, mqtt_client: ProbeFactory
) -> None:
    g = gateway
    gateway_id = f"wheel-{g.extra}"
    config = g.home / f"{gateway_id}.yaml"
    config.unlink(missing_ok=True)
    result = _must(g.floorline("init", config.name, "--gateway-id", gateway_id,
                               "--broker", f"127.0.0.1:{mosquitto.port}"))
    assert f"floorline check --config {config.name}" in result.stdout
    assert f"backend: {g.extra}" in config.read_text()
    result = _must(g.floorline("check", "--config", config.name))
    assert "pipeline vibration: ok" in result.stdout

    probe = mqtt_client(mosquitto)
    probe.subscribe(f"floorline/{gateway_id}/#", qos=1)
    log = g.home / f"{gateway_id}.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [g.venv / "bin" / "floorline", "run", "--config", config.name], cwd=g.home,
            env=_clean_env(), stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        try:
            state = probe.wait_for(1, f"floorline/{gateway_id}/state", timeout=30)
            assert orjson.loads(state[0].payload)["state"] == "online"
            _publish_samples(probe, "plant/line1/pump-01/vibration", 192)
            (message,) = probe.wait_for(1, f"floorline/{gateway_id}/pred/vibration/+", timeout=20)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\nfloorline run said:\n{log.read_text()}") from exc
        prediction = orjson.loads(message.payload)
        assert prediction["asset"] == "pump-01"
        assert prediction["model"]["name"] == "pdm-classifier"
        artifact = "model.tflite" if g.extra == "litert" else "model.onnx"
        assert prediction["model"]["artifact"] == artifact
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        _stop(proc)
    out = log.read_text()
    assert proc.returncode == 0, out
    assert "Traceback" not in out


def _publish_samples(probe: MqttProbe, topic: str, n: int) -> None:
    """N per-sample JSON messages, 1 ms apart, as the example pipeline reads them."""
    rows = np.random.default_rng(7).normal(0.0, 0.2, (n, 3))
    t0 = time.time()
    for seq, (x, y, z) in enumerate(rows.tolist()):
        payload = {"ts": t0 + seq / 1000, "seq": seq, "accel_x": x, "accel_y": y, "accel_z": z}
        probe.publish(topic, orjson.dumps(payload), qos=1)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
