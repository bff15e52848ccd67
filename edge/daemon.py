"""The gateway daemon: loads every pipeline's bundle, connects, routes messages, reports state.

Start-up order matters: every bundle is verified and self-tested before the daemon connects, so a
gateway with a bad bundle never announces itself online. Shutdown is the reverse: workers drain,
the offline state is published, and only then does the connection close.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path

import orjson

from edge import __version__, selftest
from edge.backends import BackendOptions
from edge.bundle import Bundle
from edge.config import Config, PipelineConfig
from edge.encode import dead_letter
from edge.errors import ConfigError
from edge.pipeline import Pipeline
from edge.signing import load_public_key, parse_public_key
from edge.topics import matches, shared_subscription_filter
from edge.transport import MqttTransport, Will

log = logging.getLogger(__name__)

_ROUTE_CACHE_LIMIT = 100_000


def trusted_keys(config: Config) -> list[object]:
    """The public keys a config trusts, read from files or inline base64."""
    keys: list[object] = []
    for entry in config.trust.trusted_keys:
        path = Path(entry)
        keys.append(load_public_key(path) if path.exists() else parse_public_key(entry))
    return keys


def load_model(config: Config, pipeline: PipelineConfig) -> selftest.LoadedModel:
    """Open, verify and self-test a pipeline's bundle on its configured backend."""
    keys = trusted_keys(config)
    bundle = Bundle.open(
        pipeline.bundle,
        trusted_keys=keys or None,  # type: ignore[arg-type]
        require_signature=config.trust.require_signature,
    )
    try:
        return selftest.load(
            bundle,
            backend=None if pipeline.backend == "auto" else pipeline.backend,
            artifact=pipeline.artifact,
            options=BackendOptions(threads=pipeline.threads, interpreter=pipeline.interpreter),
        )
    except BaseException:
        bundle.close()
        raise


class Daemon:
    """Everything ``floorline run`` runs, startable and stoppable from tests."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.gateway = config.gateway.id
        self.pipelines: list[Pipeline] = []
        self._routes: dict[str, tuple[Pipeline, ...]] = {}
        self._filters: list[tuple[str, Pipeline]] = []
        self.unroutable = Counter[str]()
        self._state_topic = config.topics.state.format(gateway=self.gateway)
        self._stopped = threading.Event()
        self.transport: MqttTransport | None = None
        self.started_at = time.monotonic()

    # -- start-up ---------------------------------------------------------------------------

    def load(self) -> None:
        """Verify and self-test every bundle and build the pipelines (no network yet)."""
        for pc in self.config.pipelines:
            model = load_model(self.config, pc)
            log.info(
                "pipeline %s: %s %s (%s) on %s, self-test max err %.2g",
                pc.name,
                model.bundle.manifest.name,
                model.bundle.manifest.version,
                model.artifact.file,
                model.backend.runtime,
                model.selftest.max_abs_error,
            )
            pipeline = Pipeline(
                pc,
                gateway=self.gateway,
                topics=self.config.topics,
                limits=self.config.limits,
                model=model,
                publish=self._publish,
            )
            self.pipelines.append(pipeline)
            self._filters.extend((shared_subscription_filter(f), pipeline) for f in pc.subscribe)

    def start(self) -> None:
        """Load (if not yet), start the workers, then connect."""
        if not self.pipelines:
            self.load()
        for p in self.pipelines:
            p.start()
        subs: dict[str, int] = {}
        for p in self.pipelines:
            for f in p.config.subscribe:
                subs[f] = max(subs.get(f, 0), p.config.qos)
        self.transport = MqttTransport(
            self.config.broker,
            self.config.client_id(),
            on_message=self._on_message,
            subscriptions=list(subs.items()),
            will=Will(self._state_topic, self._state_payload("offline", "connection lost")),
            on_connect=self._announce,
        )
        self.transport.start()

    def _announce(self) -> None:
        # Runs on paho's thread at every (re)connect: the retained state must say online again.
        assert self.transport is not None  # noqa: S101
        self.transport.publish(self._state_topic, self._state_payload("online"), 1, True)

    # -- routing (paho's thread) -----------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, received: float) -> None:
        targets = self._routes.get(topic)
        if targets is None:
            targets = tuple(p for f, p in self._filters if matches(f, topic))
            if len(self._routes) < _ROUTE_CACHE_LIMIT:
                self._routes[topic] = targets
        if not targets:
            self.unroutable["unroutable"] += 1
            dlq = self.config.topics.dead_letter.format(gateway=self.gateway, pipeline="_unrouted")
            report = dead_letter("_unrouted", "unroutable", topic, len(payload))
            self._publish(dlq, report, 0, False)
            return
        for pipeline in targets:
            pipeline.offer(topic, payload, received)

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if self.transport is None:
            raise ConfigError("daemon not started")
        self.transport.publish(topic, payload, qos, retain)

    # -- state ------------------------------------------------------------------------------

    def _state_payload(self, state: str, reason: str | None = None) -> bytes:
        doc: dict[str, object] = {
            "state": state,
            "gateway": self.gateway,
            "floorline": __version__,
            "ts": time.time(),
            "pipelines": [
                {
                    "name": p.name,
                    "model": p.model.bundle.manifest.name,
                    "version": p.model.bundle.manifest.version,
                    "artifact": p.model.artifact.file,
                    "sha256": p.model.artifact.sha256,
                    "runtime": p.model.backend.runtime,
                }
                for p in self.pipelines
            ],
        }
        if reason:
            doc["reason"] = reason
        return orjson.dumps(doc)

    def stats(self) -> dict[str, object]:
        """Per-pipeline counters and connection facts."""
        t = self.transport
        return {
            "connected": bool(t and t.connected.is_set()),
            "connects": t.connects if t else 0,
            "unroutable": self.unroutable["unroutable"],
            "pipelines": {p.name: p.stats() for p in self.pipelines},
        }

    # -- shutdown ---------------------------------------------------------------------------

    def stop(self, reason: str = "shutdown") -> None:
        """Drain the workers, publish the offline state, disconnect. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        for p in self.pipelines:
            p.stop()
        if self.transport is not None:
            final = [(self._state_topic, self._state_payload("offline", reason), 1, True)]
            self.transport.stop(final=final)
        for p in self.pipelines:
            p.model.backend.close()
            p.model.bundle.close()
        log.info("stopped (%s)", reason)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop() has run, or TIMEOUT passed."""
        return self._stopped.wait(timeout)
