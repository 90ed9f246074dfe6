"""Pulses counted while the outbox cannot be written, held in memory until the disk takes them.

A full SD card, a file system the kernel turned read-only or an I/O error
must not cost a pulse: the recorder keeps counting into a :class:`PulseHold`
and writes it out, oldest first, as soon as the outbox accepts writes again.
The hold is bounded, so a disk that never comes back cannot exhaust the Pi's
memory: beyond :data:`HOLD_MAX` pulses the oldest pulse's *timing* is dropped,
but it is still counted per channel (:attr:`PulseHold.skipped`), and the
counter advances past it when the hold is written, so the next ``seq`` carries
it to the writer: the energy stays exact, as with the outbox's own row cap.

The class holds no clock, thread or file, so its rules are tested on their own
(``tests/test_pulse_hold.py``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

# About 100 bytes each, so at most ~10 MB of a Pi Zero's 512 MB; 100,000 pulses are almost 3 hours at
# 10 pulses/s (36 kW at 1 Wh per pulse) and more than a day at a household's usual 1 pulse/s.
HOLD_MAX = 100_000

Stamped = tuple[str, int, float]  # (channel, ts_ns, wh), as Outbox.record takes them


class Batch(NamedTuple):
    """The next write of the hold: pulses stamped with one clock state, and the timing-less counts before them."""

    pulses: list[Stamped]
    synced: bool | None
    skipped: dict[str, int]


class PulseHold:
    """Pulses not yet in the outbox, oldest first, with their clock state; at most ``limit`` keep their timing.

    >>> hold = PulseHold(limit=2)
    >>> hold.add([("active", 1, 1.0), ("active", 2, 1.0), ("active", 3, 1.0)], synced=True)
    1
    >>> hold.pending, len(hold), hold.skipped       # one pulse kept only as a count
    (3, 2, {'active': 1})
    >>> batch = hold.batch(limit=10)                # write these, counter advanced past the skipped first
    >>> batch.pulses, batch.skipped
    ([('active', 2, 1.0), ('active', 3, 1.0)], {'active': 1})
    >>> hold.written(batch)
    >>> hold.pending
    0
    """

    def __init__(self, limit: int = HOLD_MAX) -> None:
        if limit < 1:
            raise ValueError(f"the hold keeps at least one pulse, not {limit}")
        self.limit = limit
        self._pulses: deque[tuple[str, int, float, bool | None]] = deque()
        self.skipped: dict[str, int] = {}  # per channel: pulses counted whose timing was dropped
        self.dropped = 0  # timings dropped since the hold was last empty

    def __len__(self) -> int:
        """Held pulses that still have their timing."""
        return len(self._pulses)

    @property
    def pending(self) -> int:
        """Every pulse not yet in the outbox, with or without its timing: what a stop now would lose."""
        return len(self._pulses) + sum(self.skipped.values())

    def add(self, pulses: Sequence[Stamped], synced: bool | None) -> int:
        """Hold ``pulses`` after the others; return how many timings had to be dropped to stay within the limit."""
        held = self._pulses
        held.extend((channel, ts_ns, wh, synced) for channel, ts_ns, wh in pulses)
        excess = len(held) - self.limit
        for _ in range(excess):
            channel = held.popleft()[0]
            self.skipped[channel] = self.skipped.get(channel, 0) + 1
        excess = max(excess, 0)
        self.dropped += excess
        return excess

    def batch(self, limit: int) -> Batch:
        """The next write: up to ``limit`` of the oldest pulses that share a clock state, and all skipped counts.

        The skipped counts go with the first write: every skipped pulse is older
        than every held one of its channel, so the counter must pass them first.
        """
        if not self._pulses:
            return Batch([], None, dict(self.skipped))
        synced = self._pulses[0][3]
        pulses: list[Stamped] = []
        for channel, ts_ns, wh, stamped_synced in self._pulses:
            if len(pulses) == limit or stamped_synced != synced:
                break
            pulses.append((channel, ts_ns, wh))
        return Batch(pulses, synced, dict(self.skipped))

    def written(self, batch: Batch) -> None:
        """``batch`` (the last :meth:`batch`) is in the outbox."""
        for _ in batch.pulses:
            self._pulses.popleft()
        for channel, count in batch.skipped.items():
            left = self.skipped.pop(channel) - count
            if left:
                self.skipped[channel] = left
        if not self.pending:
            self.dropped = 0
