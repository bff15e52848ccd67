"""Whether a pipeline's config fits its model: what only the bundle's manifest can tell.

The config models check everything a file alone decides. The window length, the model's task,
its outputs and labels come from the bundle, so these checks run when a pipeline is built, by
``floorline check`` and by whatever builds pipelines to run them. The decoder's fit to the
features is its own constructor's check (``decoders.make_decoder``). Every message starts with
the key it is about, so ``Config.pipeline_error`` reports it at that key's line.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from floorline.edge.errors import ConfigError

if TYPE_CHECKING:
    from floorline.edge.bundle.manifest import Manifest
    from floorline.edge.config.model import PipelineConfig


def check_fit(pipeline: PipelineConfig, manifest: Manifest) -> None:
    """Raise ConfigError where PIPELINE's settings cannot work with MANIFEST's model.

    Checked: ``window.hop`` against the window length; ``labels`` and ``thresholds`` against the
    task, the outputs and the labels (a threshold for a label the model does not have would
    never fire).
    """
    size = manifest.input.window
    hop = pipeline.window.hop
    if hop is not None and hop > size:
        raise ConfigError(
            f"window.hop: {hop} is larger than the model's window of {size} samples "
            f"(1 to {size}); windows would skip samples"
        )
    heads = manifest.heads
    if len(heads) > 1:
        # Which head a label or threshold would belong to is ambiguous; the card sets them.
        for key, value in (("labels", pipeline.labels), ("thresholds", pipeline.thresholds)):
            if value is not None:
                raise ConfigError(
                    f"{key}: the model has {len(heads)} heads "
                    f"({', '.join(h.name for h in heads)}); their {key} come from the bundle "
                    "(set them in the model card when converting)"
                )
        return
    head = heads[0]
    task = head.task.value
    outputs = head.shape[-1]
    if head.score is not None and pipeline.labels is not None:
        raise ConfigError("labels: the model is an autoencoder scored on the gateway; no labels")
    if pipeline.labels is not None:
        if task != "classification":
            raise ConfigError(
                f"labels: the model is a {task} model; labels name classification outputs and "
                "would be ignored"
            )
        if len(pipeline.labels) != outputs:
            raise ConfigError(
                f"labels: {len(pipeline.labels)} labels for the model's {outputs} outputs"
            )
    if pipeline.thresholds is None:
        return
    if task == "classification":
        labels = pipeline.labels if pipeline.labels is not None else head.labels
        if not labels:
            raise ConfigError("thresholds: the model has no labels for thresholds to name")
        known = list(labels)
    elif task == "anomaly":
        known = ["anomaly"]
    else:
        raise ConfigError(f"thresholds: a {task} model has no thresholds; they would be ignored")
    for name, limit in pipeline.thresholds.items():
        if head.score is not None and name == "anomaly" and not limit > 0:
            raise ConfigError(
                f"thresholds: anomaly {limit} would flag every window; a reconstruction error "
                "is never negative (give a threshold > 0)"
            )
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(
                f"thresholds: {name!r} is not a label of the model{hint} "
                f"(labels: {', '.join(known)}); it would never fire"
            )
