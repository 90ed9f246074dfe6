"""backend.topics: MQTT topic names and exact payload formatting."""

from __future__ import annotations

import re
from decimal import Decimal, localcontext

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.amounts import format_kw, format_kwh
from backend.topics import QUANTITIES, availability_topic, meter_prefix, state_topic


def test_main_meter_keeps_the_original_topics():
    assert state_topic("home/energy", "main", "active", "energy") == "home/energy/active_energy"
    assert state_topic("home/energy", "main", "reactive", "power") == "home/energy/reactive_power"


def test_other_meters_get_a_sub_level():
    assert state_topic("home/energy", "garage", "active", "energy") == "home/energy/garage/active_energy"
    assert state_topic("x", "Main", "active", "power") == "x/Main/active_power"  # meter ids are case-sensitive


def test_meter_prefix():
    assert meter_prefix("home/energy", "main") == "home/energy"
    assert meter_prefix("home/energy", "shed") == "home/energy/shed"


def test_all_topics_of_two_meters_are_distinct():
    topics = {state_topic("p", meter, channel, quantity)
              for meter in ("main", "garage") for channel in ("active", "reactive") for quantity in QUANTITIES}
    assert len(topics) == 8
    assert availability_topic("p") not in topics


def test_availability_topic():
    assert availability_topic("home/energy") == "home/energy/status"


@pytest.mark.parametrize(("uwh", "text"), [
    (0, "0"),
    (1, "0.000000001"),
    (1_000_000, "0.001"),
    (1_234_500_000, "1.2345"),
    (1_000_000_000, "1"),
    (10_000_000_000, "10"),
    (123_456_789_012_345, "123456.789012345"),
    (10**27, "1" + "0" * 18),
])
def test_format_kwh(uwh: int, text: str):
    assert format_kwh(uwh) == text


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**30))
def test_format_kwh_is_exact(uwh: int):
    text = format_kwh(uwh)
    with localcontext(prec=100):
        assert Decimal(text) == Decimal(uwh) / 10**9
    assert re.fullmatch(r"(0|[1-9][0-9]*)(\.[0-9]*[1-9])?", text), "plain decimal without trailing zeros"


@pytest.mark.parametrize(("watts", "text"), [
    (0.0, "0.000"),
    (3000.0, "3.000"),
    (1234.5678, "1.235"),
    (0.4, "0.000"),
    (999.9996, "1.000"),
    (100_000.0, "100.000"),
])
def test_format_kw(watts: float, text: str):
    assert format_kw(watts) == text


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1e6))
def test_format_kw_is_within_half_a_watt(watts: float):
    assert abs(float(format_kw(watts)) * 1000 - watts) <= 0.5 + 1e-6
