"""The daemon's side of capture: one store per gateway, the label command, stats.

Label commands (``topics.capture_label``, by default ``floorline/{gateway}/capture/label``,
JSON)::

    {"asset": "pump-07", "from": 1764470000, "to": 1764473600, "label": "bearing_outer_race"}
    {"asset": "pump-07", "last_s": 3600, "label": "bearing_outer_race", "pipeline": "vibration"}

``from``/``to``: epoch seconds or ISO 8601 times (UTC unless they say otherwise); ``last_s``: the
period ending now. The label goes to every stored window of that asset (of ``pipeline`` if named)
whose end time falls in the period, and to windows still to come in it. Labels are not signed
(docs/monitoring.md, Data capture): they change no model, config or prediction, only which
stored windows carry which name, so the broker's ACL on this topic is the control, as for the
input topics whose data the model predicts on.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from floorline.edge.bundle.manifest import Manifest
from floorline.edge.capture.config import LABEL_TOPIC, CaptureConfig
from floorline.edge.capture.policy import Capture
from floorline.edge.capture.store import QUEUE_WINDOWS, CaptureStore, Label

log = logging.getLogger(__name__)

STORE_FILE = "capture.sqlite"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_MAX_LABEL_PAYLOAD = 4096
_MAX_PERIOD_S = 31 * 86400.0


class LabelError(ValueError):
    """A label command that cannot be applied; the message says what to fix."""


def _time(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise LabelError(f"{key}: expected epoch seconds or an ISO 8601 time, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if t.tzinfo is None:
                t = t.replace(tzinfo=dt.timezone.utc)
            return t.timestamp()
    raise LabelError(f"{key}: expected epoch seconds or an ISO 8601 time, got {value!r}")


def parse_label(payload: bytes, now: float) -> Label:
    """A label command's payload as a ``Label``; raises ``LabelError`` saying what is wrong."""
    if len(payload) > _MAX_LABEL_PAYLOAD:
        raise LabelError(f"payload over {_MAX_LABEL_PAYLOAD} bytes")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise LabelError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise LabelError('expected an object: {"asset": ..., "from": ..., "to": ..., "label": ...}')
    unknown = set(doc) - {"asset", "from", "to", "last_s", "label", "pipeline"}
    if unknown:
        raise LabelError(f"unknown keys {sorted(unknown)}; use asset, from, to (or last_s), "
                         "label, pipeline")
    for key in ("asset", "label"):
        if not isinstance(doc.get(key), str) or not _NAME.fullmatch(doc[key]):
            raise LabelError(f"{key}: a name of letters, digits, '_', '.', ':' or '-' is needed")
    pipeline = doc.get("pipeline")
    if pipeline is not None and (not isinstance(pipeline, str) or not _NAME.fullmatch(pipeline)):
        raise LabelError("pipeline: a pipeline name, or leave it out for every pipeline")
    if "last_s" in doc:
        if "from" in doc or "to" in doc:
            raise LabelError("give either last_s or from/to, not both")
        last = doc["last_s"]
        if isinstance(last, bool) or not isinstance(last, int | float) or last <= 0:
            raise LabelError("last_s: a positive number of seconds")
        t0, t1 = now - float(last), now
    else:
        if "from" not in doc or "to" not in doc:
            raise LabelError("from and to (or last_s) are needed")
        t0, t1 = _time(doc["from"], "from"), _time(doc["to"], "to")
    if not t0 <= t1:
        raise LabelError(f"from ({t0}) is after to ({t1})")
    if t1 - t0 > _MAX_PERIOD_S:
        raise LabelError(f"the period is over {_MAX_PERIOD_S / 86400:.0f} days")
    return Label(doc["asset"], t0, t1, doc["label"], pipeline)


class CaptureService:
    """Capture for one daemon: the store (opened at the first pipeline with ``capture``)."""

    def __init__(self, state_dir: Path, gateway: str, *, topic: str = LABEL_TOPIC,
                 queue_windows: int = QUEUE_WINDOWS) -> None:
        self.path = state_dir / STORE_FILE
        self.gateway = gateway
        self.topic = topic.format(gateway=gateway)
        """The label command's topic (TOPIC, the ``topics.capture_label`` template, filled)."""
        self.store: CaptureStore | None = None
        self.labels = Counter[str]()
        self._queue_windows = queue_windows

    def policy(self, config: CaptureConfig | None, *, pipeline: str, manifest: Manifest,
               sha256: str, labels: list[str] | None = None,
               thresholds: dict[str, float] | None = None) -> Capture | None:
        """The ``Capture`` for a pipeline built with CONFIG (None without ``capture``)."""
        if config is None:
            return None
        if self.store is None:
            self.store = CaptureStore(self.path, queue_windows=self._queue_windows)
        self.store.open()
        return Capture(config, self.store, gateway=self.gateway, pipeline=pipeline,
                       manifest=manifest, sha256=sha256, labels=labels, thresholds=thresholds)

    def on_label(self, topic: str, payload: bytes) -> None:
        """The label command's route (paho's thread): parse, then queue for the writer."""
        try:
            label = parse_label(payload, time.time())
        except LabelError as exc:
            self.labels["refused"] += 1
            log.warning("capture: label command on %s refused: %s", topic, exc)
            return
        if self.store is None:
            self.labels["refused"] += 1
            log.warning("capture: label command on %s refused: no pipeline has a capture block",
                        topic)
            return
        if self.store.put(label):
            self.labels["accepted"] += 1
        else:
            self.labels["refused"] += 1
            log.warning("capture: label command on %s dropped: the capture queue is full", topic)

    def stats(self) -> dict[str, object] | None:
        """The store's facts for ``Daemon.stats()`` (None when no pipeline captures)."""
        if self.store is None:
            return None
        return {
            "file": str(self.path),
            "error": self.store.error,
            "queued": self.store.queue.qsize(),
            "dropped": dict(self.store.dropped),
            "labels": dict(self.labels),
            "labels_applied": self.store.labels_applied,
            "pipelines": self.store.stats(),
        }

    def close(self) -> None:
        """Write what is queued and close the store (after the pipelines stopped)."""
        if self.store is not None:
            self.store.close()
