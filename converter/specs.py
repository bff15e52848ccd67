"""The manifest's input spec and heads, from the model card checked against the model's shapes.

The card says what the model cannot: names, units, labels, thresholds, how an autoencoder is
scored. This module matches it to what the loaded model actually has (its input and output
shapes, a normalization it carried itself) and refuses a mismatch before anything is exported.
An autoencoder's threshold may come from a percentile of calibration scores: it is left open
here (``HeadDraft.percentile``) and fixed by ``finish_heads`` once the data is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydantic import ValidationError

from floorline.converter.card import ModelCard
from floorline.converter.errors import CalibrationDataError, ModelCardError
from floorline.edge.bundle.manifest import (
    Feature,
    Head,
    InputSpec,
    Normalization,
    ReconstructionScore,
    ScoreMetric,
    Task,
)
from floorline.edge.stream.heads import reconstruction_scores

Shape = tuple[int | None, ...]


@dataclass(frozen=True)
class HeadDraft:
    """A head before an autoencoder's threshold is known."""

    name: str
    task: Task
    shape: list[int | None]
    labels: list[str] | None
    units: list[str] | None
    thresholds: dict[str, float]
    metric: ScoreMetric | None = None
    """Set for a reconstruction head: scored on the gateway."""
    threshold: float | None = None
    percentile: float | None = None


def _staged_input_spec(
    card: ModelCard, input_shape: Shape, normalization: tuple[list[float], list[float]] | None
) -> InputSpec:
    # The card's window and features are the raw window; the model takes the stage's features.
    stage = card.feature_stage()
    assert stage is not None  # noqa: S101 - card.preprocessing is set
    assert card.window is not None  # noqa: S101 - feature_stage() requires it
    assert card.features  # noqa: S101 - feature_stage() requires them
    width = len(stage.names)
    if len(input_shape) != 2 or input_shape[1] != width:
        raise ModelCardError(
            f"card preprocessing: the stage computes {width} features per window, but the model "
            f"takes inputs {input_shape}; a model on features takes (batch, {width})"
        )
    norm = card.normalization
    if normalization is not None:
        if norm is not None:
            raise ModelCardError(
                "card normalization: the model normalizes its inputs itself; remove "
                "normalization from the card"
            )
        norm = Normalization(mean=normalization[0], std=normalization[1])
    if norm is not None and len(norm.mean) != width:
        raise ModelCardError(
            f"card normalization: {len(norm.mean)} means for the stage's {width} features (it "
            "applies to the features, after the stage)"
        )
    try:
        return InputSpec(
            shape=[None, card.window, len(card.features)],
            window=card.window,
            features=card.features,
            normalization=norm,
            preprocessing=stage,
        )
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"]
        raise ModelCardError(f"model card does not fit the model: {msg}") from exc


def _input_spec(
    card: ModelCard, input_shape: Shape, normalization: tuple[list[float], list[float]] | None
) -> InputSpec:
    if card.preprocessing is not None:
        return _staged_input_spec(card, input_shape, normalization)
    if len(input_shape) not in (2, 3):
        raise ModelCardError(
            f"model input shape {input_shape}: a bundle takes (batch, features) or "
            "(batch, window, features) inputs"
        )
    n_features = input_shape[-1]
    window = input_shape[1] if len(input_shape) == 3 else 1
    if n_features is None or window is None:
        raise ModelCardError(f"model input shape {input_shape} must be fixed apart from the batch")
    if card.window is not None and card.window != window:
        raise ModelCardError(
            f"card window: {card.window}, but the model takes windows of {window} samples; "
            f"set window: {window} or leave it out"
        )
    features = card.features or [Feature(name=f"feature_{i}") for i in range(n_features)]
    if len(features) != n_features:
        raise ModelCardError(
            f"card features: {len(features)} named, but the model takes {n_features} per "
            "sample; name each, in the model's order"
        )
    norm = card.normalization
    if normalization is not None:
        if norm is not None:
            raise ModelCardError(
                "card normalization: the model normalizes its inputs itself (a Normalization or "
                "Rescaling layer, folded into the bundle); remove normalization from the card"
            )
        norm = Normalization(mean=normalization[0], std=normalization[1])
    if norm is not None and len(norm.mean) != n_features:
        raise ModelCardError(
            f"card normalization: {len(norm.mean)} means for the model's {n_features} features"
        )
    try:
        return InputSpec(
            shape=list(input_shape), window=window, features=features, normalization=norm
        )
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"]
        raise ModelCardError(f"model card does not fit the model: {msg}") from exc


def _check_width(key: str, values: list[str] | None, width: int | None, what: str) -> None:
    if values is not None and len(values) != width:
        raise ModelCardError(
            f"card {key}: {len(values)} {what} for the model's {width} outputs; give one per output"
        )


def _plain_head(
    key: str, name: str, task: Task, shape: Shape, labels: list[str] | None,
    units: list[str] | None, thresholds: dict[str, float],
) -> HeadDraft:
    if len(shape) != 2:
        raise ModelCardError(
            f"card {key}task: the model's output {name!r} has shape {shape}; "
            f"a {task.value} head "
            "takes (batch, outputs) (an output shaped like the input is an autoencoder: use "
            "task: anomaly with a score: section)"
        )
    _check_width(f"{key}labels", labels, shape[1], "labels")
    _check_width(f"{key}units", units, shape[1], "units")
    if task is Task.CLASSIFICATION and labels is None:
        raise ModelCardError(f"card {key}labels: a classification head needs its class names")
    if task is Task.ANOMALY and "anomaly" not in thresholds:
        raise ModelCardError(
            f"card {key}thresholds: an anomaly head needs thresholds: {{anomaly: V}}"
        )
    known = set(labels or []) | ({"anomaly"} if task is Task.ANOMALY else set())
    for label in thresholds:
        if label not in known:
            raise ModelCardError(
                f"card {key}thresholds: {label!r} is not one of {sorted(known)}; it would never "
                "fire"
            )
    return HeadDraft(name, task, list(shape), labels, units, dict(thresholds))


def build_specs(
    card: ModelCard,
    input_shape: Shape,
    output_shapes: list[Shape],
    output_names: list[str],
    normalization: tuple[list[float], list[float]] | None = None,
) -> tuple[InputSpec, list[HeadDraft]]:
    """The input spec and heads a bundle of this model gets, or ModelCardError."""
    spec = _input_spec(card, input_shape, normalization)
    if card.outputs:
        if len(card.outputs) != len(output_shapes):
            raise ModelCardError(
                f"card outputs: {len(card.outputs)} heads named, but the model has "
                f"{len(output_shapes)} outputs ({', '.join(output_names)}); describe each, in "
                "the model's order"
            )
        named = [h.name for h in card.outputs]
        if named != output_names and sorted(named) == sorted(output_names):
            # Same names, other order: each head would read another head's tensor, and parity
            # (source and artifact read the same way) could not tell.
            raise ModelCardError(
                f"card outputs: named {', '.join(named)}, but the model's outputs are "
                f"{', '.join(output_names)} in that order; list them in the model's order"
            )
        heads = [
            _plain_head(
                f"outputs[{i}].", head.name, head.task, shape, head.labels, head.units,
                head.thresholds,
            )
            for i, (head, shape) in enumerate(zip(card.outputs, output_shapes, strict=True))
        ]
        return spec, heads
    if len(output_shapes) != 1:
        raise ModelCardError(
            f"card outputs: the model has {len(output_shapes)} outputs "
            f"({', '.join(output_names)}); describe each under outputs: (name, task, labels or "
            "units) in the model's order"
        )
    shape = output_shapes[0]
    task = card.task or Task.REGRESSION
    if tuple(shape[1:]) == tuple(input_shape[1:]) and task is Task.ANOMALY:
        return spec, [_reconstruction_head(card, shape)]
    if card.score is not None:
        raise ModelCardError(
            f"card score: the model's output {shape} is not a reconstruction of its input "
            f"{input_shape}, so there is nothing to score; give thresholds: {{anomaly: V}} for "
            "a model that outputs its own anomaly score"
        )
    return spec, [
        _plain_head("", "output", task, shape, card.labels, card.units, dict(card.thresholds))
    ]


def _reconstruction_head(card: ModelCard, shape: Shape) -> HeadDraft:
    # An autoencoder: the output reconstructs the input; the gateway scores the difference.
    score = card.score
    metric: ScoreMetric = score.metric if score is not None else "mse"
    threshold = score.threshold if score is not None else None
    percentile = score.percentile if score is not None else None
    if threshold is None and percentile is None:
        threshold = card.thresholds.get("anomaly")
        if threshold is not None and not threshold > 0:
            raise ModelCardError(
                f"card thresholds.anomaly: {threshold:g} would flag every window of an "
                "autoencoder (a reconstruction error is never negative); give a threshold > 0"
            )
    if threshold is None and percentile is None:
        raise ModelCardError(
            "card score: the model is an autoencoder (its output has the input's shape); give "
            "score: {percentile: 99} (threshold from calibration data) or score: {threshold: V}"
        )
    return HeadDraft(
        "reconstruction", Task.ANOMALY, list(shape), None, None, {}, metric, threshold, percentile
    )


def finish_heads(
    drafts: list[HeadDraft],
    calibration: NDArray[np.float32] | None,
    reconstructions: list[NDArray[np.float32]] | None,
) -> list[Head]:
    """The manifest's heads: a percentile threshold set from the calibration data's scores.

    RECONSTRUCTIONS are the source model's outputs on CALIBRATION, per head (only needed when a
    head has a percentile).
    """
    heads = []
    for i, d in enumerate(drafts):
        score = None
        if d.metric is not None:
            threshold = d.threshold
            if threshold is None:
                assert d.percentile is not None  # noqa: S101 - _reconstruction_head sets one
                if calibration is None or reconstructions is None:
                    raise CalibrationDataError(
                        f"card score.percentile: {d.percentile:g} needs normal operating data "
                        "to take the percentile of: pass --calibration FILE (or give "
                        "score.threshold)"
                    )
                scores, _ = reconstruction_scores(calibration, reconstructions[i], d.metric)
                threshold = float(np.percentile(scores.astype(np.float64), d.percentile))
                if not threshold > 0 or not np.isfinite(threshold):
                    # 0: the model reconstructs the calibration data exactly; NaN or inf: it
                    # cannot. Either way the threshold would flag every window or none.
                    raise CalibrationDataError(
                        f"card score.percentile: p{d.percentile:g} of the calibration data's "
                        f"{d.metric} is {threshold:g}; no usable threshold (give "
                        "score.threshold, or check the model and the calibration data)"
                    )
            score = ReconstructionScore(
                metric=d.metric, threshold=threshold, percentile=d.percentile
            )
        heads.append(
            Head(
                name=d.name, task=d.task, shape=d.shape, labels=d.labels, units=d.units,
                thresholds=d.thresholds, score=score,
            )
        )
    return heads
