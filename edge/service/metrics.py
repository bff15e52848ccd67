"""Metrics: an optional Prometheus endpoint and a compact JSON stats message.

Cheap on the hot path by design. Counters are not kept twice: the daemon already counts
everything (``Daemon.stats()``: per-pipeline ``Counter`` objects, outbox and connection facts), so
a custom collector reads those *at scrape time*. Only latency and batch-size distributions are
new, and the pipeline records them once per batch (``observe_batch``), not per message, into
plain bucket arrays under one lock. prometheus-client is needed only for the HTTP endpoint
(``pip install 'floorline[metrics]'``); the JSON stats message works without it.

    metrics = Metrics(daemon.stats, bundles=..., gateway=config.gateway.id)
    metrics.observe_batch("vibration", size=4, inference_s=0.0004, e2e_s=[0.003, 0.002, ...])
    server = metrics.start_http("127.0.0.1", 9108)        # GET /metrics; server.stop()
    transport.publish(stats_topic, metrics.stats_message(), 0, False)   # or StatsReporter

Series (all ``floorline_``; counters end in ``_total``), per ``pipeline`` unless noted:
``messages_received``, ``messages_decoded``, ``messages_dropped`` (inbox full),
``dead_letters`` {pipeline, reason}, ``windows``, ``batches``, ``predictions``,
``shadow_windows``, ``shadow_failures`` (counters);
``inbox_messages``, ``pending_samples`` (gauges); ``batch_size``, ``inference_seconds``,
``end_to_end_seconds`` (histograms); and gateway-wide ``outbox_messages``, ``outbox_bytes``,
``outbox_degraded`` (gauges), ``outbox_dropped`` {reason}, ``published``, ``delivered``,
``unroutable``, ``mqtt_reconnects`` (counters), ``mqtt_connected`` (gauge),
``bundle_info`` {pipeline, name, version, sha256, artifact, runtime}; with drift detection
(``stream.drift``) ``drift_score``, ``drift_windows``, ``drift_active``, ``drift_psi`` and
``drift_ks`` {pipeline, feature, statistic}, ``drift_output_psi`` {pipeline, output} (gauges),
``drift_alerts`` (counter); with data capture (``floorline.edge.capture``)
``capture_windows`` {pipeline, reason}, ``capture_dropped`` {pipeline, reason},
``capture_evicted`` {pipeline, reason}, ``capture_errors``, ``capture_label_commands``
{result}, ``capture_labels_applied`` (counters), ``capture_stored_windows``,
``capture_stored_bytes`` (gauges, per pipeline), ``capture_queue_windows``,
``capture_unavailable`` (gauges). ``METRIC_NAMES``, ``DRIFT_METRIC_NAMES`` and
``CAPTURE_METRIC_NAMES`` list them as exposed. A pipeline replaced at run time starts its
counters from zero again, which Prometheus' ``rate()`` treats as a counter reset (capture's
are the store's and survive a reload).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

import orjson
from pydantic import BaseModel, ConfigDict, Field

from floorline.edge.errors import FloorlineError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "CAPTURE_METRIC_NAMES",
    "DRIFT_METRIC_NAMES",
    "END_TO_END_BUCKETS_S",
    "INFERENCE_BUCKETS_S",
    "METRIC_NAMES",
    "BundleInfo",
    "Metrics",
    "MetricsConfig",
    "MetricsServer",
    "PrometheusConfig",
    "StatsReporter",
]

# -- configuration ---------------------------------------------------------------------------


class _Strict(BaseModel):
    # The same rules as floorline.edge.config.model's models (which this module must not import:
    # config imports us).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PrometheusConfig(_Strict):
    """The Prometheus scrape endpoint."""

    enabled: bool = Field(
        default=False, description="Serve /metrics (needs pip install 'floorline[metrics]')."
    )
    bind: str = Field(
        default="127.0.0.1",
        description="Address to listen on. The default is local only; use 0.0.0.0 to let a "
        "Prometheus elsewhere scrape (the endpoint has no authentication).",
    )
    port: int = Field(default=9108, ge=1, le=65535, description="TCP port of the endpoint.")


class MetricsConfig(_Strict):
    """Metrics for monitoring: a Prometheus endpoint and a periodic MQTT stats message."""

    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig)
    stats_interval_s: float = Field(
        default=30.0,
        ge=0,
        description="Seconds between compact JSON stats messages on floorline/{gateway}/stats; "
        "0 disables them.",
    )


# -- histograms ------------------------------------------------------------------------------

INFERENCE_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)
"""Inference time per batch: from a tiny model's 0.1 ms to a struggling gateway's seconds."""

END_TO_END_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
"""Message that completed a window received → its prediction encoded (the ``end_to_end`` of the
prediction message): inbox backlog, the batcher's max_wait_ms and inference. Not the broker."""

BATCH_SIZE_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
"""Windows per inference call."""


class _Histogram:
    """Bucket counts, sum and count; the caller holds the lock."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, i.e. Prometheus' "le" (less than or equal).
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((_le(bound), float(total)))
        return out


def _le(bound: float) -> str:
    # Prometheus' own spelling of bucket bounds ("+Inf", "0.005", "1.0").
    return "+Inf" if bound == float("inf") else repr(float(bound))


class _PipelineHistograms:
    __slots__ = ("batch", "e2e", "inference")

    def __init__(self) -> None:
        self.batch = _Histogram(BATCH_SIZE_BUCKETS)
        self.inference = _Histogram(INFERENCE_BUCKETS_S)
        self.e2e = _Histogram(END_TO_END_BUCKETS_S)


# -- the metrics -----------------------------------------------------------------------------


class BundleInfo(TypedDict):
    """What a pipeline runs; exposed as ``floorline_bundle_info`` (value 1)."""

    pipeline: str
    name: str
    version: str
    sha256: str
    artifact: str
    runtime: str


_PIPELINE_COUNTERS = (
    # (series, Daemon.stats()["pipelines"][name] key, help)
    ("messages_received", "received", "Messages offered to the pipeline (before the inbox)."),
    ("messages_decoded", "decoded", "Messages decoded into samples."),
    ("messages_dropped", "dropped_inbox_full", "Messages dropped because the inbox was full."),
    ("messages_shed", "shed",
     "Messages shed on overload: whole assets at a time (limits.overload: shed_assets)."),
    ("windows", "windows", "Windows completed."),
    ("batches", "batches", "Inference calls (batches)."),
    ("predictions", "predictions", "Predictions handed to the publisher."),
    ("shadow_windows", "shadow_windows", "Windows the pipeline's shadow model was compared on."),
    ("shadow_failures", "shadow_failures",
     "Shadow model batches that failed (the pipeline's predictions are not affected)."),
)
_PIPELINE_GAUGES = (
    ("inbox_messages", "queued", "Messages waiting in the inbox."),
    ("pending_samples", "pending_samples", "Samples held towards the next windows."),
    ("shed_assets", "shed_assets", "Assets whose messages are being shed now (overload)."),
)
_DRIFT_GAUGES = (
    # (series and Daemon.stats()["pipelines"][name]["drift"] key, help); stream.drift
    ("drift_score", "Input drift score: the largest measure over the input statistics."),
    ("drift_windows", "Windows in the drift period judged."),
)
_HISTOGRAMS = (
    ("batch_size", "Windows per inference call."),
    ("inference_seconds", "Inference time per batch."),
    ("end_to_end_seconds", "Completing message received to prediction encoded, per window."),
)

METRIC_NAMES: frozenset[str] = frozenset(
    [f"floorline_{s}_total" for s, _, _ in _PIPELINE_COUNTERS]
    + ["floorline_dead_letters_total"]
    + [f"floorline_{s}" for s, _, _ in _PIPELINE_GAUGES]
    + [f"floorline_{h}_{suffix}" for h, _ in _HISTOGRAMS for suffix in ("bucket", "sum", "count")]
    + [
        "floorline_outbox_messages",
        "floorline_outbox_bytes",
        "floorline_outbox_degraded",
        "floorline_outbox_dropped_total",
        "floorline_published_total",
        "floorline_delivered_total",
        "floorline_unroutable_total",
        "floorline_mqtt_reconnects_total",
        "floorline_mqtt_connected",
        "floorline_bundle_info",
    ]
)
"""Every sample name the endpoint exposes (dashboards and alerts may use only these and, with
drift detection, ``DRIFT_METRIC_NAMES``)."""

DRIFT_METRIC_NAMES: frozenset[str] = frozenset(
    [f"floorline_{s}" for s, _ in _DRIFT_GAUGES]
    + ["floorline_drift_active", "floorline_drift_psi", "floorline_drift_ks",
       "floorline_drift_output_psi", "floorline_drift_alerts_total"]
)
"""Sample names exposed besides METRIC_NAMES while a pipeline runs drift detection."""

_CAPTURE_COUNTERS = (
    # (series {pipeline, reason}, Daemon.stats()["capture"]["pipelines"][name] key prefix, help)
    ("capture_dropped", "dropped_",
     ("Windows chosen for capture but never stored: queue_full, disk_full, unavailable, "
      "write_failed.")),
    ("capture_evicted", "evicted_",
     "Stored windows removed by a bound: max_bytes, max_age, keep_recent, disk_full."),
)
CAPTURE_METRIC_NAMES: frozenset[str] = frozenset(
    [f"floorline_{s}_total" for s, _, _ in _CAPTURE_COUNTERS]
    + ["floorline_capture_windows_total", "floorline_capture_errors_total",
       "floorline_capture_stored_windows", "floorline_capture_stored_bytes",
       "floorline_capture_queue_windows", "floorline_capture_unavailable",
       "floorline_capture_label_commands_total", "floorline_capture_labels_applied_total"]
)
"""Sample names exposed besides METRIC_NAMES while a pipeline captures windows."""


def _num(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


class Metrics:
    """The gateway's metrics: reads counters from STATS_SOURCE, owns the latency histograms.

    STATS_SOURCE returns a dict shaped like ``Daemon.stats()``; it is called at scrape time and
    for each stats message, from the scraping thread. BUNDLES, if given, returns what each
    pipeline runs (read at scrape time too, so a bundle switched at run time shows at once).
    The Prometheus registry is this object's own, never the process-global one, so several
    daemons (or tests) in one process do not collide.
    """

    def __init__(
        self,
        stats_source: Callable[[], Mapping[str, Any]],
        *,
        bundles: Callable[[], Iterable[BundleInfo]] | None = None,
        gateway: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._stats_source = stats_source
        self._bundles = bundles
        self._gateway = gateway
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._hist: dict[str, _PipelineHistograms] = {}
        self._registry: CollectorRegistry | None = None
        self._started = clock()
        # The previous stats message's totals, for rates and interval averages.
        self._prev_at = self._started
        self._prev: dict[str, dict[str, float]] = {}

    # -- hot path (worker threads) -----------------------------------------------------------

    def observe_batch(
        self, pipeline: str, size: int, inference_s: float, e2e_s: Iterable[float] = ()
    ) -> None:
        """Record one batch: its size, its inference time and each window's end-to-end latency.

        Called by a pipeline's worker once per batch; takes one uncontended lock.
        """
        with self._lock:
            h = self._hist.get(pipeline)
            if h is None:
                h = self._hist[pipeline] = _PipelineHistograms()
            h.batch.observe(size)
            h.inference.observe(inference_s)
            for latency in e2e_s:
                h.e2e.observe(latency)

    # -- Prometheus ------------------------------------------------------------------------

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry of this Metrics alone (created on first use)."""
        if self._registry is None:
            prometheus_client = _prometheus()
            registry = prometheus_client.CollectorRegistry(auto_describe=False)
            registry.register(_Collector(self))
            self._registry = registry
        return self._registry

    def start_http(self, bind: str = "127.0.0.1", port: int = 9108) -> MetricsServer:
        """Serve ``/metrics`` on BIND:PORT (0 picks a free port) in a daemon thread.

        Raises FloorlineError when prometheus-client is missing or the address is unusable.
        """
        prometheus_client = _prometheus()
        try:
            httpd, thread = prometheus_client.start_http_server(port, bind, self.registry)
        except OSError as exc:
            raise FloorlineError(
                f"metrics: cannot listen on {bind}:{port}: {exc.strerror or exc}"
            ) from exc
        server = MetricsServer(httpd, thread)
        log.info("Prometheus metrics on http://%s:%d/metrics", bind, server.port)
        return server

    def collect(self) -> Iterator[Metric]:
        """The metric families, read now (what a scrape returns)."""
        from prometheus_client.metrics_core import (  # noqa: PLC0415 - optional extra
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        stats = self._read_stats()
        pipelines = _mapping(stats.get("pipelines"))
        for series, key, doc in _PIPELINE_COUNTERS:
            c = CounterMetricFamily(f"floorline_{series}", doc, labels=["pipeline"])
            for name, p in pipelines.items():
                c.add_metric([name], _num(_mapping(p).get(key)))
            yield c
        dead = CounterMetricFamily(
            "floorline_dead_letters", "Messages dead-lettered, by reason.",
            labels=["pipeline", "reason"],
        )
        for name, p in pipelines.items():
            for reason, n in sorted(_mapping(_mapping(p).get("dead_letters")).items()):
                dead.add_metric([name, reason], _num(n))
        yield dead
        for series, key, doc in _PIPELINE_GAUGES:
            g = GaugeMetricFamily(f"floorline_{series}", doc, labels=["pipeline"])
            for name, p in pipelines.items():
                g.add_metric([name], _num(_mapping(p).get(key)))
            yield g

        yield from _drift_families(pipelines)
        yield from _capture_families(_mapping(stats.get("capture")))

        with self._lock:  # copy under the lock; build the families outside it
            snapshot = {
                name: [
                    (h.cumulative(), h.sum)
                    for h in (hs.batch, hs.inference, hs.e2e)
                ]
                for name, hs in self._hist.items()
            }
        for i, (series, doc) in enumerate(_HISTOGRAMS):
            fam = HistogramMetricFamily(f"floorline_{series}", doc, labels=["pipeline"])
            for name, hists in sorted(snapshot.items()):
                buckets, total = hists[i]
                fam.add_metric([name], buckets, total)
            yield fam

        outbox = _mapping(stats.get("outbox"))
        yield GaugeMetricFamily(
            "floorline_outbox_messages", "Messages in the outbox, not yet acknowledged.",
            value=_num(outbox.get("depth")),
        )
        yield GaugeMetricFamily(
            "floorline_outbox_bytes", "Payload bytes in the outbox.",
            value=_num(outbox.get("bytes")),
        )
        yield GaugeMetricFamily(
            "floorline_outbox_degraded",
            "1 when the outbox runs in memory (state directory unusable), else 0.",
            value=1.0 if outbox.get("degraded_reason") else 0.0,
        )
        dropped = CounterMetricFamily(
            "floorline_outbox_dropped", "Messages the outbox dropped, by reason.", labels=["reason"]
        )
        for reason, n in sorted(_mapping(outbox.get("dropped")).items()):
            dropped.add_metric([reason], _num(n))
        yield dropped
        yield CounterMetricFamily(
            "floorline_published", "Messages handed to the broker.",
            value=_num(stats.get("published")),
        )
        yield CounterMetricFamily(
            "floorline_delivered", "Messages the broker acknowledged.",
            value=_num(stats.get("delivered")),
        )
        yield CounterMetricFamily(
            "floorline_unroutable", "Messages matching no pipeline.",
            value=_num(stats.get("unroutable")),
        )
        yield CounterMetricFamily(
            "floorline_mqtt_reconnects", "Connections to the broker after the first.",
            value=max(_num(stats.get("connects")) - 1.0, 0.0),
        )
        yield GaugeMetricFamily(
            "floorline_mqtt_connected", "1 while connected to the broker.",
            value=1.0 if stats.get("connected") else 0.0,
        )
        info = InfoMetricFamily(
            "floorline_bundle", "The model each pipeline runs.",
            labels=["pipeline", "name", "version", "sha256", "artifact", "runtime"],
        )
        for b in self._read_bundles():
            info.add_metric(
                [b["pipeline"], b["name"], b["version"], b["sha256"], b["artifact"], b["runtime"]],
                {},
            )
        yield info

    # -- the JSON stats message --------------------------------------------------------------

    def stats_message(self, stats: Mapping[str, Any] | None = None) -> bytes:
        """Compact JSON for ``floorline/{gateway}/stats``: totals, rates and interval averages.

        Rates (per second) and averages (inference and end-to-end milliseconds, batch size) are
        over the time since the previous call, so call it once per interval. STATS defaults to
        the stats source. Small by design (~300 bytes per pipeline): no histograms.
        """
        stats = self._read_stats() if stats is None else stats
        now = self._clock()
        elapsed = max(now - self._prev_at, 1e-9)
        with self._lock:
            sums = {name: _HistogramTotals.of(h) for name, h in self._hist.items()}
        totals: dict[str, dict[str, float]] = {}
        pipelines: dict[str, object] = {}
        captured = _mapping(_mapping(stats.get("capture")).get("pipelines"))
        for name, raw in _mapping(stats.get("pipelines")).items():
            pipelines[name], totals[name] = _pipeline_summary(
                _mapping(raw), sums.get(name), self._prev.get(name, {}), elapsed,
                _mapping(captured.get(name)),
            )
        self._prev, self._prev_at = totals, now
        outbox = _mapping(stats.get("outbox"))
        doc: dict[str, object] = {} if self._gateway is None else {"gateway": self._gateway}
        doc.update({
            "ts": round(self._wall(), 3),
            "uptime_s": round(now - self._started, 1),
            "interval_s": round(elapsed, 1),
            "connected": bool(stats.get("connected")),
            "reconnects": max(int(_num(stats.get("connects"))) - 1, 0),
            "published": int(_num(stats.get("published"))),
            "delivered": int(_num(stats.get("delivered"))),
            "outbox": {
                "depth": int(_num(outbox.get("depth"))),
                "bytes": int(_num(outbox.get("bytes"))),
                "dropped": int(sum(_num(n) for n in _mapping(outbox.get("dropped")).values())),
                "degraded": bool(outbox.get("degraded_reason")),
            },
            "pipelines": pipelines,
        })
        return orjson.dumps(doc)

    # -- sources ---------------------------------------------------------------------------

    def _read_stats(self) -> Mapping[str, Any]:
        # The source reads structures worker threads change; a rare "changed size during
        # iteration" is retried once rather than failing the scrape.
        try:
            return self._stats_source()
        except RuntimeError:
            pass
        try:
            return self._stats_source()
        except RuntimeError:
            log.warning("metrics: stats source failed twice; counters skipped", exc_info=True)
            return {}

    def _read_bundles(self) -> list[BundleInfo]:
        if self._bundles is None:
            return []
        try:
            return list(self._bundles())
        except RuntimeError:
            log.warning("metrics: bundle source failed; bundle_info skipped", exc_info=True)
            return []


def _drift_families(pipelines: Mapping[str, Any]) -> Iterator[Metric]:
    """Drift measures of the pipelines that run drift detection (``stream.drift`` documents)."""
    from prometheus_client.metrics_core import (  # noqa: PLC0415 - optional extra
        CounterMetricFamily,
        GaugeMetricFamily,
    )

    docs = {n: d for n, p in pipelines.items() if (d := _mapping(_mapping(p).get("drift")))}
    for series, doc in _DRIFT_GAUGES:
        g = GaugeMetricFamily(f"floorline_{series}", doc, labels=["pipeline"])
        key = series.removeprefix("drift_")
        for name, d in docs.items():
            if isinstance(d.get(key), (int, float)):
                g.add_metric([name], _num(d.get(key)))
        yield g
    active = GaugeMetricFamily(
        "floorline_drift_active",
        "1 while the input drifts (per_asset: the number of assets drifting).",
        labels=["pipeline"],
    )
    alerts = CounterMetricFamily("floorline_drift_alerts", "Drift alerts sent.",
                                 labels=["pipeline"])
    fams = {m: GaugeMetricFamily(f"floorline_drift_{m}", f"Input drift ({m}) per feature and "
                                 "statistic (mean, std of each window).",
                                 labels=["pipeline", "feature", "statistic"])
            for m in ("psi", "ks")}
    out_psi = GaugeMetricFamily("floorline_drift_output_psi",
                                "Shift of the model's outputs (PSI), reported, never alarmed on.",
                                labels=["pipeline", "output"])
    for name, d in docs.items():
        assets = _mapping(d.get("assets"))
        active.add_metric([name], _num(assets.get("drifting")) if assets
                          else float(bool(d.get("drifting"))))
        alerts.add_metric([name], _num(d.get("alerts")))
        for feature, stats in _mapping(d.get("features")).items():
            for statistic, measures in _mapping(stats).items():
                for m, fam in fams.items():
                    fam.add_metric([name, feature, statistic], _num(_mapping(measures).get(m)))
        for output, measures in _mapping(d.get("outputs")).items():
            out_psi.add_metric([name, output], _num(_mapping(measures).get("psi")))
    yield from (active, alerts, *fams.values(), out_psi)


def _capture_families(capture: Mapping[str, Any]) -> Iterator[Metric]:
    """Data capture's counters (``CaptureService.stats``); nothing while no pipeline captures.

    Read from the store's own counters, which a reload keeps: they never reset at run time.
    """
    from prometheus_client.metrics_core import (  # noqa: PLC0415 - optional extra
        CounterMetricFamily,
        GaugeMetricFamily,
    )

    if not capture:
        return
    pipelines = {n: _mapping(p) for n, p in _mapping(capture.get("pipelines")).items()}
    windows = CounterMetricFamily(
        "floorline_capture_windows",
        "Windows stored, by the reason kept (sample, alert, before_alert, after_alert, drift, "
        "before_drift, after_drift, low_confidence, label, recent); a window kept for several "
        "reasons counts under each.", labels=["pipeline", "reason"])
    for name, p in pipelines.items():
        for reason, n in sorted(_mapping(p.get("reasons")).items()):
            windows.add_metric([name, reason], _num(n))
    yield windows
    for series, prefix, doc in _CAPTURE_COUNTERS:
        c = CounterMetricFamily(f"floorline_{series}", doc, labels=["pipeline", "reason"])
        for name, p in pipelines.items():
            for key, n in sorted(p.items()):
                if key.startswith(prefix):
                    c.add_metric([name, key.removeprefix(prefix)], _num(n))
        yield c
    errors = CounterMetricFamily(
        "floorline_capture_errors",
        "Batches whose capture failed (their predictions are not affected).", labels=["pipeline"])
    stored = GaugeMetricFamily("floorline_capture_stored_windows", "Windows in the capture "
                               "store.", labels=["pipeline"])
    size = GaugeMetricFamily("floorline_capture_stored_bytes", "Bytes of the windows in the "
                             "capture store (bounded by capture.max_bytes).", labels=["pipeline"])
    for name, p in pipelines.items():
        errors.add_metric([name], _num(p.get("errors")))
        stored.add_metric([name], _num(p.get("windows")))
        size.add_metric([name], _num(p.get("bytes")))
    yield from (errors, stored, size)
    yield GaugeMetricFamily(
        "floorline_capture_queue_windows", "Windows waiting for the capture writer.",
        value=_num(capture.get("queued")))
    yield GaugeMetricFamily(
        "floorline_capture_unavailable",
        "1 when the capture store cannot be used (windows are counted as dropped), else 0.",
        value=1.0 if capture.get("error") else 0.0)
    commands = CounterMetricFamily(
        "floorline_capture_label_commands", "Label commands received over MQTT, by result.",
        labels=["result"])
    for result, n in sorted(_mapping(capture.get("labels")).items()):
        commands.add_metric([result], _num(n))
    yield commands
    yield CounterMetricFamily(
        "floorline_capture_labels_applied", "Labels applied to the capture store.",
        value=_num(capture.get("labels_applied")))


class _HistogramTotals(NamedTuple):
    batches: float
    windows_batched: float
    inference_s: float
    e2e_count: float
    e2e_s: float

    @classmethod
    def of(cls, h: _PipelineHistograms) -> _HistogramTotals:
        return cls(float(h.batch.count), h.batch.sum, h.inference.sum, float(h.e2e.count),
                   h.e2e.sum)


def _pipeline_summary(
    p: Mapping[str, Any],
    hist: _HistogramTotals | None,
    prev: Mapping[str, float],
    elapsed: float,
    capture: Mapping[str, Any] | None = None,
) -> tuple[dict[str, object], dict[str, float]]:
    """One pipeline's part of the stats message, and the totals the next message compares to."""
    dead = {r: int(_num(n)) for r, n in _mapping(p.get("dead_letters")).items() if _num(n)}
    totals: dict[str, float] = {
        "received": _num(p.get("received")),
        "predictions": _num(p.get("predictions")),
        "dead_letters": float(sum(dead.values())),
        **(hist._asdict() if hist is not None else {}),
    }

    def delta(key: str) -> float:
        now, before = totals.get(key, 0.0), prev.get(key, 0.0)
        return now if now < before else now - before  # smaller: the pipeline was replaced

    def mean(total: str, count: str, scale: float = 1.0) -> float | None:
        n = delta(count)
        return round(delta(total) / n * scale, 3) if n else None

    summary: dict[str, object] = {
        "received": int(totals["received"]),
        "decoded": int(_num(p.get("decoded"))),
        "dropped": int(_num(p.get("dropped_inbox_full"))),
        "shed": int(_num(p.get("shed"))),
        "dead_letters": dead,
        "windows": int(_num(p.get("windows"))),
        "predictions": int(totals["predictions"]),
        "queued": int(_num(p.get("queued"))),
        "rate": {k: round(delta(k) / elapsed, 2) for k in ("received", "predictions",
                                                           "dead_letters")},
        "inference_ms": mean("inference_s", "batches", 1e3),
        "end_to_end_ms": mean("e2e_s", "e2e_count", 1e3),
        "batch": mean("windows_batched", "batches"),
    }
    drift = _mapping(p.get("drift"))
    if drift:
        summary["drift"] = {"score": drift.get("score"), "drifting": bool(drift.get("drifting"))}
    if capture:  # the store's facts for this pipeline (CaptureService.stats)
        summary["capture"] = {
            "windows": int(_num(capture.get("windows"))),
            "bytes": int(_num(capture.get("bytes"))),
            "captured": int(_num(capture.get("captured"))),
            "dropped": int(sum(_num(n) for k, n in capture.items() if k.startswith("dropped_"))),
        }
    return summary, totals


class _Collector:
    """prometheus-client's Collector protocol, delegating to Metrics.collect."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.collect()


def _prometheus() -> Any:
    try:
        import prometheus_client  # noqa: PLC0415 - optional extra, imported when used
    except ImportError as exc:
        raise FloorlineError(
            "metrics.prometheus needs prometheus-client: pip install 'floorline[metrics]'"
        ) from exc
    return prometheus_client


class MetricsServer:
    """A running ``/metrics`` endpoint; ``stop()`` closes it."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.port: int = httpd.server_port
        """The port actually bound (useful when 0 was asked for)."""

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket; waits up to TIMEOUT for the server thread."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout)


class StatsReporter:
    """A thread that hands ``metrics.stats_message()`` to PUBLISH every INTERVAL_S seconds.

    PUBLISH gets the JSON bytes (e.g. a QoS 0 publish to ``floorline/{gateway}/stats``; while
    disconnected, dropping it is fine: the next one carries the totals). Its exceptions are
    logged, never raised: a stats message must not stop the gateway.
    """

    def __init__(
        self, metrics: Metrics, interval_s: float, publish: Callable[[bytes], object]
    ) -> None:
        if interval_s <= 0:
            raise ValueError("stats interval must be positive (0 means: do not start one)")
        self._metrics = metrics
        self._publish = publish
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stats", daemon=True)

    def start(self) -> None:
        """First message after one interval, then every interval until stop()."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop; waits up to TIMEOUT for the thread. Idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.report()

    def report(self) -> None:
        """Build and publish one message now (the thread does this every interval)."""
        try:
            self._publish(self._metrics.stats_message())
        except Exception:
            log.exception("stats message failed")
