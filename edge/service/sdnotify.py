"""The systemd notify protocol (``Type=notify``, ``WatchdogSec=``) without libsystemd.

systemd passes ``$NOTIFY_SOCKET``, an ``AF_UNIX`` datagram socket (a path, or an abstract name
written with a leading ``@``), and each notification is one datagram of ``KEY=VALUE`` lines
(``sd_notify(3)``). Outside systemd the variable is unset and every call here does nothing, so the
daemon calls the same code under systemd, in a terminal and in tests.

    notifier = Notifier()                     # reads $NOTIFY_SOCKET
    notifier.ready("2 pipelines running")     # after load() and start(): systemctl start returns
    interval = watchdog_interval()            # from $WATCHDOG_USEC, or None
    if interval:
        pinger = WatchdogPinger(notifier, interval,
                                lambda: daemon.problem(max_age_s=interval / 2) is None)
        pinger.start()
    ...
    notifier.stopping(); pinger.stop()

The watchdog is only useful if a ping means "working": ``WatchdogPinger`` sends ``WATCHDOG=1``
only while its ``healthy()`` callable says so, so a stalled or dead worker, or a stalled or dead
network thread (``workers_problem``, ``network_problem``), stops the pings and systemd restarts
the service after ``WatchdogSec``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

log = logging.getLogger(__name__)

__all__ = [
    "Notifier",
    "ProgressReporting",
    "WatchdogPinger",
    "network_problem",
    "watchdog_interval",
    "workers_healthy",
    "workers_problem",
]


class Notifier:
    """Sends notifications to systemd; a no-op when ``$NOTIFY_SOCKET`` is unset.

    Sending never raises: a service must not die because its supervisor's socket went away (the
    first failure is logged as a warning, later ones at debug level).
    """

    def __init__(self, address: str | None = None) -> None:
        """Use ADDRESS (default ``$NOTIFY_SOCKET``): a path, or ``@name`` for an abstract socket."""
        raw = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self._address: str | bytes | None = _socket_address(raw) if raw else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed = False

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify (i.e. running under systemd with Type=notify)."""
        return self._address is not None

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete: ``READY=1`` with an optional status line."""
        return self._send("READY=1", status)

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self._send(None, text)

    def watchdog(self) -> bool:
        """Keep-alive ping for ``WatchdogSec=``."""
        return self._send("WATCHDOG=1", None)

    def reloading(self, status: str | None = None) -> bool:
        """A reload began; send ``ready()`` when it is done.

        ``MONOTONIC_USEC`` is the ``CLOCK_MONOTONIC`` time of the request: systemd 253+
        (``Type=notify-reload``) needs it to tell this reload from an earlier one.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}", status)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began (draining); systemd shows the unit as deactivating."""
        return self._send("STOPPING=1", status)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for SECONDS more before start-up or shutdown times out (slow self-tests)."""
        return self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}", None)

    def close(self) -> None:
        """Close the socket (a later notification opens it again)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _send(self, fields: str | None, status: str | None) -> bool:
        if self._address is None:
            return False
        lines = [fields] if fields else []
        if status is not None:
            # One datagram is a list of lines: a newline in the status would start a bogus field.
            lines.append("STATUS=" + " ".join(status.splitlines()))
        data = "\n".join(lines).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.sendto(data, self._address)
            except OSError as exc:
                if not self._failed:
                    log.warning("cannot notify systemd at %r: %s (further failures at debug level)",
                                self._address, exc)
                    self._failed = True
                else:
                    log.debug("cannot notify systemd: %s", exc)
                return False
        return True


def _socket_address(raw: str) -> str | bytes | None:
    if raw.startswith("@"):
        # Linux abstract namespace: the name starts with a NUL byte instead of '@'.
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # e.g. "vsock:2:1234" (systemd 253+ in VMs): not a socket this gateway daemon will see.
    log.warning("NOTIFY_SOCKET %r is not a unix socket path; not notifying systemd", raw)
    return None


def watchdog_interval() -> float | None:
    """Seconds systemd waits for a ``WATCHDOG=1`` (``$WATCHDOG_USEC``), or None if not asked.

    With ``$WATCHDOG_PID`` set, the interval applies only to that process: a child that inherited
    the environment must not ping on its parent's behalf.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


class _Sized(Protocol):
    def qsize(self) -> int: ...


class ProgressReporting(Protocol):
    """A worker that stamps ``last_progress`` (``time.monotonic()``) every turn of its loop.

    ``floorline.edge.daemon.pipeline.Pipeline`` is one: its worker loop sets ``last_progress`` at
    least every
    0.1 s, even when idle.
    """

    @property
    def last_progress(self) -> float:
        """``time.monotonic()`` when the worker last went round its loop."""
        ...

    @property
    def inbox(self) -> _Sized:
        """The worker's input queue."""
        ...


def workers_healthy(
    workers: Iterable[ProgressReporting], max_age_s: float, *, now: float | None = None
) -> bool:
    """Whether every worker is healthy (``workers_problem`` finds nothing)."""
    return workers_problem(workers, max_age_s, now=now) is None


def workers_problem(
    workers: Iterable[ProgressReporting], max_age_s: float, *, now: float | None = None
) -> str | None:
    """What is wrong with the first unhealthy worker, or None when every one is healthy.

    A worker is dead when its ``failure()`` (if it has one; ``Pipeline`` does) names a reason:
    its thread ended though nobody stopped it. It is stalled when its ``last_progress`` is older
    than MAX_AGE_S *and* its inbox holds messages: it has work and does not get through it (a
    hung inference, a deadlock). An old timestamp with an empty inbox is not a stall, since there
    was nothing to do. Choose MAX_AGE_S above the slowest legitimate loop turn (one batch's
    inference plus ``max_wait_ms``) and below ``WatchdogSec``.
    """
    t = time.monotonic() if now is None else now
    for w in workers:
        failure: Callable[[], str | None] | None = getattr(w, "failure", None)
        reason = failure() if failure is not None else None
        if reason:
            return reason
        if t - w.last_progress > max_age_s and w.inbox.qsize():
            # The same words for as long as it lasts: a reason that changed every check would
            # look like a new problem each time.
            name = getattr(w, "name", "?")
            return f"pipeline {name}: worker stalled (input queued, no turn for {max_age_s:g} s)"
    return None


class NetworkReporting(Protocol):
    """The MQTT connection as far as its health goes.

    ``floorline.edge.mqtt.transport.MqttTransport`` is one. Optionally it also has
    ``is_alive()`` (whether its network thread runs) and ``last_loop`` (``time.monotonic()`` of
    that thread's last turn); without them only what it has is checked.
    """

    @property
    def connected(self) -> threading.Event:
        """Set while the broker has accepted the connection."""
        ...


def network_problem(
    transport: NetworkReporting | None, max_age_s: float, *, now: float | None = None
) -> str | None:
    """What is wrong with the network thread, or None while it is healthy (or not started).

    Dead: ``is_alive()`` says False. Stalled: connected, yet ``last_loop`` is older than
    MAX_AGE_S (while disconnected the thread legitimately sleeps between reconnect attempts).
    """
    if transport is None:
        return None
    is_alive: Callable[[], bool] | None = getattr(transport, "is_alive", None)
    if is_alive is not None and not is_alive():
        return "MQTT network thread died"
    last_loop = getattr(transport, "last_loop", None)
    if (
        isinstance(last_loop, float)
        and transport.connected.is_set()
        and (time.monotonic() if now is None else now) - last_loop > max_age_s
    ):
        return f"MQTT network thread stalled (no turn for {max_age_s:g} s while connected)"
    return None


class WatchdogPinger:
    """A thread that pings systemd's watchdog only while ``healthy()`` returns True.

    Every PERIOD_S (default: half the interval, as ``sd_watchdog_enabled(3)`` recommends) it calls
    ``healthy()``; True sends ``WATCHDOG=1``; False (or an exception) sends nothing, so systemd
    restarts the service once INTERVAL_S passes without a ping. Pings resume when health returns.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval_s: float,
        healthy: Callable[[], bool],
        *,
        period_s: float | None = None,
    ) -> None:
        if interval_s <= 0 or (period_s is not None and not 0 < period_s < interval_s):
            raise ValueError("need interval_s > 0 and 0 < period_s < interval_s")
        self._notifier = notifier
        self._healthy = healthy
        self.period_s = period_s if period_s is not None else interval_s / 2
        self.interval_s = interval_s
        self.is_healthy = True
        """The result of the last health check (for stats and tests)."""
        self.pings = 0
        self.checks = 0
        """Health checks done so far (for tests that wait for the pinger's turns)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> None:
        """Ping now (if healthy) and then every period, until stop()."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop pinging; waits up to TIMEOUT for the thread. Idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check(self) -> bool:
        """One turn: ask ``healthy()`` and ping if it says so; returns its answer."""
        try:
            ok = bool(self._healthy())
        except Exception:
            # A broken health check must look unhealthy: pinging anyway would defeat the watchdog.
            if self.is_healthy:  # once per unhealthy spell, not every period
                log.exception("watchdog health check failed")
            ok = False
        if ok != self.is_healthy:
            if ok:
                log.info("workers healthy again; watchdog pings resumed")
            else:
                log.warning(
                    "health check failed (a stalled or dead worker or network thread); "
                    "withholding watchdog pings: systemd restarts the service after %.0f s "
                    "without one",
                    self.interval_s,
                )
        self.checks += 1  # before is_healthy: whoever sees the new state sees this check counted
        self.is_healthy = ok
        # The state first, then the ping: whoever received this ping sees the state it reflects.
        if ok and self._notifier.watchdog():
            self.pings += 1
        return ok

    def _run(self) -> None:
        while True:
            self.check()
            if self._stop.wait(self.period_s):
                return
