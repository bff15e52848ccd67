"""Hostile input through a real broker on both MQTT versions: no good prediction is ever lost.

A seeded corpus (huge, empty, binary garbage, deeply nested JSON, huge numbers, NaN/Infinity
literals, wrong types, unicode junk, sizes at the limit ± 1, sequence numbers at and beyond 2**63
and 2**64) goes to a running daemon interleaved with good streams whose sequence numbers cross
2**63 and wrap past 2**64 - 1. Every good window must be predicted exactly once, every hostile
message that reached the gateway must be dead-lettered (once, under its own topic) or decoded,
and the gateway must stay online, healthy and connected throughout.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

import numpy as np
import orjson
import pytest

from floorline.edge.decoders import JsonDecoder, JsonDecoderConfig
from floorline.edge.errors import DecodeError
from tests.daemon_harness import EXAMPLE, asset_samples, config_text, running, sample_payload
from tests.mqtt_broker import wait_until

SEED = 20250101
LIMIT = 65536  # limits.max_payload_bytes in the test config
MAX_PACKET = 1024 * 1024  # limits.max_packet_bytes (its default): MQTT 5 only
WINDOW, HOP = 64, 32
TOP = 2**64 - 1
JUNK = "-\u00fc\u00f1\u00ef\U0001f4a5\u200b"  # in some hostile assets' topic level


@dataclass(frozen=True)
class Hostile:
    """One hostile message and, when the corpus knows it, the dead-letter reason it must get."""

    kind: str  # "vibration" (JSON pipeline) or "block" (binary pipeline)
    payload: bytes
    reason: str | None = None  # None: any reason, or decoded (a valid sample on its own asset)
    decodes: bool = False  # a well-formed sample at an extreme: must be decoded, not refused


def _sample(**fields: object) -> dict[str, object]:
    return {"ts": 1.0, "seq": 1, "accel_x": 0.1, "accel_y": 0.2, "accel_z": 0.3, **fields}


def _json(**fields: object) -> bytes:
    return orjson.dumps(_sample(**fields))


def _raw_json(**fields: str) -> bytes:
    """A sample with some values written as raw JSON text (literals orjson would not write)."""
    parts = [f'"{k}": {fields.get(k, orjson.dumps(v).decode())}' for k, v in _sample().items()]
    parts += [f'"{k}": {v}' for k, v in fields.items() if k not in _sample()]
    return ("{" + ", ".join(parts) + "}").encode()


def _sized(size: int) -> bytes:
    head = b'{"ts": 1.0, "seq": 1, "pad": "'
    return head + b"p" * (size - len(head) - 2) + b'"}'


def _block(ts: float, seq: int, values: np.ndarray) -> bytes:
    return struct.pack("<dQ", ts, seq) + np.asarray(values, dtype="<f4").tobytes()


def curated() -> list[Hostile]:
    """The named cases, each with the outcome it must have."""
    nested = b"[" * 20000 + b"]" * 20000
    deep_field = b'{"a": ' * 300 + b"1" + b"}" * 300
    return [
        # Not the format at all.
        Hostile("vibration", b"", "malformed"),
        Hostile("vibration", b"   \n", "malformed"),
        Hostile("vibration", b"null", "malformed"),
        Hostile("vibration", b"[1, 2, 3]", "malformed"),
        Hostile("vibration", b'"a string"', "malformed"),
        Hostile("vibration", b'{"ts": 1.0, "seq": ', "malformed"),
        Hostile("vibration", nested, "malformed"),
        Hostile("vibration", b"\xff\xfe\x00{garbage", "malformed"),
        Hostile("vibration", bytes(range(256)) * 4, "malformed"),
        # Numbers JSON allows or almost allows.
        Hostile("vibration", _raw_json(accel_x="NaN"), "malformed"),
        Hostile("vibration", _raw_json(accel_y="Infinity"), "malformed"),
        Hostile("vibration", _raw_json(accel_z="-Infinity"), "malformed"),
        Hostile("vibration", _raw_json(accel_x="1e400"), "non_finite"),
        Hostile("vibration", _raw_json(accel_x="1e39"), "non_finite"),  # beyond float32
        Hostile("vibration", _raw_json(accel_y="-" + "9" * 60), "non_finite"),
        Hostile("vibration", _raw_json(ts="1e400"), "non_finite"),
        Hostile("vibration", _json(ts=-5.0), "bad_timestamp"),
        # Wrong types.
        Hostile("vibration", _json(accel_x="0.1"), "non_numeric"),
        Hostile("vibration", _json(accel_x=True), "non_numeric"),
        Hostile("vibration", _json(accel_y=None), "non_numeric"),
        Hostile("vibration", _json(accel_z=[1.0]), "non_numeric"),
        Hostile("vibration", _raw_json(accel_x=deep_field.decode()), "non_numeric"),
        Hostile("vibration", _json(ts="yesterday"), "bad_timestamp"),
        Hostile("vibration", orjson.dumps({"ts": 1.0, "seq": 1, "accel_x": 0.1}),
                "missing_field"),
        # Unicode junk.
        Hostile("vibration", _json(**{"\u202e\U0001f4a5\u200b": 1}), "extra_field"),
        Hostile("vibration", _json()[:-1] + b', "\\ud800": "lone surrogate"}', None),
        Hostile("vibration", '{"ts": 1.0, "seq": 1, "accel_x": "\U0001f4a5"}'.encode(), None),
        # Sequence numbers at and beyond the int64 and uint64 tops.
        Hostile("vibration", _json(seq=2**63 - 1), decodes=True),
        Hostile("vibration", _json(seq=2**63), decodes=True),
        Hostile("vibration", _json(seq=TOP), decodes=True),
        Hostile("vibration", _raw_json(seq=str(2**64)), "bad_sequence"),
        Hostile("vibration", _raw_json(seq=str(2**64 + 12345)), "bad_sequence"),
        Hostile("vibration", _raw_json(seq="1" + "0" * 40), "bad_sequence"),
        Hostile("vibration", _json(seq=-1), "bad_sequence"),
        Hostile("vibration", _json(seq=-(2**63)), "bad_sequence"),
        Hostile("vibration", _json(seq=1.5), "bad_sequence"),
        Hostile("vibration", _json(seq="7"), "bad_sequence"),
        Hostile("vibration", _json(seq=True), "bad_sequence"),
        # Sizes at the limit, one byte either side, and far beyond it.
        Hostile("vibration", _sized(LIMIT - 1), "missing_field"),
        Hostile("vibration", _sized(LIMIT), "missing_field"),
        Hostile("vibration", _sized(LIMIT + 1), "too_large"),
        Hostile("vibration", b"\x00" * (2 * 1024 * 1024), "too_large"),
        Hostile("block", b"\xab" * (16 * 1024 * 1024), "too_large"),
        # Binary blocks.
        Hostile("block", b"", "wrong_length"),
        Hostile("block", b"\x01" * 16, "wrong_length"),  # a header, no samples
        Hostile("block", b"\x01" * 27, "wrong_length"),
        Hostile("block", _block(1.0, 5, [[np.nan, 0, 0]]), "non_finite"),
        Hostile("block", _block(1.0, 5, [[0, np.inf, 0]]), "non_finite"),
        Hostile("block", _block(float("nan"), 5, [[0, 0, 0]]), "bad_timestamp"),
        Hostile("block", _block(-1.0, 5, [[0, 0, 0]]), "bad_timestamp"),
        Hostile("block", _block(float("inf"), 5, [[0, 0, 0]]), "bad_timestamp"),
        Hostile("block", _block(1.0, 2**63, [[0, 0, 0]] * 4), decodes=True),
        Hostile("block", _block(1.0, TOP, [[0, 0, 0]] * 4), decodes=True),  # wraps inside
    ]


def generated(rng: random.Random, n: int) -> list[Hostile]:
    """N seeded random payloads: garbage, mutated samples, odd values in every field."""
    odd = [None, True, "", "x" * 50, [], {}, 1e308, -1e308, 2**63, 2**64 - 1, -(2**63), 0,
           -0.0, 1e-320, "\u0000", "\U0001f4a5", [1, [2, [3]]], {"a": {"b": None}}]
    out = []
    for _ in range(n):
        choice = rng.randrange(5)
        if choice == 0:
            out.append(Hostile(rng.choice(["vibration", "block"]),
                               rng.randbytes(rng.randrange(0, 400))))
        elif choice == 1:
            sample: dict[str, object] = _sample(seq=rng.randrange(0, 2**64))
            for key in rng.sample(sorted(sample), rng.randrange(1, 4)):
                if rng.random() < 0.3:
                    del sample[key]
                else:
                    sample[key] = rng.choice(odd)
            out.append(Hostile("vibration", orjson.dumps(sample)))
        elif choice == 2:
            text = _json(seq=rng.randrange(0, 2**64))
            cut = rng.randrange(len(text))
            out.append(Hostile("vibration", text[:cut] + rng.randbytes(3) + text[cut + 1 :]))
        elif choice == 3:
            rows = rng.randrange(1, 6)
            out.append(Hostile("block", struct.pack("<dQ", rng.uniform(-1e3, 1e12),
                                                    rng.randrange(0, 2**64))
                               + rng.randbytes(12 * rows)))
        else:
            depth = rng.randrange(1, 3000)
            out.append(Hostile("vibration", b'{"ts": 1.0, "seq": 1, "accel_x": '
                               + b"[" * depth + b"]" * depth + b"}"))
    return out


@dataclass
class GoodStream:
    kind: str
    asset: str
    messages: list[bytes]
    windows: int


def good_streams() -> list[GoodStream]:
    streams = []
    # Per-sample JSON: one stream wraps past 2**64 - 1, one crosses 2**63, one starts at 0.
    for n, first in enumerate([2**64 - 100, 2**63 - 96, 0]):
        samples = asset_samples(192, seed=300 + n)
        t0 = 100.0 * (n + 1)
        msgs = [sample_payload(t0 + i / 1000, (first + i) % 2**64, row)
                for i, row in enumerate(samples)]
        streams.append(GoodStream("vibration", f"good-{n}", msgs, (192 - WINDOW) // HOP + 1))
    # Binary blocks of 32 samples (tumbling windows of 64), wrapping past 2**64 - 1 mid-block.
    for n in range(2):
        samples = asset_samples(256, seed=400 + n)
        first = 2**64 - 80
        msgs = [_block(500.0 + b * 0.032, (first + 32 * b) % 2**64, samples[32 * b : 32 * b + 32])
                for b in range(8)]
        streams.append(GoodStream("block", f"good-b{n}", msgs, 256 // WINDOW))
    return streams


def _pipelines(prefix: str) -> str:
    return f"""
  - name: vibration
    subscribe: ["{prefix}/+/vibration"]
    qos: 1
    bundle: "{EXAMPLE}"
    decoder: {{type: json, timestamp: ts, sequence: seq}}
    window: {{hop: {HOP}, max_gap_s: 0.05}}
    batch: {{max_batch: 16, max_wait_ms: 5}}
    output: {{qos: 1}}
  - name: block
    subscribe: ["{prefix}/+/block"]
    qos: 1
    bundle: "{EXAMPLE}"
    decoder: {{type: binary, header: timestamp_sequence, sample_interval_ms: 1.0}}
    batch: {{max_batch: 16, max_wait_ms: 5}}
    output: {{qos: 1}}
"""


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_hostile_payloads_never_cost_a_good_prediction(
    mosquitto, mqtt_client, unique_topic, protocol
):
    rng = random.Random(SEED)  # noqa: S311 - a reproducible corpus, not cryptography
    hostile = curated() + generated(rng, 300)
    streams = good_streams()
    prefix = unique_topic
    # Each hostile message on an asset of its own, so its dead letter names it and it cannot
    # touch a good stream's window; some asset names are unicode junk themselves.
    hostile_topics = [f"{prefix}/h{i}{JUNK if i % 7 == 0 else ''}/{h.kind}"
                      for i, h in enumerate(hostile)]
    # Hostile messages at seeded places among the good ones (those in their streams' order).
    good = _round_robin(streams, prefix)
    schedule: list[int | None] = [None] * len(good) + list(range(len(hostile)))
    rng.shuffle(schedule)

    probe = mqtt_client(mosquitto)
    probe.subscribe("floorline/gw-test/pred/#", qos=1)
    probe.subscribe("floorline/gw-test/dlq/#", qos=1)
    cfg = config_text(
        mosquitto, _pipelines(prefix),
        extra=f"limits: {{max_payload_bytes: {LIMIT}, inbox_bytes: {16 * 1024 * 1024}}}\n",
    ).replace("keepalive: 10,", f"keepalive: 10, protocol: '{protocol}',")
    with running(cfg) as daemon:
        next_good = iter(good)
        for i in schedule:
            if i is None:
                probe.publish(*next(next_good), qos=1)
            else:
                probe.publish(hostile_topics[i], hostile[i].payload, qos=rng.choice([0, 1]),
                              timeout=30)

        expected_windows = sum(s.windows for s in streams)
        preds = probe.wait_for(expected_windows, "floorline/gw-test/pred/#", timeout=30)
        # What reached the gateway: on MQTT 5 the broker keeps packets over the negotiated
        # maximum away (never sent, never seen); on 3.1.1 the gateway refuses them itself.
        arriving = [
            (t, h) for t, h in zip(hostile_topics, hostile, strict=True)
            if protocol == "3.1.1" or len(h.payload) < MAX_PACKET - 1024
        ]
        total_in = len(good) + len(arriving)

        def accounted() -> bool:
            pipes = daemon.stats()["pipelines"]
            assert isinstance(pipes, dict)
            return sum(p["received"] for p in pipes.values()) == total_in and all(
                p["decoded"] + sum(p["dead_letters"].values()) == p["received"]
                and p["queued"] == 0 for p in pipes.values()
            )

        wait_until(accounted, 20, "every message decoded or dead-lettered")
        stats = daemon.stats()
        pipes = stats["pipelines"]
        dead = sum(sum(p["dead_letters"].values()) for p in pipes.values())
        dlq = probe.wait_for(dead, "floorline/gw-test/dlq/#", timeout=20)
        assert daemon.problem() is None
        assert daemon.health is None
        assert all(p.is_alive() for p in daemon.pipelines)
        assert stats["connects"] == 1  # never disconnected by what it was sent
        state_probe = mqtt_client(mosquitto)
        state_probe.subscribe("floorline/gw-test/state", qos=1)
        (state,) = state_probe.wait_for(1, timeout=10)
        assert orjson.loads(state.payload)["state"] == "online"
        late_preds = len([m for m in probe.messages if "/pred/" in m.topic])

    # Zero good windows lost, none predicted twice, none from a hostile asset.
    by_asset: dict[str, list[int]] = {}
    for m in preds:
        body = orjson.loads(m.payload)
        by_asset.setdefault(body["asset"], []).append(body["seq"])
    assert {a: sorted(s) for a, s in by_asset.items()} == {
        s.asset: list(range(s.windows)) for s in streams}
    assert late_preds == expected_windows
    for p in pipes.values():
        assert p.get("internal_errors", 0) == 0
        assert p.get("dropped_inbox_full", 0) == 0

    # Every hostile message that arrived: one dead letter under its own topic, or decoded.
    reports = [orjson.loads(m.payload) for m in dlq]
    assert all(len(m.payload) < 700 for m in dlq)  # bounded: never the payload
    by_topic: dict[str, list[str]] = {}
    for r in reports:
        by_topic.setdefault(r["topic"], []).append(r["reason"])
    good_topics = {f"{prefix}/{s.asset}/{s.kind}" for s in streams}
    assert not good_topics & set(by_topic)
    assert all(len(reasons) == 1 for reasons in by_topic.values())
    arriving_topics = {t for t, _ in arriving}
    assert set(by_topic) <= arriving_topics
    decoded_hostile = len(arriving) - len(by_topic)
    assert sum(p["decoded"] for p in pipes.values()) == len(good) + decoded_hostile
    for topic, h in arriving:
        if h.reason is not None:
            assert by_topic.get(topic) == [h.reason], (topic, h)
        if h.decodes:
            assert topic not in by_topic, (topic, by_topic.get(topic))


def _round_robin(streams: list[GoodStream], prefix: str) -> list[tuple[str, bytes]]:
    # The good messages interleaved across streams, each stream in its own order.
    queues = [[(f"{prefix}/{s.asset}/{s.kind}", m) for m in s.messages] for s in streams]
    out: list[tuple[str, bytes]] = []
    while any(queues):
        out.extend(q.pop(0) for q in queues if q)
    return out


# -- the JSON decoder's sequence range, unit by unit ---------------------------------------------


def _decoder() -> JsonDecoder:
    return JsonDecoder(JsonDecoderConfig(sequence="seq", samples="samples"), ["x"])


@pytest.mark.parametrize("seq", [2**63 - 1, 2**63, TOP, 0])
def test_json_sequence_numbers_are_accepted_across_uint64(seq: int) -> None:
    samples = _decoder().decode(orjson.dumps({"samples": [{"seq": seq, "x": 1.0}]}))
    assert samples.first_seq == seq


@pytest.mark.parametrize("raw", [str(2**64), str(2**64 + 1), "-1", str(-(2**63)), "1e3", "true"])
def test_json_sequence_numbers_outside_uint64_are_bad_sequence(raw: str) -> None:
    with pytest.raises(DecodeError) as info:
        _decoder().decode(b'{"samples": [{"seq": %s, "x": 1.0}]}' % raw.encode())
    assert info.value.reason == "bad_sequence"


def test_a_json_block_may_wrap_from_the_top_to_zero_but_not_run_past_it() -> None:
    def block(*seqs: int) -> bytes:
        return b'{"samples": [%s]}' % b", ".join(b'{"seq": %d, "x": 1.0}' % s for s in seqs)

    assert _decoder().decode(block(TOP - 1, TOP, 0, 1)).first_seq == TOP - 1
    for bad in (block(TOP, 2**64), block(TOP, 1), block(TOP - 1, 0)):
        with pytest.raises(DecodeError) as info:
            _decoder().decode(bad)
        assert info.value.reason == "bad_sequence"
