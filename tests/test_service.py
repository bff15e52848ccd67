"""``floorline run`` as systemd runs it: notify protocol, watchdog, reload, metrics, stats."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from floorline.edge.messages import Inbound
from tests.daemon_harness import asset_samples, config_text, sample_payload, vibration_pipeline
from tests.mqtt_broker import free_port, wait_until

FLOORLINE = [sys.executable, "-m", "floorline.edge"]


class NotifySocket:
    """The AF_UNIX datagram socket systemd would listen on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def collect(self, until: str, timeout: float) -> list[str]:
        """Read datagrams until one contains UNTIL (TimeoutError after TIMEOUT)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            if until in self.messages[-1]:
                return self.messages
        raise TimeoutError(f"no {until!r} within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


def spawn(config: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([*FLOORLINE, "run", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env})


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_ready_only_after_connect_then_watchdog_reload_and_stopping(
    mosquitto, mqtt_client, unique_topic, tmp_path, notify
):
    config = tmp_path / "gw.yaml"
    config.write_text(config_text(mosquitto, vibration_pipeline(unique_topic)))
    mosquitto.stop()  # no broker yet: the service must not claim to be ready
    proc = spawn(config, {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
    try:
        with pytest.raises(TimeoutError):
            notify.collect("READY=1", timeout=3)
        mosquitto.start()
        notify.collect("READY=1", timeout=20)
        notify.collect("WATCHDOG=1", timeout=5)
        proc.send_signal(signal.SIGHUP)
        notify.collect("RELOADING=1", timeout=10)
        msgs = notify.collect("READY=1", timeout=10)
        reloading = next(m for m in msgs if "RELOADING=1" in m)
        assert re.search(r"MONOTONIC_USEC=\d+", reloading)
        proc.send_signal(signal.SIGTERM)
        notify.collect("STOPPING=1", timeout=10)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out


def test_watchdog_pings_stop_when_a_worker_stalls(mosquitto, unique_topic, tmp_path, notify):
    # The real daemon in-process, its real worker made to hang in the middle of a message with
    # more queued: what a stuck inference looks like. (SIGSTOP on a process would freeze the
    # pinger as well, which proves nothing.)
    from floorline.edge.service.sdnotify import Notifier, WatchdogPinger, workers_healthy  # noqa: PLC0415
    from tests.daemon_harness import running  # noqa: PLC0415

    with running(config_text(mosquitto, vibration_pipeline(unique_topic))) as daemon:
        pinger = WatchdogPinger(Notifier(str(notify.path)), 0.4,
                                lambda: workers_healthy(daemon.pipelines, max_age_s=0.2))
        pinger.start()
        try:
            notify.collect("WATCHDOG=1", timeout=5)
            worker = daemon.pipelines[0]
            # Freeze progress with work queued: exactly what a hung inference looks like.
            worker.inbox.put(Inbound("x", b"{}", 0.0))
            worker.last_progress = time.monotonic() - 10
            real = worker._handle
            worker._handle = lambda *_: time.sleep(3)  # type: ignore[method-assign]
            worker.inbox.put(Inbound("x", b"{}", 0.0))
            time.sleep(0.5)  # let the worker enter the hang
            notify.messages.clear()
            time.sleep(1.2)  # absence over three ping periods can only be checked by waiting
            assert not any("WATCHDOG=1" in m for m in notify.messages)
            worker._handle = real  # type: ignore[method-assign]
            notify.collect("WATCHDOG=1", timeout=10)  # it recovers, the pings resume
        finally:
            pinger.stop()


def test_metrics_endpoint_and_stats_topic_during_a_run(mosquitto, mqtt_client, unique_topic,
                                                       tmp_path):
    port = free_port()
    config = tmp_path / "gw.yaml"
    config.write_text(config_text(
        mosquitto, vibration_pipeline(unique_topic),
        extra=f"metrics: {{prometheus: {{enabled: true, port: {port}}}, stats_interval_s: 1}}\n",
    ))
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/#", qos=1)
    proc = spawn(config, {})
    try:
        probe.wait_for(1, "floorline/gw-test/state", timeout=20)
        samples = asset_samples(128, seed=90)
        for i, row in enumerate(samples):
            probe.publish(f"{unique_topic}/pump-m/vibration",
                          sample_payload(1.0 + i / 1000, i, row), qos=1)
        probe.publish(f"{unique_topic}/pump-m/vibration", b"not json", qos=1)
        probe.wait_for(3, "floorline/gw-test/pred/#", timeout=20)
        stats_msg = probe.wait_for(1, "floorline/gw-test/stats", timeout=10)[0]
        wait_until(lambda: b'reason="malformed"' in _scrape(port), 10, "dead letter metric")
        text = _scrape(port).decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert re.search(r'floorline_messages_received_total\{.*pipeline="vibration".*\} 129\.0', text)
    assert re.search(r"floorline_predictions_total\{.*\} 3\.0", text)
    assert re.search(r'floorline_dead_letters_total\{.*reason="malformed".*\} 1\.0', text)
    assert re.search(r"floorline_inference_seconds_count\{.*\} [1-9]", text)
    assert re.search(r'floorline_bundle_info\{.*name="pdm-classifier".*version="1\.0\.0"', text)
    assert "floorline_mqtt_connected" in text
    assert "floorline_outbox_messages" in text
    stats = orjson.loads(stats_msg.payload)
    assert stats  # compact JSON for plants without Prometheus
    assert len(stats_msg.payload) < 2048


def _scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return bytes(resp.read())


# -- liveness: dead threads are reported, stop the watchdog and end the process ------------------


def _states(probe) -> list[dict]:
    return [orjson.loads(m.payload) for m in probe.messages if m.topic.endswith("/state")]


def test_a_dead_worker_turns_the_state_degraded_and_stops_the_watchdog(
    mosquitto, mqtt_client, unique_topic, notify
):
    from floorline.edge.service.sdnotify import Notifier, WatchdogPinger  # noqa: PLC0415
    from tests.daemon_harness import running  # noqa: PLC0415

    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/state", qos=1)
    with running(config_text(mosquitto, vibration_pipeline(unique_topic))) as daemon:
        daemon.health_period_s = 0.1
        wait_until(lambda: [s["state"] for s in _states(probe)] == ["online"], 10, "online")
        pinger = WatchdogPinger(Notifier(str(notify.path)), 0.4,
                                lambda: daemon.problem(max_age_s=0.2) is None)
        pinger.start()
        try:
            notify.collect("WATCHDOG=1", timeout=5)
            worker = daemon.pipelines[0]

            def die(payload: bytes, topic: str = "") -> None:
                raise SystemExit("injected")  # a BaseException: gets past the per-message guard

            worker._decoder.decode = die  # type: ignore[method-assign]
            probe.publish(f"{unique_topic}/pump-k/vibration",
                          sample_payload(1.0, 0, asset_samples(1, 5)[0]), qos=1)
            wait_until(lambda: any(s["state"] == "degraded" for s in _states(probe)), 10,
                       "the retained state to say degraded")
            assert not worker.is_alive()
            wait_until(lambda: not pinger.is_healthy, 5, "the pinger to see the dead worker")
            notify.messages.clear()
            turns = pinger.checks
            wait_until(lambda: pinger.checks >= turns + 3, 5, "three more health checks")
            assert not any("WATCHDOG=1" in m for m in notify.messages)
        finally:
            pinger.stop()
    degraded = next(s for s in _states(probe) if s["state"] == "degraded")
    assert degraded["reason"] == (
        "pipeline vibration: worker thread died (SystemExit: injected)")
    late = mqtt_client(mosquitto)  # retained: a late subscriber saw it too (until the offline)
    late.subscribe("floorline/gw-test/state", qos=1)
    assert orjson.loads(late.wait_for(1, timeout=10)[0].payload)["state"] == "offline"


def test_a_dead_network_thread_is_degraded_until_it_runs_again(
    mosquitto, mqtt_client, unique_topic, notify
):
    from floorline.edge.service.sdnotify import Notifier, WatchdogPinger  # noqa: PLC0415
    from tests.daemon_harness import running  # noqa: PLC0415

    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/state", qos=1)
    with running(config_text(mosquitto, vibration_pipeline(unique_topic))) as daemon:
        daemon.health_period_s = 0.1
        transport = daemon.transport
        assert transport is not None
        pinger = WatchdogPinger(Notifier(str(notify.path)), 0.4,
                                lambda: daemon.problem(max_age_s=0.2) is None)
        pinger.start()
        try:
            notify.collect("WATCHDOG=1", timeout=5)
            # What MqttTransport.is_alive() says once its thread is gone (the thread itself
            # must keep running here, or the degraded state could not be published).
            transport.is_alive = lambda: False  # type: ignore[attr-defined]
            wait_until(lambda: not pinger.is_healthy, 5, "the pinger to see it")
            wait_until(lambda: any(s["state"] == "degraded" for s in _states(probe)), 10,
                       "degraded")
            del transport.is_alive  # type: ignore[attr-defined]
            wait_until(lambda: _states(probe)[-1]["state"] == "online", 10, "online again")
            notify.messages.clear()
            notify.collect("WATCHDOG=1", timeout=5)  # the pings resume
        finally:
            pinger.stop()
    degraded = next(s for s in _states(probe) if s["state"] == "degraded")
    assert degraded["reason"] == "MQTT network thread died"


_KILL_WORKERS = """
import sys
from pathlib import Path

from floorline.edge.daemon import daemon, pipeline
from floorline.edge.service import run


def killed(self):
    raise SystemExit("injected")


pipeline.Pipeline._run = killed  # every worker thread dies as it starts
daemon.HEALTH_PERIOD_S = 0.2
run.UNHEALTHY_EXIT_S = 1.0
sys.exit(run.run(Path(sys.argv[1])))
"""


def test_floorline_run_exits_1_when_a_worker_thread_is_dead(
    mosquitto, mqtt_client, unique_topic, tmp_path, notify
):
    # Once: the process went on reporting itself online, with nothing processing its input.
    config = tmp_path / "gw.yaml"
    config.write_text(config_text(mosquitto, vibration_pipeline(unique_topic)))
    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/state", qos=1)
    proc = subprocess.Popen([sys.executable, "-c", _KILL_WORKERS, str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "NOTIFY_SOCKET": str(notify.path),
                                 "WATCHDOG_USEC": "1000000"})
    try:
        notify.collect("STOPPING=1", timeout=20)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out
    assert not any("WATCHDOG=1" in m for m in notify.messages)  # never healthy, never pinged
    assert "exiting with status 1" in out
    wait_until(lambda: _states(probe) and _states(probe)[-1]["state"] == "offline", 10, "offline")
    states = _states(probe)
    reason = "pipeline vibration: worker thread died (SystemExit: injected)"
    assert {"state": "degraded", "reason": reason}.items() <= next(
        s for s in states if s["state"] == "degraded").items()
    assert states[-1]["reason"] == f"unhealthy: {reason}"
