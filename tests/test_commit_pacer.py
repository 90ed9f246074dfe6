"""edge.commit_pacer.CommitPacer: at most one commit per interval, none delayed after a pause."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.commit_pacer import CommitPacer


def test_the_first_commit_never_waits() -> None:
    assert CommitPacer(0.1).delay(now=5.0) == 0.0


def test_a_commit_soon_after_another_waits_for_the_rest_of_the_interval() -> None:
    pacer = CommitPacer(0.1)
    pacer.committed(now=5.0)
    assert pacer.delay(now=5.03) == pytest.approx(0.07)
    assert pacer.delay(now=5.1) == 0.0
    assert pacer.delay(now=7.0) == 0.0  # after a pause: at once


def test_zero_interval_never_waits() -> None:
    pacer = CommitPacer(0.0)
    pacer.committed(now=5.0)
    assert pacer.delay(now=5.0) == 0.0


@pytest.mark.parametrize("bad", [-0.1, math.nan])
def test_a_negative_or_nan_interval_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="interval_s"):
        CommitPacer(bad)


@given(interval=st.floats(0.0, 1.0), arrivals=st.lists(st.floats(0.0, 10.0), max_size=60))
def test_commits_are_spaced_by_the_interval_and_wait_no_longer(interval: float, arrivals: list[float]) -> None:
    """A recorder's life: work arrives, waits as told, commits; the next arrival comes after that."""
    pacer = CommitPacer(interval)
    now, commits = 0.0, []
    for gap in arrivals:
        now += gap
        wait = pacer.delay(now)
        assert 0.0 <= wait <= interval
        if commits and now - commits[-1] >= interval:
            assert wait == 0.0  # a pause as long as the interval: no delay at all
        now += wait
        pacer.committed(now)
        commits.append(now)
    assert all(b - a >= interval - 1e-9 for a, b in itertools.pairwise(commits))
