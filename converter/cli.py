"""``floorline-convert``: turn a trained model into a verified, signed bundle, and look at bundles.

floorline-convert keras MODEL --out DIR [--card CARD.yaml] [--targets ...] [--calibration F]
floorline-convert inspect BUNDLE [--trust KEY.pub] [--require-signature]
floorline-convert bench BUNDLE [--batches 1,8,32]
floorline-convert keygen PREFIX
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from floorline.edge import __version__
from floorline.edge.bundle.signing import generate_keypair, load_private_key, load_public_key
from floorline.edge.errors import FloorlineError

log = logging.getLogger("floorline.converter")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _floats(value: str) -> list[float]:
    try:
        return [float(v) for v in _csv(value)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers: {value}") from exc


def _features(value: str) -> list[dict[str, str]]:
    # "accel_x:g,accel_y:g" → [{"name": "accel_x", "unit": "g"}, ...]
    out = []
    for item in _csv(value):
        name, _, unit = item.partition(":")
        out.append({"name": name, "unit": unit})
    return out


def _thresholds(values: list[str] | None) -> dict[str, float] | None:
    if not values:
        return None
    result = {}
    for item in values:
        key, sep, number = item.partition("=")
        try:
            result[key] = float(number)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--threshold takes NAME=VALUE, got {item!r}")
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="floorline-convert",
        description="Convert Keras/TensorFlow models into verified Floorline bundles.",
    )
    parser.add_argument("--version", action="version", version=f"floorline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser(
        "keras",
        help="convert a .keras, .h5 or SavedModel into a bundle",
        description="Convert a .keras file, a legacy .h5 file or a SavedModel directory.",
    )
    conv.add_argument("model", type=Path, help=".keras / .h5 file or SavedModel directory")
    conv.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    conv.add_argument("--card", type=Path, help="YAML model card with the metadata below")
    conv.add_argument(
        "--targets",
        default="tflite,onnx",
        help="comma-separated: tflite, tflite-fp16, tflite-dynamic, tflite-int8, onnx, or 'all' "
        "(default: tflite,onnx)",
    )
    conv.add_argument("--calibration", type=Path, help="representative data (.npy/.npz/.csv)")
    conv.add_argument("--parity-data", type=Path, help="held-out inputs for the parity check")
    conv.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    conv.add_argument(
        "--int8-io",
        choices=("int8", "uint8", "float32"),
        default="int8",
        help="input/output type of the int8 artifact (default int8)",
    )
    conv.add_argument("--atol", type=float, default=1e-4, help="float parity bound (1e-4)")
    conv.add_argument(
        "--min-agreement", type=float, default=0.99, help="quantized top-1 agreement (0.99)"
    )
    conv.add_argument(
        "--quantized-atol", type=float, help="quantized parity bound for non-classifiers"
    )
    conv.add_argument("--sign-key", type=Path, help="ed25519 private key to sign the manifest")
    conv.add_argument("--pack", action="store_true", help="also write OUT.tar")
    conv.add_argument("--force", action="store_true", help="replace an existing bundle")
    conv.add_argument("--seed", type=int, default=0, help="seed for golden inputs (0)")
    meta = conv.add_argument_group("model metadata (override the card)")
    meta.add_argument("--name")
    meta.add_argument("--model-version", dest="model_version")
    meta.add_argument("--task", choices=("classification", "regression", "anomaly"))
    meta.add_argument("--description")
    meta.add_argument("--window", type=int)
    meta.add_argument("--features", type=_features, help="name:unit,name:unit,...")
    meta.add_argument("--labels", type=_csv, help="label,label,...")
    meta.add_argument("--norm-mean", type=_floats, help="per-feature mean, comma-separated")
    meta.add_argument("--norm-std", type=_floats, help="per-feature std, comma-separated")
    meta.add_argument("--threshold", action="append", help="NAME=VALUE, repeatable")

    insp = sub.add_parser("inspect", help="verify a bundle and summarise its manifest")
    insp.add_argument("bundle", type=Path, help="bundle directory or .tar")
    insp.add_argument("--trust", type=Path, action="append", help="trusted public key (repeat)")
    insp.add_argument("--require-signature", action="store_true")
    insp.add_argument("--json", action="store_true", help="print the manifest as JSON")

    bench = sub.add_parser("bench", help="time each artifact at batch 1, 8 and 32")
    bench.add_argument("bundle", type=Path)
    bench.add_argument("--batches", type=_csv, default=["1", "8", "32"])
    bench.add_argument("--iterations", type=int, default=200)
    bench.add_argument("--threads", type=int, default=1)

    keygen = sub.add_parser("keygen", help="create an ed25519 signing key pair")
    keygen.add_argument("prefix", type=Path, help="writes PREFIX.key and PREFIX.pub")
    return parser


def _cmd_keras(args: argparse.Namespace) -> int:
    # TensorFlow is imported here, not at module import, so inspect/bench work without it.
    from floorline.converter.card import load_card  # noqa: PLC0415
    from floorline.converter.convert import TARGETS, ConvertRequest, convert  # noqa: PLC0415
    from floorline.converter.parity import ParityPolicy  # noqa: PLC0415

    normalization = None
    if args.norm_mean is not None or args.norm_std is not None:
        normalization = {"mean": args.norm_mean, "std": args.norm_std}
    card = load_card(
        args.card,
        {
            "name": args.name,
            "version": args.model_version,
            "task": args.task,
            "description": args.description,
            "window": args.window,
            "features": args.features,
            "labels": args.labels,
            "normalization": normalization,
            "thresholds": _thresholds(args.threshold),
        },
    )
    targets = list(TARGETS) if args.targets.strip() == "all" else _csv(args.targets)
    request = ConvertRequest(
        source=args.model,
        out=args.out,
        card=card,
        targets=targets,
        calibration=args.calibration,
        parity_data=args.parity_data,
        opset=args.opset,
        integer_io=args.int8_io,
        policy=ParityPolicy(
            atol=args.atol, min_agreement=args.min_agreement, quantized_atol=args.quantized_atol
        ),
        signing_key=load_private_key(args.sign_key) if args.sign_key else None,
        pack=args.pack,
        force=args.force,
        seed=args.seed,
    )
    result = convert(request)
    print("\nparity against the source model:")
    print(result.parity_table)
    print("\ngateway self-test of the written bundle:")
    for rep in result.selftests:
        print(f"  {rep.artifact:<22} {rep.runtime:<24} max err {rep.max_abs_error:.2e} ok")
    print(f"\nwrote {result.bundle}" + (f" and {result.archive}" if result.archive else ""))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415

    from floorline.edge.bundle.bundle import Bundle  # noqa: PLC0415
    from floorline.edge.bundle.report import describe  # noqa: PLC0415

    trusted = [load_public_key(p) for p in args.trust or []]
    with Bundle.open(
        args.bundle, trusted_keys=trusted, require_signature=args.require_signature
    ) as bundle:
        if args.json:
            print(json.dumps(bundle.manifest.model_dump(mode="json"), indent=2))
        else:
            print(describe(bundle))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from floorline.converter.bench import bench, format_rows  # noqa: PLC0415
    from floorline.edge.bundle.bundle import Bundle  # noqa: PLC0415

    try:
        batches = tuple(int(b) for b in args.batches)
    except ValueError:
        print("floorline-convert: --batches takes integers like 1,8,32", file=sys.stderr)
        return 2
    with Bundle.open(args.bundle) as bundle:
        rows = bench(bundle, batches=batches, iterations=args.iterations, threads=args.threads)
    print(format_rows(rows))
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from floorline.edge.bundle.signing import key_id, load_public_key  # noqa: PLC0415

    private, public = generate_keypair(args.prefix)
    print(f"wrote {private} (keep secret) and {public} (key id {key_id(load_public_key(public))})")
    return 0


_COMMANDS = {
    "keras": _cmd_keras,
    "inspect": _cmd_inspect,
    "bench": _cmd_bench,
    "keygen": _cmd_keygen,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``floorline-convert``; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return _COMMANDS[args.command](args)
    except (FloorlineError, FileExistsError, argparse.ArgumentTypeError) as exc:
        print(f"floorline-convert: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("floorline-convert: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
