"""Floorline's gateway side: bundles, runtimes and the MQTT daemon. Never imports TensorFlow."""

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
