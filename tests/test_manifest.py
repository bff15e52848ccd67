"""Manifest parsing and validation: canonical bytes, and one ManifestError per broken rule."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from floorline.edge.bundle.manifest import SCHEMA_VERSION, Manifest
from floorline.edge.errors import BundleError, ManifestError
from tests.bundle_factory import ARTIFACT_FIELDS, FAKE_SHA, manifest_dict

Raw = dict[str, Any]


def _encode(raw: Raw) -> bytes:
    return json.dumps(raw).encode()


def _parse_error(raw: Raw) -> str:
    with pytest.raises(ManifestError) as info:
        Manifest.from_bytes(_encode(raw))
    return str(info.value)


def _reverse_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reverse_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reverse_keys(v) for v in value]
    return value


# --- canonical bytes ---------------------------------------------------------------------------


def test_valid_manifest_round_trips_to_identical_bytes() -> None:
    manifest = Manifest.from_bytes(_encode(manifest_dict()))
    first = manifest.to_bytes()
    again = Manifest.from_bytes(first)
    assert again == manifest
    assert again.to_bytes() == first
    assert first.endswith(b"\n")


def test_to_bytes_does_not_depend_on_input_key_order() -> None:
    raw = manifest_dict()
    a = Manifest.from_bytes(json.dumps(raw).encode()).to_bytes()
    b = Manifest.from_bytes(json.dumps(_reverse_keys(raw), indent=4).encode()).to_bytes()
    assert a == b


def test_to_bytes_sorts_keys() -> None:
    doc = json.loads(Manifest.model_validate(manifest_dict()).to_bytes())
    assert list(doc) == sorted(doc)
    assert list(doc["input"]) == sorted(doc["input"])


def test_origin_prefixes_error_message() -> None:
    with pytest.raises(ManifestError, match=r"^bundles/x/manifest\.json: "):
        Manifest.from_bytes(b"{", origin="bundles/x/manifest.json")


def test_manifest_error_is_a_bundle_error() -> None:
    assert issubclass(ManifestError, BundleError)


# --- validation rules --------------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[Raw], None]:
    keys = path.split(".")

    def apply(raw: Raw) -> None:
        node: Any = raw
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return apply


def _drop_labels(raw: Raw) -> None:
    raw["output"]["labels"] = None


def _anomaly_without_threshold(raw: Raw) -> None:
    raw["task"] = "anomaly"
    raw["output"]["labels"] = None
    raw["output"]["thresholds"] = {"bad": 0.5}


def _duplicate_artifact(raw: Raw) -> None:
    raw["artifacts"].append(dict(raw["artifacts"][0]))


def _artifact_named_like_golden(raw: Raw) -> None:
    raw["artifacts"][0]["file"] = "golden.npz"


def _two_features(raw: Raw) -> None:
    raw["input"]["features"] = raw["input"]["features"][:2]
    raw["input"]["normalization"] = None


INVALID: list[tuple[str, Callable[[Raw], None], list[str]]] = [
    ("unknown top-level key", _set("extra", 1), ["extra", "not permitted"]),
    ("unknown nested key", _set("input.scale", 2.0), ["input.scale", "not permitted"]),
    ("unknown artifact key", _set("artifacts.0.url", "x"), ["artifacts.0.url"]),
    ("missing required field", lambda r: r.pop("created_at"), ["created_at", "required"]),
    ("schema version too new", _set("schema_version", 2), ["schema_version", "version 2"]),
    ("schema version zero", _set("schema_version", 0), ["schema_version"]),
    ("semver two parts", _set("version", "1.0"), ["version", "'1.0'"]),
    ("semver leading v", _set("version", "v1.0.0"), ["version"]),
    ("semver leading zero", _set("version", "01.0.0"), ["version"]),
    ("semver trailing newline", _set("version", "1.0.0\n"), ["version"]),
    ("name uppercase", _set("name", "Vibration"), ["name", "lowercase"]),
    ("name with space", _set("name", "my model"), ["name"]),
    ("name with slash", _set("name", "a/b"), ["name"]),
    ("name leading dash", _set("name", "-a"), ["name"]),
    ("name too long", _set("name", "a" * 65), ["name"]),
    ("name trailing newline", _set("name", "demo\n"), ["name"]),
    ("unknown task", _set("task", "ranking"), ["task"]),
    ("labels vs outputs", _set("output.labels", ["ok", "bad", "ugly"]), ["output", "3 labels"]),
    ("output shape rank", _set("output.shape", [None, 2, 1]), ["output", "[null, outputs]"]),
    ("output shape zero", _set("output.shape", [None, 0]), ["output", "[null, outputs]"]),
    ("output shape negative", _set("output.shape", [None, -2]), ["output", "[null, outputs]"]),
    ("output batch fixed", _set("output.shape", [1, 2]), ["output", "[null, outputs]"]),
    ("features vs input shape", _two_features, ["input", "does not match 2 features"]),
    ("input last dim", _set("input.shape", [None, 8, 4]), ["input", "last dimension 4"]),
    ("window vs shape", _set("input.window", 4), ["input", "window 4"]),
    ("window vs rank-2 shape", _set("input.shape", [None, 3]), ["input", "window 8"]),
    ("window zero", _set("input.window", 0), ["input.window"]),
    ("input batch fixed", _set("input.shape", [4, 8, 3]), ["input", "shape must be"]),
    ("input null window", _set("input.shape", [None, None, 3]), ["input", "positive integer"]),
    ("input rank 4", _set("input.shape", [None, 8, 3, 1]), ["input", "shape must be"]),
    ("input dtype", _set("input.dtype", "int8"), ["input.dtype"]),
    ("no features", _set("input.features", []), ["input.features"]),
    (
        "normalization per feature",
        _set("input.normalization", {"mean": [0.0, 0.0], "std": [1.0, 1.0]}),
        ["input", "one mean and std per feature"],
    ),
    (
        "normalization mean/std lengths",
        _set("input.normalization", {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0]}),
        ["input.normalization", "same length"],
    ),
    ("std zero", _set("input.normalization.std", [1.0, 0.0, 1.0]), ["input.normalization.std"]),
    ("std negative", _set("input.normalization.std", [-1.0, 1, 1]), ["input.normalization.std"]),
    ("classification without labels", _drop_labels, ["labels", "classification"]),
    ("anomaly without threshold", _anomaly_without_threshold, ["thresholds.anomaly"]),
    ("artifact name with slash", _set("artifacts.0.file", "sub/m.tflite"), ["artifacts.0.file"]),
    ("artifact name dotdot", _set("artifacts.0.file", "../m.tflite"), ["artifacts.0.file"]),
    ("artifact name is dotdot", _set("artifacts.0.file", ".."), ["artifacts.0.file"]),
    ("artifact name absolute", _set("artifacts.0.file", "/m.tflite"), ["artifacts.0.file"]),
    ("artifact name hidden", _set("artifacts.0.file", ".m.tflite"), ["artifacts.0.file"]),
    ("artifact name backslash", _set("artifacts.0.file", "a\\m.tflite"), ["artifacts.0.file"]),
    ("artifact name newline", _set("artifacts.0.file", "m.tflite\n"), ["artifacts.0.file"]),
    ("artifact name empty", _set("artifacts.0.file", ""), ["artifacts.0.file"]),
    ("golden name dotdot", _set("golden.file", "../golden.npz"), ["golden.file"]),
    ("sha uppercase", _set("artifacts.0.sha256", "A" * 64), ["artifacts.0.sha256", "64"]),
    ("sha short", _set("artifacts.0.sha256", "a" * 63), ["artifacts.0.sha256"]),
    ("sha non-hex", _set("artifacts.0.sha256", "g" * 64), ["artifacts.0.sha256"]),
    ("sha trailing newline", _set("artifacts.0.sha256", "a" * 64 + "\n"), ["artifacts.0.sha256"]),
    ("golden sha", _set("golden.sha256", "xyz"), ["golden.sha256"]),
    ("source sha", _set("source.sha256", ""), ["source.sha256"]),
    ("artifact size zero", _set("artifacts.0.size", 0), ["artifacts.0.size"]),
    ("artifact format", _set("artifacts.0.format", "pt"), ["artifacts.0.format"]),
    ("selftest_atol zero", _set("artifacts.0.selftest_atol", 0), ["artifacts.0.selftest_atol"]),
    ("no artifacts", _set("artifacts", []), ["artifacts"]),
    ("duplicate artifact names", _duplicate_artifact, ["file names must be unique"]),
    ("artifact named like golden", _artifact_named_like_golden, ["file names must be unique"]),
]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [pytest.param(m, e, id=i) for i, m, e in INVALID],
)
def test_invalid_manifest_is_refused_naming_the_field(
    mutate: Callable[[Raw], None], expected: list[str]
) -> None:
    raw = manifest_dict()
    mutate(raw)
    message = _parse_error(raw)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_schema_error_says_which_version_is_supported() -> None:
    raw = manifest_dict()
    raw["schema_version"] = SCHEMA_VERSION + 1
    message = _parse_error(raw)
    assert f"reads version {SCHEMA_VERSION}" in message


def test_many_errors_are_summarised() -> None:
    raw = manifest_dict()
    for key in ("name", "version", "task", "created_at", "converter_version", "source", "golden"):
        raw.pop(key)
    message = _parse_error(raw)
    assert "and 2 more" in message


def test_unique_artifact_names_with_distinct_files_are_accepted() -> None:
    raw = manifest_dict()
    second = {"file": "model_int8.tflite", "sha256": FAKE_SHA, "size": 10, **ARTIFACT_FIELDS}
    second["quantization"] = "int8"
    raw["artifacts"].append(second)
    manifest = Manifest.from_bytes(_encode(raw))
    assert [a.file for a in manifest.artifacts] == ["model.tflite", "model_int8.tflite"]


def test_anomaly_model_with_threshold_is_accepted() -> None:
    raw = manifest_dict()
    _anomaly_without_threshold(raw)
    raw["output"]["thresholds"] = {"anomaly": 0.8}
    raw["output"]["shape"] = [None, 1]
    assert Manifest.from_bytes(_encode(raw)).output.thresholds == {"anomaly": 0.8}


def test_regression_model_needs_no_labels() -> None:
    raw = manifest_dict()
    raw["task"] = "regression"
    raw["output"]["labels"] = None
    assert Manifest.from_bytes(_encode(raw)).output.labels is None


def test_per_sample_model_has_window_one() -> None:
    raw = manifest_dict()
    raw["input"]["shape"] = [None, 3]
    raw["input"]["window"] = 1
    assert Manifest.from_bytes(_encode(raw)).input.window == 1


# --- not a manifest at all ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b"name: demo\n", id="yaml"),
        pytest.param(b"\xff\xfe\x00{", id="not utf-8"),
        pytest.param(b'{"schema_version": ' + b"1" * 5000 + b"}", id="huge integer"),
        pytest.param(b"[" * 100_000, id="deeply nested"),
    ],
)
def test_not_json_is_a_manifest_error(data: bytes) -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_bytes(data)


@pytest.mark.parametrize("data", [b"[]", b'"manifest"', b"null", b"1", b"[{}]"])
def test_json_that_is_not_an_object_is_a_manifest_error(data: bytes) -> None:
    with pytest.raises(ManifestError, match="must hold a JSON object"):
        Manifest.from_bytes(data)
