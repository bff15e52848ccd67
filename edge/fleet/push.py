"""``floorline fleet push``, ``keygen``, ``clear`` and ``gc``: publishing desired states.

``push`` checks locally what it can (the key loads, the config validates, every bundle verifies),
publishes each bundle archive retained on ``floorline/bundles/{sha256}``, rewrites the config's
pipelines to name them ``sha256:<hex>``, and publishes the signed desired state retained on the
target's topic: ``floorline/{gw}/desired`` (one document per ``--gateway``),
``floorline/groups/{group}/desired`` or ``floorline/selectors/{name}/desired``. A gateway that is
offline now applies it when it connects. With ``--wait`` it then waits for the targeted
gateways' verdicts.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from floorline.edge.bundle import archive
from floorline.edge.bundle.bundle import SIGNATURE_FILE, Bundle
from floorline.edge.bundle.hashing import sha256_bytes
from floorline.edge.bundle.signing import generate_keypair, key_id, load_private_key, sign
from floorline.edge.bundle.signing import load_public_key as _load_public_key
from floorline.edge.config.model import PUSHABLE_SECTIONS, BrokerConfig, Config
from floorline.edge.errors import ConfigError, FloorlineError
from floorline.edge.fleet.common import (
    EXIT_FAILED,
    EXIT_MISSING,
    EXIT_OK,
    FAILED_RESULTS,
    STDOUT,
    Collector,
    UsageError,
    check_level,
    check_name,
    connect,
    gateway_docs,
    groups_of,
    matches,
    now_ms,
    read_envelope,
    selector_slug,
    superseded_by,
    verdict,
    verdict_reason,
)
from floorline.edge.fleet.envelope import seal
from floorline.edge.mqtt.transport import MqttTransport
from floorline.edge.resources import EXAMPLE_PREFIX, example_bundle

BUNDLE_TOPIC = "floorline/bundles/{sha256}"
DESIRED_FILTERS = ("floorline/+/desired", "floorline/groups/+/desired",
                   "floorline/selectors/+/desired")


@dataclass
class Prepared:
    """A desired config ready to seal: bundle references rewritten, archives packed."""

    config: dict[str, Any]
    archives: dict[str, bytes]
    bundles: list[str]


def keygen(prefix: Path) -> tuple[Path, Path]:
    """Write PREFIX.key and PREFIX.pub; UsageError (not a traceback) for a wrong place."""
    parent = prefix.parent
    if not parent.is_dir():
        raise UsageError(f"cannot write {prefix.name}.key: the directory {parent} does not exist "
                         f"(mkdir -p {parent} first)")
    try:
        return generate_keypair(prefix)
    except FileExistsError as exc:
        raise UsageError(str(exc)) from exc
    except OSError as exc:
        raise UsageError(f"cannot write {prefix}.key: {exc.strerror}") from exc


def describe_key(public: Path) -> str:
    """The key id of a public key file."""
    return key_id(_load_public_key(public))


def check_ttl(ttl_hours: float) -> None:
    """Refuse a TTL that makes the document expired (or nearly) when it is published."""
    if not ttl_hours > 0:
        raise UsageError(f"--ttl-hours {ttl_hours:g}: must be more than 0; the document would "
                         "have expired before any gateway could apply it")


def _pack(bundle_dir: Path, sign_key: Ed25519PrivateKey | None, *, verify: bool = True) -> bytes:
    """The bundle directory as one tar (signed with SIGN_KEY first if asked).

    VERIFY false skips the local check, for drills that prove the gateway refuses bad bundles.
    """
    if not bundle_dir.is_dir():
        raise ConfigError(f"bundle {bundle_dir}: not a directory")
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


def load_desired(config_file: Path) -> dict[str, Any]:
    """The pushable sections of CONFIG_FILE (a normal push needs pipelines)."""
    try:
        doc = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{config_file}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{config_file}: must be a YAML mapping")
    desired = {k: v for k, v in doc.items() if k in PUSHABLE_SECTIONS}
    if not desired.get("pipelines") or not isinstance(desired["pipelines"], list):
        raise ConfigError(f"{config_file}: a push needs a pipelines section")
    return desired


def validate_desired(desired: dict[str, Any], origin: str) -> None:
    """Validate the pushed sections as a gateway would (on a minimal local file)."""
    try:
        Config.model_validate({"gateway": {"id": "operator-check"}, **desired})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{origin}: {where}: {err['msg']}") from exc


def prepare(config_file: Path, bundles: list[Path], key: Ed25519PrivateKey, *,
            sign_bundles: bool = False, verify: bool = True) -> Prepared:
    """Load, pack and check what a push sends (nothing is published)."""
    desired = load_desired(config_file)
    base = config_file.resolve().parent
    given = {p.resolve(): p for p in bundles}
    archives: dict[str, bytes] = {}
    by_dir: dict[Path, str] = {}
    refs: set[str] = set()
    for pipeline in desired["pipelines"]:
        if not isinstance(pipeline, dict):
            raise ConfigError(f"{config_file}: every pipeline is a mapping")
        # The primary bundle, and a shadow's: both travel as archives and run from the store.
        holders = [(pipeline, "bundle")]
        if isinstance(pipeline.get("shadow"), dict):
            holders.append((pipeline["shadow"], "shadow.bundle"))
        for holder, key_path in holders:
            field = key_path.rsplit(".", 1)[-1]
            ref = str(holder.get(field, ""))
            if not ref.startswith("sha256:"):
                if ref.startswith(EXAMPLE_PREFIX):
                    # Shipped with floorline: the name is exact, so it needs no --bundle.
                    path = example_bundle(ref.removeprefix(EXAMPLE_PREFIX)).resolve()
                else:
                    path = (base / ref).resolve() if not Path(ref).is_absolute() else Path(ref)
                if path not in given and not ref.startswith(EXAMPLE_PREFIX):
                    raise ConfigError(
                        f"pipeline {pipeline.get('name')}: {key_path} {ref} is a local path; "
                        "add --bundle for it (or name a pushed one as sha256:<hex>)"
                    )
                if path not in by_dir:
                    data = _pack(path, key if sign_bundles else None, verify=verify)
                    digest = sha256_bytes(data)
                    archives[digest] = data
                    by_dir[path] = digest
                holder[field] = "sha256:" + by_dir[path]
            refs.add(str(holder[field])[7:])
    validate_desired(desired, str(config_file))
    return Prepared(config=desired, archives=archives, bundles=sorted(refs | set(archives)))


def desired_topic(target: dict[str, Any], name: str = "") -> str:
    """The retained topic of a document for TARGET (NAME: a selector document's topic level)."""
    if "gateway" in target:
        return f"floorline/{target['gateway']}/desired"
    if "group" in target:
        return f"floorline/groups/{target['group']}/desired"
    return f"floorline/selectors/{name or selector_slug(target['selector'])}/desired"


def seal_doc(key: Ed25519PrivateKey, *, version: int, target: dict[str, Any],
             config: dict[str, Any], bundles: list[str], ttl_hours: float,
             deployment: str = "") -> bytes:
    """A signed envelope (the interface's payload, with the deployment name)."""
    return seal(key=key, version=version, target=target, config=config, bundles=bundles,
                ttl=dt.timedelta(hours=ttl_hours), deployment=deployment)


def publish_all(t: MqttTransport, messages: list[tuple[str, bytes]], *,
                timeout: float = 60.0) -> None:
    """Publish retained QoS 1 messages and wait until the broker acknowledged every one."""
    infos = [(topic, t.publish(topic, payload, 1, True)) for topic, payload in messages]
    deadline = time.monotonic() + timeout
    for topic, info in infos:
        try:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        except (RuntimeError, ValueError) as exc:
            raise FloorlineError(f"publishing {topic}: {exc}") from exc
        if not info.is_published():
            raise FloorlineError(f"the broker did not acknowledge {topic}")


def publish_bundles(t: MqttTransport, archives: dict[str, bytes], out: Any) -> None:
    """Publish bundle archives retained, with progress."""
    total = sum(len(a) for a in archives.values())
    sent = 0
    for digest, data in archives.items():
        publish_all(t, [(BUNDLE_TOPIC.format(sha256=digest), data)])
        sent += len(data)
        print(f"bundle {digest[:12]}… {len(data):,} B published ({sent:,}/{total:,} B)",
              file=out)


def push(
    *,
    target: dict[str, Any] | None = None,
    targets: list[dict[str, Any]] | None = None,
    config_file: Path,
    bundles: list[Path],
    key_file: Path,
    broker: BrokerConfig,
    version: int | None = None,
    ttl_hours: float = 168.0,
    sign_bundles: bool = False,
    verify: bool = True,
    deployment: str = "",
    selector_name: str = "",
    out: Any = STDOUT,
) -> int:
    """Publish bundles and one signed desired state per target; return the version pushed.

    TARGET is one target; TARGETS several (one document each, all with the same version).
    """
    all_targets = list(targets or []) + ([target] if target else [])
    if not all_targets:
        raise UsageError("a push needs a target: --gateway, --group or --selector")
    check_ttl(ttl_hours)
    if version is not None and version <= 0:
        raise UsageError(f"--version {version}: must be a positive integer")
    if deployment:
        check_name(deployment, "--deployment")
    for tg in all_targets:
        if "gateway" in tg:
            check_level(str(tg["gateway"]), "--gateway")
        elif "group" in tg:
            check_level(str(tg["group"]), "--group")
    name = selector_name or deployment
    if name:
        check_name(name, "selector name")
    key = load_private_key(key_file)
    prepared = prepare(config_file, bundles, key, sign_bundles=sign_bundles, verify=verify)
    version = version if version is not None else now_ms()
    docs = [
        (desired_topic(tg, name), seal_doc(key, version=version, target=tg,
                                           config=prepared.config, bundles=prepared.bundles,
                                           ttl_hours=ttl_hours, deployment=deployment))
        for tg in all_targets
    ]
    t = connect(broker, "push")
    try:
        publish_bundles(t, prepared.archives, out)
        publish_all(t, docs)
    finally:
        t.stop()
    for topic, _ in docs:
        print(f"pushed version {version} to {topic}"
              + (f" (deployment {deployment})" if deployment else ""), file=out)
    return version


def wait_verdicts(
    *,
    broker: BrokerConfig,
    version: int,
    gateways: list[str] | None = None,
    group: str | None = None,
    selector: dict[str, str] | None = None,
    timeout_s: float = 600.0,
    settle_s: float = 10.0,
    out: Any = STDOUT,
) -> int:
    """Wait for the targeted gateways' verdicts on VERSION; the exit code (0, 1 or 3).

    The targets: GATEWAYS, or the gateways whose reported attributes match SELECTOR, or the
    members of GROUP (from the groups the gateways report). If the gateways do not report their
    groups, every gateway that picks VERSION up is waited for, until none is pending and no new
    one appeared for SETTLE_S seconds.
    """
    verdicts: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    dynamic = False
    with Collector(broker, ["floorline/+/reported", "floorline/+/state"], "wait") as col:
        col.start()
        gws = gateway_docs(col.snapshot())
        if gateways is not None:
            wanted = set(gateways)
        elif selector is not None:
            wanted = {g for g, d in gws.items()
                      if matches(selector, (d.get("reported") or {}).get("attributes") or {})}
        else:
            members = {g: groups_of(d.get("reported") or {}) for g, d in gws.items()}
            dynamic = all(m is None for m in members.values())
            wanted = {g for g, m in members.items() if m and group in m}
        if dynamic:
            print(f"waiting for verdicts on version {version} (the gateways do not report their "
                  f"groups: waiting for those that pick it up)", file=out)
        else:
            print(f"waiting up to {timeout_s:g} s for {len(wanted)} gateway(s) to judge version "
                  f"{version}", file=out)
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            gws = gateway_docs(col.snapshot())
            for gw, doc in sorted(gws.items()):
                rep = doc.get("reported") or {}
                v = verdict(rep, version)
                if dynamic and v is not None and gw not in wanted:
                    wanted.add(gw)
                    last_new = time.monotonic()
                newer = superseded_by(rep, version) if v is None else None
                if gw in wanted and newer is not None and gw not in verdicts:
                    verdicts[gw] = "superseded"
                    print(f"  {gw}: superseded: it took up version {newer}, newer than "
                          f"{version}, so it ignores {version}", file=out)
                if gw in wanted and v not in (None, "pending") and gw not in verdicts:
                    verdicts[gw] = str(v)
                    reason = verdict_reason(rep, version)
                    print(f"  {gw}: {v} v{version}"
                          + (f": {reason}" if v in FAILED_RESULTS and reason else ""), file=out)
            settled = not dynamic or time.monotonic() - last_new >= settle_s
            if wanted and wanted <= set(verdicts) and settled:
                break
            if not wanted and not dynamic:
                break
            time.sleep(0.1)
    missing = sorted(wanted - set(verdicts))
    failed = sorted(g for g, v in verdicts.items() if v in (*FAILED_RESULTS, "superseded"))
    counts: dict[str, int] = {}
    for v in verdicts.values():
        counts[v] = counts.get(v, 0) + 1
    summary = ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none"
    print(f"verdicts on version {version}: {summary}", file=out)
    if failed:
        print(f"refused or rolled back by: {', '.join(failed)}", file=out)
    if missing:
        print(f"no verdict within {timeout_s:g} s (offline, not fleet-enabled or still on "
              f"probation): {', '.join(missing)}", file=out)
    if not wanted:
        print("no targeted gateway reported", file=out)
    if failed:
        return EXIT_FAILED
    if missing or not wanted:
        return EXIT_MISSING
    return EXIT_OK


def clear(*, broker: BrokerConfig, topics: list[str], out: Any = STDOUT) -> int:
    """Publish an empty retained message on each topic (the broker then forgets it)."""
    t = connect(broker, "clear")
    try:
        publish_all(t, [(topic, b"") for topic in topics])
    finally:
        t.stop()
    for topic in topics:
        print(f"cleared {topic}", file=out)
    return EXIT_OK


def referenced_bundles(docs: dict[str, bytes]) -> set[str]:
    """Bundle digests named by retained desired documents and rollout documents."""
    from floorline.edge.fleet.rollout import rollout_bundles  # noqa: PLC0415 - no cycle at import

    refs: set[str] = set()
    for topic, payload in docs.items():
        if topic.startswith("floorline/rollouts/"):
            refs |= rollout_bundles(payload)
        elif topic.endswith("/desired"):
            body = read_envelope(payload)
            named = body.get("bundles") if body is not None else None
            if isinstance(named, list):
                refs |= {str(b).removeprefix("sha256:") for b in named}
    return refs


def gc(*, broker: BrokerConfig, dry_run: bool = False, out: Any = STDOUT,
       wait_s: float = 30.0) -> list[str]:
    """Clear retained bundles no retained desired (or rollout) document references."""
    filters = ["floorline/bundles/+", *DESIRED_FILTERS, "floorline/rollouts/+"]
    with Collector(broker, filters, "gc") as col:
        col.start(cap_s=wait_s)
        docs = col.snapshot()
        refs = referenced_bundles(docs)
        bundles = {t.rsplit("/", 1)[-1]: len(p) for t, p in docs.items()
                   if t.startswith("floorline/bundles/")}
        unused = sorted(d for d in bundles if d not in refs)
        kept = len(bundles) - len(unused)
        for digest in unused:
            print(f"{'would clear' if dry_run else 'clearing'} bundle {digest[:12]}… "
                  f"({bundles[digest]:,} B)", file=out)
        if unused and not dry_run:
            assert col.transport is not None  # noqa: S101 - started above
            publish_all(col.transport, [(BUNDLE_TOPIC.format(sha256=d), b"") for d in unused])
    freed = sum(bundles[d] for d in unused)
    print(f"{len(bundles)} retained bundle(s): {kept} referenced, {len(unused)} unreferenced "
          f"({freed:,} B){' (dry run: nothing cleared)' if dry_run and unused else ''}",
          file=out)
    return unused
