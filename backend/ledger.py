"""Exact, idempotent energy counting: the functional core of the writer.

The edge numbers every pulse with a counter ``seq`` per (meter, channel,
epoch). The ledger remembers the highest ``seq`` it has counted per epoch, so

* a ``seq`` at or below it is a duplicate and counts nothing;
* a jump counts every pulse the counter says happened (``seq - last_seq``);
* a new epoch (the edge's counter store was recreated) counts its ``seq``
  pulses since that counter began, on top of the same total.

Energy is kept as an integer number of microwatt-hours, so sums are exact.
Power comes only from two consecutive pulses of one epoch. No I/O, no clock.

Example::

    >>> ledger = Ledger(max_power_w=100_000)
    >>> ledger.apply(Pulse("main", "active", "e1", 1, 1_000_000_000_000, 1.0))
    1
    >>> ledger.apply(Pulse("main", "active", "e1", 1, 1_000_000_000_000, 1.0))
    0
    >>> ledger.apply(Pulse("main", "active", "e1", 3, 1_000_000_000_000 + 2_400_000_000, 1.0))
    2
    >>> ledger.channel("main", "active").total_uwh
    3000000
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from common.message import CHANNELS, Pulse

UWH_PER_WH = 1_000_000
NS_PER_S = 1_000_000_000


class Implausible(ValueError):
    """A pulse the ledger refuses to count; the text says why (it goes to the dead-letter queue)."""


def wh_to_uwh(wh: float) -> int:
    return round(wh * UWH_PER_WH)


@dataclass
class Cursor:
    """The newest counted pulse of one epoch."""

    seq: int
    ts_ns: int


@dataclass
class ChannelState:
    """Totals and timing of one (meter, channel)."""

    total_uwh: int = 0
    epochs: dict[str, Cursor] = field(default_factory=dict)
    last_ts_ns: int | None = None
    wh: float = 1.0
    # Intervals between the most recent consecutive pulses, newest last; empty
    # after a gap, since power may only come from consecutive pulses.
    intervals_ns: list[int] = field(default_factory=list)

    def power_w(self) -> float | None:
        """Mean power over the remembered intervals, or None if unknown."""
        if not self.intervals_ns:
            return None
        return len(self.intervals_ns) * self.wh * 3600 * NS_PER_S / sum(self.intervals_ns)

    def to_json(self) -> dict[str, Any]:
        return {"total_uwh": self.total_uwh, "epochs": {e: [c.seq, c.ts_ns] for e, c in self.epochs.items()},
                "last_ts_ns": self.last_ts_ns, "wh": self.wh, "intervals_ns": list(self.intervals_ns)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ChannelState:
        return cls(total_uwh=_int(doc["total_uwh"]),
                   epochs={str(e): Cursor(_int(s), _int(t)) for e, (s, t) in doc["epochs"].items()},
                   last_ts_ns=None if doc["last_ts_ns"] is None else _int(doc["last_ts_ns"]),
                   wh=float(doc["wh"]), intervals_ns=[_int(i) for i in doc["intervals_ns"]])


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r:.40}")
    return value


class Ledger:
    """Cumulative energy of every (meter, channel), counted exactly once per pulse."""

    def __init__(self, max_power_w: float, smoothing_pulses: int = 1) -> None:
        self.max_power_w = max_power_w
        self.smoothing_pulses = smoothing_pulses
        self._channels: dict[tuple[str, str], ChannelState] = {}

    def channel(self, meter: str, channel: str) -> ChannelState:
        return self._channels.setdefault((meter, channel), ChannelState())

    def __iter__(self) -> Iterator[tuple[tuple[str, str], ChannelState]]:
        return iter(sorted(self._channels.items()))

    def apply(self, pulse: Pulse) -> int:
        """Count ``pulse``; return how many new pulses it accounted for (0 for a duplicate).

        Raises :class:`Implausible` (and changes nothing) if counting it would
        imply more than ``max_power_w`` or time running backwards.
        """
        state = self.channel(pulse.meter, pulse.channel)
        cursor = state.epochs.get(pulse.epoch)
        if cursor is not None and pulse.seq <= cursor.seq:
            return 0
        if cursor is None:
            new = pulse.seq
            reference_ts = state.last_ts_ns
        else:
            new = pulse.seq - cursor.seq
            reference_ts = cursor.ts_ns
        if reference_ts is not None:
            self._check_plausible(pulse, new, reference_ts, new_epoch=cursor is None)

        state.total_uwh += new * wh_to_uwh(pulse.wh)
        state.epochs[pulse.epoch] = Cursor(pulse.seq, pulse.ts_ns)
        if state.last_ts_ns is None or pulse.ts_ns > state.last_ts_ns:
            consecutive = cursor is not None and new == 1 and cursor.ts_ns == state.last_ts_ns
            if consecutive:
                state.intervals_ns = [*state.intervals_ns, pulse.ts_ns - cursor.ts_ns][-self.smoothing_pulses:]
            else:
                state.intervals_ns = []
            state.last_ts_ns = pulse.ts_ns
            state.wh = pulse.wh
        return new

    def _check_plausible(self, pulse: Pulse, new: int, reference_ts: int, *, new_epoch: bool) -> None:
        elapsed = pulse.ts_ns - reference_ts
        what = f"new epoch {pulse.epoch} starting at seq {pulse.seq}" if new_epoch else f"seq jump of {new}"
        if elapsed <= 0:
            raise Implausible(f"{what}: ts_ns {pulse.ts_ns} is not after the previous pulse ({reference_ts})")
        implied_w = new * pulse.wh * 3600 * NS_PER_S / elapsed
        if implied_w > self.max_power_w:
            raise Implausible(f"{what} in {elapsed / NS_PER_S:.3f} s implies {implied_w / 1000:.1f} kW, "
                              f"above the {self.max_power_w / 1000:g} kW limit")

    def set_total(self, meter: str, channel: str, total_uwh: int) -> int:
        """Calibrate a total to a physical meter reading; return the previous total."""
        if channel not in CHANNELS:
            raise ValueError(f"channel must be one of {', '.join(CHANNELS)}")
        if total_uwh < 0:
            raise ValueError("a total cannot be negative")
        state = self.channel(meter, channel)
        old, state.total_uwh = state.total_uwh, total_uwh
        return old

    def to_json(self) -> dict[str, Any]:
        meters: dict[str, dict[str, Any]] = {}
        for (meter, channel), state in self:
            meters.setdefault(meter, {})[channel] = state.to_json()
        return {"meters": meters}

    @classmethod
    def from_json(cls, doc: dict[str, Any], max_power_w: float, smoothing_pulses: int = 1) -> Ledger:
        """Rebuild a ledger; raises KeyError/TypeError/ValueError on a malformed document."""
        ledger = cls(max_power_w, smoothing_pulses)
        try:
            for meter, channels in doc["meters"].items():
                for channel, state in channels.items():
                    if channel not in CHANNELS:
                        raise ValueError(f"unknown channel {channel!r}")
                    ledger._channels[(meter, channel)] = ChannelState.from_json(state)
        except AttributeError as exc:  # a list or number where an object belongs
            raise TypeError(str(exc)) from None
        return ledger
