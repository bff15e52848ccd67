"""``floorline fleet rollout``: a deployment in waves, with its progress retained on the broker.

``start NAME`` resolves the target gateways from their retained reported documents, assigns them
to waves (explicit canary gateways, counts, cumulative percentages), and per wave: remembers
each gateway's previous desired document, publishes one per-gateway document (the same version V
and deployment NAME for the whole rollout), and waits until every gateway of the wave has a
verdict on V or the wave timeout passed (no verdict counts as a failure). More failures than
``--max-failures`` stop the rollout; with ``--rollback-wave`` the wave's gateways that applied V
are then sent their previous configuration again, re-sealed under a newer version.

The progress document is retained on ``floorline/rollouts/{NAME}`` after every change: ``status``
shows it to any operator, ``stop`` asks the running rollout to halt after the current wave's
verdicts (it sets the state to ``stopping``), and ``resume`` continues a stopped rollout.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import math
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floorline.edge.bundle.signing import load_private_key
from floorline.edge.config.model import BrokerConfig
from floorline.edge.errors import FloorlineError
from floorline.edge.fleet.common import (
    EXIT_FAILED,
    EXIT_MISSING,
    EXIT_OK,
    FAILED_RESULTS,
    STDOUT,
    Collector,
    UsageError,
    check_level,
    check_name,
    clean_reported,
    gateway_docs,
    groups_of,
    matches,
    now_ms,
    read_envelope,
    superseded_by,
    verdict,
    verdict_reason,
)
from floorline.edge.fleet.push import (
    DESIRED_FILTERS,
    check_ttl,
    desired_topic,
    prepare,
    publish_all,
    publish_bundles,
    seal_doc,
)

ROLLOUT_TOPIC = "floorline/rollouts/{name}"
FINAL = ("done", "failed")
PUBLISH_EVERY_S = 0.5
"""While a wave waits, new verdicts are published at most this often."""


class RolloutError(FloorlineError):
    """A rollout that cannot start or resume as asked (exit code 1)."""


@dataclass(frozen=True)
class WaveSpec:
    """One ``--waves`` value: NAME:gw1,gw2 | [NAME:]N | [NAME:]P%."""

    name: str
    gateways: tuple[str, ...] = ()
    count: int | None = None
    percent: float | None = None


def parse_wave(text: str, index: int) -> WaveSpec:
    """Parse one ``--waves`` value; UsageError naming it."""
    name, sep, rest = text.partition(":")
    if not sep:
        name, rest = "", text
    name, rest = name.strip(), rest.strip()
    if name:
        check_name(name, "--waves name")
    if re.fullmatch(r"\d+(\.\d+)?%", rest):
        pct = float(rest[:-1])
        if not 0 < pct <= 100:
            raise UsageError(f"--waves {text}: a percentage is more than 0 and at most 100")
        return WaveSpec(name or rest, percent=pct)
    if rest.isdigit():
        if int(rest) < 1:
            raise UsageError(f"--waves {text}: a wave needs at least one gateway")
        return WaveSpec(name or f"wave{index + 1}", count=int(rest))
    gateways = tuple(g.strip() for g in rest.split(",") if g.strip())
    if not sep or not gateways:
        raise UsageError(f"--waves {text!r}: expected NAME:gw1,gw2 or [NAME:]COUNT or "
                         "[NAME:]PERCENT%")
    for g in gateways:
        check_level(g, f"--waves {name}: gateway")
    return WaveSpec(name, gateways=gateways)


def parse_threshold(text: str) -> tuple[str, float]:
    """``--max-failures``: ('count', N) or ('percent', P)."""
    t = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?%", t) and float(t[:-1]) <= 100:
        return "percent", float(t[:-1])
    if t.isdigit():
        return "count", float(t)
    raise UsageError(f"--max-failures {text!r}: a count (e.g. 2) or a percentage of the wave "
                     "(e.g. 5%)")


def allowed_failures(threshold: str, size: int) -> float:
    """How many failures a wave of SIZE may have; more stop the rollout."""
    kind, value = parse_threshold(threshold)
    return value if kind == "count" else value * size / 100


def assign(name: str, targets: list[str], specs: list[WaveSpec]) -> list[list[str]]:
    """Gateways per wave: explicit ones first, the rest in a stable order spread by hash."""
    order = sorted(targets, key=lambda g: hashlib.sha256(f"{name}/{g}".encode()).digest())
    known = set(targets)
    explicit = {g for s in specs for g in s.gateways}
    for g in sorted(explicit - known):
        raise UsageError(f"--waves: gateway {g} is not in the target set")
    taken: set[str] = set()
    waves: list[list[str]] = []
    for spec in specs:
        if spec.gateways:
            wave = [g for g in spec.gateways if g not in taken]
        else:
            rest = [g for g in order if g not in taken and g not in explicit]
            if spec.percent is not None:
                want = math.ceil(spec.percent * len(order) / 100 - 1e-9)
                n = max(0, want - len(taken))
            else:
                n = spec.count or 0
            wave = rest[:n]
        taken.update(wave)
        waves.append(wave)
    return waves


def _iso(ts: float | None = None) -> str:
    return dt.datetime.fromtimestamp(ts or time.time(), dt.timezone.utc).isoformat(
        timespec="seconds")


def operator_name() -> str:
    """Who runs this command: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()}"


def malformed(doc: dict[str, Any]) -> str | None:
    """What is wrong with a retained rollout document (None: it can be shown and resumed).

    Anyone who may publish on floorline/rollouts/NAME can leave a broken document there;
    ``status`` and ``resume`` name it instead of failing with a traceback.
    """
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    checks: list[tuple[str, bool]] = [
        ("name", isinstance(doc.get("name"), str)),
        ("state", isinstance(doc.get("state"), str)),
        ("version", isinstance(doc.get("version"), int) and not isinstance(doc.get("version"), bool)
         and doc["version"] > 0),
        ("config", isinstance(doc.get("config"), dict)),
        ("bundles", isinstance(doc.get("bundles"), list)
         and all(isinstance(b, str) for b in doc["bundles"])),
        ("ttl_hours", number(doc.get("ttl_hours")) and doc["ttl_hours"] > 0),
        ("wave_timeout_s", number(doc.get("wave_timeout_s")) and doc["wave_timeout_s"] > 0),
        ("max_failures", isinstance(doc.get("max_failures"), str)),
        ("previous", isinstance(doc.get("previous", {}), dict)),
        ("previous_docs", isinstance(doc.get("previous_docs", {}), dict) and all(
            isinstance(p, dict) and isinstance(p.get("config"), dict)
            and isinstance(p.get("bundles"), list) and isinstance(p.get("deployment"), str)
            for p in (doc.get("previous_docs") or {}).values())),
        ("waves", isinstance(doc.get("waves"), list) and all(
            isinstance(w, dict) and isinstance(w.get("name"), str)
            and isinstance(w.get("state"), str)
            and isinstance(w.get("gateways"), list)
            and all(isinstance(g, str) for g in w["gateways"])
            and isinstance(w.get("verdicts", {}), dict)
            and isinstance(w.get("rollback") or {}, dict)
            and all(isinstance(v, dict) and isinstance(v.get("result"), str)
                    for v in w.get("verdicts", {}).values())
            for w in doc["waves"])),
    ]
    bad = [k for k, ok in checks if not ok]
    if not bad and doc["max_failures"]:
        try:
            parse_threshold(doc["max_failures"])
        except UsageError:
            bad.append("max_failures")
    return f"malformed {', '.join(bad)}" if bad else None


def rollout_bundles(payload: bytes) -> set[str]:
    """Bundle digests a retained rollout document needs (its config and the previous ones)."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return set()
    if not isinstance(doc, dict):
        return set()
    def listed(value: Any) -> set[str]:
        return {str(b) for b in value} if isinstance(value, list) else set()

    refs = listed(doc.get("bundles"))
    previous = doc.get("previous_docs")
    for prev in previous.values() if isinstance(previous, dict) else ():
        if isinstance(prev, dict):
            refs |= listed(prev.get("bundles"))
    return {r.removeprefix("sha256:") for r in refs}


def _applies(topic: str, body: dict[str, Any], gw: str, rep: dict[str, Any]) -> bool:
    target = body.get("target")
    if not isinstance(target, dict):
        return False
    if topic == f"floorline/{gw}/desired":
        return target.get("gateway") == gw
    if topic.startswith("floorline/groups/"):
        groups = groups_of(rep)
        return groups is None or target.get("group") in groups
    if topic.startswith("floorline/selectors/"):
        selector = target.get("selector")
        return isinstance(selector, dict) and matches(selector, rep.get("attributes") or {})
    return False


class Runner:
    """Runs (or continues) the rollout described by DOC on an already collecting connection."""

    def __init__(self, doc: dict[str, Any], *, key: Ed25519PrivateKey, col: Collector,
                 out: Any, interrupt: threading.Event | None = None,
                 prior_run_id: str | None = None) -> None:
        self.doc = doc
        self.key = key
        self.col = col
        self.out = out
        self.interrupt = interrupt or threading.Event()
        self.topic = ROLLOUT_TOPIC.format(name=doc["name"])
        self.remote_stop: str | None = None
        self._published = 0.0
        self._dirty = False
        self._prior = prior_run_id
        self._own_echo = threading.Event()
        self.rival: str | None = None
        """Who started or resumed this rollout just before us (first on the broker wins)."""
        col.add_hook(self._on_message)
        current = col.get(self.topic)
        if current:
            self._on_message(self.topic, current)

    # -- stop requests and rivals ----------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic != self.topic or not payload:
            return
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if isinstance(body, dict) and body.get("run_id") not in (None, self._prior):
            if body.get("run_id") == self.doc["run_id"]:
                self._own_echo.set()
            elif body.get("state") == "running":
                if not self._own_echo.is_set():
                    # Another operator's run reached the broker first: it goes on, we leave.
                    self.rival = self.rival or str(body.get("resumed_by")
                                                   or body.get("started_by") or "?")
                else:
                    self._dirty = True  # the loser overwrote our document once: publish again
        if (isinstance(body, dict) and body.get("state") == "stopping"
                and body.get("run_id") == self.doc["run_id"] and self.remote_stop is None):
            self.remote_stop = str(body.get("stop_requested_by") or "another operator")

    def stop_requested(self) -> str | None:
        """Who asked this rollout to stop (None: nobody)."""
        if self.interrupt.is_set():
            return "Ctrl-C"
        return self.remote_stop

    # -- the retained progress document ----------------------------------------------------

    def event(self, what: str) -> None:
        """Add WHAT to the document's log (and print it)."""
        self.doc.setdefault("log", []).append({"ts": _iso(), "event": what})
        self.doc["log"] = self.doc["log"][-50:]
        print(what, file=self.out)

    def publish(self, *, wait: bool = True) -> None:
        """Publish the progress document retained (WAIT: until the broker acknowledged it)."""
        if self.stop_requested() and self.doc["state"] == "running":
            self.doc["state"] = "stopping"
            self.doc.setdefault("stop_requested_by", self.stop_requested())
        self.doc["updated_at"] = _iso()
        payload = orjson.dumps(self.doc)
        assert self.col.transport is not None  # noqa: S101 - started by the caller
        if wait:
            publish_all(self.col.transport, [(self.topic, payload)])
        else:
            self.col.transport.publish(self.topic, payload, 1, True)
        self._published = time.monotonic()
        self._dirty = False

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> int:
        """Run the remaining waves; the exit code (0 done, 1 failed, 3 stopped)."""
        doc = self.doc
        started = time.monotonic()
        self.publish()
        # Two operators resuming (or starting) the same rollout at once: the broker orders
        # their documents, and every runner sees that order; the first one runs the waves.
        self._own_echo.wait(10.0)
        if self.rival is not None:
            raise RolloutError(
                f"rollout {doc['name']} was {'resumed' if self._prior else 'started'} by "
                f"{self.rival} a moment before this command: it runs there; nothing was pushed "
                f"here (floorline fleet rollout status {doc['name']})")
        waves = doc["waves"]
        for i, wave in enumerate(waves):
            if wave["state"] in ("done", "empty"):
                continue
            who = self.stop_requested()
            if who:
                return self._halt(i, who)
            doc["current_wave"] = i
            if not wave["gateways"]:
                wave["state"] = "empty"
                self.publish()
                continue
            if not self._run_wave(i, wave):
                return EXIT_FAILED
        doc["state"] = "done"
        doc["current_wave"] = None
        total = sum(len(w["gateways"]) for w in waves)
        self.event(f"rollout {doc['name']} done: version {doc['version']} on {total} gateway(s) "
                   f"in {len(waves)} wave(s) ({time.monotonic() - started:.1f} s)")
        self.publish()
        return EXIT_OK

    def _halt(self, index: int, who: str) -> int:
        doc = self.doc
        doc["state"] = "stopped"
        doc["reason"] = f"stopped by {who} before wave {index + 1}"
        self.event(f"rollout {doc['name']} stopped before wave {index + 1}/{len(doc['waves'])} "
                   f"({who}); floorline fleet rollout resume {doc['name']} continues it")
        self.publish()
        return EXIT_MISSING

    def _label(self, index: int) -> str:
        return f"wave {index + 1}/{len(self.doc['waves'])} {self.doc['waves'][index]['name']}"

    def _run_wave(self, index: int, wave: dict[str, Any]) -> bool:
        doc = self.doc
        label = self._label(index)
        wave["state"] = "running"
        wave.setdefault("started_at", _iso())
        wave.setdefault("verdicts", {})
        self._capture_previous(wave["gateways"])
        self.publish()  # the previous documents are safe before anything is replaced
        version = int(doc["version"])
        todo = [g for g in wave["gateways"] if g not in wave["verdicts"]]
        t0 = time.monotonic()
        self._push(todo, version, doc["config"], doc["bundles"], doc["name"])
        self.event(f"{label}: version {version} pushed to {len(todo)} gateway(s); waiting up to "
                   f"{doc['wave_timeout_s']:g} s for their verdicts")
        self._wait(wave["gateways"], version, wave["verdicts"])
        wave["seconds"] = round(time.monotonic() - t0, 2)
        failed = sorted(g for g, v in wave["verdicts"].items()
                        if v["result"] in (*FAILED_RESULTS, "timeout", "superseded"))
        allowed = allowed_failures(doc["max_failures"], len(wave["gateways"]))
        wave["failures"] = len(failed)
        counts = _counts(wave["verdicts"])
        self.event(f"{label}: {counts} ({wave['seconds']:.1f} s)")
        for g in failed:
            v = wave["verdicts"][g]
            print(f"  {g}: {v['result']}: {v['reason']}", file=self.out)
        wave["finished_at"] = _iso()
        if len(failed) > allowed:
            wave["state"] = "failed"
            doc["state"] = "failed"
            doc["reason"] = (f"{label}: {len(failed)} of {len(wave['gateways'])} gateways failed "
                             f"(--max-failures {doc['max_failures']})")
            self.event(f"rollout {doc['name']} stopped: {doc['reason']}; later waves untouched")
            self.publish()
            if doc.get("rollback_wave"):
                self._rollback(index, wave)
            return False
        wave["state"] = "done"
        self.publish()
        return True

    def _capture_previous(self, gateways: list[str]) -> None:
        """Remember, per gateway, the desired document it runs now (before V replaces it)."""
        doc = self.doc
        prev = doc.setdefault("previous", {})
        docs = doc.setdefault("previous_docs", {})
        snap = self.col.snapshot()
        reps = gateway_docs({t: p for t, p in snap.items() if t.endswith("/reported")})
        desired = [(t, read_envelope(p)) for t, p in snap.items() if t.endswith("/desired")]
        for gw in gateways:
            if gw in prev:
                continue
            rep = (reps.get(gw) or {}).get("reported") or {}
            running = rep.get("running_version")
            if running is None or running == doc["version"]:
                prev[gw] = None
                continue
            found = [b for t, b in desired
                     if b is not None and b.get("version") == running and _applies(t, b, gw, rep)]
            if not found:
                prev[gw] = None
                print(f"  {gw}: the document of its running version {running} is no longer "
                      "retained; a rollback would run its local file", file=self.out)
                continue
            body = found[0]
            prev[gw] = running
            docs.setdefault(str(running), {
                "config": body.get("config") or {},
                "bundles": [str(b) for b in body.get("bundles") or []],
                "deployment": str(body.get("deployment") or ""),
            })

    def _push(self, gateways: list[str], version: int, config: dict[str, Any],
              bundles: list[str], deployment: str, per_gateway: dict[str, Any] | None = None,
              ) -> None:
        messages = []
        ttl = float(self.doc["ttl_hours"])
        for gw in gateways:
            cfg, bnd, dep = (config, bundles, deployment)
            if per_gateway is not None:
                cfg, bnd, dep = per_gateway[gw]
            target = {"gateway": gw}
            messages.append((desired_topic(target), seal_doc(
                self.key, version=version, target=target, config=cfg, bundles=bnd,
                ttl_hours=ttl, deployment=dep)))
        assert self.col.transport is not None  # noqa: S101
        publish_all(self.col.transport, messages, timeout=120.0)

    def _wait(self, gateways: list[str], version: int, verdicts: dict[str, Any]) -> None:
        """Until every gateway has a verdict on VERSION or the wave timeout; fills VERDICTS."""
        deadline = time.monotonic() + float(self.doc["wave_timeout_s"])
        pending = [g for g in gateways if g not in verdicts]
        while pending and time.monotonic() < deadline:
            for gw in list(pending):
                rep = self._reported(gw)
                v = verdict(rep, version) if rep else None
                newer = superseded_by(rep, version) if v is None else None
                if newer is not None:
                    verdicts[gw] = {"result": "superseded",
                                    "reason": f"runs version {newer}, newer than {version}: it "
                                              f"ignores {version}"}
                    pending.remove(gw)
                    self._dirty = True
                    continue
                if v in (None, "pending"):
                    continue
                verdicts[gw] = {"result": v, "reason": verdict_reason(rep, version)[:200]}
                pending.remove(gw)
                self._dirty = True
            if self._dirty and time.monotonic() - self._published >= PUBLISH_EVERY_S:
                self.publish(wait=False)
            if pending:
                time.sleep(0.05)
        for gw in pending:
            online = self._online(gw)
            where = "offline" if online is False else (
                "on probation" if verdict(self._reported(gw), version) == "pending"
                else "no verdict")
            verdicts[gw] = {"result": "timeout",
                            "reason": f"{where} after {self.doc['wave_timeout_s']:g} s"}

    def _reported(self, gw: str) -> dict[str, Any]:
        payload = self.col.get(f"floorline/{gw}/reported")
        if not payload:
            return {}
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return {}
        return clean_reported(body) if isinstance(body, dict) else {}

    def _online(self, gw: str) -> bool | None:
        payload = self.col.get(f"floorline/{gw}/state")
        if not payload:
            return None
        try:
            return bool(orjson.loads(payload).get("state") == "online")
        except (orjson.JSONDecodeError, AttributeError):
            return None

    def _rollback(self, index: int, wave: dict[str, Any]) -> None:
        """Send the wave's gateways that applied V their previous configuration again."""
        doc = self.doc
        applied = sorted(g for g, v in wave["verdicts"].items() if v["result"] == "applied")
        label = self._label(index)
        if not applied:
            self.event(f"{label}: no gateway applied version {doc['version']}: nothing to roll "
                       "back")
            return
        version = max(now_ms(), int(doc["version"]) + 1)
        per: dict[str, Any] = {}
        for gw in applied:
            prev = (doc.get("previous") or {}).get(gw)
            body = (doc.get("previous_docs") or {}).get(str(prev)) if prev is not None else None
            body = body or {"config": {}, "bundles": [], "deployment": ""}
            per[gw] = (body["config"], body["bundles"], body["deployment"])
        wave["rollback"] = {"version": version, "gateways": applied, "verdicts": {},
                            "started_at": _iso()}
        self.publish()
        self._push(applied, version, {}, [], "", per_gateway=per)
        self.event(f"{label}: rolling back {len(applied)} gateway(s) to their previous "
                   f"configuration (version {version})")
        self._wait(applied, version, wave["rollback"]["verdicts"])
        wave["rollback"]["finished_at"] = _iso()
        self.event(f"{label}: rollback: {_counts(wave['rollback']['verdicts'])}")
        self.publish()


def _counts(verdicts: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for v in verdicts.values():
        counts[v["result"]] = counts.get(v["result"], 0) + 1
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "no gateway"


def _filters(name: str) -> list[str]:
    return ["floorline/+/reported", "floorline/+/state", *DESIRED_FILTERS,
            ROLLOUT_TOPIC.format(name=name)]


def _existing(col: Collector, name: str) -> dict[str, Any] | None:
    payload = col.get(ROLLOUT_TOPIC.format(name=name))
    if not payload:
        return None
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def resolve_targets(col: Collector, target: dict[str, Any], *, skip_offline: bool,
                    out: Any) -> list[str]:
    """The target gateways, from the retained reported documents (attributes, groups)."""
    gws = gateway_docs(col.snapshot())
    if "gateways" in target:
        chosen = list(dict.fromkeys(target["gateways"]))
        unknown = [g for g in chosen if "reported" not in gws.get(g, {})]
        if unknown:
            print(f"note: {len(unknown)} gateway(s) never reported: {', '.join(unknown[:10])}"
                  f"{' …' if len(unknown) > 10 else ''}", file=out)
    elif "selector" in target:
        chosen = [g for g, d in gws.items()
                  if matches(target["selector"], (d.get("reported") or {}).get("attributes")
                             or {})]
    else:
        members = {g: groups_of(d.get("reported") or {}) for g, d in gws.items()}
        if all(m is None for m in members.values()):
            raise UsageError("--group: the gateways do not report their groups; target the "
                             "rollout with --selector or --gateway")
        chosen = [g for g, m in members.items() if m and target["group"] in m]
    if skip_offline:
        off = [g for g in chosen if (gws.get(g, {}).get("state") or {}).get("state") != "online"]
        if off:
            print(f"skipping {len(off)} offline gateway(s): {', '.join(sorted(off)[:10])}",
                  file=out)
        chosen = [g for g in chosen if g not in off]
    if not chosen:
        raise RolloutError(f"no gateway matches the target {target}")
    return sorted(chosen)


def start(
    *,
    name: str,
    config_file: Path,
    bundles: list[Path],
    key_file: Path,
    broker: BrokerConfig,
    target: dict[str, Any],
    waves: list[str],
    max_failures: str = "0",
    rollback_wave: bool = False,
    wave_timeout_s: float = 600.0,
    ttl_hours: float = 168.0,
    sign_bundles: bool = False,
    verify: bool = True,
    skip_offline: bool = False,
    version: int | None = None,
    out: Any = STDOUT,
    interrupt: threading.Event | None = None,
) -> int:
    """Start rollout NAME and run it to its end (or a stop); the exit code."""
    check_name(name, "rollout name")
    check_ttl(ttl_hours)
    if not waves:
        raise UsageError("--waves: give at least one wave (e.g. --waves canary:gw1 --waves 100%)")
    specs = [parse_wave(w, i) for i, w in enumerate(waves)]
    parse_threshold(max_failures)
    if not wave_timeout_s > 0:
        raise UsageError(f"--wave-timeout-s {wave_timeout_s:g}: must be more than 0")
    key = load_private_key(key_file)
    prepared = prepare(config_file, bundles, key, sign_bundles=sign_bundles, verify=verify)
    with Collector(broker, _filters(name), "rollout") as col:
        col.start(cap_s=30.0)
        old = _existing(col, name)
        if old is not None and old.get("state") not in FINAL:
            raise RolloutError(
                f"rollout {name} exists and is {old.get('state')} (started by "
                f"{old.get('started_by')} at {old.get('started_at')}): resume it, or clear it "
                f"with floorline fleet clear --rollout {name}")
        targets = resolve_targets(col, target, skip_offline=skip_offline, out=out)
        assignment = assign(name, targets, specs)
        uncovered = len(targets) - sum(len(w) for w in assignment)
        assert col.transport is not None  # noqa: S101
        publish_bundles(col.transport, prepared.archives, out)
        doc: dict[str, Any] = {
            "name": name,
            "deployment": name,
            "version": version if version is not None else now_ms(),
            "state": "running",
            "run_id": uuid.uuid4().hex,
            "started_by": operator_name(),
            "started_at": _iso(),
            "target": target,
            "config": prepared.config,
            "bundles": prepared.bundles,
            "ttl_hours": ttl_hours,
            "max_failures": max_failures,
            "rollback_wave": rollback_wave,
            "wave_timeout_s": wave_timeout_s,
            "waves": [{"name": s.name, "gateways": gws, "state": "pending", "verdicts": {}}
                      for s, gws in zip(specs, assignment, strict=True)],
            "current_wave": 0,
            "previous": {},
            "previous_docs": {},
            "log": [],
        }
        sizes = ", ".join(f"{w['name']} {len(w['gateways'])}" for w in doc["waves"])
        runner = Runner(doc, key=key, col=col, out=out, interrupt=interrupt)
        runner.event(f"rollout {name}: version {doc['version']} to {len(targets)} gateway(s) in "
                     f"{len(specs)} wave(s): {sizes}")
        if uncovered:
            print(f"note: {uncovered} target gateway(s) are in no wave (end with --waves 100% "
                  "to cover them all)", file=out)
        return runner.run()


def resume(*, name: str, key_file: Path, broker: BrokerConfig, force: bool = False,
           out: Any = STDOUT, interrupt: threading.Event | None = None) -> int:
    """Continue a stopped rollout from its retained document; the exit code."""
    check_name(name, "rollout name")
    key = load_private_key(key_file)
    with Collector(broker, _filters(name), "rollout") as col:
        col.start(cap_s=30.0)
        doc = _existing(col, name)
        if doc is None:
            raise RolloutError(f"no rollout {name} on this broker")
        problem = malformed(doc)
        if problem:
            raise RolloutError(f"rollout {name}: its retained document is not one this command "
                               f"wrote ({problem}); nothing to resume. Clear it with floorline "
                               f"fleet clear --rollout {name}")
        state = doc.get("state")
        if state == "done":
            raise RolloutError(f"rollout {name} is done; nothing to resume")
        if state == "running" and not force:
            raise RolloutError(
                f"rollout {name} is running (started by {doc.get('started_by')}, last update "
                f"{doc.get('updated_at')}); if its operator is gone, stop it first (floorline "
                f"fleet rollout stop {name}) or resume with --force")
        if state == "failed" and not force:
            raise RolloutError(f"rollout {name} failed ({doc.get('reason')}); resume --force "
                               "continues with the next wave anyway")
        for wave in doc["waves"]:
            if wave["state"] == "failed":
                wave["state"] = "done"  # forced past it
        prior = doc.get("run_id")
        doc.update(state="running", run_id=uuid.uuid4().hex, reason="",
                   resumed_by=operator_name(), resumed_at=_iso())
        doc.pop("stop_requested_by", None)
        runner = Runner(doc, key=key, col=col, out=out, interrupt=interrupt,
                        prior_run_id=str(prior) if prior is not None else None)
        runner.event(f"rollout {name} resumed by {doc['resumed_by']} (was {state})")
        return runner.run()


def stop(*, name: str, broker: BrokerConfig, out: Any = STDOUT) -> int:
    """Ask the running rollout to halt after its current wave's verdicts."""
    check_name(name, "rollout name")
    with Collector(broker, [ROLLOUT_TOPIC.format(name=name)], "rollout-stop") as col:
        col.start()
        doc = _existing(col, name)
        if doc is None:
            raise RolloutError(f"no rollout {name} on this broker")
        if doc.get("state") != "running":
            print(f"rollout {name} is {doc.get('state')}; nothing to stop", file=out)
            return EXIT_OK
        doc["state"] = "stopping"
        doc["stop_requested_by"] = operator_name()
        doc["stop_requested_at"] = _iso()
        assert col.transport is not None  # noqa: S101
        publish_all(col.transport, [(ROLLOUT_TOPIC.format(name=name), orjson.dumps(doc))])
    print(f"rollout {name}: stop requested; it halts after the verdicts of its current wave "
          f"(floorline fleet rollout status {name})", file=out)
    return EXIT_OK


def _state_code(state: str | None) -> int:
    if state == "failed":
        return EXIT_FAILED
    if state in ("stopped", "stopping"):
        return EXIT_MISSING
    return EXIT_OK


def show(*, broker: BrokerConfig, name: str | None = None, as_json: bool = False,
         out: Any = STDOUT) -> int:
    """Print one rollout in detail, or every retained rollout in a line each; the exit code."""
    if name is not None:
        check_name(name, "rollout name")
    with Collector(broker, [ROLLOUT_TOPIC.format(name=name or "+")], "rollout-status") as col:
        col.start()
        docs = {}
        for topic, payload in col.snapshot().items():
            try:
                body = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if isinstance(body, dict):
                docs[topic.rsplit("/", 1)[-1]] = body
    if name is not None and name not in docs:
        raise RolloutError(f"no rollout {name} on this broker")
    if as_json:
        print(orjson.dumps(docs[name] if name else docs, option=orjson.OPT_INDENT_2).decode(),
              file=out)
    elif name is None:
        if not docs:
            print("no rollouts on this broker", file=out)
        for n, d in sorted(docs.items()):
            problem = malformed(d)
            if problem:
                print(f"{n}: not a rollout document ({problem}); floorline fleet clear "
                      f"--rollout {n} removes it", file=out)
                continue
            done = sum(1 for w in d.get("waves", []) if w.get("state") in ("done", "empty"))
            print(f"{n}: {d.get('state')}, version {d.get('version')}, {done}/"
                  f"{len(d.get('waves', []))} waves done, started by {d.get('started_by')} at "
                  f"{d.get('started_at')}, updated {d.get('updated_at')}", file=out)
    elif malformed(docs[name]):
        print(f"rollout {name}: not a rollout document ({malformed(docs[name])}); floorline "
              f"fleet clear --rollout {name} removes it", file=out)
    else:
        _print_rollout(docs[name], out)
    if name is not None:
        return EXIT_FAILED if malformed(docs[name]) else _state_code(docs[name].get("state"))
    states = ["failed" if malformed(d) else d.get("state") for d in docs.values()]
    return max((_state_code(s) for s in states), default=EXIT_OK,
               key=lambda c: {EXIT_OK: 0, EXIT_MISSING: 1, EXIT_FAILED: 2}[c])


def _print_rollout(d: dict[str, Any], out: Any) -> None:
    print(f"rollout {d.get('name')}: {d.get('state')}"
          + (f" ({d['reason']})" if d.get("reason") else ""), file=out)
    print(f"  version {d.get('version')}, deployment {d.get('deployment')}, target "
          f"{d.get('target')}", file=out)
    print(f"  started by {d.get('started_by')} at {d.get('started_at')}, updated "
          f"{d.get('updated_at')}"
          + (f", stop requested by {d['stop_requested_by']}" if d.get("stop_requested_by")
             else ""), file=out)
    print(f"  max failures {d.get('max_failures')} per wave, wave timeout "
          f"{d.get('wave_timeout_s')} s, rollback wave: "
          f"{'yes' if d.get('rollback_wave') else 'no'}", file=out)
    for i, w in enumerate(d.get("waves", [])):
        verdicts = w.get("verdicts") or {}
        line = (f"  wave {i + 1} {w.get('name')}: {w.get('state')}, {len(w.get('gateways', []))} "
                f"gateway(s)")
        if verdicts:
            line += f": {_counts(verdicts)}"
        print(line, file=out)
        for g, v in sorted(verdicts.items()):
            if v.get("result") != "applied":
                print(f"    {g}: {v.get('result')}: {v.get('reason')}", file=out)
        rb = w.get("rollback")
        if rb:
            print(f"    rollback to the previous configuration (version {rb.get('version')}) on "
                  f"{len(rb.get('gateways', []))} gateway(s): {_counts(rb.get('verdicts') or {})}",
                  file=out)
