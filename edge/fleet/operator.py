"""``floorline fleet``: the operator's side of fleet pushes.

    floorline fleet keygen PREFIX
    floorline fleet push (--gateway ID | --group NAME) --config FILE [--bundle DIR ...] --key KEY
    floorline fleet status [--gateway ID]

``push`` publishes each bundle archive retained on ``floorline/bundles/{sha256}``, rewrites the
config's pipelines to name them ``sha256:<hex>``, and publishes the signed desired state
retained on the gateway's or the group's ``desired`` topic, so a gateway that is offline now
applies it when it connects.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from floorline.edge.bundle import archive
from floorline.edge.bundle.bundle import SIGNATURE_FILE, Bundle
from floorline.edge.bundle.hashing import sha256_bytes
from floorline.edge.bundle.signing import load_private_key, sign
from floorline.edge.cli import table as text_table
from floorline.edge.config.model import PUSHABLE_SECTIONS, BrokerConfig
from floorline.edge.config.starter import parse_broker
from floorline.edge.errors import ConfigError, FloorlineError
from floorline.edge.fleet.envelope import seal
from floorline.edge.mqtt.transport import MqttTransport
from floorline.edge.resources import EXAMPLE_PREFIX, example_bundle


def broker_config(address: str, protocol: str) -> BrokerConfig:
    """A broker config from HOST, HOST:PORT or [IPv6]:PORT (port 1883 when left out)."""
    host, port = parse_broker(address)
    return BrokerConfig(host=host, port=port, protocol=protocol)  # type: ignore[arg-type]


def _connect(broker: BrokerConfig, name: str, handler: Any = None,
             subs: list[tuple[str, int]] | None = None) -> MqttTransport:
    t = MqttTransport(broker, f"floorline-{name}-{time.monotonic_ns() % 10**8}",
                      handler or (lambda *_: None), subs or [])
    t.start()
    if not t.wait_connected(10):
        t.stop()
        raise FloorlineError(
            f"cannot reach the broker at {broker.host}:{broker.port}: {t.last_error or 'timeout'}"
        )
    return t


def _pack(bundle_dir: Path, sign_key: Any | None, *, verify: bool = True) -> bytes:
    """The bundle directory as one tar (signed with SIGN_KEY first if asked).

    VERIFY false skips the local check, for drills that prove the gateway refuses bad bundles.
    """
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "bundle"
        shutil.copytree(bundle_dir, work)
        if sign_key is not None:
            manifest = (work / "manifest.json").read_bytes()
            (work / SIGNATURE_FILE).write_bytes(sign(manifest, sign_key).to_bytes())
        if verify:
            with Bundle.open(work) as bundle:  # never push what a gateway would refuse to open
                del bundle
        out = Path(tmp) / "bundle.tar"
        archive.pack(work, out)
        return out.read_bytes()


def push(
    *,
    target: dict[str, str],
    config_file: Path,
    bundles: list[Path],
    key_file: Path,
    broker: BrokerConfig,
    version: int | None = None,
    ttl_hours: float = 168.0,
    sign_bundles: bool = False,
    verify: bool = True,
    out: Any = sys.stdout,
) -> int:
    """Publish bundles and a signed desired state; return the version pushed."""
    key = load_private_key(key_file)
    try:
        doc = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{config_file}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{config_file}: must be a YAML mapping")
    desired = {k: v for k, v in doc.items() if k in PUSHABLE_SECTIONS}
    if not desired.get("pipelines"):
        raise ConfigError(f"{config_file}: a push needs a pipelines section")
    base = config_file.resolve().parent
    given = {p.resolve(): p for p in bundles}
    archives: dict[str, bytes] = {}
    by_dir: dict[Path, str] = {}
    for pipeline in desired["pipelines"]:
        ref = str(pipeline.get("bundle", ""))
        if ref.startswith("sha256:"):
            continue
        if ref.startswith(EXAMPLE_PREFIX):
            # Shipped with floorline: the name is exact, so it needs no --bundle.
            path = example_bundle(ref.removeprefix(EXAMPLE_PREFIX)).resolve()
        else:
            path = (base / ref).resolve() if not Path(ref).is_absolute() else Path(ref)
        if path not in given and not ref.startswith(EXAMPLE_PREFIX):
            raise ConfigError(
                f"pipeline {pipeline.get('name')}: bundle {ref} is a local path; "
                "add --bundle for it (or name a pushed one as sha256:<hex>)"
            )
        if path not in by_dir:
            data = _pack(path, key if sign_bundles else None, verify=verify)
            digest = sha256_bytes(data)
            archives[digest] = data
            by_dir[path] = digest
        pipeline["bundle"] = "sha256:" + by_dir[path]
    version = version if version is not None else int(time.time() * 1000)
    envelope = seal(
        key=key,
        version=version,
        target=target,
        config=desired,
        bundles=sorted(archives) + [
            str(p["bundle"])[7:] for p in desired["pipelines"]
            if str(p["bundle"])[7:] not in archives
        ],
        ttl=dt.timedelta(hours=ttl_hours),
    )
    topic = (
        f"floorline/{target['gateway']}/desired"
        if "gateway" in target
        else f"floorline/groups/{target['group']}/desired"
    )
    t = _connect(broker, "push")
    try:
        total = sum(len(a) for a in archives.values())
        sent = 0
        for digest, data in archives.items():
            info = t.publish(f"floorline/bundles/{digest}", data, 1, True)
            info.wait_for_publish(60)
            sent += len(data)
            print(f"bundle {digest[:12]}… {len(data):,} B published "
                  f"({sent:,}/{total:,} B)", file=out)
        info = t.publish(topic, envelope, 1, True)
        info.wait_for_publish(30)
        if not info.is_published():
            raise FloorlineError(f"the broker did not acknowledge the push on {topic}")
    finally:
        t.stop()
    print(f"pushed version {version} to {topic}", file=out)
    return version


def status(*, broker: BrokerConfig, gateway: str | None = None, wait_s: float = 2.0,
           out: Any = sys.stdout) -> list[dict[str, Any]]:
    """Collect retained state and reported documents; print a table; return the rows."""
    docs: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def on_message(topic: str, payload: bytes, *meta: object) -> None:
        del meta
        parts = topic.split("/")
        if len(parts) != 3 or not payload:
            return
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        with lock:
            docs.setdefault(parts[1], {})[parts[2]] = body

    gw = gateway or "+"
    t = _connect(broker, "status", on_message,
                 [(f"floorline/{gw}/state", 1), (f"floorline/{gw}/reported", 1)])
    try:
        time.sleep(wait_s)  # retained messages arrive right after the SUBACK; a short wait suffices
    finally:
        t.stop()
    rows = []
    for name in sorted(docs):
        state = docs[name].get("state", {})
        rep = docs[name].get("reported", {})
        history = rep.get("history") or []
        last = history[-1] if history else {}
        health = (rep.get("health") or {}).get("pipelines", {})
        rows.append({
            "gateway": name,
            "online": state.get("state") == "online",
            "version": rep.get("running_version"),
            "source": rep.get("config_source"),
            "models": ", ".join(f"{b['name']} {b['version']}" for b in rep.get("bundles", [])),
            "last_apply": f"{last.get('result', '-')} v{last.get('version')}" if last else "-",
            "reason": last.get("reason", ""),
            "dead_letters": sum(p.get("dead_letters", 0) for p in health.values()),
        })
    table = text_table.render(
        ("gateway", "online", "version", "source", "models", "last apply", "dead letters"),
        [(r["gateway"], "yes" if r["online"] else "NO", str(r["version"] or "-"),
          str(r["source"] or "-"), r["models"] or "-", r["last_apply"], str(r["dead_letters"]))
         for r in rows],
    )
    print(table if rows else "no gateways reported (wrong broker or topic prefix?)", file=out)
    for r in rows:
        if r["last_apply"].startswith(("rejected", "rolled_back")):
            print(f"  {r['gateway']}: {r['last_apply']}: {r['reason']}", file=out)
    return rows
