"""When the recorder may commit: group commits at high pulse rates, none delayed at low rates.

Every commit is one fsync, and at 30 pulses/s a commit per pulse is both the
largest CPU cost of the edge and an fsync storm on the SD card. The pacer
allows at most one commit per ``interval_s``: a pulse after a quiet spell is
committed at once, while pulses that follow closer than that wait for the
next slot and share its commit. The interval also bounds what a ``kill -9``
or power cut can catch between an edge and the disk.

Example::

    >>> pacer = CommitPacer(interval_s=0.1)
    >>> pacer.delay(now=10.0)        # nothing committed recently: commit at once
    0.0
    >>> pacer.committed(now=10.0)
    >>> round(pacer.delay(now=10.03), 3)   # 30 ms later: wait for the next slot
    0.07
    >>> pacer.delay(now=10.25)
    0.0
"""

from __future__ import annotations


class CommitPacer:
    """Pure timing rule; the caller supplies ``now`` (a monotonic clock in seconds)."""

    def __init__(self, interval_s: float) -> None:
        if not interval_s >= 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self.interval_s = interval_s
        self._last: float | None = None

    def delay(self, now: float) -> float:
        """Seconds to wait before committing what is pending at ``now``."""
        if self._last is None:
            return 0.0
        return min(self.interval_s, max(0.0, self._last + self.interval_s - now))

    def committed(self, now: float) -> None:
        """Record that a commit started at ``now``."""
        self._last = now
