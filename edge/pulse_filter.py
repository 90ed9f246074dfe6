"""Turn raw GPIO edges into meter pulses, rejecting noise by timing alone.

A pulse is an activation followed by a deactivation. It is accepted when it
lasted at least ``min_width_s`` and ended at least ``min_interval_s`` after the
previous accepted pulse ended. Its time is the trailing edge: the moment it is
known to be a real pulse. Timestamps are the pin events' own ticks, so Python
scheduling delays never distort them.

A contact bounces: a reed switch opens and closes again for a few ms as it
closes and as it opens. An opening shorter than ``bounce_s`` does not end a
pulse: a re-closure within it continues the pulse it interrupted, so a
bouncing pulse is counted once, and its bounces are no noise. With
``bounce_s = 0`` every opening ends a pulse.

Example::

    >>> f = PulseFilter(min_width_s=0.005, min_interval_s=0.02)
    >>> f.edge(1.000, True), f.edge(1.030, False)
    (None, 1.03)
    >>> f.edge(1.031, True), f.edge(1.032, False)   # a 1 ms glitch
    (None, None)
    >>> f.rejected
    1

A reed contact bouncing as it closes and as it opens is one pulse::

    >>> reed = PulseFilter(min_width_s=0.08, min_interval_s=1.0, bounce_s=0.02)
    >>> [reed.edge(t, a) for t, a in [(0.0, True), (0.002, False), (0.004, True), (0.2, False),
    ...                                (0.203, True), (0.205, False)]]
    [None, None, None, 0.2, None, None]
    >>> reed.rejected
    0
"""

from __future__ import annotations

from common.inputs import Input


class PulseFilter:
    """Stateful filter for one input; feed it every edge in order.

    The thresholds come from the input's configuration
    (:class:`common.inputs.Input`): its type's preset, or the values given.
    """

    def __init__(self, min_width_s: float, min_interval_s: float, bounce_s: float = 0.0) -> None:
        self.min_width_s = min_width_s
        self.min_interval_s = min_interval_s
        self.bounce_s = bounce_s
        self.rejected = 0
        self._rise: float | None = None
        self._last: float | None = None
        self._opened: float | None = None  # the last opening of a pulse seen whole
        self._short = False  # that opening ended a closure too short to count: a re-closure may continue it
        self._ended = False  # that opening ended a pulse (counted or refused): a re-closure is its bounce

    @classmethod
    def for_input(cls, one: Input) -> PulseFilter:
        """The filter of a configured input: its type's preset, or the values it overrides.

        >>> f = PulseFilter.for_input(Input.of(pin=22, channel="gas", type="reed"))
        >>> f.min_width_s, f.min_interval_s, f.bounce_s
        (0.08, 1.125, 0.02)
        """
        return cls(one.min_pulse_ms / 1000, one.min_interval_ms / 1000, one.bounce_ms / 1000)

    def edge(self, ticks: float, active: bool) -> float | None:
        """Feed one edge (ticks in seconds); return the pulse time if a valid pulse just ended."""
        bounced = self._opened is not None and 0 <= ticks - self._opened < self.bounce_s
        if active:
            if not bounced:
                if self._short:
                    self.rejected += 1
                self._short = self._ended = False
                self._rise = ticks
            return None
        if self._ended:  # the opening after a bounce of a pulse already judged
            self._opened = ticks
            return None
        rise = self._rise
        if rise is None:
            return None  # the input was already active when we started: no full pulse seen
        self._opened = ticks
        if ticks - rise < self.min_width_s:
            if self.bounce_s > 0:
                self._short = True  # judged at the next closure: a bounce continues it
                return None
            self.rejected += 1
            self._rise = None
            return None
        self._rise, self._short, self._ended = None, False, True
        if self._last is not None and ticks - self._last < self.min_interval_s:
            self.rejected += 1
            return None
        self._last = ticks
        return ticks
