"""The ``capture:`` block of a pipeline (docs/monitoring.md, Data capture).

Only pydantic here: ``floorline.edge.config.model`` imports this module.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

LABEL_TOPIC = "floorline/{gateway}/capture/label"
"""Operators label stored windows by publishing here (docs/monitoring.md); the default of
``topics.capture_label``."""


class CaptureConfig(BaseModel):
    """Which windows a pipeline keeps on disk for retraining, and how much of them."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    sample_rate: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Share of all windows recorded (0.01: every 100th window; 0: none).",
    )
    before: int = Field(
        default=2, ge=0, le=64,
        description="Windows of the same asset kept before an alert (a classification threshold "
        "crossed, an anomaly verdict) or a mark (drift).",
    )
    after: int = Field(
        default=2, ge=0, le=1000,
        description="Windows of the same asset kept after an alert or a mark.",
    )
    alerts: bool = Field(default=True, description="Record the windows around alerts.")
    drift: bool = Field(
        default=True,
        description="Record the windows around drift alerts (the pipeline's drift detection; "
        "per asset with drift.per_asset): reasons before_drift, drift, after_drift.",
    )
    low_confidence: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="Record windows whose top classification score is below this.",
    )
    keep_recent_s: float = Field(
        default=0.0, ge=0.0, le=7 * 86400.0,
        description="Keep every window this long (0: off) so that an operator label for a past "
        "period finds its windows; unlabelled ones are dropped after it.",
    )
    max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=64 * 1024,
        description="Stored window bytes for this pipeline; beyond, the oldest go (rolling-keep "
        "ones first).",
    )
    max_age_s: float = Field(
        default=14 * 86400.0, gt=0.0, description="Windows older than this are dropped."
    )


def _single_process(value: CaptureConfig | None, info: ValidationInfo) -> CaptureConfig | None:
    # The store is the daemon's (one SQLite writer per gateway): worker processes cannot reach it.
    workers: Any = info.data.get("workers", 1)
    if value is not None and isinstance(workers, int) and workers > 1:
        raise ValueError(
            f"capture: needs workers: 1 (windows are captured in the daemon's process; this "
            f"pipeline has workers: {workers}): remove capture or set workers: 1"
        )
    return value


CaptureField = Annotated[CaptureConfig | None, AfterValidator(_single_process)]
"""``PipelineConfig.capture``: declared after ``workers`` so the check can read it."""
