"""What the edge tells the writer about itself, and when: the status message (:class:`~common.message.Status`).

A status tells the writer that the edge lives even while the meter is quiet,
so that a silent edge (dead, cut off) can be told from a house using nothing.
It is replaceable: the publisher sends it on a channel of its own, without
confirms and not through the outbox, so it never waits behind pulses nor
delays them; a status lost in an outage is replaced by the next.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common import __version__
from common.message import ChannelStatus, Status
from edge.outbox import OutboxReader

CPU_TEMPERATURE = Path("/sys/class/thermal/thermal_zone0/temp")


class StatusSchedule:
    """When the next status is due: every ``interval_s``, at once when the clock's synchronisation changes, and
    at once after the link comes up (:meth:`link_up`). Pure: the caller passes the monotonic time.

    >>> schedule = StatusSchedule(30.0)
    >>> schedule.due(100.0, synced=True)
    True
    >>> schedule.sent(100.0, synced=True)
    >>> schedule.due(129.0, synced=True), schedule.due(129.0, synced=False), schedule.due(130.0, synced=True)
    (False, True, True)
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._sent_at = -math.inf
        self._synced: bool | None = None

    def due(self, now: float, synced: bool | None) -> bool:
        return now - self._sent_at >= self.interval_s or synced != self._synced

    def sent(self, now: float, synced: bool | None) -> None:
        self._sent_at, self._synced = now, synced

    def link_up(self) -> None:
        """The link (re)opened: the writer learns of it with the next status, sent at once."""
        self._sent_at = -math.inf


def cpu_temperature(path: Path = CPU_TEMPERATURE) -> float | None:
    """The processor's temperature in °C as the kernel reports it (millidegrees in ``path``); None where it does
    not (no such file, or not a plausible number).

    >>> cpu_temperature(Path("/nonexistent")) is None
    True
    """
    try:
        celsius = int(path.read_text().strip()) / 1000
    except (OSError, ValueError):
        return None
    return round(celsius, 1) if -100 <= celsius <= 200 else None


@dataclass(frozen=True, slots=True)
class EdgeFacts:
    """What the recorder side knows for a status: the clock's state, the pulses each channel's filter refused,
    the last recorded pulse, when the edge started (by the wall clock)."""

    synced: bool | None
    rejected: Mapping[str, int]
    last_pulse_ns: int
    started_ns: int


def make_status(meter: str, reader: OutboxReader, facts: EdgeFacts, *, now_ns: int, last_confirm_ns: int,
                cpu_c: float | None) -> Status:
    """The status of ``meter`` now: the counters and outbox depth from ``reader``, the rest from ``facts``.
    Raises :class:`~edge.outbox.StoreError` if the outbox cannot be read."""
    counters = {channel: seq for (owner, channel), seq in reader.counters().items() if owner == meter}
    channels = {channel: ChannelStatus(reader.epoch, counters.get(channel, 0), facts.rejected.get(channel, 0))
                for channel in sorted(set(counters) | set(facts.rejected))}
    return Status(meter, now_ns, max(0, (now_ns - facts.started_ns) // 10**9), __version__, "up", reader.depth(),
                  channels, facts.synced, last_confirm_ns or None, facts.last_pulse_ns or None, cpu_c)
