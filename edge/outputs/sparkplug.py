"""The ``sparkplug`` output: predictions as Sparkplug B device metrics of an edge node.

Each asset is a Sparkplug device of the edge node ``group_id/edge_node_id``; its metrics are the
prediction's fields, flattened (a one-head classifier: ``Label``, ``Score``, ``Scores/<label>``;
an anomaly head: ``Anomaly/Score``, ``Anomaly/Threshold``, ``Anomaly/Anomalous``,
``Anomaly/Features/<feature>``; a regression head: ``Value`` or ``Value/<i>``; several heads:
each under ``<head>/``), plus ``Window/Seq`` (the per-asset prediction counter consumers
de-duplicate on). The model's name, version and artifact sha256 are constant metrics of the
DBIRTH (``Model/Name``, ``Model/Version``, ``Model/SHA256``).

The output does not publish: it commits each batch's records to its edge node's outbox and returns
no messages for the gateway's publish path. The node (``floorline.edge.daemon.sparkplug_node``)
owns the Sparkplug session: its own connection with the NDEATH as will, births, seq, aliases,
DDEATH, rebirth, primary host awareness and store and forward. docs/sparkplug.md says why.
"""

from __future__ import annotations

import importlib
import math
import re
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import Field, field_validator

from floorline.edge.errors import ConfigError
from floorline.edge.messages import Outbound
from floorline.edge.outputs.base import OutputConfigBase, OutputContext, OutputPlugin
from floorline.edge.sparkplug import require
from floorline.edge.stream.encode import PredictionEncoder
from floorline.edge.stream.heads import HeadLayout
from floorline.edge.stream.window import Window

_RESERVED = re.compile(r"[+/#]")


class SparkplugOutputConfig(OutputConfigBase):
    """Predictions as Sparkplug B metrics: this pipeline is an edge node, each asset a device."""

    type: Literal["sparkplug"] = Field(description="Selects the Sparkplug B output.")
    group_id: str = Field(min_length=1, description="Sparkplug group id of the edge node.")
    edge_node_id: str | None = Field(
        default=None, min_length=1, description="Sparkplug edge node id; default the gateway id."
    )
    primary_host_id: str | None = Field(
        default=None,
        min_length=1,
        description="Host id of the primary host application: births wait for its STATE to "
        "say online, and predictions are held (in order, none dropped) while it is offline.",
    )
    device_id: str = Field(
        default="{asset}",
        min_length=1,
        description="Template of each asset's Sparkplug device id ({asset}, {pipeline}, "
        "{gateway}); + / # in the result become _.",
    )
    device_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="A device (asset) without a prediction for this long gets a DDEATH; null: "
        "10 x its mean interval between predictions, at least 10 s.",
    )

    @field_validator("group_id", "edge_node_id", "primary_host_id")
    @classmethod
    def _no_reserved(cls, value: str | None) -> str | None:
        if value is not None and _RESERVED.search(value):
            raise ValueError(f"{value!r}: Sparkplug ids cannot contain + / or #")
        return value

    @field_validator("device_id")
    @classmethod
    def _known_fields(cls, value: str) -> str:
        try:
            value.format(asset="a", pipeline="p", gateway="g")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{value!r}: only {{asset}}, {{pipeline}} and {{gateway}} may be "
                             f"used ({exc})") from None
        return value


def flatten(message: dict[str, Any]) -> dict[str, Any]:
    """A prediction message's model fields (``stream.encode``) as Sparkplug metric values."""
    heads = message.get("heads")
    if isinstance(heads, dict):
        out: dict[str, Any] = {}
        for name, fields in heads.items():
            out.update(_head(fields, f"{name}/"))
        return out
    return _head(message, "")


def _head(fields: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "label" in fields:
        out[f"{prefix}Label"] = fields["label"]
        out[f"{prefix}Score"] = fields["score"]
        for label, score in fields["scores"].items():
            out[f"{prefix}Scores/{label}"] = score
        if "alerts" in fields:
            out[f"{prefix}Alerts"] = ",".join(fields["alerts"])
    elif "anomaly" in fields:
        anomaly = fields["anomaly"]
        out[f"{prefix}Anomaly/Score"] = anomaly["score"]
        out[f"{prefix}Anomaly/Threshold"] = anomaly["threshold"]
        out[f"{prefix}Anomaly/Anomalous"] = anomaly["anomalous"]
        for feature, share in anomaly.get("features", {}).items():
            out[f"{prefix}Anomaly/Features/{feature}"] = share
    elif "value" in fields:
        value = fields["value"]
        if isinstance(value, list):
            for i, v in enumerate(value):
                out[f"{prefix}Value/{i}"] = v
        else:
            out[f"{prefix}Value"] = value
    return out


def _finite_or_null(values: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities as typed nulls, as the JSON message writes them (``null``)."""
    return {k: None if type(v) is float and not math.isfinite(v) else v for k, v in values.items()}


class SparkplugOutput:
    """One pipeline's predictions into its edge node's session (``daemon.sparkplug_node``)."""

    def __init__(self, config: SparkplugOutputConfig, context: OutputContext) -> None:
        nodes = context.sessions
        if nodes is None:
            raise ConfigError("output type sparkplug runs only inside the gateway daemon")
        require("output type sparkplug")  # protobuf installed, recent enough: or one line
        payloads = importlib.import_module("floorline.edge.daemon.sparkplug_payloads")
        from floorline.edge.daemon.sparkplug_node import DeviceSchema  # noqa: PLC0415

        self._encoder = PredictionEncoder(
            gateway=context.gateway, pipeline=context.pipeline, manifest=context.manifest,
            artifact=context.artifact, topic_template="-", labels=context.labels,
            thresholds=context.thresholds,
        )
        self._device = config.device_id
        self._gateway, self._pipeline = context.gateway, context.pipeline
        self._devices: dict[str, str] = {}
        names = self._example(context)
        specs = tuple(payloads.MetricSpec(n, payloads.datatype_of(v)) for n, v in names.items())
        model = context.manifest
        schema = DeviceSchema(specs=specs, constants=(
            ("Model/Name", model.name), ("Model/Version", str(model.version)),
            ("Model/SHA256", context.artifact.sha256),
        ))
        node_id = config.edge_node_id or context.gateway
        self._nodes = nodes
        self.node = nodes.attach(self, context.pipeline, config.group_id,
                                 _RESERVED.sub("_", node_id), config.primary_host_id)
        self.node.set_schema(schema, config.device_timeout_s)

    def _example(self, context: OutputContext) -> dict[str, Any]:
        """Every metric name with a value of its type: one prediction from zeros."""
        width = sum(HeadLayout(context.manifest).widths)
        values = _finite_or_null(flatten(self._encoder.outputs([0.0] * width)))
        # A value that is null in the example has no type to show: a score is a Double.
        values = {k: 0.0 if v is None else v for k, v in values.items()}
        return {**values, "Window/Seq": 0}

    def device(self, asset: str) -> str:
        """ASSET's Sparkplug device id."""
        found = self._devices.get(asset)
        if found is None:
            found = _RESERVED.sub("_", self._device.format(
                asset=asset, pipeline=self._pipeline, gateway=self._gateway)) or "_"
            if len(self._devices) < 100_000:
                self._devices[asset] = found
        return found

    def messages(
        self,
        windows: Sequence[Window],
        outputs: NDArray[np.float32],
        *,
        inference_ms: float,
        now: float,
    ) -> list[Outbound]:
        """Commit the batch's predictions to the edge node's outbox; nothing for the gateway's."""
        del inference_ms, now  # the output protocol's; no Sparkplug metric carries them
        batch = list(windows)
        rows = outputs.reshape(len(batch), -1).tolist()
        wall = time.time()
        records = []
        for window, row in zip(batch, rows, strict=True):
            # The head fields the JSON message would carry, straight from the row: no JSON made
            # and read back per prediction.
            values = _finite_or_null(flatten(self._encoder.outputs(row)))
            values["Window/Seq"] = window.index
            stamp = window.end if window.end is not None else wall
            records.append((self.device(window.asset), round(stamp * 1000), values))
        self.node.submit(records)
        return []

    def close(self) -> None:
        """Leave the edge node; the last output to leave ends its session (NDEATH)."""
        self._nodes.detach(self, self.node)


PLUGIN = OutputPlugin(type="sparkplug", config=SparkplugOutputConfig, factory=SparkplugOutput)
