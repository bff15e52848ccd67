"""The gateway's YAML configuration, as strict pydantic models.

Unknown keys and wrong types are errors that name the file and line (``load_config``), and an
unknown key comes with the nearest valid one. So is a key that the rest of the config would make
ineffective (a payload asset path while the asset comes from the topic, a gap limit on samples
without timestamps, an MQTT 5 option on MQTT 3.1.1): nothing is silently ignored. What only the
model bundle can tell is checked when a pipeline is built (``fit.check_fit``), and those errors
name the file and line too (``Config.pipeline_error``). Secrets are never required in the YAML: a
broker password comes from an environment variable or a file (for example a systemd credential),
and relative paths are taken relative to the config file.

A validator's message that starts with a key (``"decoder.asset: ..."``, relative to the model
that raised it) is reported at that key's line.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import string
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from floorline.edge.backends import BACKENDS
from floorline.edge.capture.config import LABEL_TOPIC, CaptureField
from floorline.edge.decoders import DecoderConfig
from floorline.edge.delivery.outbox import OutboxConfig
from floorline.edge.errors import (
    BackendError,
    BundleError,
    ConfigError,
    FloorlineError,
    SelfTestError,
)
from floorline.edge.mqtt.topics import (
    matches,
    shared_filter_error,
    shared_group,
    shared_subscription_filter,
)
from floorline.edge.outputs import MqttOutputConfig, OutputConfig
from floorline.edge.resources import EXAMPLE_PREFIX, example_bundle
from floorline.edge.service.metrics import MetricsConfig
from floorline.edge.stream.batch import BatchConfig
from floorline.edge.stream.drift import ALERT_TOPIC as DRIFT_ALERT_TOPIC
from floorline.edge.stream.drift import STATS_TOPIC as DRIFT_STATS_TOPIC
from floorline.edge.stream.drift import DriftConfig
from floorline.edge.stream.window import WindowConfig

_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class _Source:
    """Where a config came from: for messages that name the file and line."""

    origin: str
    node: yaml.Node | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _check_filter(value: str) -> str:
    # MQTT topic filter rules: '#' only last and alone in its level, '+' alone in its level.
    if not value or len(value.encode()) > 65535 or "\x00" in value:
        raise ValueError(f"{value!r} is not a valid MQTT topic filter")
    levels = value.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"{value!r}: '#' must be a whole last level")
        if "+" in level and level != "+":
            raise ValueError(f"{value!r}: '+' must be a whole level")
    return value


def _check_template(value: str, names: tuple[str, ...]) -> str:
    # Filled with str.format when publishing: an unknown placeholder would be a KeyError then.
    try:
        used = [field for _, field, _, _ in string.Formatter().parse(value) if field is not None]
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a topic template: {exc}") from None
    allowed = ", ".join("{" + n + "}" for n in names)
    for field in used:
        if field not in names:
            raise ValueError(f"{value!r}: unknown placeholder {{{field}}}; this topic may use "
                             f"{allowed}")
    try:
        topic = value.format(**dict.fromkeys(names, "x"))
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{value!r} is not a topic template: {exc}") from None
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise ValueError(f"{value!r}: a topic to publish on may not be empty or hold '+' or '#'")
    return value


def _template(*names: str) -> AfterValidator:
    return AfterValidator(lambda value: _check_template(value, names))


def _check_name(value: str) -> str:
    # Names end up in topic levels and metric labels: no MQTT wildcards or separators.
    if not _SLUG.fullmatch(value):
        raise ValueError("use letters, digits, '.', '_' or '-' (max 64), no '/', '+' or '#'")
    return value


Name = Annotated[str, AfterValidator(_check_name)]


class GatewayConfig(_Strict):
    """Who this gateway is."""

    id: Name = Field(description="Gateway id, used in topics and the client id, e.g. 'line1-gw01'.")



class TlsConfig(_Strict):
    """TLS to the broker. Any field set enables TLS."""

    ca_file: Path | None = Field(default=None, description="CA bundle; system CAs when unset.")
    cert_file: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    key_file: Path | None = Field(default=None, description="Client private key (mutual TLS).")
    insecure: bool = Field(
        default=False, description="Skip hostname verification. For lab brokers only."
    )

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class BrokerConfig(_Strict):
    """The MQTT broker connection."""

    host: str = Field(default="localhost", description="Broker host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="1883 plain, 8883 usually TLS.")
    protocol: Literal["3.1.1", "5"] = Field(default="5", description="MQTT protocol version.")
    client_id: str | None = Field(
        default=None, description="Client id; default 'floorline-<gateway id>'."
    )
    keepalive: int = Field(default=30, ge=5, le=3600, description="Keepalive in seconds.")
    username: str | None = Field(default=None, description="User name (not secret).")
    username_env: str | None = Field(
        default=None, description="Environment variable holding the user name."
    )
    password_env: str | None = Field(
        default=None, description="Environment variable holding the password."
    )
    password_file: Path | None = Field(
        default=None,
        description="File holding the password, e.g. $CREDENTIALS_DIRECTORY/mqtt-password.",
    )
    tls: TlsConfig | None = Field(default=None, description="TLS settings; omit for plain TCP.")
    clean_start: bool = Field(
        default=True,
        description="Start a fresh session. false (with session_expiry_s on MQTT 5) keeps a "
        "persistent session: the broker holds QoS 1 input for this gateway while it is away.",
    )
    session_expiry_s: int = Field(
        default=0, ge=0, description="MQTT 5: how long the broker keeps the session after a drop."
    )
    reconnect_min_s: float = Field(default=1.0, gt=0, description="First reconnect delay.")
    reconnect_max_s: float = Field(default=60.0, gt=0, description="Largest reconnect delay.")

    @model_validator(mode="after")
    def _one_secret_source(self) -> BrokerConfig:
        if self.password_env and self.password_file:
            raise ValueError("set password_env or password_file, not both")
        if self.username and self.username_env:
            raise ValueError("set username or username_env, not both")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        # The session options that one setting would make ineffective.
        if self.session_expiry_s and self.protocol != "5":
            raise ValueError("session_expiry_s: MQTT 5 only; with protocol 3.1.1 it would be "
                             "ignored (clean_start: false alone keeps the session)")
        if self.session_expiry_s and self.clean_start:
            raise ValueError("session_expiry_s: has no effect with clean_start: true (every "
                             "connect starts a fresh session); set clean_start: false to keep it")
        if self.protocol == "5" and not self.clean_start and not self.session_expiry_s:
            raise ValueError("clean_start: false keeps nothing on MQTT 5 without "
                             "session_expiry_s: the broker ends the session with the connection; "
                             "set session_expiry_s (seconds, e.g. 86400)")
        return self

    def credentials(self) -> tuple[str | None, str | None]:
        """(username, password) resolved from the environment and files, or raise ConfigError."""
        user = self.username
        if self.username_env:
            user = os.environ.get(self.username_env)
            if user is None:
                raise ConfigError(f"broker.username_env: ${self.username_env} is not set")
        password = None
        if self.password_env:
            password = os.environ.get(self.password_env)
            if password is None:
                raise ConfigError(f"broker.password_env: ${self.password_env} is not set")
        elif self.password_file:
            try:
                password = self.password_file.read_text().rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(
                    f"broker.password_file: cannot read {self.password_file}: {exc.strerror}"
                ) from exc
        if password is not None and user is None:
            raise ConfigError("broker: a password is configured but no username")
        return user, password


PREDICTION_PLACEHOLDERS = ("gateway", "pipeline", "asset")


class TopicsConfig(_Strict):
    """Topic templates. Placeholders: {gateway}, {pipeline}, {asset} (where each is listed)."""

    predictions: Annotated[str, _template(*PREDICTION_PLACEHOLDERS)] = Field(
        default="floorline/{gateway}/pred/{pipeline}/{asset}",
        description="Where predictions go, per pipeline and asset ({gateway}, {pipeline}, "
        "{asset}).",
    )
    dead_letter: Annotated[str, _template("gateway", "pipeline")] = Field(
        default="floorline/{gateway}/dlq/{pipeline}",
        description="Where rejected messages are reported (reason, topic, size; no payload); "
        "{gateway}, {pipeline}.",
    )
    state: Annotated[str, _template("gateway")] = Field(
        default="floorline/{gateway}/state",
        description="Retained gateway state; the last will sets it offline ({gateway}).",
    )
    stats: Annotated[str, _template("gateway")] = Field(
        default="floorline/{gateway}/stats",
        description="Compact JSON stats every metrics.stats_interval_s (for plants without "
        "Prometheus); {gateway}.",
    )
    drift: Annotated[str, _template("gateway", "pipeline")] = Field(
        default=DRIFT_STATS_TOPIC,
        description="Retained input drift measures of a pipeline with drift detection, every "
        "drift.interval_s ({gateway}, {pipeline}).",
    )
    alerts: Annotated[str, _template("gateway", "pipeline")] = Field(
        default=DRIFT_ALERT_TOPIC,
        description="One message when a pipeline (or an asset) starts to drift, one when it "
        "cleared ({gateway}, {pipeline}).",
    )
    capture_label: Annotated[str, _template("gateway")] = Field(
        default=LABEL_TOPIC,
        description="Subscribed with a capture block: operators label captured windows here "
        "({gateway}).",
    )


class AssetConfig(_Strict):
    """Where a message's asset key comes from: a topic level, or the payload (decoder's asset)."""

    topic_segment: int | None = Field(
        default=-2,
        description="Topic level index (0-based; negative counts from the end). "
        "plant/line1/pump-07/vibration with -2 gives 'pump-07'.",
    )
    payload: bool = Field(
        default=False,
        description="Take the asset from the payload: the json decoder's asset path or a csv "
        "'asset' column, one of which must then be configured (and is used only then).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> AssetConfig:
        if self.payload:
            if self.topic_segment is not None and "topic_segment" in self.model_fields_set:
                raise ValueError("topic_segment: set together with payload: true; the asset "
                                 "comes from one of them: remove the other")
            self.topic_segment = None
        if self.topic_segment is None and not self.payload:
            raise ValueError("set topic_segment or payload: true")
        return self


if TYPE_CHECKING:
    BackendName = str
else:  # the backend plugins (edge/backends/), so the schema lists what this install has
    _BACKEND_NAMES = ("auto", *BACKENDS)
    BackendName = Literal[_BACKEND_NAMES]


class ShadowConfig(_Strict):
    """A candidate model run beside the pipeline's on the same windows, compared and reported.

    It never affects the pipeline's own predictions (docs/config.md, "Shadow models").
    """

    bundle: Path = Field(
        description="The candidate's bundle: a directory or .tar (relative to this file), "
        "example:NAME, or sha256:<hex> from the fleet's bundle store (signed, as for the "
        "pipeline's bundle). It must take the pipeline model's input: the same window and "
        "features (its own normalization)."
    )
    artifact: str | None = Field(default=None, description="Artifact file; default by backend.")
    backend: BackendName = Field(default="auto", description="Runtime, as the pipeline's.")
    interpreter: Literal["auto", "ai_edge_litert", "tflite_runtime"] = Field(
        default="auto", description="TFLite interpreter module for the litert backend."
    )
    threads: int = Field(default=1, ge=1, le=64, description="Runtime threads for inference.")
    every: int = Field(
        default=1, ge=1, le=1_000_000,
        description="Run the shadow on one batch in N (a slower candidate costs the worker its "
        "inference time on those batches only).",
    )
    report_interval_s: float = Field(
        default=30.0, ge=0.1, le=86400,
        description="How often the comparison is published (retained, on report_topic).",
    )
    report_topic: Annotated[str, _template("gateway", "pipeline")] = Field(
        default="floorline/{gateway}/shadow/{pipeline}",
        description="Where the retained comparison report goes ({gateway}, {pipeline}).",
    )
    publish_predictions: bool = Field(
        default=False,
        description="Also publish the shadow's predictions (QoS 0, marked \"shadow\": true).",
    )
    topic: Annotated[str, _template(*PREDICTION_PLACEHOLDERS)] = Field(
        default="floorline/{gateway}/shadow/{pipeline}/{asset}",
        description="Where shadow predictions go with publish_predictions ({gateway}, "
        "{pipeline}, {asset}).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ShadowConfig:
        if "topic" in self.model_fields_set and not self.publish_predictions:
            raise ValueError("topic: set, but publish_predictions is false, so no shadow "
                             "prediction is published and it would be ignored")
        if self.backend == "onnx" and self.interpreter != "auto":
            raise ValueError("interpreter: chooses the TFLite interpreter of the litert backend; "
                             "with backend: onnx it would be ignored")
        return self


class PipelineConfig(_Strict):
    """One stream: subscriptions → decoder → windows → batches → model → predictions."""

    name: Name = Field(description="Pipeline name, used in topics and metrics.")
    subscribe: list[str] = Field(min_length=1, description="MQTT topic filters to subscribe to.")
    qos: Literal[0, 1, 2] = Field(default=1, description="Subscription QoS.")
    bundle: Path = Field(
        description="Bundle directory or .tar (relative to this file), or example:NAME for a "
        "bundle shipped with floorline (`floorline examples` lists them)."
    )
    artifact: str | None = Field(default=None, description="Artifact file; default by backend.")
    backend: BackendName = Field(
        default="auto",
        description="Runtime: auto takes the first artifact whose runtime is installed, TFLite on "
        "LiteRT (float32 first), then ONNX Runtime; litert or onnx insist on one.",
    )
    interpreter: Literal["auto", "ai_edge_litert", "tflite_runtime"] = Field(
        default="auto", description="TFLite interpreter module for the litert backend."
    )
    threads: int = Field(default=1, ge=1, le=64, description="Runtime threads for inference.")
    decoder: DecoderConfig
    asset: AssetConfig = Field(default_factory=AssetConfig)
    window: WindowConfig = Field(default_factory=WindowConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    output: OutputConfig = Field(
        default_factory=MqttOutputConfig,
        description="Where predictions go; `type` selects the output (default mqtt).",
    )
    ack: Literal["receipt", "durable"] = Field(
        default="receipt",
        description="When input is acknowledged to the broker. receipt: on arrival (a crash "
        "loses the partial windows held in memory). durable: once what a message contributes "
        "is safe (its predictions in the outbox, its samples in the window journal); needs QoS 1, "
        "sequence numbers and a persistent session.",
    )
    labels: list[str] | None = Field(default=None, description="Override the bundle's labels.")
    thresholds: dict[str, float] | None = Field(
        default=None, description="Override the bundle's thresholds."
    )
    shadow: ShadowConfig | None = Field(
        default=None,
        description="A candidate bundle run beside this pipeline's on the same windows, compared "
        "and reported (docs/config.md, Shadow models); it never affects the predictions.",
    )
    workers: int = Field(
        default=1, ge=1, le=8,
        description="Processes that run this pipeline's stages (decode, windows, inference). 1: "
        "a thread in the daemon (the default, least memory). N > 1: N worker processes, each "
        "asset always on the same one (docs/workers.md); receipt mode only.",
    )
    drift: DriftConfig = Field(
        default_factory=DriftConfig,
        description="Input drift detection against the bundle's calibration summary "
        "(docs/monitoring.md#drift).",
    )
    share_dispatch: Literal["round_robin", "sticky"] = Field(
        default="round_robin",
        description="How the broker spreads a `$share/<group>/...` subscription's messages over "
        "the gateways in the group (docs/scale-out.md). round_robin: any message may go to any "
        "gateway, so a pipeline whose windows span messages (one sample per message, or "
        "window.hop) is refused. sticky: every message of an asset reaches the same gateway "
        "(e.g. EMQX shared_subscription_strategy = hash_topic with the asset in the topic); "
        "trusted, and logged once as an assumption.",
    )
    capture: CaptureField = Field(
        default=None,
        description="Keep raw windows on disk for retraining: sampled, around alerts, low "
        "confidence, labelled by operators over MQTT (docs/monitoring.md, Data capture). "
        "Declared after workers: it needs workers: 1.",
    )

    @field_validator("subscribe")
    @classmethod
    def _filters(cls, value: list[str]) -> list[str]:
        for v in value:
            if (error := shared_filter_error(v)) is not None:
                raise ValueError(error)
        return [_check_filter(v) for v in value]

    def shared_filters(self) -> list[str]:
        """The ``$share/<group>/...`` filters among ``subscribe``."""
        return [f for f in self.subscribe if shared_group(f) is not None]

    def spanning_reason(self) -> str | None:
        """Why this pipeline's windows surely span messages, or None when the config cannot tell.

        Only the config is read: how many samples a binary, csv or json-block message holds is
        the sender's choice, so for those the answer is None (``Generation`` warns instead).
        """
        if self.decoder.type == "sparkplug":
            # Births and data are separate messages, and a node's seq runs over all of them.
            return ("sparkplug decoder: a node's births define the aliases and seq its data is "
                    "read with, and they are other messages than the data")
        if self.window.hop is not None:
            return "window.hop: overlapping windows take samples from two messages"
        if self.decoder.type == "json" and getattr(self.decoder, "samples", None) is None:
            return "json decoder without samples: one sample per message"
        return None

    def workers_reason(self) -> str | None:
        """Why ``workers > 1`` cannot run this pipeline, or None (docs/workers.md)."""
        if self.workers == 1:
            return None
        refusals = [
            (self.ack == "durable",
             "ack: durable needs workers: 1 (worker processes run in receipt mode only)"),
            (self.asset.payload,
             ("asset.payload: true needs workers: 1: the daemon sends each message to a "
              "worker by the asset in its topic")),
            (self.shadow is not None,
             "shadow: needs workers: 1 (shadow models run in the daemon's thread only)"),
            (self.threads > 1,
             "threads: > 1 needs workers: 1 (each worker process infers on one thread)"),
            ("sparkplug" in (self.decoder.type, getattr(self.output, "type", None)),
             "sparkplug decoders and outputs need workers: 1 (they keep node sessions)"),
        ]
        return next((reason for refused, reason in refusals if refused), None)

    @model_validator(mode="after")
    def _workers(self) -> PipelineConfig:
        if (reason := self.workers_reason()) is not None:
            raise ValueError(f"workers: {self.workers}: {reason}")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        # Keys that the rest of the pipeline would make ineffective, or could never satisfy.
        # Each message starts with the key it is about, so the error points at its line.
        decoder, window = self.decoder, self.window
        if decoder.names_asset() and not self.asset.payload:
            key, fix = _ASSET_KEYS.get(decoder.type, ("decoder", "remove it"))
            raise ValueError(
                f"{key}: names the asset in the payload, but asset.payload is not true, so the "
                f"asset comes from the topic (asset.topic_segment: {self.asset.topic_segment}) "
                f"and {key} would be ignored; set asset: {{payload: true}}, or {fix}"
            )
        if self.asset.payload and not decoder.names_asset():
            raise ValueError(
                "asset.payload: true, but the decoder names no asset (json: decoder.asset; "
                "csv: an 'asset' column; binary payloads carry none): every message would be "
                "dead-lettered (bad_asset)"
            )
        if (window.max_gap_s is not None and "max_gap_s" in window.model_fields_set
                and decoder.has_timestamps() is False):
            raise ValueError(
                "window.max_gap_s: set, but the decoder gives the samples no timestamps (json: "
                "decoder.timestamp; csv: a 'timestamp' column; binary: a header), so it would be "
                "ignored"
            )
        if not decoder.has_sequence():
            for name in ("max_seq_gap", "max_seq_rewind"):
                if getattr(window, name) is not None and name in window.model_fields_set:
                    raise ValueError(
                        f"window.{name}: set, but the samples carry no sequence numbers (json: "
                        "decoder.sequence; csv: a 'sequence' column; binary: header "
                        "timestamp_sequence), so it would be ignored"
                    )
        if self.backend == "onnx" and self.interpreter != "auto":
            raise ValueError("interpreter: chooses the TFLite interpreter of the litert backend; "
                             "with backend: onnx it would be ignored")
        if self.batch.max_batch == 1 and self.batch.max_wait_ms and (
                "max_wait_ms" in self.batch.model_fields_set):
            raise ValueError("batch.max_wait_ms: has no effect with max_batch: 1 (every window "
                             "is inferred alone, at once)")
        if isinstance(self.output, MqttOutputConfig) and self.output.topic is not None:
            try:
                _check_template(self.output.topic, PREDICTION_PLACEHOLDERS)
            except ValueError as exc:
                raise ValueError(f"output.topic: {exc}") from None
        if self.ack == "durable":
            # Each requirement closes one way to lose or double-count input across a restart;
            # the broker's side is checked by Config.
            if self.qos < 1:
                raise ValueError("qos: ack: durable needs qos 1 or 2")
            if not decoder.has_sequence():
                raise ValueError(
                    "ack: durable needs sequence numbers in the input (decoder sequence / "
                    "header timestamp_sequence / a 'sequence' column) so redelivered messages "
                    "are recognised"
                )
        self._check_sharing()
        return self

    def _check_sharing(self) -> None:
        # A round-robin shared subscription hands each gateway some of an asset's messages: a
        # window that needs samples from several messages would be built from whichever reached
        # this gateway (or cut at every gap). One line: what is wrong, then the fixes.
        shared = self.shared_filters()
        if not shared:
            if "share_dispatch" in self.model_fields_set:
                raise ValueError("share_dispatch: set, but no subscribe filter is a "
                                 "$share/<group>/... shared subscription, so it would be ignored")
            return
        why = self.spanning_reason()
        if self.share_dispatch == "round_robin" and self.decoder.type == "sparkplug":
            raise ValueError(
                f"subscribe: {shared[0]!r} is a round-robin shared subscription, but the "
                "sparkplug decoder needs every message of an edge node (births define the "
                "aliases and seq its data is read with), so births would reach one gateway and "
                "data another; subscribe without $share/ and give each gateway its own edge "
                "nodes, or set share_dispatch: sticky if the broker sends all of a client's "
                "messages to one gateway (EMQX shared_subscription_strategy = hash_clientid); "
                "docs/sparkplug.md#input"
            )
        if self.share_dispatch == "round_robin" and why is not None:
            raise ValueError(
                f"subscribe: {shared[0]!r} is a round-robin shared subscription but this "
                f"pipeline's windows span messages ({why}), so each gateway would get only some "
                "of an asset's samples; fix: send blocks of whole windows with tumbling windows "
                "(no window.hop), or subscribe without $share/ and give each gateway its own "
                "assets' topics, or set share_dispatch: sticky if the broker sends all of an "
                "asset's messages to one gateway (EMQX shared_subscription_strategy = "
                "hash_topic); docs/scale-out.md"
            )


# Per decoder type: the key that names the asset in the payload, and how to stop it doing so.
_ASSET_KEYS = {
    "json": ("decoder.asset", "remove decoder.asset"),
    "csv": ("decoder.columns", "name that column '_'"),
}


class LimitsConfig(_Strict):
    """Bounds that keep a gateway alive under bad or excessive input."""

    max_payload_bytes: int = Field(
        default=256 * 1024, ge=16, description="Larger messages are dead-lettered unread."
    )
    inbox_size: int = Field(
        default=20000, ge=10, description="Messages queued per pipeline; beyond, new ones drop."
    )
    inbox_bytes: int = Field(
        default=2 * 1024 * 1024,
        ge=4096,
        description="Memory queued messages may take per `ack: receipt` pipeline, counted as "
        "payload plus 128 bytes each; beyond, new ones drop (a message always fits an empty "
        "inbox). Durable pipelines are bounded by inbox_size (MQTT 5: the receive maximum).",
    )
    max_packet_bytes: int = Field(
        default=1024 * 1024,
        ge=64,
        description="MQTT 5 Maximum Packet Size: the broker never sends larger messages.",
    )
    drain_timeout_s: float = Field(
        default=5.0, ge=0, description="On shutdown, how long workers may finish queued work."
    )
    overload: Literal["shed_assets", "drop_newest"] = Field(
        default="shed_assets",
        description="What an `ack: receipt` pipeline does when its inbox fills faster than it "
        "drains. shed_assets: drop all the input of a few assets (chosen by a stable hash of the "
        "asset key, as few as needed, for as long as needed) so the others keep whole windows; "
        "counted as `shed`. drop_newest: drop each new message that does not fit, whichever its "
        "asset (every drop breaks that asset's window). Durable pipelines never shed: the "
        "broker's flow control (MQTT 5 Receive Maximum) holds their input back instead.",
    )


class LoggingConfig(_Strict):
    """Log output."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class TrustConfig(_Strict):
    """Which bundle signatures a gateway accepts."""

    trusted_keys: list[str] = Field(
        default_factory=list,
        description="Public keys: file paths (PEM or base64) relative to this file.",
    )
    require_signature: bool = Field(
        default=False, description="Refuse unsigned bundles (recommended in production)."
    )


class FleetConfig(_Strict):
    """Remote config and bundle pushes over MQTT (signed by an operator key this file trusts)."""

    enabled: bool = Field(default=False, description="Accept desired-state pushes.")
    operator_keys: list[str] = Field(
        default_factory=list,
        description="Operator public keys (files relative to this file, or base64) whose "
        "signatures on desired-state documents are accepted.",
    )
    groups: list[Name] = Field(
        default_factory=list, description="Groups this gateway belongs to (group pushes)."
    )
    probation_s: float = Field(
        default=60.0, ge=0, description="After a switch, how long health is watched."
    )
    max_dead_letter_ratio: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="During probation, a larger share of dead-lettered input rolls back.",
    )
    min_probation_messages: int = Field(
        default=20, ge=1, description="Input needed before the dead-letter share is judged."
    )
    max_inference_failures: int = Field(
        default=0, ge=0, description="During probation, more failed inferences roll back."
    )
    store_max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024, description="Bundle store size before clean-up."
    )
    max_clock_skew_s: float = Field(
        default=300.0, ge=0, description="Tolerated clock difference to the operator."
    )
    bundle_fetch_timeout_s: float = Field(
        default=60.0, gt=0, description="How long to wait for a pushed bundle to arrive."
    )
    history: int = Field(
        default=10, ge=1, le=100, description="Apply results reported (kept across restarts)."
    )
    attributes: dict[Name, str] = Field(
        default_factory=dict,
        description="This gateway's attributes (site, line, hardware...), matched by selector "
        "pushes and reported; the automatic floorline, runtimes and machine are added unless "
        "set here.",
    )
    report_interval_s: float = Field(
        default=30.0, gt=0, description="The reported state (with health) is re-published at "
        "least this often."
    )

    @field_validator("attributes", mode="before")
    @classmethod
    def _attribute_values(cls, value: object) -> object:
        # `line: 3` in YAML is a number; selectors compare strings.
        if isinstance(value, dict):
            return {k: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
                    for k, v in value.items()}
        return value


PUSHABLE_SECTIONS = frozenset({"pipelines", "limits", "logging"})
"""What a fleet push may change. Identity, broker, trust, fleet and storage stay local: a push
must never be able to cut a gateway off its broker or make it trust another key."""


def _topic_collisions(config: Config) -> Iterator[str]:
    """Why two of the gateway's own topics are one (or one is read as input), if they are.

    The templates are checked as rendered for this gateway and its pipelines: a retained drift
    document on the state topic would replace the gateway's state, alerts on the drift topic
    would be replaced by the next measure, a label topic on an input topic would take the input
    (its route comes first). Topics in use only: drift ones with a pipeline's drift on, the
    label topic with a ``capture`` block.
    """
    t, gw = config.topics, config.gateway.id
    defaults = TopicsConfig()
    drifting = [p for p in config.pipelines if p.drift.enabled]
    capturing = any(p.capture is not None for p in config.pipelines)
    for key, value in t.model_dump().items():
        if value.startswith("$"):
            yield (f"topics.{key}: {value!r} starts with '$', which is the broker's ($SYS, "
                    f"$share): choose another, e.g. the default {getattr(defaults, key)!r}")
    if "{pipeline}" not in t.drift and len(drifting) > 1:
        yield (f"topics.drift: {t.drift!r} has no {{pipeline}}, and pipelines "
                f"{', '.join(p.name for p in drifting)} detect drift: their retained measures "
                "would replace each other on one topic; add {pipeline}")
    # key -> {topic: the pipeline it is rendered for, or None}
    own: dict[str, dict[str, str | None]] = {
        "state": {t.state.format(gateway=gw): None},
        "stats": {t.stats.format(gateway=gw): None},
        "dead_letter": {t.dead_letter.format(gateway=gw, pipeline=name): name
                        for name in ["_unrouted", *(p.name for p in config.pipelines)]},
        "drift": {t.drift.format(gateway=gw, pipeline=p.name): p.name for p in drifting},
        "alerts": {t.alerts.format(gateway=gw, pipeline=p.name): p.name for p in drifting},
    }
    if capturing:
        own["capture_label"] = {t.capture_label.format(gateway=gw): None}
    fleet = {f"floorline/{gw}/desired": "the fleet's desired-state topic",
             f"floorline/{gw}/reported": "the fleet's reported-state topic",
             "floorline/groups/+/desired": "the fleet's group desired-state topics",
             "floorline/selectors/+/desired": "the fleet's selector desired-state topics",
             "floorline/bundles/+": "the fleet's bundle topics"}

    def said(key: str, topic: str) -> str:
        pipeline = own[key][topic]
        return f"topics.{key} ({topic}" + (f", pipeline {pipeline})" if pipeline else ")")

    def change(key: str) -> str:
        return f"give topics.{key} its own topic, e.g. the default {getattr(defaults, key)!r}"

    keys = list(own)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            for topic in own[a].keys() & own[b].keys():
                yield (f"topics.{a} and topics.{b} are the same topic: {said(a, topic)} and "
                        f"{said(b, topic)}; {change(b)}")
    for key, topics in own.items():
        for topic in topics:
            for fleet_filter, what in fleet.items():
                if matches(fleet_filter, topic):
                    yield f"{said(key, topic)} is {what}; {change(key)}"
    for p in config.pipelines:
        template = (p.output.topic if isinstance(p.output, MqttOutputConfig) else None) or (
            t.predictions)
        # Any asset name may come in: '+' stands for it.
        predictions = template.format(gateway=gw, pipeline=p.name, asset="+")
        for key, topics in own.items():
            for topic in topics:
                if matches(predictions, topic):
                    yield (f"pipeline {p.name}: its predictions' topic {template!r} can be "
                            f"{said(key, topic)} (an asset of that name); {change(key)}")
        for topic_filter in p.subscribe:
            plain = shared_subscription_filter(topic_filter)
            for key, topics in own.items():
                for topic in topics:
                    if matches(plain, topic):
                        taken = ("the label commands would be read as its input, or its input "
                                 "as label commands" if key == "capture_label"
                                 else "the gateway would read its own messages as input")
                        yield (f"pipeline {p.name}: subscribe {topic_filter!r} covers "
                                f"{said(key, topic)}: {taken}; {change(key)}, or narrow the "
                                "subscription")


class Config(_Strict):
    """A gateway configuration file."""

    gateway: GatewayConfig
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
    trust: TrustConfig = Field(default_factory=TrustConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    state_dir: Path | None = Field(
        default=None,
        description="Where the outbox and window journal live. Default: $STATE_DIRECTORY "
        "(set by systemd's StateDirectory=), else 'floorline-state' beside this file.",
    )
    pipelines: list[PipelineConfig] = Field(min_length=1)

    _source: _Source | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Config:
        context = info.context if isinstance(info.context, dict) else {}
        source = context.get("source")
        self._source = source if isinstance(source, _Source) else None
        names = [p.name for p in self.pipelines]
        if len(set(names)) != len(names):
            raise ValueError("pipeline names must be unique")
        for i, p in enumerate(self.pipelines):
            if p.ack == "durable" and (self.broker.clean_start or (
                    self.broker.protocol == "5" and not self.broker.session_expiry_s)):
                raise ValueError(
                    f"pipelines.{i}.ack: durable (pipeline {p.name}) needs broker.clean_start: "
                    "false (and session_expiry_s on MQTT 5) so the broker keeps unacknowledged "
                    "input"
                )
        if self.broker.protocol != "5" and "max_packet_bytes" in self.limits.model_fields_set:
            raise ValueError("limits.max_packet_bytes: MQTT 5 only; with broker.protocol "
                             "3.1.1 it would be ignored")
        if (why := next(_topic_collisions(self), None)) is not None:
            raise ValueError(why)
        return self

    def with_desired(self, desired: dict[str, Any], origin: str = "desired state") -> Config:
        """A copy of this config with a push's sections replaced, validated like a file."""
        if not isinstance(desired, dict):
            raise ConfigError(f"{origin}: config must be a mapping")
        if extra := sorted(set(desired) - PUSHABLE_SECTIONS):
            hints = [f"{near!r} for {key!r}" for key in extra
                     if (near := _suggest(key, sorted(PUSHABLE_SECTIONS), bare=True))]
            raise ConfigError(
                f"{origin}: a push may set only {', '.join(sorted(PUSHABLE_SECTIONS))}; "
                f"not {', '.join(extra)}" + (f"; did you mean {', '.join(hints)}?" if hints else "")
            )
        # Only what was set: a default written out would read as set, and a key that is refused
        # when set to no effect (an MQTT 5 option on 3.1.1, say) would refuse every push.
        data = self.model_dump(mode="json", exclude_unset=True)
        data.update(desired)
        try:
            return Config.model_validate(data, context={"source": _Source(origin, None)})
        except ValidationError as exc:
            _, where, message = _describe(exc.errors()[0])
            raise ConfigError(f"{origin}: {where}: {message}") from exc

    def locate(self, index: int, key: str | None = None) -> str:
        """Where pipeline INDEX is configured: ``gateway.yaml:41: pipelines[1] (vibration)``.

        With KEY (dotted, relative to the pipeline, e.g. ``decoder.fields``) the line is that
        key's, when the file sets it.
        """
        source = self._source or _Source("<config>", None)
        parts: list[int | str] = ["pipelines", index]
        if key:
            parts += [int(k) if k.isdigit() else k for k in key.split(".")]
        line = _line_of(source.node, tuple(parts))
        where = f"{source.origin}:{line}" if line else source.origin
        name = self.pipelines[index].name if index < len(self.pipelines) else "?"
        return f"{where}: pipelines[{index}] ({name})"

    def pipeline_error(self, index: int, error: FloorlineError) -> FloorlineError:
        """ERROR, met building pipeline INDEX, as the same kind of error naming where it is.

        The message gets the file, the line and the pipeline (``locate``): the line of the key
        the message starts with (``decoder.fields: ...``), else of the key the kind of error is
        about (``bundle``, ``artifact`` or ``backend``), else of the pipeline entry.
        """
        message = str(error)
        key = _leading_key(message, PipelineConfig)
        if key is None:
            key = self._key_of(index, error)
        located = f"{self.locate(index, key)}: {message}"
        try:
            return type(error)(located)
        except TypeError:  # an error class with another signature
            return ConfigError(located)

    @contextlib.contextmanager
    def building(self, index: int) -> Iterator[None]:
        """Errors raised inside, while building pipeline INDEX, name the file, line and pipeline.

        ``floorline check`` builds each pipeline under it, and so should whatever builds
        pipelines to run them, so both report a bad pipeline in the same words.
        """
        try:
            yield
        except FloorlineError as exc:
            raise self.pipeline_error(index, exc) from exc

    def _key_of(self, index: int, error: FloorlineError) -> str | None:
        if isinstance(error, BundleError):
            return "bundle"
        if isinstance(error, (BackendError, SelfTestError)) and index < len(self.pipelines):
            return "artifact" if self.pipelines[index].artifact else "backend"
        return None

    def resolved_state_dir(self) -> Path:
        """The state directory in use (see ``state_dir``)."""
        if self.state_dir is not None:
            return self.state_dir
        env = os.environ.get("STATE_DIRECTORY")
        if env:
            return Path(env.split(":")[0])
        return Path("floorline-state")

    def client_id(self) -> str:
        """The MQTT client id: configured, or derived from the gateway id."""
        return self.broker.client_id or f"floorline-{self.gateway.id}"


_KEY = re.compile(r"([A-Za-z_]\w*(?:\.[\w-]+)*): (.*)", re.DOTALL)
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def _leading_key(message: str, model: type[BaseModel] | None) -> str | None:
    """The dotted key MESSAGE starts with (``"decoder.asset: ..."``) if MODEL has that field."""
    match = _KEY.fullmatch(message)
    if match is None or model is None:
        return None
    key = match.group(1)
    return key if key.split(".")[0] in model.model_fields else None


def _unwrap(tp: Any) -> Any:
    # Annotated[X, ...] -> X; X | None -> X. A union of several models stays a union.
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _walk(loc: tuple[int | str, ...]) -> tuple[list[int | str], type[BaseModel] | None]:
    """LOC without union tags (they are not YAML keys), and the model LOC ends in, if any."""
    tp: Any = Config
    shown: list[int | str] = []
    for part in loc:
        tp = _unwrap(tp)
        if get_origin(tp) in (Union, types.UnionType):
            members = [_unwrap(m) for m in get_args(tp)]
            tagged = [m for m in members if _is_model(m) and "type" in m.model_fields
                      and m.model_fields["type"].default == part]
            if tagged:  # pydantic puts a discriminated union's tag in the location
                tp = tagged[0]
                continue
            tp = None
        shown.append(part)
        if _is_model(tp):
            field = tp.model_fields.get(str(part))
            tp = field.annotation if field is not None else None
        elif get_origin(tp) in (list, tuple) and isinstance(part, int):
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        else:
            tp = None
    tp = _unwrap(tp)
    return shown, tp if _is_model(tp) else None


def _suggest(word: object, choices: list[str], *, bare: bool = False) -> str:
    """The choice nearest WORD as "did you mean 'x'?" (the bare choice with BARE); else ''."""
    near = difflib.get_close_matches(str(word), choices, n=1)
    if not near:
        return ""
    return near[0] if bare else f"did you mean {near[0]!r}?"


def _describe(error: Any) -> tuple[tuple[int | str, ...], str, str]:
    """One pydantic error as (location in the YAML, dotted location as YAML has it, message).

    An unknown key gets the nearest valid one; a misspelt choice the nearest choice; a
    validator's message that starts with one of its model's keys is placed at that key.
    """
    loc = tuple(error["loc"])
    message = str(error["msg"])
    for prefix in _PYDANTIC_PREFIXES:
        message = message.removeprefix(prefix)
    kind = error.get("type")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        shown, model = _walk(loc[:-1])
        shown.append(loc[-1])
        valid = sorted(model.model_fields) if model is not None else []
        hint = _suggest(loc[-1], valid) or (f"valid keys: {', '.join(valid)}" if valid else "")
        return loc, ".".join(map(str, shown)), "unknown key" + (f"; {hint}" if hint else "")
    shown, model = _walk(loc)
    if kind == "union_tag_invalid":
        hint = _suggest(ctx.get("tag", ""), re.findall(r"'([^']*)'", str(ctx.get("expected_tags"))))
        message += f"; {hint}" if hint else ""
    elif kind == "literal_error" and isinstance(error.get("input"), str):
        hint = _suggest(error["input"], re.findall(r"'([^']*)'", str(ctx.get("expected"))))
        message += f"; {hint}" if hint else ""
    key = _leading_key(message, model)
    if key is not None:
        parts = [int(k) if k.isdigit() else k for k in key.split(".")]
        loc = (*loc, *parts)
        shown += parts
        message = message[len(key) + 2:]
    return loc, ".".join(map(str, shown)) or "(top level)", message


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    # Walk the composed YAML tree along pydantic's error location to the deepest node that exists.
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == str(part)), None)
            if match is None:
                # Not in the YAML: a missing field (stay on its parent) or a union tag like
                # 'json' that pydantic adds to the location (skip it, keep walking).
                continue
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
        else:
            continue  # union tags such as 'json' in a discriminated union: not in the YAML
        line = node.start_mark.line + 1
    return line


def _resolve_paths(
    config: Config, base: Path, origin: str = "<config>", node: yaml.Node | None = None
) -> Config:
    def rel(path: Path | None) -> Path | None:
        return None if path is None or path.is_absolute() else base / path

    for i, p in enumerate(config.pipelines):
        if str(p.bundle).startswith(EXAMPLE_PREFIX):  # shipped with floorline, wherever installed
            try:
                p.bundle = example_bundle(str(p.bundle).removeprefix(EXAMPLE_PREFIX))
            except ConfigError as exc:
                line = _line_of(node, ("pipelines", i, "bundle"))
                where = f"{origin}:{line}" if line else origin
                raise ConfigError(f"{where}: pipelines.{i}.bundle: {exc}") from exc
        elif not str(p.bundle).startswith("sha256:"):  # a store reference, not a path
            p.bundle = rel(p.bundle) or p.bundle
        if p.shadow is not None:  # the same rules for a shadow's bundle
            ref = str(p.shadow.bundle)
            if ref.startswith(EXAMPLE_PREFIX):
                try:
                    p.shadow.bundle = example_bundle(ref.removeprefix(EXAMPLE_PREFIX))
                except ConfigError as exc:
                    line = _line_of(node, ("pipelines", i, "shadow", "bundle"))
                    where = f"{origin}:{line}" if line else origin
                    raise ConfigError(f"{where}: pipelines.{i}.shadow.bundle: {exc}") from exc
            elif not ref.startswith("sha256:"):
                p.shadow.bundle = rel(p.shadow.bundle) or p.shadow.bundle
    config.state_dir = rel(config.state_dir) or config.state_dir
    if config.state_dir is None and not os.environ.get("STATE_DIRECTORY"):
        config.state_dir = base / "floorline-state"
    b = config.broker
    if b.password_file is not None:
        b.password_file = rel(b.password_file) or b.password_file
    if b.tls is not None:
        b.tls.ca_file = rel(b.tls.ca_file) or b.tls.ca_file
        b.tls.cert_file = rel(b.tls.cert_file) or b.tls.cert_file
        b.tls.key_file = rel(b.tls.key_file) or b.tls.key_file
    def rel_keys(entries: list[str]) -> list[str]:
        # An entry is a key file (relative to the config) or an inline base64 key.
        return [str(base / k) if not Path(k).is_absolute() and (base / k).exists() else k
                for k in entries]

    config.trust.trusted_keys = rel_keys(config.trust.trusted_keys)
    config.fleet.operator_keys = rel_keys(config.fleet.operator_keys)
    return config


def parse_config(text: str, origin: str = "<config>", base: Path | None = None) -> Config:
    """Parse and validate YAML TEXT; errors name ORIGIN and the line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}" if mark is not None else origin
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: a config must be a YAML mapping")
    try:
        config = Config.model_validate(data, context={"source": _Source(origin, node)})
    except ValidationError as exc:
        lines = []
        for err in exc.errors()[:10]:
            loc, dotted, message = _describe(err)
            line = _line_of(node, loc)
            where = f"{origin}:{line}" if line else origin
            lines.append(f"{where}: {dotted}: {message}")
        more = len(exc.errors()) - 10
        tail = f"\n  … and {more} more" if more > 0 else ""
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines) + tail) from exc
    return _resolve_paths(config, base, origin, node) if base is not None else config


def load_config(path: Path) -> Config:
    """Read and validate a config file; relative paths inside are relative to its directory."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    return parse_config(text, str(path), base=path.resolve().parent)
