"""The closed loop, walked end to end: a fault the model never saw, drift, labels, retraining, push.

What a Floorline user does when the plant changes under a model, with the product's own commands
(each run as a subprocess, as a user would type it) on the simulated plant:

1. a gateway runs the example bundle, with drift detection and capture (keep every window for a
   while) on its pipeline, and accepts fleet pushes signed with an operator key;
2. commissioning: the plant runs healthy; ``floorline capture export`` of that period is the
   plant's normal operation, and the example model, converted with it as its drift reference
   (``pdm --reference-data``), is pushed with ``floorline fleet push --wait``. (The committed
   example bundle has no drift reference; a reference made of the synthetic training classes,
   three quarters faults on many random machines, would read this healthy plant as drifting:
   docs/monitoring.md, Closing the loop.)
3. one pump develops a bearing inner-race defect, a condition the model was not trained on: it
   reads it as an outer-race defect or as healthy, but the input statistics move and the gateway
   alerts on ``floorline/{gateway}/alerts/{pipeline}``;
4. the maintenance team confirms the defect: the operator labels the last minutes of that pump
   over MQTT (``floorline/{gateway}/capture/label``), ``floorline capture export --label``
   writes the labelled windows, and ``pdm --extra-data`` retrains the example model with a fifth
   class, ``bearing_inner_race``;
5. ``floorline fleet push --wait`` sends the new bundle; the pump's predictions now say
   ``bearing_inner_race`` while the healthy pumps stay healthy.

Run it (TensorFlow needed, as for any training: ``pip install 'floorline[convert,demo]'``)::

    python -m floorline.converter.examples.closed_loop --workdir /tmp/loop [--short]
        [--broker HOST:PORT]

Without ``--broker`` it uses a broker at localhost:1883 when one answers, else starts the embedded
one, as ``floorline demo`` does. ``--short`` (the form ``tests/test_closed_loop.py`` runs) keeps
every period to seconds and trains with ``pdm --quick``: about a minute and a half on two cores.
The plant publishes in real time (1 kHz per pump, the simulator's own clock), so the windows'
timestamps are wall-clock times and "the last N seconds" of a label means what it says.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import shlex
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from floorline.edge.demo.signals import Condition

__all__ = ["Outcome", "Timing", "WalkError", "main", "walk"]

PIPELINE = "vibration"
NEW_LABEL = Condition.BEARING_INNER_RACE.value
ASSETS = 4
"""Pumps in the plant. Drift is judged over the whole pipeline: one faulty pump in four moves the
window statistics well past the level (per-asset drift would compare each pump with a reference
made of all of them, and flag healthy ones)."""
FAULTY = "pump-03"
SEED = 7


@dataclass(frozen=True)
class Timing:
    """How long each period of the walk lasts (seconds of wall time, the plant's clock)."""

    commission_s: float
    """The healthy run whose windows become the drift reference."""
    fault_start_s: float
    """From the faulty run's start to the fault's onset."""
    fault_ramp_s: float
    """The fault's growth to full severity."""
    collect_s: float
    """Developed fault labelled before retraining (from 30 % severity on)."""
    judge_s: float
    """Predictions of the new bundle counted at the end."""
    probation_s: float
    drift_window_s: float
    drift_interval_s: float
    drift_min_windows: int
    quick: bool
    timeout_s: float
    """Longest wait for any one event (an alert, a verdict, a prediction)."""


# min_windows: PSI of two samples of one distribution is about 9 x (1/n + 1/m) with 10 bins;
# 300 live windows against ~1000 reference ones keep it near 0.04, far from the 0.25 level.
SHORT = Timing(commission_s=8, fault_start_s=4, fault_ramp_s=3, collect_s=10, judge_s=2,
               probation_s=2, drift_window_s=6, drift_interval_s=1, drift_min_windows=300,
               quick=True, timeout_s=90)
LONG = Timing(commission_s=60, fault_start_s=30, fault_ramp_s=30, collect_s=60, judge_s=10,
              probation_s=10, drift_window_s=60, drift_interval_s=5, drift_min_windows=200,
              quick=False, timeout_s=600)

_GATEWAY = """\
gateway: {{id: {gateway}}}
state_dir: "{state_dir}"
broker: {{host: "{host}", port: {port}, keepalive: 15}}
trust:
  trusted_keys: ["{pub}"]     # bundles pushed with --sign-bundles
  require_signature: false    # the local example bundle is unsigned
fleet:
  enabled: true
  operator_keys: ["{pub}"]
  probation_s: {probation_s:g}
"""

_PIPELINE = """\
pipelines:
  - name: {pipeline}
    subscribe: ["plant/{line}/+/vibration"]
    bundle: "{bundle}"
    backend: onnx
    decoder: {{type: json, samples: samples, timestamp: ts, sequence: seq}}
    asset: {{topic_segment: -2}}
    # The plant is restarted between commissioning and the faulty run: a sequence number that
    # starts over is a new run, not a duplicate.
    window: {{hop: 32, max_gap_s: 0.05, max_seq_rewind: 100}}
    batch: {{max_batch: 32, max_wait_ms: 5}}
    drift: {{window_s: {window_s:g}, interval_s: {interval_s:g}, min_windows: {min_windows}}}
    # Every window for 10 minutes, so that a label for the last minutes finds them.
    capture: {{keep_recent_s: 600, before: 0, after: 0}}
"""


class WalkError(RuntimeError):
    """A step of the walk failed; the message says which, with the command's output."""


@dataclass
class Outcome:
    """What the walk saw, for a test to judge and a user to read."""

    gateway: str = ""
    broker: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per step."""
    reference_windows: int = 0
    healthy_drift: list[dict[str, Any]] = field(default_factory=list)
    """Drift messages of the new bundle on the healthy plant (before the fault)."""
    alert: dict[str, Any] | None = None
    drift_at_alert: dict[str, Any] | None = None
    drift_scores: list[tuple[float, str, float | None]] = field(default_factory=list)
    """(seconds since the fault's onset, status, score) of every drift message of the walk."""
    old_labels: collections.Counter[str] = field(default_factory=collections.Counter)
    """What the first bundle predicted on the faulty pump once the fault developed."""
    label_command: dict[str, Any] = field(default_factory=dict)
    exported: dict[str, Any] = field(default_factory=dict)
    """The labelled export's summary (its .json)."""
    new_manifest: dict[str, Any] = field(default_factory=dict)
    push_codes: list[int] = field(default_factory=list)
    training: list[str] = field(default_factory=list)
    """The retraining's accuracy lines."""
    final_labels: dict[str, collections.Counter[str]] = field(default_factory=dict)
    """Per pump, the new bundle's labels over ``judge_s``."""
    fleet_status: str = ""


@dataclass(frozen=True)
class _Message:
    topic: str
    payload: bytes
    at: float


class _Watcher:
    """One MQTT client: what the user watches (predictions, drift, alerts) and the label command.

    ``on_message`` runs on paho's thread and only appends.
    """

    def __init__(self, host: str, port: int, gateway: str, line: str) -> None:
        import paho.mqtt.client as mqtt  # noqa: PLC0415 - paho is a gateway dependency
        from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

        self._lock = threading.Lock()
        self._messages: list[_Message] = []
        self._ready = threading.Event()
        self.filters = [
            f"floorline/{gateway}/pred/{PIPELINE}/+",
            f"floorline/{gateway}/drift/{PIPELINE}",
            f"floorline/{gateway}/alerts/{PIPELINE}",
            f"floorline/{gateway}/state",
            f"plant/{line}/{FAULTY}/vibration",
        ]
        self._client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                   client_id=f"closed-loop-{uuid.uuid4().hex[:8]}")
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.connect(host, port, keepalive=30)
        self._client.loop_start()
        if not self._ready.wait(10):
            self.close()
            raise WalkError(f"could not subscribe at the broker {host}:{port}")

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any,
                    _props: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            return
        client.subscribe([(f, 1) for f in self.filters])
        self._ready.set()

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        with self._lock:
            self._messages.append(_Message(msg.topic, bytes(msg.payload), time.time()))

    def since(self, index: int) -> tuple[int, list[_Message]]:
        """Messages from INDEX on, and the index after them."""
        with self._lock:
            return len(self._messages), self._messages[index:]

    def mark(self) -> int:
        """The index of the next message."""
        with self._lock:
            return len(self._messages)

    def wait_for(self, what: str, test: Callable[[_Message], bool], timeout: float,
                 start: int = 0, on_each: Callable[[_Message], None] | None = None) -> _Message:
        """The first message from START on for which TEST holds; WalkError after TIMEOUT."""
        deadline = time.monotonic() + timeout
        index = start
        while True:
            index, new = self.since(index)
            for m in new:
                if on_each is not None:
                    on_each(m)
                if test(m):
                    return m
            if time.monotonic() > deadline:
                raise WalkError(f"no {what} within {timeout:g} s")
            time.sleep(0.05)

    def publish(self, topic: str, payload: bytes) -> None:
        info = self._client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def _json(m: _Message) -> dict[str, Any]:
    try:
        doc = orjson.loads(m.payload)
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _asset(m: _Message) -> str:
    return m.topic.rsplit("/", 1)[-1]


def _brief(value: Any) -> Any:
    # What a reader needs of a message: scores to 3 decimals, the first two entries of a list.
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _brief(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_brief(v) for v in value[:2]]
    return value


def _excerpt(doc: dict[str, Any], keys: Sequence[str]) -> str:
    return json.dumps({k: _brief(doc[k]) for k in keys if k in doc}, separators=(", ", ": "))


def _window_end(m: _Message) -> float:
    window = _json(m).get("window")
    end = window.get("end") if isinstance(window, dict) else None
    return float(end) if isinstance(end, int | float) else 0.0


class _Walk:
    """The walk's state: processes, files, the watcher, what it printed."""

    def __init__(self, workdir: Path, host: str, port: int, timing: Timing,
                 out: IO[str]) -> None:
        self.dir = workdir
        self.host, self.port = host, port
        self.t = timing
        self.out = out
        tag = uuid.uuid4().hex[:6]
        self.gateway = f"loop-{tag}"
        self.line = f"loop-{tag}"  # a line of its own: no other plant on the broker interferes
        self.outcome = Outcome(gateway=self.gateway, broker=f"{host}:{port}")
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.state_dir = workdir / "state"
        self.key = workdir / "operator.key"
        self.pub = workdir / "operator.pub"
        self.watcher: _Watcher | None = None
        self._step = 0
        self._step_started = 0.0
        self._step_name = ""

    # -- printing ----------------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def step(self, title: str) -> None:
        self._close_step()
        self._step += 1
        self._step_name = title
        self._step_started = time.monotonic()
        self.say(f"\n== {self._step}. {title}")

    def _close_step(self) -> None:
        if self._step_name:
            self.outcome.seconds[self._step_name] = round(
                time.monotonic() - self._step_started, 1)

    def show(self, m: _Message, keys: Sequence[str]) -> None:
        self.say(f"   {m.topic}  {_excerpt(_json(m), keys)}")

    # -- commands ----------------------------------------------------------------------------

    def _argv(self, kind: str, args: Sequence[str]) -> tuple[list[str], str]:
        if kind == "floorline":
            # The console script beside this interpreter (the one `pip install floorline` wrote),
            # else the same entry point through the interpreter.
            script = Path(sys.executable).with_name("floorline")
            command = [str(script)] if script.is_file() else [sys.executable, "-m",
                                                              "floorline.edge"]
            return [*command, *args], f"floorline {shlex.join(args)}"
        module = "floorline.converter.examples.pdm"
        return ([sys.executable, "-m", module, *args],
                f"python -m {module} {shlex.join(args)}")

    def run(self, kind: str, args: Sequence[str], *, log: str | None = None,
            show: Callable[[str], bool] = lambda _line: True, ok: Sequence[int] = (0,),
            timeout: float | None = None) -> tuple[int, str]:
        """Run a command as a user would; print it and the lines SHOW picks from its output."""
        argv, shown = self._argv(kind, args)
        self.say(f"   $ {shown}")
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              check=False, timeout=timeout or self.t.timeout_s * 4)
        output = proc.stdout
        if log is not None:
            (self.dir / log).write_text(output, encoding="utf-8")
        for line in output.splitlines():
            if show(line):
                self.say(f"     {line}")
        if proc.returncode not in ok:
            tail = "\n".join(output.splitlines()[-25:])
            raise WalkError(f"`{shown}` exited with {proc.returncode}:\n{tail}")
        return proc.returncode, output

    def start(self, name: str, kind: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start a long-running command; its output goes to WORKDIR/NAME.log."""
        argv, shown = self._argv(kind, args)
        self.say(f"   $ {shown} &")
        log = (self.dir / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def check_running(self) -> None:
        for name, proc in self.procs:
            if proc.returncode is None and proc.poll() is not None:
                log = (self.dir / f"{name}.log").read_text(errors="replace").splitlines()
                raise WalkError(f"{name} exited with {proc.returncode}:\n" + "\n".join(log[-25:]))

    def log_lines(self, name: str, needle: str) -> list[str]:
        path = self.dir / f"{name}.log"
        if not path.exists():
            return []
        return [ln for ln in path.read_text(errors="replace").splitlines() if needle in ln]

    # -- pieces ------------------------------------------------------------------------------

    def pipeline_yaml(self, bundle: str) -> str:
        t = self.t
        return _PIPELINE.format(pipeline=PIPELINE, line=self.line, bundle=bundle,
                                window_s=t.drift_window_s, interval_s=t.drift_interval_s,
                                min_windows=t.drift_min_windows)

    def plant(self, name: str, *more: str) -> subprocess.Popen[bytes]:
        return self.start(name, "floorline", [
            "simulate", "--broker", f"{self.host}:{self.port}", "--assets", str(ASSETS),
            "--line", self.line, "--rate", "1000", "--mode", "block", "--seed", str(SEED),
            *more,
        ])

    def push(self, bundle: Path, deployment: str) -> None:
        desired = self.dir / f"desired-{deployment}.yaml"
        desired.write_text(self.pipeline_yaml(str(bundle)), encoding="utf-8")
        code, _ = self.run("floorline", [
            "fleet", "push", "--gateway", self.gateway, "--config", str(desired),
            "--bundle", str(bundle), "--key", str(self.key), "--sign-bundles",
            "--deployment", deployment, "--wait", "--wait-timeout-s", f"{self.t.timeout_s:g}",
            "--broker", f"{self.host}:{self.port}",
        ], log=f"push-{deployment}.log")
        self.outcome.push_codes.append(code)

    def train(self, name: str, *more: str) -> str:
        keep = ("extra data", "held-out accuracy", "  ", "training took", "card:",
                "drift reference:", "wrote ", "total ")
        _, output = self.run("pdm", [
            "--out", str(self.dir / "bundles" / name), "--work", str(self.dir / f"work-{name}"),
            *(["--quick"] if self.t.quick else []), *more,
        ], log=f"train-{name}.log", show=lambda ln: ln.startswith(keep) and "step" not in ln,
            timeout=self.t.timeout_s * 20)
        return output

    def export(self, out: Path, *more: str) -> dict[str, Any]:
        self.run("floorline", [
            "capture", "export", "--state-dir", str(self.state_dir), "--out", str(out),
            "--pipeline", PIPELINE, *more,
        ])
        summary: dict[str, Any] = json.loads(out.with_suffix(".json").read_text())
        return summary

    def predictions(self, m: _Message) -> bool:
        return m.topic.startswith(f"floorline/{self.gateway}/pred/")

    def version_of(self, m: _Message) -> str | None:
        model = _json(m).get("model")
        return model.get("version") if isinstance(model, dict) else None

    def plant_start(self, w: _Watcher, start: int) -> float:
        """The faulty run's clock origin: its first message's time minus its sequence number."""
        topic = f"plant/{self.line}/{FAULTY}/vibration"
        m = w.wait_for(f"message of {FAULTY}", lambda m: m.topic == topic, self.t.timeout_s,
                       start)
        first = _json(m).get("samples", [{}])[0]
        return float(first["ts"]) - float(first["seq"]) / 1000.0

    # -- the walk ----------------------------------------------------------------------------

    def walk(self) -> Outcome:
        t, o = self.t, self.outcome
        self.dir.mkdir(parents=True, exist_ok=True)
        self.step("an operator key and a gateway that accepts pushes signed with it")
        for old in (self.key, self.pub):
            old.unlink(missing_ok=True)
        self.run("floorline", ["fleet", "keygen", str(self.dir / "operator")])
        config = self.dir / "gateway.yaml"
        config.write_text(_GATEWAY.format(
            gateway=self.gateway, state_dir=self.state_dir, host=self.host, port=self.port,
            pub=self.pub, probation_s=t.probation_s,
        ) + self.pipeline_yaml("example:pdm-classifier"), encoding="utf-8")
        self.say(f"   {config}: gateway {self.gateway}, pipeline {PIPELINE} on "
                 f"plant/{self.line}/+/vibration with drift and capture, fleet enabled")
        self.watcher = w = _Watcher(self.host, self.port, self.gateway, self.line)
        self.start("gateway", "floorline", ["run", "--config", str(config)])
        online = w.wait_for("gateway online", lambda m: m.topic.endswith("/state")
                            and _json(m).get("state") == "online", t.timeout_s)
        self.show(online, ("state", "gateway", "pipelines"))
        for line in self.log_lines("gateway", "drift detection off"):
            self.say(f"   gateway log: {line.strip()}")

        self.step(f"commissioning: {t.commission_s:g} s of the healthy plant, captured")
        mark = w.mark()
        plant = self.plant("plant-commissioning", "--duration", f"{t.commission_s:g}")
        seen: set[str] = set()

        def first_per_asset(m: _Message) -> None:
            if self.predictions(m) and _asset(m) not in seen:
                seen.add(_asset(m))
                self.show(m, ("asset", "label", "scores"))

        w.wait_for("prediction of every pump", lambda _m: len(seen) == ASSETS, t.timeout_s,
                   mark, first_per_asset)
        plant.wait(t.commission_s + t.timeout_s)
        self.check_running()
        normal = self.dir / "plant-normal.npz"
        summary = self._export_when(normal, lambda s: s.get("windows", 0) >= 100)
        o.reference_windows = int(summary["windows"])

        self.step("the example model, converted with the plant's normal operation as its "
                  "drift reference, pushed through the fleet")
        self.train("pdm-1.0.1", "--reference-data", str(normal), "--version", "1.0.1")
        self.push(self.dir / "bundles" / "pdm-1.0.1", "pdm-1-0-1")

        self.step(f"{FAULTY} develops a bearing inner-race defect (the model never saw one)")
        mark = fault_mark = w.mark()
        fault = f"{FAULTY}={NEW_LABEL}@{t.fault_start_s:g}+{t.fault_ramp_s:g}"
        self.plant("plant", "--fault", fault)
        t0 = self.plant_start(w, mark)
        onset = t0 + t.fault_start_s
        last_status = [""]

        def drift_line(m: _Message) -> None:
            if m.topic.endswith(f"/drift/{PIPELINE}"):
                doc = _json(m)
                if m.at < onset and doc.get("status") in ("ok", "drift"):
                    o.healthy_drift.append(doc)
                if doc.get("status") != last_status[0]:
                    last_status[0] = str(doc.get("status"))
                    self.show(m, ("status", "score", "windows", "top"))

        alert = w.wait_for(
            "drift alert", lambda m: m.topic.endswith(f"/alerts/{PIPELINE}")
            and _json(m).get("state") == "drift", t.fault_start_s + t.fault_ramp_s + t.timeout_s,
            mark, drift_line)
        o.alert = _json(alert)
        if alert.at < onset:
            raise WalkError(f"a drift alert before the fault: the reference does not match the "
                            f"healthy plant: {alert.payload.decode(errors='replace')[:500]}")
        self.say(f"   after {alert.at - onset:.1f} s of fault:")
        self.show(alert, ("pipeline", "asset", "state", "score", "level", "windows", "top"))
        _, drifts = w.since(mark)
        stats = [m for m in drifts if m.topic.endswith(f"/drift/{PIPELINE}")
                 and _json(m).get("status") == "drift"]
        o.drift_at_alert = _json(stats[-1]) if stats else None
        developed = onset + 0.3 * t.fault_ramp_s  # where the fault reaches trained severities
        label_from = developed
        label_until = label_from + t.collect_s
        self.say(f"   meanwhile {FAULTY}'s predictions (model 1.0.1 knows no inner race):")
        while time.time() < max(label_until, onset + t.fault_ramp_s + 1):
            self.check_running()
            time.sleep(0.2)
        _, recent = w.since(mark)
        faulty = [m for m in recent if self.predictions(m) and _asset(m) == FAULTY
                  and _window_end(m) >= onset + t.fault_ramp_s]
        o.old_labels = collections.Counter(str(_json(m).get("label")) for m in faulty)
        if faulty:
            self.show(faulty[-1], ("asset", "label", "scores", "drift"))
        shares = ", ".join(f"{k} {v / max(1, len(faulty)):.0%}"
                           for k, v in o.old_labels.most_common())
        self.say(f"   {len(faulty)} predictions of {FAULTY} at full severity: {shares}")

        last_s = math.ceil(time.time() - label_from)
        self.step(f"the operator labels the last {last_s} s of {FAULTY} {NEW_LABEL}; the "
                  "labelled windows are exported")
        command = {"asset": FAULTY, "last_s": last_s, "label": NEW_LABEL, "pipeline": PIPELINE}
        o.label_command = command
        topic = f"floorline/{self.gateway}/capture/label"
        self.say(f"   $ mosquitto_pub -t {topic} -q 1 -m '{json.dumps(command)}'")
        w.publish(topic, orjson.dumps(command))
        captured = self.dir / "captured.npz"
        o.exported = self._export_when(captured, lambda s: s.get("windows", 0) > 0,
                                       "--label", NEW_LABEL)
        for line in self.log_lines("gateway", "capture: label"):
            self.say(f"   gateway log: {line.strip()}")

        self.step("retraining the example model with the captured windows: a fifth class")
        output = self.train("pdm-1.1.0", "--extra-data", str(captured),
                            "--reference-data", str(normal))
        o.training = [ln for ln in output.splitlines()
                      if ln.startswith(("held-out", "  ", "extra data"))]
        manifest = self.dir / "bundles" / "pdm-1.1.0" / "manifest.json"
        o.new_manifest = json.loads(manifest.read_text())
        self.run("floorline", ["inspect", str(manifest.parent)],
                 show=lambda ln: "label" in ln.lower() or "version" in ln.lower()
                 or "reference" in ln.lower())

        self.step("the new bundle pushed through the fleet")
        mark = w.mark()
        self.push(self.dir / "bundles" / "pdm-1.1.0", "pdm-1-1-0")
        new = o.new_manifest["version"]
        first = w.wait_for(f"prediction of {FAULTY} by {new}", lambda m: self.predictions(m)
                           and _asset(m) == FAULTY and self.version_of(m) == new,
                           t.timeout_s, mark)
        self.show(first, ("asset", "label", "scores", "drift"))
        judge_from = w.mark()
        time.sleep(t.judge_s)
        _, after = w.since(judge_from)
        final: dict[str, collections.Counter[str]] = {}
        for m in after:
            if self.predictions(m) and self.version_of(m) == new:
                final.setdefault(_asset(m), collections.Counter())[str(_json(m).get("label"))] += 1
        o.final_labels = final
        for asset in sorted(final):
            n = sum(final[asset].values())
            shares = ", ".join(f"{k} {v / n:.0%}" for k, v in final[asset].most_common(3))
            self.say(f"   {asset}: {n} predictions in {t.judge_s:g} s: {shares}")
        drift_now = [m for m in after if m.topic.endswith(f"/drift/{PIPELINE}")]
        if drift_now:
            self.say(f"   drift with the new bundle ({FAULTY} is still faulty; the reference "
                     "is the healthy plant):")
            self.show(drift_now[-1], ("status", "score", "windows", "top"))
        _, status = self.run("floorline", ["fleet", "status", "--gateway", self.gateway,
                                           "--broker", f"{self.host}:{self.port}"],
                             ok=(0, 1, 3))
        o.fleet_status = status
        _, everything = w.since(fault_mark)
        o.drift_scores = [(round(m.at - onset, 1), str(_json(m).get("status")),
                           _json(m).get("score"))
                          for m in everything if m.topic.endswith(f"/drift/{PIPELINE}")]
        self._close_step()
        self._step_name = ""
        return o

    def _export_when(self, out: Path, ready: Callable[[dict[str, Any]], bool],
                     *more: str) -> dict[str, Any]:
        # The gateway's capture writer stores windows and applies labels on its own thread:
        # export again until what it wrote is there (bounded).
        deadline = time.monotonic() + self.t.timeout_s
        while True:
            summary = self.export(out, *more)
            if ready(summary) or time.monotonic() > deadline:
                return summary
            time.sleep(0.5)

    def close(self) -> None:
        for _, proc in reversed(self.procs):
            self.stop(proc)
        if self.watcher is not None:
            self.watcher.close()


def walk(workdir: Path, host: str, port: int, timing: Timing = SHORT,
         out: IO[str] | None = None) -> Outcome:
    """Walk the loop against the broker at HOST:PORT, files under WORKDIR; the Outcome.

    Raises WalkError (with the failing command's output) when a step fails or times out.
    """
    state = _Walk(workdir, host, port, timing, out or sys.stdout)
    started = time.monotonic()
    try:
        outcome = state.walk()
    finally:
        state.close()
    outcome.seconds["total"] = round(time.monotonic() - started, 1)
    return outcome


@contextlib.contextmanager
def _broker(address: str | None) -> Iterator[tuple[str, int, str]]:
    if address is not None:
        host, _, port = address.rpartition(":")
        yield host or "localhost", int(port), f"broker at {address}"
        return
    from floorline.edge.demo.live import broker  # noqa: PLC0415 - the demo's own broker logic

    with broker() as found:
        yield found


def main(argv: list[str] | None = None) -> int:
    """Walk the loop; 0 when the new label shows in the faulty pump's predictions."""
    parser = argparse.ArgumentParser(
        prog="python -m floorline.converter.examples.closed_loop",
        description="Walk the closed loop: unseen fault, drift alert, labels, retraining, push.",
    )
    parser.add_argument("--workdir", type=Path, required=True,
                        help="directory for keys, configs, logs, captured data and bundles")
    parser.add_argument("--short", action="store_true",
                        help="seconds per period and quick training (about 1.5 minutes)")
    parser.add_argument("--broker", metavar="HOST:PORT",
                        help="the broker (default: localhost:1883 if it answers, else the "
                        "embedded one)")
    args = parser.parse_args(argv)
    timing = SHORT if args.short else LONG
    with _broker(args.broker) as (host, port, description):
        print(f"closed loop ({'short' if args.short else 'long'} form) with the {description}")
        try:
            outcome = walk(args.workdir, host, port, timing)
        except WalkError as exc:
            print(f"\nclosed loop failed: {exc}", file=sys.stderr)
            return 1
    final = outcome.final_labels.get(FAULTY, collections.Counter())
    n = sum(final.values())
    share = final[NEW_LABEL] / n if n else 0.0
    print(f"\n{FAULTY} reads {NEW_LABEL} in {share:.0%} of {n} predictions after the push; "
          f"steps took {json.dumps(outcome.seconds)}")
    return 0 if share >= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
