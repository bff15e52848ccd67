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
from typing import Annotated, Any, Literal

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

SCHEMA_VERSION = 2
"""The manifest schema this version writes for a bundle without a feature stage."""
FEATURES_SCHEMA = 3
"""The schema of a bundle with a feature stage (``input.preprocessing``) or a drift reference
(``reference``).

Schema 2 with more keys: a gateway that reads only 2 would refuse them anyway (unknown keys are
errors), but with "extra inputs are not permitted"; schema 3 makes it say "upgrade the gateway".
Bundles without either stay schema 2, readable by every gateway since 0.2.
"""
READABLE_SCHEMAS = (1, 2, 3)
"""Schemas this version reads: 1 (one output, ``output``), 2 (heads, ``outputs``) and 3 (2 with a
feature stage or a drift reference)."""

_SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
)
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

ArtifactFormat = Literal["tflite", "onnx"]
Quantization = Literal["float32", "float16", "dynamic", "int8"]
SourceFormat = Literal["keras", "h5", "savedmodel", "sklearn"]
ScoreMetric = Literal["mse", "mae"]
FeatureType = Literal["stats", "bands", "envelope", "order_bands"]
StatName = Literal["rms", "peak", "crest", "kurtosis", "skewness"]


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


Band = tuple[float, float]


class FeatureBlock(_Strict):
    """One block of a feature stage; see floorline.edge.stream.features for the definitions."""

    type: FeatureType
    channels: list[str] | None = Field(
        default=None, description="Raw channels it reads (default: all but the speed channel)."
    )
    stats: list[StatName] | None = Field(
        default=None, description="stats: which statistics, in order (default all five)."
    )
    bands: list[Band] | None = Field(
        default=None,
        description="bands and envelope: [lo, hi) in Hz; order_bands: in orders of the shaft.",
    )
    band: Band | None = Field(
        default=None, description="envelope: the band [lo, hi) Hz demodulated (the resonance)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> FeatureBlock:
        if self.channels is not None and (
            not self.channels or len(set(self.channels)) != len(self.channels)
        ):
            raise ValueError("channels must name at least one channel, each once")
        if self.type == "stats":
            if self.bands is not None or self.band is not None:
                raise ValueError("a stats block has no bands")
            if self.stats is not None and len(set(self.stats)) != len(self.stats or [None]):
                raise ValueError("stats must name at least one statistic, each once")
            return self
        if self.stats is not None:
            raise ValueError(f"a {self.type} block has no stats")
        if not self.bands:
            raise ValueError(f"a {self.type} block needs bands: [[lo, hi], ...]")
        for lo, hi in [*self.bands, *([self.band] if self.band else [])]:
            if not 0 <= lo < hi:
                raise ValueError(f"band [{lo:g}, {hi:g}] must have 0 <= lo < hi")
        if (self.type == "envelope") != (self.band is not None):
            raise ValueError("band: (the demodulated band) belongs to an envelope block, and only")
        return self


class SpeedChannel(_Strict):
    """The raw channel holding the shaft speed, for order bands."""

    channel: str = Field(min_length=1)
    unit: Literal["Hz", "rpm"] = "Hz"


class FeatureStage(_Strict):
    """A feature stage (schema 3): raw windows become a feature vector before the model.

    The window stays raw (``input.shape``, ``input.features`` are the sensor channels the decoders
    fill); the model takes ``[null, len(names)]``, normalized by ``input.normalization`` (one
    mean and std per name) after the features are computed.
    """

    sample_rate: float = Field(gt=0, description="Samples per second of the raw window (Hz).")
    speed: SpeedChannel | None = None
    blocks: list[FeatureBlock] = Field(min_length=1, max_length=64)
    names: list[str] = Field(
        min_length=1, max_length=4096, description="The resulting features, in order."
    )

    def check(self, channels: list[str], window: int) -> None:
        """Raise ValueError if the stage does not fit windows of WINDOW samples of CHANNELS."""
        from floorline.edge.stream.features import feature_names  # noqa: PLC0415 - cycle

        nyquist = self.sample_rate / 2
        known = set(channels)
        if self.speed is not None and self.speed.channel not in known:
            raise ValueError(f"speed channel {self.speed.channel!r} is not an input feature")
        for i, block in enumerate(self.blocks):
            missing = sorted(set(block.channels or []) - known)
            if missing:
                raise ValueError(f"blocks[{i}]: channel(s) {', '.join(missing)} not in the input")
            if block.channels is None and not [c for c in channels if c != (
                self.speed.channel if self.speed else None
            )]:
                raise ValueError(f"blocks[{i}]: no channel to read but the speed channel")
            if block.type == "order_bands" and self.speed is None:
                raise ValueError(f"blocks[{i}]: order_bands need speed: {{channel: NAME}}")
            if block.type in ("bands", "envelope"):
                for lo, hi in [*(block.bands or []), *([block.band] if block.band else [])]:
                    if hi > nyquist:
                        raise ValueError(
                            f"blocks[{i}]: band [{lo:g}, {hi:g}] Hz goes above Nyquist "
                            f"({nyquist:g} Hz at sample_rate {self.sample_rate:g})"
                        )
            if block.type == "envelope" and block.bands:
                # The envelope of a band [lo, hi) holds frequencies below hi - lo only.
                width = block.band[1] - block.band[0] if block.band else 0.0
                if any(hi > width for _, hi in block.bands):
                    raise ValueError(
                        f"blocks[{i}]: envelope bands reach above the demodulated band's width "
                        f"({width:g} Hz): widen band or lower bands"
                    )
        if window < 2:
            raise ValueError("a feature stage needs windows of at least 2 samples")
        expected = feature_names(self, channels)
        if self.names != expected:
            raise ValueError(
                f"names must be the {len(expected)} features the blocks compute, in order "
                f"(first difference: {_first_difference(self.names, expected)})"
            )


def _first_difference(have: list[str], want: list[str]) -> str:
    for i, (a, b) in enumerate(zip(have, want, strict=False)):
        if a != b:
            return f"names[{i}] is {a!r}, expected {b!r}"
    return f"{len(have)} names for {len(want)} features"


class InputSpec(_Strict):
    """The model input: a window of samples, each a vector of named features."""

    shape: list[int | None] = Field(
        description="Tensor shape with the batch dimension first as null, e.g. [null, 64, 3]."
    )
    dtype: Literal["float32"] = "float32"
    window: int = Field(ge=1, description="Samples per window (1 for per-sample models).")
    features: list[Feature] = Field(min_length=1)
    normalization: Normalization | None = None
    preprocessing: FeatureStage | None = Field(
        default=None,
        description="Schema 3: a feature stage between the raw window and the model.",
    )

    @property
    def model_shape(self) -> list[int | None]:
        """The model's input tensor shape: the raw window's, or [null, features] after a stage."""
        if self.preprocessing is not None:
            return [None, len(self.preprocessing.names)]
        return list(self.shape)

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
        if self.preprocessing is not None:
            if len(self.shape) != 3:
                raise ValueError("a feature stage needs windows: shape [null, window, channels]")
            try:
                self.preprocessing.check([f.name for f in self.features], self.window)
            except ValueError as exc:
                raise ValueError(f"preprocessing: {exc}") from exc
            width = len(self.preprocessing.names)
            if self.normalization and len(self.normalization.mean) != width:
                raise ValueError(
                    "normalization must have one mean and std per feature of the stage's names "
                    "(it applies after the features)"
                )
        elif self.normalization and len(self.normalization.mean) != len(self.features):
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


class ReconstructionScore(_Strict):
    """How the gateway scores an autoencoder head: the error of its reconstruction of the input.

    The score of a window is the mean squared (``mse``) or absolute (``mae``) difference between
    the model's input (after normalization) and its reconstruction, over every sample and feature;
    each feature's share of it says where the window departs from normal.
    """

    metric: ScoreMetric
    # A reconstruction error is never negative: a threshold of 0 would flag every window.
    threshold: float = Field(gt=0, description="A window scoring at or above it is anomalous.")
    percentile: float | None = Field(
        default=None,
        gt=0,
        lt=100,
        description="The percentile of calibration-data scores the threshold was set at, if so.",
    )


class Head(_Strict):
    """One model output ("head") and how to read it (schema 2).

    Shape ``[null, k]``: k values per window. Shape ``[null, window, features]`` with a ``score``:
    an autoencoder's reconstruction of its input, scored on the gateway.
    """

    name: str = Field(min_length=1, max_length=64)
    task: Task
    shape: list[int | None]
    labels: list[str] | None = Field(default=None, description="Class names (classification).")
    units: list[str] | None = Field(default=None, description="Unit of each value (regression).")
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Decision thresholds: per label for classification, 'anomaly' for anomaly.",
    )
    score: ReconstructionScore | None = None

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _SLUG.fullmatch(value):
            raise ValueError("must be lowercase letters, digits, '.', '_' or '-' (max 64)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Head:
        if not self.shape or self.shape[0] is not None or len(self.shape) not in (2, 3):
            raise ValueError("shape must be [null, outputs] or [null, window, features]")
        if any(d is None or d < 1 for d in self.shape[1:]):
            raise ValueError("every dimension but the batch must be a positive integer")
        if len(self.shape) == 3 and self.score is None:
            raise ValueError("a [null, window, features] head is a reconstruction: needs a score")
        if self.score is not None and self.task is not Task.ANOMALY:
            raise ValueError("only an anomaly head has a reconstruction score")
        width = self.shape[-1]
        if self.labels is not None and len(self.labels) != width:
            raise ValueError(f"{len(self.labels)} labels for {width} outputs")
        if self.units is not None and len(self.units) != width:
            raise ValueError(f"{len(self.units)} units for {width} outputs")
        if self.task is Task.CLASSIFICATION and not self.labels:
            raise ValueError("a classification head needs labels")
        if self.task is Task.ANOMALY and self.score is None and "anomaly" not in self.thresholds:
            raise ValueError("an anomaly head needs thresholds.anomaly or a score")
        # A threshold the gateway never reads would silently never fire.
        known = {
            Task.CLASSIFICATION: self.labels or [],
            Task.REGRESSION: [],
            Task.ANOMALY: [] if self.score is not None else ["anomaly"],
        }[self.task]
        if unknown := sorted(set(self.thresholds) - set(known)):
            raise ValueError(
                f"thresholds {', '.join(unknown)} name nothing this {self.task.value} head "
                f"outputs ({', '.join(known) or 'it takes no thresholds'})"
            )
        return self

    @property
    def size(self) -> int:
        """Values per window in the model's output (the reconstruction's W * F)."""
        size = 1
        for d in self.shape[1:]:
            size *= int(d or 1)
        return size


class Tolerance(_Strict):
    """The bounds a parity check enforced; null means not enforced."""

    max_abs_error: float | None = None
    min_agreement: float | None = None


class HeadParity(_Strict):
    """One head's share of a parity check (schema 2)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=True)

    max_abs_error: float
    top1_agreement: float | None = None
    agreeing: int | None = Field(default=None, description="Windows whose top-1 class agreed.")
    score_max_abs_error: float | None = Field(
        default=None, description="Reconstruction heads: the anomaly scores' max difference."
    )
    verdict_agreement: float | None = Field(
        default=None, description="Reconstruction heads: share of windows judged the same."
    )


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
    heads: dict[str, HeadParity] | None = Field(
        default=None, description="Per head, when the model has several or scores on the gateway."
    )


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
    outputs: list[str] | None = Field(
        default=None,
        description="Schema 2: the artifact's output tensor names, in head order (null: its only "
        "output).",
    )
    quantized_tensors: int | None = Field(
        default=None, description="Weight tensors actually stored quantized (quantized artifacts)."
    )


class SourceInfo(_Strict):
    """Where the artifacts came from."""

    format: SourceFormat
    name: str
    sha256: Sha256



DriftStatistic = Literal["mean", "std", "class", "value"]


class ReferenceHistogram(_Strict):
    """One statistic's distribution on the reference data: counts in bins split at ``edges``.

    Bin i holds the values v with edges[i-1] <= v < edges[i] (the first and last bins are open),
    so ``len(counts) == len(edges) + 1``. Input statistics are per window and per input feature:
    ``mean`` and ``std`` of its raw samples (``std`` only for windows of 2 samples or more).
    Output statistics are per head: ``class`` (a classification head's top-1 class index, one
    bin per class) or ``value`` (an anomaly score, a regression value: ``column`` of the head).
    """

    kind: Literal["input", "output"]
    name: str = Field(min_length=1, description="The input feature, or the head.")
    statistic: DriftStatistic
    column: int = Field(default=0, ge=0, description="Output value: which of the head's values.")
    edges: list[float] = Field(min_length=1, max_length=63)
    counts: list[int] = Field(min_length=2, max_length=64)

    @model_validator(mode="after")
    def _consistent(self) -> ReferenceHistogram:
        if any(not a < b for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges must increase strictly")
        if len(self.counts) != len(self.edges) + 1:
            raise ValueError(f"{len(self.counts)} counts for {len(self.edges)} edges (needs +1)")
        if any(c < 0 for c in self.counts) or not sum(self.counts):
            raise ValueError("counts must be >= 0 and not all 0")
        if (self.kind == "input") != (self.statistic in ("mean", "std")):
            raise ValueError(f"statistic {self.statistic} is not one of an {self.kind}")
        return self


class ReferenceSummary(_Strict):
    """What the calibration data looked like, for input drift detection on the gateway.

    Made by the converter (``floorline.converter.drift_summary``) from its data files; the
    gateway keeps the same histograms of live windows and compares (``floorline.edge.stream.
    drift``). Optional: a bundle without one runs with drift detection off.
    """

    data: str = Field(min_length=1, description="Which data: calibration and/or parity files.")
    windows: int = Field(ge=1, description="Windows summarized.")
    histograms: list[ReferenceHistogram] = Field(min_length=1, max_length=4096)


def _model_shape(spec: InputSpec) -> list[int | None]:
    return spec.model_shape[1:]


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
    output: OutputSpec | None = Field(default=None, description="Schema 1 only: the one output.")
    outputs: list[Head] | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Schema 2: every head, in the model's order.",
    )
    artifacts: list[Artifact] = Field(min_length=1)
    golden: GoldenInfo
    reference: ReferenceSummary | None = Field(
        default=None, description="Calibration data's summary, for input drift detection."
    )

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value not in READABLE_SCHEMAS:
            raise ValueError(
                f"schema version {value} is not supported by this Floorline "
                f"(it reads versions {', '.join(map(str, READABLE_SCHEMAS))}); upgrade the "
                "gateway or re-convert"
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
        if self.schema_version == 1:
            self._check_v1()
        else:
            self._check_v2()
        if self.input.preprocessing is not None and self.schema_version < FEATURES_SCHEMA:
            raise ValueError(
                f"input.preprocessing (a feature stage) needs schema_version {FEATURES_SCHEMA}"
            )
        if self.reference is not None and self.schema_version < FEATURES_SCHEMA:
            raise ValueError(f"reference (a drift summary) needs schema_version {FEATURES_SCHEMA}")
        return self

    def _check_v1(self) -> None:
        if self.output is None or self.outputs is not None:
            raise ValueError("a schema 1 manifest has 'output' and no 'outputs'")
        if any(a.outputs is not None or a.quantized_tensors is not None for a in self.artifacts):
            raise ValueError("artifacts of a schema 1 manifest have no 'outputs'")
        if self.task is Task.CLASSIFICATION and not self.output.labels:
            raise ValueError("a classification model needs output labels")
        if self.task is Task.ANOMALY and "anomaly" not in self.output.thresholds:
            raise ValueError("an anomaly model needs output.thresholds.anomaly")

    def _check_v2(self) -> None:
        if self.outputs is None or self.output is not None:
            raise ValueError("a schema 2 manifest has 'outputs' and no 'output'")
        names = [h.name for h in self.outputs]
        if len(set(names)) != len(names):
            raise ValueError("head names must be unique")
        if self.task is not self.outputs[0].task:
            raise ValueError("task must be the first head's task")
        for head in self.outputs:
            if head.score is not None and head.shape[1:] != _model_shape(self.input):
                raise ValueError(
                    f"head {head.name}: a reconstruction's shape {head.shape} must equal the "
                    f"input's {self.input.shape}"
                )
        for art in self.artifacts:
            # One head may leave it out (the artifact's only output); several must name theirs.
            named = 1 if art.outputs is None and len(names) == 1 else len(art.outputs or [])
            if named != len(names):
                raise ValueError(f"{art.file}: 'outputs' must name one tensor per head")
            if art.outputs is not None and len(set(art.outputs)) != len(art.outputs):
                raise ValueError(f"{art.file}: 'outputs' names a tensor twice")

    @property
    def heads(self) -> list[Head]:
        """Every head, in the model's output order (a schema 1 manifest has one)."""
        if self.outputs is not None:
            return list(self.outputs)
        assert self.output is not None  # noqa: S101 - _check_v1 guarantees it
        # Validated already, by schema 1's rules (which a copy with a changed task may bend).
        return [
            Head.model_construct(
                name=self.output.name,
                task=self.task,
                shape=self.output.shape,
                labels=self.output.labels,
                thresholds=self.output.thresholds,
            )
        ]

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes: sorted keys, so the same manifest always signs the same.

        A schema 1 manifest is written with schema 1's keys only, so re-writing one (a fleet
        store copying it) keeps the bytes an older gateway understands.
        """
        if self.schema_version == 1:
            exclude: dict[str, Any] = {
                "outputs": True,
                "artifacts": {"__all__": {"outputs", "quantized_tensors"}},
            }
            data = self.model_dump(mode="json", exclude=exclude)
            for art in data["artifacts"]:
                if art.get("parity") is not None:
                    art["parity"].pop("heads", None)
        else:
            data = self.model_dump(mode="json", exclude={"output"})
        if self.input.preprocessing is None:
            # Absent, not null: a schema 2 manifest keeps the bytes every schema 2 gateway reads.
            data["input"].pop("preprocessing", None)
        if self.reference is None:  # absent, not null: the bytes older gateways read
            data.pop("reference", None)
        text = json.dumps(data, indent=2, sort_keys=True)
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
