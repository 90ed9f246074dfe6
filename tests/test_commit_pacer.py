"""edge.commit_pacer.CommitPacer: at most one commit per interval, none delayed after a pause."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.commit_pacer import CommitPacer


def test_the_first_commit_never_waits() -> None:
    assert CommitPacer(0.1).delay(now=5.05) == 0.0


def test_a_commit_in_the_slot_of_the_previous_one_waits_for_the_next_slot() -> None:
    pacer = CommitPacer(0.1)
    pacer.committed(now=5.02)
    assert pacer.delay(now=5.05) == pytest.approx(0.05)
    assert pacer.delay(now=5.11) == 0.0  # the next slot, although only 90 ms later
    assert pacer.delay(now=7.0) == 0.0  # after a pause: at once


def test_zero_interval_never_waits() -> None:
    pacer = CommitPacer(0.0)
    pacer.committed(now=5.0)
    assert pacer.delay(now=5.0) == 0.0


@pytest.mark.parametrize("bad", [-0.1, math.nan, 1e-310, math.inf])
def test_a_negative_tiny_infinite_or_nan_interval_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="interval_s"):
        CommitPacer(bad)


@given(interval=st.floats(0.001, 1.0), gaps=st.lists(st.floats(0.0, 3.0), max_size=60),
       start=st.floats(0.0, 1e7))
def test_one_commit_per_slot_and_no_wait_an_interval_after_the_last_commit(interval: float, gaps: list[float],
                                                                           start: float) -> None:
    """A recorder's life: work arrives, waits as told, commits; the next arrival comes after that."""
    pacer = CommitPacer(interval)
    now, commits = start, []
    for gap in gaps:
        now += gap
        wait = pacer.delay(now)
        assert 0.0 <= wait <= interval
        if commits and now - commits[-1] >= interval:
            assert wait == 0.0  # pulses at most one per interval never wait: no latency at low rates
        now += wait  # time.sleep() returns late, never early; exactly on time is the hardest case
        pacer.committed(now)
        commits.append(now)
    # At most one commit per slot [k * interval, (k + 1) * interval), up to float rounding.
    for a, b in itertools.pairwise(commits):
        slot_end = (math.floor(a / interval) + 1) * interval
        assert b >= min(slot_end, a + interval) - 1e-9 * max(1.0, a)


@given(period=st.floats(0.1, 0.5), jitter=st.lists(st.floats(-0.002, 0.002), min_size=2, max_size=100))
def test_pulses_slightly_slower_than_the_interval_never_pile_up_waits(period: float, jitter: list[float]) -> None:
    """Pulses every ``period`` (+- 2 ms) with a slot of ``period - 5 ms``: no pulse waits at all."""
    pacer = CommitPacer(period - 0.005)
    for i, j in enumerate(jitter):
        now = 1.0 + i * period + j + 0.0005  # the recorder sees an edge half a millisecond late
        assert pacer.delay(now) == 0.0
        pacer.committed(now)
