"""``floorline demo``: where it says predictions are, when faults appear, how it scores the model.

The end-to-end tests run the real command against a mosquitto of their own (the demo's topics are
fixed, so never the shared session broker).
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from urllib.error import URLError

import orjson
import paho.mqtt.client as mqtt
import pytest

from floorline.edge.cli.main import main as floorline
from floorline.edge.demo.live import Scorecard, WindowKind, classify, default_faults, run_demo
from floorline.edge.demo.signals import Condition
from floorline.edge.demo.simulator import Truth
from tests.mqtt_broker import free_port, wait_until

FLOORLINE = [sys.executable, "-m", "floorline.edge"]
PUMPS = [f"pump-{i:02d}" for i in range(1, 9)]


def demo(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FLOORLINE, "demo", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def summary_rows(stdout: str) -> dict[str, dict[str, str]]:
    """The summary table: pump → {column title: cell}, cut at the header's column positions."""
    lines = stdout.split("\nsummary:", 1)[1].splitlines()
    header = next(line for line in lines if line.startswith("asset "))
    titles = [t for t in header.split("  ") if t.strip()]
    starts = [header.index(t.strip()) for t in titles]
    bounds = [*starts[1:], None]
    rows = {}
    for line in lines:
        if line.startswith("pump-"):
            cells = [line[a:b].strip() for a, b in zip(starts, bounds, strict=True)]
            rows[cells[0]] = dict(zip((t.strip() for t in titles), cells, strict=True))
    return rows


# -- the fault schedule ------------------------------------------------------------------------


@pytest.mark.parametrize("duration", [6.0, 10.0, 60.0, 300.0])
def test_default_faults_start_and_fully_develop_within_the_run(duration):
    faults = default_faults(duration, PUMPS)
    assert [(f.asset, f.condition) for f in faults] == [
        ("pump-02", Condition.IMBALANCE),
        ("pump-04", Condition.BEARING_OUTER_RACE),
        ("pump-06", Condition.LOOSENESS),
    ]
    for f in faults:
        assert f.severity_at(0.0) == 0.0  # every pump starts healthy
        assert 0 < f.start_s < f.start_s + f.ramp_s <= 0.75 * duration
        assert f.severity_at(0.75 * duration) == 1.0
    # One after the other, spread over the run in proportion to its length.
    starts = [f.start_s for f in faults]
    assert starts == sorted(starts)
    assert starts[-1] - starts[0] >= 0.25 * duration


def test_default_faults_only_name_pumps_that_exist():
    assert [f.asset for f in default_faults(60.0, PUMPS[:4])] == ["pump-02", "pump-04"]


# -- scoring predictions against the truth of their window -------------------------------------

HEALTHY = Truth(Condition.HEALTHY, 0.0, ramping=False)


@pytest.mark.parametrize(
    ("first", "last", "kind"),
    [
        (HEALTHY, HEALTHY, WindowKind.HEALTHY),
        # A ramp that has just begun is a weak fault, not a change of condition.
        (HEALTHY, Truth(Condition.IMBALANCE, 0.01, ramping=True), WindowKind.WEAK),
        (Truth(Condition.IMBALANCE, 0.4, ramping=True), Truth(Condition.IMBALANCE, 0.41,
                                                              ramping=True), WindowKind.RAMPING),
        (Truth(Condition.LOOSENESS, 1.0, ramping=False), Truth(Condition.LOOSENESS, 1.0,
                                                               ramping=False),
         WindowKind.DEVELOPED),
        # A fault at a target below the trained range stays weak once developed.
        (Truth(Condition.LOOSENESS, 0.2, ramping=False), Truth(Condition.LOOSENESS, 0.2,
                                                               ramping=False), WindowKind.WEAK),
        (HEALTHY, Truth(Condition.IMBALANCE, 1.0, ramping=False), WindowKind.CHANGE),
    ],
)
def test_windows_are_classified_by_what_the_pump_was_doing(first, last, kind):
    assert classify(first, last)[0] is kind


def test_scorecard_counts_matches_per_kind_and_explains_only_the_marks_it_showed():
    card = Scorecard()
    weak = Truth(Condition.BEARING_OUTER_RACE, 0.1, ramping=True)
    full = Truth(Condition.BEARING_OUTER_RACE, 1.0, ramping=False)
    assert card.add("pump-04", "healthy", 0.9, HEALTHY, HEALTHY)
    assert not card.add("pump-04", "healthy", 0.8, weak, weak)
    assert card.add("pump-04", "bearing_outer_race", 0.99, full, full)
    assert card.add("pump-04", "bearing_outer_race", 0.97, full, full)
    assert card.share("pump-04", WindowKind.DEVELOPED) == "100% of 2"
    assert card.share("pump-04", WindowKind.WEAK) == "0% of 1"
    assert card.share("pump-04", WindowKind.RAMPING) == "-"
    assert [line[0] for line in card.legend(short=True)] == ["~"]
    assert "30%" in card.legend()[0]
    # A healthy pump called faulty is a model error, and the legend says so.
    assert not card.add("pump-01", "looseness", 0.6, HEALTHY, HEALTHY)
    assert [line[0] for line in card.legend(short=True)] == ["~", "*"]


# -- argument errors -----------------------------------------------------------------------------


def test_metrics_port_without_prometheus_client_fails_with_the_install_command(
    monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import now raises ImportError
    port = free_port()  # nothing listens: had the demo started, it would start a broker here
    assert floorline(["demo", "--metrics-port", "0", "--host", "127.0.0.1",
                      "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "--metrics-port" in captured.err
    assert "pip install 'floorline[metrics]'" in captured.err


def test_a_duration_that_is_not_positive_is_refused(capsys):
    assert run_demo(duration=0) == 2
    assert "--duration must be > 0" in capsys.readouterr().err


# -- end to end against a broker -----------------------------------------------------------------


def test_demo_says_where_predictions_go_and_they_go_there(mosquitto, mqtt_client):
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/#", qos=0)
    out = demo("--duration", "3", "--assets", "2", "--host", "127.0.0.1",
               "--port", str(mosquitto.port))
    assert out.returncode == 0, out.stdout + out.stderr
    head = out.stdout.split("\nsummary:", 1)[0]
    assert f"broker at 127.0.0.1:{mosquitto.port}" in head
    assert "  input        plant/+/+/vibration" in head
    assert "  predictions  floorline/demo/pred/vibration/+" in head
    assert "  state        floorline/demo/state" in head
    command = f"mosquitto_sub -h 127.0.0.1 -p {mosquitto.port} -t 'floorline/demo/pred/#' -v"
    assert f"\n  {command}   # watch the predictions\n" in head
    # The topics named are the ones the gateway really used.
    predictions = probe.wait_for(1, "floorline/demo/pred/vibration/+", timeout=10)
    assert orjson.loads(predictions[0].payload)["asset"] in {"pump-01", "pump-02"}
    states = [m for m in probe.messages if m.topic == "floorline/demo/state"]
    assert states
    assert orjson.loads(states[0].payload)["state"] == "online"
    assert all(mqtt.topic_matches_sub("floorline/demo/pred/#", m.topic)
               for m in probe.messages if "/pred/" in m.topic)


def test_short_demo_shows_every_default_fault_and_its_prediction(mosquitto):
    out = demo("--duration", "6", "--assets", "6", "--host", "127.0.0.1",
               "--port", str(mosquitto.port))
    assert out.returncode == 0, out.stdout + out.stderr
    for spec in ("pump-02=imbalance@0.6+1.8", "pump-04=bearing_outer_race@1.5+1.8",
                 "pump-06=looseness@2.4+1.8"):
        assert spec in out.stdout.split("\nsummary:", 1)[0]
    rows = summary_rows(out.stdout)
    for pump, fault in [("pump-02", "imbalance"), ("pump-04", "bearing_outer_race"),
                        ("pump-06", "looseness")]:
        row = rows[pump]
        assert row["condition at end"] == fault
        assert row["developed"] != "-", row  # windows at full severity were scored
        assert fault in row["labels predicted"], row
    for pump in ("pump-01", "pump-03", "pump-05"):
        assert rows[pump]["condition at end"] == "healthy"
        assert rows[pump]["developed"] == "-"


def test_demo_against_a_broker_shows_faults_in_predictions(mosquitto):
    # An explicit fault is used as given: from the first sample on, at full severity.
    out = demo("--duration", "8", "--assets", "3", "--host", "127.0.0.1",
               "--port", str(mosquitto.port), "--fault", "pump-02=imbalance@0")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "  faults       pump-02=imbalance@0+0 " in out.stdout
    rows = summary_rows(out.stdout)
    # pump-02 has had an imbalance from the start: the model calls it that.
    assert rows["pump-02"]["labels predicted"].startswith("imbalance ")
    assert rows["pump-02"]["healthy"] == "-"
    assert rows["pump-01"]["labels predicted"].startswith("healthy ")
    assert rows["pump-01"]["developed"] == "-"
    assert "dead letters {}" in out.stdout


def test_demo_starts_an_embedded_broker_when_none_answers():
    port = free_port()  # nothing listens here
    out = demo("--duration", "5", "--assets", "2", "--host", "127.0.0.1", "--port", str(port))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "embedded broker (amqtt)" in out.stdout
    assert f"nothing answered MQTT on 127.0.0.1:{port}" in out.stdout
    counts = re.search(r"pipeline vibration: \d+ messages, \d+ windows, (\d+) predictions",
                       out.stdout)
    assert counts, out.stdout
    assert int(counts[1]) > 0


def _scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own http URL
            return str(response.read().decode())
    except (URLError, OSError):
        return None


def test_metrics_are_served_while_the_demo_runs(mosquitto):
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    proc = subprocess.Popen(
        [*FLOORLINE, "demo", "--duration", "10", "--assets", "2", "--host", "127.0.0.1",
         "--port", str(mosquitto.port), "--metrics-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    scraped: list[str] = []

    def predictions_counted() -> bool:
        if proc.poll() is not None:
            raise AssertionError("the demo ended before its metrics showed a prediction")
        text = _scrape(url)
        if text is None:
            return False
        scraped.append(text)
        return any(line.startswith('floorline_predictions_total{pipeline="vibration"}')
                   and float(line.rsplit(" ", 1)[1]) > 0 for line in text.splitlines())

    try:
        wait_until(predictions_counted, 30, f"predictions counted on {url}")
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert f"  metrics      {url}" in out
    assert "floorline_messages_received_total" in scraped[-1]
    assert _scrape(url) is None  # and no longer once the demo has ended
