"""Model metadata: a small YAML model card, overridden by command-line flags.

The card says what the converter cannot read from the model: the task (or, for a model with
several outputs, one "head" per output), feature names and units, normalization, labels,
thresholds, units of regression outputs and how an autoencoder is scored. Everything the card can
check on its own is checked here, before TensorFlow is imported; only what needs the model's shapes
(window, feature count, output count) is checked later, against the model.

Every problem is a one-line ModelCardError that names the card key (``card outputs[1].labels``)
or the flag (``--name``) the value came from, the value, and what to write instead.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from floorline.converter.errors import ModelCardError
from floorline.edge.bundle.manifest import (
    Feature,
    FeatureBlock,
    FeatureStage,
    Normalization,
    SpeedChannel,
    Task,
)
from floorline.edge.stream.features import feature_names

_SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
)
_TASKS = ", ".join(t.value for t in Task)

FLAGS: dict[str, str] = {
    "name": "--name",
    "version": "--model-version",
    "task": "--task",
    "description": "--description",
    "window": "--window",
    "features": "--features",
    "labels": "--labels",
    "normalization.mean": "--norm-mean",
    "normalization.std": "--norm-std",
    "thresholds": "--threshold",
    "units": "--units",
    "score.metric": "--score-metric",
    "score.percentile": "--score-percentile",
    "score.threshold": "--score-threshold",
}
"""Card key → the flag that overrides it. ``load_card`` takes overrides by card key."""


class _ProblemError(ValueError):
    """A card rule broken at KEY (relative to the model being validated).

    ``text`` says what is wrong with the value; ``fix`` what to write instead in the card, and
    ``flag_fix`` the same for a value that came from a flag (defaults to ``fix``).
    """

    def __init__(self, key: str, text: str, fix: str, flag_fix: str | None = None) -> None:
        super().__init__(text)
        self.key = key
        self.text = text
        self.fix = fix
        self.flag_fix = flag_fix if flag_fix is not None else fix


def _suggest_slug(value: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", value.strip().lower())
    slug = re.sub(r"-{2,}", "-", slug).lstrip("._-").rstrip("-")[:64]
    return slug or "my-model"


def _suggest_semver(value: str) -> str:
    numbers = [str(int(n)) for n in re.findall(r"\d+", value)][:3]
    return ".".join(numbers + ["0"] * (3 - len(numbers))) if numbers else "1.0.0"


def _check_slug(key: str, value: str, what: str) -> str:
    if not _SLUG.fullmatch(value):
        good = _suggest_slug(value)
        raise _ProblemError(
            key,
            f"{value!r} is not a valid {what} (lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, at most 64)",
            f"write {{leaf}}: {good}",
            f"use {{flag}} {good}",
        )
    return value


def _names_str(value: Any) -> Any:
    # YAML reads `name: 2024` or `version: 1.0` as numbers; treat them as the text the user typed.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _unique(key: str, values: list[str], what: str) -> None:
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            raise _ProblemError(
                f"{key}[{i}]",
                f"{what} {value!r} appears twice",
                f"give every {what} a different name",
            )
        seen.add(value)


def _a(task: Task) -> str:
    return ("an " if task is Task.ANOMALY else "a ") + task.value


def _check_thresholds(
    task: Task, labels: list[str] | None, thresholds: dict[str, float], *, has_score: bool = False
) -> None:
    """Thresholds name labels (classification) or 'anomaly' (anomaly); regression has none."""
    if task is Task.REGRESSION:
        if thresholds:
            name, value = next(iter(thresholds.items()))
            raise _ProblemError(
                f"thresholds.{name}",
                f"{value} given, but a regression output has no thresholds",
                "remove thresholds",
                "drop --threshold",
            )
        return
    known = list(labels or []) if task is Task.CLASSIFICATION else ["anomaly"]
    for name in thresholds:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise _ProblemError(
                f"thresholds.{name}",
                f"{name!r} is not a label of this {task.value} output",
                f"{hint}thresholds name one of: {', '.join(known) or '(no labels)'}",
            )
    if task is Task.ANOMALY and "anomaly" not in thresholds and not has_score:
        raise _ProblemError(
            "thresholds.anomaly",
            "missing; an anomaly output needs the score above which it alarms",
            "write thresholds: {anomaly: 0.5}",
            "use --threshold anomaly=0.5",
        )


def _check_units(task: Task, units: list[str] | None) -> None:
    if units is not None and task is not Task.REGRESSION:
        raise _ProblemError(
            "units",
            f"{units!r} given for {_a(task)} output; units describe regression values only",
            "remove units",
            "drop --units",
        )


def _check_labels(task: Task, labels: list[str] | None) -> None:
    if task is Task.CLASSIFICATION:
        if not labels:
            raise _ProblemError(
                "labels",
                ("missing" if labels is None else "empty")
                + "; a classification output needs its class names in output order",
                "write labels: [healthy, faulty, ...]",
                "use --labels healthy,faulty,...",
            )
        _unique("labels", labels, "label")
    elif labels is not None:
        raise _ProblemError(
            "labels",
            f"{labels!r} given for {_a(task)} output; labels name classification classes only",
            "remove labels"
            + (" (units: gives the unit of each value)" if task is Task.REGRESSION else ""),
            "drop --labels",
        )


class _CardModel(BaseModel):
    # Unknown keys are errors (a typo must not be ignored); NaN or infinity in a threshold or a
    # normalization would poison every prediction and is refused by the manifest anyway.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class HeadCard(_CardModel):
    """One model output ("head"), in model output order."""

    name: str = Field(description="Head name, a slug like 'fault' or 'rul'.")
    task: Task = Field(description="classification, regression or anomaly.")
    labels: list[str] | None = Field(default=None, description="Class names (classification).")
    units: list[str] | None = Field(
        default=None, description="Unit of each output value (regression), e.g. ['h']."
    )
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Classification: per label; anomaly: {'anomaly': value}.",
    )

    @field_validator("name", mode="before")
    @classmethod
    def _name_text(cls, value: Any) -> Any:
        return _names_str(value)

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        return _check_slug("", value, "output name")

    @model_validator(mode="after")
    def _consistent(self) -> HeadCard:
        _check_labels(self.task, self.labels)
        _check_units(self.task, self.units)
        _check_thresholds(self.task, self.labels, self.thresholds)
        return self


class ScoreCard(_CardModel):
    """Anomaly scoring of an autoencoder (output shape == input shape): reconstruction error."""

    metric: Literal["mse", "mae"] = Field(
        default="mse", description="Reconstruction error per window: mean squared or absolute."
    )
    percentile: float | None = Field(
        default=None,
        description="Threshold = this percentile (0 < p < 100) of the calibration data's scores.",
    )
    threshold: float | None = Field(default=None, description="Explicit threshold (> 0).")

    @model_validator(mode="after")
    def _one_threshold(self) -> ScoreCard:
        if self.percentile is None and self.threshold is None:
            raise _ProblemError(
                "threshold",
                "missing; scoring needs a threshold or a percentile of the calibration scores",
                "write percentile: 99 (with --calibration data) or threshold: 0.1",
                "use --score-percentile 99 or --score-threshold 0.1",
            )
        if self.percentile is not None and self.threshold is not None:
            raise _ProblemError(
                "threshold",
                f"{self.threshold} given together with percentile {self.percentile}",
                "keep only one of percentile and threshold",
            )
        if self.percentile is not None and not 0 < self.percentile < 100:
            raise _ProblemError(
                "percentile",
                f"{self.percentile} is not between 0 and 100",
                "write a percentile like 99 or 99.9",
                "use --score-percentile 99",
            )
        if self.threshold is not None and not self.threshold > 0:
            # A reconstruction error is never negative: at 0 every window would be anomalous.
            raise _ProblemError(
                "threshold",
                f"{self.threshold} would flag every window; a reconstruction error is never "
                "negative",
                "write a threshold > 0",
            )
        return self


class FeatureStageCard(_CardModel):
    """``preprocessing:``: a feature stage; the manifest's ``input.preprocessing`` without names.

    With it, ``window`` and ``features`` describe the raw window (the sensor channels the gateway
    decodes), and ``normalization`` has one mean and std per computed feature.
    """

    sample_rate: float = Field(gt=0, description="Samples per second of the raw window (Hz).")
    speed: SpeedChannel | None = None
    blocks: list[FeatureBlock] = Field(min_length=1, max_length=64)


class ModelCard(_CardModel):
    """What a bundle's manifest says about the model beyond its artifacts."""

    name: str = Field(description="Bundle name, a lowercase slug like 'pdm-classifier'.")
    version: str = Field(default="0.1.0", description="Semantic version of this model.")
    task: Task | None = Field(
        default=None,
        description="classification, regression or anomaly; with outputs, the first head's.",
    )
    description: str = ""
    window: int | None = Field(
        default=None, description="Samples per window; must match the model's input shape."
    )
    features: list[Feature] | None = Field(
        default=None, description="Input features in model order, with units."
    )
    normalization: Normalization | None = Field(
        default=None, description="Per-feature mean and std applied on the gateway."
    )
    labels: list[str] | None = Field(default=None, description="Class names in output order.")
    thresholds: dict[str, float] = Field(default_factory=dict)
    units: list[str] | None = Field(
        default=None, description="Unit of each output value (regression), e.g. ['h']."
    )
    outputs: list[HeadCard] | None = Field(
        default=None, description="One entry per model output, in model output order."
    )
    score: ScoreCard | None = Field(
        default=None, description="Autoencoder scoring: the model reconstructs its input."
    )
    preprocessing: FeatureStageCard | None = Field(
        default=None, description="A feature stage: the model takes features of raw windows."
    )

    @field_validator("name", "version", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        return _names_str(value)

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        return _check_slug("", value, "bundle name")

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not _SEMVER.fullmatch(value):
            good = _suggest_semver(value)
            raise _ProblemError(
                "",
                f"{value!r} is not a semantic version (MAJOR.MINOR.PATCH)",
                f'write version: "{good}"',
                f"use {{flag}} {good}",
            )
        return value

    @field_validator("window")
    @classmethod
    def _window(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise _ProblemError(
                "",
                f"{value} is not a window length",
                "give the number of samples per window (1 or more), or leave it out",
            )
        return value

    @field_validator("features", mode="before")
    @classmethod
    def _feature_names(cls, value: Any) -> Any:
        # `features: [accel_x, accel_y]` is shorthand for names without units.
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("normalization", mode="before")
    @classmethod
    def _normalization(cls, value: Any) -> Any:
        # Checked here, on the raw values, so the message can point at the offending entry.
        if not isinstance(value, dict):
            return value
        for part in ("mean", "std"):
            if part not in value or value[part] is None:
                raise _ProblemError(
                    part,
                    "missing; normalization needs a mean and a std per feature",
                    "write normalization: {mean: [...], std: [...]}",
                    "pass both --norm-mean and --norm-std",
                )
        mean, std = value["mean"], value["std"]
        for part, numbers in (("mean", mean), ("std", std)):
            if not isinstance(numbers, list):
                raise _ProblemError(part, f"{numbers!r} is not a list", "write a list of numbers")
            for i, x in enumerate(numbers):
                if isinstance(x, bool) or not isinstance(x, (int, float)):
                    raise _ProblemError(
                        f"{part}[{i}]", f"{x!r} (value {i + 1}) is not a number", "write a number"
                    )
                if not math.isfinite(x):
                    raise _ProblemError(
                        f"{part}[{i}]", f"{x} (value {i + 1}) is not finite", "write a number"
                    )
                if part == "std" and not x > 0:
                    raise _ProblemError(
                        f"std[{i}]",
                        f"{x} (value {i + 1}) is not > 0; dividing by it would break every "
                        "prediction",
                        "write the feature's standard deviation (> 0), e.g. 1.0",
                    )
        if len(mean) != len(std):
            raise _ProblemError(
                "std",
                f"{len(std)} values but mean has {len(mean)}",
                "give one mean and one std per feature",
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if self.preprocessing is not None:
            self.feature_stage()  # refuses a stage that does not fit the raw window
        if self.features is not None:
            _unique("features", [f.name for f in self.features], "feature")
            if (
                self.preprocessing is None
                and self.normalization is not None
                and len(self.normalization.mean) != len(self.features)
            ):
                raise _ProblemError(
                    "normalization.mean",
                    f"{len(self.normalization.mean)} values for {len(self.features)} features",
                    "give one mean and one std per feature, in feature order",
                )
        if self.outputs is not None:
            self._check_heads(self.outputs)
        else:
            self._check_single_head()
        return self

    def feature_stage(self) -> FeatureStage | None:
        """The manifest's feature stage (names computed), or None; _ProblemError if it is wrong."""
        card = self.preprocessing
        if card is None:
            return None
        if self.window is None or not self.features:
            raise _ProblemError(
                "preprocessing",
                "a feature stage reads raw windows",
                "give window: (samples per raw window) and features: (the sensor channels, in "
                "the order the gateway decodes them)",
            )
        channels = [f.name for f in self.features]
        try:
            draft = FeatureStage.model_construct(
                sample_rate=card.sample_rate, speed=card.speed, blocks=card.blocks, names=[]
            )
            stage = FeatureStage(
                sample_rate=card.sample_rate,
                speed=card.speed,
                blocks=card.blocks,
                names=feature_names(draft, channels),
            )
            stage.check(channels, self.window)
        except (ValueError, ValidationError) as exc:
            text = str(exc) if not isinstance(exc, ValidationError) else exc.errors()[0]["msg"]
            raise _ProblemError(
                "preprocessing", text.removeprefix("Value error, "),
                "fix the stage (see docs/bundles.md#features)",
            ) from exc
        return stage

    def _check_heads(self, heads: list[HeadCard]) -> None:
        if not heads:
            raise _ProblemError(
                "outputs",
                "is empty",
                "list one entry per model output, or remove outputs for a single-output model",
            )
        for key, value in (
            ("labels", self.labels),
            ("thresholds", self.thresholds),
            ("units", self.units),
        ):
            if value:
                raise _ProblemError(
                    key,
                    f"{value!r} given next to outputs; with outputs, each output has its own",
                    f"move them under outputs[i].{key}",
                    f"drop {{flag}} and write them under outputs[i].{key} in the card",
                )
        if self.score is not None:
            raise _ProblemError(
                "score",
                "given next to outputs; scoring applies to a single-output autoencoder",
                "remove score, or remove outputs and make the model an autoencoder",
                "drop the --score-* flags",
            )
        seen: dict[str, int] = {}
        for i, head in enumerate(heads):
            if head.name in seen:
                raise _ProblemError(
                    f"outputs[{i}].name",
                    f"{head.name!r} is also the name of outputs[{seen[head.name]}]",
                    "give every output a different name",
                )
            seen[head.name] = i
        first = heads[0].task
        if self.task is None:
            self.task = first
        elif self.task is not first:
            raise _ProblemError(
                "task",
                f"{self.task.value!r} but outputs[0] ({heads[0].name}) is {first.value}; "
                "the bundle's task is its first output's",
                "remove task (it defaults to outputs[0].task) or put the main output first",
                "drop --task",
            )

    def _check_single_head(self) -> None:
        if self.task is None:
            raise _ProblemError(
                "task",
                "missing",
                f"write task: one of {_TASKS} (or outputs: with one entry per model output)",
                f"use --task with one of {_TASKS}",
            )
        task = self.task
        if self.score is not None:
            if task is not Task.ANOMALY:
                raise _ProblemError(
                    "score",
                    f"given for {_a(task)} model; scoring is for anomaly autoencoders",
                    "remove score, or set task: anomaly",
                    "drop the --score-* flags, or use --task anomaly",
                )
            if "anomaly" in self.thresholds:
                raise _ProblemError(
                    "thresholds.anomaly",
                    f"{self.thresholds['anomaly']} given next to score; score sets the threshold",
                    "remove thresholds and write score: {threshold: ...} instead",
                    "drop --threshold anomaly=... and use --score-threshold",
                )
        _check_labels(task, self.labels)
        _check_units(task, self.units)
        if task is Task.ANOMALY and "anomaly" not in self.thresholds and self.score is None:
            raise _ProblemError(
                "thresholds.anomaly",
                "missing; an anomaly model needs the score above which it alarms",
                "write thresholds: {anomaly: 0.5}, or a score: section for an autoencoder",
                "use --threshold anomaly=0.5, or --score-percentile/--score-threshold for an "
                "autoencoder",
            )
        _check_thresholds(task, self.labels, self.thresholds, has_score=self.score is not None)

    @property
    def heads(self) -> list[HeadCard]:
        """The card's outputs; a single-output card as one head named 'output'."""
        if self.outputs is not None:
            return list(self.outputs)
        task = self.task or Task.REGRESSION  # never None: the validator sets or requires it
        return [
            HeadCard.model_construct(
                name="output",
                task=task,
                labels=self.labels,
                units=self.units,
                thresholds=dict(self.thresholds),
            )
        ]


# --- loading and error messages ---------------------------------------------------------------

_KEYS: dict[str, list[str]] = {
    "": list(ModelCard.model_fields),
    "outputs[]": list(HeadCard.model_fields),
    "score": list(ScoreCard.model_fields),
    "features[]": list(Feature.model_fields),
    "normalization": list(Normalization.model_fields),
    "preprocessing": list(FeatureStageCard.model_fields),
    "preprocessing.blocks[]": list(FeatureBlock.model_fields),
    "preprocessing.speed": list(SpeedChannel.model_fields),
}


def _join(parts: list[str | int]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part:
            out += f".{part}" if out else part
    return out


def _split_key(key: str) -> list[str | int]:
    return [
        int(piece[1:-1]) if piece.startswith("[") else piece
        for piece in re.findall(r"[^.\[\]]+|\[\d+\]", key)
    ]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe_builtin(err: ErrorDetails, key: str) -> tuple[str, str]:  # noqa: PLR0911 - a table
    """(what is wrong, what to write instead) for one of pydantic's own errors, in our words."""
    kind, value = err["type"], err.get("input")
    if kind == "missing":
        return "missing", f"write {key.rsplit('.', 1)[-1]}: ..."
    if kind == "extra_forbidden":
        context = re.sub(r"\[\d+\]", "[]", key.rpartition(".")[0])
        known = _KEYS.get(context, [])
        leaf = key.rpartition(".")[2]
        near = difflib.get_close_matches(leaf, known, n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        return "is not a card key", f"{hint}the keys here are: {', '.join(known)}"
    if kind == "enum" or (kind == "literal_error" and key.endswith("metric")):
        choices = _TASKS if kind == "enum" else "mse, mae"
        near = difflib.get_close_matches(str(value), choices.split(", "), n=1)
        return (
            f"{_show(value)} is not one of {choices}",
            f"write {{leaf}}: {near[0] if near else choices}",
        )
    if kind == "string_type":
        if isinstance(value, bool):
            return (
                f"{value} is not text (YAML reads yes/no/on/off/true/false as booleans)",
                "quote it: 'yes'",
            )
        return f"{_show(value)} is not text", "write a string"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{_show(value)} is not a whole number", "write an integer like 64"
    if kind in ("float_type", "float_parsing"):
        return f"{_show(value)} is not a number", "write a number like 0.5"
    if kind == "finite_number":
        return f"{_show(value)} is not finite", "write a finite number"
    if kind == "list_type":
        return f"{_show(value)} is not a list", "write a YAML list like [a, b]"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"{_show(value)} is not a mapping", "write key: value pairs"
    if kind in ("string_too_short", "too_short"):
        return f"{_show(value)} is empty", "give it a value, or leave the key out"
    return (
        f"{_show(value)} is not valid ({err['msg'].lower()})",
        "check the value against the model card keys",
    )


def _flag_for(key: str, from_flags: set[str], in_card: set[str] | None) -> str | None:
    """The flag KEY's value came from, if it came from a flag (IN_CARD: the card's own keys)."""
    best: str | None = None
    for given in from_flags:
        matches = key == given or key.startswith((given + ".", given + "["))
        if matches and (best is None or len(given) > len(best)):
            best = given
    if best is not None:
        return FLAGS.get(best) or FLAGS.get(best.split(".", 1)[0])
    top = re.split(r"[.\[]", key, maxsplit=1)[0]
    flagged = any(re.split(r"[.\[]", g, maxsplit=1)[0] == top for g in from_flags)
    if in_card is None or (top not in in_card and flagged):
        # No card at all, or a section the card lacks that flags started: the flag is at fault.
        return FLAGS.get(key) or _GROUP_FLAGS.get(key) or _GROUP_FLAGS.get(top) or FLAGS.get(top)
    return None


_GROUP_FLAGS = {
    "score": "--score-percentile/--score-threshold",
    "normalization": "--norm-mean/--norm-std",
}


def _message(err: ErrorDetails, from_flags: set[str], in_card: set[str] | None) -> str:
    loc = [p for p in err["loc"] if isinstance(p, (str, int))]
    problem = err.get("ctx", {}).get("error") if err["type"] == "value_error" else None
    if isinstance(problem, _ProblemError):
        key = _join([*loc, *_split_key(problem.key)])
        text, fix, flag_fix = problem.text, problem.fix, problem.flag_fix
    else:
        key = _join(loc)
        text, fix = _describe_builtin(err, key)
        flag_fix = fix
    flag = _flag_for(key, from_flags, in_card)
    leaf = re.sub(r"\[\d+\]$", "", key.rpartition(".")[2])
    if flag is not None:
        return f"{flag}: {text}; {flag_fix.replace('{flag}', flag).replace('{leaf}', leaf)}"
    fix = fix.replace("{flag}", FLAGS.get(key, "the flag")).replace("{leaf}", leaf)
    return f"card {key}: {text}; {fix}"


def _merge(data: dict[str, Any], key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if not rest:
        if isinstance(value, dict) and isinstance(data.get(head), dict):
            data[head] = {**data[head], **value}
        else:
            data[head] = value
        return
    inner = data.get(head)
    if not isinstance(inner, dict):
        inner = {}
    data[head] = inner
    _merge(inner, rest, value)


def load_card(
    path: Path | None, overrides: dict[str, Any], defaults: dict[str, Any] | None = None
) -> ModelCard:
    """Read the YAML card at PATH (if any) and apply non-None OVERRIDES on top.

    OVERRIDES are keyed by card key (see FLAGS), dotted for nested keys
    (``normalization.mean``, ``score.percentile``); ``thresholds`` and nested keys are merged
    into the card's, the rest replace it. DEFAULTS (top-level keys) fill what neither the card nor
    a flag sets: what the model itself knows (a scikit-learn classifier's classes). Raises a
    one-line ModelCardError.
    """
    data: dict[str, Any] = {}
    in_card: set[str] | None = None
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ModelCardError(f"--card {path}: cannot read it: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ModelCardError(f"--card {path}: not a text file: {exc.reason}") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ModelCardError(
                f"--card {path}: not valid YAML{where}: {problem}; fix the YAML syntax"
            ) from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ModelCardError(
                f"--card {path}: a model card must be a YAML mapping (name: ..., task: ...), "
                f"not a {type(loaded).__name__}"
            )
        data.update(loaded or {})
        in_card = {str(k) for k in data}
    from_flags: set[str] = set()
    for key, value in overrides.items():
        if value is None:
            continue
        _merge(data, key, value)
        if key == "thresholds" and isinstance(value, dict):
            from_flags.update(f"thresholds.{name}" for name in value)
        else:
            from_flags.add(key)
    defaults = dict(defaults or {})
    model_task = getattr(defaults.get("task"), "value", defaults.get("task"))
    card_task = getattr(data.get("task"), "value", data.get("task"))
    if model_task is not None and card_task is not None and card_task != model_task:
        if "classification" in (card_task, model_task):
            where = "--task" if "task" in from_flags else "card task"
            raise ModelCardError(
                f"{where}: {card_task}, but the model is a {model_task} model; leave task out "
                "(the model says it)"
            )
        # The model's thresholds are for its own task, not the one the card gives it.
        defaults.pop("thresholds", None)
    if "score" in data:
        # A score sets an autoencoder's threshold; the model's default one would be blamed.
        defaults.pop("thresholds", None)
    if "preprocessing" in data:
        # The model's own feature names are the stage's outputs, not the raw sensor channels.
        defaults.pop("features", None)
    for key, value in defaults.items():
        if value is not None and key not in data and not (key != "task" and "outputs" in data):
            data[key] = value
    if "name" not in data:
        if path is None:
            raise ModelCardError("--name: missing; use --name my-model (or a --card with name:)")
        raise ModelCardError("card name: missing; write name: my-model (or use --name my-model)")
    try:
        return ModelCard.model_validate(data)
    except ValidationError as exc:
        raise ModelCardError(_message(exc.errors()[0], from_flags, in_card)) from exc
