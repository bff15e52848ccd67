"""Decoders: payload bytes to samples in the model's feature order, or one DecodeError reason."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from floorline.edge import decoders
from floorline.edge.decoders import (
    REASONS,
    BinaryDecoder,
    BinaryDecoderConfig,
    CsvDecoder,
    CsvDecoderConfig,
    Decoder,
    DecoderConfig,
    JsonDecoder,
    JsonDecoderConfig,
    check_asset,
    make_decoder,
)
from floorline.edge.errors import ConfigError, DecodeError
from floorline.edge.stream import window as window_module

FEATURES = ["ax", "ay", "az"]


def _reason(decoder: Decoder, payload: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        decoder.decode(payload)
    assert info.value.reason in REASONS
    assert len(info.value.detail) < 200
    return info.value.reason


def _json(**options: Any) -> JsonDecoder:
    return JsonDecoder(JsonDecoderConfig(**options), FEATURES)


def _block_json() -> JsonDecoder:
    return _json(samples="data", timestamp="t", sequence="seq", asset="asset")


def _dumps(value: Any) -> bytes:
    # The standard library writes integers of any size, which orjson itself would refuse to.
    return json.dumps(value).encode()


# --- JSON: good payloads -------------------------------------------------------------------------


def test_json_single_sample_follows_model_feature_order_not_key_order() -> None:
    samples = _json().decode(b'{"az": 3.5, "ax": 1, "ay": -2}')
    assert samples.values.dtype == np.float32
    assert samples.values.tolist() == [[1.0, -2.0, 3.5]]
    assert samples.timestamps is None
    assert samples.first_seq is None
    assert samples.asset is None


def test_json_block_with_time_sequence_and_asset() -> None:
    payload = _dumps(
        {
            "asset": "pump-7",
            "data": [
                {"ax": 1, "ay": 2, "az": 3, "t": 100.0, "seq": 41},
                {"az": 6, "ay": 5, "ax": 4, "t": 100.5, "seq": 42},
            ],
        }
    )
    samples = _block_json().decode(payload)
    assert samples.values.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert samples.timestamps is not None
    assert samples.timestamps.tolist() == [100.0, 100.5]
    assert samples.first_seq == 41
    assert samples.asset == "pump-7"


def test_json_nested_field_paths_and_millisecond_timestamps() -> None:
    decoder = _json(
        fields={"ax": "accel.x", "ay": "accel.y", "az": "accel.z"},
        timestamp="meta.ts",
        timestamp_unit="ms",
    )
    payload = b'{"accel": {"z": 3, "y": 2, "x": 1}, "meta": {"ts": 1500}}'
    samples = decoder.decode(payload)
    assert samples.values.tolist() == [[1, 2, 3]]
    assert samples.timestamps is not None
    assert samples.timestamps.tolist() == [1.5]


def test_json_extra_fields_can_be_ignored() -> None:
    samples = _json(extra_fields="ignore").decode(b'{"ax": 1, "ay": 2, "az": 3, "rssi": -70}')
    assert samples.values.tolist() == [[1, 2, 3]]


def test_json_single_sample_may_carry_its_asset() -> None:
    samples = _json(asset="meta.asset").decode(b'{"ax":1,"ay":2,"az":3,"meta":{"asset":"m1"}}')
    assert samples.asset == "m1"


def test_json_one_feature_model() -> None:
    decoder = JsonDecoder(JsonDecoderConfig(fields={"temp": "t"}), ["temp"])
    assert decoder.decode(b'{"t": 21.5}').values.tolist() == [[21.5]]


# --- JSON: every reason --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "malformed"),
        (b"\xff\xfe", "malformed"),
        (b'{"ax": NaN, "ay": 2, "az": 3}', "malformed"),
        (b"[1, 2, 3]", "malformed"),
        (b'"ax"', "malformed"),
        (b'{"ax": 1, "ay": 2}', "missing_field"),
        (b'{"ax": 1, "ay": 2, "az": 3, "bz": 4}', "extra_field"),
        (b'{"ax": "1", "ay": 2, "az": 3}', "non_numeric"),
        (b'{"ax": true, "ay": 2, "az": 3}', "non_numeric"),
        (b'{"ax": null, "ay": 2, "az": 3}', "non_numeric"),
        (b'{"ax": {"v": 1}, "ay": 2, "az": 3}', "non_numeric"),
        (b'{"ax": [1], "ay": 2, "az": 3}', "non_numeric"),
        (b'{"ax": 1e400, "ay": 2, "az": 3}', "non_finite"),
        (b'{"ax": 1e39, "ay": 2, "az": 3}', "non_finite"),
    ],
)
def test_json_single_sample_reasons(payload: bytes, reason: str) -> None:
    assert _reason(_json(), payload) == reason


def _block(*samples: dict[str, Any], **top: Any) -> bytes:
    return _dumps({"asset": "a1", "data": list(samples), **top})


def _sample(seq: Any = 0, t: Any = 1.0, **over: Any) -> dict[str, Any]:
    return {"ax": 1, "ay": 2, "az": 3, "t": t, "seq": seq, **over}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_dumps({"asset": "a1", "data": {"ax": 1}}), "malformed"),
        (_dumps({"asset": "a1"}), "malformed"),
        (_block(), "malformed"),
        (_dumps({"asset": "a1", "data": [_sample(), 5]}), "malformed"),
        (_block(_sample(t="now")), "bad_timestamp"),
        (_block(_sample(t=None)), "bad_timestamp"),
        (_block(_sample(t=-5)), "bad_timestamp"),
        (_block({"ax": 1, "ay": 2, "az": 3, "seq": 0}), "missing_field"),
        (_block(_sample(seq=-1)), "bad_sequence"),
        (_block(_sample(seq=1.0)), "bad_sequence"),
        (_block(_sample(seq=True)), "bad_sequence"),
        (_block(_sample(seq=0), _sample(seq=True)), "bad_sequence"),
        (_block(_sample(seq=0), _sample(seq=2)), "bad_sequence"),
        (_block(_sample(seq=5), _sample(seq=4)), "bad_sequence"),
        (_dumps({"data": [_sample()]}), "bad_asset"),
        (_block(_sample(), asset=""), "bad_asset"),
        (_block(_sample(), asset="line/7"), "bad_asset"),
        (_block(_sample(), asset="a+"), "bad_asset"),
        (_block(_sample(), asset="#"), "bad_asset"),
        (_block(_sample(), asset="x" * 129), "bad_asset"),
        (_block(_sample(), asset=7), "bad_asset"),
        (_block(_sample(), _sample(seq=1, ax="x")), "non_numeric"),
        (_block(_sample(), _sample(seq=1, extra=1)), "extra_field"),
    ],
)
def test_json_block_reasons(payload: bytes, reason: str) -> None:
    assert _reason(_block_json(), payload) == reason


@pytest.mark.parametrize(
    ("last", "reason"),
    [
        ({}, None),
        ({"az": 1e39}, "non_finite"),
        ({"t": -1.0}, "bad_timestamp"),
        ({"seq": 99}, "bad_sequence"),
        ({"extra": 1}, "extra_field"),
    ],
)
def test_long_block_is_checked_as_thoroughly_as_a_short_one(
    last: dict[str, Any], reason: str | None
) -> None:
    samples = [_sample(seq=i, t=float(i), ax=i) for i in range(40)]
    samples[-1].update(last)
    payload = _block(*samples)
    if reason is not None:
        assert _reason(_block_json(), payload) == reason
        return
    decoded = _block_json().decode(payload)
    assert decoded.values[:, 0].tolist() == list(range(40))
    assert decoded.timestamps is not None
    assert decoded.timestamps.tolist() == [float(i) for i in range(40)]


def test_json_nested_extra_key_is_rejected() -> None:
    decoder = _json(fields={"ax": "a.x", "ay": "a.y", "az": "a.z"})
    assert decoder.decode(b'{"a": {"x": 1, "y": 2, "z": 3}}').values.tolist() == [[1, 2, 3]]
    assert _reason(decoder, b'{"a": {"x": 1, "y": 2, "z": 3, "w": 4}}') == "extra_field"
    assert _reason(decoder, b'{"a": 5}') == "missing_field"


def test_json_detail_never_echoes_a_long_value() -> None:
    with pytest.raises(DecodeError) as info:
        _json().decode(_dumps({"ax": "x" * 10_000, "ay": 2, "az": 3}))
    assert len(str(info.value)) < 200


def test_json_asset_beside_the_samples_path_in_one_object() -> None:
    # Whole paths are compared: data.device is beside data.samples, not inside it.
    decoder = _json(samples="data.samples", asset="data.device", timestamp="t")
    payload = _dumps({"data": {"device": "pump-3", "samples": [{"ax": 1, "ay": 2, "az": 3,
                                                                 "t": 5.0}]}})
    samples = decoder.decode(payload)
    assert samples.asset == "pump-3"
    assert samples.values.tolist() == [[1, 2, 3]]


@pytest.mark.parametrize(
    ("samples", "asset"),
    [("data", "data.asset"), ("data.s", "data.s"), ("data.s", "data"), ("d[0]", "d[0].id")],
)
def test_json_asset_inside_the_samples_or_holding_them_is_refused(samples: str, asset: str) -> None:
    with pytest.raises(ConfigError, match=r"^decoder\.asset: "):
        _json(samples=samples, asset=asset)


# --- JSON: arrays --------------------------------------------------------------------------------


def test_json_fields_may_index_arrays() -> None:
    decoder = _json(fields={"ax": "values[0]", "ay": "values[1]", "az": "values[2]"},
                    timestamp="ts")
    samples = decoder.decode(b'{"ts": 12.5, "values": [1, -2, 3.5]}')
    assert samples.values.tolist() == [[1, -2, 3.5]]
    assert samples.timestamps is not None
    assert samples.timestamps.tolist() == [12.5]


def test_json_array_maps_the_features_in_model_order() -> None:
    decoder = _json(array="values", timestamp="ts", sequence="seq")
    samples = decoder.decode(b'{"ts": 1.0, "seq": 7, "values": [0.5, 0.25, -1]}')
    assert samples.values.tolist() == [[0.5, 0.25, -1]]
    assert samples.first_seq == 7


def test_json_paths_through_arrays_of_objects_and_blocks_of_arrays() -> None:
    decoder = _json(fields={"ax": "data.channels[2].value", "ay": "data.channels[0].value",
                            "az": "data.channels[1].value"},
                    extra_fields="ignore")
    payload = _dumps({"data": {"channels": [{"value": 2, "unit": "g"}, {"value": 3},
                                            {"value": 1}]}})
    assert decoder.decode(payload).values.tolist() == [[1, 2, 3]]
    block = _json(samples="data", array="v", timestamp="t")
    payload = _dumps({"data": [{"t": 1.0, "v": [1, 2, 3]}, {"t": 1.5, "v": [4, 5, 6]}]})
    assert block.decode(payload).values.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_json_index_paths_for_timestamp_sequence_and_asset() -> None:
    decoder = _json(array="v", timestamp="meta[0]", sequence="meta[1]", asset="id[0]")
    samples = decoder.decode(b'{"v": [1, 2, 3], "meta": [1.5, 4], "id": ["pump-1"]}')
    assert samples.timestamps is not None
    assert (samples.timestamps.tolist(), samples.first_seq, samples.asset) == ([1.5], 4, "pump-1")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"ts": 1.0, "values": [1, 2]}', "missing_field"),  # index out of range
        (b'{"ts": 1.0, "values": []}', "missing_field"),
        (b'{"ts": 1.0}', "missing_field"),
        (b'{"ts": 1.0, "values": {"0": 1, "1": 2, "2": 3}}', "malformed"),  # not an array
        (b'{"ts": 1.0, "values": "123"}', "malformed"),
        (b'{"ts": 1.0, "values": 5}', "malformed"),
        (b'{"ts": 1.0, "values": null}', "malformed"),
        (b'{"ts": 1.0, "values": [1, "2", 3]}', "non_numeric"),
        (b'{"ts": 1.0, "values": [1, null, 3]}', "non_numeric"),
        (b'{"ts": 1.0, "values": [1, true, 3]}', "non_numeric"),
        (b'{"ts": 1.0, "values": [[1], 2, 3]}', "non_numeric"),
        (b'{"ts": 1.0, "values": [1, 2, 1e39]}', "non_finite"),
        (b'{"ts": 1.0, "values": [1, 2, 3, 4]}', "extra_field"),  # an element nothing reads
        (b'{"ts": 1.0, "values": [1, 2, 3], "x": 1}', "extra_field"),
        (b'{"ts": [1.0], "values": [1, 2, 3]}', "bad_timestamp"),
    ],
)
def test_json_array_reasons(payload: bytes, reason: str) -> None:
    assert _reason(_json(array="values", timestamp="ts"), payload) == reason


def test_json_index_reasons_in_timestamp_and_asset_paths() -> None:
    decoder = _json(array="v", timestamp="meta[0]", asset="id[0]")
    assert _reason(decoder, b'{"v": [1, 2, 3], "meta": [], "id": ["a"]}') == "missing_field"
    assert _reason(decoder, b'{"v": [1, 2, 3], "meta": 5, "id": ["a"]}') == "malformed"
    assert _reason(decoder, b'{"v": [1, 2, 3], "meta": [1.0], "id": "pump"}') == "bad_asset"
    assert _reason(decoder, b'{"v": [1, 2, 3], "meta": [1.0], "id": [7]}') == "bad_asset"


def test_json_longer_arrays_are_fine_when_extra_fields_are_ignored() -> None:
    decoder = _json(array="values", extra_fields="ignore")
    assert decoder.decode(b'{"values": [1, 2, 3, 4, 5]}').values.tolist() == [[1, 2, 3]]
    sparse = {"ax": "c[0]", "ay": "c[2]", "az": "c[4]"}
    payload = b'{"c": [1, 0, 2, 0, 3]}'
    assert _json(fields=sparse, extra_fields="ignore").decode(payload).values.tolist() == [
        [1, 2, 3]
    ]
    assert _reason(_json(fields=sparse), payload) == "extra_field"  # c[1], c[3]: read by nothing


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"array": "v", "fields": {"ax": "x"}}, "not both"),
        ({"fields": {"ax": "v[-1]"}}, "dotted path"),
        ({"fields": {"ax": "v[x]"}}, "dotted path"),
        ({"fields": {"ax": "[0]"}}, "dotted path"),
        ({"fields": {"ax": "v[0"}}, "dotted path"),
        ({"array": "v.", "timestamp": "t"}, "dotted path"),
    ],
)
def test_inconsistent_json_array_config_is_refused(options: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        JsonDecoderConfig(**options)


def test_one_value_cannot_be_read_as_an_array_and_as_an_object() -> None:
    with pytest.raises(ConfigError, match=r"^decoder\.fields: .*overlaps.*object and as an array"):
        _json(fields={"ax": "v[0]", "ay": "v.y", "az": "z"})
    with pytest.raises(ConfigError, match=r"^decoder\.timestamp: .*overlaps"):
        _json(array="v", timestamp="v[1]")


# --- build errors name the key ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: _json(fields={"axx": "b"}),
         ("decoder.fields: 'axx' is not a feature of the model; did you mean 'ax'? "
         "(features: ax, ay, az)")),
        (lambda: _csv(["ax", "ay"]),
         ("decoder.columns: no column for the model's feature 'az' (features: ax, ay, az); "
         "every feature needs exactly one column")),
        (lambda: _csv(["ax", "ay", "azz"]),
         ("decoder.columns: 'azz' is not a feature of the model nor timestamp/sequence/asset/_; "
         "did you mean 'az' for 'azz'? (features: ax, ay, az)")),
    ],
)
def test_decoder_build_errors_start_with_the_key(build: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert str(info.value) == message


# --- binary --------------------------------------------------------------------------------------


def test_binary_float32_block_is_row_major() -> None:
    decoder = BinaryDecoder(BinaryDecoderConfig(), FEATURES)
    samples = decoder.decode(np.arange(6, dtype="<f4").tobytes())
    assert samples.values.dtype == np.float32
    assert samples.values.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert samples.timestamps is None
    assert samples.first_seq is None


def test_binary_int16_is_scaled_to_units() -> None:
    decoder = BinaryDecoder(BinaryDecoderConfig(dtype="int16", scale=0.001), FEATURES)
    samples = decoder.decode(np.array([1000, -2000, 32767], dtype="<i2").tobytes())
    assert samples.values.dtype == np.float32
    np.testing.assert_allclose(samples.values, [[1.0, -2.0, 32.767]], rtol=1e-6)


def test_binary_header_timestamps_and_sequence() -> None:
    config = BinaryDecoderConfig(header="timestamp_sequence", sample_interval_ms=10)
    payload = struct.pack("<dQ", 1_700_000_000.5, 77) + np.ones(6, dtype="<f4").tobytes()
    samples = BinaryDecoder(config, FEATURES).decode(payload)
    assert samples.first_seq == 77
    assert samples.timestamps is not None
    np.testing.assert_allclose(samples.timestamps, [1_700_000_000.5, 1_700_000_000.51])


def test_binary_timestamp_header_without_sequence() -> None:
    config = BinaryDecoderConfig(header="timestamp", sample_interval_ms=1)
    payload = struct.pack("<d", 10.0) + np.zeros(3, dtype="<f4").tobytes()
    samples = BinaryDecoder(config, FEATURES).decode(payload)
    assert samples.timestamps is not None
    assert samples.timestamps.tolist() == [10.0]
    assert samples.first_seq is None


_HEADERED = BinaryDecoderConfig(header="timestamp_sequence", sample_interval_ms=1)


@pytest.mark.parametrize(
    ("config", "payload", "reason"),
    [
        (BinaryDecoderConfig(), b"", "wrong_length"),
        (BinaryDecoderConfig(), b"\x00" * 11, "wrong_length"),
        (BinaryDecoderConfig(), b"\x00" * 13, "wrong_length"),
        (BinaryDecoderConfig(dtype="int16"), b"\x00" * 5, "wrong_length"),
        (_HEADERED, b"\x00" * 12, "wrong_length"),
        (_HEADERED, b"\x00" * 16, "wrong_length"),
        (BinaryDecoderConfig(), np.array([1, np.nan, 3], "<f4").tobytes(), "non_finite"),
        (BinaryDecoderConfig(), np.array([1, 2, -np.inf], "<f4").tobytes(), "non_finite"),
        (_HEADERED, struct.pack("<dQ", float("nan"), 0) + bytes(12), "bad_timestamp"),
        (_HEADERED, struct.pack("<dQ", float("inf"), 0) + bytes(12), "bad_timestamp"),
    ],
)
def test_binary_reasons(config: BinaryDecoderConfig, payload: bytes, reason: str) -> None:
    assert _reason(BinaryDecoder(config, FEATURES), payload) == reason


# --- CSV -----------------------------------------------------------------------------------------


def _csv(columns: list[str], **options: Any) -> CsvDecoder:
    return CsvDecoder(CsvDecoderConfig(columns=columns, **options), FEATURES)


_FULL = ["timestamp", "sequence", "asset", "az", "_", "ax", "ay"]


def test_csv_single_line_follows_model_feature_order() -> None:
    samples = _csv(["az", "ax", "ay"]).decode(b"3,1,2\n")
    assert samples.values.tolist() == [[1, 2, 3]]
    assert samples.timestamps is None
    assert samples.first_seq is None
    assert samples.asset is None


def test_csv_block_with_every_special_column() -> None:
    payload = b"1000,5,m1,3,ignored,1,2\r\n2000,6,m1,6,,4,5\r\n"
    samples = _csv(_FULL, timestamp_unit="ms").decode(payload)
    assert samples.values.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert samples.timestamps is not None
    assert samples.timestamps.tolist() == [1.0, 2.0]
    assert samples.first_seq == 5
    assert samples.asset == "m1"


def test_csv_other_delimiter() -> None:
    assert _csv(FEATURES, delimiter=";").decode(b"1;2;3").values.tolist() == [[1, 2, 3]]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "malformed"),
        (b"\n\r\n", "malformed"),
        (b"\xff,1,2", "malformed"),
        (b"1,2", "wrong_length"),
        (b"1,2,3,4", "wrong_length"),
        (b"1,2,3\n1,2", "wrong_length"),
        (b"1,x,3", "non_numeric"),
        (b"1,,3", "non_numeric"),
        (b"1,nan,3", "non_finite"),
        (b"1,inf,3", "non_finite"),
        (b"1,1e39,3", "non_finite"),
    ],
)
def test_csv_feature_reasons(payload: bytes, reason: str) -> None:
    assert _reason(_csv(FEATURES), payload) == reason


def test_long_csv_block_is_checked_as_thoroughly_as_a_short_one() -> None:
    lines = [f"{i},{i},m1,3,_,1,2" for i in range(40)]
    assert len(_csv(_FULL).decode("\n".join(lines).encode()).values) == 40
    for bad_line, reason in [
        ("39,39,m1,nan,_,1,2", "non_finite"),
        ("-1,39,m1,3,_,1,2", "bad_timestamp"),
    ]:
        payload = "\n".join([*lines[:-1], bad_line]).encode()
        assert _reason(_csv(_FULL), payload) == reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"soon,1,m1,3,_,1,2", "bad_timestamp"),
        (b"nan,1,m1,3,_,1,2", "bad_timestamp"),
        (b"-1,1,m1,3,_,1,2", "bad_timestamp"),
        (b"1,x,m1,3,_,1,2", "bad_sequence"),
        (b"1,-1,m1,3,_,1,2", "bad_sequence"),
        (b"1,1.5,m1,3,_,1,2", "bad_sequence"),
        (b"1,1,m1,3,_,1,2\n2,3,m1,3,_,1,2", "bad_sequence"),
        (b"1,1,,3,_,1,2", "bad_asset"),
        (b"1,1,a/b,3,_,1,2", "bad_asset"),
        (b"1,1,m1,3,_,1,2\n2,2,m2,3,_,1,2", "bad_asset"),
    ],
)
def test_csv_special_column_reasons(payload: bytes, reason: str) -> None:
    assert _reason(_csv(_FULL), payload) == reason


# --- configs -------------------------------------------------------------------------------------


def test_decoder_config_is_chosen_by_type() -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(DecoderConfig)
    assert isinstance(adapter.validate_python({"type": "json"}), JsonDecoderConfig)
    assert isinstance(adapter.validate_python({"type": "csv", "columns": ["a"]}), CsvDecoderConfig)
    binary = adapter.validate_python({"type": "binary", "dtype": "int16", "scale": 0.5})
    assert isinstance(binary, BinaryDecoderConfig)
    with pytest.raises(ValidationError, match="extra"):
        adapter.validate_python({"type": "json", "feilds": {}})


def test_make_decoder_builds_the_configured_format() -> None:
    assert isinstance(make_decoder(JsonDecoderConfig(), FEATURES), JsonDecoder)
    assert isinstance(make_decoder(BinaryDecoderConfig(), FEATURES), BinaryDecoder)
    assert isinstance(make_decoder(CsvDecoderConfig(columns=FEATURES), FEATURES), CsvDecoder)


@pytest.mark.parametrize(
    "options",
    [
        {"header": "timestamp"},
        {"sample_interval_ms": 10},
        {"scale": 2.0},
        {"dtype": "int16", "scale": 0},
        {"dtype": "int16", "scale": float("nan")},
        {"dtype": "int16", "scale": 1e35},
    ],
)
def test_inconsistent_binary_config_is_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        BinaryDecoderConfig(**options)


@pytest.mark.parametrize(
    "options",
    [
        {"columns": ["ax", "ax", "ay", "az"]},
        {"columns": ["timestamp", "timestamp", "ax"]},
        {"columns": ["ax"], "delimiter": ".."},
        {"columns": ["ax"], "delimiter": "\n"},
        {"columns": []},
    ],
)
def test_inconsistent_csv_config_is_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CsvDecoderConfig(**options)


def test_invalid_dotted_path_is_refused() -> None:
    with pytest.raises(ValidationError, match="dotted path"):
        JsonDecoderConfig(fields={"ax": "a..x"})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: _json(fields={"bx": "b"}), "bx"),
        (lambda: _json(fields={"ax": "v", "ay": "v"}), "overlaps"),
        (lambda: _json(fields={"ax": "a", "ay": "a.y"}), "overlaps"),
        (lambda: _json(timestamp="ax"), "overlaps"),
        (lambda: _json(samples="data", asset="data.asset"), "inside"),
        (lambda: _csv(["ax", "ay"]), "az"),
        (lambda: _csv(["ax", "ay", "az", "bz"]), "bz"),
        (lambda: JsonDecoder(JsonDecoderConfig(), []), "at least one"),
        (lambda: JsonDecoder(JsonDecoderConfig(), ["a", "a"]), "unique"),
        (lambda: CsvDecoder(CsvDecoderConfig(columns=["timestamp"]), ["timestamp"]), "reserved"),
    ],
)
def test_config_that_does_not_fit_the_features_is_a_config_error(build: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_asset_names() -> None:
    for good in ["pump-7", "Line 3 Pump", "m.1", "x" * 128, "Förderband"]:
        assert check_asset(good) == good
    for bad in ["", " a", "a ", ".", "..", "$SYS", "a\x00b", "a\nb", "x" * 129, None, 5]:
        with pytest.raises(DecodeError) as info:
            check_asset(bad)
        assert info.value.reason == "bad_asset"


def test_every_reason_raised_in_the_stages_is_declared() -> None:
    used: set[str] = set()
    stages = [Path(str(window_module.__file__))]
    stages += Path(str(decoders.__file__)).parent.glob("*.py")  # every decoder plugin
    for path in stages:
        source = path.read_text(encoding="utf-8")
        used |= set(re.findall(r'DecodeError\(\s*"(\w+)"', source))
    assert used
    assert used <= REASONS


# --- hostile input: only DecodeError escapes -----------------------------------------------------


_DECODERS: list[Decoder] = [
    _json(),
    _json(extra_fields="ignore"),
    _block_json(),
    JsonDecoder(
        JsonDecoderConfig(fields={"ax": "a.x", "ay": "a.y", "az": "z"}, samples="b.s"), FEATURES
    ),
    BinaryDecoder(BinaryDecoderConfig(), FEATURES),
    BinaryDecoder(BinaryDecoderConfig(dtype="int16", scale=0.01), FEATURES),
    BinaryDecoder(_HEADERED, FEATURES),
    _csv(FEATURES),
    _csv(_FULL),
    _json(array="a", timestamp="t"),
    _json(fields={"ax": "a[0].x", "ay": "a[1]", "az": "b.s[2]"}, extra_fields="ignore"),
    _json(samples="b.s", array="a", sequence="x", asset="data"),
]


def _only_decode_errors(decoder: Decoder, payload: bytes) -> None:
    try:
        samples = decoder.decode(payload)
    except DecodeError as exc:
        if exc.reason not in REASONS:
            pytest.fail(f"undeclared reason {exc.reason!r}")
        return
    n = len(samples.values)
    assert n >= 1
    assert samples.values.shape == (n, len(FEATURES))
    assert samples.values.dtype == np.float32
    assert np.isfinite(samples.values).all()
    if samples.timestamps is not None:
        assert samples.timestamps.shape == (n,)
        assert np.isfinite(samples.timestamps).all()


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(_DECODERS), st.binary(max_size=64))
def test_arbitrary_bytes_raise_only_decode_errors(decoder: Decoder, payload: bytes) -> None:
    _only_decode_errors(decoder, payload)


_KEYS = st.sampled_from(["ax", "ay", "az", "t", "seq", "asset", "data", "a", "x", "z", "b", "s"])
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_JSON = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=6),
    max_leaves=25,
)


@settings(max_examples=250, deadline=None)
@given(st.sampled_from(_DECODERS), _JSON)
def test_plausible_json_raises_only_decode_errors(decoder: Decoder, value: Any) -> None:
    _only_decode_errors(decoder, _dumps(value))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"ax": _LEAVES, "ay": _LEAVES, "az": _LEAVES},
            optional={"t": _LEAVES, "seq": _LEAVES, "extra": _LEAVES},
        ),
        max_size=3,
    ),
    _LEAVES,
)
def test_right_keys_with_wrong_values_raise_only_decode_errors(
    samples: list[dict[str, Any]], asset: Any
) -> None:
    payload = _dumps({"asset": asset, "data": samples})
    _only_decode_errors(_block_json(), payload)
    for sample in samples:
        _only_decode_errors(_json(), _dumps(sample))


_CELLS = st.sampled_from(
    ["1", "-2.5", "1e39", "nan", "", "x", "m1", "a/b", "7", "-1", " 3 ", "1e400"]
)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([_csv(FEATURES), _csv(_FULL)]),
    st.lists(st.lists(_CELLS, min_size=1, max_size=8), max_size=4),
    st.sampled_from(["\n", "\r\n"]),
)
def test_plausible_csv_raises_only_decode_errors(
    decoder: Decoder, rows: list[list[str]], newline: str
) -> None:
    _only_decode_errors(decoder, newline.join(",".join(row) for row in rows).encode())


def test_binary_values_whose_sum_overflows_are_still_finite_and_kept() -> None:
    # The finite check is one sum: values whose sum is beyond float32 must not read as inf.
    big = np.full((4, len(FEATURES)), 3.0e38, "<f4")
    big[1] *= -1
    samples = BinaryDecoder(BinaryDecoderConfig(), FEATURES).decode(big.tobytes())
    np.testing.assert_array_equal(samples.values, big)
    big[3, 1] = np.inf
    with pytest.raises(DecodeError) as caught:
        BinaryDecoder(BinaryDecoderConfig(), FEATURES).decode(big.tobytes())
    assert caught.value.reason == "non_finite"
