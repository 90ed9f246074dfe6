"""Home Assistant's hourly energy statistics at the true hour: which energy moves, and the rows that move it.

Home Assistant books energy in the hour its sensor's value changes. After an
outage (the Pi offline, the server or Mosquitto down, a backlog drained at
start) the whole outage's energy lands in the hour it arrives: a spike, and
empty hours before it. The writer knows when each pulse happened, so it can
move that energy back.

:func:`late_move` says, for one counted pulse message, how much energy moves
from the hour it arrived in to the hour it happened in: only a single pulse
with a trusted timestamp (:mod:`backend.trust`); a counter jump (pulses whose
timing detail the Pi dropped) and a pulse with an untrusted timestamp stay
where they arrived.

:class:`CorrectionPlanner` turns the pending moves of one statistic, given
Home Assistant's rows, into the hourly rows to write with
``recorder/import_statistics``. Absolute rows, not relative adjustments:
importing them twice changes nothing, so a plan saved before it is applied can
be applied again after any crash. It never writes an hour Home Assistant has
not compiled yet (its compilation would then collide with the row), takes
energy only from hours that show at least that much (no hour goes negative),
and leaves every row from the source hour on as it is, so the total stays.

Example: 2 Wh at 10:00-11:00 counted at 12:20, a sensor whose first
statistics are of 12:00, holding 3 Wh so far::

    >>> H = HOUR_S
    >>> planner = CorrectionPlanner(uwh_per_unit=1_000_000_000)  # kWh
    >>> plan = planner.plan({}, {12 * H: 0.003}, {(10 * H, 12 * H): 2_000_000})
    >>> [(row.start_s // H, row.sum) for row in plan.rows], sum(plan.taken.values())
    ([(10, 0.002)], 2000000)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

NS_PER_S = 1_000_000_000
HOUR_S = 3600


def hour_of(ts_ns: int) -> int:
    """The start (Unix seconds, UTC) of the hour ``ts_ns`` lies in: Home Assistant's statistics hours."""
    return ts_ns // NS_PER_S // HOUR_S * HOUR_S


@dataclass(frozen=True)
class Booked:
    """One pulse message the writer counted: what it added (``added_uwh``), after how many pulses (``pulses``),
    when it says it happened (``ts_ns``), whether that is trusted, and when the writer counted it: all that
    :func:`late_move` needs, taken from the ledger right after it counted.

    >>> Booked("main", "active", ts_ns=0, counted_ns=1, pulses=1, added_uwh=1_000_000, trusted=True).pulses
    1
    """

    meter: str
    channel: str
    ts_ns: int
    counted_ns: int
    pulses: int
    added_uwh: int
    trusted: bool


@dataclass(frozen=True)
class Move:
    """Energy (``uwh``) of ``meter``/``channel`` that happened in the hour ``from_s`` and was counted in the
    later hour ``to_s``; moves of the same pair of hours add up.

    >>> Move("main", "active", from_s=0, to_s=3600, uwh=5).to_s
    3600
    """

    meter: str
    channel: str
    from_s: int
    to_s: int
    uwh: int


def late_move(booked: Booked) -> Move | None:
    """The energy of ``booked`` to move to the hour it happened in, or None if it stays where it arrived.

    >>> late = Booked("main", "active", ts_ns=7_200 * NS_PER_S, counted_ns=11_000 * NS_PER_S, pulses=1,
    ...               added_uwh=1_000_000, trusted=True)
    >>> late_move(late)
    Move(meter='main', channel='active', from_s=7200, to_s=10800, uwh=1000000)
    >>> late_move(Booked("main", "active", 7_200 * NS_PER_S, 11_000 * NS_PER_S, 1, 1_000_000, trusted=False))
    """
    if not booked.trusted or booked.pulses != 1 or booked.added_uwh <= 0:
        return None
    from_s, to_s = hour_of(booked.ts_ns), hour_of(booked.counted_ns)
    if from_s >= to_s:
        return None
    return Move(booked.meter, booked.channel, from_s, to_s, booked.added_uwh)


@dataclass(frozen=True)
class Row:
    """An hourly statistics row as Home Assistant keeps it (``sum`` in the statistic's unit): what the planner
    reads and writes, absolute, so that writing it twice is writing it once.

    >>> Row(start_s=7200, sum=0.25, state=0.25)
    Row(start_s=7200, sum=0.25, state=0.25, last_reset_s=None)
    """

    start_s: int
    sum: float
    state: float | None = None
    last_reset_s: float | None = None


@dataclass(frozen=True)
class Plan:
    """The rows to import and the energy each (``from_s``, arrival hour) pair of moves it accounts for (taken
    off the pending moves when the plan is saved, so no energy is moved twice).

    >>> Plan(rows=(), taken={}).rows
    ()
    """

    rows: tuple[Row, ...]
    taken: Mapping[tuple[int, int], int]


class CorrectionPlanner:
    """Moves of one statistic + Home Assistant's rows -> the absolute hourly rows that put the energy in place.

    ``hours`` are the compiled hourly rows by start; ``recent`` the sum reached
    so far in each later hour (from the 5-minute statistics, for the hours not
    compiled yet). Before a statistic's first row its sum counts from 0, as in
    Home Assistant's Energy dashboard. A move takes energy from its arrival
    hour or, where that hour shows less, from the next hours (Home Assistant
    received the value later); what no hour shows yet stays pending.
    """

    def __init__(self, uwh_per_unit: int) -> None:
        self.uwh_per_unit = uwh_per_unit

    def plan(self, hours: Mapping[int, Row], recent: Mapping[int, float],
             moves: Mapping[tuple[int, int], int]) -> Plan:
        points = {**{start: row.sum for start, row in hours.items()},
                  **{start: value for start, value in recent.items() if start not in hours}}
        ordered = sorted(points)
        available: dict[int, int] = {}
        previous = 0.0
        for start in ordered:
            available[start] = max(0, round((points[start] - previous) * self.uwh_per_unit))
            previous = points[start]
        compiled_until = max(recent, default=max(hours, default=0))  # HA has compiled every hour before it
        taken: dict[tuple[int, int], int] = {}
        spans: list[tuple[int, int, int]] = []  # (from, source, uwh): the sum rises by uwh over [from, source)
        for (from_s, to_s), uwh in sorted(moves.items()):
            remaining = uwh
            for source in ordered:
                if remaining == 0 or source > compiled_until:
                    break
                if source < to_s or not available[source]:
                    continue
                if any(from_s <= start < source for start in recent if start not in hours):
                    break  # an hour in between is not compiled yet
                take = min(remaining, available[source])
                available[source] -= take
                remaining -= take
                spans.append((from_s, source, take))
                taken[(from_s, to_s)] = taken.get((from_s, to_s), 0) + take

        def raised(start: int) -> int:
            return sum(uwh for from_s, source, uwh in spans if from_s <= start < source)

        rows: dict[int, Row] = {}
        for start, row in hours.items():
            if delta := raised(start):
                rows[start] = Row(start, row.sum + delta / self.uwh_per_unit, row.state, row.last_reset_s)
        for from_s in {from_s for from_s, _, _ in spans} - hours.keys():
            before = [start for start in hours if start < from_s]
            base = hours[max(before)].sum if before else 0.0
            rows[from_s] = Row(from_s, base + raised(from_s) / self.uwh_per_unit)
        return Plan(tuple(rows[start] for start in sorted(rows)), taken)
