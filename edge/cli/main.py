"""``floorline``: the gateway-side command line.

    floorline init PATH [--broker HOST:PORT]    write a starter config on the example bundle
    floorline examples                          the shipped example configs and bundles
    floorline run --config FILE                 the daemon
    floorline check --config FILE [--connect]   validate a config, self-test its bundles, build its
                                                pipelines; --connect: and try the broker
    floorline demo [--duration S]               broker + simulated plant + daemon + live table
    floorline simulate [--broker HOST:PORT] ... publish a synthetic plant
    floorline selftest BUNDLE [--backend litert|onnx] [--artifact FILE] [--trust KEY.pub]
    floorline inspect BUNDLE [--trust KEY.pub]
    floorline infer BUNDLE --input WINDOWS.npy [--backend ...]

Nothing here imports TensorFlow; runtimes are imported by the backend that needs them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from floorline.edge import __version__
from floorline.edge.backends import BackendOptions
from floorline.edge.errors import FloorlineError
from floorline.edge.mqtt.topics import shared_group, shared_subscription_filter

if TYPE_CHECKING:
    from floorline.edge.config.model import BrokerConfig, Config


def _open(args: argparse.Namespace) -> object:
    from floorline.edge.bundle.bundle import Bundle  # noqa: PLC0415
    from floorline.edge.bundle.signing import load_public_key  # noqa: PLC0415

    trusted = [load_public_key(p) for p in args.trust or []]
    return Bundle.open(args.bundle, trusted_keys=trusted, require_signature=args.require_signature)


def _cmd_selftest(args: argparse.Namespace) -> int:
    from floorline.edge import backends  # noqa: PLC0415
    from floorline.edge.bundle import selftest  # noqa: PLC0415
    from floorline.edge.bundle.bundle import Bundle  # noqa: PLC0415

    bundle = _open(args)
    assert isinstance(bundle, Bundle)  # noqa: S101 - narrows the type for mypy
    options = BackendOptions(threads=args.threads, interpreter=args.interpreter)
    with bundle:
        m = bundle.manifest
        print(f"{m.name} {m.version}: hashes verified" + (
            f", signed by {bundle.signed_by}" if bundle.signed_by else ""
        ))
        if args.artifact:
            files = [args.artifact]
        elif args.backend:
            from floorline.edge.backends import BACKENDS  # noqa: PLC0415

            fmt = BACKENDS[args.backend].format if args.backend in BACKENDS else None
            files = [a.file for a in m.artifacts if a.format == fmt]
        else:
            files = [a.file for a in m.artifacts]
        if not files:
            print(f"floorline: error: no artifact in the bundle runs on {args.backend}",
                  file=sys.stderr)
            return 1
        failures = passed = 0
        missing: list[str] = []
        for file in files:
            if not (args.artifact or args.backend):
                # Testing everything: an artifact this gateway has no runtime for is skipped.
                # One named on the command line is run, and fails if its runtime is missing.
                name = backends.backend_for_format(bundle.artifact(file).format)
                if not backends.installed(name, options):
                    hint = backends.install_hint(name)
                    missing.append(hint)
                    print(f"  {file:<22} skipped: no runtime ({hint})")
                    continue
            try:
                loaded = selftest.load(
                    bundle, artifact=file, backend=args.backend, options=options
                )
            except FloorlineError as exc:
                failures += 1
                print(f"  {file:<22} FAIL  {exc}")
                continue
            rep = loaded.selftest
            loaded.backend.close()
            agree = (
                "" if rep.top1_agreement_source is None
                else f", top-1 vs source {rep.top1_agreement_source:.0%}"
            )
            passed += 1
            print(
                f"  {file:<22} ok    {rep.runtime}: max err {rep.max_abs_error:.2e} "
                f"(allowed {rep.atol:.0e}) on {rep.samples} golden inputs{agree}"
            )
        if not failures and not passed:
            hints = " or ".join(dict.fromkeys(h.removeprefix("pip install ") for h in missing))
            print(f"floorline: error: no artifact could run: no runtime for any of them is "
                  f"installed; pip install {hints}", file=sys.stderr)
            return 1
        return 1 if failures else 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from floorline.edge.bundle.bundle import Bundle  # noqa: PLC0415
    from floorline.edge.bundle.report import describe  # noqa: PLC0415

    bundle = _open(args)
    assert isinstance(bundle, Bundle)  # noqa: S101
    with bundle:
        print(describe(bundle))
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    from floorline.edge.bundle import selftest  # noqa: PLC0415
    from floorline.edge.bundle.bundle import Bundle  # noqa: PLC0415
    from floorline.edge.stream.heads import HeadLayout  # noqa: PLC0415
    from floorline.edge.stream.normalization import model_input  # noqa: PLC0415

    bundle = _open(args)
    assert isinstance(bundle, Bundle)  # noqa: S101
    with bundle:
        try:
            raw = np.load(args.input, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as exc:
            print(f"floorline: error: {args.input}: {exc}", file=sys.stderr)
            return 1
        loaded = selftest.load(
            bundle,
            backend=args.backend,
            options=BackendOptions(threads=args.threads, interpreter=args.interpreter),
        )
        try:
            # Raw windows: through the bundle's feature stage (if any) and normalization.
            x = raw if args.normalized else model_input(raw, bundle.manifest.input)
            out = HeadLayout(bundle.manifest).values(x, loaded.backend.infer(x))
        finally:
            loaded.backend.close()
        heads = bundle.manifest.heads
        labels = heads[0].labels if len(heads) == 1 else None
        for row in out:
            if labels:
                print(f"{labels[int(row.argmax())]:<20} " + " ".join(f"{v:.4f}" for v in row))
            else:
                print(" ".join(f"{v:.6g}" for v in row))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from floorline.edge.service.run import run  # noqa: PLC0415

    return run(args.config, verbose=args.verbose)


def _fleet_broker(args: argparse.Namespace) -> BrokerConfig:
    from floorline.edge.fleet import common  # noqa: PLC0415

    password_env = args.password_env
    if args.password is not None:
        print("floorline: warning: --password is visible in the process list and the shell "
              "history; prefer --password-file or --password-env", file=sys.stderr)
        if password_env or args.password_file:
            raise common.UsageError("give one of --password, --password-file, --password-env")
        password_env = common.password_from_command_line(args.password)
    return common.broker_config(
        args.broker, args.protocol, tls=args.tls, ca=args.ca, cert=args.cert,
        cert_key=args.cert_key, insecure=args.tls_insecure, username=args.username,
        password_file=args.password_file, password_env=password_env)


def _fleet_target(args: argparse.Namespace) -> dict[str, object]:
    from floorline.edge.fleet import common  # noqa: PLC0415

    if args.gateway:
        return {"gateways": [common.check_level(g, "--gateway") for g in args.gateway]}
    if args.group:
        return {"group": common.check_level(args.group, "--group")}
    return {"selector": common.parse_pairs(args.selector, "--selector")}


def _cmd_fleet(args: argparse.Namespace) -> int:
    from floorline.edge.fleet import common  # noqa: PLC0415

    try:
        return _fleet(args)
    except common.UsageError as exc:
        print(f"floorline: error: {exc}", file=sys.stderr)
        return common.EXIT_USAGE
    except common.BrokerUnreachableError as exc:
        print(f"floorline: error: {exc}", file=sys.stderr)
        return common.EXIT_BROKER


def _fleet(args: argparse.Namespace) -> int:  # noqa: PLR0911 - one branch a command
    from floorline.edge.fleet import push as fleet_push  # noqa: PLC0415
    from floorline.edge.fleet import rollout, status  # noqa: PLC0415

    command = args.fleet_command
    if command == "keygen":
        private, public = fleet_push.keygen(args.prefix)
        print(f"wrote {private} (keep secret) and {public} "
              f"(key id {fleet_push.describe_key(public)}); add {public.name} to the gateways' "
              "fleet.operator_keys (and trust.trusted_keys to accept bundles you sign)")
        return 0
    broker = _fleet_broker(args)
    if command == "push":
        fleet_push.check_ttl(args.ttl_hours)
        target = _fleet_target(args)
        targets = ([{"gateway": g} for g in target["gateways"]]  # type: ignore[attr-defined]
                   if "gateways" in target else [target])
        version = fleet_push.push(
            targets=targets, config_file=args.config, bundles=args.bundle or [],
            key_file=args.key, broker=broker, version=args.version, ttl_hours=args.ttl_hours,
            sign_bundles=args.sign_bundles, verify=not args.skip_verify,
            deployment=args.deployment or "")
        if not args.wait:
            print(f"not waiting for verdicts: floorline fleet status --missing {version} "
                  "lists the gateways that have not applied it yet (or push --wait)")
            return 0
        return fleet_push.wait_verdicts(
            broker=broker, version=version,
            gateways=target.get("gateways"),  # type: ignore[arg-type]
            group=target.get("group"),  # type: ignore[arg-type]
            selector=target.get("selector"),  # type: ignore[arg-type]
            timeout_s=args.wait_timeout_s)
    if command == "status":
        filters = status.Filters(
            gateway=args.gateway, version=args.version, missing=args.missing,
            result=args.result, deployment=args.deployment,
            attrs={k: v for a in args.attr or []
                   for k, v in common_pairs(a, "--attr").items()})
        return status.fleet_status(broker=broker, filters=filters, as_json=args.json,
                                   wait_s=args.wait, stale_s=args.stale_s).exit_code
    if command == "gc":
        fleet_push.gc(broker=broker, dry_run=args.dry_run)
        return 0
    if command == "clear":
        from floorline.edge.fleet.common import check_level, check_name  # noqa: PLC0415

        if args.gateway:
            topics = [f"floorline/{check_level(g, '--gateway')}/desired" for g in args.gateway]
        elif args.group:
            topics = [f"floorline/groups/{check_level(args.group, '--group')}/desired"]
        elif args.selector:
            topics = [f"floorline/selectors/{check_name(args.selector, '--selector')}/desired"]
        else:
            topics = [rollout.ROLLOUT_TOPIC.format(name=check_name(args.rollout, "--rollout"))]
        return fleet_push.clear(broker=broker, topics=topics)
    return _fleet_rollout(args, broker)


def common_pairs(text: str, what: str) -> dict[str, str]:
    """``key=value,...`` for --attr (a thin wrapper: the parser lives in fleet.common)."""
    from floorline.edge.fleet.common import parse_pairs  # noqa: PLC0415

    return parse_pairs(text, what)


def _fleet_rollout(args: argparse.Namespace, broker: BrokerConfig) -> int:
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from floorline.edge.fleet import rollout  # noqa: PLC0415

    command = args.rollout_command
    if command == "status":
        return rollout.show(broker=broker, name=args.name, as_json=args.json)
    if command == "stop":
        return rollout.stop(name=args.name, broker=broker)
    interrupt = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        del signum, frame
        if interrupt.is_set():
            raise KeyboardInterrupt
        interrupt.set()
        print("stopping after the current wave's verdicts (Ctrl-C again to leave now; "
              "the rollout can be resumed)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        if command == "resume":
            return rollout.resume(name=args.name, key_file=args.key, broker=broker,
                                  force=args.force, interrupt=interrupt)
        fleet_target = _fleet_target(args)
        return rollout.start(
            name=args.name, config_file=args.config, bundles=args.bundle or [],
            key_file=args.key, broker=broker, target=fleet_target, waves=args.waves,
            max_failures=args.max_failures, rollback_wave=args.rollback_wave,
            wave_timeout_s=args.wave_timeout_s, ttl_hours=args.ttl_hours,
            sign_bundles=args.sign_bundles, verify=not args.skip_verify,
            skip_offline=args.skip_offline, interrupt=interrupt)
    except KeyboardInterrupt:
        print(f"left rollout {args.name} during a wave: it shows as running or stopping; "
              f"floorline fleet rollout resume {args.name} --force continues it", file=sys.stderr)
        return 3
    finally:
        signal.signal(signal.SIGINT, previous)


def _cmd_install(args: argparse.Namespace) -> int:
    from floorline.edge.service.install import install_service  # noqa: PLC0415

    for line in install_service(args.config, prefix=args.prefix, user=args.user,
                                instance=args.instance, dry_run=args.dry_run):
        print(line)
    return 0


def _cmd_reload(args: argparse.Namespace) -> int:
    from floorline.edge.service.run import send_reload  # noqa: PLC0415

    print(send_reload(args.config))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from floorline.edge.config.model import load_config  # noqa: PLC0415

    config = load_config(args.config)
    print(f"{args.config}: valid config for gateway {config.gateway.id}, "
          f"{len(config.pipelines)} pipeline(s), broker {config.broker.host}:{config.broker.port}")
    failures = 0
    credentials = True
    try:
        config.broker.credentials()
    except FloorlineError as exc:
        failures += 1
        credentials = False
        print(f"  broker credentials: FAIL  {exc}")
    for index, pc in enumerate(config.pipelines):
        try:
            # Errors name the file, the line of the key and the pipeline (Config.building).
            with config.building(index):
                summary = _check_pipeline(config, index)
        except FloorlineError as exc:
            failures += 1
            print(f"  pipeline {pc.name}: FAIL\n    {exc}")
            continue
        print(f"  pipeline {pc.name}: ok  {summary}")
    if args.connect:
        if not credentials:
            print("  broker: not tried (no credentials)")
        elif not _check_connection(config, args.timeout):
            failures += 1
    return 1 if failures else 0


def _check_pipeline(config: Config, index: int) -> str:
    """Build pipeline INDEX as `run` does, without its thread or a connection; a summary line.

    The bundle is verified and self-tested; then the model must fit the config (``check_fit``)
    and the real Pipeline is constructed: decoder for the model's features, windower, batcher,
    output. So whatever `run` would refuse at start, this refuses too.
    """
    from floorline.edge.config.fit import check_fit  # noqa: PLC0415
    from floorline.edge.daemon.models import close_model, load_model, load_shadow  # noqa: PLC0415
    from floorline.edge.daemon.pipeline import Pipeline  # noqa: PLC0415

    pc = config.pipelines[index]
    loaded = load_model(config, pc)
    shadow = None
    try:
        check_fit(pc, loaded.bundle.manifest)
        shadow = load_shadow(config, pc)
        pipeline = Pipeline(pc, gateway=config.gateway.id, topics=config.topics,
                            limits=config.limits, model=loaded, submit=lambda _messages: None,
                            shadow=shadow)
        pipeline.output.close()
        m, rep = loaded.bundle.manifest, loaded.selftest
        signed = f"signed by {loaded.bundle.signed_by}" if loaded.bundle.signed_by else "unsigned"
        extra = ""
        if pipeline.shadow is not None and shadow is not None:
            s, compared = shadow.bundle.manifest, pipeline.shadow.stats
            extra = (f"; shadow {s.name} {s.version} ({shadow.artifact.file}) on "
                     f"{shadow.selftest.runtime}, heads compared: "
                     f"{', '.join(p.name for p in compared.pairs) or 'none'}")
            if compared.incomparable:
                extra += ", incomparable: " + ", ".join(
                    f"{h['head']} ({h['side']})" for h in compared.incomparable)
        return (
            f"{m.name} {m.version} ({loaded.artifact.file}, {signed}) on {rep.runtime}; self-test "
            f"max err {rep.max_abs_error:.2e} (allowed {rep.atol:.0e}); window {m.input.window} x "
            f"{len(m.input.features)} features, hop {pc.window.hop or m.input.window}, batch "
            f"{pc.batch.max_batch}/{pc.batch.max_wait_ms:g} ms{extra}"
        )
    finally:
        close_model(shadow)
        loaded.backend.close()
        loaded.bundle.close()


def _check_filter(topic_filter: str) -> str:
    """The filter ``check --connect`` subscribes for TOPIC_FILTER.

    A shared subscription is tried in a group of its own: joining the gateways' group would take
    a share of the live stream, and mosquitto 2.0 passes what an unacknowledging member held to
    nobody else (docs/scale-out.md). Its own group still tests the broker's $share support and
    the ACL on the filter.
    """
    group = shared_group(topic_filter)
    if group is None:
        return topic_filter
    return f"$share/{group}-check-{os.getpid()}/{shared_subscription_filter(topic_filter)}"


def _check_connection(config: Config, timeout: float) -> bool:
    """Connect as configured (TLS, credentials), subscribe every pipeline's filters; report.

    A client of its own (``<client id>-check``, clean session) so a running gateway keeps its
    connection and its persistent session; it never acknowledges what it receives and leaves at
    the SUBACK. Shared subscriptions are tried in a group of their own (``_check_filter``).
    """
    from floorline.edge.mqtt.transport import MqttTransport, SessionOptions  # noqa: PLC0415

    broker = config.broker.model_copy(update={"clean_start": True, "session_expiry_s": 0})
    address = f"{broker.host}:{broker.port}"
    filters: dict[str, int] = {}
    for pc in config.pipelines:
        for configured in pc.subscribe:
            topic_filter = _check_filter(configured)
            filters[topic_filter] = max(filters.get(topic_filter, 0), pc.qos)
    try:
        transport = MqttTransport(
            broker, f"{config.client_id()}-check", lambda *_: None, list(filters.items()),
            session=SessionOptions(manual_ack=True, receive_maximum=1),
        )
    except FloorlineError as exc:
        print(f"  broker {address}: FAIL  {exc}")
        return False
    deadline = time.monotonic() + timeout
    transport.start()
    try:
        # The first failure is the answer; the transport would go on retrying with backoff.
        while not transport.connected.is_set() and transport.last_error is None:
            if time.monotonic() >= deadline:
                break
            transport.connected.wait(0.05)
        if not transport.connected.is_set():
            why = transport.last_error or f"no answer (CONNACK) within {timeout:g} s"
            print(f"  broker {address}: FAIL  {why}")
            return False
        if not transport.subscribed.wait(max(0.0, deadline - time.monotonic())):
            why = transport.last_error or f"no SUBACK within {timeout:g} s"
            print(f"  broker {address}: FAIL  connected, but {why}")
            return False
        if transport.last_error:  # set by the SUBACK: the filters the broker refused
            print(f"  broker {address}: FAIL  connected, but {transport.last_error}")
            return False
    finally:
        transport.stop()
    how = f"MQTT {broker.protocol}" + (", TLS" if broker.tls is not None else "")
    print(f"  broker {address}: ok  connected ({how}); subscriptions acknowledged: "
          f"{', '.join(filters)}")
    return True


def _cmd_demo(args: argparse.Namespace) -> int:
    from floorline.edge.demo.live import run_demo  # noqa: PLC0415

    return run_demo(
        duration=args.duration,
        assets=args.assets,
        rate=args.rate,
        faults=tuple(args.fault) if args.fault else None,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        sparkplug=args.sparkplug,
    )


def _cmd_simulate(args: argparse.Namespace) -> int:
    from floorline.edge.config.model import BrokerConfig  # noqa: PLC0415
    from floorline.edge.demo.simulator import Fault, PlantConfig, PlantSimulator  # noqa: PLC0415
    from floorline.edge.mqtt.transport import MqttTransport, Will  # noqa: PLC0415

    host, _, port = args.broker.rpartition(":")
    broker = BrokerConfig(host=host or "localhost", port=int(port or 1883),
                          protocol=args.protocol)
    try:
        faults = [Fault.parse(f) for f in args.fault or []]
        plant = PlantConfig(assets=args.assets, line=args.line, rate=args.rate, mode=args.mode,
                            fmt=args.format, block=args.block, faults=faults, seed=args.seed,
                            qos=args.qos, group=args.group)
        publishing: list[MqttTransport] = []
        sim = PlantSimulator(plant, lambda t, p: publishing[0].publish(t, p, plant.qos, False))
    except (ValueError, FloorlineError) as exc:  # FloorlineError: protobuf missing (sparkplug)
        print(f"floorline: error: {exc}", file=sys.stderr)
        return 2
    if plant.fmt == "sparkplug":
        # A Sparkplug edge node: its NDEATH is the will, and it answers rebirth requests.
        will_topic, will = sim.sparkplug_will()

        def command(topic: str, payload: bytes, *_: object) -> None:
            sim.command(topic, payload)

        transport = MqttTransport(
            broker, f"floorline-sim-{os.getpid()}", command,
            [(f"spBv1.0/{plant.group}/NCMD/{plant.line}", 0)],
            will=Will(will_topic, will, qos=1, retain=False),
        )
    else:
        transport = MqttTransport(broker, f"floorline-sim-{os.getpid()}", lambda *_: None, [])
    publishing.append(transport)
    transport.start()
    if not transport.wait_connected(10):
        print(f"floorline: error: no broker at {broker.host}:{broker.port}", file=sys.stderr)
        transport.stop()
        return 1
    print(f"simulating {plant.assets} assets at {plant.rate:g} samples/s each "
          f"({plant.mode}/{plant.fmt}) to {broker.host}:{broker.port}; Ctrl-C stops")
    try:
        sim.run(duration=args.duration)
    except KeyboardInterrupt:
        pass
    finally:
        transport.stop()
    print(f"published {sim.messages} messages ({sim.samples} samples)")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from floorline.edge.config import starter  # noqa: PLC0415

    made = starter.render(args.path, gateway_id=args.gateway_id, broker=args.broker)
    starter.write(made, args.path, force=args.force)
    print(f"wrote {args.path}: gateway {made.gateway_id}, broker {made.host}:{made.port}, "
          f"pipeline vibration on example:pdm-classifier, backend {made.backend}")
    if made.backend == "auto":
        print("  no runtime is installed yet: pip install 'floorline[litert]' "
              "(or 'floorline[onnx]')")
    print(f"next:\n  floorline check --config {args.path}\n  floorline run --config {args.path}")
    return 0


def _cmd_examples(args: argparse.Namespace) -> int:
    import re  # noqa: PLC0415

    from floorline.edge import resources  # noqa: PLC0415

    del args
    print("example configs (copy one, then edit it):")
    for path in resources.example_configs():
        first = path.read_text().splitlines()[:1]
        about = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        about = re.split(r"[.;](?:\s|$)", about)[0]  # the first sentence is enough for a list
        print(f"  {path.name:<24} {path}")
        if about:
            print(f"  {'':<24} {about}")
    print(f"config schema:\n  {resources.examples_dir() / 'config.schema.json'}")
    print("example bundles (in a config: bundle: example:NAME):")
    for name in resources.example_bundles():
        print(f"  {resources.EXAMPLE_PREFIX + name:<24} {resources.models_dir() / name}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415

    from floorline.edge.config.model import Config  # noqa: PLC0415

    del args
    print(json.dumps(Config.model_json_schema(), indent=2, sort_keys=True))
    return 0


def _cmd_capture(args: argparse.Namespace) -> int:
    from floorline.edge.capture.export import export  # noqa: PLC0415

    doc = export(args.state_dir, args.out, pipeline=args.pipeline, label=args.label,
                 since=args.since, labelled=args.labelled)
    labels = ", ".join(f"{k or '(none)'}: {v}" for k, v in sorted(doc["labels"].items()))
    print(f"wrote {doc['windows']} windows {tuple(doc['shape'])} to {args.out} "
          f"(labels: {labels}); provenance in {args.out.with_suffix('.json')}")
    return 0


def _bundle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="bundle directory or .tar")
    p.add_argument("--trust", type=Path, action="append", help="trusted public key (repeat)")
    p.add_argument("--require-signature", action="store_true")


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("litert", "onnx"), help="runtime to use")
    p.add_argument(
        "--interpreter",
        default="auto",
        choices=("auto", "ai_edge_litert", "tflite_runtime", "tensorflow"),
        help="TFLite interpreter module for the litert backend (default auto)",
    )
    p.add_argument("--threads", type=int, default=1)


def _fleet_broker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker (as in the gateway's broker section)")
    g.add_argument("--broker", default="localhost:1883", help="HOST:PORT (localhost:1883)")
    g.add_argument("--protocol", choices=("3.1.1", "5"), default="3.1.1")
    g.add_argument("--tls", action="store_true", help="TLS with the system CAs")
    g.add_argument("--ca", type=Path, help="CA file for the broker's certificate (implies TLS)")
    g.add_argument("--cert", type=Path, help="client certificate (mutual TLS)")
    g.add_argument("--cert-key", type=Path, help="the client certificate's private key")
    g.add_argument("--tls-insecure", action="store_true",
                   help="skip the broker's host name check (lab brokers only)")
    g.add_argument("--username", help="broker user name")
    g.add_argument("--password-file", type=Path, help="file holding the broker password")
    g.add_argument("--password-env", metavar="VAR",
                   help="environment variable holding the broker password")
    g.add_argument("--password", help="the broker password (warns: visible to other users; "
                   "prefer --password-file)")


def _fleet_content_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True,
                   help="YAML with the pipelines (and limits/logging) to run")
    p.add_argument("--bundle", type=Path, action="append",
                   help="bundle directory the config names (repeat)")
    p.add_argument("--key", type=Path, required=True, help="operator private key")
    p.add_argument("--ttl-hours", type=float, default=168.0,
                   help="the documents expire after this (default 168; must be > 0)")
    p.add_argument("--sign-bundles", action="store_true",
                   help="sign the pushed bundles with --key too")
    p.add_argument("--skip-verify", action="store_true",
                   help="push bundles without checking them first (drills: let the gateway do "
                   "the refusing)")


def _fleet_target_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    who = p.add_mutually_exclusive_group(required=required)
    who.add_argument("--gateway", action="append", metavar="ID",
                     help="a gateway id (repeat: one document per gateway)")
    who.add_argument("--group", help="every gateway with NAME in its fleet.groups")
    who.add_argument("--selector", metavar="KEY=VALUE,...",
                     help="every gateway whose reported attributes match all pairs")


def _fleet_parsers(sub: Any) -> None:
    fleet = sub.add_parser(
        "fleet", help="operator commands: keygen, push, status, rollout, gc, clear",
        description="Exit codes: 0 all healthy / at target, 1 some gateway rejected or rolled "
        "back (or a local check failed), 2 usage, 3 some gateway offline, not reporting or "
        "without a verdict in time, 4 broker unreachable.")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True)
    fk = fsub.add_parser("keygen", help="create an operator signing key pair")
    fk.add_argument("prefix", type=Path, help="writes PREFIX.key and PREFIX.pub")

    fp = fsub.add_parser("push", help="publish a signed desired state")
    _fleet_target_args(fp)
    _fleet_content_args(fp)
    fp.add_argument("--deployment", metavar="NAME",
                    help="name of this push (reported by the gateways; a selector document's "
                    "topic name)")
    fp.add_argument("--version", type=int, help="default: now in milliseconds")
    fp.add_argument("--wait", action="store_true",
                    help="wait for the targeted gateways' verdicts; exit 1 on any rejection or "
                    "rollback, 3 when some gave none in time")
    fp.add_argument("--wait-timeout-s", type=float, default=600.0,
                    help="how long --wait waits (default 600)")
    _fleet_broker_args(fp)

    fs = fsub.add_parser("status", help="every gateway's state, version and last verdict")
    fs.add_argument("--gateway", help="only this gateway")
    fs.add_argument("--json", action="store_true", help="one JSON document")
    fs.add_argument("--version", type=int, help="only gateways running this version")
    fs.add_argument("--missing", type=int, metavar="V",
                    help="only gateways that have not reached version V (offline ones too)")
    fs.add_argument("--result", choices=("applied", "rejected", "rolled_back", "local_reload"),
                    help="only gateways whose last verdict is this")
    fs.add_argument("--attr", action="append", metavar="KEY=VALUE",
                    help="only gateways with this reported attribute (repeat)")
    fs.add_argument("--deployment", help="only gateways running this deployment")
    fs.add_argument("--wait", type=float, default=10.0,
                    help="seconds to wait at most for the retained documents (default 10)")
    fs.add_argument("--stale-s", type=float, default=120.0,
                    help="a gateway whose report is older counts as not reporting (120)")
    _fleet_broker_args(fs)

    ro = fsub.add_parser("rollout", help="staged rollouts: start, status, stop, resume")
    rsub = ro.add_subparsers(dest="rollout_command", required=True)
    rs = rsub.add_parser("start", help="run a deployment in waves")
    rs.add_argument("name", help="the rollout (and deployment) name")
    _fleet_content_args(rs)
    _fleet_target_args(rs)
    rs.add_argument("--waves", action="append", required=True, metavar="SPEC",
                    help="NAME:gw1,gw2 | [NAME:]COUNT | [NAME:]PERCENT%% (cumulative), in order; "
                    "repeat, e.g. --waves canary:gw1,gw2 --waves 25%% --waves 100%%")
    rs.add_argument("--max-failures", default="0",
                    help="failures a wave may have (a count, or a percentage of the wave); more "
                    "stop the rollout (default 0)")
    rs.add_argument("--rollback-wave", action="store_true",
                    help="when a wave fails, send its gateways that applied the new version "
                    "their previous configuration")
    rs.add_argument("--wave-timeout-s", type=float, default=600.0,
                    help="a gateway without a verdict by then counts as failed (600)")
    rs.add_argument("--skip-offline", action="store_true",
                    help="leave out gateways that are offline at the start")
    _fleet_broker_args(rs)
    rst = rsub.add_parser("status", help="a rollout's progress (all rollouts without NAME)")
    rst.add_argument("name", nargs="?")
    rst.add_argument("--json", action="store_true")
    _fleet_broker_args(rst)
    rp = rsub.add_parser("stop", help="halt a running rollout after its current wave")
    rp.add_argument("name")
    _fleet_broker_args(rp)
    rr = rsub.add_parser("resume", help="continue a stopped rollout")
    rr.add_argument("name")
    rr.add_argument("--key", type=Path, required=True, help="operator private key")
    rr.add_argument("--force", action="store_true",
                    help="also a failed rollout, or one whose operator left it running")
    _fleet_broker_args(rr)

    fg = fsub.add_parser("gc", help="clear retained bundles no desired document references")
    fg.add_argument("--dry-run", action="store_true", help="only list them")
    _fleet_broker_args(fg)
    fc = fsub.add_parser("clear", help="clear a retained desired (or rollout) document")
    which = fc.add_mutually_exclusive_group(required=True)
    which.add_argument("--gateway", action="append", metavar="ID")
    which.add_argument("--group")
    which.add_argument("--selector", metavar="NAME", help="the selector document's name")
    which.add_argument("--rollout", metavar="NAME")
    _fleet_broker_args(fc)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="floorline", description="Floorline gateway runtime.")
    parser.add_argument("--version", action="version", version=f"floorline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway daemon")
    run.add_argument("--config", type=Path, required=True, help="gateway YAML config")
    _fleet_parsers(sub)
    ins = sub.add_parser("install-service",
                         help="install the systemd unit, config and bundles on this gateway")
    ins.add_argument("--config", type=Path, required=True, help="gateway YAML config")
    ins.add_argument("--prefix", type=Path, default=Path("/"), help="root to install under")
    ins.add_argument("--user", help="run as this existing user (default: DynamicUser)")
    ins.add_argument("--instance", help="install as floorline@INSTANCE")
    ins.add_argument("--dry-run", action="store_true", help="say what would be done")
    rel = sub.add_parser("reload", help="make the running daemon re-read its config (SIGHUP)")
    rel.add_argument("--config", type=Path, required=True, help="the daemon's YAML config")
    chk = sub.add_parser(
        "check", help="validate a config, self-test its bundles and build its pipelines")
    chk.add_argument("--config", type=Path, required=True, help="gateway YAML config")
    chk.add_argument("--connect", action="store_true",
                     help="also connect to the broker as configured (TLS, credentials) and "
                     "subscribe every pipeline's filters")
    chk.add_argument("--timeout", type=float, default=10.0,
                     help="seconds --connect waits for the broker (default 10)")
    ini = sub.add_parser("init", help="write a starter config that runs the example bundle")
    ini.add_argument("path", type=Path, help="config file to write, e.g. gateway.yaml")
    ini.add_argument("--gateway-id", help="gateway id (default: this host's name)")
    ini.add_argument("--broker", default="localhost:1883",
                     help="MQTT broker HOST:PORT (localhost:1883)")
    ini.add_argument("--force", action="store_true", help="overwrite an existing file")
    sub.add_parser("examples", help="list the shipped example configs and bundles, with paths")
    demo = sub.add_parser("demo", help="simulated plant + daemon + live predictions")
    demo.add_argument("--duration", type=float, default=60.0,
                      help="seconds (default 60); the default faults are spread over it")
    demo.add_argument("--assets", type=int, default=8, help="pumps to simulate (8)")
    demo.add_argument("--rate", type=float, default=200.0, help="samples/s per pump (200)")
    demo.add_argument("--fault", action="append",
                      help="ASSET=CONDITION[@START_S][+RAMP_S][:SEVERITY] (repeat); default: "
                      "imbalance on pump-02, bearing_outer_race on pump-04, looseness on pump-06, "
                      "starting at 10, 25 and 40%% of --duration, each growing over 30%% of it")
    demo.add_argument("--host", default="localhost", help="broker to try first (localhost)")
    demo.add_argument("--port", type=int, default=1883)
    demo.add_argument("--metrics-port", type=int,
                      help="also serve Prometheus metrics on 127.0.0.1:PORT (0: any free port); "
                      "needs pip install 'floorline[metrics]'")
    demo.add_argument("--sparkplug", action="store_true",
                      help="the plant and the gateway speak Sparkplug B: sensor data in, "
                      "predictions out as an edge node (needs pip install 'floorline[sparkplug]')")
    sim = sub.add_parser("simulate", help="publish a synthetic plant to a broker")
    sim.add_argument("--broker", default="localhost:1883", help="HOST:PORT (localhost:1883)")
    sim.add_argument("--protocol", choices=("3.1.1", "5"), default="3.1.1")
    sim.add_argument("--assets", type=int, default=8)
    sim.add_argument("--line", default="line1")
    sim.add_argument("--rate", type=float, default=200.0, help="samples/s per asset")
    sim.add_argument("--mode", choices=("sample", "block"), default="sample")
    sim.add_argument("--format", choices=("json", "binary", "sparkplug"), default="json",
                     help="sparkplug: the line is a Sparkplug B edge node, each asset a device "
                     "(spBv1.0/GROUP/.../LINE; needs floorline[sparkplug])")
    sim.add_argument("--group", default="plant", help="Sparkplug group id (--format sparkplug)")
    sim.add_argument("--block", type=int, default=64, help="samples per block message")
    sim.add_argument("--fault", action="append",
                     help="ASSET=CONDITION[@START_S][+RAMP_S][:SEVERITY] (repeat)")
    sim.add_argument("--duration", type=float, help="seconds (default: until Ctrl-C)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--qos", type=int, choices=(0, 1), default=0)
    sub.add_parser("schema", help="print the config JSON Schema (configs/config.schema.json)")
    cap = sub.add_parser("capture", help="captured windows: export them for floorline-convert")
    csub = cap.add_subparsers(dest="capture_command", required=True)
    cex = csub.add_parser(
        "export", help="write captured windows as .npz (x, y, provenance) + a .json summary",
        description="The .npz is what floorline-convert takes as --calibration or --parity-data "
        "(array x, raw units); y holds the operator labels ('' for none).")
    cex.add_argument("--state-dir", type=Path, required=True, help="the gateway's state_dir")
    cex.add_argument("--out", type=Path, required=True, help="FILE.npz to write")
    cex.add_argument("--pipeline", help="only this pipeline's windows")
    cex.add_argument("--label", help="only windows an operator labelled LABEL")
    cex.add_argument("--labelled", action="store_true", help="only labelled windows")
    cex.add_argument("--since", metavar="T",
                     help="only windows ending at or after T (epoch seconds or ISO 8601)")
    st = sub.add_parser("selftest", help="verify a bundle and run its golden self-test")
    _bundle_args(st)
    _runtime_args(st)
    st.add_argument("--artifact", help="test only this artifact file")
    insp = sub.add_parser("inspect", help="verify a bundle and summarise it")
    _bundle_args(insp)
    inf = sub.add_parser("infer", help="run a bundle on windows from an .npy file")
    _bundle_args(inf)
    _runtime_args(inf)
    inf.add_argument("--input", type=Path, required=True, help=".npy of raw windows (N, W, F)")
    inf.add_argument("--normalized", action="store_true",
                     help="input is already the model input (features and normalization applied)")
    return parser


_COMMANDS = {
    "run": _cmd_run,
    "check": _cmd_check,
    "init": _cmd_init,
    "examples": _cmd_examples,
    "reload": _cmd_reload,
    "fleet": _cmd_fleet,
    "install-service": _cmd_install,
    "demo": _cmd_demo,
    "simulate": _cmd_simulate,
    "schema": _cmd_schema,
    "capture": _cmd_capture,
    "selftest": _cmd_selftest,
    "inspect": _cmd_inspect,
    "infer": _cmd_infer,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``floorline``; returns the exit code."""
    args = _parser().parse_args(argv)
    from floorline.edge.service.logs import setup_logging  # noqa: PLC0415

    setup_logging("DEBUG" if args.verbose else ("INFO" if args.command == "run" else "WARNING"))
    try:
        return _COMMANDS[args.command](args)
    except FloorlineError as exc:
        print(f"floorline: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `floorline check ... | head`: the reader left; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
