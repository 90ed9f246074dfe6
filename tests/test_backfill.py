"""Moving late energy to its true hour: which pulses move, the planner's properties, the store and the writer's hook.

The planner is checked against a model of Home Assistant's statistics: rows
of cumulative sums per hour, an hour's energy being its sum minus the sum of
the row before (0 before the first), and an import replacing the rows it
names. Real Home Assistant behaviour is in tests/test_ha_backfill.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.backfill import HOUR_S, NS_PER_S, Booked, CorrectionPlanner, Move, Plan, Row, hour_of, late_move
from backend.backfill_runner import FILE_NAME, CorrectionStore
from backend.memory_transport import MemorySink
from backend.writer import EnergyWriter
from common.config import load_config
from tests.support import T0, S, deliveries, pulse

KWH = 1_000_000_000  # uWh per kWh
H = HOUR_S


def energies(points: dict[int, float]) -> dict[int, int]:
    """Each hour's energy (uWh) as the Energy dashboard reads it from the sums."""
    out, previous = {}, 0.0
    for start in sorted(points):
        out[start] = round((points[start] - previous) * KWH)
        previous = points[start]
    return out


def applied(hours: dict[int, Row], recent: dict[int, float], plan: Plan) -> dict[int, float]:
    """Home Assistant's sums after importing ``plan``'s rows."""
    rows = {**hours, **{row.start_s: row for row in plan.rows}}
    return {**{start: value for start, value in recent.items() if start not in rows},
            **{start: row.sum for start, row in rows.items()}}


@st.composite
def situations(draw: st.DrawFn) -> tuple[dict[int, Row], dict[int, float], dict[tuple[int, int], int]]:
    """Compiled hours (some empty), the current hour from 5-minute rows, and moves whose energy Home Assistant
    booked in their arrival hour (or, sometimes, only partly)."""
    last = draw(st.integers(2, 12))
    present = draw(st.sets(st.integers(0, last - 1), max_size=last))
    own = {hour: draw(st.integers(0, 5_000)) for hour in [*present, last]}
    moves: dict[tuple[int, int], int] = {}
    for _ in range(draw(st.integers(0, 6))):
        to = draw(st.sampled_from(sorted(own)))
        if to == 0:
            continue
        start = draw(st.integers(0, to - 1))
        uwh = draw(st.integers(1, 3_000))
        moves[(start * H, to * H)] = moves.get((start * H, to * H), 0) + uwh
        own[to] += uwh  # Home Assistant booked it when it was counted
    short = draw(st.integers(0, 2_000))  # Home Assistant received less than was counted late
    own[last] = max(0, own[last] - short) if draw(st.booleans()) else own[last]
    total, sums = 0, {}
    for hour in sorted(own):
        total += own[hour]
        sums[hour * H] = total / KWH
    recent = {last * H: sums.pop(last * H)}
    return {start: Row(start, value, state=value) for start, value in sums.items()}, recent, moves


@settings(max_examples=300, deadline=None)
@given(situations())
def test_a_plan_keeps_the_total_never_empties_an_hour_below_zero_and_moves_only_what_it_says(
        situation: tuple[dict[int, Row], dict[int, float], dict[tuple[int, int], int]]) -> None:
    hours, recent, moves = situation
    plan = CorrectionPlanner(KWH).plan(hours, recent, moves)
    before = {**{s: r.sum for s, r in hours.items()}, **recent}
    after = applied(hours, recent, plan)
    assert round(max(after.items())[1] * KWH) == round(max(before.items())[1] * KWH), "the total stays"
    assert all(e >= 0 for e in energies(after).values()), energies(after)
    assert all(taken <= moves[key] for key, taken in plan.taken.items())
    # Each hour gains what moved to it and loses what moved from it; the others stay as they were.
    gained = {hour: 0 for hour in after}
    for (from_s, _), taken in plan.taken.items():
        gained[from_s] += taken
    old = energies(before)
    new = energies(after)
    assert sum(new[h] - old.get(h, 0) for h in after) == 0
    arrivals = [to_s for (_, to_s), taken in plan.taken.items() if taken]
    for hour in after:
        assert new[hour] - old.get(hour, 0) <= gained[hour], hour
        if new[hour] != old.get(hour, 0) and not gained[hour]:
            assert any(hour >= to_s for to_s in arrivals), f"hour {hour // H} changed, no energy moved there"
    assert {row.start_s for row in plan.rows} <= {h for h in after if h < max(recent)}, "compiled hours only"


@settings(max_examples=200, deadline=None)
@given(situations())
def test_a_plan_applied_again_or_planned_again_changes_nothing(
        situation: tuple[dict[int, Row], dict[int, float], dict[tuple[int, int], int]]) -> None:
    hours, recent, moves = situation
    planner = CorrectionPlanner(KWH)
    plan = planner.plan(hours, recent, moves)
    once = applied(hours, recent, plan)
    new_hours = {s: Row(s, v) for s, v in once.items() if s not in recent or s in hours}
    new_hours.update({row.start_s: row for row in plan.rows})
    assert applied(new_hours, recent, plan) == once, "an import of the same rows changes nothing"
    left = {key: uwh - plan.taken.get(key, 0) for key, uwh in moves.items() if uwh > plan.taken.get(key, 0)}
    again = planner.plan(new_hours, recent, left)
    assert sum(again.taken.values()) == 0 or again.taken.keys() <= left.keys()
    if not left:
        assert again.rows == () and not again.taken


def test_an_hour_home_assistant_has_not_compiled_is_never_written() -> None:
    # 1 Wh of 10:00 counted at 12:xx, but Home Assistant shows 11:00 only in 5-minute rows (not compiled).
    plan = CorrectionPlanner(KWH).plan({}, {11 * H: 0.001, 12 * H: 0.002}, {(10 * H, 12 * H): 1_000})
    assert plan.rows == () and plan.taken == {}


def test_energy_home_assistant_booked_later_than_it_was_counted_is_taken_from_there() -> None:
    # Counted at 12:59:59, Home Assistant stored the value at 13:00:00.
    hours = {11 * H: Row(11 * H, 0.001), 12 * H: Row(12 * H, 0.001)}
    plan = CorrectionPlanner(KWH).plan(hours, {13 * H: 0.003}, {(10 * H, 12 * H): 1_000_000})
    assert [(r.start_s // H, round(r.sum * KWH)) for r in plan.rows] == [(10, 1_000_000), (11, 2_000_000),
                                                                          (12, 2_000_000)]


def test_only_a_single_pulse_with_a_trusted_time_moves() -> None:
    late = Booked("main", "active", ts_ns=T0, counted_ns=T0 + 2 * H * S, pulses=1, added_uwh=1_000_000, trusted=True)
    assert late_move(late) == Move("main", "active", hour_of(T0), hour_of(T0) + 2 * H, 1_000_000)
    for stays in (Booked("main", "active", T0, T0 + 2 * H * S, 1, 1_000_000, trusted=False),  # untrusted time
                  Booked("main", "active", T0, T0 + 2 * H * S, 3, 3_000_000, trusted=True),  # a counter jump
                  Booked("main", "active", T0, T0 + 2 * H * S, 1, 0, trusted=True),  # part of a calibration
                  Booked("main", "active", T0, T0 + 1 * S, 1, 1_000_000, trusted=True)):  # in its own hour
        assert late_move(stays) is None, stays
    assert hour_of(3 * H * NS_PER_S + 1) == 3 * H


def test_the_store_takes_planned_moves_off_in_the_same_transaction_as_the_plan(tmp_path: Path) -> None:
    store = CorrectionStore(tmp_path / FILE_NAME)
    store.add([Move("main", "active", 0, 2 * H, 5), Move("main", "active", H, 2 * H, 3)])
    store.save_plan("main", "active", "sensor.x", [Row(0, 0.5, None, None)], {(0, 2 * H): 5, (H, 2 * H): 1})
    store.close()
    reopened = CorrectionStore(tmp_path / FILE_NAME)
    assert reopened.moves("main", "active") == {(H, 2 * H): 2}
    assert reopened.plan("main", "active") == ("sensor.x", [Row(0, 0.5, None, None)])
    reopened.finish_plan("main", "active")
    assert reopened.plan("main", "active") is None
    assert reopened.channels() == [("main", "active")]


def test_the_writer_tells_what_it_counted_only_once_the_batch_is_saved(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [T0 + 2 * H * S]
    writer = EnergyWriter.open(load_config(env={"EMDC_STATE_DIR": str(tmp_path), "EMDC_DISCOVERY": "off"}),
                               sink=MemorySink(), clock=lambda: now[0])
    told: list[list[Booked]] = []
    writer.on_saved = told.append
    now[0] += S  # a second after the meter's admission: time for the untrusted third pulse
    writer.handle_batch(deliveries(pulse(1, 0), pulse(1, 0), pulse(2, 5), pulse(3, 10 * H)))
    assert told == [[Booked("main", "active", T0, now[0], 1, 1_000_000, True),
                     Booked("main", "active", T0 + 5 * S, now[0], 1, 1_000_000, True),
                     Booked("main", "active", T0 + 10 * H * S, now[0], 1, 1_000_000, False)]]

    def full(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(writer.store, "save", full)
    with pytest.raises(OSError):
        writer.handle_batch(deliveries(pulse(4, 20)))
    assert len(told) == 1, "a batch that was not saved is counted again when redelivered: not told"
