"""Exact, idempotent energy counting: the functional core of the writer.

The edge numbers every pulse with a counter ``seq`` per (meter, channel,
epoch). The ledger remembers the highest ``seq`` it has counted per epoch, so

* a ``seq`` at or below it is a duplicate and counts nothing;
* a jump counts every pulse the counter says happened (``seq - last_seq``);
* a new epoch (the edge's counter store was recreated) counts its ``seq``
  pulses since that counter began, on top of the same total;
* a ``seq`` at or below the highest one but stamped later than every pulse
  counted in its epoch is no duplicate but a reused counter (a restored
  backup of the Pi's store): refused. Later than the highest ``seq``'s own
  time is not enough: the edge follows its wall clock back, so after a step
  back a resent lower ``seq`` carries a later time than the newest pulse.

Timestamps are believed only where :mod:`backend.trust` says so: a pulse
with an untrusted timestamp (ahead of the writer's clock, behind the
channel's previous pulse, from an unsynchronised edge) is counted all the
same, but its time is used neither for power nor for judging counter jumps.

A calibration sets a total to a meter reading taken at some time; pulses up
to that time that arrive afterwards (a Pi's backlog) are already part of the
reading, so they advance the counters without adding energy.

Energy is kept as an integer number of microwatt-hours, so sums are exact.
Power comes only from two consecutive trusted pulses of one epoch. No I/O;
the writer's clock is passed in (``now_ns``).

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

from backend.trust import jump_doubt, timestamp_doubt
from common.channels import CHANNELS
from common.message import MessageError, Pulse, validate_meter_id

UWH_PER_WH = 1_000_000
NS_PER_S = 1_000_000_000
CALIBRATIONS_KEPT = 32


class Implausible(ValueError):
    """A pulse the ledger refuses to count; the text says why (it goes to the dead-letter queue)."""


def wh_to_uwh(wh: float) -> int:
    return round(wh * UWH_PER_WH)


@dataclass
class Cursor:
    """The newest counted pulse of one epoch: its ``seq`` and timestamp as sent, the epoch's last
    trusted timestamp, the writer's clock when it was counted (None where unknown), and the latest
    timestamp of any pulse counted in the epoch, which tells a duplicate from a reused counter
    (None: ``ts_ns``, as for cursors saved by older versions or seeded from a database)."""

    seq: int
    ts_ns: int
    trusted_ns: int | None = None
    received_ns: int | None = None
    latest_ns: int | None = None

    def latest_counted_ns(self) -> int:
        return self.ts_ns if self.latest_ns is None else self.latest_ns

    def to_json(self) -> list[int | None]:
        return [self.seq, self.ts_ns, self.trusted_ns, self.received_ns, self.latest_ns]

    @classmethod
    def from_json(cls, doc: list[Any]) -> Cursor:
        """``[seq, ts_ns]`` (saved by older versions, whose timestamps were all trusted), the four-item
        form of versions that did not keep the latest timestamp, or the full form."""
        if len(doc) == 2:
            return cls(_int(doc[0]), _int(doc[1]), _int(doc[1]))
        if len(doc) not in (4, 5):
            raise ValueError(f"a cursor has 2, 4 or 5 items, not {len(doc)}")
        seq, ts_ns, trusted_ns, received_ns, *latest = doc
        return cls(_int(seq), _int(ts_ns), _optional_int(trusted_ns), _optional_int(received_ns),
                   _optional_int(latest[0]) if latest else None)


@dataclass
class ChannelState:
    """Totals and timing of one (meter, channel)."""

    total_uwh: int = 0
    epochs: dict[str, Cursor] = field(default_factory=dict)
    # The newest trusted timestamp of any epoch: the idle time of power is measured from it.
    last_ts_ns: int | None = None
    wh: float = 1.0
    # The writer's clock when the channel last counted a pulse, and why that
    # pulse's timestamp was not trusted ("" if it was).
    received_ns: int | None = None
    ts_doubt: str = ""
    # Pulses of this channel held back in the dead-letter queue so far, and the last reason.
    held_back: int = 0
    held_back_reason: str = ""
    # Intervals between the most recent consecutive pulses, newest last; empty
    # after a gap, since power may only come from consecutive pulses.
    intervals_ns: list[int] = field(default_factory=list)
    # The latest calibration's reading time, and the ids of recent calibrations
    # (a redelivered command must not reset the total a second time).
    calibrated_at_ns: int = 0
    calibrations: list[str] = field(default_factory=list)

    def power_w(self) -> float | None:
        """Mean power over the remembered intervals, or None if unknown."""
        if not self.intervals_ns:
            return None
        return len(self.intervals_ns) * self.wh * 3600 * NS_PER_S / sum(self.intervals_ns)

    def to_json(self) -> dict[str, Any]:
        return {"total_uwh": self.total_uwh, "epochs": {e: c.to_json() for e, c in self.epochs.items()},
                "last_ts_ns": self.last_ts_ns, "wh": self.wh, "intervals_ns": list(self.intervals_ns),
                "calibrated_at_ns": self.calibrated_at_ns, "calibrations": list(self.calibrations),
                "received_ns": self.received_ns, "ts_doubt": self.ts_doubt, "held_back": self.held_back,
                "held_back_reason": self.held_back_reason}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ChannelState:
        state = cls(total_uwh=_int(doc["total_uwh"]),
                    epochs={str(e): Cursor.from_json(c) for e, c in doc["epochs"].items()},
                    last_ts_ns=_optional_int(doc["last_ts_ns"]),
                    wh=float(doc["wh"]), intervals_ns=[_int(i) for i in doc["intervals_ns"]],
                    calibrated_at_ns=_int(doc.get("calibrated_at_ns", 0)),
                    calibrations=[str(c) for c in doc.get("calibrations", [])],
                    received_ns=_optional_int(doc.get("received_ns")), ts_doubt=str(doc.get("ts_doubt", "")),
                    held_back=_int(doc.get("held_back", 0)), held_back_reason=str(doc.get("held_back_reason", "")))
        if state.total_uwh < 0 or not 0 < state.wh <= 1000:
            raise ValueError(f"implausible channel state: total {state.total_uwh}, wh {state.wh}")
        return state


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r:.40}")
    return value


def _optional_int(value: Any) -> int | None:
    return None if value is None else _int(value)


class Ledger:
    """Cumulative energy of every (meter, channel), counted exactly once per pulse."""

    def __init__(self, max_power_w: float, smoothing_pulses: int = 1, max_ahead_s: float = 600.0) -> None:
        self.max_power_w = max_power_w
        self.smoothing_pulses = smoothing_pulses
        self.max_ahead_s = max_ahead_s
        self._channels: dict[tuple[str, str], ChannelState] = {}

    def channel(self, meter: str, channel: str) -> ChannelState:
        return self._channels.setdefault((meter, channel), ChannelState())

    def __iter__(self) -> Iterator[tuple[tuple[str, str], ChannelState]]:
        return iter(sorted(self._channels.items()))

    def apply(self, pulse: Pulse, now_ns: int | None = None, *, readmitted: bool = False) -> int:
        """Count ``pulse``; return how many new pulses it accounted for (0 for a duplicate).

        ``now_ns`` is the writer's clock (None: no clock-based checks).
        Raises :class:`Implausible` (and changes nothing) for a reused
        counter, or for a counter jump implying more than ``max_power_w``
        unless the pulse was ``readmitted`` by a person after inspection.
        """
        state = self.channel(pulse.meter, pulse.channel)
        cursor = state.epochs.get(pulse.epoch)
        if cursor is not None and pulse.seq <= cursor.seq:
            if pulse.ts_ns > cursor.latest_counted_ns():
                raise Implausible(f"seq {pulse.seq} of epoch {pulse.epoch} was already counted at an earlier "
                                  "time: was the edge's counter store restored from a backup or copied?")
            return 0
        new = pulse.seq if cursor is None else pulse.seq - cursor.seq
        reference_ns = state.last_ts_ns if cursor is None or cursor.trusted_ns is None else cursor.trusted_ns
        reference_received_ns = state.received_ns if cursor is None else cursor.received_ns
        doubt = timestamp_doubt(pulse.ts_ns, now_ns=now_ns, previous_ns=reference_ns,
                                max_ahead_ns=round(self.max_ahead_s * NS_PER_S), synced=pulse.synced)
        if not readmitted and (cursor is not None or state.epochs):
            jump = jump_doubt(
                new, wh=pulse.wh,
                edge_elapsed_ns=None if doubt or reference_ns is None else pulse.ts_ns - reference_ns,
                received_elapsed_ns=None if now_ns is None or reference_received_ns is None
                else now_ns - reference_received_ns,
                max_power_w=self.max_power_w)
            if jump:
                what = f"new epoch {pulse.epoch} starting at seq {pulse.seq}" if cursor is None else "counter"
                raise Implausible(f"{what}: {jump}")

        # Pulses up to a calibration's reading time are part of the reading. An untrusted timestamp cannot
        # say when a pulse happened: the writer's receive time decides instead, so none is silently lost.
        happened_ns = pulse.ts_ns if not doubt or now_ns is None else now_ns
        if happened_ns > state.calibrated_at_ns:
            state.total_uwh += new * wh_to_uwh(pulse.wh)
        if not doubt:
            trusted_ns: int | None = pulse.ts_ns
        else:  # the epoch's last trusted time stays the reference for its next pulse
            trusted_ns = reference_ns
        latest_ns = pulse.ts_ns if cursor is None else max(pulse.ts_ns, cursor.latest_counted_ns())
        state.epochs[pulse.epoch] = Cursor(pulse.seq, pulse.ts_ns, trusted_ns, now_ns, latest_ns)
        state.received_ns = now_ns
        state.ts_doubt = doubt
        if doubt:
            state.intervals_ns = []  # power is unknown until two consecutive trusted pulses
        elif state.last_ts_ns is None or pulse.ts_ns > state.last_ts_ns:
            consecutive = (cursor is not None and new == 1 and cursor.ts_ns == cursor.trusted_ns
                           and cursor.ts_ns == state.last_ts_ns)
            if consecutive and cursor is not None:
                state.intervals_ns = [*state.intervals_ns, pulse.ts_ns - cursor.ts_ns][-self.smoothing_pulses:]
            else:
                state.intervals_ns = []
            state.last_ts_ns = pulse.ts_ns
            state.wh = pulse.wh
        return new

    def set_total(self, meter: str, channel: str, total_uwh: int, *, as_of_ns: int = 0,
                  command_id: str = "") -> int | None:
        """Calibrate a total to a meter reading taken at ``as_of_ns``; return the previous total.

        Returns None, changing nothing, for a command id already applied.
        """
        if channel not in CHANNELS:
            raise ValueError(f"channel must be one of {', '.join(CHANNELS)}")
        if total_uwh < 0:
            raise ValueError("a total cannot be negative")
        state = self.channel(meter, channel)
        if command_id and command_id in state.calibrations:
            return None
        old, state.total_uwh = state.total_uwh, total_uwh
        state.calibrated_at_ns = max(state.calibrated_at_ns, as_of_ns)
        if command_id:
            state.calibrations = [*state.calibrations, command_id][-CALIBRATIONS_KEPT:]
        return old

    def to_json(self) -> dict[str, Any]:
        meters: dict[str, dict[str, Any]] = {}
        for (meter, channel), state in self:
            meters.setdefault(meter, {})[channel] = state.to_json()
        return {"meters": meters}

    @classmethod
    def from_json(cls, doc: dict[str, Any], max_power_w: float, smoothing_pulses: int = 1,
                  max_ahead_s: float = 600.0) -> Ledger:
        """Build a ledger from :meth:`to_json` output; raises KeyError/TypeError/ValueError if malformed."""
        ledger = cls(max_power_w, smoothing_pulses, max_ahead_s)
        ledger.load_json(doc)
        return ledger

    def load_json(self, doc: dict[str, Any]) -> None:
        """Replace every channel's state with ``doc``'s (all or nothing)."""
        channels = {}
        try:
            for meter, by_channel in doc["meters"].items():
                for channel, state in by_channel.items():
                    if channel not in CHANNELS:
                        raise ValueError(f"unknown channel {channel!r}")
                    validate_meter_id(meter)
                    channels[(meter, channel)] = ChannelState.from_json(state)
        except AttributeError as exc:  # a list or number where an object belongs
            raise TypeError(str(exc)) from None
        except MessageError as exc:
            raise ValueError(str(exc)) from None
        self._channels = channels
