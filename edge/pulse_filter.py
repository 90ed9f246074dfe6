"""Turn raw GPIO edges into meter pulses, rejecting noise by timing alone.

A pulse is an activation followed by a deactivation. It is accepted when it
lasted at least ``min_width_s`` and ended at least ``min_interval_s`` after the
previous accepted pulse ended. Its time is the trailing edge: the moment it is
known to be a real pulse. Timestamps are the pin events' own ticks, so Python
scheduling delays never distort them.

Example::

    >>> f = PulseFilter(min_width_s=0.005, min_interval_s=0.02)
    >>> f.edge(1.000, True), f.edge(1.030, False)
    (None, 1.03)
    >>> f.edge(1.031, True), f.edge(1.032, False)   # a 1 ms glitch
    (None, None)
    >>> f.rejected
    1
"""

from __future__ import annotations


class PulseFilter:
    """Stateful filter for one input; feed it every edge in order."""

    def __init__(self, min_width_s: float, min_interval_s: float) -> None:
        self.min_width_s = min_width_s
        self.min_interval_s = min_interval_s
        self.rejected = 0
        self._rise: float | None = None
        self._last: float | None = None

    def edge(self, ticks: float, active: bool) -> float | None:
        """Feed one edge (ticks in seconds); return the pulse time if a valid pulse just ended."""
        if active:
            self._rise = ticks
            return None
        rise, self._rise = self._rise, None
        if rise is None:
            return None  # the input was already active when we started: no full pulse seen
        too_short = ticks - rise < self.min_width_s
        too_close = self._last is not None and ticks - self._last < self.min_interval_s
        if too_short or too_close:
            self.rejected += 1
            return None
        self._last = ticks
        return ticks
