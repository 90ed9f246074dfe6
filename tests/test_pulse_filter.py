"""edge.pulse_filter.PulseFilter: noise rejection by pulse width and spacing."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.pulse_filter import PulseFilter


@pytest.fixture
def f() -> PulseFilter:
    return PulseFilter(min_width_s=0.005, min_interval_s=0.02)


def pulse(flt: PulseFilter, rise: float, fall: float) -> float | None:
    assert flt.edge(rise, True) is None  # an activation never yields a pulse
    return flt.edge(fall, False)


def test_valid_pulse_is_timed_at_its_trailing_edge(f: PulseFilter):
    assert pulse(f, 10.0, 10.03) == 10.03
    assert f.rejected == 0


def test_pulse_shorter_than_min_width_is_rejected(f: PulseFilter):
    assert pulse(f, 10.0, 10.004) is None
    assert f.rejected == 1


def test_pulse_of_exactly_min_width_is_accepted():
    flt = PulseFilter(min_width_s=0.25, min_interval_s=0.5)  # binary-exact values
    assert pulse(flt, 1.0, 1.25) == 1.25


def test_pulse_ending_too_soon_after_the_previous_one_is_rejected(f: PulseFilter):
    pulse(f, 1.0, 1.03)
    assert pulse(f, 1.036, 1.045) is None  # wide enough, but ends 15 ms after the previous
    assert f.rejected == 1


def test_pulse_ending_exactly_min_interval_after_the_previous_is_accepted():
    flt = PulseFilter(min_width_s=0.125, min_interval_s=0.5)
    pulse(flt, 1.0, 1.25)
    assert pulse(flt, 1.5, 1.75) == 1.75


def test_interval_is_measured_from_the_last_accepted_pulse_not_a_rejected_one(f: PulseFilter):
    pulse(f, 1.000, 1.030)
    assert pulse(f, 1.045, 1.046) is None  # glitch
    assert pulse(f, 1.040, 1.049) is None  # 19 ms after the accepted one: too close
    assert pulse(f, 1.044, 1.051) == 1.051  # 21 ms after the accepted one
    assert f.rejected == 2


def test_deactivation_without_activation_is_ignored_and_not_counted(f: PulseFilter):
    assert f.edge(5.0, False) is None  # the input was already active at start-up
    assert f.rejected == 0
    assert pulse(f, 6.0, 6.03) == 6.03


def test_second_deactivation_in_a_row_is_ignored(f: PulseFilter):
    assert pulse(f, 1.0, 1.03) == 1.03
    assert f.edge(2.0, False) is None
    assert f.rejected == 0


def test_width_is_measured_from_the_latest_activation(f: PulseFilter):
    f.edge(1.0, True)
    f.edge(1.1, True)
    assert f.edge(1.102, False) is None  # 2 ms since the latest activation
    assert f.rejected == 1


def test_first_pulse_has_no_interval_constraint():
    flt = PulseFilter(min_width_s=0.001, min_interval_s=1000.0)
    assert pulse(flt, 0.0, 0.01) == 0.01


def test_zero_thresholds_accept_everything():
    flt = PulseFilter(min_width_s=0.0, min_interval_s=0.0)
    assert [pulse(flt, t, t) for t in (1.0, 1.0, 2.0)] == [1.0, 1.0, 2.0]
    assert flt.rejected == 0


def test_channels_are_independent_filters():
    a, b = PulseFilter(0.005, 0.02), PulseFilter(0.005, 0.02)
    assert pulse(a, 1.0, 1.03) == 1.03
    assert pulse(b, 1.035, 1.04) == 1.04  # would be too close on the same filter


edges = st.lists(st.tuples(st.floats(0, 0.1), st.booleans()), max_size=60)


@settings(max_examples=200, deadline=None)
@given(edges)
def test_accepted_pulses_respect_width_and_spacing(steps: list[tuple[float, bool]]):
    flt = PulseFilter(min_width_s=0.005, min_interval_s=0.02)
    ticks = list(itertools.accumulate(dt for dt, _ in steps))
    accepted, rise, deactivations = [], None, 0
    for t, (_, active) in zip(ticks, steps, strict=True):
        result = flt.edge(t, active)
        if active:
            assert result is None
            rise = t
            continue
        if rise is not None:
            deactivations += 1
            if result is not None:
                assert result == t
                assert t - rise >= 0.005
                accepted.append(t)
        else:
            assert result is None
        rise = None
    assert all(b - a >= 0.02 for a, b in itertools.pairwise(accepted))
    assert flt.rejected == deactivations - len(accepted)
