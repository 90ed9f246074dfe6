"""A simulated meter that drives gpiozero mock pins, for ``emdc edge simulate``.

The simulation exercises the real edge code path: :class:`VirtualClockFactory`
is gpiozero's ``MockFactory`` with a virtual clock, so pin events carry
synthetic but realistic ticks however fast the simulation runs, and the same
:class:`~edge.reader.PulseInput`, filter, outbox and publisher handle them.

Load comes from a :class:`LoadProfile`: constant, a household hour (with
solar export, a gas boiler and water use), or a CSV file with rows
``seconds,active_w[,reactive_var[,export_w[,gas_m3_per_h[,water_l_per_min]]]]``
(a step function). Each configured input is driven as its type looks: an S0
output's 30 ms pulses, an LED's short flashes, a reed contact's long closures.

Example::

    factory = VirtualClockFactory()
    meter = SimulatedMeter(factory, [Input.of(pin=17, channel="active", type="s0")], LoadProfile.constant(3000))
    meter.run(count=300)
"""

from __future__ import annotations

import collections
import csv
import heapq
import itertools
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpiozero.pins.mock import MockFactory, MockPin, PinState

from common.channels import channel_spec
from common.config import Config
from common.inputs import INPUT_TYPES, Input
from edge.outbox import FILENAME, last_recorded_ns
from edge.service import EdgeService
from edge.tick_clock import TickClock

log = logging.getLogger("emdc.simulate")
STATES_KEPT = 64
# How much longer than its speed asks a repeated run may take by going on in real time before it is refused.
REAL_TIME_LIMIT_S = 60.0
MAX_PROFILE_VALUE = 10_000_000.0  # seconds (about 4 months), W/var (10 MW), m³/h or L/min
# Channel -> (its column in a profile step, the seconds of the column's time unit): W and var are Wh and varh per
# hour, gas flows in m³ per hour, water in litres per minute.
CHANNEL_COLUMNS = {"active": (1, 3600.0), "reactive": (2, 3600.0), "export": (3, 3600.0), "gas": (4, 3600.0),
                   "water": (5, 60.0)}
PROFILE_HEADER = "seconds,active_w[,reactive_var[,export_w[,gas_m3_per_h[,water_l_per_min]]]]"
Step = tuple[float, ...]


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


class VirtualClockPin(MockPin):
    """A mock pin whose edges are stamped with the factory's virtual clock."""

    # MockPin's own attributes, which this class sets (gpiozero has no type information).
    states: collections.deque[Any]
    _state: bool
    _last_change: float
    _factory: VirtualClockFactory

    def clear_states(self) -> None:
        # MockPin keeps every change in ``states``; a long simulation keeps only the latest few.
        super().clear_states()
        self.states = collections.deque(self.states, maxlen=STATES_KEPT)

    def _change_state(self, value: bool) -> bool:
        # MockPin stamps edges with time.monotonic(); we need the simulated time.
        if self._state == value:
            return False
        now = self._factory.ticks()
        self._state = value
        self.states.append(PinState(now - self._last_change, value))
        self._last_change = now
        return True


class VirtualClockFactory(MockFactory):
    """gpiozero's MockFactory with a clock the simulation advances (seconds)."""

    def __init__(self) -> None:
        super().__init__(pin_class=VirtualClockPin)
        self.now = 0.0

    def ticks(self) -> float:
        return self.now


@dataclass(frozen=True)
class LoadProfile:
    """Piecewise-constant load: ``steps`` of (start_s, active_w, reactive_var, export_w, gas_m3_per_h,
    water_l_per_min), sorted by start. Columns left out of a step are 0.

    >>> LoadProfile(((0.0, 100.0),)).steps
    ((0.0, 100.0, 0.0, 0.0, 0.0, 0.0),)
    """

    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        width = 1 + len(CHANNEL_COLUMNS)
        object.__setattr__(self, "steps", tuple((*map(float, step), *(0.0,) * (width - len(step)))
                                                for step in self.steps))

    @classmethod
    def constant(cls, active_w: float, reactive_var: float = 0.0) -> LoadProfile:
        return cls(((0.0, active_w, reactive_var),))

    @classmethod
    def household(cls, duration_s: float = 3600.0, seed: int = 1, solar_w: float = 1500.0) -> LoadProfile:
        """A sunny hour: base load, a fridge cycling, appliances switching on and off, ``solar_w`` of solar
        panels (what the house does not use is exported; the meter counts import and export apart), a gas
        boiler heating water, and the water of a shower and the taps."""
        rng = random.Random(seed)
        events: list[tuple[float, float, float, float, float]] = []  # (time, delta W, var, m³/h, L/min)

        def run(start: float, length: float, watts: float, var: float, gas: float = 0.0, water: float = 0.0) -> None:
            events.extend([(start, watts, var, gas, water), (start + length, -watts, -var, -gas, -water)])

        for start in range(0, int(duration_s), 1800):  # fridge: 12 min of every 30
            run(start + rng.uniform(0, 300), 720, 120, 90)
        run(rng.uniform(300, 900), 180, 2000, 0)  # kettle
        run(rng.uniform(1200, 1500), 1500, 2400, 150)  # oven
        run(rng.uniform(600, 1200), 2400, 500, 250)  # washing machine
        for _ in range(6):  # lights and TV
            run(rng.uniform(0, duration_s), rng.uniform(300, 1500), rng.uniform(40, 150), 10)
        shower = rng.uniform(0, max(1.0, duration_s - 600))
        run(shower, 420, 0, 0, water=9.0)  # a shower, its water heated by the boiler
        run(shower + 10, 400, 60, 0, gas=2.2)
        for _ in range(4):  # taps
            run(rng.uniform(0, duration_s), rng.uniform(20, 60), 0, 0, water=6.0)
        load, reactive, gas, water = 180.0, 60.0, 0.0, 0.0
        steps: list[Step] = [(0.0, 0.0, 60.0, solar_w - 180.0, 0.0, 0.0)] if solar_w > 180 else \
            [(0.0, 180.0 - solar_w, 60.0, 0.0, 0.0, 0.0)]
        for t, dw, dvar, dgas, dwater in sorted(e for e in events if e[0] < duration_s):
            load, reactive, gas, water = load + dw, reactive + dvar, gas + dgas, water + dwater
            steps.append((t, round(max(0.0, load - solar_w), 3), round(reactive, 3),
                          round(max(0.0, solar_w - load), 3), round(gas, 3), round(water, 3)))
        return cls(tuple(steps))

    @classmethod
    def from_csv(cls, path: Path) -> LoadProfile:
        """Rows as :data:`PROFILE_HEADER` says; a header row and ``#`` comments are skipped."""
        steps: list[Step] = []
        header_allowed = True
        with path.open(newline="") as fh:
            for lineno, row in enumerate(csv.reader(fh), 1):
                if not row or row[0].lstrip().startswith("#"):
                    continue
                if header_allowed and not any(_is_number(cell) for cell in row):
                    header_allowed = False
                    continue
                header_allowed = False
                if not 2 <= len(row) <= 1 + len(CHANNEL_COLUMNS) or not all(_is_number(cell) for cell in row):
                    raise ValueError(f"{path}:{lineno}: expected {PROFILE_HEADER}, got {row}")
                values = tuple(float(cell) for cell in row)
                if not all(0 <= v <= MAX_PROFILE_VALUE for v in values):
                    raise ValueError(f"{path}:{lineno}: values must be from 0 to {MAX_PROFILE_VALUE:g}, got {row}")
                steps.append(values)
        if not steps:
            raise ValueError(f"{path}: no rows")
        return cls(tuple(sorted(steps)))

    def with_constant(self, channel: str, rate: float) -> LoadProfile:
        """The profile with ``channel``'s column set to ``rate`` throughout (in the column's unit)."""
        column = CHANNEL_COLUMNS[channel][0]
        return LoadProfile(tuple((*step[:column], rate, *step[column + 1:]) for step in self.steps))

    def channels(self) -> tuple[str, ...]:
        """The channels the profile makes pulses on at some time (the simulation needs an input for each)."""
        return tuple(channel for channel, (column, _) in CHANNEL_COLUMNS.items()
                     if any(step[column] > 0 for step in self.steps))

    def pulse_times(self, channel: str, wh: float) -> Iterator[float]:
        """Times (s) at which a meter emitting one pulse per ``wh`` (in the channel's pulse unit) completes each."""
        column, unit_s = CHANNEL_COLUMNS[channel]
        ends = [s[0] for s in self.steps[1:]] + [float("inf")]
        stored = 0.0  # quantity accumulated since the last pulse
        for step, end in zip(self.steps, ends, strict=True):
            t, power = step[0], step[column]
            if power <= 0:
                continue
            while True:
                due = t + (wh - stored) * unit_s / power
                if due > end:
                    stored += power * (end - t) / unit_s
                    break
                yield due
                stored, t = 0.0, due


def _edges(times: Iterator[float], channel: str, width_s: float) -> Iterator[tuple[float, str, bool]]:
    previous = 0.0
    for t in times:
        width = min(width_s, (t - previous) / 2)
        yield t - width, channel, True
        yield t, channel, False
        previous = t


class SimulatedMeter:
    """Drives the pins of a :class:`VirtualClockFactory` with the pulses of a load profile, one per input.

    Each input's pulses are its quantity per pulse of its channel's column,
    as wide as its type's usual pulse, at the level its pull-up makes active.
    ``count`` counts the pulses of the *lead* channel: active, or the first
    input's if there is no active one. ``speed`` is the time compression
    (``None``: as fast as ``throttle`` lets it).
    """

    def __init__(self, factory: VirtualClockFactory, inputs: Sequence[Input], profile: LoadProfile,
                 speed: float | None = None) -> None:
        self.factory = factory
        self.inputs = {one.channel: one for one in inputs}
        self.pins = {one.channel: factory.pin(one.pin) for one in inputs}
        self.profile = profile
        self.lead = "active" if "active" in self.inputs else inputs[0].channel
        self.speed = speed
        self.active_pulses = 0

    def duration_for(self, count: int | None, duration_s: float | None) -> float:
        """Simulated seconds the run will cover (the time of the last lead pulse for ``count``)."""
        if count is None:
            return duration_s or 0.0
        times = itertools.islice(self.profile.pulse_times(self.lead, self.inputs[self.lead].per_pulse), count)
        last = 0.0
        for last in times:  # noqa: B007
            pass
        return min(last, duration_s) if duration_s else last

    def run(self, *, count: int | None = None, duration_s: float | None = None,
            stop: threading.Event | None = None, throttle: Callable[[], None] = lambda: None,
            progress: Callable[[float, int], None] = lambda t, n: None, started: float | None = None,
            stamp_ns: Callable[[float], int] | None = None) -> int:
        """Simulate until ``count`` lead pulses or ``duration_s``; return the lead pulses made.

        ``started`` is the ``time.monotonic()`` at which simulated time 0 is due (default: now).
        ``stamp_ns`` is the wall-clock time an edge at simulated time ``t`` is stamped with: it is
        driven no earlier than that, whatever the speed, so that no pulse is stamped after the moment
        it is made.
        """
        streams = [_edges(self.profile.pulse_times(one.channel, one.per_pulse), one.channel,
                          INPUT_TYPES[one.type].nominal_pulse_ms / 1000) for one in self.inputs.values()]
        started = time.monotonic() if started is None else started
        for t, channel, active in heapq.merge(*streams):
            if (duration_s is not None and t > duration_s) or (stop is not None and stop.is_set()):
                break
            delay = 0.0 if self.speed is None else started + t / self.speed - time.monotonic()
            if stamp_ns is not None:
                delay = max(delay, (stamp_ns(t) - time.time_ns()) / 1e9)
            if delay > 0:
                if stop is None:
                    time.sleep(delay)
                elif stop.wait(delay):
                    break
            self.factory.now = t
            level = active != self.inputs[channel].pull_up
            pin = self.pins[channel]
            pin.drive_high() if level else pin.drive_low()
            if not active and channel == self.lead:
                self.active_pulses += 1
                if self.active_pulses % 100 == 0:
                    throttle()
                    progress(t, self.active_pulses)
                if count is not None and self.active_pulses >= count:
                    break
        return self.active_pulses


class SimulationRefused(RuntimeError):
    """A run cannot be stamped truthfully without going on in real time for long; the text names the fix."""


@dataclass(frozen=True)
class SimulationPlan:
    """What to simulate: a load and when to stop (``count`` active pulses and/or ``duration_s``)."""

    profile: LoadProfile
    count: int | None = None
    duration_s: float | None = None
    speed: float | None = None  # None: as fast as the publisher confirms


@dataclass(frozen=True)
class SimulationResult:
    """The edge's counters once the run is confirmed, and the pulses the run itself sent per channel."""

    epoch: str
    counters: dict[str, int]
    sent: dict[str, int]

    def sent_lines(self, inputs: Sequence[Input]) -> list[str]:
        """One line per input: the pulses sent and what they amount to in the channel's total unit.

        >>> SimulationResult("e", {"gas": 9}, {"gas": 4}).sent_lines([Input.of(pin=22, channel="gas", type="reed")])
        ['sent gas: 4 pulses = 0.04 m³']
        """
        lines = []
        for one in inputs:
            spec, pulses = channel_spec(one.channel), self.sent.get(one.channel, 0)
            lines.append(f"sent {one.channel}: {pulses} pulses = "
                         f"{round(pulses * one.per_pulse / spec.total_divisor, 6):g} {spec.total_unit}")
        return lines


class EdgeSimulation:
    """The real edge service on simulated pins; :meth:`now_ns` is the simulation's current time."""

    def __init__(self, config: Config, plan: SimulationPlan, *, publisher_factory: Any = None) -> None:
        self.config = config
        self.plan = plan
        self.factory = VirtualClockFactory()
        self.meter = SimulatedMeter(self.factory, config.inputs(), plan.profile, plan.speed)
        # Timestamps: let the simulated run end about now, as if it had happened in real time, but never
        # overlap a previous run on the same store (that would stamp pulses before ones already counted),
        # and never stamp a pulse after the moment it is made (the writer does not trust such times). A
        # run without room before now therefore goes on from the store's last pulse in real time.
        # A run that would go on in real time for long is refused instead: no one waits an hour unasked.
        speedup = 1 - 1 / plan.speed if plan.speed else 1
        duration_s = self.meter.duration_for(plan.count, plan.duration_s)
        now_ns = time.time_ns()
        last_ns = last_recorded_ns(Path(config.state_dir) / FILENAME)
        fits_ns = now_ns - round(duration_s * speedup * 1e9)  # the start that ends the run about now
        start_ns = max(fits_ns, last_ns + 10**9)
        if start_ns > fits_ns:
            longer_s = (start_ns - fits_ns) / 1e9  # than the run takes at its speed
            last = time.strftime("%H:%M:%S", time.localtime(last_ns / 1e9))
            if longer_s > REAL_TIME_LIMIT_S:
                free = time.strftime("%H:%M:%S", time.localtime((last_ns + 10**9) / 1e9 + duration_s * speedup))
                raise SimulationRefused(
                    f"state_dir {config.state_dir} holds pulses up to {last}: this run of {duration_s:.0f} simulated "
                    f"s has no room before now, and going on from there in real time would take {longer_s:.0f} s "
                    f"longer; give it another --state-dir, remove {config.state_dir}, or run it after {free}")
            log.info("the state in %s holds pulses up to %s, so this run has no room before now: it goes on from "
                     "there in real time (about %.0f s); for a fast run give it another state dir",
                     config.state_dir, last, (start_ns - now_ns) / 1e9 + duration_s)
        shift_ns = start_ns - time.time_ns()
        self.clock = TickClock(self.factory.ticks, wall_ns=lambda: time.time_ns() + shift_ns, follow_wall_clock=False)
        # Simulated time 0 is this instant: pulses are driven relative to it, not to when run()
        # starts after the service has opened (importing pika alone takes ~0.1 s), so that at
        # --speed 1 a pulse's ts_ns is the moment it is really driven.
        self._time_zero = time.monotonic()
        # A virtual clock is neither synchronised nor not: the messages claim nothing.
        self.service = EdgeService(config, pin_factory=self.factory, publisher_factory=publisher_factory,
                                   clock=self.clock, clock_synced=lambda: None)

    def now_ns(self) -> int:
        return self.clock.to_utc_ns(self.factory.now)

    def run(self, stop: threading.Event | None = None,
            progress: Callable[[float, int], None] = lambda t, n: None) -> SimulationResult:
        """Simulate the plan; return the edge's counters once every pulse is confirmed."""
        backlog_limit = 4 * self.config.publish_window
        depth = self.service.outbox.reader()

        edges = self.service.recorder.edges

        def throttle() -> None:
            # Bound both backlogs: edges not yet recorded (memory) and pulses not yet confirmed (outbox).
            while (edges.qsize() > backlog_limit or depth.depth() > backlog_limit) and not (stop and stop.is_set()):
                time.sleep(0.01)

        before = self.service.outbox.counters()
        self.service.start()
        try:
            self.meter.run(count=self.plan.count, duration_s=self.plan.duration_s, stop=stop, throttle=throttle,
                           progress=progress, started=self._time_zero, stamp_ns=self.clock.to_utc_ns)
            self.service.recorder.stop()
            self.service.wait_drained(stop)
            counters = self.service.outbox.counters()
            sent = {channel: seq - before.get(channel, 0) for channel, seq in counters.items()}
            return SimulationResult(self.service.outbox.epoch, counters, sent)
        finally:
            depth.close()
            self.service.stop()
