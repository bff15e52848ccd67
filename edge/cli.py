"""``floorline``: the gateway-side command line.

    floorline selftest BUNDLE [--backend litert|onnx] [--artifact FILE] [--trust KEY.pub]
    floorline inspect BUNDLE [--trust KEY.pub]
    floorline infer BUNDLE --input WINDOWS.npy [--backend ...]

Nothing here imports TensorFlow; runtimes are imported by the backend that needs them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from edge import __version__
from edge.backends import BackendOptions
from edge.errors import FloorlineError


def _open(args: argparse.Namespace) -> object:
    from edge.bundle import Bundle  # noqa: PLC0415
    from edge.signing import load_public_key  # noqa: PLC0415

    trusted = [load_public_key(p) for p in args.trust or []]
    return Bundle.open(args.bundle, trusted_keys=trusted, require_signature=args.require_signature)


def _cmd_selftest(args: argparse.Namespace) -> int:
    from edge import selftest  # noqa: PLC0415
    from edge.bundle import Bundle  # noqa: PLC0415

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
            from edge.backends import BACKENDS  # noqa: PLC0415

            fmt = BACKENDS[args.backend].format if args.backend in BACKENDS else None
            files = [a.file for a in m.artifacts if a.format == fmt]
        else:
            files = [a.file for a in m.artifacts]
        if not files:
            print(f"floorline: error: no artifact in the bundle runs on {args.backend}",
                  file=sys.stderr)
            return 1
        failures = 0
        for file in files:
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
            print(
                f"  {file:<22} ok    {rep.runtime}: max err {rep.max_abs_error:.2e} "
                f"(allowed {rep.atol:.0e}) on {rep.samples} golden inputs{agree}"
            )
        return 1 if failures else 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from edge.bundle import Bundle  # noqa: PLC0415
    from edge.bundle_report import describe  # noqa: PLC0415

    bundle = _open(args)
    assert isinstance(bundle, Bundle)  # noqa: S101
    with bundle:
        print(describe(bundle))
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    from edge import selftest  # noqa: PLC0415
    from edge.bundle import Bundle  # noqa: PLC0415
    from edge.normalization import normalize  # noqa: PLC0415

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
            out = loaded.backend.infer(x)
        finally:
            loaded.backend.close()
        labels = bundle.manifest.output.labels
        for row in out:
            if labels:
                print(f"{labels[int(row.argmax())]:<20} " + " ".join(f"{v:.4f}" for v in row))
            else:
                print(" ".join(f"{v:.6g}" for v in row))
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


_COMMANDS = {"selftest": _cmd_selftest, "inspect": _cmd_inspect, "infer": _cmd_infer}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``floorline``; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return _COMMANDS[args.command](args)
    except FloorlineError as exc:
        print(f"floorline: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
