"""When to try a failing outbox operation again, and which failures are news worth a log line.

A full or read-only disk can last hours. Trying again on every pulse or
every confirm would burn a Pi Zero's CPU, and logging every attempt would
flood the journal; trying too seldom would leave pulses in memory after the
disk is back. :class:`StoreRetry` keeps one operation's state: a capped
backoff between attempts while it fails, and whether a failure or a success
changes the state (the only moments the caller logs). It takes ``now`` from
the caller, so its rules are tested without a clock (``tests/test_store_retry.py``).
"""

from __future__ import annotations

from common.backoff import Backoff

# A failing disk is asked again after 0.1 s, then at most every 2 s: a few wasted attempts a minute, and
# pulses reach the disk at most 2 s after it takes writes again.
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 2.0


class StoreRetry:
    """One outbox operation (writing pulses, deleting confirmed rows, reading): failing or not, and when to retry.

    >>> retry = StoreRetry()
    >>> retry.due(now=0.0), retry.failing
    (True, '')
    >>> retry.failed("database or disk is full", now=10.0)   # news: log it
    True
    >>> retry.due(now=10.05), round(retry.wait(now=10.05), 2), retry.due(now=10.1)
    (False, 0.05, True)
    >>> retry.failed("database or disk is full", now=10.1)   # the same fault again: no line
    False
    >>> retry.succeeded()                                    # news: log the recovery
    True
    >>> retry.succeeded()
    False
    """

    def __init__(self, first_s: float = RETRY_FIRST_S, max_s: float = RETRY_MAX_S) -> None:
        self._backoff = Backoff(first_s, max_s, jitter=0)
        self.failing = ""  # the reason of the current failure; "" while the operation works
        self._next_at = 0.0

    def due(self, now: float) -> bool:
        """Whether to attempt the operation at ``now``: always while it works, after the backoff while it fails."""
        return not self.failing or now >= self._next_at

    def wait(self, now: float) -> float:
        """Seconds from ``now`` until the next attempt is due (0 while the operation works)."""
        return max(0.0, self._next_at - now) if self.failing else 0.0

    def failed(self, reason: str, now: float) -> bool:
        """An attempt at ``now`` failed; True if that is news (it worked before, or fails for another reason)."""
        news = reason != self.failing
        self.failing = reason
        self._next_at = now + self._backoff.next_delay()
        return news

    def succeeded(self) -> bool:
        """An attempt worked; True if it was failing until now."""
        if not self.failing:
            return False
        self.failing = ""
        self._backoff.reset()
        return True
