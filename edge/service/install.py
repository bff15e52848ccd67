"""Put a gateway in place as a systemd service: unit, config, bundles, credential placeholder.

    commands = install_service(Path("my-gateway.yaml"))       # as root, on the gateway
    for line in commands:                                      # what to run next
        print(line)

Everything is written under PREFIX (``/`` on a gateway; a scratch directory for packaging and
tests, like ``DESTDIR``), while the paths *inside* the installed files are the gateway's own.

What goes where (see the comments in ``systemd/floorline.service`` for why):

    /etc/systemd/system/floorline.service            the unit (replaced when it changed)
    /etc/floorline/gateway.yaml                      the config, never overwritten once there
    /etc/floorline/mqtt-password                     empty, 0600: LoadCredential= needs the file
    /usr/local/share/floorline/bundles/NAME-VERSION  each pipeline's bundle, verified, read-only
    /usr/local/bin/floorline                         a symlink to this installation's entry point

The installed config is the given one with each pipeline's ``bundle:`` pointing at its installed
copy (only those values change; comments and layout stay). Bundles are named by manifest name
and version, so a new model version installs beside the old one and an existing config keeps
the model it names until someone edits it. Running it again changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from floorline.edge.bundle.bundle import Bundle
from floorline.edge.config.model import load_config, parse_config
from floorline.edge.errors import ConfigError, FloorlineError
from floorline.edge.resources import units_dir

log = logging.getLogger(__name__)

__all__ = ["BUNDLE_DIR", "CONFIG_DIR", "ENTRY_POINT", "UNIT_DIR", "find_unit", "install_service"]

UNIT_DIR = Path("/etc/systemd/system")
CONFIG_DIR = Path("/etc/floorline")
BUNDLE_DIR = Path("/usr/local/share/floorline/bundles")
ENTRY_POINT = Path("/usr/local/bin/floorline")
"""The ExecStart= binary of the shipped units."""

_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_INSTANCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def find_unit(name: str = "floorline.service") -> Path:
    """Where the shipped unit file NAME is: inside the package (wheel or clone)."""
    candidates = [units_dir() / name]
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(c.parent) for c in candidates)
    raise FloorlineError(f"cannot find the unit file {name} (looked in {looked})")


@dataclass
class _Plan:
    """What an installation does, collected before anything is written (dry runs print it)."""

    prefix: Path
    dry_run: bool
    done: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def at(self, target: Path) -> Path:
        """TARGET (a path on the gateway) under the prefix."""
        return self.prefix / target.relative_to(target.anchor)

    def write(self, target: Path, data: bytes, mode: int, *, replace: bool) -> bool:
        """Write DATA to TARGET unless it already holds it (or exists, without REPLACE)."""
        dest = self.at(target)
        exists = dest.exists() or dest.is_symlink()
        if exists and (not replace or (dest.is_file() and dest.read_bytes() == data)):
            return False
        self.done.append(f"install -D -m {mode:04o} <{len(data)} bytes> {target}")
        if not self.dry_run:
            _mkdirs(dest.parent)
            _atomic_write(dest, data, mode)
        return True


def _mkdirs(path: Path) -> None:
    # mkdir's mode is filtered by the umask (often 077 for root), and a 0700 /etc/floorline
    # would hide the config from the service's transient user: set 0755 on what we create,
    # and leave directories that exist alone.
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        directory.chmod(0o755)


def _atomic_write(dest: Path, data: bytes, mode: int) -> None:
    # Write beside, then rename: a reader (or a crash) never sees half a unit or config.
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        Path(tmp).chmod(mode)  # explicit: mkstemp's 0600 and the umask must not decide
        Path(tmp).replace(dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dir_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _install_bundle(plan: _Plan, source: Path) -> Path:
    """Copy a verified bundle to BUNDLE_DIR/NAME-VERSION; returns its path on the gateway."""
    with Bundle.open(source) as bundle:  # verifies every hash: never install a broken bundle
        m = bundle.manifest
        name = f"{m.name}-{m.version}" + (".tar" if source.is_file() else "")
    target = BUNDLE_DIR / name
    dest = plan.at(target)
    if dest.exists():
        same = (
            dest.is_file() and source.is_file() and dest.read_bytes() == source.read_bytes()
        ) or (dest.is_dir() and source.is_dir() and _dir_digest(dest) == _dir_digest(source))
        if not same:
            raise FloorlineError(
                f"{target} exists with different contents than {source}: a bundle's version "
                "must change when its contents do (or remove the old copy first)"
            )
        return target
    plan.done.append(f"cp -r {source} {target}")
    if plan.dry_run:
        return target
    _mkdirs(dest.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    try:
        if source.is_file():
            shutil.copyfile(source, staging / name)
            (staging / name).chmod(0o644)
            (staging / name).replace(dest)
        else:
            for f in source.iterdir():
                shutil.copyfile(f, staging / f.name)
                (staging / f.name).chmod(0o644)
            staging.chmod(0o755)
            staging.replace(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _rewrite_bundles(text: str, new_paths: dict[int, Path]) -> str:
    """TEXT with ``pipelines[i].bundle`` set to NEW_PATHS[i]; everything else byte for byte."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    pipelines = next(
        (v for k, v in root.value if k.value == "pipelines"), None
    ) if isinstance(root, yaml.MappingNode) else None
    if not isinstance(pipelines, yaml.SequenceNode):
        return text
    spans: list[tuple[int, int, str]] = []
    for i, node in enumerate(pipelines.value):
        if i not in new_paths or not isinstance(node, yaml.MappingNode):
            continue
        for key, value in node.value:
            if key.value == "bundle" and isinstance(value, yaml.ScalarNode):
                # A JSON string is a valid YAML double-quoted scalar, whatever the path holds.
                spans.append((value.start_mark.index, value.end_mark.index,
                              json.dumps(str(new_paths[i]))))
    for start, end, replacement in sorted(spans, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _relative_paths(text: str, origin: str, base: Path) -> list[str]:
    # Paths other than bundles that would resolve against /etc/floorline after the copy.
    raw = parse_config(text, origin)  # no base: paths exactly as written
    found = []
    b = raw.broker
    named: list[tuple[str, Path | None]] = [("broker.password_file", b.password_file)]
    if b.tls is not None:
        named += [("broker.tls.ca_file", b.tls.ca_file), ("broker.tls.cert_file", b.tls.cert_file),
                  ("broker.tls.key_file", b.tls.key_file)]
    found += [f"{what}: {p}" for what, p in named if p is not None and not p.is_absolute()]
    keys = [("trust.trusted_keys", k) for k in raw.trust.trusted_keys]
    keys += [("fleet.operator_keys", k) for k in raw.fleet.operator_keys]
    found += [f"{what}: {k}" for what, k in keys
              if not Path(k).is_absolute() and (base / k).exists()]
    return found


def install_service(
    config: Path,
    *,
    prefix: Path = Path("/"),
    unit_dir: Path = UNIT_DIR,
    user: str | None = None,
    instance: str | None = None,
    entry_point: Path | None = None,
    unit_file: Path | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Install the service for CONFIG under PREFIX; returns the commands to run next.

    CONFIG is validated and each pipeline's bundle verified before anything is written. The
    config goes to ``/etc/floorline/gateway.yaml`` (``/etc/floorline/INSTANCE.yaml`` and the
    ``floorline@INSTANCE`` template with INSTANCE) unless a file is there already: an existing
    config is never overwritten. USER selects a fixed system user (a drop-in turning
    DynamicUser= off) instead of a transient one. ENTRY_POINT (default: the ``floorline`` script
    of the running Python) is linked as ``/usr/local/bin/floorline`` unless something is there.
    With DRY_RUN nothing is written and the list starts with ``# would: ...`` lines.

    Lines starting with ``#`` in the result are notes for the operator. Raises ConfigError for
    an invalid config, BundleError for a bundle that does not verify, and FloorlineError when
    an installed bundle of the same name and version differs.
    """
    if user is not None and not _USER.fullmatch(user):
        raise ConfigError(f"{user!r} is not a valid system user name")
    if instance is not None and not _INSTANCE.fullmatch(instance):
        raise ConfigError(f"{instance!r} is not a valid instance name (letters, digits, . _ -)")
    plan = _Plan(prefix=prefix, dry_run=dry_run)
    service = f"floorline@{instance}" if instance else "floorline"
    stem = instance or "gateway"
    config_target = CONFIG_DIR / f"{stem}.yaml"
    password_target = CONFIG_DIR / (f"{instance}.mqtt-password" if instance else "mqtt-password")

    # 1. Validate everything first: a failed install leaves nothing half done.
    resolved = load_config(config)  # ConfigError for an unreadable or invalid file
    text = config.read_text()
    unit_source = unit_file or find_unit("floorline@.service" if instance else "floorline.service")
    unit_text = unit_source.read_bytes()

    # 2. Bundles, then the config that points at them.
    new_paths: dict[int, Path] = {}
    for i, p in enumerate(resolved.pipelines):
        if str(p.bundle).startswith("sha256:"):
            continue  # a fleet store reference: lives in the state directory, not installed here
        new_paths[i] = _install_bundle(plan, Path(p.bundle))
    installed_config = _rewrite_bundles(text, new_paths)
    if plan.write(config_target, installed_config.encode(), 0o644, replace=False):
        for problem in _relative_paths(text, str(config), config.resolve().parent):
            plan.notes.append(f"# NOTE {problem} is relative: in {config_target} it means "
                              f"{CONFIG_DIR}/...; copy it there or make the path absolute")
        if resolved.state_dir is not None and parse_config(text).state_dir is not None:
            plan.notes.append(
                f"# NOTE state_dir is set; the service may write only its StateDirectory "
                f"(/var/lib/floorline{'/' + instance if instance else ''}): remove state_dir "
                "from the config, or the outbox falls back to memory"
            )
    else:
        plan.notes.append(f"# kept the existing {config_target}; it was not changed. Installed "
                          f"bundles: {', '.join(str(t) for t in new_paths.values()) or 'none'}")

    # 3. Credential placeholder (LoadCredential= refuses to start without the file).
    if plan.write(password_target, b"", 0o600, replace=False):
        plan.notes.append(f"# {password_target} is empty (0600): put the broker password there "
                          "if the broker needs one")

    # 4. The unit, a user drop-in if asked, the entry point.
    unit_name = "floorline@.service" if instance else "floorline.service"
    plan.write(unit_dir / unit_name, unit_text, 0o644, replace=True)
    dropin = unit_dir / f"{unit_name}.d" / "10-user.conf"
    if user is not None:
        plan.write(dropin, (
            "# Written by floorline install-service: a fixed user instead of DynamicUser=.\n"
            f"[Service]\nDynamicUser=no\nUser={user}\nGroup={user}\n"
        ).encode(), 0o644, replace=True)
    _link_entry_point(plan, entry_point)

    commands = [f"# would: {action}" for action in plan.done] if dry_run else []
    commands += plan.notes
    if user is not None:
        commands.append(f"id -u {user} >/dev/null 2>&1 || useradd --system --no-create-home "
                        f"--home-dir /var/lib/floorline --shell /usr/sbin/nologin {user}")
    commands += [
        f"floorline check --config {config_target}",
        f"systemctl daemon-reload && systemctl enable --now {service}",
        f"journalctl -u {service} -f",
    ]
    for action in plan.done:
        log.info("%s%s", "would: " if dry_run else "", action)
    return commands


def _link_entry_point(plan: _Plan, entry_point: Path | None) -> None:
    source = entry_point or Path(sys.executable).parent / "floorline"
    dest = plan.at(ENTRY_POINT)
    if dest.is_symlink() or dest.exists():
        if dest.resolve() != source.resolve():
            plan.notes.append(f"# kept the existing {ENTRY_POINT} (not {source})")
        return
    if any(source.resolve().is_relative_to(hidden) for hidden in (Path("/home"), Path("/root"))):
        plan.notes.append(f"# NOTE {source} is under /home or /root, which the unit hides "
                          "(ProtectHome=yes): install floorline elsewhere, e.g. a venv in /opt")
    if not source.exists():
        plan.notes.append(f"# NOTE no floorline at {source}: make {ENTRY_POINT} the entry point "
                          "the unit starts")
        return
    plan.done.append(f"ln -s {source} {ENTRY_POINT}")
    if not plan.dry_run:
        _mkdirs(dest.parent)
        dest.symlink_to(source)
