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
from typing import TYPE_CHECKING

import numpy as np

from floorline.edge import __version__
from floorline.edge.backends import BackendOptions
from floorline.edge.errors import FloorlineError

if TYPE_CHECKING:
    from floorline.edge.config.model import Config


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
    from floorline.edge.stream.normalization import normalize  # noqa: PLC0415

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
            x = raw if args.normalized else normalize(raw, bundle.manifest.input)
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


def _cmd_fleet(args: argparse.Namespace) -> int:
    from floorline.edge.bundle.signing import generate_keypair, key_id, load_public_key  # noqa: PLC0415
    from floorline.edge.fleet import operator as fleet_cli  # noqa: PLC0415

    if args.fleet_command == "keygen":
        private, public = generate_keypair(args.prefix)
        print(f"wrote {private} (keep secret) and {public} "
              f"(key id {key_id(load_public_key(public))}); add {public.name} to the gateways' "
              "fleet.operator_keys (and trust.trusted_keys to accept bundles you sign)")
        return 0
    broker = fleet_cli.broker_config(args.broker, args.protocol)
    if args.fleet_command == "push":
        target = {"gateway": args.gateway} if args.gateway else {"group": args.group}
        fleet_cli.push(target=target, config_file=args.config, bundles=args.bundle or [],
                       key_file=args.key, broker=broker, version=args.version,
                       ttl_hours=args.ttl_hours, sign_bundles=args.sign_bundles,
                       verify=not args.skip_verify)
        return 0
    rows = fleet_cli.status(broker=broker, gateway=args.gateway, wait_s=args.wait)
    return 0 if rows else 1


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
    from floorline.edge.daemon.models import load_model  # noqa: PLC0415
    from floorline.edge.daemon.pipeline import Pipeline  # noqa: PLC0415

    pc = config.pipelines[index]
    loaded = load_model(config, pc)
    try:
        check_fit(pc, loaded.bundle.manifest)
        pipeline = Pipeline(pc, gateway=config.gateway.id, topics=config.topics,
                            limits=config.limits, model=loaded, submit=lambda _messages: None)
        pipeline.output.close()
        m, rep = loaded.bundle.manifest, loaded.selftest
        signed = f"signed by {loaded.bundle.signed_by}" if loaded.bundle.signed_by else "unsigned"
        return (
            f"{m.name} {m.version} ({loaded.artifact.file}, {signed}) on {rep.runtime}; self-test "
            f"max err {rep.max_abs_error:.2e} (allowed {rep.atol:.0e}); window {m.input.window} x "
            f"{len(m.input.features)} features, hop {pc.window.hop or m.input.window}, batch "
            f"{pc.batch.max_batch}/{pc.batch.max_wait_ms:g} ms"
        )
    finally:
        loaded.backend.close()
        loaded.bundle.close()


def _check_connection(config: Config, timeout: float) -> bool:
    """Connect as configured (TLS, credentials), subscribe every pipeline's filters; report.

    A client of its own (``<client id>-check``, clean session) so a running gateway keeps its
    connection and its persistent session; it never acknowledges what it receives (a shared
    subscription's broker hands such messages to another member) and leaves at the SUBACK.
    """
    from floorline.edge.mqtt.transport import MqttTransport, SessionOptions  # noqa: PLC0415

    broker = config.broker.model_copy(update={"clean_start": True, "session_expiry_s": 0})
    address = f"{broker.host}:{broker.port}"
    filters: dict[str, int] = {}
    for pc in config.pipelines:
        for topic_filter in pc.subscribe:
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
    )


def _cmd_simulate(args: argparse.Namespace) -> int:
    from floorline.edge.config.model import BrokerConfig  # noqa: PLC0415
    from floorline.edge.demo.simulator import Fault, PlantConfig, PlantSimulator  # noqa: PLC0415
    from floorline.edge.mqtt.transport import MqttTransport  # noqa: PLC0415

    host, _, port = args.broker.rpartition(":")
    broker = BrokerConfig(host=host or "localhost", port=int(port or 1883),
                          protocol=args.protocol)
    try:
        faults = [Fault.parse(f) for f in args.fault or []]
        plant = PlantConfig(assets=args.assets, line=args.line, rate=args.rate, mode=args.mode,
                            fmt=args.format, block=args.block, faults=faults, seed=args.seed,
                            qos=args.qos)
    except ValueError as exc:
        print(f"floorline: error: {exc}", file=sys.stderr)
        return 2
    transport = MqttTransport(broker, f"floorline-sim-{os.getpid()}", lambda *_: None, [])
    transport.start()
    if not transport.wait_connected(10):
        print(f"floorline: error: no broker at {broker.host}:{broker.port}", file=sys.stderr)
        transport.stop()
        return 1
    sim = PlantSimulator(plant, lambda t, p: transport.publish(t, p, plant.qos, False))
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="floorline", description="Floorline gateway runtime.")
    parser.add_argument("--version", action="version", version=f"floorline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway daemon")
    run.add_argument("--config", type=Path, required=True, help="gateway YAML config")
    fleet = sub.add_parser("fleet", help="operator commands: keygen, push, status")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True)
    fk = fsub.add_parser("keygen", help="create an operator signing key pair")
    fk.add_argument("prefix", type=Path, help="writes PREFIX.key and PREFIX.pub")
    for name in ("push", "status"):
        fp = fsub.add_parser(name, help=f"fleet {name}")
        fp.add_argument("--broker", default="localhost:1883", help="HOST:PORT")
        fp.add_argument("--protocol", choices=("3.1.1", "5"), default="3.1.1")
        if name == "push":
            who = fp.add_mutually_exclusive_group(required=True)
            who.add_argument("--gateway", help="one gateway id")
            who.add_argument("--group", help="a gateway group")
            fp.add_argument("--config", type=Path, required=True,
                            help="YAML with the pipelines (and limits/logging) to run")
            fp.add_argument("--bundle", type=Path, action="append",
                            help="bundle directory the config names (repeat)")
            fp.add_argument("--key", type=Path, required=True, help="operator private key")
            fp.add_argument("--version", type=int, help="default: now in milliseconds")
            fp.add_argument("--ttl-hours", type=float, default=168.0)
            fp.add_argument("--sign-bundles", action="store_true",
                            help="sign the pushed bundles with --key too")
            fp.add_argument("--skip-verify", action="store_true",
                            help="push bundles without checking them first (drills: let the "
                            "gateway do the refusing)")
        else:
            fp.add_argument("--gateway", help="only this gateway")
            fp.add_argument("--wait", type=float, default=2.0, help="seconds to collect")
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
    sim = sub.add_parser("simulate", help="publish a synthetic plant to a broker")
    sim.add_argument("--broker", default="localhost:1883", help="HOST:PORT (localhost:1883)")
    sim.add_argument("--protocol", choices=("3.1.1", "5"), default="3.1.1")
    sim.add_argument("--assets", type=int, default=8)
    sim.add_argument("--line", default="line1")
    sim.add_argument("--rate", type=float, default=200.0, help="samples/s per asset")
    sim.add_argument("--mode", choices=("sample", "block"), default="sample")
    sim.add_argument("--format", choices=("json", "binary"), default="json")
    sim.add_argument("--block", type=int, default=64, help="samples per block message")
    sim.add_argument("--fault", action="append",
                     help="ASSET=CONDITION[@START_S][+RAMP_S][:SEVERITY] (repeat)")
    sim.add_argument("--duration", type=float, help="seconds (default: until Ctrl-C)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--qos", type=int, choices=(0, 1), default=0)
    sub.add_parser("schema", help="print the config JSON Schema (configs/config.schema.json)")
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
    inf.add_argument("--normalized", action="store_true", help="input is already normalized")
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
