"""Outputs: where a pipeline's predictions go, one plugin module per kind.

Every module here but ``base`` is an output plugin holding its config model (with its ``type``
key) and its implementation, declared as ``PLUGIN``. :data:`OUTPUTS` and the config union a
pipeline's ``output:`` is validated against are built from the modules, so adding an output is
adding one module. ``type`` may be left out and means ``mqtt``, the first output: JSON
predictions on the gateway's broker. Whatever an output returns goes through the gateway's one
publish path and its outbox.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import Discriminator, Tag

from floorline.edge.errors import ConfigError
from floorline.edge.outputs.base import Output, OutputConfigBase, OutputContext, OutputPlugin
from floorline.edge.outputs.mqtt import MqttOutput, MqttOutputConfig
from floorline.edge.plugins import discover

__all__ = [
    "OUTPUTS",
    "MqttOutput",
    "MqttOutputConfig",
    "Output",
    "OutputConfig",
    "OutputConfigBase",
    "OutputContext",
    "OutputPlugin",
    "make_output",
]

DEFAULT_OUTPUT = "mqtt"

OUTPUTS: dict[str, OutputPlugin] = discover(__name__, OutputPlugin)
"""Every output plugin, by the ``type`` its config names."""


def _output_type(value: Any) -> str:
    # Configs written before outputs were plugins have no `type`: they mean the MQTT output.
    if isinstance(value, dict):
        return str(value.get("type", DEFAULT_OUTPUT))
    return str(getattr(value, "type", DEFAULT_OUTPUT))


if TYPE_CHECKING:
    OutputConfig = OutputConfigBase
elif len(OUTPUTS) == 1:
    # A union of one is its member, and pydantic 2.6 (the oldest supported) refuses a
    # discriminator on a non-union.
    OutputConfig = next(iter(OUTPUTS.values())).config
else:
    OutputConfig = Annotated[
        Union[tuple(Annotated[p.config, Tag(t)] for t, p in OUTPUTS.items())],  # noqa: UP007
        Discriminator(_output_type),
    ]
"""Any output's config, chosen by its ``type`` key (default ``mqtt``)."""


def make_output(config: OutputConfigBase, context: OutputContext) -> Output:
    """The output CONFIG selects, for CONTEXT's pipeline."""
    plugin = OUTPUTS.get(config.type)
    if plugin is None or not isinstance(config, plugin.config):
        raise ConfigError(f"unknown output type {config.type!r}; known: {sorted(OUTPUTS)}")
    return plugin.factory(config, context)
