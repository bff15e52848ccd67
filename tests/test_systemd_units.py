"""The systemd units: ``systemd-analyze verify`` clean, exposure ≤ 1.5, and a sandbox that works.

``systemd-analyze verify`` checks that ExecStart's binary exists, and ``/usr/local/bin/floorline``
does not on a development machine. So both units are verified as copies in a scratch directory
whose ExecStart points at this checkout's ``floorline`` entry point; nothing else differs (the
tests check that), and the drop-in directory is copied beside them so it is verified too. verify
exits 0 even for unknown keys and invalid values (it only prints "…, ignoring"), so any output
about our files counts as a failure.

Without systemd as PID 1 the sandbox cannot be started for real. The last tests install the same
seccomp filter systemd 252 would (the unit's SystemCallFilter= allow-list minus its deny-list,
SystemCallErrorNumber=, SystemCallArchitectures=native, and MemoryDenyWriteExecute='s mmap /
mprotect / pkey_mprotect / shmat rules), built from the unit file itself, in a Python process,
and run ``floorline selftest`` for each runtime inside it. The filter goes in before anything is
imported, so every thread the runtimes start inherits it.

``systemd-analyze`` missing: skipped on a developer's machine, a failure under CI=true.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
SHIPPED_EXEC = "/usr/local/bin/floorline"
BUNDLE = ROOT / "edge" / "models" / "pdm-classifier"
SYSCALL_HEADER = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


def _require(condition: bool, what: str) -> None:
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing on CI; the systemd unit checks must run there")
    pytest.skip(f"{what} is not installed")


@pytest.fixture(scope="module")
def analyze() -> str:
    path = shutil.which("systemd-analyze")
    _require(path is not None, "systemd-analyze")
    assert path is not None
    return path


@pytest.fixture(scope="module")
def unit_copies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units and drop-ins in a scratch directory, ExecStart pointed at an existing binary."""
    exe = Path(sys.executable).parent / "floorline"
    exe = exe if exe.exists() else Path(sys.executable)
    out = tmp_path_factory.mktemp("units")
    for src in UNITS.rglob("*"):
        dest = out / src.relative_to(UNITS)
        if src.is_dir():
            dest.mkdir(exist_ok=True)
            continue
        text = src.read_text()
        if src.suffix == ".service":
            assert text.count(f"ExecStart={SHIPPED_EXEC} ") == 1, src
            text = text.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={exe} ")
        dest.write_text(text)
    return out


def _run(analyze: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([analyze, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, check=False)


def _about_our_units(output: str) -> list[str]:
    return [line for line in output.splitlines() if "floorline" in line]


@pytest.mark.parametrize("unit", ["floorline.service", "floorline@gw2.service"])
def test_unit_verifies_without_any_warning(analyze: str, unit_copies: Path, unit: str) -> None:
    # floorline@gw2.service does not exist as a file: systemd finds the template beside it.
    result = _run(analyze, "verify", str(unit_copies / unit), cwd=unit_copies)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert _about_our_units(output) == [], output


def test_verify_as_used_here_does_report_a_broken_unit(analyze: str, unit_copies: Path,
                                                       tmp_path: Path) -> None:
    # The method above must be able to fail: a bad value in a drop-in shows up in its output.
    broken = tmp_path / "floorline.service"
    shutil.copy(unit_copies / "floorline.service", broken)
    (tmp_path / "floorline.service.d").mkdir()
    (tmp_path / "floorline.service.d" / "bad.conf").write_text("[Service]\nMemoryMax=lots\n")
    result = _run(analyze, "verify", str(broken), cwd=tmp_path)
    reported = _about_our_units(result.stdout + result.stderr)
    assert any("bad.conf:2" in line and "'lots'" in line for line in reported), reported


def _exposure(analyze: str, unit_file: Path) -> float:
    result = _run(analyze, "security", "--offline=true", str(unit_file), cwd=unit_file.parent)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    return float(match.group(1))


@pytest.mark.parametrize("unit", ["floorline.service", "floorline@.service"])
def test_exposure_is_at_most_1_5(analyze: str, unit: str) -> None:
    exposure = _exposure(analyze, UNITS / unit)
    assert exposure <= 1.5, f"{unit}: exposure {exposure}"


def _directives(text: str) -> list[str]:
    section, out = "", []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        out.append(f"{section}{line}")
    return out


def test_template_has_exactly_the_main_units_settings_but_per_instance_paths() -> None:
    main = _directives((UNITS / "floorline.service").read_text())
    template = _directives((UNITS / "floorline@.service").read_text())
    differ = [(m, t) for m, t in zip(main, template, strict=True) if m != t]
    assert differ == [
        ("[Unit]Description=Floorline edge inference daemon",
         "[Unit]Description=Floorline edge inference daemon (%i)"),
        ("[Service]ExecStart=/usr/local/bin/floorline run --config /etc/floorline/gateway.yaml",
         "[Service]ExecStart=/usr/local/bin/floorline run --config /etc/floorline/%i.yaml"),
        ("[Service]StateDirectory=floorline", "[Service]StateDirectory=floorline/%i"),
        ("[Service]LoadCredential=mqtt-password:/etc/floorline/mqtt-password",
         "[Service]LoadCredential=mqtt-password:/etc/floorline/%i.mqtt-password"),
    ]


def test_example_drop_in_changes_nothing_until_edited() -> None:
    text = (UNITS / "floorline.service.d" / "example-override.conf").read_text()
    assert _directives(text) == []  # only "[Service]" and comments: copying it is harmless
    assert "[Service]" in text


# -- the sandbox, emulated with seccomp --------------------------------------------------------

SANDBOX = r"""
import ctypes, json, struct, sys
spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
LD_W_ABS, JEQ_K, JGE_K, AND_K, RET_K = 0x20, 0x15, 0x35, 0x54, 0x06
ALLOW, KILL_PROCESS, ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
DENY = KILL_PROCESS if spec["errno"] is None else ERRNO | spec["errno"]
ARG2 = 16 + 8 * 2  # low 32 bits of args[2] in struct seccomp_data (little endian)
nr = spec["nr"]

def stmt(code, k): return (code, 0, 0, k)
def masked(syscall, mask):
    # if nr == syscall and (args[2] & mask) == mask: EPERM. MemoryDenyWriteExecute= always
    # answers EPERM, whatever SystemCallErrorNumber= says.
    return [stmt(LD_W_ABS, 0), (JEQ_K, 0, 4, syscall), stmt(LD_W_ABS, ARG2), stmt(AND_K, mask),
            (JEQ_K, 0, 1, mask), stmt(RET_K, ERRNO | 1)]

prog = [stmt(LD_W_ABS, 4), (JEQ_K, 1, 0, 0xC000003E), stmt(RET_K, DENY),  # native only
        stmt(LD_W_ABS, 0), (JGE_K, 0, 1, 0x40000000), stmt(RET_K, DENY)]   # no x32 ABI
if spec["mdwe"]:
    prog += masked(nr["mmap"], 0x2 | 0x4)            # PROT_WRITE | PROT_EXEC
    prog += masked(nr["mprotect"], 0x4)              # PROT_EXEC
    prog += masked(nr["pkey_mprotect"], 0x4)
    prog += masked(nr["shmat"], 0o100000)            # SHM_EXEC
prog.append(stmt(LD_W_ABS, 0))
for allowed in spec["allow"]:
    prog += [(JEQ_K, 0, 1, allowed), stmt(RET_K, ALLOW)]
prog.append(stmt(RET_K, DENY))

buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(prog), ctypes.addressof(buf))
assert libc.prctl(38, 1, 0, 0, 0) == 0                          # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()  # seccomp filter

# Show that the filter bites before anyone trusts a pass.
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
failed = ctypes.c_void_p(-1).value
rw = libc.mmap(None, 4096, 3, 0x22, -1, 0)
probe = {
    "rw_mmap_ok": rw != failed,
    "wx_mmap_refused": libc.mmap(None, 4096, 7, 0x22, -1, 0) == failed,
    "mprotect_exec_refused": libc.mprotect(rw, 4096, 5) != 0,
}
if spec["errno"] is not None:
    ctypes.set_errno(0)
    probe["denied_syscall_errno"] = (libc.syscall(spec["probe_nr"], 0, 0, 0),
                                     ctypes.get_errno())
print("PROBE " + json.dumps(probe), file=sys.stderr, flush=True)
from floorline.edge.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def _settings(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for directive in _directives(unit.read_text()):
        key, _, value = directive.split("]", 1)[1].partition("=")
        out.setdefault(key, []).append(value)
    return out


@cache
def _group(analyze: str, name: str) -> frozenset[str]:
    result = subprocess.run([analyze, "syscall-filter", name], capture_output=True, text=True,
                            check=True, timeout=60)
    names: set[str] = set()
    for line in result.stdout.splitlines()[1:]:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        names |= _group(analyze, entry) if entry.startswith("@") else {entry}
    return frozenset(names)


def _allowed_syscalls(analyze: str, filters: list[str]) -> set[str]:
    # systemd semantics: the first entry decides allow- or deny-list; "~" entries take away.
    allowed: set[str] = set()
    for value in filters:
        deny = value.startswith("~")
        names: set[str] = set()
        for item in value.lstrip("~").split():
            names |= _group(analyze, item) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    return allowed


def _syscall_numbers() -> dict[str, int]:
    text = SYSCALL_HEADER.read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"#define __NR_(\w+) (\d+)", text)}


@pytest.mark.parametrize("backend", ["litert", "onnx"])
def test_runtime_self_test_passes_inside_the_units_sandbox(
    analyze: str, backend: str, tmp_path: Path
) -> None:
    _require(platform.machine() == "x86_64" and SYSCALL_HEADER.exists(),
             "x86_64 with kernel headers (linux-libc-dev) for syscall numbers")
    module = {"litert": "ai_edge_litert", "onnx": "onnxruntime"}[backend]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed here")
    settings = _settings(UNITS / "floorline.service")
    numbers = _syscall_numbers()
    allowed = _allowed_syscalls(analyze, settings["SystemCallFilter"])
    assert settings["SystemCallArchitectures"] == ["native"]
    errno_name = settings.get("SystemCallErrorNumber", [None])[-1]
    spec = {
        "nr": numbers,
        "allow": sorted(numbers[n] for n in allowed if n in numbers),
        "mdwe": settings.get("MemoryDenyWriteExecute") == ["yes"],
        "errno": {None: None, "EPERM": 1}[errno_name],
        "probe_nr": numbers["setpriority"],  # @resources: denied by the unit
    }
    assert "setpriority" not in allowed
    assert "mbind" not in allowed  # the runtimes call it; the unit denies it with EPERM
    script = tmp_path / "sandbox.py"
    script.write_text(SANDBOX)
    result = subprocess.run(
        [sys.executable, str(script), json.dumps(spec), "selftest", str(BUNDLE),
         "--backend", backend],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )
    output = result.stdout + result.stderr
    probe_line = next((x for x in result.stderr.splitlines() if x.startswith("PROBE ")), None)
    assert probe_line is not None, output
    probe = json.loads(probe_line.removeprefix("PROBE "))
    assert spec["mdwe"], "the unit no longer sets MemoryDenyWriteExecute=yes: update this test"
    assert probe["rw_mmap_ok"]
    assert probe["wx_mmap_refused"]
    assert probe["mprotect_exec_refused"]
    # A denied call (the runtimes' mbind) must fail with EPERM; SIGSYS would kill the daemon.
    assert result.returncode == 0, f"exit {result.returncode}\n{output}"
    assert probe["denied_syscall_errno"] == [-1, 1]
    assert "FAIL" not in result.stdout
    assert result.stdout.count(" ok ") >= 1, output
