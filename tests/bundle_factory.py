"""Build valid bundles for container-format tests, without TensorFlow or any real model.

The artifact is random bytes named ``model.tflite``: nothing here runs it. These bundles exercise
hashing, signing, archiving and manifest validation only; bundles of real models come from the
converter and are tested there.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floorline.edge.bundle.bundle import GOLDEN_FILE, Golden, commit, describe_artifact, staging_dir
from floorline.edge.bundle.hashing import sha256_file
from floorline.edge.bundle.manifest import SCHEMA_VERSION, Manifest

ARTIFACT_FILE = "model.tflite"
LABELS = ["ok", "bad"]
WINDOW = 8
FEATURES = ["accel_x", "accel_y", "accel_z"]
SAMPLES = 4
FAKE_SHA = "0" * 64

ARTIFACT_FIELDS: dict[str, Any] = {
    "format": "tflite",
    "quantization": "float32",
    "selftest_atol": 1e-4,
}


def make_golden(seed: int = 0) -> Golden:
    """Small golden arrays shaped like the manifest below: inputs (4, 8, 3), outputs (4, 2)."""
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((SAMPLES, WINDOW, len(FEATURES))).astype(np.float32)
    source = rng.random((SAMPLES, len(LABELS))).astype(np.float32)
    return Golden(inputs=inputs, source_outputs=source, expected={ARTIFACT_FILE: source.copy()})


def write_artifact(directory: Path, name: str = ARTIFACT_FILE, *, seed: int = 0) -> Path:
    """A fake model file: 256 seeded random bytes."""
    path = directory / name
    path.write_bytes(np.random.default_rng(seed).bytes(256))
    return path


def manifest_dict(
    *,
    artifacts: list[dict[str, Any]] | None = None,
    golden_sha256: str = FAKE_SHA,
    schema: int = SCHEMA_VERSION,
) -> dict[str, Any]:
    """A raw manifest document that validates: a 2-class classifier on 8x3 windows.

    SCHEMA 1 is the first format (one ``output``), which gateways keep reading.
    """
    if artifacts is None:
        artifacts = [{"file": ARTIFACT_FILE, "sha256": FAKE_SHA, "size": 256, **ARTIFACT_FIELDS}]
    raw = {
        "schema_version": schema,
        "name": "vibration-demo",
        "version": "1.0.0",
        "task": "classification",
        "description": "fake model for container tests",
        "created_at": "2024-01-01T00:00:00Z",
        "converter_version": "0.1.0",
        "source": {"format": "keras", "name": "model.keras", "sha256": "1" * 64},
        "input": {
            "shape": [None, WINDOW, len(FEATURES)],
            "dtype": "float32",
            "window": WINDOW,
            "features": [{"name": f, "unit": "g"} for f in FEATURES],
            "normalization": {"mean": [0.0] * len(FEATURES), "std": [1.0] * len(FEATURES)},
        },
        "outputs": [
            {
                "name": "output",
                "task": "classification",
                "shape": [None, len(LABELS)],
                "labels": list(LABELS),
                "thresholds": {"bad": 0.5},
            }
        ],
        "artifacts": copy.deepcopy(artifacts),
        "golden": {"file": GOLDEN_FILE, "sha256": golden_sha256, "samples": SAMPLES},
    }
    if schema == 1:
        head = raw.pop("outputs")[0]
        del head["task"]
        raw["output"] = head
    return raw


def stage_files(staging: Path, *, golden_bytes: bytes | None = None, seed: int = 0) -> None:
    """Write the fake artifact and golden.npz (or the given raw golden bytes) into STAGING."""
    write_artifact(staging, seed=seed)
    if golden_bytes is None:
        make_golden(seed).save(staging / GOLDEN_FILE)
    else:
        (staging / GOLDEN_FILE).write_bytes(golden_bytes)


def manifest_for(staging: Path, **overrides: Any) -> Manifest:
    """A manifest whose hashes match the files staged by :func:`stage_files`.

    OVERRIDES replace top-level manifest keys (e.g. ``version="2.0.0"``).
    """
    artifact = describe_artifact(staging, ARTIFACT_FILE, **ARTIFACT_FIELDS)
    raw = manifest_dict(
        artifacts=[artifact.model_dump(mode="json")],
        golden_sha256=sha256_file(staging / GOLDEN_FILE),
    )
    raw.update(overrides)
    return Manifest.model_validate(raw)


def make_bundle(
    dest: Path,
    *,
    signing_key: Ed25519PrivateKey | None = None,
    golden_bytes: bytes | None = None,
    seed: int = 0,
    **manifest_overrides: Any,
) -> Path:
    """Commit a valid bundle directory at DEST (signed when SIGNING_KEY is given); return DEST.

    GOLDEN_BYTES replaces golden.npz with arbitrary bytes that are still hashed into the manifest,
    so a test can reach the golden loader past the integrity check.
    """
    with staging_dir(dest) as staging:
        stage_files(staging, golden_bytes=golden_bytes, seed=seed)
        manifest = manifest_for(staging, **manifest_overrides)
        return commit(staging, dest, manifest, signing_key=signing_key)
