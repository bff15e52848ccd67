"""Floorline's workstation side: Keras/TensorFlow models to verified, signed bundles.

TensorFlow is imported only by the commands that convert
(``floorline.converter.tensorflow_import``);
``inspect``, ``bench`` and ``keygen`` run without it.
"""

from floorline.converter.errors import (
    CalibrationDataError,
    ConversionError,
    ExportError,
    ModelCardError,
    ParityError,
    SourceModelError,
    UnsupportedOpError,
)

__all__ = [
    "CalibrationDataError",
    "ConversionError",
    "ExportError",
    "ModelCardError",
    "ParityError",
    "SourceModelError",
    "UnsupportedOpError",
]
