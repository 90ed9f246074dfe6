"""Power truth: how close the published power stays to the real load, above all right after it drops.

A seeded household load generator (base load, fridge and freezer cycles, appliances of realistic
power and duration at realistic times of day, several days) makes the true load, one change point
at a time; the meter turns it into pulse timestamps. Those pulses are replayed through the real
writer (:class:`~backend.writer.EnergyWriter` with default settings, a memory sink and an injected
clock): ``handle_batch`` for each pulse as it arrives, ``refresh_power`` at the cadence of the
service's idle handler. What is scored is what it published, as published (rounded at the display
precision), against

* ESPHome ``pulse_meter``'s rule: on each pulse the power of the interval since the previous one,
  held until the next pulse; 0 once no pulse came for its timeout (5 min); the first pulse after a
  timeout only restarts the measurement;
* Home Assistant's derivative helper at its defaults (no time window, unit time h, 2 decimals) on
  a utility-meter kWh sensor fed with the energy the writer published (no reset cycle): on each
  change of the source, the change over the time since the previous one, held until the next.

Every figure is a mean absolute error in W, over the whole run after a warm-up and over the 5
minutes after each drop (the true load falling by at least :data:`DROP_W` at once). The seed
:data:`TUNING_SEED` is the only one anything was ever looked at or tuned on; the headline figures
come from the others. Message counts are per channel: the power topic per second, and all topics.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from backend.amounts import format_kw
from backend.batch import Delivery
from backend.ledger import NS_PER_S, Changed, Ledger
from backend.service import idle_handler
from backend.state_store import StateStore
from backend.topics import state_topic
from backend.writer import EnergyWriter
from common.config import load_config
from common.message import Pulse, encode

TUNING_SEED = 1
HELD_OUT_SEEDS = (2, 3, 4)
DROP_W = 100.0  # a fridge compressor or anything larger switching off
AFTER_DROP_S = 300.0
WARMUP_S = 3600.0
LATENCY_NS = 20_000_000  # pulse -> writer, as in the live-latency figures
POLL_S = 0.5  # BatchConsumer: the longest wait for messages before it looks at the clock
IDLE_INTERVAL_S = 1.0  # BatchConsumer's default: its idle pass (heartbeat, on_idle) at most this often
ESPHOME_TIMEOUT_S = 300.0  # pulse_meter's default timeout
HA_DECIMALS = 2  # the derivative helper's default precision
DAY_S = 86_400.0
ORIGIN_NS = 1_800_000_000 * NS_PER_S  # the replay's time 0 on the writer's clock (January 2027)

Steps = tuple[list[float], list[float]]  # a step function: change times (s, ascending) and the value from each


# -- the household -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Appliance:
    """One appliance: its program (phases of power in W and duration in minutes, each a range), how often
    a day it runs, when (hours of the day), and for thermostat-driven ones the on/off cycle in seconds."""

    name: str
    phases: tuple[tuple[tuple[float, float], tuple[float, float]], ...]
    per_day: float
    hours: tuple[tuple[float, float], ...]
    cycle_s: tuple[tuple[float, float], tuple[float, float]] | None = None


APPLIANCES = (
    Appliance("kettle", (((1800, 2400), (2, 4)),), 4.0, ((6.5, 9), (12, 14), (15.5, 22.5))),
    Appliance("microwave", (((800, 1200), (1, 5)),), 2.0, ((7, 9), (12, 14), (18, 21))),
    Appliance("toaster", (((800, 1000), (2, 4)),), 0.7, ((6.5, 9),)),
    Appliance("hob", (((1200, 2000), (10, 30)),), 1.2, ((11.5, 13.5), (17.5, 20)), ((40, 90), (20, 60))),
    Appliance("oven", (((2000, 2800), (30, 60)),), 0.4, ((17, 20),), ((120, 300), (60, 180))),
    Appliance("washing machine", (((1900, 2200), (12, 20)), ((150, 400), (40, 60)), ((400, 600), (5, 10))),
              0.6, ((8, 20),)),
    Appliance("dishwasher", (((1800, 2200), (10, 20)), ((100, 200), (30, 50)), ((1800, 2200), (8, 15))),
              0.7, ((13, 15), (19.5, 22.5))),
    Appliance("hair dryer", (((1200, 2000), (4, 10)),), 0.6, ((6.5, 8.5),)),
    Appliance("vacuum cleaner", (((700, 1400), (10, 30)),), 0.3, ((9, 19),)),
    Appliance("iron", (((1000, 2000), (15, 40)),), 0.2, ((10, 21),), ((30, 90), (30, 90))),
    Appliance("water heater", (((2000, 3000), (30, 120)),), 0.5, ((1, 5),)),
    Appliance("television", (((70, 150), (60, 240)),), 1.0, ((18, 22),)),
    Appliance("lights", (((40, 200), (120, 300)),), 1.0, ((17, 22),)),
    Appliance("computer", (((60, 150), (60, 360)),), 0.8, ((8, 22),)),
)


def household_load(seed: int, days: float) -> Steps:
    """The true load of one household over ``days``, as a step function in W (seeded, deterministic)."""
    rng = random.Random(seed)
    end = days * DAY_S
    deltas: list[tuple[float, float]] = []
    _base_load(rng, end, deltas)
    for watts, on_s, off_s in (((90, 150), (12, 25), (25, 50)), ((70, 120), (15, 30), (30, 60))):  # fridge, freezer
        _cycles(rng, 0.0, end, rng.uniform(*watts), tuple(60 * m for m in on_s), tuple(60 * m for m in off_s),
                deltas, start_on=rng.random() < 0.4)
    for day in range(math.ceil(days)):
        for appliance in APPLIANCES:
            for _ in range(_poisson(rng, appliance.per_day)):
                start = day * DAY_S + 3600 * rng.uniform(*rng.choice(appliance.hours))
                _run(rng, appliance, start, end, deltas)
    deltas.sort()
    times, values, level = [0.0], [0.0], 0.0
    for t, group in itertools.groupby(deltas, key=lambda d: d[0]):
        level += sum(d for _, d in group)
        level = max(level, 0.0)  # float noise only: every on has its off
        if t == times[-1]:
            values[-1] = level
        else:
            times.append(t)
            values.append(level)
    return times, values


def _base_load(rng: random.Random, end: float, deltas: list[tuple[float, float]]) -> None:
    """Standby, router, heating pump: 80-200 W, stepping by up to 25 W every 20-120 minutes."""
    t, level = 0.0, rng.uniform(90, 160)
    deltas.append((0.0, level))
    while True:
        t += 60 * rng.uniform(20, 120)
        if t >= end:
            return
        new = min(200.0, max(80.0, level + rng.uniform(-25, 25)))
        deltas.append((t, new - level))
        level = new


def _cycles(rng: random.Random, start: float, end: float, watts: float, on_s: tuple[float, ...],
            off_s: tuple[float, ...], deltas: list[tuple[float, float]], *, start_on: bool = True) -> None:
    t, on = start, start_on
    while t < end:
        length = rng.uniform(*(on_s if on else off_s))
        if on:
            deltas.append((t, watts))
            deltas.append((min(t + length, end), -watts))
        t += length
        on = not on


def _run(rng: random.Random, appliance: Appliance, start: float, end: float,
         deltas: list[tuple[float, float]]) -> None:
    t = start
    for watts_range, minutes in appliance.phases:
        watts, length = rng.uniform(*watts_range), 60 * rng.uniform(*minutes)
        stop = min(t + length, end)
        if t >= end:
            return
        if appliance.cycle_s:
            _cycles(rng, t, stop, watts, appliance.cycle_s[0], appliance.cycle_s[1], deltas)
        else:
            deltas.append((t, watts))
            deltas.append((stop, -watts))
        t = stop


def _poisson(rng: random.Random, mean: float) -> int:
    limit, k, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        k += 1
        product *= rng.random()
    return k


def pulse_times_ns(load: Steps, end_s: float, wh: float, rng: random.Random) -> list[int]:
    """When a meter of ``wh`` per pulse pulses under ``load`` (the first pulse at a random phase)."""
    times, values = load
    out: list[int] = []
    to_next_wh = rng.uniform(0, wh)  # energy still missing for the next pulse
    for (t0, watts), t1 in zip(zip(times, values, strict=True), [*times[1:], end_s], strict=True):
        t = t0
        while watts > 0:
            reach = t + to_next_wh * 3600 / watts
            if reach > t1:
                to_next_wh -= watts * (t1 - t) / 3600
                break
            out.append(round(reach * NS_PER_S))
            t, to_next_wh = reach, wh
    return out


# -- what each rule shows ----------------------------------------------------------------------------


class _MemoryStore(StateStore):
    """The writer's state kept in memory: the bench measures what is shown, not the disk."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent-bench-state"))
        self.doc: dict[str, Any] | None = None

    def load(self) -> dict[str, Any] | None:
        return self.doc

    def save(self, ledger: Ledger, changed: Changed) -> None:
        self.doc = ledger.to_json()


@dataclass
class Published:
    """What the writer published: the power as a step function (W) and every message's time (s) per topic."""

    power: Steps
    energy: list[tuple[float, str]]
    power_times: list[float]


def replay_writer(pulses_ns: Sequence[int], end_s: float, refresh_s: float, wh: float = 1.0) -> Published:
    """The pulses through the real writer, woken like ``emdc writer`` wakes it.

    The consumer loop is modelled after :class:`~backend.amqp_consumer.BatchConsumer`: it waits for
    messages at most :data:`POLL_S` at a time, handles each pulse as a batch of one as it arrives, and
    at most once per :data:`IDLE_INTERVAL_S` calls the service's real
    :func:`~backend.service.idle_handler`, which calls ``refresh_power`` every ``refresh_s``.
    """
    config = load_config(env={})
    now = [0]
    log: list[tuple[int, str, str]] = []

    class Sink:
        def publish(self, topic: str, payload: str) -> None:
            log.append((now[0], topic, payload))

    ledger = Ledger(config.max_power_w, config.power_smoothing_pulses, config.max_clock_ahead_s)
    writer = EnergyWriter(ledger, _MemoryStore(), Sink(), config.topic_prefix, config.power_timeout_s,
                          clock=lambda: ORIGIN_NS + now[0], meters=config.counted_meters())
    on_idle = idle_handler(writer, None, refresh_s, monotonic=lambda: now[0] / NS_PER_S)
    key = f"pulse.{config.meter_id}.active"
    end_ns, poll_ns, idle_ns = round(end_s * NS_PER_S), round(POLL_S * NS_PER_S), round(IDLE_INTERVAL_S * NS_PER_S)
    next_idle = 0
    arrivals = iter(enumerate(pulses_ns, 1))
    pending = next(arrivals, None)
    while now[0] < end_ns:
        if pending is not None and pending[1] + LATENCY_NS <= now[0] + poll_ns:
            seq, ts = pending
            now[0] = ts + LATENCY_NS
            body = encode(Pulse(config.meter_id, "active", "be0c4", seq, ORIGIN_NS + ts, wh))
            writer.handle_batch([Delivery(seq, key, body)])
            pending = next(arrivals, None)
        else:
            now[0] += poll_ns
        if now[0] >= next_idle:
            next_idle = now[0] + idle_ns
            on_idle()
    power_topic = state_topic(config.topic_prefix, config.meter_id, "active", "power")
    energy_topic = state_topic(config.topic_prefix, config.meter_id, "active", "energy")
    power = [(t / NS_PER_S, float(p) * 1000) for t, topic, p in log if topic == power_topic]
    return Published(power=_steps(power), energy=[(t / NS_PER_S, p) for t, topic, p in log if topic == energy_topic],
                     power_times=[t for t, _ in power])


def esphome_hold(pulses_ns: Sequence[int], wh: float = 1.0, timeout_s: float = ESPHOME_TIMEOUT_S) -> Steps:
    """ESPHome pulse_meter: each pulse shows the last interval's power until the next; 0 after the timeout."""
    shown: list[tuple[float, float]] = []
    running = False
    for previous, ts in itertools.pairwise(pulses_ns):
        gap_s = (ts - previous) / NS_PER_S
        if gap_s > timeout_s:
            if running:
                shown.append((previous / NS_PER_S + timeout_s, 0.0))
            running = False  # this pulse only restarts the measurement
            continue
        running = True
        shown.append((ts / NS_PER_S, _display(wh * 3600 / gap_s)))
    return _steps(shown)


def ha_derivative(energy: Iterable[tuple[float, str]], decimals: int = HA_DECIMALS) -> Steps:
    """Home Assistant's derivative helper (time window 0, unit time h) on the published kWh: kW -> W."""
    shown: list[tuple[float, float]] = []
    previous: tuple[float, Decimal] | None = None
    for t, payload in energy:
        value = Decimal(payload)
        if previous is not None and t > previous[0] and value != previous[1]:
            kw = (value - previous[1]) / Decimal(t - previous[0]) * 3600
            shown.append((t, float(round(kw, decimals)) * 1000))
        previous = (t, value)
    return _steps(shown)


def _display(watts: float) -> float:
    """The same display precision for every rule: 1 W (kW with three decimals)."""
    return float(format_kw(watts)) * 1000


def _steps(points: Sequence[tuple[float, float]]) -> Steps:
    return [t for t, _ in points], [v for _, v in points]


# -- scoring -----------------------------------------------------------------------------------------


def drop_windows(load: Steps, start: float, end: float, drop_w: float = DROP_W) -> Steps:
    """1 during the :data:`AFTER_DROP_S` after each drop of at least ``drop_w``, else 0 (overlaps merged)."""
    times, values = load
    merged: list[list[float]] = []
    for t, before, after in zip(times[1:], values, values[1:], strict=False):
        if before - after >= drop_w and start <= t < end:
            if merged and t <= merged[-1][1]:
                merged[-1][1] = min(t + AFTER_DROP_S, end)
            else:
                merged.append([t, min(t + AFTER_DROP_S, end)])
    steps: list[tuple[float, float]] = [(0.0, 0.0)]
    for t0, t1 in merged:
        steps += [(t0, 1.0), (t1, 0.0)]
    return _steps(steps)


def abs_error(truth: Steps, shown: Steps, weight: Steps, start: float, end: float) -> tuple[float, float]:
    """(integral of |shown - truth| · weight, integral of weight) over [start, end] in W·s and s.

    Before ``shown``'s first value nothing is shown, which counts as 0 W.
    """
    points = sorted({start, end, *(t for t in itertools.chain(truth[0], shown[0], weight[0]) if start < t < end)})
    error = length = 0.0
    for t0, t1 in itertools.pairwise(points):
        w = _at(weight, t0)
        if w:
            error += abs(_at(shown, t0) - _at(truth, t0)) * (t1 - t0) * w
            length += (t1 - t0) * w
    return error, length


def _at(steps: Steps, t: float) -> float:
    i = bisect.bisect_right(steps[0], t) - 1
    return steps[1][i] if i >= 0 else 0.0


@dataclass
class Household:
    """One seed's run: the drops counted, error integrals per rule and scope (W·s, s) and message counts."""

    seed: int
    days: float
    pulses: int
    mean_load_w: float
    drops: int
    errors: dict[str, dict[str, tuple[float, float]]]  # rule -> scope -> (W·s, s)
    power_msgs_max_per_s: int
    power_msgs: int
    msgs_max_per_s: int
    min_power_spacing_s: float


SCOPES = ("day", "after_drops", "after_big_drops")
BIG_DROP_W = 1000.0


def score_household(seed: int, days: float, refresh_s: float) -> Household:
    """Generate household ``seed``, replay its pulses and score every rule against its true load."""
    end = days * DAY_S
    load = household_load(seed, days)
    pulses = pulse_times_ns(load, end, 1.0, random.Random(seed + 10_000))
    emdc = replay_writer(pulses, end, refresh_s)
    before = replay_writer(pulses, end, 10.0)  # the previous default cadence, for comparison
    rules = {"emdc": emdc.power, "emdc_10s": before.power, "esphome": esphome_hold(pulses),
             "ha_derivative": ha_derivative(emdc.energy)}
    start = min(WARMUP_S, end / 4)
    scopes = dict(zip(SCOPES, (([0.0], [1.0]), drop_windows(load, start, end),
                               drop_windows(load, start, end, BIG_DROP_W)), strict=True))
    errors = {name: {scope: abs_error(load, shown, weight, start, end) for scope, weight in scopes.items()}
              for name, shown in rules.items()}
    per_second = Counter(math.floor(t) for t in emdc.power_times)
    every = Counter(math.floor(t) for t in [*emdc.power_times, *(t for t, _ in emdc.energy)])
    spacing = min((b - a for a, b in itertools.pairwise(emdc.power_times)), default=math.inf)
    energy_ws = sum(v * (t1 - t0) for t0, t1, v in zip(load[0], [*load[0][1:], end], load[1], strict=True))
    return Household(seed=seed, days=days, pulses=len(pulses), mean_load_w=energy_ws / end,
                     drops=sum(1 for a, b in itertools.pairwise(load[1]) if a - b >= DROP_W),
                     errors=errors, power_msgs_max_per_s=max(per_second.values(), default=0),
                     power_msgs=len(emdc.power_times), msgs_max_per_s=max(every.values(), default=0),
                     min_power_spacing_s=spacing)


def summarize(households: Sequence[Household]) -> dict[str, Any]:
    """Pooled figures over ``households``: MAE per rule and scope, ratios to ESPHome, message rates."""
    rules = households[0].errors.keys()
    mae: dict[str, dict[str, float]] = {}
    for scope in SCOPES:
        pooled = {rule: [sum(h.errors[rule][scope][i] for h in households) for i in (0, 1)] for rule in rules}
        mae[scope] = {rule: round(e / s, 1) if s else 0.0 for rule, (e, s) in pooled.items()}
    hours = sum(h.days for h in households) * 24
    after = mae["after_drops"]
    return {"seeds": [h.seed for h in households], "days_each": households[0].days,
            "pulses": sum(h.pulses for h in households),
            "mean_load_w": round(sum(h.mean_load_w for h in households) / len(households)),
            "drops": sum(h.drops for h in households),
            "mae_day_w": mae["day"], "mae_after_drops_w": after, "mae_after_big_drops_w": mae["after_big_drops"],
            "ratio_after_drops": _ratio(after["emdc"], after["esphome"]),
            "ratio_after_drops_10s": _ratio(after["emdc_10s"], after["esphome"]),
            "ratio_after_big_drops": _ratio(mae["after_big_drops"]["emdc"], mae["after_big_drops"]["esphome"]),
            "ratio_day": _ratio(mae["day"]["emdc"], mae["day"]["esphome"]),
            "ratio_after_drops_per_seed": {str(h.seed): _ratio(*(h.errors[r]["after_drops"][0] for r in
                                                                ("emdc", "esphome"))) for h in households},
            "power_msgs_max_per_s": max(h.power_msgs_max_per_s for h in households),
            "power_msgs_per_hour": round(sum(h.power_msgs for h in households) / hours, 1),
            "min_power_spacing_s": round(min(h.min_power_spacing_s for h in households), 3),
            "all_msgs_max_per_s": max(h.msgs_max_per_s for h in households)}


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else math.inf


def measure_power_truth(days: float, seeds: Sequence[int] = HELD_OUT_SEEDS, refresh_s: float | None = None,
                        progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The power-truth figures: held-out ``seeds`` pooled, and the tuning seed on its own."""
    refresh = load_config(env={}).power_refresh_s if refresh_s is None else refresh_s
    results = []
    for seed in (TUNING_SEED, *seeds):
        progress(f"household {seed}")
        results.append(score_household(seed, days, refresh))
    return {"refresh_s": refresh, "drop_w": DROP_W, "after_drop_s": AFTER_DROP_S, "warmup_s": WARMUP_S,
            **summarize(results[1:]), "tuning": summarize(results[:1])}
