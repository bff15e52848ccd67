"""Sparkplug B edge nodes: the session a ``sparkplug`` output publishes its predictions through.

One will per connection. The gateway's connection carries the gateway's own will (its retained
``offline`` state); an edge node needs its NDEATH as the will, with the bdSeq of that very
CONNECT. So each edge node has a connection of its own (client id ``<gateway client id>-spb-
<node>``, clean start, as the spec requires of edge nodes), its will the NDEATH. Input, state,
dead letters and every other output stay on the gateway's connection, untouched.

The session (one thread per node, the only writer of its state: seq, aliases, births):

- bdSeq: 0 on the very first connect, one more on every CONNECT after (mod 256), persisted in
  ``sparkplug-<group>-<node>.bdseq`` in the state directory when a CONNECT is accepted, so a
  restart continues from it. The will of the next CONNECT is set as soon as this one is accepted.
- Births: once connected (and, with ``primary_host_id``, once that host's STATE says online),
  NBIRTH (seq 0, bdSeq, ``Node Control/Rebirth`` false), then a DBIRTH per known device (its
  latest values, typed nulls after a restart), then data. A device met later is born on its first
  data. ``Node Control/Rebirth`` = true on NCMD: births again (same bdSeq), then data.
- ``seq`` 0-255, one more for every NBIRTH/DBIRTH/DDATA/DDEATH the node publishes, wrapping.
- DDATA: by alias, only the metrics that changed since the device's birth or last DDATA in this
  session (report by exception; ``Window/Seq`` changes with every prediction).
- DDEATH: when a device (an asset) stops: no prediction for ``device_timeout_s``, or by default
  10 x its mean interval between predictions (at least 10 s; 60 s before it has an interval).
  The DDEATH goes through the outbox like data, so it follows the device's last DDATA.
- Shutdown: NDEATH, then DISCONNECT (``MqttTransport.stop(final=...)``); the devices die with it.

Store and forward. Predictions are committed to the node's own outbox
(``sparkplug-<group>-<node>.sqlite``, the gateway's outbox bounds) by the pipeline's worker before
it goes on, as records (device, time, metric values by name), not as finished payloads: ``seq`` and
aliases belong to a session and are set when a record is handed to the connection. The node
thread hands records over in outbox order, only while the session is live, and deletes them once
paho reports them written to the socket (Sparkplug data is QoS 0: nothing acknowledges it
further). So while the broker is away, or the primary host is offline, nothing is published and
nothing is dropped (but by the outbox's own bounds, counted). Records made before the current
session's births are sent with ``is_historical`` true and all their metrics: the births carry the
current values, the backlog follows in order as history.

Primary host (``primary_host_id``): the node subscribes to ``spBv1.0/STATE/<host>``. Births wait for
``online: true``. A newer (by ``timestamp``) ``online: false`` while live: NDEATH, DISCONNECT, and
the connection starts over (a new bdSeq), births again once the host is back online.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

from floorline.edge.config.model import BrokerConfig
from floorline.edge.delivery.outbox import Outbox, OutboxConfig
from floorline.edge.errors import ConfigError
from floorline.edge.messages import Outbound
from floorline.edge.mqtt.transport import MqttTransport, Will
from floorline.edge.sparkplug import topics

log = logging.getLogger(__name__)

NAMESPACE = topics.NAMESPACE
_READ = 256  # records read from the outbox per turn
_MAX_WRITING = 2000  # records handed to paho and not yet written: no more until some are
_IDLE_S = 0.1
_STALE_MIN_S = 10.0
_STALE_FACTOR = 10.0
_STALE_FIRST_S = 60.0
_ID_CHARS = re.compile(r"[+/#]")


def safe_id(value: str) -> str:
    """VALUE usable as a Sparkplug id (no ``+``, ``/``, ``#``): those become ``_``."""
    return _ID_CHARS.sub("_", value) or "_"


@dataclass(frozen=True)
class DeviceSchema:
    """What each device of a node announces: metrics (name, datatype) and constant metrics."""

    specs: tuple[Any, ...]
    """``sparkplug_payloads.MetricSpec`` in alias order."""
    constants: tuple[tuple[str, Any], ...]


@dataclass
class _Activity:
    last: float  # time.monotonic() of its latest prediction
    interval: float | None = None  # mean interval between predictions (EWMA)


@dataclass
class _Session:
    """What one Sparkplug session (births to death) knows; the node thread's alone."""

    connection: int  # transport.connects when it was born
    bd_seq: int
    started: float  # epoch seconds of the births: records older are history
    seq: int = 0
    born: set[str] = field(default_factory=set)
    bases: dict[str, int] = field(default_factory=dict)  # device → alias base
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)  # device → last values sent


class _NodeTransport(MqttTransport):
    """The transport with what an edge node needs besides: a will per CONNECT, a hang-up."""

    def set_will(self, will: Will) -> None:
        """The will of the next CONNECT (paho sends the one set when it connects)."""
        self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    def hang_up(self) -> None:
        """Send DISCONNECT; the network thread then connects again (with backoff)."""
        self._client.disconnect()


class EdgeNode:
    """One Sparkplug edge node: its connection, outbox, session thread."""

    def __init__(
        self, group: str, node: str, *, broker: BrokerConfig, client_id: str, state_dir: Path,
        outbox: OutboxConfig, primary_host: str | None, node_metrics: dict[str, str],
    ) -> None:
        self.group, self.node, self.primary_host = group, node, primary_host
        self._pb: ModuleType = importlib.import_module(
            "floorline.edge.daemon.sparkplug_payloads"
        )
        self._broker = broker.model_copy(update={"clean_start": True, "session_expiry_s": 0})
        self._client_id = f"{client_id}-spb-{node}"[:128]
        stem = f"sparkplug-{safe_id(group)}-{safe_id(node)}"
        self._bdseq_path = state_dir / f"{stem}.bdseq"
        self.outbox = Outbox(state_dir / f"{stem}.sqlite", outbox)
        self._node_metrics = node_metrics
        self._state_topic = topics.state_topic(primary_host) if primary_host else None
        self._ncmd = self.topic("NCMD")
        self.schema: DeviceSchema | None = None
        self.device_timeout_s: float | None = None
        # Shared with the workers (submit) and paho's thread (callbacks): under _lock, or
        # append-only deques.
        self._lock = threading.Lock()
        self._latest: dict[str, tuple[int, dict[str, Any]]] = {}  # device → (ms, values)
        self._activity: dict[str, _Activity] = {}
        self._events: collections.deque[tuple[str, Any]] = collections.deque()
        self._written: collections.deque[int] = collections.deque()
        self._wake = threading.Event()
        self.host_online: bool | None = None if primary_host else True
        self._host_stamp = -1
        self._rebirth_due = False
        # The node thread's alone.
        self._will_bd = self._load_bdseq()  # paho's thread after start
        self._accepted: tuple[int, int] | None = None  # (transport.connects, its bdSeq)
        self._drain_until: float | None = None
        self._session: _Session | None = None
        self._cursor = 0
        self._writing: dict[int, int] = {}  # paho mid → outbox id
        self.counters: collections.Counter[str] = collections.Counter()
        self.transport: _NodeTransport | None = None
        self._thread = threading.Thread(target=self._main, name=f"sparkplug-{node}", daemon=True)

    # -- topics and ids -------------------------------------------------------------------------

    def topic(self, kind: topics.MessageType, device: str | None = None) -> str:
        """``spBv1.0/<group>/<KIND>/<node>[/<DEVICE>]``."""
        if device is None:
            return topics.node_topic(self.group, kind, self.node)
        return topics.device_topic(self.group, kind, self.node, device)

    def _load_bdseq(self) -> int:
        # The bdSeq for the next CONNECT: one more than the last accepted (0 the first time).
        try:
            last = int(self._bdseq_path.read_text().strip())
        except (OSError, ValueError):
            return 0
        return (last + 1) % 256

    def _save_bdseq(self, value: int) -> None:
        tmp = self._bdseq_path.with_suffix(".tmp")
        try:
            tmp.write_text(f"{value}\n")
            tmp.replace(self._bdseq_path)
        except OSError as exc:  # not fatal: after a restart bdSeq may repeat one number
            log.warning("sparkplug %s/%s: cannot persist bdSeq: %s", self.group, self.node, exc)

    # -- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        """Connect and run the session (idempotent)."""
        if self.transport is not None:
            return
        subs = [(self._ncmd, 1)]
        if self._state_topic:
            subs.append((self._state_topic, 1))
        self.transport = _NodeTransport(
            self._broker, self._client_id, on_message=self._on_message, subscriptions=subs,
            will=self._will(self._will_bd), on_connect=self._on_connect,
            on_published=self._written.append,
        )
        self._thread.start()
        self.transport.start()

    def _will(self, bd_seq: int) -> Will:
        return Will(self.topic("NDEATH"), self._pb.ndeath(bd_seq), qos=1, retain=False)

    def set_schema(self, schema: DeviceSchema, device_timeout_s: float | None) -> None:
        """Announce SCHEMA for every device (a new model rebirths the node)."""
        with self._lock:
            if schema != self.schema and self.schema is not None:
                self._events.append(("rebirth", "schema"))
            self.schema = schema
            self.device_timeout_s = device_timeout_s
        self._wake.set()

    def submit(self, records: list[tuple[str, int, dict[str, Any]]]) -> None:
        """Commit predictions (device, epoch ms, values by name) to the outbox, in order.

        On the pipeline's worker thread; returns once they are stored (or the outbox degraded
        to memory, and says so).
        """
        if not records:
            return
        now = time.monotonic()
        self.outbox.put_many([
            Outbound(device, orjson.dumps({"t": ms, "v": values}), 1)
            for device, ms, values in records
        ])
        with self._lock:
            for device, ms, values in records:
                self._latest[device] = (ms, values)
                seen = self._activity.get(device)
                if seen is None:
                    self._activity[device] = _Activity(now)
                    continue
                gap = now - seen.last
                if gap > 0:
                    seen.interval = gap if seen.interval is None else (
                        0.8 * seen.interval + 0.2 * gap)
                seen.last = now
        self._wake.set()

    def request_rebirth(self) -> None:
        """Births again at the next turn (as an NCMD ``Node Control/Rebirth`` asks)."""
        self._events.append(("rebirth", "request"))
        self._wake.set()

    def stop(self, timeout: float) -> None:
        """Hand over what the session can within TIMEOUT, then NDEATH and DISCONNECT."""
        self._drain_until = time.monotonic() + timeout
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout + 2.0)
        final: list[tuple[str, bytes, int, bool]] = []
        if self._session is not None:
            final.append((self.topic("NDEATH"), self._pb.ndeath(self._session.bd_seq), 1, False))
        if self.transport is not None:
            self.transport.stop(final=final)
        self._settle()
        self.outbox.close()

    def stats(self) -> dict[str, object]:
        """Counters and the session's facts, for the gateway's stats."""
        s = self._session
        return {
            **self.counters,
            "live": s is not None,
            "bd_seq": s.bd_seq if s else None,
            "devices": len(s.born) if s else 0,
            "held": self.outbox.depth(),
            "primary_host_online": self.host_online,
        }

    # -- paho's network thread ----------------------------------------------------------------

    def _on_connect(self) -> None:
        # Before `connected` is set, before any publish on this connection: the CONNECT just
        # accepted carried _will_bd; the next one carries one more.
        bd = self._will_bd
        self._save_bdseq(bd)
        assert self.transport is not None  # noqa: S101
        self._accepted = (self.transport.connects, bd)
        self._will_bd = (bd + 1) % 256
        self.transport.set_will(self._will(self._will_bd))
        self._wake.set()

    def _on_message(self, topic: str, payload: bytes, *_: Any) -> None:
        if topic == self._ncmd:
            try:
                if self._pb.rebirth_requested(payload):
                    self._events.append(("rebirth", "ncmd"))
            except ValueError as exc:
                log.warning("sparkplug %s: bad NCMD ignored: %s", self.node, exc)
                self.counters["bad_commands"] += 1
        elif topic == self._state_topic:
            parsed = _host_state(payload)
            if parsed is None:
                log.warning("sparkplug %s: STATE of %s is not {online, timestamp}; ignored",
                            self.node, self.primary_host)
                self.counters["bad_states"] += 1
                return
            self._events.append(("state", parsed))
        self._wake.set()

    # -- the node thread ----------------------------------------------------------------------

    def _main(self) -> None:
        while True:
            try:
                self._turn()
            except Exception:  # the session must outlive a bad turn; the next one retries
                log.exception("sparkplug %s: session turn failed", self.node)
                time.sleep(1.0)
            until = self._drain_until
            if until is not None and (
                time.monotonic() >= until or self._session is None
                or (self.outbox.depth() == 0 and not self._writing)
            ):
                return
            self._wake.wait(_IDLE_S if until is None else 0.01)
            self._wake.clear()

    def _turn(self) -> None:
        t = self.transport
        if t is None:
            return
        rebirth = self._take_events()
        self._settle()
        self._check_stale()
        if not t.connected.is_set():
            self._session = None
            return
        s = self._session
        if s is not None and not self.host_online:
            if s.connection == t.connects:
                self._terminate(t, s)
            self._session = None  # a new connection already: simply not born on it
            return
        if not self.host_online:
            return  # waiting for the primary host: nothing is published, records wait
        if s is None or s.connection != t.connects or rebirth:
            s = self._births(t, s)
            if s is None:
                return
        self._check_stale()
        self._flush(t, s)

    def _take_events(self) -> bool:
        rebirth = False
        while self._events:
            kind, value = self._events.popleft()
            if kind == "rebirth":
                rebirth = rebirth or self._session is not None
                self.counters[f"rebirths_{value}"] += 1
            elif kind == "state":
                online, stamp = value
                if stamp >= self._host_stamp:  # an older STATE is stale: ignored (spec)
                    self._host_stamp = stamp
                    if online != self.host_online:
                        log.info("sparkplug %s: primary host %s %s", self.node,
                                 self.primary_host, "online" if online else "offline")
                    self.host_online = online
        return rebirth

    def _settle(self) -> None:
        """Delete the records paho wrote to the socket."""
        done = []
        while self._written:
            row = self._writing.pop(self._written.popleft(), None)
            if row is not None:
                done.append(row)
        if done:
            self.outbox.ack_many(done)
            self.counters["published"] += len(done)

    def _next_seq(self, s: _Session) -> int:
        seq = s.seq
        s.seq = (seq + 1) % 256
        return seq

    def _births(self, t: _NodeTransport, old: _Session | None) -> _Session | None:
        schema = self.schema
        if schema is None:
            return None  # no output attached yet
        with t.publishing() as up:
            if not up:
                return None
            if old is None or old.connection != t.connects:
                # A new connection: what paho did not write on the old one is read again.
                self._writing.clear()
                accepted = self._accepted
                if accepted is None or accepted[0] != t.connects:
                    return None  # its hook has not run yet: next turn
                bd = accepted[1]
            else:
                bd = old.bd_seq  # a rebirth: same connection, same will (spec)
            now = time.time()
            ms = int(now * 1000)
            s = _Session(connection=t.connects, bd_seq=bd, started=now)
            t.publish(self.topic("NBIRTH"), self._pb.nbirth(ms, bd, self._node_metrics), 0, False)
            s.seq = 1
            with self._lock:
                latest = dict(self._latest)
            for device, (values_ms, values) in latest.items():
                self._dbirth(t, s, device, values, ms, values_ms)
            self._cursor = 0  # every record still held is read again, in order
            self._session = s
        self.counters["births"] += 1
        log.info("sparkplug %s/%s: born (bdSeq %d, %d devices)", self.group, self.node, bd,
                 len(latest))
        return s

    def _dbirth(self, t: _NodeTransport, s: _Session, device: str, values: dict[str, Any],
                ms: int, values_ms: int | None) -> int | None:
        schema = self.schema
        assert schema is not None  # noqa: S101
        base = s.bases.get(device)
        if base is None:
            base = s.bases[device] = len(s.bases) * (len(schema.specs) + 1)
        payload = self._pb.dbirth(ms, self._next_seq(s), schema.specs, base, values,
                                  dict(schema.constants), values_ms)
        mid = t.publish_tracked(self.topic("DBIRTH", device), payload, 0, False)
        s.born.add(device)
        s.sent[device] = {spec.name: values.get(spec.name) for spec in schema.specs}
        return mid

    def _aliases(self, s: _Session, device: str) -> dict[str, tuple[int, int]]:
        schema = self.schema
        assert schema is not None  # noqa: S101
        base = s.bases[device]
        return {spec.name: (base + i + 1, spec.datatype) for i, spec in enumerate(schema.specs)}

    def _flush(self, t: _NodeTransport, s: _Session) -> None:
        while len(self._writing) < _MAX_WRITING:
            rows = self.outbox.after(self._cursor, _READ)
            if not rows:
                return
            with t.publishing() as up:
                if not up or t.connects != s.connection or self._session is not s:
                    return
                for row in rows:
                    self._hand_over(t, s, row.id, row.topic, row.payload, row.created)
                    self._cursor = row.id
            if self._events:
                return  # a rebirth or a STATE first

    def _hand_over(self, t: _NodeTransport, s: _Session, row: int, device: str, blob: bytes,
                   created: float) -> None:
        record = orjson.loads(blob)
        now_ms = int(time.time() * 1000)
        if record.get("death"):
            if device in s.born:
                s.born.discard(device)
                s.sent.pop(device, None)
                mid = t.publish_tracked(self.topic("DDEATH", device),
                                        self._pb.ddeath(now_ms, self._next_seq(s)), 0, False)
                self.counters["device_deaths"] += 1
                if mid is not None:
                    self._writing[mid] = row
                    return
            self.outbox.ack_many([row])
            return
        values: dict[str, Any] = record["v"]
        historical = created < s.started
        if device not in s.born:
            if not historical:
                # A device met live: born with this prediction as its current value.
                mid = self._dbirth(t, s, device, values, now_ms, int(record["t"]))
                if mid is not None:
                    self._writing[mid] = row  # deleted once written, as data is
                return
            # History first needs the device born: with its current (newest) values.
            with self._lock:
                latest = self._latest.get(device)
            self._dbirth(t, s, device, latest[1] if latest else {}, now_ms,
                         latest[0] if latest else None)
        if historical:
            changed = values
            self.counters["historical"] += 1
        else:
            sent = s.sent[device]
            changed = {k: v for k, v in values.items() if sent.get(k, _MISSING) != v}
            sent.update(changed)
        if not changed:
            self.outbox.ack_many([row])
            return
        payload = self._pb.ddata(now_ms, self._next_seq(s), int(record["t"]), changed,
                                 self._aliases(s, device), historical=historical)
        mid = t.publish_tracked(self.topic("DDATA", device), payload, 0, False)
        if mid is not None:
            self._writing[mid] = row

    def _check_stale(self) -> None:
        now = time.monotonic()
        dead: list[str] = []
        with self._lock:
            for device, seen in list(self._activity.items()):
                limit = self.device_timeout_s
                if limit is None:
                    limit = (_STALE_FIRST_S if seen.interval is None
                             else max(_STALE_MIN_S, _STALE_FACTOR * seen.interval))
                if now - seen.last > limit:
                    dead.append(device)
                    del self._activity[device]
                    self._latest.pop(device, None)
        if dead:
            # Through the outbox: each DDEATH follows its device's last data.
            self.outbox.put_many([Outbound(d, b'{"death":true}', 1) for d in dead])

    def _terminate(self, t: _NodeTransport, s: _Session) -> None:
        """The primary host went offline: NDEATH, DISCONNECT, start over (spec 5.4/5.5)."""
        log.warning("sparkplug %s/%s: primary host %s offline; NDEATH, reconnecting, holding "
                    "predictions until it is back", self.group, self.node, self.primary_host)
        with t.publishing() as up:
            if up:
                t.publish(self.topic("NDEATH"), self._pb.ndeath(s.bd_seq), 1, False)
                t.hang_up()
        self._session = None
        self.counters["host_offline"] += 1


_MISSING = object()


def _host_state(payload: bytes) -> tuple[bool, int] | None:
    """(online, timestamp) of a Sparkplug 3.0 STATE payload; None if it is not one."""
    try:
        state = orjson.loads(payload)
        online = state["online"]
        stamp = int(state.get("timestamp", 0))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None
    return (online, stamp) if isinstance(online, bool) else None


class EdgeNodes:
    """The daemon's edge nodes, by (group, node); shared by its generations' outputs."""

    def __init__(self, broker: BrokerConfig, client_id: str, state_dir: Path,
                 outbox: OutboxConfig, gateway: str) -> None:
        self._broker, self._client_id, self._state_dir = broker, client_id, state_dir
        self._outbox, self.gateway = outbox, gateway
        self._lock = threading.Lock()
        self._nodes: dict[tuple[str, str], EdgeNode] = {}
        self._users: dict[tuple[str, str], dict[int, str]] = {}  # key → {id(output): pipeline}
        self._started = False

    def attach(self, user: object, pipeline: str, group: str, node: str,
               primary_host: str | None) -> EdgeNode:
        """The node (GROUP, NODE) for PIPELINE's output USER; made on first use.

        Two pipelines cannot share a node (their devices would collide): ConfigError.
        """
        key = (group, node)
        with self._lock:
            users = self._users.setdefault(key, {})
            others = {p for p in users.values() if p != pipeline}
            if others:
                raise ConfigError(
                    f"pipelines {min(others)!r} and {pipeline!r} both publish as Sparkplug "
                    f"edge node {group}/{node}; give each its own output.edge_node_id"
                )
            found = self._nodes.get(key)
            if found is not None and found.primary_host != primary_host:
                raise ConfigError(f"Sparkplug edge node {group}/{node}: primary_host_id cannot "
                                  "change while it runs; restart the gateway to change it")
            if found is None:
                with contextlib.suppress(OSError):
                    self._state_dir.mkdir(parents=True, exist_ok=True)
                found = EdgeNode(
                    group, node, broker=self._broker, client_id=self._client_id,
                    state_dir=self._state_dir, outbox=self._outbox, primary_host=primary_host,
                    node_metrics={"Properties/Gateway": self.gateway,
                                  "Properties/Pipeline": pipeline,
                                  "Properties/Software": "Floorline"},
                )
                self._nodes[key] = found
                if self._started:
                    found.start()
            users[id(user)] = pipeline
            return found

    def detach(self, user: object, node: EdgeNode, timeout: float = 5.0) -> None:
        """USER no longer publishes through NODE; the last one out stops it (NDEATH)."""
        key = (node.group, node.node)
        with self._lock:
            users = self._users.get(key, {})
            users.pop(id(user), None)
            if users:
                return
            self._users.pop(key, None)
            self._nodes.pop(key, None)
        node.stop(timeout)

    def start(self) -> None:
        """Connect every node (and those attached later)."""
        with self._lock:
            self._started = True
            nodes = list(self._nodes.values())
        for node in nodes:
            node.start()

    def nodes(self) -> list[EdgeNode]:
        """The running nodes."""
        with self._lock:
            return list(self._nodes.values())


def state_files(state_dir: Path, group: str, node: str) -> tuple[Path, Path]:
    """The bdSeq file and outbox file of node GROUP/NODE in STATE_DIR (for tests and tools)."""
    stem = f"sparkplug-{safe_id(group)}-{safe_id(node)}"
    return state_dir / f"{stem}.bdseq", state_dir / f"{stem}.sqlite"


__all__ = ["DeviceSchema", "EdgeNode", "EdgeNodes", "safe_id", "state_files"]
