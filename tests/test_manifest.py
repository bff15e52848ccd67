"""Manifest parsing and validation: canonical bytes, and one ManifestError per broken rule."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from floorline.edge.bundle.manifest import READABLE_SCHEMAS, Manifest
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
    raw = manifest_dict(schema=1)
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
    ("schema version too new", _set("schema_version", 4), ["schema_version", "versions 1, 2, 3"]),
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
    raw = manifest_dict(schema=1)
    mutate(raw)
    message = _parse_error(raw)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_schema_error_says_which_version_is_supported() -> None:
    raw = manifest_dict(schema=1)
    raw["schema_version"] = max(READABLE_SCHEMAS) + 1
    message = _parse_error(raw)
    assert f"reads versions {', '.join(map(str, READABLE_SCHEMAS))}" in message


def test_many_errors_are_summarised() -> None:
    raw = manifest_dict(schema=1)
    for key in ("name", "version", "task", "created_at", "converter_version", "source", "golden"):
        raw.pop(key)
    message = _parse_error(raw)
    assert "and 2 more" in message


def test_unique_artifact_names_with_distinct_files_are_accepted() -> None:
    raw = manifest_dict(schema=1)
    second = {"file": "model_int8.tflite", "sha256": FAKE_SHA, "size": 10, **ARTIFACT_FIELDS}
    second["quantization"] = "int8"
    raw["artifacts"].append(second)
    manifest = Manifest.from_bytes(_encode(raw))
    assert [a.file for a in manifest.artifacts] == ["model.tflite", "model_int8.tflite"]


def test_anomaly_model_with_threshold_is_accepted() -> None:
    raw = manifest_dict(schema=1)
    _anomaly_without_threshold(raw)
    raw["output"]["thresholds"] = {"anomaly": 0.8}
    raw["output"]["shape"] = [None, 1]
    assert Manifest.from_bytes(_encode(raw)).output.thresholds == {"anomaly": 0.8}


def test_regression_model_needs_no_labels() -> None:
    raw = manifest_dict(schema=1)
    raw["task"] = "regression"
    raw["output"]["labels"] = None
    assert Manifest.from_bytes(_encode(raw)).output.labels is None


def test_per_sample_model_has_window_one() -> None:
    raw = manifest_dict(schema=1)
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


# Schema 2: heads. A schema 1 manifest keeps loading (the committed example bundle is one) and
# keeps its exact bytes when written again.


def _two_heads(raw: Raw) -> None:
    raw["outputs"].append({"name": "rul", "task": "regression", "shape": [None, 1], "units": ["h"]})
    for art in raw["artifacts"]:
        art["outputs"] = ["fault_probs", "rul_hours"]


def _autoencoder(raw: Raw) -> None:
    raw["task"] = "anomaly"
    raw["outputs"] = [
        {
            "name": "reconstruction",
            "task": "anomaly",
            "shape": [None, 8, 3],
            "score": {"metric": "mse", "threshold": 0.25, "percentile": 99.0},
        }
    ]


def test_schema_1_manifest_is_read_and_rewritten_byte_for_byte() -> None:
    raw = manifest_dict(schema=1)
    data = _encode(raw)
    manifest = Manifest.from_bytes(data)
    assert manifest.schema_version == 1
    assert [h.name for h in manifest.heads] == ["output"]
    assert manifest.heads[0].task.value == "classification"
    assert manifest.heads[0].labels == ["ok", "bad"]
    again = json.loads(manifest.to_bytes())
    assert "outputs" not in again
    assert "outputs" not in again["artifacts"][0]


def test_committed_schema_1_example_bundle_still_opens() -> None:
    from floorline.edge.bundle.bundle import Bundle  # noqa: PLC0415
    from floorline.edge.resources import example_bundle  # noqa: PLC0415

    with Bundle.open(example_bundle("pdm-classifier")) as bundle:
        assert bundle.manifest.schema_version == 1
        assert bundle.manifest.heads[0].labels


def test_two_head_manifest_round_trips() -> None:
    raw = manifest_dict()
    _two_heads(raw)
    manifest = Manifest.from_bytes(_encode(raw))
    assert [h.name for h in manifest.heads] == ["output", "rul"]
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest


def test_autoencoder_manifest_is_accepted() -> None:
    raw = manifest_dict()
    _autoencoder(raw)
    head = Manifest.from_bytes(_encode(raw)).heads[0]
    assert head.score is not None
    assert head.score.threshold == 0.25
    assert head.size == 24


def _heads_without_tensor_names(raw: Raw) -> None:
    _two_heads(raw)
    del raw["artifacts"][0]["outputs"]


def _duplicate_head(raw: Raw) -> None:
    _two_heads(raw)
    raw["outputs"][1]["name"] = "output"


def _reconstruction_of_other_shape(raw: Raw) -> None:
    _autoencoder(raw)
    raw["outputs"][0]["shape"] = [None, 4, 3]


def _reconstruction_without_score(raw: Raw) -> None:
    _autoencoder(raw)
    del raw["outputs"][0]["score"]


def _score_on_classifier(raw: Raw) -> None:
    raw["outputs"][0]["score"] = {"metric": "mse", "threshold": 1.0}


def _task_not_first_head(raw: Raw) -> None:
    raw["task"] = "regression"


def _v1_key_in_v2(raw: Raw) -> None:
    raw["output"] = manifest_dict(schema=1)["output"]


def _v2_key_in_v1(raw: Raw) -> None:
    raw["schema_version"] = 1


INVALID_V2: list[tuple[str, Callable[[Raw], None], list[str]]] = [
    ("heads without tensor names", _heads_without_tensor_names, ["one tensor per head"]),
    ("duplicate head names", _duplicate_head, ["head names must be unique"]),
    ("reconstruction shape", _reconstruction_of_other_shape, ["must equal the input"]),
    ("reconstruction without score", _reconstruction_without_score, ["needs a score"]),
    ("score on a classifier", _score_on_classifier, ["only an anomaly head"]),
    ("task is not the first head's", _task_not_first_head, ["first head's task"]),
    ("schema 1 key in schema 2", _v1_key_in_v2, ["no 'output'"]),
    ("schema 2 keys in schema 1", _v2_key_in_v1, ["'output' and no 'outputs'"]),
    ("head name not a slug", _set("outputs.0.name", "Fault Class"), ["outputs.0.name"]),
    ("units vs outputs", _set("outputs.0.units", ["h"]), ["1 units for 2 outputs"]),
    ("score metric", _set("outputs.0.score", {"metric": "rmse", "threshold": 1}), ["metric"]),
    ("negative score threshold", _set("outputs.0.score", {"metric": "mse", "threshold": -1}),
     ["threshold"]),
]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [pytest.param(m, e, id=i) for i, m, e in INVALID_V2],
)
def test_invalid_schema_2_manifest_is_refused(
    mutate: Callable[[Raw], None], expected: list[str]
) -> None:
    raw = manifest_dict()
    mutate(raw)
    message = _parse_error(raw)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"
