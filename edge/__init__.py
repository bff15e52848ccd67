"""Floorline's gateway side: bundles, runtimes and the MQTT daemon. Never imports TensorFlow."""

from edge.bundle import Bundle, Golden
from edge.errors import (
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
from edge.manifest import Manifest

__version__ = "0.1.0"

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
