"""``floorline-convert``: turn a trained model into a verified, signed bundle, and look at bundles.

floorline-convert keras MODEL --out DIR [--card CARD.yaml] [--targets ...] [--calibration F]
floorline-convert sklearn MODEL.joblib --out DIR [--card CARD.yaml] [--calibration F]
    (both: [--parity-data F] [--reference-data F ... | --no-reference])
floorline-convert inspect BUNDLE [--trust KEY.pub] [--require-signature]
floorline-convert sign BUNDLE --key KEY [--out OUT] [--force]
floorline-convert bench BUNDLE [--batches 1,8,32]
floorline-convert keygen PREFIX

Every flag, and the model card, is checked before TensorFlow is imported (``preflight``): a typo
costs a second, not a TensorFlow start-up. Every error is one line, ``floorline-convert: error:
...``, naming the flag or card key at fault; exit status 2 for a wrong command line, 1 for a
conversion or bundle that failed, and what a tool said is shown only with ``-v``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from floorline.converter.errors import ConversionError, ModelCardError
from floorline.edge import __version__
from floorline.edge.errors import BundleError, FloorlineError, IntegrityError, SignatureError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from floorline.converter.card import ModelCard

log = logging.getLogger("floorline.converter")

PROG = "floorline-convert"
DATA_SUFFIXES = (".npy", ".npz", ".csv")
OPSET_RANGE = (13, 21)


class UsageError(Exception):
    """The command line is wrong: a flag's value, or a file a flag names. Exit status 2."""


# --- argument types ---------------------------------------------------------------------------


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _floats(value: str) -> list[float]:
    try:
        return [float(v) for v in _csv(value)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {value!r}"
        ) from exc


def _ints(value: str) -> list[int]:
    try:
        return [int(v) for v in _csv(value)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 1,8,32, got {value!r}"
        ) from exc


def _features(value: str) -> list[dict[str, str]]:
    # "accel_x:g,accel_y:g" → [{"name": "accel_x", "unit": "g"}, ...]
    out = []
    for item in _csv(value):
        name, _, unit = item.partition(":")
        out.append({"name": name.strip(), "unit": unit.strip()})
    return out


def _threshold(value: str) -> tuple[str, float]:
    key, sep, number = value.partition("=")
    try:
        limit = float(number)
    except ValueError:
        sep = ""
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"takes NAME=VALUE like anomaly=0.5, got {value!r}")
    return key.strip(), limit


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_model_flags(conv: argparse.ArgumentParser) -> None:
    """The flags every converting command shares (keras, sklearn): output, data, checks, card."""
    conv.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    conv.add_argument("--card", type=Path, help="YAML model card with the metadata below")
    conv.add_argument("--calibration", type=Path, help="representative data (.npy/.npz/.csv)")
    conv.add_argument("--parity-data", type=Path, help="held-out inputs for the parity check")
    conv.add_argument(
        "--reference-data",
        type=Path,
        action="append",
        help="windows of normal operation, the drift reference's only data (repeatable; "
        "default: the calibration and parity data)",
    )
    conv.add_argument(
        "--no-reference", action="store_true", help="write no drift reference (drift detection off)"
    )
    conv.add_argument("--atol", type=float, default=1e-4, help="float parity bound (1e-4)")
    conv.add_argument("--sign-key", type=Path, help="ed25519 private key to sign the manifest")
    conv.add_argument("--pack", action="store_true", help="also write OUT.tar")
    conv.add_argument("--force", action="store_true", help="replace an existing bundle")
    conv.add_argument("--seed", type=int, default=0, help="seed for golden inputs (0)")
    meta = conv.add_argument_group("model metadata (override the card)")
    meta.add_argument("--name", help="bundle name, a slug like pdm-classifier")
    meta.add_argument("--model-version", dest="model_version", help="semantic version (0.1.0)")
    meta.add_argument("--task", choices=("classification", "regression", "anomaly"))
    meta.add_argument("--description")
    meta.add_argument("--window", type=int, help="samples per window")
    meta.add_argument("--features", type=_features, help="name:unit,name:unit,...")
    meta.add_argument("--labels", type=_csv, help="label,label,...")
    meta.add_argument("--units", type=_csv, help="unit of each regression output: h,...")
    meta.add_argument(
        "--norm-mean",
        type=_floats,
        help="per-feature mean, comma-separated (--norm-mean=-0.5,1.2 when the first is negative)",
    )
    meta.add_argument("--norm-std", type=_floats, help="per-feature std, comma-separated")
    meta.add_argument(
        "--threshold", type=_threshold, action="append", help="NAME=VALUE, repeatable"
    )
    score = conv.add_argument_group("anomaly scoring of an autoencoder (override the card)")
    score.add_argument("--score-metric", choices=("mse", "mae"), help="reconstruction error")
    score.add_argument(
        "--score-percentile", type=float, help="threshold at this percentile of calibration scores"
    )
    score.add_argument("--score-threshold", type=float, help="explicit anomaly threshold")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Convert Keras/TensorFlow models into verified Floorline bundles.",
    )
    parser.add_argument("--version", action="version", version=f"floorline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    # -v after the command works too; SUPPRESS keeps a subcommand from resetting it to False.
    verbose = _Parser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug details"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser(
        "keras",
        parents=[verbose],
        help="convert a .keras, .h5 or SavedModel into a bundle",
        description="Convert a .keras file, a legacy .h5 file or a SavedModel directory.",
    )
    conv.add_argument("model", type=Path, help=".keras / .h5 file or SavedModel directory")
    conv.add_argument(
        "--targets",
        default="tflite,onnx",
        help="comma-separated: tflite, tflite-fp16, tflite-dynamic, tflite-int8, onnx, or 'all' "
        "(default: tflite,onnx)",
    )
    conv.add_argument("--opset", type=int, default=17, help="ONNX opset, 13..21 (default 17)")
    conv.add_argument(
        "--int8-io",
        choices=("int8", "uint8", "float32"),
        default="int8",
        help="input/output type of the int8 artifact (default int8)",
    )
    conv.add_argument(
        "--min-agreement", type=float, default=0.99, help="quantized top-1 agreement (0.99)"
    )
    conv.add_argument(
        "--quantized-atol", type=float, help="quantized parity bound for non-classifiers"
    )
    add_model_flags(conv)

    skl = sub.add_parser(
        "sklearn",
        parents=[verbose],
        help="convert a fitted scikit-learn estimator or pipeline (.joblib) into a bundle",
        description="Convert a fitted scikit-learn estimator or Pipeline saved with joblib to "
        "ONNX. Loading a joblib file runs code from it: convert only models you trust.",
    )
    skl.add_argument("model", type=Path, help=".joblib / .pkl file of a fitted estimator")
    skl.add_argument("--targets", default="onnx", help="onnx (the only target for scikit-learn)")
    skl.add_argument("--opset", type=int, default=17, help="ONNX opset, 13..21 (default 17)")
    skl.add_argument(
        "--min-agreement", type=float, default=0.99, help="top-1 agreement bound (0.99)"
    )
    add_model_flags(skl)

    insp = sub.add_parser(
        "inspect", parents=[verbose], help="verify a bundle and summarise its manifest"
    )
    insp.add_argument("bundle", type=Path, help="bundle directory or .tar")
    insp.add_argument("--trust", type=Path, action="append", help="trusted public key (repeat)")
    insp.add_argument("--require-signature", action="store_true")
    insp.add_argument("--json", action="store_true", help="print the manifest as JSON")

    sign = sub.add_parser(
        "sign",
        parents=[verbose],
        help="sign an existing bundle (directory or .tar) after verifying its files",
        description="Verify every file of a bundle against its manifest, then sign the manifest.",
    )
    sign.add_argument("bundle", type=Path, help="bundle directory or .tar")
    sign.add_argument("--key", type=Path, required=True, help="ed25519 private key (PREFIX.key)")
    sign.add_argument(
        "--out", type=Path, help="write the signed bundle here (default: sign in place)"
    )
    sign.add_argument(
        "--force", action="store_true", help="replace an existing signature (and an existing OUT)"
    )

    bench = sub.add_parser(
        "bench", parents=[verbose], help="time each artifact at batch 1, 8 and 32"
    )
    bench.add_argument("bundle", type=Path)
    bench.add_argument("--batches", type=_ints, default=[1, 8, 32])
    bench.add_argument("--iterations", type=int, default=200)
    bench.add_argument("--threads", type=int, default=1)

    keygen = sub.add_parser("keygen", parents=[verbose], help="create an ed25519 signing key pair")
    keygen.add_argument("prefix", type=Path, help="writes PREFIX.key and PREFIX.pub")
    return parser


# --- checks before anything heavy is imported -------------------------------------------------


def _load_private(path: Path, flag: str) -> Ed25519PrivateKey:
    from floorline.edge.bundle.signing import load_private_key  # noqa: PLC0415

    if not path.is_file():
        raise UsageError(
            f"{flag} {path}: no such key file; make a key pair with {PROG} keygen PREFIX"
        )
    try:
        head = path.read_bytes()[:64]
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot read it: {exc.strerror}") from exc
    if b"PUBLIC KEY" in head:
        raise UsageError(f"{flag} {path}: is a public key; sign with the private PREFIX.key")
    try:
        return load_private_key(path)
    except (SignatureError, ValueError, TypeError) as exc:
        raise UsageError(
            f"{flag} {path}: not an unencrypted PEM ed25519 private key; make one with "
            f"{PROG} keygen PREFIX"
        ) from exc


def _load_public(path: Path, flag: str) -> Ed25519PublicKey:
    from floorline.edge.bundle.signing import load_public_key  # noqa: PLC0415

    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such public key file")
    try:
        return load_public_key(path)
    except (SignatureError, ValueError) as exc:
        raise UsageError(
            f"{flag} {path}: not a PEM or base64 ed25519 public key (PREFIX.pub from keygen)"
        ) from exc


def _check_data_file(path: Path | None, flag: str) -> None:
    if path is None:
        return
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise UsageError(f"{flag} {path}: is not a file; give a .npy, .npz or .csv file")
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise UsageError(
            f"{flag} {path}: unknown format {path.suffix or '(no suffix)'!r}; "
            "give a .npy, .npz or .csv file"
        )


def _check_number(
    args: argparse.Namespace, attr: str, flag: str, ok: bool | None, want: str
) -> None:
    value = getattr(args, attr, None)
    if value is not None and not ok:
        raise UsageError(f"{flag} {value}: must be {want}")


def target_names(spec: str, command: str = "keras") -> list[str]:
    """The names of ``--targets`` (``all`` expanded), checked by convert.check_targets."""
    # numpy and cryptography, no TensorFlow: importing convert is cheap.
    from floorline.converter.convert import TARGETS, check_targets  # noqa: PLC0415

    if spec.strip() == "all":
        # Every target this kind of model converts to (scikit-learn: ONNX only).
        names = ["onnx"] if command == "sklearn" else list(TARGETS)
    else:
        names = _csv(spec)
    try:
        return check_targets(names, "sklearn" if command == "sklearn" else "keras")
    except ConversionError as exc:
        raise UsageError(str(exc)) from exc


def card_from_args(args: argparse.Namespace) -> ModelCard:
    """The model card from --card and the metadata flags (raises a one-line ModelCardError)."""
    from floorline.converter.card import load_card  # noqa: PLC0415 - pydantic and yaml only

    thresholds = dict(args.threshold) if getattr(args, "threshold", None) else None
    overrides: dict[str, Any] = {
        "name": args.name,
        "version": args.model_version,
        "task": args.task,
        "description": args.description,
        "window": args.window,
        "features": args.features,
        "labels": args.labels,
        "units": getattr(args, "units", None),
        "normalization.mean": args.norm_mean,
        "normalization.std": args.norm_std,
        "thresholds": thresholds,
        "score.metric": getattr(args, "score_metric", None),
        "score.percentile": getattr(args, "score_percentile", None),
        "score.threshold": getattr(args, "score_threshold", None),
    }
    return load_card(args.card, overrides, getattr(args, "card_defaults", None))


def preflight(args: argparse.Namespace) -> None:
    """Check a converting command's flags and model card; import nothing heavy.

    Called by every converting command (``keras``; ``sklearn``) before TensorFlow or any exporter
    is imported. Raises UsageError (exit 2, one line naming the flag or card key) for a wrong flag
    or a card that breaks a rule; what needs the model (shapes) is checked later, by the
    conversion (exit 1). Flags a command lacks are skipped.
    """
    model: Path | None = getattr(args, "model", None)
    if model is not None and not model.exists():
        raise UsageError(f"MODEL {model}: no such file or directory")
    out: Path | None = getattr(args, "out", None)
    if out is not None and out.exists() and not getattr(args, "force", False):
        raise UsageError(f"--out {out}: exists; use --force to replace it")
    card_path: Path | None = getattr(args, "card", None)
    if card_path is not None and not card_path.is_file():
        raise UsageError(f"--card {card_path}: no such file")
    _check_data_file(getattr(args, "calibration", None), "--calibration")
    _check_data_file(getattr(args, "parity_data", None), "--parity-data")
    references: list[Path] = getattr(args, "reference_data", None) or []
    for path in references:
        _check_data_file(path, "--reference-data")
    if references and getattr(args, "no_reference", False):
        raise UsageError("--no-reference: cannot be combined with --reference-data; give one")
    opset = getattr(args, "opset", None)
    low, high = OPSET_RANGE
    _check_number(
        args,
        "opset",
        "--opset",
        opset is not None and low <= opset <= high,
        f"an ONNX opset from {low} to {high}",
    )
    _check_number(args, "seed", "--seed", getattr(args, "seed", 0) >= 0, "0 or more")
    atol = getattr(args, "atol", None)
    _check_number(
        args,
        "atol",
        "--atol",
        atol is not None and math.isfinite(atol) and atol > 0,
        "a number > 0, like 1e-4",
    )
    qatol = getattr(args, "quantized_atol", None)
    _check_number(
        args,
        "quantized_atol",
        "--quantized-atol",
        qatol is not None and math.isfinite(qatol) and qatol > 0,
        "a number > 0, like 0.05",
    )
    agree = getattr(args, "min_agreement", None)
    _check_number(
        args,
        "min_agreement",
        "--min-agreement",
        agree is not None and 0 < agree <= 1,
        "a share above 0 and at most 1, like 0.99",
    )
    spec: str | None = getattr(args, "targets", None)
    if spec is not None:
        names = target_names(spec, getattr(args, "command", "keras"))
        if "tflite-int8" in names and getattr(args, "calibration", None) is None:
            raise UsageError(
                "--calibration: target tflite-int8 needs representative data; pass "
                "--calibration FILE (.npy/.npz/.csv), or leave tflite-int8 out of --targets"
            )
    key: Path | None = getattr(args, "sign_key", None)
    if key is not None:
        _load_private(key, "--sign-key")
    try:
        card = card_from_args(args)
    except ModelCardError as exc:
        # Nothing was attempted yet: a card that breaks a rule is a wrong input, like a flag.
        raise UsageError(str(exc)) from exc
    percentile = card.score.percentile if card.score is not None else None
    if percentile is not None and getattr(args, "calibration", None) is None:
        raise UsageError(
            f"--calibration: score percentile {percentile:g} sets the anomaly "
            "threshold from normal operating data; pass --calibration FILE, or give a score "
            "threshold instead"
        )


# --- commands ---------------------------------------------------------------------------------


def _cmd_keras(args: argparse.Namespace) -> int:
    return _convert(args)


def _cmd_sklearn(args: argparse.Namespace) -> int:
    return _convert(args)


def _sklearn_defaults(args: argparse.Namespace) -> Any:
    # Loading a scikit-learn model is cheap (no TensorFlow), and it knows its task, classes and
    # feature names: the card need not repeat them. Loaded once, handed to the conversion.
    from floorline.converter.sklearn_source import JOBLIB_WARNING, load_sklearn  # noqa: PLC0415

    if not args.model.is_file():
        raise UsageError(f"MODEL {args.model}: no such file")
    print(f"warning: {JOBLIB_WARNING}", file=sys.stderr)
    source = load_sklearn(args.model)
    task = source.tasks[0]
    args.card_defaults = {
        "task": task,
        "labels": source.labels[0] if task == "classification" else None,
        "thresholds": source.default_thresholds[0] or None,
        "features": list(source.feature_names) if source.feature_names else None,
    }
    return source


def _convert(args: argparse.Namespace) -> int:
    from floorline.converter.convert import ConvertRequest, SourceKind, convert  # noqa: PLC0415

    kind: SourceKind = "sklearn" if args.command == "sklearn" else "keras"
    loaded = _sklearn_defaults(args) if kind == "sklearn" else None
    preflight(args)
    card = card_from_args(args)
    # Heavy imports from here on; TensorFlow itself is imported when the model is loaded.
    from floorline.converter.parity import ParityPolicy  # noqa: PLC0415
    from floorline.converter.progress import say_stderr  # noqa: PLC0415

    request = ConvertRequest(
        source=args.model,
        out=args.out,
        card=card,
        targets=target_names(args.targets, args.command),
        calibration=args.calibration,
        parity_data=args.parity_data,
        reference_data=list(args.reference_data or []),
        no_reference=args.no_reference,
        opset=args.opset,
        integer_io=getattr(args, "int8_io", "int8"),
        policy=ParityPolicy(
            atol=args.atol,
            min_agreement=args.min_agreement,
            quantized_atol=getattr(args, "quantized_atol", None),
        ),
        kind=kind,
        loaded=loaded,
        signing_key=_load_private(args.sign_key, "--sign-key") if args.sign_key else None,
        pack=args.pack,
        force=args.force,
        seed=args.seed,
    )
    result = convert(request, say=say_stderr)
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

    trusted = [_load_public(p, "--trust") for p in args.trust or []]
    with Bundle.open(
        args.bundle, trusted_keys=trusted, require_signature=args.require_signature
    ) as bundle:
        if args.json:
            data = bundle.manifest.model_dump(mode="json")
            if data["input"].get("preprocessing") is None:  # as before the feature stage existed
                data["input"].pop("preprocessing", None)
            print(json.dumps(data, indent=2))
            return 0
        text = describe(bundle)
        if bundle.path != args.bundle:
            # Opened from a tar: say what was read, not the temporary directory it went to.
            text = text.replace(str(bundle.path), str(args.bundle))
        print(text)
    return 0


def _write_atomically(path: Path, data: bytes) -> None:
    # The temporary file goes beside the bundle directory, never in it: a gateway opening the
    # bundle meanwhile would refuse a file its manifest does not list.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).chmod(0o644)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy_signed_dir(src: Path, out: Path, sig_name: str, sig: bytes, force: bool) -> None:
    from floorline.edge.bundle.bundle import install, staging_dir  # noqa: PLC0415

    if out.exists() and not force:
        raise UsageError(f"--out {out}: exists; use --force to replace it")
    with staging_dir(out) as staging:
        for item in src.iterdir():
            if item.name != sig_name:
                shutil.copy2(item, staging / item.name)
        (staging / sig_name).write_bytes(sig)
        install(staging, out, overwrite=True)


def _cmd_sign(args: argparse.Namespace) -> int:
    from floorline.edge.bundle.archive import pack  # noqa: PLC0415
    from floorline.edge.bundle.bundle import MANIFEST_FILE, SIGNATURE_FILE, Bundle  # noqa: PLC0415
    from floorline.edge.bundle.hashing import sha256_bytes  # noqa: PLC0415
    from floorline.edge.bundle.signing import Signature, key_id, sign  # noqa: PLC0415

    key = _load_private(args.key, "--key")
    src: Path = args.bundle
    if not src.exists():
        raise UsageError(f"BUNDLE {src}: no such bundle directory or archive")
    out: Path = args.out or src
    in_place = out.resolve() == src.resolve()
    if not in_place and out.exists() and not args.force:
        raise UsageError(f"--out {out}: exists; use --force to replace it")
    try:
        bundle = Bundle.open(src)
    except BundleError as exc:
        raise BundleError(f"refusing to sign: {exc}") from exc
    with bundle:
        sig_path = bundle.path / SIGNATURE_FILE
        if sig_path.exists() and not args.force:
            old = Signature.from_bytes(sig_path.read_bytes(), origin=str(sig_path))
            raise UsageError(
                f"BUNDLE {src}: already signed by key {old.key_id}; use --force to replace "
                "the signature"
            )
        manifest_bytes = (bundle.path / MANIFEST_FILE).read_bytes()
        if sha256_bytes(manifest_bytes) != bundle.manifest_sha256:
            raise IntegrityError(f"{src}: manifest.json changed while it was being signed")
        signature = sign(manifest_bytes, key).to_bytes()
        if src.is_file():  # a tar: sign the verified copy, repack it (pack writes atomically)
            (bundle.path / SIGNATURE_FILE).write_bytes(signature)
            pack(bundle.path, out)
        elif in_place:
            _write_atomically(src / SIGNATURE_FILE, signature)
        else:
            _copy_signed_dir(bundle.path, out, SIGNATURE_FILE, signature, args.force)
    public = key.public_key()
    with Bundle.open(out, trusted_keys=[public], require_signature=True) as signed:
        print(f"signed {out} (manifest sha256 {signed.manifest_sha256[:16]}…)")
    print(f"key id {key_id(public)}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    for flag, value in (
        ("--batches", min(args.batches, default=0)),
        ("--iterations", args.iterations),
        ("--threads", args.threads),
    ):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be 1 or more")
    from floorline.converter.bench import bench, format_rows  # noqa: PLC0415
    from floorline.edge.bundle.bundle import Bundle  # noqa: PLC0415

    with Bundle.open(args.bundle) as bundle:
        rows = bench(
            bundle, batches=tuple(args.batches), iterations=args.iterations, threads=args.threads
        )
    print(format_rows(rows))
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from floorline.edge.bundle.signing import (  # noqa: PLC0415
        generate_keypair,
        key_id,
        load_public_key,
    )

    private, public = generate_keypair(args.prefix)
    print(f"wrote {private} (keep secret) and {public} (key id {key_id(load_public_key(public))})")
    return 0


_COMMANDS = {
    "sklearn": _cmd_sklearn,
    "keras": _cmd_keras,
    "inspect": _cmd_inspect,
    "sign": _cmd_sign,
    "bench": _cmd_bench,
    "keygen": _cmd_keygen,
}


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _os_message(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0911 - one return per outcome
    """Entry point of ``floorline-convert``; returns the exit code."""
    try:
        args = _parser().parse_args(argv)  # --help and --version exit here, as argparse does
    except UsageError as exc:
        _error(str(exc))
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return _COMMANDS[args.command](args)
    except UsageError as exc:
        _error(str(exc))
        return 2
    except ConversionError as exc:
        if exc.details and args.verbose:
            _error(str(exc))
            print("details:", file=sys.stderr)
            print("\n".join("  " + ln for ln in exc.details.splitlines()), file=sys.stderr)
        elif exc.details:
            _error(f"{exc} (run with -v for details)")
        else:
            _error(str(exc))
        return 1
    except FloorlineError as exc:
        _error(str(exc))
        return 1
    except OSError as exc:  # a file a command reads or writes: permissions, a full disk
        _error(_os_message(exc))
        return 1
    except KeyboardInterrupt:
        _error("interrupted; nothing was written")
        return 130


if __name__ == "__main__":
    sys.exit(main())
