"""A pipeline's shadow model: a candidate run on the primary's windows, compared, reported.

The shadow never affects the primary. The pipeline's worker runs it on a batch only after the
primary's predictions for that batch were handed to the publish path, on one batch in
``shadow.every``. Its failures (an inference that raises, outputs of the wrong shape, even a bug
here) are counted and reported (``failures``, ``last_failure``), never dead-lettered: the input
was fine, the primary predicted it. A shadow slower than the primary delays the worker by its
inference time on the batches it runs; ``every`` is the knob, and the report gives both models'
inference times so the cost is visible.

Each model normalizes the raw windows with its own manifest's normalization, and a shadow must
take the same input (window length, features in the same order): ``check_shadow_fit``, at build.

The statistics (``stream.shadow.ShadowStats``) are cumulative since the pipeline was built, and
published retained on ``shadow.report_topic`` every ``shadow.report_interval_s`` and once more
when the worker stops (``"running": false``), through the daemon's publish path, like the state
document, not through the outbox: each report replaces the one before. With
``publish_predictions`` the shadow's predictions go out too, encoded as the primary's are, on
``shadow.topic`` at QoS 0, each marked ``"shadow": true``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from floorline.edge.bundle.manifest import Manifest
from floorline.edge.bundle.selftest import LoadedModel
from floorline.edge.config.model import ShadowConfig
from floorline.edge.errors import ConfigError
from floorline.edge.messages import Outbound
from floorline.edge.stream.encode import PredictionEncoder
from floorline.edge.stream.heads import HeadLayout
from floorline.edge.stream.normalization import model_input
from floorline.edge.stream.shadow import ShadowStats
from floorline.edge.stream.window import Window

log = logging.getLogger(__name__)

Send = Callable[[Sequence[Outbound]], None]

_TIMINGS = 512  # recent shadow inference times kept for the p95
_LOG_EVERY_S = 10.0
_FAILURE_MAX = 200  # characters of the last failure in reports
_MARK = b',"shadow":true}'


def check_shadow_fit(primary: Manifest, shadow: Manifest) -> None:
    """Raise ConfigError (at ``shadow.bundle``) unless SHADOW takes PRIMARY's input.

    The same window length and the same features in the same order; the normalization may
    differ (each model applies its own).
    """
    a, b = primary.input, shadow.input
    if a.window != b.window:
        raise ConfigError(
            f"shadow.bundle: {shadow.name} {shadow.version} takes windows of {b.window} samples, "
            f"the pipeline's model {primary.name} {primary.version} {a.window}; a shadow must "
            "run on the same windows"
        )
    fa, fb = [f.name for f in a.features], [f.name for f in b.features]
    if fa != fb:
        raise ConfigError(
            f"shadow.bundle: {shadow.name} {shadow.version} takes features "
            f"{', '.join(fb)}; the pipeline's model {primary.name} {primary.version} takes "
            f"{', '.join(fa)}; a shadow must take the same features in the same order"
        )


def model_facts(model: LoadedModel) -> dict[str, str]:
    """Name, version, artifact, sha256 and runtime of MODEL, for reports."""
    m = model.bundle.manifest
    return {
        "name": m.name,
        "version": m.version,
        "artifact": model.artifact.file,
        "sha256": model.artifact.sha256,
        "runtime": model.backend.runtime,
    }


class ShadowRunner:
    """Runs, compares and reports one pipeline's shadow model (on the pipeline's worker)."""

    def __init__(
        self,
        config: ShadowConfig,
        model: LoadedModel,
        primary: LoadedModel,
        *,
        gateway: str,
        pipeline: str,
        labels: list[str] | None,
        thresholds: dict[str, float] | None,
        submit: Send,
        report: Send,
    ) -> None:
        manifest = model.bundle.manifest
        check_shadow_fit(primary.bundle.manifest, manifest)
        self.config = config
        self.model = model
        self._gateway = gateway
        self._pipeline = pipeline
        self._spec = manifest.input
        self._flat = len(self._spec.shape) == 2
        self._layout = HeadLayout(manifest)
        self._submit = submit
        self._report = report
        self.stats = ShadowStats(primary.bundle.manifest, manifest, labels=labels,
                                 thresholds=thresholds)
        self._primary = model_facts(primary)
        self._shadow = model_facts(model)
        self._encoder = (
            PredictionEncoder(gateway=gateway, pipeline=pipeline, manifest=manifest,
                              artifact=model.artifact, topic_template=config.topic)
            if config.publish_predictions else None
        )
        self.report_topic = config.report_topic.format(gateway=gateway, pipeline=pipeline)
        self._every = config.every
        self._interval = config.report_interval_s
        self._next_report = time.monotonic() + self._interval
        self._started = time.time()
        self.seen = 0  # primary batches
        self.batches = 0  # shadow inferences that succeeded
        self.skipped = 0  # primary batches the shadow left out (every)
        self.windows = 0  # windows compared
        self.failures = 0  # shadow batches that failed
        self.failed_windows = 0
        self.last_failure: str | None = None
        self.predictions = 0
        self.reports = 0
        self._ms_sum = 0.0
        self._primary_ms_sum = 0.0
        self._recent: deque[float] = deque(maxlen=_TIMINGS)
        self._failures_logged = 0
        self._log_at = 0.0

    # -- worker thread ----------------------------------------------------------------------

    def run(
        self, batch: list[Window], raw: NDArray[np.float32], primary: NDArray[np.float32],
        primary_ms: float,
    ) -> None:
        """Run the shadow on BATCH (RAW: its stacked windows) and compare with PRIMARY's values.

        Never raises: whatever fails is counted as a shadow failure.
        """
        self.seen += 1
        if (self.seen - 1) % self._every:
            self.skipped += 1
            return
        try:
            x = raw.reshape(len(batch), -1) if self._flat else raw
            x = model_input(x, self._spec)
            start = time.perf_counter()
            out = self.model.backend.infer(x)
            ms = (time.perf_counter() - start) * 1e3
            values = self._layout.values(x, out)
            self.stats.add(primary, values)
        except Exception as exc:  # noqa: BLE001 - the shadow's failure is counted, never the input's
            self._failed(exc, len(batch))
            return
        self.batches += 1
        self.windows += len(batch)
        self._ms_sum += ms
        self._primary_ms_sum += primary_ms
        self._recent.append(ms)
        if self._encoder is not None:
            try:
                payloads = self._encoder.encode_batch(batch, values, inference_ms=ms,
                                                      now=time.monotonic())
                self._submit([
                    Outbound(self._encoder.topic(w.asset), p[:-1] + _MARK, 0, False)
                    for w, p in zip(batch, payloads, strict=True)
                ])
                self.predictions += len(payloads)
            except Exception as exc:  # noqa: BLE001 - as any shadow failure
                self._failed(exc, 0)

    def _failed(self, exc: Exception, windows: int) -> None:
        self.failures += 1
        self.failed_windows += windows
        self.last_failure = f"{type(exc).__name__}: {exc}"[:_FAILURE_MAX]
        now = time.monotonic()
        if now >= self._log_at:
            log.warning(
                "pipeline %s: shadow %s %s failed (%d failures in all; the primary is not "
                "affected): %s", self._pipeline, self._shadow["name"], self._shadow["version"],
                self.failures, self.last_failure,
            )
            self._failures_logged = self.failures
            self._log_at = now + _LOG_EVERY_S

    def maybe_report(self, now: float) -> None:
        """Publish the report if it is due (called every worker turn)."""
        if now >= self._next_report:
            self._next_report = now + self._interval
            self.publish(running=True)

    def publish(self, *, running: bool) -> None:
        """Publish the report now (retained, QoS 1, not kept in the outbox). Never raises."""
        try:
            payload = orjson.dumps(self.document(running=running))
            self._report([Outbound(self.report_topic, payload, 1, True)])
            self.reports += 1
        except Exception:  # a report that cannot go out must not end the worker
            log.exception("pipeline %s: could not publish the shadow report", self._pipeline)

    # -- any thread -------------------------------------------------------------------------

    def document(self, *, running: bool = True) -> dict[str, Any]:
        """The shadow report (docs/config.md, "Shadow models")."""
        recent = sorted(self._recent)  # in C, under the GIL: the worker cannot append meanwhile
        p95 = recent[min(len(recent) - 1, int(0.95 * len(recent)))] if recent else None
        doc: dict[str, Any] = {
            "gateway": self._gateway,
            "pipeline": self._pipeline,
            "ts": time.time(),
            "since": self._started,
            "running": running,
            "primary": self._primary,
            "shadow": self._shadow,
            "every": self._every,
            "batches": self.batches,
            "skipped_batches": self.skipped,
            "windows": self.windows,
            "failures": self.failures,
            "failed_windows": self.failed_windows,
            "last_failure": self.last_failure,
            "inference_ms": {
                "mean": round(self._ms_sum / self.batches, 3) if self.batches else None,
                "p95": round(p95, 3) if p95 is not None else None,
                "primary_mean": (
                    round(self._primary_ms_sum / self.batches, 3) if self.batches else None
                ),
            },
            "predictions_published": self.predictions,
        }
        doc.update(self.stats.report())
        return doc

    def counters(self) -> dict[str, int]:
        """Flat counters for stats and metrics."""
        return {
            "shadow_windows": self.windows,
            "shadow_batches": self.batches,
            "shadow_skipped_batches": self.skipped,
            "shadow_failures": self.failures,
        }
