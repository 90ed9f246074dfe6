"""edge.simulator.LoadProfile: piecewise-constant loads and the pulse times they produce."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge.simulator import LoadProfile


def row(*values: float) -> tuple[float, ...]:
    """A profile step as it is kept: every channel's column, the ones not given 0."""
    return (*values, *(0.0,) * (6 - len(values)))


def times_until(profile: LoadProfile, end_s: float, channel: str = "active", wh: float = 1.0) -> list[float]:
    return list(itertools.takewhile(lambda t: t <= end_s, profile.pulse_times(channel, wh)))


def energy_wh(profile: LoadProfile, end_s: float, column: int = 1) -> float:
    """Integral of a step column from 0 to end_s, in Wh."""
    starts = [s[0] for s in profile.steps]
    ends = [*starts[1:], float("inf")]
    return sum(step[column] * max(0.0, min(end, end_s) - step[0]) / 3600
               for step, end in zip(profile.steps, ends, strict=True))


@pytest.fixture
def csv_file(tmp_path: Path):
    def write(text: str) -> Path:
        path = tmp_path / "load.csv"
        path.write_text(text)
        return path
    return write


# --- pulse times ----------------------------------------------------------------------------------

def test_constant_3kw_with_1wh_pulses_every_1_2_seconds():
    times = list(itertools.islice(LoadProfile.constant(3000).pulse_times("active", 1.0), 5))
    assert times == pytest.approx([1.2, 2.4, 3.6, 4.8, 6.0])


def test_pulse_interval_scales_with_wh():
    times = list(itertools.islice(LoadProfile.constant(3000).pulse_times("active", 0.5), 3))
    assert times == pytest.approx([0.6, 1.2, 1.8])


def test_reactive_channel_uses_the_reactive_column():
    profile = LoadProfile.constant(3000, reactive_var=1800)
    assert list(itertools.islice(profile.pulse_times("reactive", 1.0), 2)) == pytest.approx([2.0, 4.0])


def test_zero_load_produces_no_pulses_and_terminates():
    assert list(LoadProfile.constant(3000).pulse_times("reactive", 1.0)) == []
    assert list(LoadProfile.constant(0).pulse_times("active", 1.0)) == []


def test_unknown_channel_is_an_error():
    with pytest.raises(KeyError):
        next(LoadProfile.constant(100).pulse_times("apparent", 1.0))


def test_energy_carries_over_a_step_change():
    # 1800 W for 1 s stores 0.5 Wh; at 3600 W the other 0.5 Wh takes 0.5 s more.
    profile = LoadProfile(((0.0, 1800.0, 0.0), (1.0, 3600.0, 0.0)))
    assert next(profile.pulse_times("active", 1.0)) == pytest.approx(1.5)


def test_energy_carries_over_an_idle_step():
    # 0.5 Wh before the load stops; the pulse completes 1 s after it resumes at 1800 W.
    profile = LoadProfile(((0.0, 1800.0, 0.0), (1.0, 0.0, 0.0), (100.0, 1800.0, 0.0)))
    assert next(profile.pulse_times("active", 1.0)) == pytest.approx(101.0)


def test_last_step_that_stops_the_load_ends_the_pulses():
    profile = LoadProfile(((0.0, 3600.0, 0.0), (10.0, 0.0, 0.0)))
    assert list(profile.pulse_times("active", 1.0)) == pytest.approx([float(i) for i in range(1, 11)])


steps_strategy = st.lists(st.tuples(st.floats(0.5, 120), st.sampled_from([0.0, 40.0, 150.0, 999.0, 3000.0, 5000.0])),
                          min_size=1, max_size=8)


def profile_from(durations_and_powers: list[tuple[float, float]]) -> LoadProfile:
    starts = itertools.accumulate((d for d, _ in durations_and_powers), initial=0.0)
    return LoadProfile(tuple((start, w, 0.0) for start, (_, w) in zip(starts, durations_and_powers, strict=False)))


@settings(max_examples=200, deadline=None)
@given(steps_strategy, st.sampled_from([0.5, 1.0, 2.0, 10.0]), st.floats(0, 1200))
@example([(1.6654934892736009, 999.0), (1.0, 999.0)], 0.5, 600.0)  # 333 pulses by the reals, 332 in time
def test_number_of_pulses_matches_the_energy(steps: list[tuple[float, float]], wh: float, end_s: float):
    profile = profile_from(steps)
    expected = energy_wh(profile, end_s) / wh
    count = len(times_until(profile, end_s, wh=wh))
    assert expected - 1 - 1e-6 <= count <= expected + 1e-6  # the tolerance: float rounding of the energy


@settings(max_examples=200, deadline=None)
@given(steps_strategy, st.sampled_from([0.5, 1.0, 2.0]))
def test_pulse_times_increase_and_each_pulse_holds_wh(steps: list[tuple[float, float]], wh: float):
    profile = profile_from(steps)
    times = times_until(profile, 400, wh=wh)
    assert times == sorted(times)
    # The n-th pulse completes when n*wh have been used.
    wrong = [(n, t) for n, t in enumerate(times, start=1)
             if not math.isclose(energy_wh(profile, t), n * wh, rel_tol=1e-9, abs_tol=1e-6)]
    assert wrong == []


def test_with_constant_replaces_one_column():
    profile = LoadProfile(((0.0, 100.0, 5.0), (10.0, 200.0, 6.0))).with_constant("reactive", 50.0)
    assert profile.steps == (row(0.0, 100.0, 50.0), row(10.0, 200.0, 50.0))
    assert profile.with_constant("gas", 1.5).steps == (row(0.0, 100.0, 50.0, 0.0, 1.5),
                                                       row(10.0, 200.0, 50.0, 0.0, 1.5))


@pytest.mark.parametrize(("channel", "rate", "quantity", "period_s"), [
    ("export", 3600.0, 1.0, 1.0),   # 3600 W returned: 1 Wh a second
    ("gas", 1.8, 0.01, 20.0),       # 1.8 m³/h: 0.01 m³ every 20 s
    ("water", 6.0, 1.0, 10.0),      # 6 L/min: 1 L every 10 s
])
def test_each_channel_pulses_at_its_rate_in_its_unit(channel: str, rate: float, quantity: float, period_s: float):
    profile = LoadProfile.constant(0).with_constant(channel, rate)
    assert profile.channels() == (channel,)
    assert list(itertools.islice(profile.pulse_times(channel, quantity), 3)) == pytest.approx(
        [period_s, 2 * period_s, 3 * period_s])


# --- CSV profiles ---------------------------------------------------------------------------------

def test_csv_with_header_comments_and_blank_lines(csv_file):
    path = csv_file("seconds,active_w,reactive_var\n# morning\n0,180,60\n\n  # kettle\n600,2180,60\n900,180\n")
    assert LoadProfile.from_csv(path).steps == (row(0.0, 180.0, 60.0), row(600.0, 2180.0, 60.0), row(900.0, 180.0))


def test_csv_columns_for_export_gas_and_water(csv_file):
    path = csv_file("seconds,active_w,reactive_var,export_w,gas_m3_per_h,water_l_per_min\n0,0,0,2000,1.2,8\n60,500\n")
    profile = LoadProfile.from_csv(path)
    assert profile.steps == (row(0.0, 0.0, 0.0, 2000.0, 1.2, 8.0), row(60.0, 500.0))
    assert profile.channels() == ("active", "export", "gas", "water")


def test_csv_without_header(csv_file):
    assert LoadProfile.from_csv(csv_file("0,1000\n")).steps == (row(0.0, 1000.0),)


def test_csv_rows_are_sorted_by_time(csv_file):
    assert [s[0] for s in LoadProfile.from_csv(csv_file("60,1\n0,2\n30,3\n")).steps] == [0.0, 30.0, 60.0]


def test_csv_extra_columns_are_refused(csv_file):
    with pytest.raises(ValueError, match="expected seconds,active_w"):
        LoadProfile.from_csv(csv_file("0,100,10,note\n"))
    with pytest.raises(ValueError, match="expected seconds,active_w"):
        LoadProfile.from_csv(csv_file("0,100,10,0,0,0,7\n"))


def test_csv_a_typo_in_the_first_data_row_is_not_taken_for_a_header(csv_file):
    with pytest.raises(ValueError, match=":1: expected seconds,active_w"):
        LoadProfile.from_csv(csv_file("0,3O00\n60,100\n"))


def test_csv_absurd_power_is_refused(csv_file):
    with pytest.raises(ValueError, match="values must be from 0"):
        LoadProfile.from_csv(csv_file("0,1e300\n"))


def test_csv_non_number_after_the_first_line_names_file_and_line(csv_file):
    path = csv_file("0,100\n60,lots\n")
    with pytest.raises(ValueError, match=rf"{path}:2: expected seconds,active_w"):
        LoadProfile.from_csv(path)


def test_csv_single_column_is_an_error(csv_file):
    path = csv_file("0,100\n60\n")
    with pytest.raises(ValueError, match=rf"{path}:2: expected seconds,active_w"):
        LoadProfile.from_csv(path)


@pytest.mark.parametrize("row", ["-1,100", "0,-100", "0,100,-5"])
def test_csv_negative_values_are_errors(csv_file, row: str):
    with pytest.raises(ValueError, match="values must be from 0"):
        LoadProfile.from_csv(csv_file(row + "\n"))


@pytest.mark.parametrize("text", ["", "seconds,active_w\n", "# nothing\n\n"])
def test_csv_without_data_rows_is_an_error(csv_file, text: str):
    with pytest.raises(ValueError, match="no rows"):
        LoadProfile.from_csv(csv_file(text))


def test_csv_missing_file_is_an_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        LoadProfile.from_csv(tmp_path / "absent.csv")


def test_csv_header_after_a_comment_is_skipped(csv_file):
    assert LoadProfile.from_csv(csv_file("# exported from the logger\nseconds,active_w\n0,100\n")).steps == (
        row(0.0, 100.0),)


@pytest.mark.parametrize("row", ["0,nan", "0,inf", "0,100,nan"])
def test_csv_non_finite_values_are_errors(csv_file, row: str):
    with pytest.raises(ValueError):
        LoadProfile.from_csv(csv_file(row + "\n"))


# --- the household hour ---------------------------------------------------------------------------

def test_household_is_deterministic_for_a_seed():
    assert LoadProfile.household(seed=7) == LoadProfile.household(seed=7)
    assert LoadProfile.household(seed=7) != LoadProfile.household(seed=8)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("duration_s", [600.0, 3600.0, 7200.0])
def test_household_is_within_sane_ranges(seed: int, duration_s: float):
    profile = LoadProfile.household(duration_s=duration_s, seed=seed, solar_w=0.0)
    assert profile.steps[0] == row(0.0, 180.0, 60.0)
    starts = [s[0] for s in profile.steps]
    assert starts == sorted(starts)
    assert all(0 <= t < duration_s for t in starts)
    assert all(179.999 <= s[1] <= 6100.001 for s in profile.steps)  # base load .. everything on
    assert all(59.999 <= s[2] <= 610.001 for s in profile.steps)
    assert all(s[3] == 0 for s in profile.steps)  # no solar panels: nothing returned
    assert all(-1e-9 <= s[4] <= 2.2 + 1e-9 and -1e-9 <= s[5] <= 9.0 + 4 * 6.0 + 1e-9 for s in profile.steps)
    mean_w = energy_wh(profile, duration_s) * 3600 / duration_s
    assert 180 <= mean_w <= 4000


@pytest.mark.parametrize("seed", range(10))
def test_household_solar_exports_what_the_house_does_not_use(seed: int):
    without = LoadProfile.household(seed=seed, solar_w=0.0)
    sunny = LoadProfile.household(seed=seed, solar_w=1500.0)
    # The same appliances: the meter counts the import above the panels and exports the rest, never both.
    assert [s[0] for s in sunny.steps] == [s[0] for s in without.steps]
    for load, step in zip(without.steps, sunny.steps, strict=True):
        assert step[1] == pytest.approx(max(0.0, load[1] - 1500.0))
        assert step[3] == pytest.approx(max(0.0, 1500.0 - load[1]))
        assert step[1] == 0 or step[3] == 0
    assert set(sunny.channels()) == {"active", "reactive", "export", "gas", "water"}


def test_household_produces_a_realistic_number_of_pulses():
    profile = LoadProfile.household()
    pulses = len(times_until(profile, 3600.0))
    assert pulses == pytest.approx(energy_wh(profile, 3600.0), abs=1)
    assert 200 < pulses < 4000
