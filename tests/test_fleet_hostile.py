"""Hostile and broken retained documents against the operator's fleet commands (a real broker).

A gateway that reports garbage, or anyone who may publish on ``floorline/rollouts/{name}``,
must not crash ``status``, ``push --wait``, ``rollout`` or ``gc``; two operators resuming the
same rollout at once must not both run its waves.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from floorline.edge.bundle.signing import load_public_key
from floorline.edge.fleet import rollout
from tests.fleet_sim import SimFleet, SimGateway, make_fleet
from tests.test_fleet_operator import Op, _doc, run


@pytest.fixture
def op(tmp_path: Path, mosquitto: Any) -> Op:
    return Op(tmp_path, mosquitto.port)


@pytest.fixture
def sim(op: Op, mosquitto: Any) -> Iterator[Callable[[list[SimGateway]], SimFleet]]:
    fleets: list[SimFleet] = []

    def make(gateways: list[SimGateway]) -> SimFleet:
        fleet = SimFleet("127.0.0.1", mosquitto.port, [load_public_key(op.pub)], gateways)
        fleets.append(fleet.start())
        return fleet

    yield make
    for fleet in fleets:
        fleet.stop()


GARBAGE_REPORTS = [
    {"attributes": ["site", "plant-a"]},
    {"attributes": "site=plant-a"},
    {"attributes": {"site": {"nested": 1}}},
    {"history": 5},
    {"history": [{"result": ["x"], "version": "v"}]},
    {"health": [1]},
    {"health": {"pipelines": [1]}},
    {"health": {"ts": "soon", "pipelines": {"p": {"dead_letters": "many"}}}},
    {"bundles": 5},
    {"probation": "yes", "groups": "line1"},
]


def _publish_garbage(probe: Any, gw: str, body: dict[str, Any]) -> None:
    probe.publish(f"floorline/{gw}/state", b'{"state": "online"}', qos=1, retain=True)
    probe.publish(f"floorline/{gw}/reported", orjson.dumps({"gateway": gw, **body}), qos=1,
                  retain=True)


@pytest.mark.parametrize("body", GARBAGE_REPORTS, ids=lambda b: orjson.dumps(b).decode()[:40])
def test_status_survives_a_gateway_reporting_garbage(op, sim, mosquitto, mqtt_client, capsys,
                                                     body):
    sim(make_fleet(2))
    _publish_garbage(mqtt_client(mosquitto), "gw-bad", body)
    code, out, err = run(op.args("fleet", "status"), capsys)
    assert "Traceback" not in err
    assert code in (0, 1, 3), err
    assert "gw-000" in out
    assert "gw-bad" in out
    code, out, err = run(op.args("fleet", "status", "--json"), capsys)
    assert orjson.loads(out)["summary"]["reported"] == 3, err
    code, out, err = run(op.args("fleet", "status", "--attr", "site=site-a"), capsys)
    assert "gw-000" in out, err


def test_rollout_and_push_wait_survive_a_gateway_reporting_garbage(op, sim, mosquitto,
                                                                   mqtt_client, capsys):
    sim(make_fleet(4, probation_s=0.1))
    probe = mqtt_client(mosquitto)
    for i, body in enumerate(GARBAGE_REPORTS):
        _publish_garbage(probe, f"gw-bad{i}", body)
    out = io.StringIO()
    code = rollout.start(name="r-garbage", config_file=op.config, bundles=[], key_file=op.key,
                         broker=op.broker, target={"selector": {"site": "site-a"}},
                         waves=["100%"], wave_timeout_s=10, out=out)
    assert code == 0, out.getvalue()
    code, text, err = run(op.push_args("--selector", "site=site-b", "--wait",
                                       "--wait-timeout-s", "10"), capsys)
    assert code == 0, (text, err)
    assert "gw-001: applied" in text


MALFORMED_ROLLOUTS = [
    {"state": "stopped", "waves": "abc"},
    {"state": "stopped", "waves": [1]},
    {"state": "stopped"},
    {"state": "stopped", "waves": None},
    {"state": "stopped", "version": "x",
     "waves": [{"name": "a", "gateways": 5, "verdicts": [1], "state": "pending"}]},
    {"state": "running", "previous_docs": [1], "bundles": 5},
]


@pytest.mark.parametrize("body", MALFORMED_ROLLOUTS,
                         ids=lambda b: orjson.dumps(b).decode()[:40])
def test_rollout_commands_name_a_malformed_rollout_document(op, mosquitto, mqtt_client, capsys,
                                                            body):
    probe = mqtt_client(mosquitto)
    probe.publish("floorline/rollouts/bad", orjson.dumps(body), qos=1, retain=True)
    code, text, err = run(op.args("fleet", "rollout", "status"), capsys)
    assert code == 1, err
    assert "bad: not a rollout document" in text
    code, text, err = run(op.args("fleet", "rollout", "status", "bad"), capsys)
    assert code == 1, err
    assert "not a rollout document" in text
    code, text, err = run(op.args("fleet", "rollout", "resume", "bad", "--key", str(op.key),
                                  "--force"), capsys)
    assert code == 1
    assert "fleet clear --rollout bad" in err
    code, text, err = run(op.args("fleet", "gc", "--dry-run"), capsys)
    assert code == 0, err
    code, text, err = run(op.args("fleet", "rollout", "status", "--json"), capsys)
    assert code == 1, err
    assert "bad" in orjson.loads(text)


def test_two_operators_resuming_at_once_run_the_waves_once(op, sim, capsys, monkeypatch):
    gateways = make_fleet(6, probation_s=0.1)
    sim(gateways)
    out = io.StringIO()
    stop = threading.Event()
    stop.set()  # Ctrl-C before the first wave: a stopped rollout with every wave pending
    assert rollout.start(name="r-race", config_file=op.config, bundles=[], key_file=op.key,
                         broker=op.broker, target={"selector": {}}, waves=["canary:2", "100%"],
                         out=out, interrupt=stop) == 3
    assert _doc(op.broker, "r-race")["state"] == "stopped"
    # Both operators read the stopped document before either publishes its own.
    barrier = threading.Barrier(2, timeout=20)
    original = rollout.Runner.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        barrier.wait()

    monkeypatch.setattr(rollout.Runner, "__init__", init)
    results: dict[str, Any] = {}

    def operator(who: str) -> None:
        try:
            results[who] = rollout.resume(name="r-race", key_file=op.key, broker=op.broker,
                                          out=io.StringIO())
        except rollout.RolloutError as exc:
            results[who] = exc

    threads = [threading.Thread(target=operator, args=(w,)) for w in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    errors = [r for r in results.values() if isinstance(r, rollout.RolloutError)]
    assert sorted(r for r in results.values() if isinstance(r, int)) == [0], results
    assert len(errors) == 1
    assert "a moment before this command" in str(errors[0])
    time.sleep(1.0)
    doc = _doc(op.broker, "r-race")
    assert doc["state"] == "done", doc
    version = doc["version"]
    assert all(g.running_version == version for g in gateways)
    for g in gateways:  # one document per gateway, not one per operator
        assert sum(1 for _, v in g.received if v == version) == 1, (g.id, g.received)


def test_push_wait_names_a_gateway_that_took_up_a_newer_version_at_once(op, sim, capsys):
    """An operator's clock behind another's: the older version is ignored; say so, no timeout."""
    sim(make_fleet(2, probation_s=0.1))
    code, text, err = run(op.push_args("--gateway", "gw-000", "--version", "2000000000000",
                                       "--wait", "--wait-timeout-s", "20"), capsys)
    assert code == 0, (text, err)
    started = time.monotonic()
    code, text, err = run(op.push_args("--gateway", "gw-000", "--gateway", "gw-001",
                                       "--version", "1000000000000", "--wait",
                                       "--wait-timeout-s", "20"), capsys)
    assert time.monotonic() - started < 10, text
    assert code == 1, (text, err)
    assert "gw-000: superseded" in text
    assert "2000000000000" in text
    assert "gw-001: applied" in text


def test_rollout_wave_counts_a_gateway_on_a_newer_version_without_waiting(op, sim, capsys):
    gateways = make_fleet(3, probation_s=0.1)
    sim(gateways)
    code, text, err = run(op.push_args("--gateway", "gw-002", "--version", "2000000000000",
                                       "--wait", "--wait-timeout-s", "20"), capsys)
    assert code == 0, (text, err)
    out = io.StringIO()
    started = time.monotonic()
    code = rollout.start(name="r-newer", config_file=op.config, bundles=[], key_file=op.key,
                         broker=op.broker, target={"selector": {}}, waves=["100%"],
                         version=1000000000000, wave_timeout_s=30, max_failures="1", out=out)
    assert time.monotonic() - started < 15, out.getvalue()
    assert code == 0, out.getvalue()
    verdicts = _doc(op.broker, "r-newer")["waves"][0]["verdicts"]
    assert verdicts["gw-002"]["result"] == "superseded", verdicts
    assert {verdicts[g]["result"] for g in ("gw-000", "gw-001")} == {"applied"}


def test_a_log_stream_closed_during_the_write_is_not_a_logging_error(capsys):
    """The flaky ``Traceback`` in the stderr of a fleet command test: a summary written by an
    earlier command's handler while that test's capture closed (check, then write, then closed).
    """
    import logging  # noqa: PLC0415

    from floorline.edge.service.logs import setup_logging  # noqa: PLC0415

    class ClosingStream:
        closed = False

        def write(self, text: str) -> int:
            del text
            self.closed = True
            raise ValueError("I/O operation on closed file.")

        def flush(self) -> None:
            pass

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    setup_logging("INFO", stream=ClosingStream())  # type: ignore[arg-type]
    try:
        logging.getLogger("floorline.test").warning("a late summary")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert "Logging error" not in capsys.readouterr().err
