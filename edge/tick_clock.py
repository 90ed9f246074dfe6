"""Convert a pin factory's ticks (monotonic seconds) to UTC nanoseconds, following the wall clock.

gpiozero's lgpio factory reports kernel edge timestamps on the monotonic
clock; the mock factory reports ``time.monotonic()``. Ticks are anchored to
the wall clock, and re-anchored whenever the wall clock has stepped, forwards
or backwards (NTP setting a Pi's clock after boot, an operator correcting
it). Between steps, timestamps advance exactly with the ticks, so intervals
measured on the edge are never negative. A step back means the pulses before
it were stamped ahead; the writer, which checks timestamps against its own
clock, counts every pulse either way (see ``backend/trust.py``).

Example::

    >>> wall = [1_764_000_000_000_000_000]
    >>> clock = TickClock(ticks_now=lambda: 10.0, wall_ns=lambda: wall[0])
    >>> clock.to_utc_ns(10.5)
    1764000000500000000
    >>> wall[0] -= 3_600_000_000_000    # the clock was an hour ahead, and is corrected
    >>> clock.reanchor() / 1e9
    -3600.0
    >>> clock.to_utc_ns(10.5)
    1763996400500000000
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_MIN_STEP_NS = 500_000_000


class TickClock:
    """Ticks to UTC ns, anchored to ``wall_ns``; ``follow_wall_clock=False`` keeps the first anchor."""

    def __init__(self, ticks_now: Callable[[], float], wall_ns: Callable[[], int] = time.time_ns,
                 follow_wall_clock: bool = True) -> None:
        self._ticks_now = ticks_now
        self._wall_ns = wall_ns
        self._follow = follow_wall_clock
        self._offset_ns = self._measure()

    def _measure(self) -> int:
        return self._wall_ns() - round(self._ticks_now() * 1e9)

    def reanchor(self, min_step_ns: int = DEFAULT_MIN_STEP_NS) -> int:
        """Follow the wall clock if it stepped by ``min_step_ns`` or more; return the step in ns (0 if none).

        Positive: it stepped forward; negative: back. Smaller differences are
        measurement jitter or NTP slewing, which the monotonic clock follows anyway.
        """
        step = self._measure() - self._offset_ns
        if not self._follow or abs(step) < min_step_ns:
            return 0
        self._offset_ns += step
        return step

    def now_ns(self) -> int:
        """The current time on this clock."""
        return self.to_utc_ns(self._ticks_now())

    def to_utc_ns(self, ticks: float) -> int:
        return round(ticks * 1e9) + self._offset_ns
