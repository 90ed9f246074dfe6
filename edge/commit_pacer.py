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
        if not (interval_s == 0 or 1e-6 <= interval_s <= 3600):  # also rejects NaN
            raise ValueError(f"interval_s must be 0 or between 1e-6 and 3600, got {interval_s}")
        self.interval_s = interval_s
        self._free_at = -math.inf  # the end of the slot of the last commit

    def delay(self, now: float) -> float:
        """Seconds to wait before committing what is pending at ``now``."""
        return min(self.interval_s, max(0.0, self._free_at - now))

    def committed(self, now: float) -> None:
        """Record that a commit started at ``now``."""
        if not self.interval_s:
            return
        end = (math.floor(now / self.interval_s) + 1) * self.interval_s
        # Float rounding may put the slot's end a hair outside (now, now + interval]; keep it inside,
        # so that one commit per slot holds and a pulse an interval later never waits.
        self._free_at = min(end, now + self.interval_s) if end > now else now + self.interval_s
