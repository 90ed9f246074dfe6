"""Convert a pin factory's ticks (monotonic seconds) to UTC nanoseconds.

gpiozero's lgpio factory reports kernel edge timestamps on the monotonic
clock; the mock factory reports ``time.monotonic()``. We anchor ticks to the
wall clock once, and re-anchor only forwards (for example when NTP first
sets a Pi's clock after boot), so timestamps of one channel never go back.

Example::

    >>> clock = TickClock(ticks_now=lambda: 10.0, wall_ns=lambda: 1_000_000_000_000)
    >>> clock.to_utc_ns(10.5)
    1000500000000
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TickClock:
    def __init__(self, ticks_now: Callable[[], float], wall_ns: Callable[[], int] = time.time_ns,
                 follow_wall_clock: bool = True) -> None:
        self._ticks_now = ticks_now
        self._wall_ns = wall_ns
        self._follow = follow_wall_clock
        self._offset_ns = self._measure()

    def _measure(self) -> int:
        return self._wall_ns() - round(self._ticks_now() * 1e9)

    def reanchor(self, min_step_ns: int = 500_000_000) -> int:
        """Follow the wall clock if it jumped forward; return the step taken in ns (0 if none).

        Smaller differences are measurement jitter or NTP slewing, which the
        monotonic clock follows anyway.
        """
        step = self._measure() - self._offset_ns
        if not self._follow or step < min_step_ns:
            return 0
        self._offset_ns += step
        return step

    def not_before(self, floor_ns: int) -> int:
        """Shift forward so that now maps after ``floor_ns``; return the shift in ns (0 if none).

        Used at start-up with the last recorded pulse time: a Pi without a
        real-time clock may boot with its clock in the past until NTP syncs.
        Keeping timestamps after the last pulse keeps intervals (and so power)
        right; the forward re-anchor corrects the absolute time later.
        """
        shift = floor_ns + 1_000_000 - self.to_utc_ns(self._ticks_now())
        if shift <= 0:
            return 0
        self._offset_ns += shift
        return shift

    def to_utc_ns(self, ticks: float) -> int:
        return round(ticks * 1e9) + self._offset_ns
