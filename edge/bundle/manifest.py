"""The bundle manifest: the contract between the converter and the gateway.

The manifest describes everything a gateway needs to turn sensor samples into model inputs and model
outputs into predictions, without the source model: the input window and feature order with units
and normalization, the output labels and thresholds, and each artifact with its hash, quantization
and the parity it showed against the source model at conversion time.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from floorline.edge.errors import ManifestError

SCHEMA_VERSION = 1
"""The manifest schema this version writes and reads. Bump on any incompatible change."""

_SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
)
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

ArtifactFormat = Literal["tflite", "onnx"]
Quantization = Literal["float32", "float16", "dynamic", "int8"]
SourceFormat = Literal["keras", "h5", "savedmodel"]


class Task(str, Enum):
    """What the model predicts; decides how outputs are encoded into predictions."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    ANOMALY = "anomaly"


class _Strict(BaseModel):
    # Unknown keys are errors: a manifest from a newer converter must not be half-understood.
    # NaN or infinity in a normalization or threshold would poison every prediction silently.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_file_name(value: str) -> str:
    # Bundles are flat: a file name with a separator could point outside the bundle directory.
    if not _FILE.fullmatch(value):
        raise ValueError(f"{value!r} is not a plain file name (letters, digits, '.', '_', '-')")
    return value


def _check_sha256(value: str) -> str:
    if not _SHA256.fullmatch(value):
        raise ValueError("must be 64 lowercase hex digits")
    return value


FileName = Annotated[str, AfterValidator(_check_file_name)]
Sha256 = Annotated[str, AfterValidator(_check_sha256)]


class Feature(_Strict):
    """One input feature, in the order the model expects it."""

    name: str = Field(min_length=1, description="Feature name, e.g. 'accel_x'.")
    unit: str = Field(default="", description="Physical unit of the raw value, e.g. 'g' or 'degC'.")


class Normalization(_Strict):
    """Per-feature standardisation the gateway applies before inference: (x - mean) / std."""

    mean: list[float]
    std: list[float]

    @field_validator("std")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(not s > 0 for s in value):
            raise ValueError("every std must be > 0")
        return value

    @model_validator(mode="after")
    def _same_length(self) -> Normalization:
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        return self


class InputSpec(_Strict):
    """The model input: a window of samples, each a vector of named features."""

    shape: list[int | None] = Field(
        description="Tensor shape with the batch dimension first as null, e.g. [null, 64, 3]."
    )
    dtype: Literal["float32"] = "float32"
    window: int = Field(ge=1, description="Samples per window (1 for per-sample models).")
    features: list[Feature] = Field(min_length=1)
    normalization: Normalization | None = None

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        if len(self.shape) not in (2, 3) or self.shape[0] is not None:
            raise ValueError("shape must be [null, features] or [null, window, features]")
        dims = self.shape[1:]
        if any(d is None or d < 1 for d in dims):
            raise ValueError("every dimension but the batch must be a positive integer")
        if dims[-1] != len(self.features):
            raise ValueError(
                f"last dimension {dims[-1]} does not match {len(self.features)} features"
            )
        expected_window = dims[0] if len(dims) == 2 else 1
        if self.window != expected_window:
            raise ValueError(f"window {self.window} does not match shape {self.shape}")
        if self.normalization and len(self.normalization.mean) != len(self.features):
            raise ValueError("normalization must have one mean and std per feature")
        return self


class OutputSpec(_Strict):
    """The model output and how to read it."""

    name: str = Field(default="output", min_length=1)
    shape: list[int | None]
    labels: list[str] | None = Field(
        default=None, description="Class names in output order (classification)."
    )
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Decision thresholds: per label for classification, 'anomaly' for anomaly.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> OutputSpec:
        out = self.shape[1] if len(self.shape) == 2 else None
        if len(self.shape) != 2 or self.shape[0] is not None or out is None or out < 1:
            raise ValueError("shape must be [null, outputs]")
        if self.labels is not None and len(self.labels) != self.shape[1]:
            raise ValueError(f"{len(self.labels)} labels for {self.shape[1]} outputs")
        return self


class Tolerance(_Strict):
    """The bounds a parity check enforced; null means not enforced."""

    max_abs_error: float | None = None
    min_agreement: float | None = None


class ParityReport(_Strict):
    """How an artifact compared with the source model on held-out inputs at conversion time."""

    # A failed comparison may be infinite (the artifact produced NaN); it is reported, not stored.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=True)

    backend: str
    samples: int = Field(ge=1)
    max_abs_error: float
    mean_abs_error: float
    top1_agreement: float | None = None
    tolerance: Tolerance
    passed: bool


class Artifact(_Strict):
    """One runnable model file in the bundle."""

    file: FileName
    format: ArtifactFormat
    quantization: Quantization
    sha256: Sha256
    size: int = Field(ge=1)
    opset: int | None = Field(default=None, description="ONNX opset, for ONNX artifacts.")
    selftest_atol: float = Field(
        gt=0, description="Largest difference from golden expected outputs a gateway accepts."
    )
    parity: ParityReport | None = None


class SourceInfo(_Strict):
    """Where the artifacts came from."""

    format: SourceFormat
    name: str
    sha256: Sha256



class GoldenInfo(_Strict):
    """golden.npz: seeded inputs, the source model's outputs and each artifact's own outputs."""

    file: FileName = "golden.npz"
    sha256: Sha256
    samples: int = Field(ge=1)


class Manifest(_Strict):
    """manifest.json of a bundle."""

    schema_version: int
    name: str
    version: str
    task: Task
    description: str = ""
    created_at: str
    converter_version: str
    source: SourceInfo
    input: InputSpec
    output: OutputSpec
    artifacts: list[Artifact] = Field(min_length=1)
    golden: GoldenInfo

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(
                f"schema version {value} is not supported by this Floorline "
                f"(it reads version {SCHEMA_VERSION}); upgrade the gateway or re-convert"
            )
        return value

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _SLUG.fullmatch(value):
            raise ValueError("must be lowercase letters, digits, '.', '_' or '-' (max 64)")
        return value

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not _SEMVER.fullmatch(value):
            raise ValueError(f"{value!r} is not a semantic version like 1.2.0")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        files = [a.file for a in self.artifacts] + [self.golden.file]
        if len(set(files)) != len(files):
            raise ValueError("artifact and golden file names must be unique")
        if self.task is Task.CLASSIFICATION and not self.output.labels:
            raise ValueError("a classification model needs output labels")
        if self.task is Task.ANOMALY and "anomaly" not in self.output.thresholds:
            raise ValueError("an anomaly model needs output.thresholds.anomaly")
        return self

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes: sorted keys, so the same manifest always signs the same."""
        text = json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)
        return (text + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, origin: str = "manifest.json") -> Manifest:
        """Parse and validate manifest bytes; every problem becomes a ManifestError."""
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, huge ints, deep nesting
            raise ManifestError(f"{origin}: not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ManifestError(f"{origin}: must hold a JSON object")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ManifestError(f"{origin}: {_describe(exc)}") from exc


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{where}: {err['msg']}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
