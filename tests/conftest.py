"""Broker fixtures: each starts its own broker on free ports, never the system ones (1883, 4222).

``mosquitto`` is a fresh plain broker per test (for tests that kill or restart it);
``mosquitto_session`` is one shared plain broker for tests that only need somewhere to talk, with
``unique_topic`` keeping their traffic apart. ``auth_broker``, ``tls_broker`` and ``mtls_broker``
are per test. ``nats`` is a nats-server per test with its MQTT listener and a JetStream store
under the test's tmp_path (kill it, restart it: the store stays). ``mqtt_client`` makes
connected ``MqttProbe`` clients that are closed afterwards.

Tests that account for what a broker lost across kills record it with ``broker_losses``; the
terminal summary lists those records, so a run says what each broker lost, not only pass/fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.mqtt_broker import (
    AUTH_PASSWORD,
    AUTH_USER,
    Broker,
    BrokerFactory,
    Config,
    Mosquitto,
    MqttProbe,
    MqttVersion,
    NatsServer,
    ProbeFactory,
    TlsMaterial,
    make_tls_material,
)


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    """``broker_factory(config, users=..., tls=..., require_certificate=...)`` → started broker."""
    brokers: list[Mosquitto] = []

    def start(
        config: Config = "plain",
        *,
        users: dict[str, str] | None = None,
        tls: TlsMaterial | None = None,
        require_certificate: bool = False,
    ) -> Mosquitto:
        broker = Mosquitto(
            tmp_path / f"mosquitto-{len(brokers)}",
            config,
            users=users,
            tls=tls,
            require_certificate=require_certificate,
        )
        brokers.append(broker)
        return broker.start()

    yield start
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(broker_factory: BrokerFactory) -> Mosquitto:
    """A plain broker of this test's own: kill it, restart it, read its log."""
    return broker_factory()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tiny_disk("64k")``: a fresh tmpfs of that size (a disk that fills); skips the test when
    mounting is not permitted here. Unmounted afterwards (lazily, should a daemon still hold it)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if shutil.which("mount") is None:
            pytest.skip("needs mount(8)")
        target = tmp_path / f"tiny-{len(mounted)}"
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                              capture_output=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        if subprocess.run(["umount", str(target)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


@pytest.fixture(scope="session")
def mosquitto_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One plain broker for the whole session; use ``unique_topic`` and don't stop it."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto-session")).start()
    yield broker
    broker.stop()


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest) -> str:
    """A topic prefix of this test's own, e.g. ``test/test_roundtrip-5-1a2b3c4d``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")[:80]
    return f"test/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def tls_material(tmp_path: Path) -> TlsMaterial:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    return make_tls_material(tmp_path / "tls")


@pytest.fixture
def auth_broker(broker_factory: BrokerFactory) -> Mosquitto:
    """A broker that refuses anonymous clients; ``broker.users`` holds the one valid login."""
    return broker_factory("auth", users={AUTH_USER: AUTH_PASSWORD})


@pytest.fixture
def tls_broker(broker_factory: BrokerFactory, tls_material: TlsMaterial) -> Mosquitto:
    """A TLS broker with the test CA's server certificate; client certificates optional."""
    return broker_factory("tls", tls=tls_material)


@pytest.fixture
def mtls_broker(broker_factory: BrokerFactory, tls_material: TlsMaterial) -> Mosquitto:
    """A TLS broker that requires a client certificate signed by the test CA."""
    return broker_factory("tls", tls=tls_material, require_certificate=True)


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test's own (MQTT 3.1.1 listener, JetStream store in tmp_path)."""
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def mqtt_client() -> Iterator[ProbeFactory]:
    """``mqtt_client(broker)`` → a connected MqttProbe; all are closed after the test.

    Credentials and TLS files default from the broker (its first user; its CA, and the client
    certificate if it requires one), the protocol to the newest the broker speaks; keyword
    arguments go to ``MqttProbe.connect``.
    """
    probes: list[MqttProbe] = []

    def make(
        broker: Broker,
        *,
        client_id: str | None = None,
        protocol: MqttVersion | None = None,
        persistent: bool = False,
        **connect: Any,
    ) -> MqttProbe:
        if broker.users and "username" not in connect:
            connect["username"], connect["password"] = next(iter(broker.users.items()))
        if broker.tls is not None:
            connect.setdefault("ca_file", broker.tls.ca_cert)
            if broker.require_certificate:
                connect.setdefault("cert_file", broker.tls.client_cert)
                connect.setdefault("key_file", broker.tls.client_key)
        probe = MqttProbe(client_id, protocol=protocol or broker.max_protocol,
                          persistent=persistent)
        probes.append(probe)
        return probe.connect(broker.host, broker.port, **connect)

    yield make
    for probe in probes:
        probe.close()


_LOSSES = pytest.StashKey[list[str]]()


@pytest.fixture
def broker_losses(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``broker_losses("mosquitto: 120 acknowledged, 3 lost")``: listed in the terminal summary."""
    lines = request.config.stash.setdefault(_LOSSES, [])

    def record(line: str) -> None:
        lines.append(f"{request.node.nodeid}: {line}")
        request.node.user_properties.append(("broker_losses", line))

    return record


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """List what brokers lost in the kill tests (the tests pass when floorline lost nothing)."""
    lines = config.stash.get(_LOSSES, [])
    if lines:
        terminalreporter.section("messages lost by brokers (not by floorline)")
        for line in lines:
            terminalreporter.write_line(line)


class ZooRun:
    """``python -m tests.zoo`` in the background at the lowest CPU priority (tests/test_zoo.py).

    Four minutes of TensorFlow conversions that need no broker: started when the session's
    tests are known, it uses the cores while the other tests wait on sockets, and nice 19 keeps
    it from taking CPU a timing-sensitive test wants.
    """

    TIMEOUT_S = 1800.0

    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="floorline-zoo-"))
        self.out = self.work / "cells.json"
        self.log = self.work / "zoo.log"
        root = Path(__file__).resolve().parent.parent
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.zoo", "--out", str(self.work / "bundles"),
                 "--json", str(self.out)],
                cwd=root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=lambda: os.nice(19),  # noqa: PLW1509 - no threads yet at collection
            )

    def result(self) -> list[Any]:
        """The zoo's rows, once the run has finished; fails with its log if it broke."""
        from tests import zoo  # noqa: PLC0415 - imports the converter (TensorFlow)

        try:
            self.process.wait(timeout=self.TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if not self.out.is_file():
            tail = self.log.read_text(errors="replace")[-4000:]
            pytest.fail(f"the zoo run wrote no table (exit {self.process.returncode}):\n{tail}")
        return [zoo.Row(**row) for row in orjson.loads(self.out.read_bytes())]

    def stop(self) -> None:
        """Kill the run if the session ends first (a -x stop); remove its bundles."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.work, ignore_errors=True)


ZOO_RUN = pytest.StashKey[ZooRun]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the zoo run when tests/test_zoo.py is among the selected tests."""
    if session.config.option.collectonly:
        return
    if any(item.path.name == "test_zoo.py" for item in session.items):
        session.config.stash[ZOO_RUN] = ZooRun()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop a zoo run that is still going."""
    run = session.config.stash.get(ZOO_RUN, None)
    if run is not None:
        run.stop()
