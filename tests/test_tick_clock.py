"""edge.tick_clock.TickClock: monotonic ticks to UTC nanoseconds, following the wall clock both ways."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.tick_clock import TickClock

S = 1_000_000_000
WALL0 = 1_764_000_000 * S


class FakeClocks:
    """A monotonic tick source and a wall clock the test moves independently."""

    def __init__(self, ticks: float = 100.0, wall_ns: int = WALL0) -> None:
        self.ticks = ticks
        self.wall = wall_ns

    def advance(self, seconds: float) -> None:
        self.ticks += seconds
        self.wall += round(seconds * S)

    def clock(self, follow: bool = True) -> TickClock:
        return TickClock(ticks_now=lambda: self.ticks, wall_ns=lambda: self.wall, follow_wall_clock=follow)


@pytest.fixture
def clocks() -> FakeClocks:
    return FakeClocks()


def test_ticks_map_linearly_around_the_anchor(clocks: FakeClocks):
    clock = clocks.clock()
    assert clock.to_utc_ns(100.0) == WALL0
    assert clock.to_utc_ns(101.25) == WALL0 + 1_250_000_000
    assert clock.to_utc_ns(99.0) == WALL0 - S


def test_mapping_is_unchanged_when_both_clocks_advance_together(clocks: FakeClocks):
    clock = clocks.clock()
    clocks.advance(3600)
    assert clock.reanchor() == 0
    assert clock.to_utc_ns(100.0) == WALL0


def test_reanchor_follows_a_forward_wall_clock_jump(clocks: FakeClocks):
    clock = clocks.clock()
    clocks.advance(10)
    clocks.wall += 3600 * S  # NTP sets the clock
    assert clock.reanchor() == 3600 * S
    assert clock.to_utc_ns(clocks.ticks) == clocks.wall


def test_reanchor_follows_a_backward_wall_clock_step(clocks: FakeClocks):
    clock = clocks.clock()
    clocks.advance(15)
    clocks.wall -= 3600 * S  # the clock was an hour ahead and is corrected
    assert clock.reanchor() == -3600 * S
    assert clock.to_utc_ns(clocks.ticks) == clocks.wall


def test_reanchor_ignores_steps_below_the_threshold(clocks: FakeClocks):
    clock = clocks.clock()
    clocks.wall += 499_999_999
    assert clock.reanchor() == 0
    assert clock.to_utc_ns(100.0) == WALL0


def test_reanchor_takes_a_step_of_exactly_the_threshold(clocks: FakeClocks):
    clock = clocks.clock()
    clocks.wall += 500_000_000
    assert clock.reanchor() == 500_000_000
    assert clock.to_utc_ns(100.0) == WALL0 + 500_000_000


def test_reanchor_threshold_is_configurable(clocks: FakeClocks):
    clock = clocks.clock()
    clocks.wall += 2 * S
    assert clock.reanchor(min_step_ns=5 * S) == 0
    assert clock.reanchor(min_step_ns=S) == 2 * S


def test_small_steps_are_followed_once_they_add_up_to_the_threshold(clocks: FakeClocks):
    clock = clocks.clock()
    for _ in range(4):
        clocks.wall += 100_000_000
        assert clock.reanchor() == 0  # each difference is measured from the anchor, not the last call
    clocks.wall += 100_000_000
    assert clock.reanchor() == 500_000_000
    assert clock.to_utc_ns(clocks.ticks) == clocks.wall


def test_clock_that_does_not_follow_the_wall_never_reanchors(clocks: FakeClocks):
    clock = clocks.clock(follow=False)
    clocks.wall += 3600 * S
    assert clock.reanchor() == 0
    assert clock.to_utc_ns(100.0) == WALL0


operations = st.lists(st.one_of(
    st.tuples(st.just("advance"), st.floats(0, 1000)),
    st.tuples(st.just("step"), st.integers(-10**13, 10**13)),
    st.tuples(st.just("reanchor"), st.integers(1, 10**10)),
), max_size=30)


@settings(max_examples=200, deadline=None)
@given(operations)
def test_it_tracks_the_wall_clock_within_the_threshold_and_intervals_follow_the_ticks(
        ops: list[tuple[str, float]]):
    clocks = FakeClocks()
    clock = clocks.clock()
    for op, value in ops:
        if op == "advance":
            before = clock.to_utc_ns(clocks.ticks)
            clocks.advance(value)
            assert clock.to_utc_ns(clocks.ticks) - before == round(clocks.ticks * S) - round((clocks.ticks - value) * S)
        elif op == "step":
            clocks.wall += int(value)
        else:
            step = clock.reanchor(int(value))
            assert step == 0 or abs(step) >= value
            assert abs(clock.to_utc_ns(clocks.ticks) - clocks.wall) < value


# Whole seconds of advance keep the fake's ticks and wall clock in exact step (no float rounding between them).
exact_operations = st.lists(st.one_of(
    st.tuples(st.just("advance"), st.integers(0, 1000)),
    st.tuples(st.just("step"), st.integers(-10**13, 10**13)),
    st.tuples(st.just("reanchor"), st.integers(1, 10**10)),
), max_size=30)


@settings(max_examples=200, deadline=None)
@given(exact_operations)
def test_reanchor_reports_how_far_the_mapping_moved_and_a_repeat_reports_nothing(ops: list[tuple[str, int]]):
    """The recorder logs what reanchor returns as the step and its direction; it must be the real shift."""
    clocks = FakeClocks()
    clock = clocks.clock()
    wall_moved = 0  # how far the wall clock stepped, apart from the ticks, since the last reanchor that followed
    for op, value in ops:
        if op == "advance":
            clocks.advance(value)
        elif op == "step":
            clocks.wall += int(value)
            wall_moved += int(value)
        else:
            before = clock.to_utc_ns(clocks.ticks)
            step = clock.reanchor(int(value))
            assert clock.to_utc_ns(clocks.ticks) - before == step
            if step:
                assert step == wall_moved
                wall_moved = 0
                assert clock.reanchor(int(value)) == 0
            else:
                assert abs(wall_moved) < value


@settings(max_examples=100, deadline=None)
@given(operations)
def test_a_clock_that_does_not_follow_the_wall_keeps_its_first_anchor(ops: list[tuple[str, float]]):
    clocks = FakeClocks()
    clock = clocks.clock(follow=False)
    for op, value in ops:
        if op == "advance":
            clocks.advance(value)
        elif op == "step":
            clocks.wall += int(value)
        else:
            assert clock.reanchor(int(value)) == 0
        assert clock.to_utc_ns(100.0) == WALL0
