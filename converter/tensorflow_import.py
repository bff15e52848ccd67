"""The one place the converter imports TensorFlow, quietly and only when a command needs it."""

from __future__ import annotations

import os
from typing import Any


def import_tensorflow() -> tuple[Any, Any]:
    """Return (tensorflow, keras), keeping TensorFlow's C++ notices off the screen."""
    # Must be set before the first import; a user who set it keeps their value.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from floorline.converter.native_output import captured  # noqa: PLC0415

    try:
        # TensorFlow's absl logging prints CUDA and oneDNN notices at import whatever the level.
        with captured():
            import keras  # noqa: PLC0415 - imported on demand: ~2.5 s and ~500 MB
            import tensorflow as tf  # noqa: PLC0415
    except ImportError as exc:
        from floorline.converter.errors import ConversionError  # noqa: PLC0415

        raise ConversionError(
            "converting needs TensorFlow: pip install 'floorline[convert]'"
        ) from exc
    return tf, keras
