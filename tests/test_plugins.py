"""Plugins: one module per decoder or output, found by ``plugins.discover``, selected by ``type``.

The last two tests show what a maintainer does to add one: write one module (here into a
temporary folder that joins the plugin package's path) and use its ``type`` in a config. Nothing
else is edited: the registry, the config union and the JSON Schema all pick it up.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from floorline.edge.backends import BACKENDS
from floorline.edge.config.model import parse_config
from floorline.edge.decoders import DECODERS, JsonDecoderConfig
from floorline.edge.errors import ConfigError
from floorline.edge.outputs import OUTPUTS, MqttOutputConfig
from floorline.edge.plugins import discover
from tests.daemon_harness import EXAMPLE


@dataclass(frozen=True)
class Record:
    type: str


def _package(root: Path, name: str, modules: dict[str, str]) -> str:
    folder = root / name
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "base.py").write_text("# the protocol module is not a plugin\n")
    (folder / "_private.py").write_text("# nor is a private helper\n")
    for module, text in modules.items():
        (folder / f"{module}.py").write_text(text)
    return name


@pytest.fixture
def plugin_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


RECORD = "from tests.test_plugins import Record\nPLUGIN = Record({!r})\n"


def test_discover_finds_every_plugin_module_by_type(plugin_root: Path) -> None:
    name = _package(plugin_root, "plug_ok", {"b_mod": RECORD.format("bee"),
                                             "a_mod": RECORD.format("ay")})
    found = discover(name, Record)
    assert list(found) == ["ay", "bee"]  # module-name order
    assert found["bee"] == Record("bee")


def test_a_module_without_plugin_is_an_error_not_a_silent_skip(plugin_root: Path) -> None:
    name = _package(plugin_root, "plug_missing", {"forgot": "X = 1\n"})
    with pytest.raises(TypeError, match=r"plug_missing\.forgot .*declares no PLUGIN"):
        discover(name, Record)


def test_two_plugins_may_not_claim_one_type(plugin_root: Path) -> None:
    name = _package(plugin_root, "plug_twice", {"one": RECORD.format("same"),
                                                "two": RECORD.format("same")})
    with pytest.raises(TypeError, match="both claim type 'same'"):
        discover(name, Record)


def test_the_shipped_plugins() -> None:
    assert sorted(DECODERS) == ["binary", "csv", "json", "sparkplug"]
    assert sorted(OUTPUTS) == ["mqtt", "sparkplug"]
    assert list(BACKENDS) == ["litert", "onnx"]  # the order `backend: auto` prefers
    for plugin_type, plugin in DECODERS.items():
        assert plugin.config.model_fields["type"].default == plugin_type


def _pipeline_yaml(decoder: str, output: str | None = None) -> str:
    out = f"\n    output: {output}" if output else ""
    return textwrap.dedent(f"""\
        gateway: {{id: gw}}
        pipelines:
          - name: p
            subscribe: ["plant/+/+/vibration"]
            bundle: "{EXAMPLE}"
            decoder: {decoder}""") + out + "\n"


def test_an_output_without_type_is_the_mqtt_output() -> None:
    config = parse_config(_pipeline_yaml("{type: json}", "{qos: 0, retain: true}"))
    output = config.pipelines[0].output
    assert isinstance(output, MqttOutputConfig)
    assert (output.qos, output.retain) == (0, True)
    assert isinstance(config.pipelines[0].decoder, JsonDecoderConfig)


def test_an_unknown_type_names_the_file_line_and_the_known_types() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_pipeline_yaml("{type: protobuf}"), "gw.yaml")
    assert "gw.yaml:6" in str(info.value)
    assert "json" in str(info.value)
    assert "csv" in str(info.value)
    with pytest.raises(ConfigError, match=r"gw\.yaml:7"):
        parse_config(_pipeline_yaml("{type: json}", "{type: kafka}"), "gw.yaml")


# A decoder and an output as a maintainer would write them: each one file, config + code.
CONSTANT_DECODER = '''
from __future__ import annotations
from typing import Literal
import numpy as np
from floorline.edge.decoders.base import (
    DecoderConfigBase, DecoderContext, DecoderPlugin, Samples, check_features)
from floorline.edge.errors import DecodeError

class TextDecoderConfig(DecoderConfigBase):
    type: Literal["text"] = "text"
    separator: str = " "

class TextDecoder:
    """Whitespace-separated numbers, one sample; keeps a count (decoders may hold state)."""
    def __init__(self, config: TextDecoderConfig, context: DecoderContext) -> None:
        self._n = len(check_features(context.features))
        self._sep = config.separator
        self.seen = 0
    def decode(self, payload: bytes, topic: str = "") -> Samples | None:
        self.seen += 1
        if payload == b"hello":
            return None  # understood, no samples
        try:
            row = [float(v) for v in payload.decode().split(self._sep)]
        except ValueError:
            raise DecodeError("non_numeric", "not numbers") from None
        if len(row) != self._n:
            raise DecodeError("wrong_length", f"{len(row)} values")
        return Samples(np.array([row], dtype=np.float32), None, None, None)

PLUGIN = DecoderPlugin(type="text", config=TextDecoderConfig, factory=TextDecoder)
'''

CAPTURE_OUTPUT = """
from __future__ import annotations
from typing import Literal
from floorline.edge.messages import Outbound
from floorline.edge.outputs.base import OutputConfigBase, OutputContext, OutputPlugin

class CsvOutputConfig(OutputConfigBase):
    type: Literal["csv-lines"] = "csv-lines"
    topic: str = "out/{pipeline}"

class CsvOutput:
    def __init__(self, config: CsvOutputConfig, context: OutputContext) -> None:
        self._topic = config.topic.format(pipeline=context.pipeline)
    def messages(self, windows, outputs, *, inference_ms, now):
        return [Outbound(self._topic, f"{w.asset},{w.index},{row.argmax()}".encode(), 1, False)
                for w, row in zip(windows, outputs, strict=True)]
    def close(self) -> None:
        pass

PLUGIN = OutputPlugin(type="csv-lines", config=CsvOutputConfig, factory=CsvOutput)
"""

# A backend the way an OpenVINO one would come: another runtime for an existing artifact format.
# (Here it wraps ONNX Runtime under another name, so it runs wherever the tests do.)
PLAIN_ORT_BACKEND = """
from __future__ import annotations
from floorline.edge.backends.base import BackendPlugin
from floorline.edge.backends.onnx import OnnxBackend

class PlainOrtBackend(OnnxBackend):
    def __init__(self, path, options):
        import onnxruntime as ort
        super().__init__(path, options)
        self.runtime = "onnxruntime-plain " + ort.__version__

PLUGIN = BackendPlugin(type="plain-ort", factory=PlainOrtBackend, format="onnx", extra="onnx",
                       runtimes=("onnxruntime",), rank=9)
"""

DRIVER = """
import importlib.util, json, sys
import numpy as np

def with_extra_folder(package, folder):
    # What `pip install` of a wheel holding one more module would do: the package path has it.
    spec = importlib.util.find_spec(package)
    spec.submodule_search_locations.append(folder)
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)

import floorline.edge
with_extra_folder("floorline.edge.decoders", sys.argv[1])
with_extra_folder("floorline.edge.outputs", sys.argv[2])
with_extra_folder("floorline.edge.backends", sys.argv[4])

from floorline.edge.bundle.bundle import Bundle
from floorline.edge.bundle.selftest import load
from floorline.edge.config.model import Config, parse_config
from floorline.edge.daemon.models import load_model
from floorline.edge.daemon.pipeline import Pipeline
from floorline.edge.messages import Inbound

config = parse_config(sys.argv[3])
pc = config.pipelines[0]
sent = []
model = load_model(config, pc)  # verified and self-tested on the configured backend
pipeline = Pipeline(pc, gateway="gw", topics=config.topics, limits=config.limits,
                    model=model, submit=sent.extend)
rng = np.random.default_rng(0)
rows = [b"hello", b"1 2"] + [" ".join(map(str, r)).encode() for r in rng.normal(size=(64, 3))]
pipeline.start()
pipeline.offer_many([Inbound("plant/l/pump-1/vibration", r, 0.0) for r in rows])
pipeline.stop()
schema = json.dumps(Config.model_json_schema())
print(json.dumps({
    "sent": [[m.topic, m.payload.decode()] for m in sent],
    "stats": pipeline.stats(),
    "schema_has_types": "csv-lines" in schema and '"text"' in schema and "plain-ort" in schema,
    "runtime": model.backend.runtime,
}))
"""


def test_adding_a_decoder_an_output_and_a_backend_is_one_module_each(tmp_path: Path) -> None:
    decoders, outputs, backends = tmp_path / "decoders", tmp_path / "outputs", tmp_path / "be"
    for folder in (decoders, outputs, backends):
        folder.mkdir()
    (decoders / "text.py").write_text(CONSTANT_DECODER)
    (outputs / "csv_lines.py").write_text(CAPTURE_OUTPUT)
    (backends / "plain_ort.py").write_text(PLAIN_ORT_BACKEND)
    config = _pipeline_yaml("{type: text}", "{type: csv-lines}").replace(
        "decoder:", "batch: {max_wait_ms: 0}\n    backend: plain-ort\n    decoder:")
    run = subprocess.run(
        [sys.executable, "-c", DRIVER, str(decoders), str(outputs), config, str(backends)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert run.returncode == 0, run.stderr
    result = __import__("json").loads(run.stdout.splitlines()[-1])
    stats = result["stats"]
    assert stats["control"] == 1  # "hello": understood, no samples
    assert stats["dead_letters"] == {"wrong_length": 1}  # "1 2": two values for three features
    predictions = [(t, p) for t, p in result["sent"] if t == "out/p"]
    assert [p.split(",")[:2] for _, p in predictions] == [["pump-1", "0"]]  # 64 samples: 1 window
    assert result["schema_has_types"]
    assert result["runtime"].startswith("onnxruntime-plain")
