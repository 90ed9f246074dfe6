"""The writer's trust decisions: energy from the counter whatever the timestamps say.

Properties over arbitrary (valid) timestamps and writer clocks: a stream of
consecutive pulses the writer receives no faster than the power limit allows
is always counted exactly; power is never negative and
never comes from an untrusted timestamp; a jump is judged over the longer of
the edge's trusted interval and the writer's receive interval, and a pulse by
the credit of either clock, so a wrong edge clock can never make the guard
refuse genuine pulses.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.ledger import ChannelState, Implausible, Ledger
from backend.power import displayed_power_w
from backend.trust import credit_doubt, jump_doubt, timestamp_doubt
from common.message import Pulse
from tests.support import T0, S

MAX_W = 100_000.0
YEAR = 365 * 24 * 3600 * S

timestamps = st.integers(min_value=1, max_value=2**63 - 1)
ONE_PULSE_AT_THE_LIMIT_NS = 36_000_000  # 1 Wh at 100 kW


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(timestamps, st.sampled_from([None, True, False])), min_size=1, max_size=40),
       st.integers(min_value=T0 - YEAR, max_value=T0 + YEAR), st.integers(ONE_PULSE_AT_THE_LIMIT_NS, 10 * S))
def test_consecutive_pulses_are_all_counted_whatever_their_timestamps(stamps: list[tuple[int, bool | None]],
                                                                       start_ns: int, step_ns: int) -> None:
    ledger = Ledger(max_power_w=MAX_W)
    now = start_ns
    for seq, (ts, synced) in enumerate(stamps, start=1):
        now += step_ns
        assert ledger.apply(Pulse("main", "active", "e1", seq, ts, 1.0, synced), now_ns=now) == 1
        state = ledger.channel("main", "active")
        power = state.power_w()
        assert power is None or (power > 0 and math.isfinite(power))
        if state.ts_doubt:
            assert power is None and displayed_power_w(state, now, 300) is None
    assert ledger.channel("main", "active").total_uwh == len(stamps) * 1_000_000


@given(ts=timestamps, now=timestamps, previous=st.none() | timestamps, ahead=st.integers(0, YEAR))
def test_a_timestamp_is_trusted_exactly_when_it_is_not_ahead_and_after_the_previous(ts: int, now: int,
                                                                                    previous: int | None,
                                                                                    ahead: int) -> None:
    doubt = timestamp_doubt(ts, now_ns=now, previous_ns=previous, max_ahead_ns=ahead, synced=None)
    assert (doubt == "") == (ts <= now + ahead and (previous is None or ts > previous))
    assert timestamp_doubt(ts, now_ns=now, previous_ns=previous, max_ahead_ns=ahead, synced=False) != ""


@given(new=st.integers(1, 10**6), wh=st.sampled_from([0.1, 1.0, 10.0]), edge=st.none() | st.integers(0, YEAR),
       received=st.integers(0, YEAR))
def test_no_edge_clock_can_refuse_a_jump_the_writer_clock_accepts(new: int, wh: float, edge: int | None,
                                                                  received: int) -> None:
    by_writer = jump_doubt(new, wh=wh, edge_elapsed_ns=None, received_elapsed_ns=received, max_power_w=MAX_W)
    with_edge = jump_doubt(new, wh=wh, edge_elapsed_ns=edge, received_elapsed_ns=received, max_power_w=MAX_W)
    assert not (by_writer == "" and with_edge != "")
    if new == 1:
        assert with_edge == ""


@given(edge=st.none() | st.integers(-YEAR, YEAR), received=st.none() | st.integers(-YEAR, YEAR),
       slack=st.integers(0, S))
def test_no_edge_clock_can_refuse_a_pulse_the_writer_clock_lets_through(edge: int | None, received: int | None,
                                                                       slack: int) -> None:
    by_writer = credit_doubt(edge_ahead_ns=None, received_ahead_ns=received, slack_ns=slack, max_power_w=MAX_W)
    with_edge = credit_doubt(edge_ahead_ns=edge, received_ahead_ns=received, slack_ns=slack, max_power_w=MAX_W)
    assert not (by_writer == "" and received is not None and with_edge != "")
    known = [ahead for ahead in (edge, received) if ahead is not None]
    assert (with_edge == "") == (not known or min(known) <= slack)


def test_a_big_jump_is_judged_by_the_writer_clock_when_the_edge_clock_is_ahead() -> None:
    ledger = Ledger(max_power_w=MAX_W)
    ledger.apply(Pulse("main", "active", "e1", 1, T0, 1.0), now_ns=T0)
    # An hour later by the writer's clock, 50 pulses arrive at once, stamped two hours ahead: 50 Wh/h is fine.
    assert ledger.apply(Pulse("main", "active", "e1", 51, T0 + 3 * 3600 * S, 1.0), now_ns=T0 + 3600 * S) == 50
    # A jump of a million pulses a second later is refused, though the edge clock claims hours passed.
    with pytest.raises(Implausible, match="jump of 1000000 pulses"):
        ledger.apply(Pulse("main", "active", "e1", 1_000_051, T0 + 9 * 3600 * S, 1.0), now_ns=T0 + 3601 * S)


def test_a_readmitted_jump_is_counted() -> None:
    ledger = Ledger(max_power_w=MAX_W)
    ledger.apply(Pulse("main", "active", "e1", 1, T0, 1.0), now_ns=T0)
    big = Pulse("main", "active", "e1", 1001, T0 + S, 1.0)
    with pytest.raises(Implausible):
        ledger.apply(big, now_ns=T0 + S)
    assert ledger.apply(big, now_ns=T0 + 2 * S, readmitted=True) == 1000
    assert ledger.apply(big, now_ns=T0 + 3 * S, readmitted=True) == 0  # readmitting twice counts once


def test_power_resumes_after_the_clock_is_corrected() -> None:
    ledger = Ledger(max_power_w=MAX_W)
    now = T0
    for seq in range(1, 4):  # trusted, 1 s apart: 3.6 kW
        now += S
        ledger.apply(Pulse("main", "active", "e1", seq, now, 1.0), now_ns=now)
    for seq in range(4, 7):  # the edge's clock runs an hour ahead
        now += S
        ledger.apply(Pulse("main", "active", "e1", seq, now + 3600 * S, 1.0), now_ns=now)
    state = ledger.channel("main", "active")
    assert state.power_w() is None and state.ts_doubt
    for seq in range(7, 9):  # corrected: two consecutive trusted pulses measure power again
        now += S
        ledger.apply(Pulse("main", "active", "e1", seq, now, 1.0), now_ns=now)
    assert state.ts_doubt == "" and state.power_w() == pytest.approx(3600.0)
    assert state.total_uwh == 8_000_000


def test_untrusted_timing_shows_no_power_until_the_writer_hears_nothing_for_the_timeout() -> None:
    state = ChannelState(last_ts_ns=0, wh=1.0, received_ns=100 * S, ts_doubt="the edge reports ...")
    assert displayed_power_w(state, now_ns=399 * S, timeout_s=300) is None
    assert displayed_power_w(state, now_ns=400 * S, timeout_s=300) == 0.0


def test_after_a_calibration_a_pulse_stamped_years_behind_still_counts() -> None:
    ledger = Ledger(max_power_w=MAX_W)
    ledger.apply(Pulse("main", "active", "e1", 1, T0, 1.0), now_ns=T0)
    ledger.set_total("main", "active", 5_000_000_000, as_of_ns=T0 + 60 * S)  # the meter read 5 kWh a minute later
    # A Pi booted with a clock two years behind: its timestamps say "before the reading", the writer knows better.
    assert ledger.apply(Pulse("main", "active", "e1", 2, T0 - 2 * YEAR, 1.0), now_ns=T0 + 120 * S) == 1
    assert ledger.channel("main", "active").total_uwh == 5_001_000_000
