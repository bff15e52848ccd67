"""What the gateway says about itself: the retained state document and the stats snapshot."""

from __future__ import annotations

import time
from collections.abc import Sequence

import orjson

from floorline.edge import __version__
from floorline.edge.daemon.pipeline import Pipeline
from floorline.edge.service.metrics import BundleInfo


def pipeline_models(pipelines: Sequence[Pipeline]) -> list[dict[str, str]]:
    """Which model each pipeline runs, for state reports."""
    return [
        {
            "name": p.name,
            "model": p.model.bundle.manifest.name,
            "version": p.model.bundle.manifest.version,
            "artifact": p.model.artifact.file,
            "sha256": p.model.artifact.sha256,
            "runtime": p.model.backend.runtime,
        }
        for p in pipelines
    ]


def bundle_info(pipelines: Sequence[Pipeline]) -> list[BundleInfo]:
    """The same facts in the shape the metrics' info series take."""
    return [
        {
            "pipeline": p.name,
            "name": p.model.bundle.manifest.name,
            "version": p.model.bundle.manifest.version,
            "sha256": p.model.artifact.sha256,
            "artifact": p.model.artifact.file,
            "runtime": p.model.backend.runtime,
        }
        for p in pipelines
    ]


def state_document(
    gateway: str, state: str, pipelines: Sequence[Pipeline], reason: str | None = None
) -> bytes:
    """The retained state message: its STATE, version, models, and REASON when not online.

    ``online``: connected and every worker and the network thread healthy. ``degraded``:
    connected, but a worker or the network thread is dead or stalled (REASON says which;
    ``floorline run`` exits soon after). ``offline``: stopped, or the broker's last will.
    """
    doc: dict[str, object] = {
        "state": state,
        "gateway": gateway,
        "floorline": __version__,
        "ts": time.time(),
        "pipelines": pipeline_models(pipelines),
    }
    if reason:
        doc["reason"] = reason
    return orjson.dumps(doc)
