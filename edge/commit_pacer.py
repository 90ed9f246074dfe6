"""When the recorder may commit: group commits at high pulse rates, none delayed at low rates.

Every commit is one fsync, and at 30 pulses/s a commit per pulse is both the
largest CPU cost of the edge and an fsync storm on the SD card. The pacer
cuts the monotonic clock into slots of ``interval_s`` and allows one commit
per slot: a pulse in a slot without a commit is committed at once, while a
pulse in the slot of the previous commit waits for the next slot and shares
its commit with whatever arrives meanwhile. Slots are fixed, so pulses a
little more than a slot apart never wait (a rule measured from the last
commit would let the waits pile up when pulses come at about that rate).
The interval also bounds what a ``kill -9`` or power cut can catch between an
edge and the disk.

Example::

    >>> pacer = CommitPacer(interval_s=0.1)
    >>> pacer.delay(now=10.02)       # nothing committed in this slot: commit at once
    0.0
    >>> pacer.committed(now=10.02)
    >>> round(pacer.delay(now=10.05), 3)   # same slot: wait for the next one
    0.05
    >>> pacer.delay(now=10.12)       # next slot: at once
    0.0
"""

from __future__ import annotations

import math


class CommitPacer:
    """Pure timing rule; the caller supplies ``now`` (a monotonic clock in seconds)."""

    def __init__(self, interval_s: float) -> None:
        if not interval_s >= 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self.interval_s = interval_s
        self._last_slot: float | None = None

    def _slot(self, now: float) -> float:
        return math.floor(now / self.interval_s)

    def delay(self, now: float) -> float:
        """Seconds to wait before committing what is pending at ``now``."""
        if self._last_slot is None or not self.interval_s or self._slot(now) != self._last_slot:
            return 0.0
        return min(self.interval_s, max(0.0, (self._last_slot + 1) * self.interval_s - now))

    def committed(self, now: float) -> None:
        """Record that a commit started at ``now``."""
        if self.interval_s:
            self._last_slot = self._slot(now)
