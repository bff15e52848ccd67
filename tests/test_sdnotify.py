"""The systemd notify protocol against real AF_UNIX datagram sockets the tests bind themselves."""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from floorline.edge.service.sdnotify import (
    Notifier,
    WatchdogPinger,
    network_problem,
    watchdog_interval,
    workers_healthy,
    workers_problem,
)
from tests.mqtt_broker import wait_until


class Receiver:
    """The systemd side: a bound datagram socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def next(self, timeout: float = 5.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def pending(self) -> list[str]:
        """Everything already delivered (datagram sends are synchronous: no waiting needed)."""
        self.sock.setblocking(False)
        out = []
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[Receiver]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    yield Receiver(sock, str(path))
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[Receiver]:
    name = f"floorline-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    yield Receiver(sock, "@" + name)
    sock.close()


def test_every_notification_arrives_as_sent(
    path_socket: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket.env_value)
    n = Notifier()
    assert n.enabled

    assert n.ready("2 pipelines running")
    assert path_socket.next() == "READY=1\nSTATUS=2 pipelines running"
    assert n.status("outbox: 12 waiting")
    assert path_socket.next() == "STATUS=outbox: 12 waiting"
    assert n.watchdog()
    assert path_socket.next() == "WATCHDOG=1"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = path_socket.next().split("\n")
    assert first == "RELOADING=1"
    key, _, usec = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= after
    assert n.stopping("draining")
    assert path_socket.next() == "STOPPING=1\nSTATUS=draining"
    assert n.extend_timeout(2.5)
    assert path_socket.next() == "EXTEND_TIMEOUT_USEC=2500000"
    n.close()


def test_abstract_socket_name_with_at_sign_is_reached(
    abstract_socket: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", abstract_socket.env_value)
    n = Notifier()
    assert n.ready()
    assert abstract_socket.next() == "READY=1"
    assert n.watchdog()
    assert abstract_socket.next() == "WATCHDOG=1"


def test_newline_in_status_cannot_inject_another_field(path_socket: Receiver) -> None:
    n = Notifier(path_socket.env_value)
    n.status("bad bundle\nREADY=1")
    assert path_socket.next() == "STATUS=bad bundle READY=1"


def test_without_notify_socket_every_call_is_a_silent_noop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    sent = [n.ready("x"), n.status("x"), n.watchdog(), n.reloading(), n.stopping()]
    assert sent == [False] * 5
    assert caplog.records == []


def test_send_failure_never_raises_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier(str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level(logging.DEBUG, logger="floorline.edge.service.sdnotify"):
        assert not n.ready()
        assert not n.watchdog()
        assert not n.watchdog()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot notify systemd" in warnings[0].getMessage()


def test_watchdog_interval_comes_from_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 30.0
    for bad in ("", "soon", "0", "-5"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert watchdog_interval() is None


def test_watchdog_interval_meant_for_another_process_is_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None


class FakeWorker:
    """Like a Pipeline: last_progress follows the clock while it runs, freezes when it stalls."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[str] = queue.Queue()
        self.frozen_at: float | None = None

    @property
    def last_progress(self) -> float:
        return time.monotonic() if self.frozen_at is None else self.frozen_at

    def stall(self) -> None:
        self.frozen_at = time.monotonic()
        self.inbox.put("message it never gets to")

    def recover(self) -> None:
        self.inbox.get_nowait()
        self.frozen_at = None


def test_worker_with_old_progress_and_queued_input_is_stalled() -> None:
    w = FakeWorker()
    w.frozen_at = 100.0
    assert workers_healthy([w], max_age_s=5.0, now=104.0)  # recent enough
    assert workers_healthy([w], max_age_s=5.0, now=200.0)  # idle: nothing queued
    w.inbox.put("x")
    assert workers_healthy([w], max_age_s=5.0, now=105.0)  # exactly at the limit
    assert not workers_healthy([w], max_age_s=5.0, now=105.5)  # work waiting, no progress


def test_one_stalled_worker_makes_all_unhealthy() -> None:
    running, stalled = FakeWorker(), FakeWorker()
    stalled.frozen_at = time.monotonic() - 60
    stalled.inbox.put("x")
    assert workers_healthy([running], max_age_s=1.0)
    assert not workers_healthy([running, stalled], max_age_s=1.0)
    assert workers_healthy([], max_age_s=1.0)


class DyingWorker(FakeWorker):
    """A Pipeline-like worker whose thread can end: ``failure()`` then names the reason."""

    name = "vibration"

    def __init__(self) -> None:
        super().__init__()
        self.died: str | None = None

    def failure(self) -> str | None:
        return self.died


def test_a_dead_worker_is_unhealthy_at_once_even_with_nothing_queued() -> None:
    # Once: a dead thread was noticed only when input queued up behind it (never, when idle).
    w = DyingWorker()
    assert workers_problem([w], max_age_s=60.0) is None
    w.died = "pipeline vibration: worker thread died (SystemExit: injected)"
    w.frozen_at = time.monotonic()  # its progress stamp is fresh: it just died
    assert workers_problem([FakeWorker(), w], max_age_s=60.0) == w.died
    assert not workers_healthy([w], max_age_s=60.0)


def test_a_stalled_worker_gets_the_same_reason_for_as_long_as_it_lasts() -> None:
    w = DyingWorker()
    w.frozen_at = 100.0
    w.inbox.put("x")
    reasons = {workers_problem([w], max_age_s=5.0, now=t) for t in (106.0, 150.0, 900.0)}
    assert reasons == {"pipeline vibration: worker stalled (input queued, no turn for 5 s)"}


class FakeTransport:
    """The MQTT connection's health surface (is_alive and last_loop are optional)."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.connected.set()


def test_network_thread_dead_or_stalled_while_connected_is_a_problem() -> None:
    t = FakeTransport()
    assert network_problem(t, max_age_s=5.0) is None  # neither is_alive nor last_loop: unknown
    assert network_problem(None, max_age_s=5.0) is None  # not started
    t.is_alive = lambda: True  # type: ignore[attr-defined]
    t.last_loop = 100.0  # type: ignore[attr-defined]
    assert network_problem(t, max_age_s=5.0, now=104.0) is None
    assert network_problem(t, max_age_s=5.0, now=106.0) == (
        "MQTT network thread stalled (no turn for 5 s while connected)")
    t.connected.clear()  # disconnected: it sleeps between reconnect attempts on purpose
    assert network_problem(t, max_age_s=5.0, now=1000.0) is None
    t.is_alive = lambda: False  # type: ignore[attr-defined]
    assert network_problem(t, max_age_s=5.0, now=104.0) == "MQTT network thread died"


def test_check_pings_only_while_healthy(path_socket: Receiver) -> None:
    w = FakeWorker()
    pinger = WatchdogPinger(Notifier(path_socket.env_value), 10.0,
                            lambda: workers_healthy([w], max_age_s=1.0))
    assert pinger.check()
    assert path_socket.pending() == ["WATCHDOG=1"]
    w.stall()
    w.frozen_at = time.monotonic() - 2.0  # stalled for longer than max_age_s
    assert not pinger.check()
    assert path_socket.pending() == []
    assert not pinger.is_healthy
    w.recover()
    assert pinger.check()
    assert path_socket.pending() == ["WATCHDOG=1"]


def test_failing_health_check_counts_as_unhealthy(
    path_socket: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> bool:
        raise RuntimeError("stats unavailable")

    pinger = WatchdogPinger(Notifier(path_socket.env_value), 10.0, broken)
    assert not pinger.check()
    assert not pinger.check()
    assert path_socket.pending() == []
    assert sum(r.exc_info is not None for r in caplog.records) == 1  # the traceback, once


def test_pinger_stops_within_one_interval_of_a_stall_and_resumes(path_socket: Receiver) -> None:
    w = FakeWorker()
    interval, max_age = 0.6, 0.1
    pinger = WatchdogPinger(Notifier(path_socket.env_value), interval,
                            lambda: workers_healthy([w], max_age_s=max_age))
    assert pinger.period_s == interval / 2
    pinger.start()
    try:
        # Healthy: pings keep coming.
        for _ in range(3):
            assert path_socket.next(timeout=2 * interval) == "WATCHDOG=1"

        w.stall()
        stalled_at = time.monotonic()
        wait_until(lambda: not pinger.is_healthy, 5 * interval, "the pinger to see the stall")
        # systemd restarts a service INTERVAL after its last ping; seeing the stall within
        # max_age + interval keeps that bound (expected: max_age + one period).
        assert time.monotonic() - stalled_at <= max_age + interval
        path_socket.pending()  # pings sent before the stall was seen
        before = pinger.pings, pinger.is_healthy
        # Two more health checks (no fixed sleep: wait for the pinger's own turns) send nothing.
        turns = pinger.checks
        wait_until(lambda: pinger.checks >= turns + 2, 5 * interval, "two more checks")
        assert path_socket.pending() == []
        assert (pinger.pings, pinger.is_healthy) == before

        w.recover()
        assert path_socket.next(timeout=2 * interval) == "WATCHDOG=1"
        assert pinger.is_healthy
    finally:
        pinger.stop()
    assert not pinger._thread.is_alive()
