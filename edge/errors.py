"""Every error Floorline's gateway side raises, in one tree.

    FloorlineError
    ├── ConfigError              a config file or option is invalid
    ├── BundleError              a model bundle cannot be trusted or read
    │   ├── ManifestError        manifest.json is missing, malformed or of an unknown schema
    │   ├── IntegrityError       a file's sha256 differs from the manifest
    │   ├── SignatureError       the signature is missing (when required), malformed or wrong
    │   └── UnsafeArchiveError   a bundle tar holds traversal, links, devices or is too large
    ├── BackendError             a runtime cannot load or run an artifact
    │   └── RuntimeMissingError  the runtime for an artifact is not installed (names the extra)
    ├── SelfTestError            an artifact disagrees with its bundle's golden outputs
    ├── DecodeError              a sensor message cannot become samples (has a bounded reason code)
    └── TransportError           the MQTT connection cannot be set up as configured

Foreign exceptions (tarfile, json, onnxruntime, LiteRT) are mapped to these at the boundary with
``raise ... from exc`` so callers catch one family and users read one kind of message.
"""

from __future__ import annotations


class FloorlineError(Exception):
    """Base of every error Floorline raises on purpose."""


class ConfigError(FloorlineError):
    """A configuration file or option is invalid."""


class BundleError(FloorlineError):
    """A model bundle cannot be trusted or read."""


class ManifestError(BundleError):
    """manifest.json is missing, malformed, or of a schema this version does not know."""


class IntegrityError(BundleError):
    """A bundle file's sha256 does not match its manifest entry."""


class SignatureError(BundleError):
    """A bundle's signature is missing where required, malformed, or does not verify."""


class UnsafeArchiveError(BundleError):
    """A bundle archive holds members that could escape or exhaust the extraction directory."""


class BackendError(FloorlineError):
    """A runtime cannot load or run an artifact."""


class RuntimeMissingError(BackendError):
    """The runtime needed for an artifact is not installed."""


class SelfTestError(FloorlineError):
    """An artifact's outputs on the bundle's golden inputs differ from the stored outputs."""


class DecodeError(FloorlineError):
    """A sensor message that cannot become samples.

    ``reason`` is a short code from a fixed set (see ``floorline.edge.decoders.base.REASONS``) so
    dead-letter
    messages and metrics have bounded cardinality; ``detail`` is for humans and may be truncated.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class TransportError(FloorlineError):
    """The MQTT connection cannot be set up as configured (TLS files, credentials, address)."""
