"""backend.power.displayed_power_w: the measured power, bounded while idle, 0 after a timeout."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.ledger import ChannelState
from backend.power import displayed_power_w

S = 1_000_000_000
TIMEOUT_S = 300.0


def three_kw() -> ChannelState:
    """1 Wh pulses 1.2 s apart (3 kW); the last one at t = 0."""
    return ChannelState(last_ts_ns=0, wh=1.0, intervals_ns=[1_200_000_000])


def test_none_before_any_pulse():
    assert displayed_power_w(ChannelState(), now_ns=10 * S, timeout_s=TIMEOUT_S) is None


def test_none_after_a_gap_until_the_timeout():
    state = ChannelState(last_ts_ns=0, wh=1.0, intervals_ns=[])
    assert displayed_power_w(state, now_ns=1 * S, timeout_s=TIMEOUT_S) is None
    assert displayed_power_w(state, now_ns=299 * S, timeout_s=TIMEOUT_S) is None
    assert displayed_power_w(state, now_ns=300 * S, timeout_s=TIMEOUT_S) == 0.0


def test_measured_power_while_the_bound_is_higher():
    assert displayed_power_w(three_kw(), now_ns=1 * S, timeout_s=TIMEOUT_S) == pytest.approx(3000.0)


def test_measured_power_right_at_the_pulse_and_before_it():
    assert displayed_power_w(three_kw(), now_ns=0, timeout_s=TIMEOUT_S) == pytest.approx(3000.0)
    assert displayed_power_w(three_kw(), now_ns=-5 * S, timeout_s=TIMEOUT_S) == pytest.approx(3000.0)


def test_bound_takes_over_once_below_the_measurement():
    # One 1 Wh pulse in 36 s is at most 100 W.
    assert displayed_power_w(three_kw(), now_ns=36 * S, timeout_s=TIMEOUT_S) == pytest.approx(100.0)
    assert displayed_power_w(three_kw(), now_ns=72 * S, timeout_s=TIMEOUT_S) == pytest.approx(50.0)


def test_bound_uses_the_channel_wh():
    state = ChannelState(last_ts_ns=0, wh=0.5, intervals_ns=[600_000_000])  # 3 kW with 0.5 Wh pulses
    assert displayed_power_w(state, now_ns=36 * S, timeout_s=TIMEOUT_S) == pytest.approx(50.0)


def test_bound_is_relative_to_the_last_pulse_time():
    state = ChannelState(last_ts_ns=1_000 * S, wh=1.0, intervals_ns=[1_200_000_000])
    assert displayed_power_w(state, now_ns=1_036 * S, timeout_s=TIMEOUT_S) == pytest.approx(100.0)


def test_zero_at_and_after_the_timeout():
    assert displayed_power_w(three_kw(), now_ns=300 * S - 1, timeout_s=TIMEOUT_S) > 0
    assert displayed_power_w(three_kw(), now_ns=300 * S, timeout_s=TIMEOUT_S) == 0.0
    assert displayed_power_w(three_kw(), now_ns=10_000 * S, timeout_s=TIMEOUT_S) == 0.0


def test_timeout_is_configurable():
    assert displayed_power_w(three_kw(), now_ns=10 * S, timeout_s=10) == 0.0
    assert displayed_power_w(three_kw(), now_ns=10 * S, timeout_s=10.5) == pytest.approx(360.0)


def test_smoothed_measurement_is_the_mean_over_intervals():
    state = ChannelState(last_ts_ns=0, wh=1.0, intervals_ns=[1 * S, 2 * S, 3 * S])
    assert displayed_power_w(state, now_ns=1, timeout_s=TIMEOUT_S) == pytest.approx(3 * 3600 / 6)


states = st.builds(
    ChannelState,
    last_ts_ns=st.one_of(st.none(), st.integers(0, 10**18)),
    wh=st.sampled_from([0.1, 0.5, 1.0, 2.0, 10.0]),
    intervals_ns=st.lists(st.integers(1, 3600 * S), max_size=5),
)


@settings(max_examples=200, deadline=None)
@given(states, st.integers(-10**12, 10**15), st.floats(1, 3600))
def test_displayed_power_is_never_above_measured_nor_negative(state: ChannelState, offset_ns: int,
                                                              timeout_s: float):
    now_ns = (state.last_ts_ns or 0) + offset_ns
    shown = displayed_power_w(state, now_ns, timeout_s)
    measured = state.power_w()
    if state.last_ts_ns is None:
        assert shown is None
        return
    if shown is None:
        assert measured is None
        return
    assert shown >= 0
    if measured is not None:
        assert shown <= measured


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 299 * S), min_size=2, max_size=10, unique=True))
def test_displayed_power_never_rises_while_idle(times: list[int]):
    state = three_kw()
    shown = [displayed_power_w(state, now_ns=t, timeout_s=TIMEOUT_S) for t in sorted(times)]
    assert all(later <= earlier for earlier, later in itertools.pairwise(shown))
