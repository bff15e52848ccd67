"""A generation: the pipelines of one configuration, and what moves between two of them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from floorline.edge.config.model import Config
from floorline.edge.daemon.journal import WindowJournal
from floorline.edge.daemon.pipeline import Pipeline
from floorline.edge.mqtt.topics import shared_subscription_filter

log = logging.getLogger(__name__)

_WARNED: set[tuple[str, str, str]] = set()
"""(gateway, pipeline, warning) already logged: a reload or a fleet push does not repeat one."""


@dataclass
class Generation:
    """The pipelines of one configuration and the routing table to them."""

    config: Config
    pipelines: list[Pipeline]
    filters: list[tuple[str, Pipeline]] = field(default_factory=list)
    """(topic filter without any ``$share/group/`` prefix, pipeline), for every subscription."""
    routes: dict[str, tuple[Pipeline, ...]] = field(default_factory=dict)
    """Concrete topic → its pipelines: the routing decision, cached (see ``routing``)."""
    max_payload: int = field(init=False, default=0)
    """The smallest ``Pipeline.max_payload``: a payload up to this size fits every pipeline."""

    def __post_init__(self) -> None:
        self.filters = [
            (shared_subscription_filter(f), p) for p in self.pipelines for f in p.config.subscribe
        ]
        self.max_payload = min((p.max_payload for p in self.pipelines), default=0)
        for name, text in sharing_warnings(self.pipelines):
            key = (self.config.gateway.id, name, text)
            if key not in _WARNED:
                _WARNED.add(key)
                log.warning("%s", text)

    def subscriptions(self) -> dict[str, int]:
        """Topic filter → QoS for every pipeline."""
        subs: dict[str, int] = {}
        for p in self.pipelines:
            for f in p.config.subscribe:
                subs[f] = max(subs.get(f, 0), p.config.qos)
        return subs

    def start(self) -> None:
        """Start every pipeline's worker."""
        for p in self.pipelines:
            # Worker processes first (``workers: N``): forked, if at all, before any thread here.
            launch = getattr(p, "launch", None)
            if launch is not None:
                launch()
        for p in self.pipelines:
            p.start()

    def prepare(self) -> str | None:
        """Start worker processes (``workers: N``) and wait until they loaded; why not, or None.

        Before a switch: a worker that cannot load refuses the configuration.
        """
        for p in self.pipelines:
            wait_ready = getattr(p, "wait_ready", None)
            if wait_ready is not None and (reason := wait_ready()) is not None:
                return str(reason)
        return None

    def discard(self) -> None:
        """Undo ``prepare`` and release everything (a switch that did not happen)."""
        for p in self.pipelines:
            p.stop()
        self.close()

    def close(self) -> None:
        """Release the outputs and models (after the workers stopped)."""
        for p in self.pipelines:
            # Each release in turn, whatever the one before it raised: nothing may leak.
            try:
                p.output.close()
            finally:
                try:
                    p.model.backend.close()
                finally:
                    try:
                        p.model.bundle.close()
                    finally:
                        p.close_shadow()


def sharing_warnings(pipelines: list[Pipeline]) -> list[tuple[str, str]]:
    """(pipeline, warning) for each pipeline behind a shared subscription that rests on a guess.

    The config refuses what surely breaks windows (``PipelineConfig.spanning_reason``); what is
    left rests on the broker's dispatch (``share_dispatch: sticky``) or on the sender's message
    size, which no config states (a binary, csv or json-block message may hold any number of
    samples). Each warning names that assumption. A window of one sample never spans messages.
    """
    out = []
    for p in pipelines:
        pc = p.config
        shared = pc.shared_filters()
        size = p.model.bundle.manifest.input.window
        if not shared or size == 1:
            continue
        if pc.share_dispatch == "sticky":
            # A Sparkplug node's births and data are on different topics: only hashing by the
            # sending client keeps them together.
            strategy = "hash_clientid" if pc.decoder.type == "sparkplug" else "hash_topic"
            text = (
                f"pipeline {p.name}: share_dispatch: sticky: assuming the broker sends every "
                f"message of an asset on {shared[0]} to the same gateway (e.g. EMQX "
                f"shared_subscription_strategy = {strategy}); if it does not, this gateway sees "
                f"only some of an asset's samples and its {size}-sample windows are cut at every "
                "gap (or, without sequence numbers and timestamps, mixed); docs/scale-out.md"
            )
        else:
            text = (
                f"pipeline {p.name}: {shared[0]} is a round-robin shared subscription: windows "
                f"stay whole only if every {pc.decoder.type} message holds whole windows "
                f"({size} samples, or a multiple), which the config cannot tell; shorter "
                "messages split an asset's windows between gateways; docs/scale-out.md"
            )
        out.append((p.name, text))
    return out


@dataclass(frozen=True)
class ApplyResult:
    """What happened to one configuration change."""

    ok: bool
    reason: str = ""
    carried_over: tuple[str, ...] = ()


def same_input(old: Pipeline, new: Pipeline) -> bool:
    """Whether a partial window of OLD can continue in NEW: same cut, same samples."""
    a, b = old.model.bundle.manifest.input, new.model.bundle.manifest.input
    return (
        old.name == new.name
        and a.window == b.window
        and [f.name for f in a.features] == [f.name for f in b.features]
        and old.config.window == new.config.window
        and old.config.decoder == new.config.decoder
    )


def carry_over(old: Generation, new: Generation, journal: WindowJournal | None) -> list[str]:
    """Move partial windows from OLD's stopped pipelines to NEW's where the input is unchanged.

    Returns the pipelines whose windows were carried. A pipeline whose input changed starts
    empty, and its journaled windows are forgotten: saved windows of another shape must not come
    back after a restart. Its window counters are not dropped with the samples: the daemon seeds
    every new pipeline from the counters stored with the predictions (``Daemon._seed_seqs``), so
    ``seq`` goes on across any switch, a rollback included.
    """
    carried = []
    previous = {p.name: p for p in old.pipelines}
    for p in new.pipelines:
        before = previous.get(p.name)
        if before is not None and same_input(before, p):
            p.adopt_windows(before.window_states())
            carried.append(p.name)
        elif journal is not None:
            journal.forget(p.name)
    return carried
