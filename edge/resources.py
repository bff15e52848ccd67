"""Files that ship inside the package: example configs and schema, systemd units, example bundles.

In a wheel the repository's ``configs/`` and ``systemd/`` folders are the packages
``floorline.edge.examples`` and ``floorline.edge.units`` (pyproject.toml maps them). In an
editable install from a clone they are those folders themselves: setuptools' editable finder maps
only the top packages, not folders outside them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_EDGE = Path(__file__).resolve().parent


def _shipped(package: str, folder: str) -> Path:
    try:
        return Path(str(resources.files(package)))
    except ModuleNotFoundError:
        return _EDGE.parent / folder


def examples_dir() -> Path:
    """The example gateway configs and ``config.schema.json``."""
    return _shipped("floorline.edge.examples", "configs")


def units_dir() -> Path:
    """The systemd unit files (and the drop-in example)."""
    return _shipped("floorline.edge.units", "systemd")


def models_dir() -> Path:
    """The example bundles (``pdm-classifier``)."""
    return _EDGE / "models"
