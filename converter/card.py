"""Model metadata: a small YAML model card, overridden by command-line flags.

The card says what the converter cannot read from the model: the task, feature names and units,
normalization, labels, thresholds. It is checked against the model's shapes before any export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from floorline.converter.errors import ModelCardError
from floorline.edge.bundle.manifest import Feature, InputSpec, Normalization, OutputSpec, Task


class ModelCard(BaseModel):
    """What a bundle's manifest says about the model beyond its artifacts."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Bundle name, a lowercase slug like 'pdm-classifier'.")
    version: str = Field(default="0.1.0", description="Semantic version of this model.")
    task: Task = Field(description="classification, regression or anomaly.")
    description: str = ""
    window: int | None = Field(
        default=None, description="Samples per window; must match the model's input shape."
    )
    features: list[Feature] | None = Field(
        default=None, description="Input features in model order, with units."
    )
    normalization: Normalization | None = Field(
        default=None, description="Per-feature mean and std applied on the gateway."
    )
    labels: list[str] | None = Field(default=None, description="Class names in output order.")
    thresholds: dict[str, float] = Field(default_factory=dict)


def load_card(path: Path | None, overrides: dict[str, Any]) -> ModelCard:
    """Read the YAML card at PATH (if any) and apply non-None OVERRIDES on top."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ModelCardError(f"{path}: cannot read model card: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ModelCardError(f"{path}: a model card must be a YAML mapping")
        data.update(loaded or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    origin = str(path) if path else "model metadata flags"
    if "name" not in data or "task" not in data:
        raise ModelCardError(
            f"{origin}: a model needs a name and a task (--name, --task or a card)"
        )
    try:
        return ModelCard.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ModelCardError(f"{origin}: {where}: {first['msg']}") from exc


def build_specs(
    card: ModelCard,
    input_shape: tuple[int | None, ...],
    output_shape: tuple[int | None, ...],
) -> tuple[InputSpec, OutputSpec]:
    """The manifest's input and output specs, from the card checked against the model's shapes."""
    if len(input_shape) not in (2, 3):
        raise ModelCardError(
            f"model input shape {input_shape}: a bundle takes (batch, features) or "
            "(batch, window, features) inputs"
        )
    if len(output_shape) != 2:
        raise ModelCardError(f"model output shape {output_shape}: expected (batch, outputs)")
    n_features = input_shape[-1]
    window = input_shape[1] if len(input_shape) == 3 else 1
    if n_features is None or window is None:
        raise ModelCardError(f"model input shape {input_shape} must be fixed apart from the batch")
    if card.window is not None and card.window != window:
        raise ModelCardError(f"card window {card.window} but the model takes {window} samples")
    features = card.features or [Feature(name=f"feature_{i}") for i in range(n_features)]
    if len(features) != n_features:
        raise ModelCardError(f"card names {len(features)} features; the model takes {n_features}")
    if card.task is Task.CLASSIFICATION and card.labels is None:
        raise ModelCardError("a classification model needs labels (card 'labels' or --labels)")
    if card.labels is not None and len(card.labels) != output_shape[1]:
        raise ModelCardError(
            f"card names {len(card.labels)} labels; the model has {output_shape[1]} outputs"
        )
    try:
        return (
            InputSpec(
                shape=list(input_shape),
                window=window,
                features=features,
                normalization=card.normalization,
            ),
            OutputSpec(shape=list(output_shape), labels=card.labels, thresholds=card.thresholds),
        )
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"]
        raise ModelCardError(f"model card does not fit the model: {msg}") from exc
