"""Decoders: payload bytes to samples, one plugin module per wire format.

Every module here but ``base`` is a decoder plugin: it holds the format's config model (with its
``type`` key) and its implementation, and declares ``PLUGIN``. :data:`DECODERS` is built from the
modules (:func:`floorline.edge.plugins.discover`), and so is the config union a pipeline's
``decoder:`` is validated against, so adding a format is adding one module. Formats today:

- ``json``: an object per sample, or a list of them under a dotted path (a block);
- ``binary``: raw little-endian float32 or int16 arrays with an optional time/sequence header;
- ``csv``: one line per sample, columns named in the config;
- ``sparkplug``: Sparkplug B NDATA/DDATA by the aliases their birth certificates announce (needs
  the ``sparkplug`` extra only when configured).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Union

from pydantic import Field

from floorline.edge.decoders.base import (
    REASONS,
    Decoder,
    DecoderConfigBase,
    DecoderContext,
    DecoderPlugin,
    Samples,
    check_asset,
)
from floorline.edge.decoders.binary import BinaryDecoder, BinaryDecoderConfig
from floorline.edge.decoders.csv import CsvDecoder, CsvDecoderConfig
from floorline.edge.decoders.json import JsonDecoder, JsonDecoderConfig
from floorline.edge.errors import ConfigError
from floorline.edge.messages import Outbound
from floorline.edge.plugins import discover

__all__ = [
    "DECODERS",
    "REASONS",
    "BinaryDecoder",
    "BinaryDecoderConfig",
    "CsvDecoder",
    "CsvDecoderConfig",
    "Decoder",
    "DecoderConfig",
    "DecoderConfigBase",
    "DecoderContext",
    "DecoderPlugin",
    "JsonDecoder",
    "JsonDecoderConfig",
    "Samples",
    "check_asset",
    "make_decoder",
]

DECODERS: dict[str, DecoderPlugin] = discover(__name__, DecoderPlugin)
"""Every decoder plugin, by the ``type`` its config names."""

if TYPE_CHECKING:
    DecoderConfig = DecoderConfigBase
else:
    DecoderConfig = Annotated[
        Union[tuple(p.config for p in DECODERS.values())],  # noqa: UP007 - built at run time
        Field(discriminator="type"),
    ]
"""Any decoder's config, chosen by its ``type`` key."""


def make_decoder(
    config: DecoderConfigBase,
    features: tuple[str, ...] | list[str],
    pipeline: str = "",
    send: Callable[[Sequence[Outbound]], None] | None = None,
) -> Decoder:
    """The decoder CONFIG selects, for a model with FEATURES (names in model order).

    SEND: the publish path a decoder may answer on (``DecoderContext.send``). Raises ConfigError
    when the config does not fit the features.
    """
    plugin = DECODERS.get(config.type)
    if plugin is None or not isinstance(config, plugin.config):
        raise ConfigError(f"unknown decoder type {config.type!r}; known: {sorted(DECODERS)}")
    return plugin.factory(config, DecoderContext(tuple(features), pipeline, send))
