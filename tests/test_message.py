"""common.message: the pulse and control message contract between edge and backend."""

from __future__ import annotations

import contextlib
import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.message import (
    MAX_BODY_BYTES,
    MAX_WH,
    MessageError,
    Pulse,
    SetTotal,
    decode,
    decode_control,
    encode,
    encode_set_total,
    validate_meter_id,
)
from common.topology import pulse_routing_key

VALID: dict[str, Any] = {"v": 1, "meter": "main", "channel": "active", "epoch": "3f9a0c1d2e4b5a69",
                         "seq": 42, "ts_ns": 1_764_384_000_123_456_789, "wh": 1}


def body(**changes: Any) -> bytes:
    """A valid pulse body with some fields replaced (or removed, with the value ``...``)."""
    doc = {**VALID, **changes}
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def control_body(**changes: Any) -> bytes:
    doc = {"v": 1, "type": "set_total", "id": "c0ffee", "meter": "main", "channel": "active", "kwh": "12345.678",
           "ts_ns": 1_700_000_000_000_000_000, **changes}
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


meters = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
epochs = st.from_regex(r"[0-9a-f]{1,64}", fullmatch=True)
pulses = st.builds(
    Pulse,
    meter=meters,
    channel=st.sampled_from(["active", "reactive"]),
    epoch=epochs,
    seq=st.integers(1, 2**63 - 1),
    ts_ns=st.integers(1, 2**63 - 1),
    wh=st.one_of(st.floats(0, MAX_WH, exclude_min=True, allow_nan=False), st.integers(1, int(MAX_WH))),
)


# --- valid messages -------------------------------------------------------------------------------

def test_decode_of_the_documented_example():
    assert decode(body()) == Pulse("main", "active", "3f9a0c1d2e4b5a69", 42, 1_764_384_000_123_456_789, 1.0)


def test_decode_returns_wh_as_float():
    assert isinstance(decode(body(wh=2)).wh, float)
    assert decode(body(wh=0.5)).wh == 0.5


def test_encode_is_compact_json_with_integral_wh_as_integer():
    encoded = encode(Pulse("main", "active", "ab12", 7, 1_700_000_000_000_000_000, 1.0))
    assert encoded == (b'{"v":1,"meter":"main","channel":"active","epoch":"ab12","seq":7,'
                       b'"ts_ns":1700000000000000000,"wh":1}')


def test_encode_keeps_fractional_wh():
    assert json.loads(encode(Pulse("main", "reactive", "ab", 1, 5, 0.25)))["wh"] == 0.25


@settings(max_examples=200, deadline=None)
@given(pulses)
def test_encode_decode_roundtrip(pulse: Pulse):
    decoded = decode(encode(pulse))
    assert decoded == pulse
    assert isinstance(decoded.wh, float)
    assert len(encode(pulse)) <= MAX_BODY_BYTES


def test_routing_key_and_message_id():
    pulse = Pulse("garage", "reactive", "ab12", 7, 1, 1.0)
    assert pulse.routing_key == pulse_routing_key("garage", "reactive") == "pulse.garage.reactive"
    assert pulse.message_id == "garage:reactive:ab12:7"


def test_message_id_differs_between_pulses_and_is_stable_across_resends():
    a = Pulse("main", "active", "ab", 1, 10, 1.0)
    assert a.message_id == decode(encode(a)).message_id
    assert a.message_id != Pulse("main", "active", "ab", 2, 10, 1.0).message_id
    assert a.message_id != Pulse("main", "active", "ac", 1, 10, 1.0).message_id
    assert a.message_id != Pulse("main", "reactive", "ab", 1, 10, 1.0).message_id


def test_boundary_values_are_accepted():
    assert decode(body(seq=1)).seq == 1
    assert decode(body(ts_ns=1)).ts_ns == 1
    assert decode(body(ts_ns=2**63 - 1)).ts_ns == 2**63 - 1
    assert decode(body(wh=MAX_WH)).wh == MAX_WH
    assert decode(body(meter="a" * 64)).meter == "a" * 64
    assert decode(body(epoch="f" * 64)).epoch == "f" * 64
    assert decode(body(meter="Garage_2-b")).meter == "Garage_2-b"


def test_body_of_exactly_the_size_limit_is_accepted():
    raw = body()
    padded = raw + b" " * (MAX_BODY_BYTES - len(raw))
    assert len(padded) == MAX_BODY_BYTES
    assert decode(padded).seq == 42


# --- malformed bodies -----------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "problem"), [
    (b"", "empty body"),
    (b"{not json", "not JSON"),
    (b'{"v": 1,', "not JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"meter": "m\xe9ter"}', "not UTF-8"),
    (b"[1, 2]", "JSON object, got list"),
    (b'"main"', "JSON object, got str"),
    (b"42", "JSON object, got int"),
    (b"null", "JSON object, got NoneType"),
])
def test_bodies_that_are_not_a_json_object(raw: bytes, problem: str):
    with pytest.raises(MessageError, match=problem):
        decode(raw)


def test_oversize_body_is_rejected_before_parsing():
    raw = body()
    padded = raw + b" " * (MAX_BODY_BYTES + 1 - len(raw))
    with pytest.raises(MessageError, match=rf"{MAX_BODY_BYTES + 1} bytes, limit is {MAX_BODY_BYTES}"):
        decode(padded)


@pytest.mark.parametrize("version", [0, 2, True, "1", None, [1], ...])
def test_wrong_or_missing_schema_version(version: Any):
    with pytest.raises(MessageError, match="unsupported schema version"):
        decode(body(v=version))


@pytest.mark.parametrize("field", ["meter", "channel", "epoch", "seq", "ts_ns", "wh"])
def test_each_missing_field_is_named(field: str):
    with pytest.raises(MessageError, match=f"missing field\\(s\\): {field}$"):
        decode(body(**{field: ...}))


def test_all_missing_fields_are_listed_sorted():
    with pytest.raises(MessageError, match="missing field\\(s\\): seq, ts_ns, wh"):
        decode(json.dumps({"v": 1, "meter": "main", "channel": "active", "epoch": "ab"}).encode())


@pytest.mark.parametrize("channel", ["Active", "apparent", "", 1, None, ["active"]])
def test_unknown_channel(channel: Any):
    with pytest.raises(MessageError, match="channel must be one of active, reactive"):
        decode(body(channel=channel))


@pytest.mark.parametrize("seq", [0, -1, 1.0, 1.5, "1", True, None, [1], 2**63, 2**70])
def test_bad_seq(seq: Any):
    with pytest.raises(MessageError, match="seq must be an integer from 1 to 2\\^63-1"):
        decode(body(seq=seq))


@pytest.mark.parametrize("epoch", ["", "ABCD", "3F9A", "xyz", "ab-cd", " ab", "a" * 65, 123, None])
def test_bad_epoch(epoch: Any):
    with pytest.raises(MessageError, match="epoch must be 1-64 lowercase hex digits"):
        decode(body(epoch=epoch))


@pytest.mark.parametrize("ts_ns", [0, -1, 1.5e18, 1.0, 2**63, 10**30, "1764384000123456789", True])
def test_bad_ts_ns(ts_ns: Any):
    with pytest.raises(MessageError, match="ts_ns must be a positive 64-bit integer"):
        decode(body(ts_ns=ts_ns))


@pytest.mark.parametrize("wh", [0, 0.0, -1, -0.5, float("nan"), float("inf"), float("-inf"),
                                MAX_WH + 0.001, 1e308, True, False, "1", None, [1]])
def test_bad_wh(wh: Any):
    with pytest.raises(MessageError, match="wh must be a number > 0"):
        decode(body(wh=wh))


@pytest.mark.parametrize("meter", ["", "a" * 65, "main meter", "main.sub", "main/x", "mäin", "main#", 5, None])
def test_bad_meter(meter: Any):
    with pytest.raises(MessageError, match="meter must be 1-64 characters"):
        decode(body(meter=meter))


def test_meter_with_trailing_newline_is_rejected():
    with pytest.raises(MessageError, match="meter"):
        decode(body(meter="main\n"))


def test_epoch_with_trailing_newline_is_rejected():
    with pytest.raises(MessageError, match="epoch"):
        decode(body(epoch="ab12\n"))


def test_deeply_nested_json_within_the_size_limit_is_a_message_error():
    with pytest.raises(MessageError):
        decode(b"[" * 4000)


def test_error_text_is_truncated_for_huge_values():
    with pytest.raises(MessageError) as info:
        decode(body(meter="x" * 3000))
    assert len(str(info.value)) < 200


def test_message_error_is_a_value_error():
    assert issubclass(MessageError, ValueError)


def test_encode_validates_the_pulse():
    with pytest.raises(MessageError, match="seq"):
        encode(Pulse("main", "active", "ab", 0, 1, 1.0))
    with pytest.raises(MessageError, match="channel"):
        encode(Pulse("main", "apparent", "ab", 1, 1, 1.0))
    with pytest.raises(MessageError, match="wh"):
        encode(Pulse("main", "active", "ab", 1, 1, 0.0))


def test_validate_meter_id():
    assert validate_meter_id("garage-2") == "garage-2"
    with pytest.raises(MessageError):
        validate_meter_id("garage 2")
    with pytest.raises(MessageError):
        validate_meter_id(None)


# --- robustness properties ------------------------------------------------------------------------

def _decode_or_message_error(raw: bytes) -> Pulse | None:
    try:
        return decode(raw)
    except MessageError:
        return None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=MAX_BODY_BYTES + 16))
def test_arbitrary_bytes_raise_nothing_but_message_error(raw: bytes):
    _decode_or_message_error(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(VALID)), json_values)
def test_any_json_value_in_any_field_gives_a_pulse_or_message_error(field: str, value: Any):
    result = _decode_or_message_error(body(**{field: value}))
    if result is not None:  # then it must be a fully valid pulse
        assert decode(encode(result)) == result


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_any_json_document_gives_nothing_but_message_error(doc: Any):
    _decode_or_message_error(json.dumps(doc).encode())


# --- control messages -----------------------------------------------------------------------------

def test_set_total_roundtrip_and_properties():
    command = SetTotal("garage", "reactive", Decimal("12345.678901234"), 1_700_000_000_000_000_000, "ab12")
    assert decode_control(encode_set_total(command)) == command
    assert command.routing_key == "control.garage"
    assert command.total_uwh == 12_345_678_901_234


@settings(max_examples=200, deadline=None)
@given(meter=meters, channel=st.sampled_from(["active", "reactive"]),
       kwh=st.decimals(min_value=0, max_value=10**9, places=9, allow_nan=False, allow_infinity=False))
def test_set_total_roundtrip_is_exact(meter: str, channel: str, kwh: Decimal):
    decoded = decode_control(encode_set_total(SetTotal(meter, channel, kwh, 1_700_000_000_000_000_000, "ab12")))
    assert decoded.kwh == kwh
    assert decoded.total_uwh == int(kwh.scaleb(9))


def test_control_accepts_kwh_as_json_number():
    assert decode_control(control_body(kwh=12.5)).total_uwh == 12_500_000_000


@pytest.mark.parametrize(("raw", "problem"), [
    (b"", "not JSON"),
    (b"{oops", "not JSON"),
    (b"\xff{}", "not UTF-8"),
    (b"[]", "must be a JSON object"),
    (control_body(type="reset"), "unknown control message type"),
    (control_body(type=...), "unknown control message type"),
    (control_body(v=2), "unsupported schema version"),
    (control_body(v="1"), "unsupported schema version"),
    (control_body(kwh=...), "lacks 'kwh'"),
    (control_body(meter=...), "lacks 'meter'"),
    (control_body(channel=...), "lacks 'channel'"),
    (control_body(kwh="twelve"), "kwh must be a decimal number"),
    (control_body(kwh=None), "kwh must be a decimal number"),
    (control_body(kwh=True), "kwh must be a decimal number"),
    (control_body(kwh="NaN"), "kwh must be a number from 0 to 1e9"),
    (control_body(kwh="Infinity"), "kwh must be a number from 0 to 1e9"),
    (control_body(kwh="-0.001"), "kwh must be a number from 0 to 1e9"),
    (control_body(kwh="1000000000.001"), "kwh must be a number from 0 to 1e9"),
    (control_body(channel="apparent"), "channel must be one of"),
    (control_body(id=...), "lacks 'id'"),
    (control_body(id="NOT HEX"), "id must be 1-64 lowercase hex digits"),
    (control_body(ts_ns=...), "lacks 'ts_ns'"),
    (control_body(ts_ns="yesterday"), "ts_ns must be a positive 64-bit integer"),
    (control_body(meter="bad meter"), "meter must be"),
])
def test_malformed_control_messages(raw: bytes, problem: str):
    with pytest.raises(MessageError, match=problem):
        decode_control(raw)


def test_control_with_boolean_version_is_rejected():
    with pytest.raises(MessageError):
        decode_control(control_body(v=True))


def test_encode_set_total_validates():
    with pytest.raises(MessageError):
        encode_set_total(SetTotal("main", "active", Decimal(-1), 1, "ab"))
    with pytest.raises(MessageError):
        encode_set_total(SetTotal("main", "apparent", Decimal(1), 1, "ab"))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_as_control_raise_nothing_but_message_error(raw: bytes):
    with contextlib.suppress(MessageError):
        decode_control(raw)
