"""Files that ship inside the package: example configs and schema, systemd units, example bundles.

A config names a shipped bundle as ``bundle: example:NAME`` (``example_bundle``), so the example
configs work wherever floorline is installed.

In a wheel the repository's ``configs/`` and ``systemd/`` folders are the packages
``floorline.edge.examples`` and ``floorline.edge.units`` (pyproject.toml maps them). In an
editable install from a clone they are those folders themselves: setuptools' editable finder maps
only the top packages, not folders outside them.
"""

from __future__ import annotations

from pathlib import Path

from floorline.edge.errors import ConfigError

EXAMPLE_PREFIX = "example:"
"""How a config names a shipped bundle: ``bundle: example:pdm-classifier``."""

_EDGE = Path(__file__).resolve().parent


def _shipped(installed: str, folder: str) -> Path:
    # Plain paths, not importlib.resources: these data-only packages have no __init__.py, and
    # files() of a namespace package is a MultiplexedPath whose str() is not a path.
    inside = _EDGE / installed
    return inside if inside.is_dir() else _EDGE.parent / folder


def examples_dir() -> Path:
    """The example gateway configs and ``config.schema.json``."""
    return _shipped("examples", "configs")


def units_dir() -> Path:
    """The systemd unit files (and the drop-in example)."""
    return _shipped("units", "systemd")


def models_dir() -> Path:
    """The example bundles (``pdm-classifier``)."""
    return _EDGE / "models"


def example_configs() -> list[Path]:
    """The shipped example gateway configs (``*.yaml``), by name."""
    return sorted(examples_dir().glob("*.yaml"))


def example_bundles() -> list[str]:
    """The names of the shipped example bundles, for ``bundle: example:NAME``."""
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file())


def example_bundle(name: str) -> Path:
    """The shipped example bundle NAME, or ConfigError naming the ones there are."""
    available = example_bundles()
    if name not in available:
        shipped = ", ".join(f"{EXAMPLE_PREFIX}{n}" for n in available) or "none"
        raise ConfigError(f"no example bundle {name!r}; shipped: {shipped}")
    return models_dir() / name
