"""What every output shares: the protocol, the context it is built with, the plugin record.

An output turns a batch of predictions into the messages that carry them. It does not send them:
the pipeline hands what it returns to the gateway's one publish path, so the outbox (ordering,
retries, bounds) works the same for every output.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict

from floorline.edge.bundle.manifest import Artifact, Manifest
from floorline.edge.messages import Outbound
from floorline.edge.stream.window import Window


class OutputConfigBase(BaseModel):
    """Base of every output's config model: strict, immutable, selected by ``type``.

    Only the ``mqtt`` output's ``type`` has a default (an ``output:`` without one means it); any
    other output must require ``type`` (``type: Literal["name"]`` without a default), or a config
    without it would match two branches of the JSON Schema.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    type: str


@dataclass(frozen=True)
class OutputContext:
    """What an output is built for: one pipeline of one gateway, running one model."""

    gateway: str
    pipeline: str
    prediction_topic: str
    """The gateway's default prediction topic template (``topics.predictions``)."""
    manifest: Manifest
    artifact: Artifact
    labels: list[str] | None = None
    """The pipeline's override of the bundle's labels, if any."""
    thresholds: dict[str, float] | None = None
    """The pipeline's override of the bundle's thresholds, if any."""
    sessions: Any = None
    """The daemon's Sparkplug edge nodes (``daemon.sparkplug_node.EdgeNodes``), for an output
    that publishes through a session of its own; None outside the daemon."""
    drift: Callable[[str], bool] | None = None
    """Whether an asset's input drifts now (``stream.drift.DriftMonitor.flagged``); None: off."""


class Output(Protocol):
    """Where one pipeline's predictions go.

    Built once per pipeline (and again at every configuration switch). ``messages`` is called on
    the pipeline's worker thread after every inference, with the batch's windows in order and the
    model's output rows; it returns the messages to publish, in the order they must arrive.
    ``close`` is called after the worker stopped.
    """

    def messages(
        self,
        windows: Sequence[Window],
        outputs: NDArray[np.float32],
        *,
        inference_ms: float,
        now: float,
    ) -> list[Outbound]:
        """The messages carrying these predictions; NOW is ``time.monotonic()`` at the end."""
        ...

    def close(self) -> None:
        """Release what the output holds."""
        ...


@dataclass(frozen=True)
class OutputPlugin:
    """What an output module declares as ``PLUGIN`` (see :mod:`floorline.edge.plugins`)."""

    type: str
    config: builtins.type[OutputConfigBase]  # the field above shadows the builtin
    factory: Callable[[Any, OutputContext], Output]
