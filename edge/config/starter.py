"""A starter gateway config (``floorline init``): one pipeline on the shipped example bundle.

The text is rendered from a template and then parsed like any config file before anyone sees
it, so ``floorline init`` never writes a config that ``floorline check`` would refuse.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from floorline.edge import __version__
from floorline.edge.backends import BACKENDS, install_hint, installed
from floorline.edge.config.model import GatewayConfig, parse_config
from floorline.edge.errors import ConfigError

_TEMPLATE = """\
# Floorline gateway config, written by `floorline init` (floorline {version}).
# Check it (validates, verifies the bundle, runs its golden self-test):
#   floorline check --config {path}
# Run it:
#   floorline run --config {path}
# Every key: `floorline schema` prints them with a description each, docs/config.md in the
# Floorline sources explains them, and `floorline examples` lists commented example configs to
# copy from. Unknown keys are errors.

gateway:
  id: {gateway_id}{gateway_pad}# in topics and the MQTT client id

broker:
  host: {host}
  port: {port}
  protocol: "5"                   # or "3.1.1" for an older broker
  # Credentials never go in this file; name where they come from:
  # username: floorline
  # password_env: FLOORLINE_MQTT_PASSWORD
  # password_file: /run/credentials/floorline.service/mqtt-password   # systemd LoadCredential=
  # tls: {{ca_file: /etc/floorline/ca.pem}}

# state_dir: /var/lib/floorline  # outbox and window journal; default: $STATE_DIRECTORY (systemd)
#                                 # or ./floorline-state beside this file

pipelines:
  # The shipped example model classifies 64-sample windows of a triaxial accelerometer as
  # healthy, imbalance, bearing_outer_race or looseness. It reads per-sample JSON on
  # plant/<line>/<asset>/vibration, for example
  #   {{"ts": 1732780000.001, "seq": 17, "accel_x": 0.12, "accel_y": -0.03, "accel_z": 0.01}}
  # and `floorline simulate --broker {host_port}` publishes a plant like that.
  # Predictions go to floorline/<gateway id>/pred/vibration/<asset>.
  - name: vibration
    subscribe: ["plant/+/+/vibration"]
    bundle: example:pdm-classifier  # shipped with floorline; your own: a directory or .tar
    backend: {backend}{backend_pad}# {backend_note}
    decoder: {{type: json, timestamp: ts, sequence: seq}}
    asset: {{topic_segment: -2}}      # the topic level before 'vibration' names the asset
    window: {{hop: 32, max_gap_s: 0.05}}   # a window every 32 samples; a gap starts over
    # batch: {{max_batch: 32, max_wait_ms: 5}}
    # output: {{qos: 1, retain: false}}
"""

_COLUMN = 34  # where the trailing comments start, as in the shipped examples


@dataclass(frozen=True)
class Starter:
    """A rendered starter config and what was chosen for it."""

    text: str
    gateway_id: str
    host: str
    port: int
    backend: str
    """"litert" or "onnx" (the first installed, in ``backend: auto`` order), or "auto" if none."""


def parse_broker(address: str) -> tuple[str, int]:
    """HOST, HOST:PORT or [IPv6]:PORT to (host, port); the port defaults to 1883."""
    host, port = address.strip(), "1883"
    if host.startswith("["):  # [::1]:1883
        host, _, rest = host[1:].partition("]")
        port = rest.removeprefix(":") or port
    elif host.count(":") == 1:
        host, port = host.split(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--broker {address!r}: expected HOST:PORT, e.g. localhost:1883")
    return host, int(port)


def default_gateway_id() -> str:
    """The host name as a gateway id (letters, digits, '.', '_', '-' kept), else gw01."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname()).strip("-._")[:64]
    return name or "gw01"


def render(
    path: Path, *, gateway_id: str | None = None, broker: str = "localhost:1883"
) -> Starter:
    """The starter config for PATH, validated; ConfigError for a bad gateway id or broker."""
    host, port = parse_broker(broker)
    gateway = gateway_id if gateway_id is not None else default_gateway_id()
    try:
        GatewayConfig(id=gateway)
    except ValidationError as exc:
        reason = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"--gateway-id {gateway!r}: {reason}") from exc
    runtimes = [name for name in BACKENDS if installed(name)]
    backend = runtimes[0] if runtimes else "auto"
    if runtimes:
        note = f"runtimes installed: {', '.join(runtimes)}; or auto"
    else:
        note = "no runtime installed: " + " or ".join(install_hint(n) for n in BACKENDS)
    # JSON strings are YAML double-quoted scalars: any id or host stays one value.
    gateway_yaml = json.dumps(gateway)
    text = _TEMPLATE.format(
        version=__version__,
        path=path,
        gateway_id=gateway_yaml,
        gateway_pad=" " * max(1, _COLUMN - len("  id: ") - len(gateway_yaml)),
        host=json.dumps(host),
        port=port,
        host_port=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        backend=backend,
        backend_pad=" " * max(1, _COLUMN - len("    backend: ") - len(backend)),
        backend_note=note,
    )
    parse_config(text, "floorline init")
    return Starter(text=text, gateway_id=gateway, host=host, port=port, backend=backend)


def write(starter: Starter, path: Path, *, force: bool = False) -> None:
    """Write STARTER to PATH; an existing file is replaced only with FORCE."""
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; name the config file to write")
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; use --force to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(starter.text)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror}") from exc
