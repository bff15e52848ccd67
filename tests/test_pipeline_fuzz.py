"""A whole pipeline (decode → window → batch → infer) under arbitrary input: every message is
either used or dead-lettered and counted, and only the project's own errors are ever raised."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from floorline.edge.bundle.bundle import Bundle
from floorline.edge.bundle.selftest import load
from floorline.edge.config.model import parse_config
from floorline.edge.daemon.pipeline import Pipeline
from tests.daemon_harness import EXAMPLE

_CONFIG = f"""
gateway: {{id: fuzz}}
state_dir: /tmp/floorline-fuzz-unused
limits: {{max_payload_bytes: 4096}}
pipelines:
  - name: json
    subscribe: ["plant/+/+/vibration"]
    bundle: "{EXAMPLE}"
    decoder: {{type: json, timestamp: ts, sequence: seq}}
    window: {{hop: 32}}
    batch: {{max_batch: 4, max_wait_ms: 0}}
  - name: blocks
    subscribe: ["plant/+/+/block"]
    bundle: "{EXAMPLE}"
    decoder: {{type: binary, header: timestamp_sequence, sample_interval_ms: 1.0}}
  - name: csv
    subscribe: ["plant/+/+/csv"]
    bundle: "{EXAMPLE}"
    decoder: {{type: csv, columns: [timestamp, sequence, accel_x, accel_y, accel_z]}}
"""

CONFIG = parse_config(_CONFIG)
MODEL = load(Bundle.open(EXAMPLE), backend="litert")

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**20, 10**20))
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                              max_size=4),
    max_leaves=12,
)
plausible = st.fixed_dictionaries(
    {},
    optional={"ts": json_values, "seq": json_values, "accel_x": json_values,
              "accel_y": json_values, "accel_z": json_values, "extra": json_values},
)


def payloads() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=6000),
        # The standard library writes what orjson will not: huge integers, NaN, Infinity.
        plausible.map(lambda d: json.dumps(d).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
    )


def make_pipelines() -> list[Pipeline]:
    sent: list[tuple[str, bytes, int, bool]] = []
    return [
        Pipeline(pc, gateway="fuzz", topics=CONFIG.topics, limits=CONFIG.limits, model=MODEL,
                 submit=sent.extend)
        for pc in CONFIG.pipelines
    ]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["vibration", "block", "csv"]), payloads()),
                min_size=1, max_size=25))
def test_every_message_is_used_or_dead_lettered_and_counted(messages):
    pipelines = dict(zip(["vibration", "block", "csv"], make_pipelines(), strict=True))
    fed: dict[str, int] = dict.fromkeys(pipelines, 0)
    for kind, payload in messages:
        # _handle is the worker's whole per-message path; anything escaping it would kill it.
        pipelines[kind]._handle(f"plant/line1/pump-1/{kind}", payload, 0.0)
        fed[kind] += 1
    for kind, p in pipelines.items():
        decoded = p.counters["decoded"]
        rejected = sum(p.dead_letters.values())
        assert decoded + rejected == fed[kind]
