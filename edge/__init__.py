"""Floorline's gateway side: bundles, runtimes and the MQTT daemon. Never imports TensorFlow."""

from importlib import metadata

from floorline.edge.bundle.bundle import Bundle, Golden
from floorline.edge.bundle.manifest import Manifest
from floorline.edge.errors import (
    BackendError,
    BundleError,
    ConfigError,
    FloorlineError,
    IntegrityError,
    ManifestError,
    RuntimeMissingError,
    SelfTestError,
    SignatureError,
    UnsafeArchiveError,
)

try:
    # pyproject.toml's version is the only one; this reads what the installer recorded from it.
    __version__ = metadata.version("floorline")
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BackendError",
    "Bundle",
    "BundleError",
    "ConfigError",
    "FloorlineError",
    "Golden",
    "IntegrityError",
    "Manifest",
    "ManifestError",
    "RuntimeMissingError",
    "SelfTestError",
    "SignatureError",
    "UnsafeArchiveError",
    "__version__",
]
