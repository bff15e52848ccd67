"""Every error the converter raises on purpose, in one tree.

    ConversionError (floorline.edge.errors.FloorlineError)
    ├── SourceModelError      the model file is missing, unreadable, or not a single-input model
    ├── ModelCardError        the metadata (model card or flags) is incomplete or inconsistent
    ├── UnsupportedOpError    TFLite cannot express some ops of the model (names them)
    ├── CalibrationDataError  calibration or parity data has the wrong shape, dtype or values
    ├── ExportError           an exporter failed for another reason
    └── ParityError           an artifact disagrees with the source model beyond its tolerance

The CLI prints the message of any of these and exits 1; no bundle is written.
"""

from __future__ import annotations

from floorline.edge.errors import FloorlineError


class ConversionError(FloorlineError):
    """A conversion could not produce a trustworthy bundle.

    The message is one line that names the card key or flag at fault and what to do next.
    ``details`` holds what a tool said (compiler output, a traceback's tail): the CLI shows it
    only with ``-v``.
    """

    def __init__(self, message: str, *, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class SourceModelError(ConversionError):
    """The source model is missing, unreadable, or of an unsupported form."""


class ModelCardError(ConversionError):
    """The model metadata is incomplete or inconsistent with the model."""


class UnsupportedOpError(ConversionError):
    """TFLite's built-in op set cannot express some of the model's ops."""

    def __init__(self, ops: list[str], detail: str = "", *, details: str = "") -> None:
        self.ops = ops
        names = ", ".join(ops) if ops else "(not named by the converter)"
        super().__init__(
            f"TFLite cannot express these ops of the model: {names}. Gateways run built-in TFLite "
            "ops only (no TensorFlow 'Flex' kernels); replace them in the model, or convert to "
            f"ONNX only (--targets onnx).{detail}",
            details=details,
        )


class CalibrationDataError(ConversionError):
    """Calibration or parity data does not fit the model."""


class ExportError(ConversionError):
    """An exporter failed for a reason other than unsupported ops."""


class ParityError(ConversionError):
    """An artifact's outputs differ from the source model's beyond the tolerance."""
