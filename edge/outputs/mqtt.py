"""The ``mqtt`` output: one JSON prediction message per window on a per-asset topic."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from floorline.edge.messages import Outbound
from floorline.edge.outputs.base import OutputConfigBase, OutputContext, OutputPlugin
from floorline.edge.stream.encode import PredictionEncoder
from floorline.edge.stream.window import Window


class MqttOutputConfig(OutputConfigBase):
    """Predictions as JSON on the gateway's broker (the default output)."""

    type: Literal["mqtt"] = Field(default="mqtt", description="Selects the MQTT output.")
    topic: str | None = Field(default=None, description="Template; default topics.predictions.")
    qos: Literal[0, 1, 2] = Field(default=1, description="QoS of prediction messages.")
    retain: bool = Field(default=False, description="Retain the latest prediction per topic.")


class MqttOutput:
    """Encodes predictions with provenance (``stream.encode``) onto per-asset topics."""

    def __init__(self, config: MqttOutputConfig, context: OutputContext) -> None:
        self._encoder = PredictionEncoder(
            gateway=context.gateway,
            pipeline=context.pipeline,
            manifest=context.manifest,
            artifact=context.artifact,
            topic_template=config.topic or context.prediction_topic,
            labels=context.labels,
            thresholds=context.thresholds,
            drift=context.drift,
        )
        self._qos = config.qos
        self._retain = config.retain

    def messages(
        self,
        windows: Sequence[Window],
        outputs: NDArray[np.float32],
        *,
        inference_ms: float,
        now: float,
    ) -> list[Outbound]:
        """One message per window, in window order."""
        batch = list(windows)
        payloads = self._encoder.encode_batch(batch, outputs, inference_ms=inference_ms, now=now)
        topic, qos, retain = self._encoder.topic, self._qos, self._retain
        return [
            Outbound(topic(window.asset), payload, qos, retain)
            for window, payload in zip(batch, payloads, strict=True)
        ]

    def close(self) -> None:
        """Nothing to release."""


PLUGIN = OutputPlugin(type="mqtt", config=MqttOutputConfig, factory=MqttOutput)
