"""Energy reports: periods in local time across DST, totals, gaps and counter jumps, table, CSV, chart, CLI."""

from __future__ import annotations

import csv
import io
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from backend.database import PulseStore
from backend.report import (
    Surroundings,
    build_report,
    parse_time,
    plot,
    render_csv,
    render_table,
    report_window,
    slots_from_pulses,
)
from common.message import Pulse
from emdc.cli import main

BERLIN = ZoneInfo("Europe/Berlin")
S = 1_000_000_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def ns(moment: datetime) -> int:
    return round(moment.timestamp()) * S


def steady(start: datetime, hours: float, watts: float, *, wh: float = 10.0, channel: str = "active",
           epoch: str = "e1", first_seq: int = 1, meter: str = "main") -> list[Pulse]:
    """Pulses of a constant load from ``start`` on, the first one interval after it."""
    interval_ns = round(wh * 3600 / watts * S)
    count = round(hours * watts / wh)
    return [Pulse(meter, channel, epoch, first_seq + i, ns(start) + (i + 1) * interval_ns - 1, wh)
            for i in range(count)]


def offline(pulses: list[Pulse], start: datetime, end: datetime) -> list[Pulse]:
    """The pulses an edge that was off from ``start`` to ``end`` recorded: none then, and no seq jump."""
    kept = [p for p in pulses if not ns(start) <= p.ts_ns < ns(end)]
    seqs: dict[tuple[str, str], int] = {}
    out = []
    for p in kept:
        seq = seqs[(p.channel, p.epoch)] = seqs.get((p.channel, p.epoch), p.seq - 1) + 1
        out.append(Pulse(p.meter, p.channel, p.epoch, seq, p.ts_ns, p.wh))
    return out


def report_for(pulses: list[Pulse], by: str, start: datetime, end: datetime, *, tz=UTC, now: datetime | None = None,
               surroundings: Surroundings | None = None, gap_s: float = 1800):
    now = now or datetime(2099, 1, 1, tzinfo=UTC)
    start, end = report_window(by, tz, now, start, end)
    window = [p for p in pulses if ns(start) <= p.ts_ns < min(ns(end), ns(now))]
    return build_report(slots_from_pulses(window), meter="main", by=by, tz=tz, start=start, end=end, now=now,
                        gap_s=gap_s, surroundings=surroundings or Surroundings())


def kwh(bucket, channel: str = "active") -> float:
    return bucket.energy_uwh[channel] / 1e9


# -- periods -------------------------------------------------------------------

def test_hours_days_and_months_sum_a_steady_load_and_the_total_adds_up() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    data = steady(start, 24 * 90, 500)  # 500 W for 90 days: Jan, Feb, Mar
    data += steady(start, 24 * 90, 100, channel="reactive")
    months = report_for(data, "month", start, datetime(2026, 4, 1, tzinfo=UTC))
    assert [b.label for b in months.buckets] == ["2026-01", "2026-02", "2026-03"]
    assert [kwh(b) for b in months.buckets] == [372.0, 336.0, 372.0]
    assert [kwh(b, "reactive") for b in months.buckets] == [74.4, 67.2, 74.4]
    assert [round(b.avg_w()) for b in months.buckets] == [500, 500, 500]
    assert kwh(months.total) == 1080.0 and months.total.avg_w() == pytest.approx(500)
    days = report_for(data, "day", datetime(2026, 2, 27, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC))
    assert [(b.label, kwh(b)) for b in days.buckets] == [("2026-02-27 Fri", 12.0), ("2026-02-28 Sat", 12.0),
                                                         ("2026-03-01 Sun", 12.0)]
    hours = report_for(data, "hour", datetime(2026, 3, 1, 22, tzinfo=UTC), datetime(2026, 3, 2, 1, tzinfo=UTC))
    assert [(b.label, kwh(b)) for b in hours.buckets] == [("2026-03-01 22:00", 0.5), ("2026-03-01 23:00", 0.5),
                                                          ("2026-03-02 00:00", 0.5)]
    assert all(b.no_data_s == 0 and not b.untimed for b in [*months.buckets, *days.buckets, *hours.buckets])


def test_local_days_follow_daylight_saving_time() -> None:
    data = steady(datetime(2026, 3, 27, tzinfo=UTC), 24 * 5, 1000)  # 1 kW around both changes
    data += steady(datetime(2026, 10, 24, tzinfo=UTC), 24 * 3, 1000, epoch="e2")
    spring = report_for(data, "day", datetime(2026, 3, 28), datetime(2026, 3, 31), tz=BERLIN)
    assert [(b.label, kwh(b), b.seconds / 3600) for b in spring.buckets] == [
        ("2026-03-28 Sat", 24.0, 24), ("2026-03-29 Sun", 23.0, 23), ("2026-03-30 Mon", 24.0, 24)]
    autumn = report_for(data, "day", datetime(2026, 10, 25), datetime(2026, 10, 26), tz=BERLIN)
    assert [(b.label, kwh(b)) for b in autumn.buckets] == [("2026-10-25 Sun", 25.0)]
    assert autumn.buckets[0].start.isoformat() == "2026-10-25T00:00:00+02:00"
    assert autumn.buckets[0].end.isoformat() == "2026-10-26T00:00:00+01:00"
    assert all(b.avg_w() == pytest.approx(1000) for b in [*spring.buckets, *autumn.buckets])


def test_local_hours_skip_the_missing_hour_and_name_the_repeated_one() -> None:
    data = steady(datetime(2026, 3, 28, tzinfo=UTC), 24 * 2, 1000)
    data += steady(datetime(2026, 10, 24, tzinfo=UTC), 24 * 3, 1000, epoch="e2")
    spring = report_for(data, "hour", datetime(2026, 3, 29), datetime(2026, 3, 30), tz=BERLIN)
    assert len(spring.buckets) == 23
    assert [b.label[-5:] for b in spring.buckets[:3]] == ["00:00", "01:00", "03:00"]
    autumn = report_for(data, "hour", datetime(2026, 10, 25), datetime(2026, 10, 26), tz=BERLIN)
    labels = [b.label for b in autumn.buckets]
    assert len(labels) == len(set(labels)) == 25
    assert labels[1:5] == ["2026-10-25 01:00", "2026-10-25 02:00 CEST", "2026-10-25 02:00 CET", "2026-10-25 03:00"]
    assert all(kwh(b) == 1.0 for b in autumn.buckets)
    assert kwh(autumn.total) == 25.0


def test_window_defaults_and_ends() -> None:
    now = datetime(2026, 11, 18, 14, 30, tzinfo=UTC)
    start, end = report_window("day", BERLIN, now)
    assert (start.isoformat(), end.isoformat()) == ("2026-11-12T00:00:00+01:00", "2026-11-19T00:00:00+01:00")
    start, end = report_window("hour", UTC, now)
    assert (start, end) == (datetime(2026, 11, 17, 15, tzinfo=UTC), datetime(2026, 11, 18, 15, tzinfo=UTC))
    start, end = report_window("month", UTC, now)
    assert (start, end) == (datetime(2025, 12, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    # --to is exclusive; one inside a period includes that period.
    assert report_window("day", UTC, now, parse_time("2026-11-16", UTC), parse_time("2026-11-18", UTC))[1] == \
        datetime(2026, 11, 18, tzinfo=UTC)
    assert report_window("month", UTC, now, parse_time("2026-01", UTC), parse_time("2026-02-10T08:00", UTC)) == \
        (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="not before its end"):
        report_window("day", UTC, now, parse_time("2026-11-18", UTC), parse_time("2026-11-18", UTC))
    with pytest.raises(ValueError, match="is not a time"):
        parse_time("yesterday", UTC)
    assert parse_time("2026-11-16 08:00", BERLIN).isoformat() == "2026-11-16T08:00:00+01:00"


def test_the_current_period_runs_until_now_and_later_ones_are_left_out() -> None:
    start = datetime(2026, 11, 16, tzinfo=UTC)
    now = start + timedelta(hours=12)
    report = report_for(steady(start, 12, 2000), "day", start, start + timedelta(days=3), now=now)
    [today] = report.buckets
    assert today.in_progress and today.seconds == 12 * 3600
    assert kwh(today) == 24.0 and today.avg_w() == pytest.approx(2000)
    assert "so far" in render_table(report)


# -- gaps ----------------------------------------------------------------------

def test_an_offline_edge_shows_as_no_data_in_each_period_it_touched() -> None:
    start = datetime(2026, 11, 16, tzinfo=UTC)
    data = offline(steady(start, 48, 600), start + timedelta(hours=22), start + timedelta(hours=26))
    report = report_for(data, "day", start, start + timedelta(days=2))
    # From the last pulse before to the first after (one a minute at 600 W).
    assert [round(b.no_data_s / 60) for b in report.buckets] == [120, 121]
    assert [kwh(b) for b in report.buckets] == [13.2, 13.2], "what was not measured is not filled in"
    assert round(report.total.no_data_s / 60) == 241
    # A short pause in the pulses is not a gap.
    quiet = offline(steady(start, 48, 600), start + timedelta(hours=3), start + timedelta(hours=3, minutes=25))
    assert report_for(quiet, "day", start, start + timedelta(days=2)).total.no_data_s == 0
    table = render_table(report)
    assert "2 h 01 min" in table and "4 h 01 min" in table and "no data: no pulse on any channel for 30 min" in table


def test_periods_without_any_pulse_are_listed_as_no_data() -> None:
    start = datetime(2026, 11, 16, tzinfo=UTC)
    data = steady(start, 24, 600) + steady(start + timedelta(days=2), 24, 600, first_seq=1441)
    report = report_for(data, "day", start, start + timedelta(days=3))
    assert [(kwh(b), round(b.no_data_s)) for b in report.buckets] == [(14.4, 0), (0.0, 86400), (14.4, 60)]
    line = next(line for line in render_table(report).splitlines() if line.startswith(report.buckets[1].label))
    assert line.endswith("0.000  1 d 00 h 00 min  no data")
    assert build_report([], meter="main", by="day", tz=UTC, start=start, end=start + timedelta(days=1),
                        now=start + timedelta(days=9)).total.no_data_s == 86400


def test_a_silence_is_measured_from_the_last_pulse_before_the_window() -> None:
    start = datetime(2026, 11, 16, tzinfo=UTC)
    data = steady(start + timedelta(minutes=20), 5, 600)  # starts 20 minutes into the window
    assert report_for(data, "hour", start, start + timedelta(hours=2)).total.no_data_s == 0
    offline = Surroundings(last_ts_before_ns=ns(start - timedelta(hours=1)))
    report = report_for(data, "hour", start, start + timedelta(hours=2), surroundings=offline)
    assert round(report.buckets[0].no_data_s / 60) == 21 and report.buckets[1].no_data_s == 0


# -- counter jumps ---------------------------------------------------------------

def test_pulses_known_only_from_the_counter_count_where_revealed_and_are_flagged() -> None:
    start = datetime(2026, 11, 16, tzinfo=UTC)
    data = steady(start, 6, 600)  # 60 pulses/hour of 10 Wh, seq 1..360
    lost = [p for p in data if not 100 <= p.seq <= 219]  # hours 2-3: 120 messages lost (seq jump 99 -> 220)
    lost = [p for p in lost if p.seq != 290]  # and one inside a slot of hour 4
    report = report_for(lost, "hour", start, start + timedelta(hours=6))
    assert [kwh(b) for b in report.buckets] == [0.6, 0.39, 0.0, 1.41, 0.6, 0.6]
    assert kwh(report.total) == 3.6, "the total is exact: every pulse the counter saw"
    assert [b.untimed_uwh["active"] / 1e9 for b in report.buckets] == [0, 0, 0, 1.2, 0.01, 0]
    assert report.buckets[3].untimed_since_ns == ns(start) + 99 * 60 * S - 1, "the last pulse before the jump"
    assert "incl. 1.200 kWh untimed, since Mon 16 Nov 01:38" in render_table(report)
    assert [round(b.no_data_s / 60) for b in report.buckets[1:4]] == [21, 60, 40]


def test_a_jump_from_before_the_window_counts_but_an_epochs_first_record_does_not_invent_pulses() -> None:
    start = datetime(2026, 11, 16, tzinfo=UTC)
    data = steady(start, 1, 600, first_seq=501, epoch="e2")
    window_end = start + timedelta(hours=1)
    fresh = report_for(data, "hour", start, window_end)
    assert kwh(fresh.total) == 0.6 and not fresh.total.untimed, "seq 501 without a stored 500: recorded late"
    known = Surroundings(predecessor=lambda channel, epoch, seq: (480, ns(start) - 60 * S) if seq == 501 else None)
    report = report_for(data, "hour", start, window_end, surroundings=known)
    assert kwh(report.total) == 0.8 and report.total.untimed_uwh["active"] == 20 * 10 * 10**6


def test_epochs_and_channels_are_separate_series() -> None:
    start = datetime(2026, 11, 16, tzinfo=UTC)
    data = steady(start, 1, 600, epoch="e1") + steady(start + timedelta(hours=1), 1, 600, epoch="e2")
    data += steady(start, 2, 60, channel="reactive", wh=1)
    report = report_for(data, "hour", start, start + timedelta(hours=2))
    assert [(kwh(b), kwh(b, "reactive")) for b in report.buckets] == [(0.6, 0.06), (0.6, 0.06)]
    assert not report.total.untimed


# -- output --------------------------------------------------------------------

def week(gap: bool = True) -> list[Pulse]:
    start = datetime(2026, 11, 16, tzinfo=UTC)
    data = steady(start, 24 * 7, 400) + steady(start, 24 * 7, 90, channel="reactive", wh=1)
    return offline(data, start + timedelta(days=2), start + timedelta(days=2, hours=5)) if gap else data


def test_table_has_a_row_per_period_a_total_and_reactive_energy() -> None:
    start = datetime(2026, 11, 16, tzinfo=UTC)
    table = render_table(report_for(week(), "day", start, start + timedelta(days=7)))
    lines = table.splitlines()
    assert lines[0] == "Energy per day of meter main, 2026-11-16 00:00 to 2026-11-23 00:00 (UTC)"
    assert lines[2].split() == ["period", "active", "kWh", "avg", "kW", "reactive", "kvarh", "no", "data", "note"]
    assert lines[4].split() == ["2026-11-16", "Mon", "9.600", "0.400", "2.160"]
    assert lines[5].split() == ["2026-11-17", "Tue", "9.600", "0.400", "2.160"]
    assert lines[6].split() == ["2026-11-18", "Wed", "7.600", "0.317", "1.710", "5", "h", "01", "min"]
    total = next(line for line in lines if line.startswith("total"))
    assert total.split() == ["total", "65.200", "0.388", "14.670", "5", "h", "01", "min"]


def test_csv_has_one_row_per_period_with_iso_times_and_plain_numbers() -> None:
    start = datetime(2026, 11, 16)
    report = report_for(week(), "day", start, start + timedelta(days=7), tz=BERLIN)
    rows = list(csv.DictReader(io.StringIO(render_csv(report))))
    assert len(rows) == 7
    assert rows[0]["start"] == "2026-11-16T00:00:00+01:00" and rows[0]["end"] == "2026-11-17T00:00:00+01:00"
    assert sum(float(r["active_kwh"]) for r in rows) == pytest.approx(kwh(report.total))
    assert {r["reactive_kvarh"] for r in rows} >= {"2.160"}
    # Berlin's Monday began an hour before the first pulse (UTC midnight).
    assert [float(r["no_data_min"]) for r in rows if float(r["no_data_min"])] == [60.7, 300.7]
    assert all(float(r["avg_kw"]) > 0 for r in rows)


@pytest.mark.parametrize("by", ["hour", "month"])
def test_plot_writes_a_png(tmp_path: Path, by: str) -> None:
    start = datetime(2026, 11, 16, tzinfo=UTC)
    data = week()
    data = [p for p in data if p.seq % 50 != 7 or p.channel != "active"]  # some untimed pulses too
    report = report_for(data, by, start, start + timedelta(days=7), tz=BERLIN)
    path = tmp_path / "chart.png"
    plot(report, path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 10_000


# -- the `emdc report` command (in-process: the same click command, without interpreter start-up) -----

def emdc(args: list[str], state_dir: Path, *, ok: bool = True):
    env = {k: None for k in os.environ if k.startswith("EMDC_")}  # only this test's settings
    result = CliRunner().invoke(main, args, env={**env, "EMDC_STATE_DIR": str(state_dir)}, catch_exceptions=False)
    assert (result.exit_code == 0) == ok, f"emdc {' '.join(args)} exited {result.exit_code}:\n{result.output}"
    return result


def test_emdc_report_prints_a_table_csv_and_a_chart_from_the_database(tmp_path: Path) -> None:
    store = PulseStore.open(f"sqlite:///{tmp_path / 'pulses.sqlite3'}")
    store.insert(week())
    store.insert(steady(datetime(2026, 11, 16, tzinfo=UTC), 24, 100, meter="garage"))
    store.close()
    week_args = ["report", "--by", "day", "--from", "2026-11-16", "--to", "2026-11-23", "--utc"]

    table = emdc(week_args, tmp_path).stdout.splitlines()
    assert next(line for line in table if line.startswith("total")).split() == \
        ["total", "65.200", "0.388", "14.670", "5", "h", "01", "min"]
    garage = emdc([*week_args, "--meter", "garage"], tmp_path).stdout.splitlines()
    assert garage[4].split() == ["2026-11-16", "Mon", "2.400", "0.100"]
    assert garage[5].split() == ["2026-11-17", "Tue", "0.000", "0.000", "1", "d", "00", "h", "00", "min", "no", "data"]
    rows = list(csv.DictReader(io.StringIO(emdc([*week_args, "--csv"], tmp_path).stdout)))
    assert [r["active_kwh"] for r in rows] == ["9.600", "9.600", "7.600", "9.600", "9.600", "9.600", "9.600"]
    chart = tmp_path / "week.png"
    result = emdc(["report", "--by", "hour", "--from", "2026-11-16", "--to", "2026-11-23", "--tz",
                   "Europe/Berlin", "--plot", str(chart)], tmp_path)
    assert chart.read_bytes()[:8] == PNG_SIGNATURE and chart.stat().st_size > 0
    assert "chart written to" in result.stderr and len(result.stdout.splitlines()) > 7 * 24


def test_emdc_report_explains_what_is_wrong(tmp_path: Path) -> None:
    def fails(*args: str) -> str:
        return emdc(["report", *args], tmp_path, ok=False).stderr

    assert "has emdc db-writer run?" in fails("--utc")
    assert not (tmp_path / "pulses.sqlite3").exists(), "a report must not create an empty database"
    assert "unknown time zone 'Mars/Olympus'" in fails("--tz", "Mars/Olympus")
    assert "is not a time like" in fails("--from", "last tuesday")
    assert "starts in the future" in fails("--from", "2999-01-01", "--to", "2999-02-01")
