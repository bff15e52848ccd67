"""A generation: the pipelines of one configuration, and what moves between two of them."""

from __future__ import annotations

from dataclasses import dataclass, field

from floorline.edge.config.model import Config
from floorline.edge.daemon.journal import WindowJournal
from floorline.edge.daemon.pipeline import Pipeline
from floorline.edge.mqtt.topics import shared_subscription_filter


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
            p.start()

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
