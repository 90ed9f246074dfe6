"""Capped exponential backoff for reconnect loops.

    >>> b = Backoff(initial_s=0.5, max_s=4)
    >>> [b.next_delay() for _ in range(5)]
    [0.5, 1.0, 2.0, 4, 4]
"""

from __future__ import annotations


class Backoff:
    """Delays that double after each failure, up to ``max_s``; :meth:`reset` after a success."""

    def __init__(self, initial_s: float = 0.5, max_s: float = 30.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._next = initial_s

    def next_delay(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self._next = self.initial_s
