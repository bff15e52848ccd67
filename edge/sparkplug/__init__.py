"""Sparkplug B 3.0 (Eclipse Sparkplug): the payload definition, topics and a small typed codec.

- ``sparkplug_b.proto``: Eclipse Tahu's Sparkplug B payload definition (EPL-2.0; see its header).
- ``sparkplug_b_pb2`` (+ ``.pyi``): generated from it by ``scripts/gen-sparkplug-pb2`` (protoc
  30.0, gencode 6.30.0: needs protobuf >= 6.30, the ``sparkplug`` extra's floor).
- :mod:`~floorline.edge.sparkplug.topics`: topic parse/format, ids, message types. No protobuf.
- :mod:`~floorline.edge.sparkplug.payload`: Payload build/parse, metric values by datatype, seq
  and bdSeq helpers, the rebirth command. Imports protobuf.

Importing this package imports nothing from protobuf: a gateway needs the ``sparkplug`` extra
only when a pipeline uses a Sparkplug decoder or output (:func:`require` says so in one line).
"""

from __future__ import annotations

from floorline.edge.errors import ConfigError

EXTRA_HINT = "pip install 'floorline[sparkplug]'"


def require(what: str) -> None:
    """Raise ConfigError naming WHAT unless the protobuf runtime Sparkplug needs is importable."""
    try:
        from floorline.edge.sparkplug import payload  # noqa: F401, PLC0415 - the check itself
    except ImportError as exc:
        raise ConfigError(
            f"{what} needs the protobuf runtime (>= 6.30), which is not installed "
            f"({type(exc).__name__}: {exc}); install it with {EXTRA_HINT}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - e.g. protobuf's VersionError: too old a runtime
        raise ConfigError(
            f"{what} cannot load the Sparkplug payload code ({type(exc).__name__}: {exc}); "
            f"upgrade protobuf with {EXTRA_HINT}"
        ) from None
