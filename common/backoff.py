"""Capped exponential backoff with jitter, for reconnect loops.

After a broker restart every Pi and writer reconnects at once; jitter spreads
their attempts, so the broker is not hit by all of them in the same instant.
Each delay is drawn uniformly from ``[(1 - jitter) * d, d]``, where the
nominal delay ``d`` doubles after each failure up to ``max_s``::

    >>> b = Backoff(initial_s=0.5, max_s=4, jitter=0)
    >>> [b.next_delay() for _ in range(5)]
    [0.5, 1.0, 2.0, 4.0, 4.0]
    >>> b = Backoff(initial_s=1, max_s=30, jitter=0.5, rng=lambda: 1.0)
    >>> b.next_delay(), b.next_delay()
    (0.5, 1.0)
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays that double after each failure, up to ``max_s``; :meth:`reset` after a success.

    ``jitter`` (0 to 1) is the fraction of each delay that is random; ``rng``
    returns a number in [0, 1) (injectable for tests).
    """

    def __init__(self, initial_s: float = 0.5, max_s: float = 30.0, jitter: float = 0.5,
                 rng: Callable[[], float] = random.random) -> None:
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {jitter}")
        self.initial_s = float(initial_s)
        self.max_s = float(max_s)
        self.jitter = jitter
        self._rng = rng
        self._next = self.initial_s

    def next_delay(self) -> float:
        nominal, self._next = self._next, min(self._next * 2, self.max_s)
        return nominal * (1 - self.jitter * self._rng())

    def reset(self) -> None:
        self._next = self.initial_s
