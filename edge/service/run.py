"""``floorline run``: the daemon as a long-running service.

Wires the daemon, the fleet agent, systemd and the process's signals: SIGTERM and SIGINT drain
and stop, SIGHUP re-reads the config file and applies it through the same verified, atomic path
a fleet push takes. The process id is written to ``<state_dir>/floorline.pid`` for
``floorline reload``.

systemd (``Type=notify``): READY=1 only once the broker accepted the connection, the
subscriptions are acknowledged and every bundle passed its self-test; STATUS= with rates every
stats interval; WATCHDOG=1 only while every worker made progress (or was idle with nothing
queued) within half the watchdog interval; RELOADING=1 … READY=1 around a reload; STOPPING=1.

Liveness: the daemon's monitor publishes the retained state ``degraded`` (with the reason) within
a second of a pipeline worker thread or the MQTT network thread dying, or 30 s into a stall
(``Daemon.stall_s``). The watchdog pings stop at once (dead) or after half the interval (stalled),
and whatever systemd does about that, a problem that lasts ``UNHEALTHY_EXIT_S`` (30 s) more makes
``floorline run`` drain what it can, publish ``offline`` and exit with status 1, so
``Restart=on-failure`` starts it afresh: a dead thread never comes back by itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from floorline.edge.config.model import Config, load_config
from floorline.edge.daemon.daemon import Daemon
from floorline.edge.errors import FloorlineError
from floorline.edge.messages import Outbound
from floorline.edge.service.logs import setup_logging
from floorline.edge.service.metrics import MetricsServer, StatsReporter
from floorline.edge.service.sdnotify import Notifier, WatchdogPinger, watchdog_interval

if TYPE_CHECKING:
    from floorline.edge.fleet.agent import FleetAgent

log = logging.getLogger(__name__)

PID_FILE = "floorline.pid"
_READY_POLL_S = 0.2  # how often the start-up wait looks for a stop request
UNHEALTHY_EXIT_S = 30.0
"""A dead or stalled thread that long (once noticed) ends ``floorline run`` with status 1."""


class Service:
    """One gateway process: daemon, optional fleet agent, reloads."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.base = load_config(config_path)
        self.daemon = Daemon(self.base)
        self.agent: FleetAgent | None = None
        if self.base.fleet.enabled:
            # Only a fleet gateway loads the fleet code (and cryptography with it).
            from floorline.edge.fleet.agent import FleetAgent  # noqa: PLC0415

            self.agent = FleetAgent(self.daemon, self.base)
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._terminate = threading.Event()  # SIGTERM/SIGINT: never cleared, unlike _stop
        self.notifier = Notifier()
        self.pinger: WatchdogPinger | None = None
        self.reporter: StatsReporter | None = None
        self.metrics_server: MetricsServer | None = None
        self.failure: str | None = None
        """Why the service gave up (``run`` then exits with status 1), or None."""
        self.daemon.fatal_after_s = UNHEALTHY_EXIT_S
        self.daemon.on_fatal = self._fail

    def start(self, ready_timeout: float = 60.0) -> None:
        """Verify and load (the last-known-good when the fleet has one), then connect."""
        config = self.agent.startup_config() if self.agent else self.base
        try:
            self.daemon.load(config)
        except FloorlineError:
            if config is self.base:
                raise
            # The last-known-good no longer loads: the local file is the fallback of last resort.
            log.exception("last-known-good configuration failed to load; using %s",
                          self.config_path)
            assert self.agent is not None  # noqa: S101
            self.agent.config_source = "local"
            self.agent.running_version = None
            self.daemon.load(self.base)
        self.daemon.start()
        if self.agent is not None:
            self.agent.start()
        self._start_metrics()
        self._announce_ready(ready_timeout)
        pid_file = self.daemon.state_dir / PID_FILE
        try:
            pid_file.write_text(f"{os.getpid()}\n")
        except OSError as exc:
            log.warning("cannot write %s (%s): floorline reload will not find this process",
                        pid_file, exc)

    def _start_metrics(self) -> None:
        mc = self.base.metrics
        daemon = self.daemon
        if mc.prometheus.enabled:
            self.metrics_server = daemon.metrics.start_http(mc.prometheus.bind, mc.prometheus.port)
            log.info("metrics on http://%s:%d/metrics", mc.prometheus.bind,
                     self.metrics_server.port)
        if mc.stats_interval_s > 0:
            topic = self.base.topics.stats.format(gateway=self.base.gateway.id)

            def publish(payload: bytes) -> None:
                daemon.send([Outbound(topic, payload)])  # QoS 0: dropped while disconnected
                self.notifier.status(self._status_line())

            self.reporter = StatsReporter(daemon.metrics, mc.stats_interval_s, publish)
            self.reporter.start()

    def _status_line(self) -> str:
        stats = self.daemon.stats()
        pipes = stats["pipelines"]
        assert isinstance(pipes, dict)  # noqa: S101
        received = sum(int(p.get("received", 0)) for p in pipes.values())
        predictions = sum(int(p.get("predictions", 0)) for p in pipes.values())
        link = "connected" if stats["connected"] else "DISCONNECTED"
        return (f"{len(pipes)} pipeline(s), {link}; {received} messages in, "
                f"{predictions} predictions out since start")

    def _announce_ready(self, timeout: float) -> None:
        # READY only once the broker said yes and the subscriptions are acknowledged; bundles
        # were self-tested in load(). Without a broker the service is not ready: systemd's
        # TimeoutStartSec then decides, and the reason is in the log.
        # Waits in short slices: a stop asked for meanwhile must not wait for the broker (systemd
        # sends SIGKILL after TimeoutStopSec).
        transport = self.daemon.transport
        assert transport is not None  # noqa: S101
        deadline = time.monotonic() + timeout
        complained = False
        while not transport.subscribed.wait(_READY_POLL_S):
            if self._stop_requested():
                return  # asked to stop before ever being ready
            if not complained and time.monotonic() >= deadline:
                complained = True
                log.error("not ready after %.0f s: %s", timeout,
                          transport.last_error or "no connection to the broker")
        self.notifier.ready(self._status_line())
        interval = watchdog_interval()
        if interval:
            self.pinger = WatchdogPinger(
                self.notifier,
                interval,
                lambda: self.daemon.problem(max_age_s=interval / 2) is None,
            )
            self.pinger.start()

    def _stop_requested(self) -> bool:
        # SIGTERM/SIGINT, or a stop without a reload (SIGHUP sets _stop too, only to wake the
        # main loop; a SIGHUP while starting is handled once started).
        return self._terminate.is_set() or (self._stop.is_set() and not self._reload.is_set())

    def reload(self) -> bool:
        """Re-read the config file and apply it; the running config stays if it is invalid."""
        self.notifier.reloading("reloading " + str(self.config_path))
        try:
            return self._reload_now()
        finally:
            self.notifier.ready(self._status_line())

    def _reload_now(self) -> bool:
        try:
            base = load_config(self.config_path)
        except FloorlineError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)  # noqa: TRY400
            return False
        config: Config = base
        if self.agent is not None:
            self.agent.base = base
            if self.agent.lkg is not None and self.agent.config_source == "fleet":
                try:
                    config = base.with_desired(self.agent.lkg["config"], "last-known-good")
                except FloorlineError as exc:
                    log.warning("reload: the fleet configuration no longer fits: %s", exc)
        result = self.daemon.apply(config)
        if self.agent is not None:
            self.agent.record(
                self.agent.running_version,
                "local_reload" if result.ok else "rejected",
                "SIGHUP: " + ("applied " + str(self.config_path) if result.ok else result.reason),
            )
            self.agent.report()
        return result.ok

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads.

        Installed before start, so no signal that arrives while starting falls to the default
        action (SIGHUP's would kill the process).
        """

        def on_stop(signum: int, frame: object) -> None:
            del frame
            log.info("signal %d: stopping", signum)
            self._terminate.set()
            self._stop.set()

        def on_hup(signum: int, frame: object) -> None:
            del signum, frame
            self._reload.set()
            self._stop.set()  # wake the loop; it tells the two apart

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def run_until_signalled(self) -> None:
        """Serve until SIGTERM/SIGINT; reload on SIGHUP."""
        while True:
            self._stop.wait(1.0)
            if self._terminate.is_set():
                break  # before a reload asked for at the same time: stopping wins
            if self._reload.is_set():
                self._reload.clear()
                self._stop.clear()
                log.info("SIGHUP: reloading %s", self.config_path)
                self.reload()
                continue
            if self._stop.is_set():
                break

    def _fail(self, reason: str) -> None:
        # The daemon's monitor thread, every period while the problem lasts: ask the main loop
        # to stop (again, should a reload have cleared the request).
        if self.failure is None:
            log.error("unhealthy for %.0f s (%s): exiting with status 1 for a restart",
                      self.daemon.fatal_after_s or 0.0, reason)
            self.failure = reason
        self._stop.set()

    def stop(self) -> None:
        """Stop the agent, drain and stop the daemon, remove the pid file."""
        self.notifier.stopping("draining")
        if self.pinger is not None:
            self.pinger.stop()
        if self.reporter is not None:
            self.reporter.stop()
        if self.agent is not None:
            self.agent.stop()
        self.daemon.stop(f"unhealthy: {self.failure}" if self.failure else "shutdown")
        if self.metrics_server is not None:
            self.metrics_server.stop()
        with contextlib.suppress(OSError):  # a read-only state directory had none
            (self.daemon.state_dir / PID_FILE).unlink(missing_ok=True)


def run(config_path: Path, *, verbose: bool = False) -> int:
    """The ``floorline run`` command; VERBOSE (``-v``) logs at DEBUG whatever the config says."""
    service = Service(config_path)
    setup_logging("DEBUG" if verbose else service.base.logging.level)
    service.install_signal_handlers()
    service.start()
    try:
        service.run_until_signalled()
    finally:
        service.stop()
    return 1 if service.failure else 0


def send_reload(config_path: Path) -> str:
    """Signal the running daemon of CONFIG_PATH to reload; return what was done."""
    config = load_config(config_path)
    pid_file = config.resolved_state_dir() / PID_FILE
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError) as exc:
        raise FloorlineError(f"no running daemon found ({pid_file}: {exc})") from exc
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError as exc:
        raise FloorlineError(f"process {pid} from {pid_file} is not running") from exc
    return f"sent SIGHUP to floorline (pid {pid}); it applies {config_path} if it is valid"
