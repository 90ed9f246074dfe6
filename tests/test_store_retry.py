"""edge.store_retry: a failing outbox operation is tried again after a capped backoff, logged only on a change."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edge.store_retry import RETRY_FIRST_S, RETRY_MAX_S, StoreRetry

outcomes = st.lists(st.one_of(st.none(), st.sampled_from(["database or disk is full", "disk I/O error"])),
                    max_size=40)


@given(outcomes)
def test_attempts_wait_at_most_the_cap_and_only_changes_are_news(results: list[str | None]) -> None:
    retry = StoreRetry()
    now = 0.0
    state = ""
    for reason in results:  # None: the attempt worked
        now += retry.wait(now)
        assert retry.due(now)
        if reason is None:
            assert retry.succeeded() == (state != "")
            assert retry.wait(now) == 0.0
            state = ""
        else:
            assert retry.failed(reason, now) == (reason != state)
            assert RETRY_FIRST_S - 1e-9 <= retry.wait(now) <= RETRY_MAX_S + 1e-9  # float sums of the delays
            assert not retry.due(now)
            state = reason
        assert retry.failing == state


def test_the_backoff_doubles_to_its_cap_and_starts_over_after_a_success() -> None:
    retry = StoreRetry(first_s=0.1, max_s=0.4)
    waits = []
    for now in range(5):
        retry.failed("full", float(now))
        waits.append(round(retry.wait(float(now)), 3))
    assert waits == [0.1, 0.2, 0.4, 0.4, 0.4]
    retry.succeeded()
    retry.failed("full", 10.0)
    assert round(retry.wait(10.0), 3) == 0.1
