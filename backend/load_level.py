"""Where a channel's load is now, judged from its pulse intervals: the level, and the lowest level of late.

A pulse interval is the load's mean over that interval, so the first interval
after the load drops is a mix of the old level and the new one, and showing it
as it is overstates the new level until the pulse after. When an interval is
:data:`MIXED_FACTOR` times longer than the level before it, the load fell at
an unknown moment within it; assuming that moment is half way through the old
level's interval, one pulse of energy over the interval gives the new level's
interval as ``2·interval - level``. The interval after a corrected one is
taken as it is, so an estimate never builds on an estimate.

The *floor* is the longest interval (the lowest level) of the current and
the previous half of :data:`FLOOR_WINDOW_NS`: a house seldom falls
below the base load it sat at within the last hour, so it is a good guess of
where a load falls to before any pulse can tell. There is none unless both
halves have seen a pulse, and it is not saved: after a restart it
is learnt again.

Example: a kettle (1 Wh every 1.8 s = 2 kW) switches off and leaves 150 W;
the next pulse comes 12.9 s later, which alone reads 279 W::

    >>> level = LoadLevel()
    >>> for ts_s in (0.0, 1.8, 3.6):
    ...     level.observe(round(ts_s * NS_PER_S), round(1.8 * NS_PER_S))
    >>> level.observe(round(16.5 * NS_PER_S), round(12.9 * NS_PER_S))
    >>> round(level.interval_ns / NS_PER_S, 1)  # 150 W
    24.0
    >>> level.observe(round(40.5 * NS_PER_S), round(24.0 * NS_PER_S))  # the next interval is taken as it is
    >>> round(level.interval_ns / NS_PER_S, 1)
    24.0
"""

from __future__ import annotations

from dataclasses import dataclass

NS_PER_S = 1_000_000_000
# An interval this much longer than the level before it says the load fell within it (also what makes the
# next pulse overdue): above the jitter of real meters and loads, below what a drop of interest does.
MIXED_FACTOR = 1.1
FLOOR_WINDOW_NS = 3600 * NS_PER_S


@dataclass
class LoadLevel:
    """The present level of one channel's load as a pulse interval (None: unknown), and its floor.

    With ``correct`` off (power averaged over several pulses) there is no level: the average is the
    estimate, and only the floor is kept.
    """

    interval_ns: int | None = None
    corrected: bool = False
    bucket: int = 0
    longest_ns: int = 0  # the longest interval in the current bucket (0: none yet)
    longest_before_ns: int = 0  # the same of the bucket before it

    def observe(self, ts_ns: int, interval_ns: int, *, correct: bool = True) -> None:
        """A trusted pulse at ``ts_ns``, ``interval_ns`` after the one before it."""
        previous = self.interval_ns
        if not correct:
            self.interval_ns, self.corrected = None, False
        elif previous is not None and not self.corrected and interval_ns > MIXED_FACTOR * previous:
            self.interval_ns, self.corrected = 2 * interval_ns - previous, True
        else:
            self.interval_ns, self.corrected = interval_ns, False
        bucket = ts_ns // (FLOOR_WINDOW_NS // 2)
        if bucket != self.bucket:
            self.longest_before_ns = self.longest_ns if bucket == self.bucket + 1 else 0
            self.bucket, self.longest_ns = bucket, 0
        self.longest_ns = max(self.longest_ns, interval_ns)

    def forget(self) -> None:
        """The pulses no longer follow on from each other (a gap, a doubtful time): the level is unknown."""
        self.interval_ns, self.corrected = None, False

    def floor_interval_ns(self, now_ns: int) -> int | None:
        """The longest interval of this half hour and the one before, or None unless both have pulses."""
        if now_ns // (FLOOR_WINDOW_NS // 2) == self.bucket and self.longest_before_ns:
            return max(self.longest_ns, self.longest_before_ns)
        return None
