"""Energy reports: stored pulses summed per hour, day or month, with the gaps shown.

Every kind of channel is summed in its own unit (kWh, kvarh, m³, L); the
table and the chart show active energy always and each other kind that has
pulses in the window.

The database hands over *slots*, the pulses of one channel and counter epoch
within a 15-minute UTC slot (count, energy, first and last ``seq`` and time),
so a year of pulses is a few ten thousand rows, not millions. Every local
hour, day and month boundary of every real time zone is a multiple of
15 minutes in UTC, so a slot always lies in one bucket.

What the report says, and why:

* Each stored pulse counts in the period of its timestamp.
* A jump in ``seq`` means pulses happened whose messages never arrived (the
  edge's outbox dropped their timing while the broker was out of reach). Their
  energy counts, like the writer counts it, in the period of the pulse that
  revealed them, and is shown as *untimed*, with the time since when they may
  have happened. The first stored pulse of an epoch has no predecessor to
  compare with: what happened before the database recorded it is not counted.
* A silence of ``gap_s`` or more with no pulse on any channel is shown as
  *no data*: the edge was offline (or, indistinguishably, nothing drew power).
  It is never filled in.
* The average power of a period is its energy over its length (up to now for
  the current period), so a period with no data shows a lower average; its
  *no data* column says by how much time.

Example::

    >>> from zoneinfo import ZoneInfo
    >>> tz = ZoneInfo("Europe/Berlin")
    >>> start, end = report_window("day", tz, datetime(2026, 11, 18, tzinfo=UTC),
    ...                            datetime(2026, 11, 16, tzinfo=tz), datetime(2026, 11, 18, tzinfo=tz))
    >>> report = build_report([], meter="main", by="day", tz=tz, start=start, end=end, now=end)
    >>> [(b.label, b.no_data_s) for b in report.buckets]
    [('2026-11-16 Mon', 86400.0), ('2026-11-17 Tue', 86400.0)]
"""

from __future__ import annotations

import bisect
import csv
import io
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta, tzinfo
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from backend.amounts import format_kw, format_kwh_rounded, format_total_rounded, micro_per_total, per_rate_unit
from backend.ledger import NS_PER_S, wh_to_uwh
from common.channels import CHANNELS, channel_spec
from common.message import Pulse

SLOT_NS = 15 * 60 * NS_PER_S
PERIODS = ("hour", "day", "month")
DEFAULT_GAP_S = 30 * 60
# Periods shown when --from is not given: the last day, week or year.
DEFAULT_SPAN = {"hour": 24, "day": 7, "month": 12}

Predecessor = Callable[[str, str, int], "tuple[int, int] | None"]


@dataclass(frozen=True, slots=True)
class Slot:
    """The stored pulses of one (channel, epoch) whose ``ts_ns`` falls in [start_ns, start_ns + SLOT_NS)."""

    channel: str
    epoch: str
    start_ns: int
    pulses: int
    uwh: int
    first_seq: int
    last_seq: int
    first_ts_ns: int
    last_ts_ns: int


def slots_from_pulses(pulses: Iterable[Pulse]) -> list[Slot]:
    """What :meth:`backend.database.PulseStore.slots` computes in SQL, for pulses in memory."""
    groups: dict[tuple[str, str, int], list[Pulse]] = defaultdict(list)
    for p in pulses:
        groups[(p.channel, p.epoch, p.ts_ns - p.ts_ns % SLOT_NS)].append(p)
    return [Slot(channel, epoch, start, len(ps), sum(wh_to_uwh(p.wh) for p in ps), min(p.seq for p in ps),
                 max(p.seq for p in ps), min(p.ts_ns for p in ps), max(p.ts_ns for p in ps))
            for (channel, epoch, start), ps in sorted(groups.items())]


@dataclass(frozen=True)
class Surroundings:
    """What the database knows just outside the report's window.

    ``predecessor(channel, epoch, seq)`` gives (seq, ts_ns) of the stored pulse
    of that series just below ``seq``, or None: it tells whether pulses are
    missing before the first one inside the window.
    """

    last_ts_before_ns: int | None = None
    first_ts_after_ns: int | None = None
    predecessor: Predecessor = field(default=lambda _channel, _epoch, _seq: None)


# -- periods -----------------------------------------------------------------

def local_zone() -> tzinfo:
    """The machine's time zone with its DST rules: ``$TZ``, else /etc/localtime, else UTC."""
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    localtime = Path("/etc/localtime")
    try:
        # A symlink into the zoneinfo tree names the zone (for the report's heading).
        target = str(localtime.resolve())
        if "/zoneinfo/" in target:
            return ZoneInfo(target.split("/zoneinfo/", 1)[1])
        with localtime.open("rb") as fh:
            return ZoneInfo.from_file(fh, key="localtime")
    except (OSError, ValueError, ZoneInfoNotFoundError):
        return UTC


def zone_name(tz: tzinfo) -> str:
    return getattr(tz, "key", None) or str(tz)


def period_start(moment: datetime, by: str, tz: tzinfo) -> datetime:
    """Start (aware, in ``tz``) of the hour, day or month that contains ``moment`` (naive: a time in ``tz``)."""
    local = moment.replace(tzinfo=tz) if moment.tzinfo is None else moment.astimezone(tz)
    if by == "hour":
        # replace() keeps ``fold``, so the repeated hour of a DST change stays itself.
        return local.replace(minute=0, second=0, microsecond=0)
    if by == "day":
        return datetime.combine(local.date(), time(0), tz)
    if by == "month":
        return datetime(local.year, local.month, 1, tzinfo=tz)
    raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {by!r}")


def shift_period(start: datetime, by: str, tz: tzinfo, n: int = 1) -> datetime:
    """The start of the period ``n`` periods after (or before, if negative) the one starting at ``start``."""
    if by == "hour":
        # In UTC: local wall-clock arithmetic would skip or repeat hours at DST changes.
        return period_start(start.astimezone(UTC) + timedelta(hours=n), by, tz)
    if by == "day":
        return datetime.combine(start.astimezone(tz).date() + timedelta(days=n), time(0), tz)
    months = start.year * 12 + start.month - 1 + n
    return datetime(months // 12, months % 12 + 1, 1, tzinfo=tz)


def report_window(by: str, tz: tzinfo, now: datetime, start: datetime | None = None,
                  end: datetime | None = None) -> tuple[datetime, datetime]:
    """Whole periods covering [start, end): the defaults are the last day, week or year up to now.

    ``end`` is exclusive; an ``end`` inside a period includes that period. Naive times are in ``tz``.
    """
    if end is not None and end.tzinfo is None:
        end = end.replace(tzinfo=tz)
    if end is None:
        end = shift_period(period_start(now, by, tz), by, tz)
    else:
        floor = period_start(end, by, tz)
        end = floor if floor == end else shift_period(floor, by, tz)
    start = shift_period(end, by, tz, -DEFAULT_SPAN[by]) if start is None else period_start(start, by, tz)
    if start >= end:
        raise ValueError(f"the report's start ({start:%Y-%m-%d %H:%M}) is not before its end "
                         f"({end:%Y-%m-%d %H:%M})")
    return start, end


def parse_time(text: str, tz: tzinfo) -> datetime:
    """``2026-11``, ``2026-11-16``, ``2026-11-16T08:00`` (or with a space, seconds, an offset) in ``tz``."""
    text = text.strip()
    try:
        moment = (datetime.strptime(text, "%Y-%m") if len(text) == 7 else datetime.fromisoformat(text))
    except ValueError:
        raise ValueError(f"{text!r} is not a time like 2026-11-16 or 2026-11-16T08:00") from None
    return moment.replace(tzinfo=tz) if moment.tzinfo is None else moment


class BadRequest(ValueError):
    """A report option is wrong; ``option`` names it (``--from``, ``--tz`` ...) for the usage error."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option


def request_zone(tz_name: str | None, utc: bool) -> tzinfo:
    """The zone of the periods: UTC, the named zone, or the machine's (:func:`local_zone`)."""
    if utc and tz_name:
        raise BadRequest("give --tz or --utc, not both", "--utc")
    try:
        return UTC if utc else ZoneInfo(tz_name) if tz_name else local_zone()
    except (ZoneInfoNotFoundError, ValueError):
        raise BadRequest(f"unknown time zone {tz_name!r}", "--tz") from None


def request_window(by: str, tz: tzinfo, now: datetime, from_text: str | None,
                   to_text: str | None) -> tuple[datetime, datetime]:
    """The whole periods a ``--from``/``--to`` request covers (:func:`report_window`); not starting after ``now``."""
    try:
        start = None if from_text is None else parse_time(from_text, tz)
        end = None if to_text is None else parse_time(to_text, tz)
        start, end = report_window(by, tz, now, start, end)
    except ValueError as exc:
        raise BadRequest(str(exc), "--from/--to") from None
    if start >= now:
        raise BadRequest("the report starts in the future", "--from")
    return start, end


def _label(start: datetime, by: str) -> str:
    if by == "month":
        return f"{start:%Y-%m}"
    if by == "day":
        return f"{start:%Y-%m-%d %a}"
    ambiguous = start.replace(fold=1 - start.fold).utcoffset() != start.utcoffset()
    # The hour repeated when DST ends appears twice: name the zone to tell them apart.
    return f"{start:%Y-%m-%d %H:%M}" + (f" {start:%Z}" if ambiguous else "")


def _ns(moment: datetime) -> int:
    """Exact UTC nanoseconds of an aware datetime (floats would round)."""
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * NS_PER_S + delta.microseconds * 1000


# -- aggregation -------------------------------------------------------------

@dataclass
class Bucket:
    """One period's totals; ``seconds`` is its length, up to now for the current one."""

    start: datetime
    end: datetime
    label: str
    seconds: float
    in_progress: bool = False
    energy_uwh: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0))
    untimed_uwh: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0))
    untimed_since_ns: int | None = None
    no_data_s: float = 0.0

    def avg_w(self, channel: str = "active") -> float | None:
        """Mean power over the period in pulse units per hour (W, var, m³/h, L/h); None for a period of no
        length."""
        if self.seconds <= 0:
            return None
        return self.energy_uwh[channel] / 1e6 * 3600 / self.seconds

    @property
    def untimed(self) -> bool:
        return any(self.untimed_uwh.values())

    def add(self, other: Bucket) -> None:
        for channel in CHANNELS:
            self.energy_uwh[channel] += other.energy_uwh[channel]
            self.untimed_uwh[channel] += other.untimed_uwh[channel]
        if other.untimed_since_ns is not None:
            self.untimed_since_ns = min(filter(None, (self.untimed_since_ns, other.untimed_since_ns)))
        self.no_data_s += other.no_data_s


@dataclass
class Report:
    meter: str
    by: str
    tz: tzinfo
    start: datetime
    end: datetime
    gap_s: float
    buckets: list[Bucket]
    total: Bucket
    # Spans (UTC ns, clipped to the window) with no pulse for gap_s or longer.
    no_data: list[tuple[int, int]]
    channels: set[str]


def build_report(slots: Iterable[Slot], *, meter: str, by: str, tz: tzinfo, start: datetime, end: datetime,
                 now: datetime, gap_s: float = DEFAULT_GAP_S,
                 surroundings: Surroundings = Surroundings()) -> Report:
    """Sum ``slots`` (ordered by channel, epoch, start; within [start, min(end, now))) into periods."""
    slots = list(slots)
    start_ns, end_ns = _ns(start), min(_ns(end), _ns(now))
    buckets: list[Bucket] = []
    bucket_start = start
    while _ns(bucket_start) < end_ns:
        bucket_end = shift_period(bucket_start, by, tz)
        covered = (min(_ns(bucket_end), end_ns) - _ns(bucket_start)) / NS_PER_S
        buckets.append(Bucket(bucket_start, bucket_end, _label(bucket_start, by), covered,
                              in_progress=_ns(bucket_end) > end_ns))
        bucket_start = bucket_end
    starts = [_ns(b.start) for b in buckets]

    def bucket_at(ts_ns: int) -> Bucket | None:
        i = bisect.bisect_right(starts, ts_ns) - 1
        return buckets[i] if i >= 0 and ts_ns < end_ns else None

    _count_energy(slots, bucket_at, surroundings)
    no_data = _silences(slots, start_ns, end_ns, round(gap_s * NS_PER_S), surroundings)
    for span_start, span_end in no_data:
        for i in range(max(0, bisect.bisect_right(starts, span_start) - 1), len(buckets)):
            b_start, b_end = starts[i], min(_ns(buckets[i].end), end_ns)
            if b_start >= span_end:
                break
            buckets[i].no_data_s += max(0, min(b_end, span_end) - max(b_start, span_start)) / NS_PER_S
    total = Bucket(start, buckets[-1].end if buckets else end, "total", sum(b.seconds for b in buckets))
    for bucket in buckets:
        total.add(bucket)
    return Report(meter, by, tz, start, end, gap_s, buckets, total, no_data, {s.channel for s in slots})


class PulseSource(Protocol):
    """What a report reads: :class:`backend.database.PulseStore`, or a fake in tests."""

    def slots(self, meter: str, start_ns: int, end_ns: int) -> Iterable[Slot]: ...

    def predecessor(self, meter: str, channel: str, epoch: str, seq: int) -> tuple[int, int] | None: ...

    def neighbour_ts(self, meter: str, start_ns: int, end_ns: int) -> tuple[int | None, int | None]: ...


def load_report(source: PulseSource, *, meter: str, by: str, tz: tzinfo, start: datetime, end: datetime,
                now: datetime, gap_s: float = DEFAULT_GAP_S) -> Report:
    """Read the window's slots and surroundings from ``source`` and build the report."""
    start_ns, end_ns = _ns(start), min(_ns(end), _ns(now))
    before, after = source.neighbour_ts(meter, start_ns, end_ns)
    surroundings = Surroundings(before, after, lambda channel, epoch, seq: source.predecessor(meter, channel,
                                                                                              epoch, seq))
    return build_report(source.slots(meter, start_ns, end_ns), meter=meter, by=by, tz=tz, start=start, end=end,
                        now=now, gap_s=gap_s, surroundings=surroundings)


def _count_energy(slots: Sequence[Slot], bucket_at: Callable[[int], Bucket | None],
                  surroundings: Surroundings) -> None:
    previous: Slot | None = None
    for slot in slots:
        bucket = bucket_at(slot.first_ts_ns)
        same_series = previous is not None and (previous.channel, previous.epoch) == (slot.channel, slot.epoch)
        before = ((previous.last_seq, previous.last_ts_ns) if same_series and previous
                  else surroundings.predecessor(slot.channel, slot.epoch, slot.first_seq))
        previous = slot
        if bucket is None:
            continue
        bucket.energy_uwh[slot.channel] += slot.uwh
        # Pulses the counter says happened but no message shows (max(): never trust a negative count).
        inside = max(0, slot.last_seq - slot.first_seq + 1 - slot.pulses)
        between = 0 if before is None else max(0, slot.first_seq - before[0] - 1)
        untimed = inside + between
        if untimed:
            uwh = untimed * round(slot.uwh / slot.pulses)
            bucket.energy_uwh[slot.channel] += uwh
            bucket.untimed_uwh[slot.channel] += uwh
            since = before[1] if between and before else slot.first_ts_ns
            bucket.untimed_since_ns = min(filter(None, (bucket.untimed_since_ns, since)))


def _silences(slots: Sequence[Slot], start_ns: int, end_ns: int, gap_ns: int,
              surroundings: Surroundings) -> list[tuple[int, int]]:
    """Spans of ``gap_ns`` or more without a pulse on any channel, clipped to [start_ns, end_ns)."""
    spans = []
    # Silences are measured from the last pulse before the window, so one that
    # began earlier counts in full; without one, the window's start is the reference.
    cursor = surroundings.last_ts_before_ns if surroundings.last_ts_before_ns is not None else start_ns
    tail = surroundings.first_ts_after_ns if surroundings.first_ts_after_ns is not None else end_ns
    for first, last in [*sorted((s.first_ts_ns, s.last_ts_ns) for s in slots), (tail, tail)]:
        if first - cursor >= gap_ns:
            clipped = (max(cursor, start_ns), min(first, end_ns))
            if clipped[0] < clipped[1]:
                spans.append(clipped)
        cursor = max(cursor, last)
    return spans


# -- rendering ---------------------------------------------------------------

def format_duration(seconds: float) -> str:
    """``45 min``, ``4 h 05 min``, ``3 d 04 h 05 min``, or empty for less than half a minute."""
    minutes = round(seconds / 60)
    if minutes <= 0:
        return ""
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours:02d} h {minutes:02d} min"
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


def _kw(watts: float | None) -> str:
    return "" if watts is None else format_kw(watts)


def report_kinds(report: Report) -> list[str]:
    """The channels a report shows: active always, the others where the window holds pulses of them."""
    return [c for c in CHANNELS if c == "active" or c in report.channels]


def _total(channel: str, uwh: int) -> str:
    return format_total_rounded(channel, uwh, channel_spec(channel).total_decimals)


def _note(bucket: Bucket, tz: tzinfo) -> str:
    notes = []
    if bucket.seconds > 0 and bucket.no_data_s >= bucket.seconds - 0.5:
        notes.append("no data")
    if bucket.untimed and bucket.untimed_since_ns is not None:
        amounts = " + ".join(f"{_total(c, uwh)} {channel_spec(c).total_unit}"
                             for c, uwh in bucket.untimed_uwh.items() if uwh)
        since = datetime.fromtimestamp(bucket.untimed_since_ns // NS_PER_S, tz)
        notes.append(f"incl. {amounts} untimed, since {since:%a %d %b %H:%M}")
    if bucket.in_progress:
        notes.append("so far")
    return "; ".join(notes)


def render_table(report: Report) -> str:
    """A plain-text table with a total row, then a legend for what the flags mean.

    Active energy and its average power come first, then the total of every
    other kind of channel with pulses in the window, each in its own unit.
    """
    others = report_kinds(report)[1:]
    header = ["period", "active kWh", "avg kW", *(f"{c} {channel_spec(c).total_unit}" for c in others), "no data",
              "note"]
    rows = []
    for bucket in [*report.buckets, report.total]:
        row = [bucket.label, _total("active", bucket.energy_uwh["active"]), _kw(bucket.avg_w()),
               *(_total(c, bucket.energy_uwh[c]) for c in others)]
        rows.append([*row, format_duration(bucket.no_data_s), "" if bucket is report.total else
                     _note(bucket, report.tz)])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    right = set(range(1, len(header) - 1))  # numbers and durations align right

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                         enumerate(zip(cells, widths, strict=True))).rstrip()

    title = (f"Energy per {report.by} of meter {report.meter}, {report.start:%Y-%m-%d %H:%M} to "
             f"{report.end:%Y-%m-%d %H:%M} ({zone_name(report.tz)})")
    rule = "-" * len(line(header))
    out = [title, "", line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1])]
    legend = []
    if report.total.no_data_s:
        legend.append(f"no data: no pulse on any channel for {format_duration(report.gap_s)} or more "
                      "(edge offline, or no load at all); not filled in.")
    if report.total.untimed:
        legend.append("untimed: pulses the edge counted but whose messages were lost; counted when reported, "
                      "they happened after the time shown.")
    return "\n".join([*out, *(["", *legend] if legend else [])]) + "\n"


CSV_COLUMNS = ("start", "end", "active_kwh", "avg_kw", "reactive_kvarh", "no_data_min", "untimed_kwh",
               "untimed_kvarh", "note")
# Columns of the other kinds, before ``note``, in reports that hold pulses of them.
CSV_KIND_COLUMNS = {"export": ("export_kwh", "untimed_export_kwh"), "gas": ("gas_m3", "untimed_gas_m3"),
                    "water": ("water_l", "untimed_water_l")}


def render_csv(report: Report) -> str:
    """One row per period, ISO 8601 times with their UTC offset, numbers without units (no total row).

    Export, gas and water get their columns (total and untimed, in kWh, m³
    and L) only in reports that hold pulses of them.
    """
    kinds = [c for c in CSV_KIND_COLUMNS if c in report.channels]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS[:-1], *(column for c in kinds for column in CSV_KIND_COLUMNS[c]), "note"])
    for b in report.buckets:
        kwh = format_kwh_rounded
        writer.writerow([b.start.isoformat(), b.end.isoformat(), kwh(b.energy_uwh["active"]), _kw(b.avg_w()),
                         kwh(b.energy_uwh["reactive"]), f"{b.no_data_s / 60:.1f}",
                         kwh(b.untimed_uwh["active"]), kwh(b.untimed_uwh["reactive"]),
                         *(_total(c, amount[c]) for c in kinds for amount in (b.energy_uwh, b.untimed_uwh)),
                         _note(b, report.tz)])
    return out.getvalue()


def plot(report: Report, path: str | os.PathLike[str]) -> None:
    """Draw one chart per kind of channel the report shows (:func:`report_kinds`), one above the other: its total
    per period as bars, its average rate as a line, no-data spans shaded; write a PNG."""
    # The object API with the Agg canvas: no pyplot, no display, no global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = report_kinds(report)
    fig = Figure(figsize=(10, 4.6 * len(kinds)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, channel in enumerate(kinds):
        _plot_kind(fig.add_subplot(len(kinds), 1, i + 1), report, channel)
    fig.savefig(path, format="png")


def _plot_kind(ax: Any, report: Report, channel: str) -> None:
    """One kind's chart on ``ax`` (Any: matplotlib takes datetimes through its units registry, which its type hints
    do not model)."""
    from matplotlib.artist import Artist
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, DateFormatter, DayLocator, HourLocator
    from matplotlib.patches import Patch

    spec = channel_spec(channel)
    buckets = report.buckets
    lefts = [b.start.astimezone(UTC).replace(tzinfo=None) for b in buckets]
    widths = [(b.end - b.start).total_seconds() / 86_400 * 0.85 for b in buckets]
    per_total = micro_per_total(channel)
    amounts = [b.energy_uwh[channel] / per_total for b in buckets]
    untimed = [b.untimed_uwh[channel] / per_total for b in buckets]
    timed = [k - u for k, u in zip(amounts, untimed, strict=True)]
    ax.bar(lefts, timed, width=widths, align="edge", color="#2f6db3", zorder=2)
    # Quantities known only from the counter sit on top, in their own colour.
    ax.bar(lefts, untimed, bottom=timed, width=widths, align="edge", color="#e08a1e", zorder=2)
    for span_start, span_end in report.no_data:
        # Over day and month bars, translucent, to show where in the period data is missing;
        # behind hour bars, which a span mostly replaces anyway.
        ax.axvspan(datetime.fromtimestamp(span_start / NS_PER_S, UTC).replace(tzinfo=None),
                   datetime.fromtimestamp(span_end / NS_PER_S, UTC).replace(tzinfo=None),
                   facecolor=(0.85, 0.85, 0.85, 0.7), edgecolor="#8a8a8a", hatch="//", linewidth=0,
                   zorder=1 if report.by == "hour" else 2.5)
    ax.set_ylabel(f"{spec.total_unit} per {report.by}")
    ax.grid(axis="y", color="#e6e6e6", zorder=0)
    if report.by != "month" and report.end - report.start <= timedelta(days=16):
        # Weekday names centred under each day, thin lines between days.
        ax.xaxis.set_major_locator(HourLocator(byhour=12, tz=report.tz))
        ax.xaxis.set_major_formatter(DateFormatter("%a %d", tz=report.tz))
        ax.xaxis.set_minor_locator(DayLocator(tz=report.tz))
        ax.tick_params(axis="x", which="major", length=0)
        ax.grid(axis="x", which="minor", color="#c8c8c8", linewidth=0.8, zorder=0)
    else:
        locator = AutoDateLocator(tz=report.tz)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator, tz=report.tz))
    ax.set_xlim(report.start.astimezone(UTC).replace(tzinfo=None),
                report.buckets[-1].end.astimezone(UTC).replace(tzinfo=None) if buckets else None)

    # The average rate on its own axis, scaled so that for a full-length period the
    # line meets the top of its bar: the two axes then read the same data.
    rate = ax.twinx()
    nominal_h = {"hour": 1, "day": 24, "month": 730.5}[report.by]
    unit = per_rate_unit(channel)
    rate.hlines([(b.avg_w(channel) or 0) / unit for b in buckets], lefts,
                [b.end.astimezone(UTC).replace(tzinfo=None) for b in buckets], color="#1b2a41", linewidth=1.5)
    mean = (report.total.avg_w(channel) or 0) / unit
    rate.axhline(mean, color="#c0392b", linestyle="--", linewidth=1.4)
    top = max(amounts, default=0) * 1.08 or 1.0
    ax.set_ylim(0, top)
    rate.set_ylim(0, top * spec.total_divisor / nominal_h / unit)
    rate.set_ylabel(f"average {spec.rate_unit}")

    total = report.total
    decimals = spec.rate_decimals
    subtitle = (f"total {_total(channel, total.energy_uwh[channel])} {spec.total_unit}, average "
                f"{mean:.{decimals}f} {spec.rate_unit}")
    if total.no_data_s:
        subtitle += f", no data for {format_duration(total.no_data_s)}"
    ax.set_title(f"{spec.label} per {report.by}, meter {report.meter}, {report.start:%d %b} – "
                 f"{report.end:%d %b %Y} ({zone_name(report.tz)})\n{subtitle}", fontsize=11)
    handles: list[Artist] = [Patch(color="#2f6db3", label=f"{spec.label.lower()} {spec.total_unit}"),
                             Patch(facecolor="#d9d9d9", edgecolor="#8a8a8a", hatch="//", label="no data")]
    if total.untimed_uwh[channel]:
        handles.insert(1, Patch(color="#e08a1e", label="untimed (counter only)"))
    handles.append(rate.plot([], [], color="#1b2a41", label=f"average {spec.rate_unit}")[0])
    handles.append(rate.plot([], [], color="#c0392b", linestyle="--",
                             label=f"mean {mean:.{decimals}f} {spec.rate_unit}")[0])
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=9, ncols=len(handles),
              frameon=False)
