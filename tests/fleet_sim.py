"""Simulated fleet gateways for operator tests: hundreds in one process, one MQTT client each.

Each ``SimGateway`` has its own paho client (its own connection, client id, last will and
subscriptions), but no thread of its own: ``SimFleet`` drives every client from one event loop
thread through paho's external-loop API (``loop_read`` / ``loop_write`` / ``loop_misc`` over a
``selectors`` poll), so 200 gateways are 200 real connections and one thread.

A simulated gateway does what the fleet interface (build/fleet_interface.md) asks of a real
one, minus running pipelines: it subscribes its desired topics (its own, its groups',
``floorline/selectors/+/desired``), verifies every envelope with
``floorline.edge.fleet.envelope.open_envelope``, applies the interface's precedence (the highest
version wins; on equal versions gateway > group > selector; anything not newer is ignored
quietly; a selector that does not match is ignored silently), and publishes a retained
reported document (attributes, deployment, signed_by, probation, history with deployments,
health with ts) and a retained state document with an offline last will. ``fail`` makes it
refuse (``rejected``) or roll back (``rolled_back``, after its probation) every document that
sets pipelines; a ``config: {}`` document (run the local file) always applies.
"""

from __future__ import annotations

import contextlib
import queue
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion

from floorline.edge.fleet.envelope import Desired, EnvelopeError, open_envelope


@dataclass
class SimGateway:
    """One simulated gateway (see the module docstring)."""

    id: str
    attributes: dict[str, str]
    groups: list[str] = field(default_factory=list)
    fail: str | None = None
    """None, "rejected" or "rolled_back": what happens to documents that set pipelines."""
    probation_s: float = 0.2
    seen: tuple[int, int] = (0, -1)
    running_version: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    deployment: str = ""
    signed_by: str | None = None
    config_source: str = "local"
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=10))
    probation: dict[str, Any] | None = None
    received: list[tuple[str, int]] = field(default_factory=list)
    """(topic, version) of every verified document that reached it, applied or not."""
    online: bool = True
    client: mqtt.Client | None = None
    _backlog: deque[tuple[Desired, int]] = field(default_factory=deque)
    _previous: tuple[Any, ...] | None = None

    # -- documents --------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, keys: list[Ed25519PublicKey]) -> None:
        """One desired-state message (event loop thread)."""
        if not payload:
            return
        selector_doc = topic.startswith("floorline/selectors/")
        try:
            desired = open_envelope(payload, operator_keys=keys, gateway=self.id,
                                    groups=self.groups, attributes=self.attributes)
        except EnvelopeError as exc:
            if selector_doc and exc.reason == "wrong_target":
                return  # a selector that does not match: ignored silently
            self.record(None, "rejected", str(exc), "")
            return
        self.received.append((topic, desired.version))
        if (desired.version, desired.rank) <= self.seen:
            return  # the retained copy of something already applied or superseded
        self.seen = (desired.version, desired.rank)
        if self.probation is not None:
            self._backlog.append((desired, desired.rank))  # one document at a time
            return
        self.apply(desired)

    def apply(self, desired: Desired) -> None:
        """Switch to DESIRED and start its probation (or refuse it)."""
        deployment = desired.deployment
        sets_pipelines = bool(desired.config.get("pipelines"))
        if self.fail == "rejected" and sets_pipelines:
            self.record(desired.version, "rejected", "simulated: self-test failed", deployment)
            return
        self._previous = (self.running_version, self.config, self.deployment, self.signed_by,
                          self.config_source)
        self.running_version = desired.version
        self.config = desired.config
        self.deployment = deployment
        self.signed_by = desired.signed_by
        self.config_source = "fleet" if sets_pipelines else "local"
        self.probation = {"version": desired.version, "until": time.time() + self.probation_s}

    def tick(self, now: float) -> bool:
        """End a probation that is due; True when something changed."""
        if self.probation is None or now < self.probation["until"]:
            return False
        version = self.probation["version"]
        self.probation = None
        if self.fail == "rolled_back" and self.config.get("pipelines"):
            assert self._previous is not None
            (self.running_version, self.config, self.deployment, self.signed_by,
             self.config_source) = self._previous
            self.record(version, "rolled_back",
                        "simulated: pipeline vibration: 40 of 40 messages dead-lettered during "
                        "probation", self.deployment)
        else:
            self.record(version, "applied", "passed probation", self.deployment)
        if self._backlog:
            desired, _ = self._backlog.popleft()
            self.apply(desired)
        return True

    def record(self, version: int | None, result: str, reason: str, deployment: str) -> None:
        """Add a history entry."""
        self.history.append({"version": version, "result": result, "reason": reason,
                             "ts": time.time(), "deployment": deployment})

    def reported(self) -> bytes:
        """The retained reported document (the interface's keys)."""
        now = time.time()
        return orjson.dumps({
            "gateway": self.id,
            "ts": now,
            "running_version": self.running_version,
            "config_source": self.config_source,
            "bundles": [{"pipeline": p.get("name"), "name": "pdm-classifier", "version": "1.0.0",
                         "ref": p.get("bundle")} for p in self.config.get("pipelines") or []],
            "history": list(self.history),
            "health": {"ts": now, "connected": True, "pipelines": {}},
            "attributes": {"floorline": "sim", "runtimes": "onnx", "machine": "x86_64",
                           **self.attributes},
            "deployment": self.deployment,
            "signed_by": self.signed_by,
            "probation": self.probation,
        })

    def verdict(self, version: int) -> str | None:
        """This gateway's last history result for VERSION."""
        for entry in reversed(self.history):
            if entry["version"] == version:
                return str(entry["result"])
        return None


class SimFleet:
    """Many SimGateways on one broker, one event-loop thread for all their connections."""

    def __init__(self, host: str, port: int, keys: list[Ed25519PublicKey],
                 gateways: Iterable[SimGateway]) -> None:
        self.host, self.port, self.keys = host, port, keys
        self.gateways = {g.id: g for g in gateways}
        self._sel = selectors.DefaultSelector()
        self._calls: queue.Queue[Callable[[], None]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sim-fleet", daemon=True)
        self._dirty: set[str] = set()
        self.connected: set[str] = set()
        self.messages = 0

    # -- set-up -----------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> SimFleet:
        """Connect every gateway (state online, reported), then run the loop."""
        for gw in self.gateways.values():
            self._connect(gw)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while len(self.connected) < len(self.gateways):
            if time.monotonic() > deadline:
                msg = f"only {len(self.connected)} of {len(self.gateways)} simulated gateways up"
                raise TimeoutError(msg)
            time.sleep(0.02)
        return self

    def _connect(self, gw: SimGateway) -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{gw.id}",
                             protocol=mqtt.MQTTv311, clean_session=True, userdata=gw)
        client.will_set(f"floorline/{gw.id}/state", orjson.dumps({"state": "offline"}), 1, True)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.connect(self.host, self.port, keepalive=60)
        gw.client = client
        self._sel.register(client.socket(), selectors.EVENT_READ, client)

    def _on_connect(self, client: mqtt.Client, gw: SimGateway, flags: Any, rc: Any,
                    props: Any = None) -> None:
        del flags, props
        if rc.is_failure:
            return
        subs = [(f"floorline/{gw.id}/desired", 1), ("floorline/selectors/+/desired", 1)]
        subs += [(f"floorline/groups/{g}/desired", 1) for g in gw.groups]
        client.subscribe(subs)
        client.publish(f"floorline/{gw.id}/state",
                       orjson.dumps({"state": "online", "ts": time.time()}), 1, True)
        client.publish(f"floorline/{gw.id}/reported", gw.reported(), 1, True)
        self.connected.add(gw.id)

    def _on_message(self, client: mqtt.Client, gw: SimGateway, msg: mqtt.MQTTMessage) -> None:
        del client
        self.messages += 1
        if msg.topic.endswith("/desired"):
            before = (len(gw.history), gw.probation)
            gw.handle(msg.topic, msg.payload, self.keys)
            if (len(gw.history), gw.probation) != before:
                self._dirty.add(gw.id)

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        last_misc = time.monotonic()
        while not self._stop.is_set():
            while not self._calls.empty():
                self._calls.get_nowait()()
            for key, _ in self._sel.select(0.02):
                client = key.data
                if client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                    self._drop(client)
            now = time.time()
            for gw in self.gateways.values():
                if gw.tick(now):
                    self._dirty.add(gw.id)
            for name in sorted(self._dirty):
                gw = self.gateways[name]
                if gw.client is not None and gw.online:
                    gw.client.publish(f"floorline/{name}/reported", gw.reported(), 1, True)
            self._dirty.clear()
            for gw in self.gateways.values():
                if gw.client is not None and gw.online and gw.client.want_write():
                    gw.client.loop_write()
            if time.monotonic() - last_misc > 1.0:
                last_misc = time.monotonic()
                for gw in self.gateways.values():
                    if gw.client is not None and gw.online:
                        gw.client.loop_misc()

    def _drop(self, client: mqtt.Client) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(client.socket())

    def call(self, fn: Callable[[], None], timeout: float = 10.0) -> None:
        """Run FN on the loop thread and wait for it."""
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._calls.put(run)
        if not done.wait(timeout):
            raise TimeoutError("the simulated fleet's loop did not answer")

    def go_offline(self, name: str) -> None:
        """Drop NAME's connection without a DISCONNECT: the broker publishes its last will."""
        gw = self.gateways[name]

        def drop() -> None:
            assert gw.client is not None
            gw.online = False
            sock = gw.client.socket()
            self._drop(gw.client)
            if sock is not None:
                sock.close()  # no DISCONNECT packet: the will goes out

        self.call(drop)

    def stop(self) -> None:
        """Disconnect every gateway and end the loop."""

        def bye() -> None:
            for gw in self.gateways.values():
                if gw.client is not None and gw.online:
                    gw.client.disconnect()
                    gw.client.loop_write()

        with contextlib.suppress(TimeoutError):
            self.call(bye)
        self._stop.set()
        self._thread.join(10)
        for gw in self.gateways.values():
            if gw.client is not None:
                with contextlib.suppress(Exception):
                    gw.client.socket() and gw.client.socket().close()


def make_fleet(count: int, *, sites: int = 4, lines: int = 5, groups: list[str] | None = None,
               probation_s: float = 0.2) -> list[SimGateway]:
    """COUNT gateways gw-000…, spread over SITES sites (site-a, site-b…) and LINES lines."""
    return [
        SimGateway(id=f"gw-{i:03d}",
                   attributes={"site": f"site-{chr(ord('a') + i % sites)}",
                               "line": str(i // sites % lines + 1)},
                   groups=list(groups or []), probation_s=probation_s)
        for i in range(count)
    ]
