"""Real test brokers (mosquitto, nats-server), a paho probe client, and test TLS material.

``Mosquitto`` and ``NatsServer`` run their broker as a subprocess on free 127.0.0.1 ports,
configured from the versioned files in ``tests/mosquitto/`` and ``tests/nats/``; they never touch
the system brokers (mosquitto on 1883, NATS on 4222). Both can be killed with SIGKILL and started
again with the same ports and stored state. ``MqttProbe`` is the other side of the wire: it
subscribes, publishes and waits for messages with a deadline. ``make_tls_material`` writes a
throwaway CA, server and client certificate with ``cryptography``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any, Literal, Protocol

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

TEMPLATES = Path(__file__).parent / "mosquitto"
NATS_TEMPLATES = Path(__file__).parent / "nats"
HOST = "127.0.0.1"
START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0


def _find_mosquitto() -> str:
    found = os.environ.get("FLOORLINE_MOSQUITTO") or shutil.which("mosquitto")
    if found is None and Path("/usr/sbin/mosquitto").is_file():
        found = "/usr/sbin/mosquitto"
    if found is None:
        raise BrokerError(
            "mosquitto not found: install it (apt install mosquitto) or set FLOORLINE_MOSQUITTO"
        )
    return found


def _find_mosquitto_passwd() -> str:
    found = shutil.which("mosquitto_passwd")
    if found is None:
        raise BrokerError("mosquitto_passwd not found: install the mosquitto package")
    return found


class BrokerError(RuntimeError):
    """The test broker could not be started or configured (the message carries its log tail)."""


class ProbeError(RuntimeError):
    """The probe client could not connect, subscribe or publish."""


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll CONDITION until it is true; raise TimeoutError naming WHAT after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (bind to port 0, read it, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# -- TLS material ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsMaterial:
    """PEM files of a throwaway CA, a server certificate for 127.0.0.1/localhost and a client."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        # Key identifiers: Python 3.13's default X509 strict verification requires them.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls_material(directory: Path, name: str = "floorline-test") -> TlsMaterial:
    """Write a CA, a server certificate (SAN 127.0.0.1, localhost) and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue(
        f"{name} CA",
        ca_key,
        None,
        ca_key,
        [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                True,
            ),
        ],
    )
    leaf_usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(
        f"{name} broker",
        server_key,
        ca,
        ca_key,
        [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (leaf_usage, True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
                ),
                False,
            ),
        ],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue(
        f"{name} client",
        client_key,
        ca,
        ca_key,
        [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (leaf_usage, True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
        ],
    )
    material = TlsMaterial(
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
    for path, cert in ((material.ca_cert, ca), (material.server_cert, server),
                       (material.client_cert, client)):
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(material.server_key, server_key)
    _write_key(material.client_key, client_key)
    return material


# -- the brokers -------------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    # Linux: the broker gets SIGKILL if the test process dies without running finalizers.
    libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


if sys.platform == "linux":
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    _PREEXEC: Callable[[], None] | None = _die_with_parent
else:  # pragma: no cover
    _PREEXEC = None


def _kill_all(processes: list[subprocess.Popen[bytes]]) -> None:
    # The finalizer: whatever happens to the test, no broker outlives it.
    for proc in processes:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT_S)


Config = Literal["plain", "auth", "tls"]
MqttVersion = Literal["3.1.1", "5"]
_RUNNING = re.compile(r"mosquitto version \S+ running")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


class _BrokerProcess:
    """What the test brokers share: a subprocess on 127.0.0.1 and its log file.

    Ports are chosen at the first ``start()`` and kept by ``restart()``, so clients reconnect to
    the same address and find the persisted state. Subclasses say how to render the config, what
    to run and when the broker is ready.
    """

    program = "broker"
    """The executable's name, for messages."""
    max_protocol: MqttVersion = "5"
    """The newest MQTT version the broker speaks; probes use it unless told otherwise."""
    start_timeout_s = START_TIMEOUT_S
    tls: TlsMaterial | None = None
    require_certificate = False

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._ports_chosen = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._spawned: list[subprocess.Popen[bytes]] = []
        self._finalizer = weakref.finalize(self, _kill_all, self._spawned)

    # -- what subclasses provide --------------------------------------------------------------

    @property
    def port(self) -> int:
        """The MQTT port clients connect to."""
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        """The broker's log file (appended to across restarts)."""
        raise NotImplementedError

    def _choose_ports(self) -> None:
        raise NotImplementedError

    def _render(self) -> None:
        raise NotImplementedError

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self, log_mark: int) -> bool:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Files the broker needs before it starts (none by default)."""

    # -- addresses --------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the broker listens on."""
        return HOST

    @property
    def pid(self) -> int | None:
        """The running broker's process id, or None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def users(self) -> dict[str, str]:
        """User name → password of the broker's logins (none: anonymous clients)."""
        return {}

    @property
    def stderr_path(self) -> Path:
        """Where the broker's stderr goes (appended to across restarts)."""
        return self.workdir / f"{self.program}.stderr"

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the broker and wait (bounded) until it is ready for MQTT clients."""
        if self.running:
            raise BrokerError(f"{self!r} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._ports_chosen:
            self._spawn()
            return self
        # A free port can be taken between the probe and the broker's bind; pick others then.
        for attempt in range(3):
            self._choose_ports()
            try:
                self._spawn()
            except BrokerError:
                if attempt == 2 or "address already in use" not in self.log_tail().lower():
                    raise
                continue
            self._ports_chosen = True
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(self) -> None:
        self._render()
        mark = self.log_mark()
        self._prepare()
        with self.stderr_path.open("ab") as stderr:
            proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # a Ctrl-C to pytest must not reach the broker first
                # PR_SET_PDEATHSIG fires when the spawning *thread* exits, so only a broker
                # started from the main thread may use it; others rely on the finalizer.
                preexec_fn=(  # noqa: PLW1509 - prctl only, before exec
                    _PREEXEC if threading.current_thread() is threading.main_thread() else None
                ),
            )
        self._proc = proc
        self._spawned.append(proc)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if proc.poll() is not None:
                raise BrokerError(
                    f"{self.program} exited with {proc.returncode} on start:\n{self.log_tail()}"
                )
            if self._ready(mark):
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise BrokerError(
                    f"{self.program} was not ready on {HOST}:{self.port} within "
                    f"{self.start_timeout_s:g} s:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM and wait (the broker saves its state on the way out); SIGKILL if stuck."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL: the broker dies at once; what it had not written to disk is gone."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(STOP_TIMEOUT_S)

    def restart(self) -> Self:
        """Stop (if running) and start again on the same ports with the same stored state."""
        self.stop()
        return self.start()

    # -- the log ------------------------------------------------------------------------------

    def log_mark(self) -> int:
        """The log's current length: pass it as SINCE to look only at what happens next."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, since: int = 0) -> str:
        """The log from byte offset SINCE on."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(since)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the log and of the broker's stderr, for failure messages."""
        err = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        tail = self.log_text().splitlines()[-lines:]
        text = "\n".join(tail) or f"({self.log_path.name} is empty)"
        if err.strip():
            text += "\n--- stderr ---\n" + "\n".join(err.splitlines()[-lines:])
        return text

    def wait_for_log(self, pattern: str, since: int = 0, timeout: float = 5.0) -> str:
        """Wait until a log line after offset SINCE matches PATTERN (a regex); return the line."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_text(since).splitlines():
                if regex.search(line):
                    return line
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no broker log line matched {pattern!r} within {timeout:g} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.01)

    def count_log(self, pattern: str, since: int = 0) -> int:
        """How many log lines after offset SINCE match PATTERN."""
        regex = re.compile(pattern)
        return sum(1 for line in self.log_text(since).splitlines() if regex.search(line))


class Mosquitto(_BrokerProcess):
    """A mosquitto subprocess on a free 127.0.0.1 port, from a template in tests/mosquitto/.

    WORKDIR holds the rendered ``mosquitto.conf``, the persistence database, ``mosquitto.log``
    and, for ``auth``, the password file. The port is chosen at the first ``start()`` and kept
    by ``restart()``, so clients reconnect to the same address and find the persisted state.
    """

    program = "mosquitto"
    max_protocol: MqttVersion = "5"

    def __init__(
        self,
        workdir: Path,
        config: Config = "plain",
        *,
        users: Mapping[str, str] | None = None,
        tls: TlsMaterial | None = None,
        require_certificate: bool = False,
        extra: str = "",
    ) -> None:
        """EXTRA: config lines appended after the template (a later line overrides an option)."""
        super().__init__(workdir)
        self.config = config
        self.tls = tls
        self.require_certificate = require_certificate
        self.extra = extra
        self._users = dict(users or {})
        self._port: int | None = None
        if config == "auth" and not self._users:
            raise BrokerError("the auth config needs users={name: password}")
        if config == "tls" and tls is None:
            raise BrokerError("the tls config needs tls=TlsMaterial")

    def __repr__(self) -> str:
        return f"<Mosquitto {self.config} {self.host}:{self._port} pid={self.pid}>"

    # -- addresses and files ------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The broker's port (fixed at the first start)."""
        if self._port is None:
            raise BrokerError("the broker has not been started yet")
        return self._port

    @property
    def users(self) -> dict[str, str]:
        """User name → password of the password file (auth config)."""
        return dict(self._users)

    @property
    def config_path(self) -> Path:
        """The rendered mosquitto.conf."""
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        """mosquitto.log (appended to across restarts)."""
        return self.workdir / "mosquitto.log"

    @property
    def password_file(self) -> Path:
        """The mosquitto_passwd file of the auth config."""
        return self.workdir / "passwd"

    @property
    def db_path(self) -> Path:
        """The persistence database."""
        return self.workdir / "mosquitto.db"

    # -- lifecycle ----------------------------------------------------------------------------

    def _choose_ports(self) -> None:
        self._port = free_port()

    def _argv(self) -> list[str]:
        return [_find_mosquitto(), "-c", str(self.config_path)]

    def _prepare(self) -> None:
        if self.config == "auth" and not self.password_file.exists():
            self._write_password_file()

    def _ready(self, log_mark: int) -> bool:
        # "running" is logged after the listener is open; checking it too means a port another
        # process grabbed in the meantime cannot pass for this broker's.
        return bool(_RUNNING.search(self.log_text(log_mark))) and _accepts(self.port)

    def reload(self, timeout: float = 5.0) -> None:
        """SIGHUP: mosquitto re-reads its config and password file; wait until it did."""
        if self._proc is None or not self.running:
            raise BrokerError(f"{self!r} is not running")
        mark = self.log_mark()
        self._proc.send_signal(signal.SIGHUP)
        # mosquitto is single-threaded: once this line is written, the reload is complete
        # before it serves the next packet.
        self.wait_for_log(r"Reloading config\.", since=mark, timeout=timeout)

    def set_password(self, user: str, password: str) -> None:
        """Add or change a user in the password file and make the running broker use it."""
        self._users[user] = password
        self._passwd(user, password, create=False)
        if self.running:
            self.reload()

    def _write_password_file(self) -> None:
        for i, (user, password) in enumerate(self._users.items()):
            self._passwd(user, password, create=i == 0)

    def _passwd(self, user: str, password: str, create: bool) -> None:
        argv = [_find_mosquitto_passwd(), "-b", *(["-c"] if create else []),
                str(self.password_file), user, password]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        if result.returncode != 0:
            raise BrokerError(f"mosquitto_passwd failed: {result.stderr or result.stdout}")

    def _render(self) -> None:
        values: dict[str, object] = {
            "port": self.port,
            "workdir": self.workdir,
            "run_user": getpass.getuser(),
            "password_file": self.password_file,
            "require_certificate": "true" if self.require_certificate else "false",
        }
        if self.tls is not None:
            values |= {
                "cafile": self.tls.ca_cert,
                "certfile": self.tls.server_cert,
                "keyfile": self.tls.server_key,
            }
        parts = []
        for name in ("common", self.config):
            text = (TEMPLATES / f"{name}.conf").read_text()
            try:
                parts.append(Template(text).substitute(values))
            except KeyError as exc:
                raise BrokerError(f"tests/mosquitto/{name}.conf: no value for ${exc}") from exc
        if self.extra:
            parts.append(self.extra)
        self.config_path.write_text("\n".join(parts))

    def wait_subscribed(
        self, client_id: str, topic_filter: str, since: int = 0, timeout: float = 5.0
    ) -> None:
        """Wait until CLIENT_ID's subscription to TOPIC_FILTER is in place on the broker.

        For clients that do not expose their SUBACK: mosquitto logs the subscription (log_type
        subscribe) after adding it, and serves packets one at a time, so a publish sent after
        this returns is routed to it.
        """
        self.wait_for_log(
            rf"^\S+: {re.escape(client_id)} \d {re.escape(topic_filter)}$", since, timeout
        )


# MQTT 3.1.1 CONNECT (clean session, keepalive 10 s) of a client id that follows, and DISCONNECT.
_CONNECT_HEADER = b"\x00\x04MQTT\x04\x02\x00\x0a"
_DISCONNECT = b"\xe0\x00"


def _mqtt_connack(port: int, timeout: float = 2.0) -> bool:
    """Whether an MQTT 3.1.1 CONNECT on PORT gets a CONNACK that accepts it (return code 0)."""
    client_id = f"floorline-ready-{uuid.uuid4().hex[:8]}".encode()
    body = _CONNECT_HEADER + len(client_id).to_bytes(2, "big") + client_id
    packet = bytes([0x10, len(body)]) + body  # the body is < 128 bytes: one length byte
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(packet)
            connack = b""
            while len(connack) < 4:
                chunk = sock.recv(4 - len(connack))
                if not chunk:
                    return False
                connack += chunk
            with contextlib.suppress(OSError):
                sock.sendall(_DISCONNECT)
    except OSError:
        return False
    return connack == b"\x20\x02\x00\x00"


def _find_nats_server() -> str:
    found = os.environ.get("FLOORLINE_NATS_SERVER") or shutil.which("nats-server")
    if found is None and Path("/usr/sbin/nats-server").is_file():
        found = "/usr/sbin/nats-server"
    if found is None:
        raise BrokerError(
            "nats-server not found: install it (apt install nats-server) or set "
            "FLOORLINE_NATS_SERVER"
        )
    return found


# How NATS spells an MQTT topic filter as a subject (its docs, "MQTT Topics and NATS Subjects").
_MQTT_TO_NATS = str.maketrans({"/": ".", ".": "//", "+": "*", "#": ">", " ": "%x20"})


class NatsServer(_BrokerProcess):
    """A nats-server with its MQTT listener, from tests/nats/nats.conf, on free ports.

    NATS keeps every MQTT session, QoS 1 message and retained message in JetStream streams; the
    store is WORKDIR/store, so ``kill()`` then ``start()`` (or ``restart()``) finds it again.
    WORKDIR also holds the rendered ``nats.conf`` and ``nats.log``. Three ports: NATS clients
    (unused by the tests, but the server always opens it), MQTT (``port``) and monitoring
    (``monitor``). Ready means the log says so *and* an MQTT CONNECT gets its CONNACK: NATS
    creates its MQTT streams on the first CONNECT, and after a SIGKILL it recovers JetStream
    before it can accept one.

    MQTT 3.1.1 only (``max_protocol``); QoS 2 is not supported by 2.9 (publishing QoS 2 closes
    the connection; a QoS 2 subscription is granted QoS 1).
    """

    program = "nats-server"
    max_protocol: MqttVersion = "3.1.1"
    # JetStream replays its store after a SIGKILL before the MQTT listener accepts a CONNECT.
    start_timeout_s = 15.0

    def __init__(self, workdir: Path, *, ack_wait_s: float = 2.0, max_ack_pending: int = 1000):
        super().__init__(workdir)
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending
        self.server_name = f"floorline-test-{uuid.uuid4().hex[:8]}"
        self._ports: dict[str, int] | None = None

    def __repr__(self) -> str:
        port = self._ports["mqtt"] if self._ports else None
        return f"<NatsServer {self.host}:{port} pid={self.pid}>"

    @property
    def port(self) -> int:
        """The MQTT listener's port (fixed at the first start)."""
        return self._port_of("mqtt")

    @property
    def client_port(self) -> int:
        """The NATS client port."""
        return self._port_of("client")

    @property
    def monitor_port(self) -> int:
        """The HTTP monitoring port (/varz, /jsz, /connz)."""
        return self._port_of("monitor")

    def _port_of(self, name: str) -> int:
        if self._ports is None:
            raise BrokerError("the broker has not been started yet")
        return self._ports[name]

    @property
    def config_path(self) -> Path:
        """The rendered nats.conf."""
        return self.workdir / "nats.conf"

    @property
    def log_path(self) -> Path:
        """nats.log (appended to across restarts)."""
        return self.workdir / "nats.log"

    @property
    def store_dir(self) -> Path:
        """JetStream's store (sessions, QoS 1 messages, retained messages)."""
        return self.workdir / "store"

    def monitor(self, endpoint: str) -> dict[str, Any]:
        """GET a monitoring endpoint, e.g. ``jsz?streams=true``, parsed."""
        url = f"http://{HOST}:{self.monitor_port}/{endpoint}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body: dict[str, Any] = json.load(response)
        return body

    def backlog(self, topic_filter: str) -> tuple[int, int]:
        """QoS 1 messages the broker holds for subscriptions to TOPIC_FILTER, every session.

        (in flight: sent and not yet acknowledged, queued: not yet sent), from the JetStream
        consumers NATS keeps per QoS 1 subscription.
        """
        subject = "$MQTT.msgs." + topic_filter.translate(_MQTT_TO_NATS)
        report = self.monitor("jsz?accounts=true&streams=true&consumers=true&config=true")
        in_flight = queued = 0
        for account in report.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                for consumer in stream.get("consumer_detail") or []:
                    if consumer["config"].get("filter_subject") == subject:
                        in_flight += consumer["num_ack_pending"]
                        queued += consumer["num_pending"]
        return in_flight, queued

    def _choose_ports(self) -> None:
        ports: set[int] = set()
        while len(ports) < 3:  # three distinct ones: a released port can come back at once
            ports.add(free_port())
        self._ports = dict(zip(("client", "mqtt", "monitor"), sorted(ports), strict=True))

    def _argv(self) -> list[str]:
        return [_find_nats_server(), "-c", str(self.config_path)]

    def _ready(self, log_mark: int) -> bool:
        return "Server is ready" in self.log_text(log_mark) and _mqtt_connack(self.port)

    def _render(self) -> None:
        values = {
            "server_name": self.server_name,
            "client_port": self.client_port,
            "mqtt_port": self.port,
            "monitor_port": self.monitor_port,
            "log_file": self.log_path,
            "store_dir": self.store_dir,
            "ack_wait": f"{self.ack_wait_s:g}s",
            "max_ack_pending": self.max_ack_pending,
        }
        text = (NATS_TEMPLATES / "nats.conf").read_text()
        try:
            self.config_path.write_text(Template(text).substitute(values))
        except KeyError as exc:
            raise BrokerError(f"tests/nats/nats.conf: no value for ${exc}") from exc


Broker = Mosquitto | NatsServer
"""Any test broker: what the probe and the daemon harness need is common to both."""


# -- the probe client ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """A message the probe received."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    received_at: float
    """time.monotonic() when paho handed it over."""

    @property
    def text(self) -> str:
        """The payload as UTF-8."""
        return self.payload.decode()


class MqttProbe:
    """A paho (VERSION2 callbacks) test client: every call waits for the broker, with a deadline.

    ``connect`` returns after a successful CONNACK, ``subscribe`` after the SUBACK, ``publish``
    after the PUBACK/PUBCOMP (QoS > 0). Received messages collect in ``messages``;
    ``wait_for`` blocks until enough have arrived. After a lost connection paho reconnects and
    the probe subscribes again, so it survives broker restarts in fault tests; that re-subscribe
    is not waited for, so after a restart use ``Mosquitto.wait_subscribed(probe.client_id, ...)``
    before relying on messages from other clients.

    PERSISTENT (MQTT 3.1.1 only) connects with clean session off: the broker keeps the
    subscriptions and queues QoS 1 messages while the probe is away (a broker restart), and the
    probe misses nothing the broker kept.
    """

    def __init__(
        self,
        client_id: str | None = None,
        *,
        protocol: Literal["3.1.1", "5"] = "5",
        persistent: bool = False,
    ) -> None:
        self.client_id = client_id or f"probe-{uuid.uuid4().hex[:8]}"
        self._v5 = protocol == "5"
        if persistent and self._v5:
            raise ProbeError("persistent probes speak MQTT 3.1.1 (clean session off)")
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            clean_session=None if self._v5 else not persistent,
        )
        self._client.reconnect_delay_set(1, 1)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._cond = threading.Condition()
        self._messages: list[Message] = []
        self._subscriptions: dict[str, int] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._connack: ReasonCode | None = None
        self.connected = threading.Event()
        self._started = False

    def __enter__(self) -> MqttProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paho callbacks (network thread) -----------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        del userdata, properties
        with self._cond:
            self._connack = reason_code
            subscriptions = list(self._subscriptions.items())
            self._cond.notify_all()
        if reason_code.is_failure:
            return
        if subscriptions and not flags.session_present:  # a reconnect to a fresh session
            client.subscribe(subscriptions)
        self.connected.set()

    def _on_disconnect(self, *args: Any) -> None:
        del args
        self.connected.clear()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        del client, userdata, properties
        with self._cond:
            self._subacks[mid] = reason_codes
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        del client, userdata
        received_at = time.monotonic()
        message = Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), received_at)
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    # -- API ---------------------------------------------------------------------------------

    def connect(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        keepalive: int = 30,
        timeout: float = 5.0,
    ) -> MqttProbe:
        """Connect and wait for a successful CONNACK; raise ProbeError otherwise."""
        if username is not None:
            self._client.username_pw_set(username, password)
        if ca_file is not None or cert_file is not None:
            self._client.tls_set(
                ca_certs=str(ca_file) if ca_file else None,
                certfile=str(cert_file) if cert_file else None,
                keyfile=str(key_file) if key_file else None,
            )
        try:
            self._client.connect(host, port, keepalive=keepalive)
        except OSError as exc:
            raise ProbeError(f"probe cannot connect to {host}:{port}: {exc}") from exc
        self._client.loop_start()
        self._started = True
        with self._cond:
            if not self._cond.wait_for(lambda: self._connack is not None, timeout):
                raise ProbeError(f"no CONNACK from {host}:{port} within {timeout:g} s")
            connack = self._connack
        assert connack is not None
        if connack.is_failure:
            raise ProbeError(f"broker refused the probe: {connack}")
        return self

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 5.0) -> None:
        """Subscribe and wait for the SUBACK; raise ProbeError if the broker refuses."""
        with self._cond:
            self._subscriptions[topic_filter] = qos
        result, mid = self._client.subscribe(topic_filter, qos)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise ProbeError(f"subscribe {topic_filter!r}: {mqtt.error_string(result)}")
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, timeout):
                raise ProbeError(f"no SUBACK for {topic_filter!r} within {timeout:g} s")
            codes = self._subacks.pop(mid)
        if any(code.is_failure for code in codes):
            raise ProbeError(f"broker refused the subscription {topic_filter!r}: {codes}")

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 0,
        retain: bool = False,
        timeout: float = 5.0,
    ) -> None:
        """Publish; with QoS > 0 wait for the broker's acknowledgement (bounded)."""
        deadline = time.monotonic() + timeout
        if not self.connected.wait(timeout):
            raise ProbeError(f"probe not connected, cannot publish to {topic!r}")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        try:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        except (RuntimeError, ValueError) as exc:
            raise ProbeError(f"publish to {topic!r} failed: {exc}") from exc
        if not info.is_published():
            raise ProbeError(f"publish to {topic!r} not acknowledged within {timeout:g} s")

    @property
    def messages(self) -> list[Message]:
        """Everything received so far, in arrival order (a copy)."""
        with self._cond:
            return list(self._messages)

    def clear(self) -> None:
        """Forget the messages received so far."""
        with self._cond:
            self._messages.clear()

    def wait_for(
        self, n: int = 1, topic_filter: str | None = None, timeout: float = 10.0
    ) -> list[Message]:
        """The first N messages (matching TOPIC_FILTER, if given); TimeoutError after TIMEOUT."""

        def matching() -> list[Message]:
            return [
                m for m in self._messages
                if topic_filter is None or mqtt.topic_matches_sub(topic_filter, m.topic)
            ]

        with self._cond:
            if self._cond.wait_for(lambda: len(matching()) >= n, timeout):
                return matching()[:n]
            got = matching()
            seen = [m.topic for m in self._messages][-10:]
        where = f" on {topic_filter!r}" if topic_filter else ""
        raise TimeoutError(
            f"{self.client_id}: waited {timeout:g} s for {n} message(s){where}, got {len(got)}; "
            f"last topics seen: {seen}"
        )

    def close(self) -> None:
        """Disconnect cleanly and stop paho's thread. Safe to call twice."""
        if self._started:
            self._started = False
            self._client.disconnect()
            self._client.loop_stop()


# -- fixture types (tests/conftest.py) -----------------------------------------------------------

AUTH_USER = "gateway"
AUTH_PASSWORD = "correct horse battery staple"  # noqa: S105 - a test broker's password


class BrokerFactory(Protocol):
    """Starts a broker that is stopped when the test ends."""

    def __call__(
        self,
        config: Config = "plain",
        *,
        users: dict[str, str] | None = None,
        tls: TlsMaterial | None = None,
        require_certificate: bool = False,
    ) -> Mosquitto: ...


class ProbeFactory(Protocol):
    """Makes an MqttProbe connected to BROKER; credentials and TLS default from the broker.

    PROTOCOL defaults to the newest the broker speaks (``broker.max_protocol``).
    """

    def __call__(
        self,
        broker: Broker,
        *,
        client_id: str | None = None,
        protocol: MqttVersion | None = None,
        persistent: bool = False,
        **connect: Any,
    ) -> MqttProbe: ...
