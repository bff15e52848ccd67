"""install_service into a scratch prefix: files, modes, rewritten config, idempotence."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest

from floorline.edge.bundle.bundle import Bundle
from floorline.edge.config.model import parse_config
from floorline.edge.errors import BundleError, ConfigError, FloorlineError
from floorline.edge.service.install import install_service

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "edge" / "models" / "pdm-classifier"
INSTALLED_BUNDLE = "/usr/local/share/floorline/bundles/pdm-classifier-1.0.0"

CONFIG = """\
# Line 1 gateway: kept verbatim by the installer, comments included.
gateway: {id: line1-gw01}
broker:
  host: broker.plant.local
  username: gw01
  password_file: /run/credentials/floorline.service/mqtt-password
pipelines:
  - name: vibration
    subscribe: ["plant/+/+/vibration"]
    bundle: models/pdm-classifier      # relative to this file
    decoder: {type: json, timestamp: ts, sequence: seq}
  - name: vibration-onnx
    subscribe: ["plant/+/+/vibration2"]
    backend: onnx
    bundle: 'models/pdm-classifier'
    decoder: {type: json, timestamp: ts, sequence: seq}
"""


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A config beside its own copy of the example bundle, as an operator would have it."""
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE, src / "models" / "pdm-classifier")
    (src / "gateway.yaml").write_text(CONFIG)
    return src / "gateway.yaml"


@pytest.fixture
def entry_point(tmp_path: Path) -> Path:
    exe = tmp_path / "venv" / "bin" / "floorline"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return exe


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under ROOT: (mode, mtime_ns, content hash or link target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            what = "-> " + str(p.readlink())
        elif p.is_file():
            what = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            what = "dir"
        out[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), st.st_mtime_ns, what)
    return out


def test_installs_unit_config_bundle_credential_and_entry_point(
    source: Path, entry_point: Path, tmp_path: Path
) -> None:
    prefix = tmp_path / "root"
    commands = install_service(source, prefix=prefix, entry_point=entry_point)

    unit = prefix / "etc/systemd/system/floorline.service"
    assert unit.read_bytes() == (ROOT / "systemd" / "floorline.service").read_bytes()
    assert mode(unit) == 0o644

    config = prefix / "etc/floorline/gateway.yaml"
    assert mode(config) == 0o644  # the transient service user must read it; it holds no secret
    installed = config.read_text()
    expected = CONFIG.replace("bundle: models/pdm-classifier",
                              f'bundle: "{INSTALLED_BUNDLE}"')
    expected = expected.replace("bundle: 'models/pdm-classifier'", f'bundle: "{INSTALLED_BUNDLE}"')
    assert installed == expected  # only the bundle values changed; comments and layout stay
    parsed = parse_config(installed)
    assert [str(p.bundle) for p in parsed.pipelines] == [INSTALLED_BUNDLE] * 2

    bundle = prefix / INSTALLED_BUNDLE.lstrip("/")
    assert mode(bundle) == 0o755
    assert {f.name: mode(f) for f in bundle.iterdir()} == {
        f.name: 0o644 for f in EXAMPLE.iterdir()
    }
    with Bundle.open(bundle) as opened:  # the copy verifies like the original
        assert (opened.manifest.name, opened.manifest.version) == ("pdm-classifier", "1.0.0")

    password = prefix / "etc/floorline/mqtt-password"
    assert password.read_bytes() == b""
    assert mode(password) == 0o600

    link = prefix / "usr/local/bin/floorline"
    assert link.is_symlink()
    assert link.readlink() == entry_point

    assert commands[-3:] == [
        "floorline check --config /etc/floorline/gateway.yaml",
        "systemctl daemon-reload && systemctl enable --now floorline",
        "journalctl -u floorline -f",
    ]
    assert any("/etc/floorline/mqtt-password is empty" in c for c in commands)


def test_second_run_changes_nothing(source: Path, entry_point: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    first = install_service(source, prefix=prefix, entry_point=entry_point)
    before = snapshot(prefix)
    second = install_service(source, prefix=prefix, entry_point=entry_point)
    assert snapshot(prefix) == before
    runnable = [c for c in first if not c.startswith("#")]
    assert [c for c in second if not c.startswith("#")] == runnable
    assert any("kept the existing /etc/floorline/gateway.yaml" in c for c in second)


def test_existing_config_and_password_are_never_overwritten(
    source: Path, entry_point: Path, tmp_path: Path
) -> None:
    prefix = tmp_path / "root"
    install_service(source, prefix=prefix, entry_point=entry_point)
    config = prefix / "etc/floorline/gateway.yaml"
    password = prefix / "etc/floorline/mqtt-password"
    config.write_text(config.read_text() + "# tuned by the operator\n")
    password.write_text("s3cret\n")
    edited = config.read_text()
    install_service(source, prefix=prefix, entry_point=entry_point)
    assert config.read_text() == edited
    assert password.read_text() == "s3cret\n"


def test_changed_unit_is_replaced(source: Path, entry_point: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    install_service(source, prefix=prefix, entry_point=entry_point)
    unit = prefix / "etc/systemd/system/floorline.service"
    unit.write_text("[Service]\nExecStart=/bin/old\n")
    install_service(source, prefix=prefix, entry_point=entry_point)
    assert unit.read_bytes() == (ROOT / "systemd" / "floorline.service").read_bytes()
    assert mode(unit) == 0o644


def test_dry_run_writes_nothing_and_says_what_it_would_do(
    source: Path, entry_point: Path, tmp_path: Path
) -> None:
    prefix = tmp_path / "root"
    commands = install_service(source, prefix=prefix, entry_point=entry_point, dry_run=True)
    assert not prefix.exists()
    would = [c for c in commands if c.startswith("# would: ")]
    assert any(c.endswith("/etc/systemd/system/floorline.service") for c in would)
    assert any(c.endswith("/etc/floorline/gateway.yaml") for c in would)
    assert any(INSTALLED_BUNDLE in c for c in would)
    assert any(f"ln -s {entry_point} /usr/local/bin/floorline" in c for c in would)
    assert commands[-1] == "journalctl -u floorline -f"


def test_fixed_user_gets_a_drop_in_and_a_useradd(
    source: Path, entry_point: Path, tmp_path: Path
) -> None:
    prefix = tmp_path / "root"
    commands = install_service(source, prefix=prefix, entry_point=entry_point, user="floorline")
    dropin = prefix / "etc/systemd/system/floorline.service.d/10-user.conf"
    assert dropin.read_text().endswith(
        "[Service]\nDynamicUser=no\nUser=floorline\nGroup=floorline\n"
    )
    useradd = "id -u floorline >/dev/null 2>&1 || useradd --system"
    assert any(c.startswith(useradd) for c in commands)
    with pytest.raises(ConfigError, match="not a valid system user"):
        install_service(source, prefix=prefix, user="root; rm -rf /")


def test_instance_uses_the_template_and_its_own_files(
    source: Path, entry_point: Path, tmp_path: Path
) -> None:
    prefix = tmp_path / "root"
    commands = install_service(source, prefix=prefix, entry_point=entry_point, instance="line2")
    assert (prefix / "etc/systemd/system/floorline@.service").read_bytes() == (
        ROOT / "systemd" / "floorline@.service"
    ).read_bytes()
    assert (prefix / "etc/floorline/line2.yaml").exists()
    assert mode(prefix / "etc/floorline/line2.mqtt-password") == 0o600
    assert not (prefix / "etc/floorline/gateway.yaml").exists()
    assert commands[-2:] == [
        "systemctl daemon-reload && systemctl enable --now floorline@line2",
        "journalctl -u floorline@line2 -f",
    ]


def test_invalid_config_installs_nothing(source: Path, tmp_path: Path) -> None:
    source.write_text(CONFIG.replace("gateway: {id: line1-gw01}", "gateway: {id: line1-gw01}\n"
                                                                   "unknown_section: 1"))
    prefix = tmp_path / "root"
    with pytest.raises(ConfigError, match="unknown_section"):
        install_service(source, prefix=prefix)
    assert not prefix.exists()


def test_tampered_bundle_installs_nothing(source: Path, tmp_path: Path) -> None:
    model = source.parent / "models" / "pdm-classifier" / "model.tflite"
    model.write_bytes(model.read_bytes() + b"\0")
    prefix = tmp_path / "root"
    with pytest.raises(BundleError, match="sha256"):
        install_service(source, prefix=prefix)
    assert not prefix.exists()


def test_same_version_with_other_contents_is_refused(
    source: Path, entry_point: Path, tmp_path: Path
) -> None:
    prefix = tmp_path / "root"
    install_service(source, prefix=prefix, entry_point=entry_point)
    installed = prefix / INSTALLED_BUNDLE.lstrip("/") / "model.tflite"
    installed.write_bytes(installed.read_bytes() + b"\0")
    with pytest.raises(FloorlineError, match="exists with different contents"):
        install_service(source, prefix=prefix, entry_point=entry_point)


def test_paths_that_would_break_after_the_copy_are_pointed_out(
    source: Path, entry_point: Path, tmp_path: Path
) -> None:
    (source.parent / "ca.pem").write_text("not really a certificate")
    source.write_text(CONFIG.replace(
        "  host: broker.plant.local\n",
        "  host: broker.plant.local\n  tls: {ca_file: ca.pem}\n",
    ) + "state_dir: /srv/floorline\n")
    commands = install_service(source, prefix=tmp_path / "root", entry_point=entry_point)
    notes = "\n".join(c for c in commands if c.startswith("# NOTE"))
    assert "broker.tls.ca_file: ca.pem is relative" in notes
    assert "state_dir is set" in notes


def test_entry_point_under_home_is_flagged(source: Path, tmp_path: Path) -> None:
    exe = Path("/home/operator/.venv/bin/floorline")
    commands = install_service(source, prefix=tmp_path / "root", dry_run=True, entry_point=exe)
    assert any(c.startswith(f"# NOTE {exe} is under /home") for c in commands)
    assert any("ProtectHome=yes" in c for c in commands)


def test_modes_do_not_depend_on_the_umask(
    source: Path, entry_point: Path, tmp_path: Path
) -> None:
    prefix = tmp_path / "root"
    old = os.umask(0o077)  # root's umask on some systems
    try:
        install_service(source, prefix=prefix, entry_point=entry_point)
    finally:
        os.umask(old)
    for d in ("etc", "etc/floorline", "etc/systemd/system", "usr/local/share/floorline/bundles",
              INSTALLED_BUNDLE.lstrip("/")):
        assert mode(prefix / d) == 0o755, d
    assert mode(prefix / "etc/floorline/gateway.yaml") == 0o644
