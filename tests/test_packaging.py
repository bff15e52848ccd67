"""The package layout keeps its promises: namespaced, folders by concern, boundaries enforced.

These read the source tree (no install needed). The wheel itself is tested in test_wheel.py.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
EDGE = ROOT / "edge"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]

# Data-only packages: folders the brief fixes at the top level, shipped inside floorline.edge.
DATA_PACKAGES = {"floorline.edge.examples": "configs", "floorline.edge.units": "systemd"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return "floorline." + ".".join(parts)


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_every_code_folder_is_a_listed_package_and_nothing_installs_top_level_names() -> None:
    listed = set(SETUPTOOLS["packages"])
    folders = {
        _module_name(init) for top in ("edge", "converter") for init in (ROOT / top).rglob(
            "__init__.py") if "__pycache__" not in init.parts
    }
    assert folders | set(DATA_PACKAGES) == listed
    assert all(name.startswith("floorline.") for name in listed)
    mapping = SETUPTOOLS["package-dir"]
    assert mapping["floorline.edge"] == "edge"
    assert mapping["floorline.converter"] == "converter"
    for package, folder in DATA_PACKAGES.items():
        assert mapping[package] == folder
    assert not (ROOT / "floorline").exists(), "the namespace lives only in the install"


def test_no_python_file_outside_a_package_folder() -> None:
    # A module in a folder without __init__.py would be left out of the wheel silently.
    for top in ("edge", "converter"):
        for path in _sources(ROOT / top):
            assert (path.parent / "__init__.py").exists(), path


def test_the_runtime_never_imports_the_demo_plant() -> None:
    # The simulator and demo ship in the wheel but are not part of the runtime: only the CLI's
    # demo/simulate commands (imported lazily there) reach them.
    offenders = [
        str(p.relative_to(ROOT)) for p in _sources(EDGE)
        if "demo" not in p.relative_to(EDGE).parts[:1] and p.name != "main.py"
        and any(name.startswith("floorline.edge.demo") for name in _imports(p))
    ]
    assert offenders == []


@pytest.mark.parametrize(
    ("prefixes", "allowed"),
    [
        (("paho",), ("mqtt",)),
        (("ai_edge_litert", "tflite_runtime", "onnxruntime"), ("backends",)),
        (("tensorflow", "keras", "tf2onnx"), ()),
    ],
)
def test_third_party_boundaries(prefixes: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    offenders = []
    for path in _sources(EDGE):
        folder = path.relative_to(EDGE).parts[0]
        names = _imports(path)
        if folder not in allowed and any(n.split(".")[0] in prefixes for n in names):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_no_private_reach_ins_across_objects() -> None:
    # `other._thing` couples a module to another's internals; only self/cls may use _names.
    # (edge/mqtt/paho_seam.py is the one place allowed to touch paho's private state.)
    offenders = []
    for path in _sources(EDGE):
        if path.relative_to(EDGE).as_posix() == "mqtt/paho_seam.py":
            continue
        offenders.extend(
            f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}"
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"})
            and node.attr not in {"_asdict", "_replace", "_fields", "_make"}  # namedtuple API
        )
    assert offenders == []


def test_every_edge_module_lives_in_a_concern_folder() -> None:
    # Only cross-cutting modules stay at the top of edge/; everything else is in a folder that
    # says what it serves.
    top = {p.name for p in EDGE.glob("*.py")}
    assert top == {
        "__init__.py", "__main__.py", "errors.py", "messages.py", "plugins.py", "resources.py",
    }
