"""Backoff: capped doubling, with jitter that only ever shortens a delay, within its bound."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.backoff import Backoff

unit = st.floats(min_value=0, max_value=1, exclude_max=True)


@given(initial=st.floats(min_value=0.01, max_value=10), cap=st.floats(min_value=10, max_value=300),
       jitter=st.floats(min_value=0, max_value=1), draws=st.lists(unit, min_size=1, max_size=30))
def test_each_delay_lies_in_its_jitter_band_below_the_capped_doubling(initial: float, cap: float, jitter: float,
                                                                      draws: list[float]) -> None:
    values = iter(draws)
    backoff = Backoff(initial, cap, jitter, rng=lambda: next(values))
    nominal = initial
    for _ in draws:
        delay = backoff.next_delay()
        assert (1 - jitter) * nominal - 1e-9 <= delay <= nominal + 1e-9
        nominal = min(nominal * 2, cap)


def test_reset_starts_again_from_the_initial_delay() -> None:
    backoff = Backoff(1, 30, jitter=0)
    assert [backoff.next_delay() for _ in range(3)] == [1, 2, 4]
    backoff.reset()
    assert backoff.next_delay() == 1


def test_the_default_spreads_reconnects_of_many_clients() -> None:
    first_delays = {Backoff(initial_s=1).next_delay() for _ in range(100)}
    assert len(first_delays) > 50 and min(first_delays) >= 0.5 and max(first_delays) <= 1


def test_a_jitter_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=1.5)
