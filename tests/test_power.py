"""backend.power: the measured power, bounded while idle, 0 after a timeout; and how the writer and its
idle handler keep the published value following it (every second, on change, at most once a second)."""

from __future__ import annotations

import itertools
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backend.writer
from backend.ledger import ChannelState, Ledger
from backend.memory_transport import MemorySink
from backend.power import displayed_power_w, physical_bound_w, settled
from backend.service import idle_handler
from backend.writer import EnergyWriter
from common.config import load_config
from tests.support import T0, deliveries, pulse

S = 1_000_000_000
TIMEOUT_S = 300.0


def three_kw() -> ChannelState:
    """1 Wh pulses 1.2 s apart (3 kW); the last one at t = 0."""
    return ChannelState(last_ts_ns=0, wh=1.0, intervals_ns=[1_200_000_000])


def test_none_before_any_pulse():
    assert displayed_power_w(ChannelState(), now_ns=10 * S, timeout_s=TIMEOUT_S) is None


def test_none_after_a_gap_until_the_timeout():
    state = ChannelState(last_ts_ns=0, wh=1.0, intervals_ns=[])
    assert displayed_power_w(state, now_ns=1 * S, timeout_s=TIMEOUT_S) is None
    assert displayed_power_w(state, now_ns=299 * S, timeout_s=TIMEOUT_S) is None
    assert displayed_power_w(state, now_ns=300 * S, timeout_s=TIMEOUT_S) == 0.0


def test_measured_power_while_the_bound_is_higher():
    assert displayed_power_w(three_kw(), now_ns=1 * S, timeout_s=TIMEOUT_S) == pytest.approx(3000.0)


def test_measured_power_right_at_the_pulse_and_before_it():
    assert displayed_power_w(three_kw(), now_ns=0, timeout_s=TIMEOUT_S) == pytest.approx(3000.0)
    assert displayed_power_w(three_kw(), now_ns=-5 * S, timeout_s=TIMEOUT_S) == pytest.approx(3000.0)


def test_bound_takes_over_once_below_the_measurement():
    # 360 W: a pulse every 10 s. 11 s after the last, one 1 Wh pulse in 11 s is at most 327 W, shown as is.
    state = ChannelState(last_ts_ns=0, wh=1.0, intervals_ns=[10 * S])
    assert displayed_power_w(state, now_ns=11 * S, timeout_s=TIMEOUT_S) == 327.0


def test_a_share_of_the_bound_once_the_pulse_is_overdue():
    # 11.5 s after the last pulse of a 10 s interval, the load fell: at most 313 W, shown as 30 % of it.
    state = ChannelState(last_ts_ns=0, wh=1.0, intervals_ns=[10 * S])
    assert displayed_power_w(state, now_ns=11 * S, timeout_s=TIMEOUT_S) == 327.0  # 10 % late, not more
    assert displayed_power_w(state, now_ns=11_500_000_000, timeout_s=TIMEOUT_S) == 93.0
    # One 1 Wh pulse in 36 s is at most 100 W: 30 W shows.
    assert displayed_power_w(three_kw(), now_ns=36 * S, timeout_s=TIMEOUT_S) == pytest.approx(30.0)
    assert displayed_power_w(three_kw(), now_ns=72 * S, timeout_s=TIMEOUT_S) == pytest.approx(15.0)


def counted(ledger: Ledger, times_s: list[float]) -> ChannelState:
    """The channel's state after 1 Wh pulses at ``times_s`` (from T0), counted by ``ledger``."""
    for seq, t in enumerate(times_s, 1):
        ledger.apply(pulse(seq, t), now_ns=T0 + round(t * S))
    return ledger.channel("main", "active")


def test_after_a_drop_the_mixed_interval_reads_as_the_level_it_fell_to():
    # 2 kW (1.8 s), then the kettle is off and 150 W is left: the next interval, 12.9 s, reads 279 W alone.
    state = counted(Ledger(100_000), [0, 1.8, 3.6, 5.4, 18.3])
    now = T0 + round(18.3 * S)
    assert displayed_power_w(state, now_ns=now, timeout_s=TIMEOUT_S) == pytest.approx(150.0)
    state = counted(Ledger(100_000, smoothing_pulses=2), [0, 1.8, 3.6, 5.4, 18.3])
    assert displayed_power_w(state, now_ns=now, timeout_s=TIMEOUT_S) == pytest.approx(2 * 3600 / 14.7), \
        "averaging over pulses takes the intervals as they are"


def test_an_overdue_pulse_shows_the_floor_the_load_sat_at_within_the_hour():
    # An hour and a half at 150 W (24 s), then 2 kW for a minute, then silence: the floor is 150 W.
    times = [24.0 * i for i in range(226)]
    times += [times[-1] + 1.8 * i for i in range(1, 34)]
    state = counted(Ledger(100_000), times)
    last = T0 + round(times[-1] * S)
    assert displayed_power_w(state, now_ns=last + 4 * S, timeout_s=TIMEOUT_S) == 270.0  # 30 % of 900 W is more
    assert displayed_power_w(state, now_ns=last + 10 * S, timeout_s=TIMEOUT_S) == 150.0  # not 30 % of 360 W
    assert displayed_power_w(state, now_ns=last + 30 * S, timeout_s=TIMEOUT_S) == 120.0  # never above the bound
    fresh = counted(Ledger(100_000), times[-33:])  # a writer that saw only the 2 kW: no floor
    assert displayed_power_w(fresh, now_ns=last + 10 * S, timeout_s=TIMEOUT_S) == 108.0


def test_bound_uses_the_channel_wh():
    state = ChannelState(last_ts_ns=0, wh=0.5, intervals_ns=[600_000_000])  # 3 kW with 0.5 Wh pulses
    assert displayed_power_w(state, now_ns=36 * S, timeout_s=TIMEOUT_S) == pytest.approx(15.0)


def test_bound_is_relative_to_the_last_pulse_time():
    state = ChannelState(last_ts_ns=1_000 * S, wh=1.0, intervals_ns=[1_200_000_000])
    assert displayed_power_w(state, now_ns=1_036 * S, timeout_s=TIMEOUT_S) == pytest.approx(30.0)


def test_zero_at_and_after_the_timeout():
    assert displayed_power_w(three_kw(), now_ns=300 * S - 1, timeout_s=TIMEOUT_S) > 0
    assert displayed_power_w(three_kw(), now_ns=300 * S, timeout_s=TIMEOUT_S) == 0.0
    assert displayed_power_w(three_kw(), now_ns=10_000 * S, timeout_s=TIMEOUT_S) == 0.0


def test_timeout_is_configurable():
    assert displayed_power_w(three_kw(), now_ns=10 * S, timeout_s=10) == 0.0
    assert displayed_power_w(three_kw(), now_ns=10 * S, timeout_s=10.5) == pytest.approx(108.0)


def test_smoothed_measurement_is_the_mean_over_intervals():
    state = ChannelState(last_ts_ns=0, wh=1.0, intervals_ns=[1 * S, 2 * S, 3 * S])
    assert displayed_power_w(state, now_ns=1, timeout_s=TIMEOUT_S) == pytest.approx(3 * 3600 / 6)


states = st.builds(
    ChannelState,
    last_ts_ns=st.one_of(st.none(), st.integers(0, 10**18)),
    wh=st.sampled_from([0.1, 0.5, 1.0, 2.0, 10.0]),
    intervals_ns=st.lists(st.integers(1, 3600 * S), max_size=5),
)


@settings(max_examples=200, deadline=None)
@given(states, st.integers(-10**12, 10**15), st.floats(1, 3600))
def test_displayed_power_is_never_above_measured_nor_negative(state: ChannelState, offset_ns: int,
                                                              timeout_s: float):
    now_ns = (state.last_ts_ns or 0) + offset_ns
    shown = displayed_power_w(state, now_ns, timeout_s)
    measured = state.power_w()
    if state.last_ts_ns is None:
        assert shown is None
        return
    if shown is None:
        assert measured is None
        return
    assert shown >= 0
    if measured is not None:
        assert shown <= measured


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 299 * S), min_size=2, max_size=10, unique=True))
def test_displayed_power_never_rises_while_idle(times: list[int]):
    state = three_kw()
    shown = [displayed_power_w(state, now_ns=t, timeout_s=TIMEOUT_S) for t in sorted(times)]
    assert all(later <= earlier for earlier, later in itertools.pairwise(shown))


@settings(max_examples=300, deadline=None)
@given(states, st.integers(1, 10**13), st.floats(1, 3600))
def test_displayed_power_is_never_above_the_physical_bound_even_as_published(state: ChannelState, idle_ns: int,
                                                                             timeout_s: float):
    now_ns = (state.last_ts_ns or 0) + idle_ns
    shown = displayed_power_w(state, now_ns, timeout_s)
    if shown is not None:
        bound = physical_bound_w(state, now_ns)
        assert shown <= bound
        assert float(backend.writer.format_rate("active", shown)) * 1000 <= bound, "rounding for display lifted it"


@settings(max_examples=200, deadline=None)
@given(st.floats(1, 60), st.lists(st.floats(0.05, 900), max_size=40), st.lists(st.floats(0, 400), min_size=2,
       max_size=8), st.sampled_from(["active", "water"]))
def test_with_a_learnt_level_and_floor_the_shown_value_stays_under_the_bound_and_falls_while_idle(
        base_s: float, intervals_s: list[float], idle_s: list[float], kind: str):
    """Any load history (an hour at a base level, so that there is a floor, then anything: levels corrected
    after drops) and any moment while idle."""
    ledger = Ledger(10**9, max_rates={"water": 10**9})
    times = list(itertools.accumulate([base_s] * math.ceil(3700 / base_s) + intervals_s, initial=0.0))
    for seq, t in enumerate(times, 1):
        ledger.apply(pulse(seq, t, channel=kind), now_ns=T0 + round(t * S))
    state = ledger.channel("main", kind)
    last = T0 + round(times[-1] * S)
    shown = [displayed_power_w(state, last + round(i * S), TIMEOUT_S) for i in sorted(idle_s)]
    for i, value in zip(sorted(idle_s), shown, strict=True):
        assert value is not None and 0 <= value <= (state.power_w() or 0)
        if i > 0:
            assert value <= physical_bound_w(state, last + round(i * S))
    assert all(b <= a for a, b in itertools.pairwise(shown)), "the shown value rose while nothing came"


def test_the_bound_is_rounded_down_to_whole_watts():
    # 1 Wh in 18.1 s is at most 198.9 W; 30 % of it, 59.67 W, shows as 59 W, never 0.05967 kW rounded up to "0.060".
    assert displayed_power_w(three_kw(), now_ns=18_100_000_000, timeout_s=TIMEOUT_S) == 59.0


def test_settled_once_nothing_but_a_pulse_can_change_the_value():
    assert not settled(three_kw(), now_ns=1 * S, timeout_s=TIMEOUT_S)
    assert not settled(three_kw(), now_ns=300 * S - 1, timeout_s=TIMEOUT_S)
    assert settled(three_kw(), now_ns=300 * S, timeout_s=TIMEOUT_S)
    assert settled(ChannelState(), now_ns=S, timeout_s=TIMEOUT_S)
    doubted = ChannelState(last_ts_ns=0, ts_doubt="clock not synchronised", received_ns=0)
    assert not settled(doubted, now_ns=10 * S, timeout_s=TIMEOUT_S)  # unknown now, 0 after the timeout
    assert settled(doubted, now_ns=300 * S, timeout_s=TIMEOUT_S)


# -- the writer: what reaches MQTT, and when ------------------------------------------------------------


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class TimedSink(MemorySink):
    """Records (writer clock, topic, payload) for every message."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.log: list[tuple[int, str, str]] = []

    def publish(self, topic: str, payload: str) -> None:
        super().publish(topic, payload)
        self.log.append((self.clock(), topic, payload))

    def power(self) -> list[tuple[int, float]]:
        return [(t, float(p) * 1000) for t, topic, p in self.log if topic.endswith("_power")]


def writer_at(state_dir: Path, clock: Clock, timeout_s: float = TIMEOUT_S) -> tuple[EnergyWriter, TimedSink]:
    env = {"EMDC_STATE_DIR": str(state_dir), "EMDC_DISCOVERY": "off", "EMDC_POWER_TIMEOUT_S": str(timeout_s),
           "EMDC_ADMIT_NEW_METERS": "100"}  # the fleet of meters some tests count
    sink = TimedSink(clock)
    return EnergyWriter.open(load_config(env=env), sink=sink, clock=clock), sink


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(50, 90_000), min_size=1, max_size=12), st.integers(0, 999))
def test_replayed_pulses_never_show_more_than_the_bound_nor_more_than_one_power_message_a_second(
        gaps_ms: list[int], tick_phase_ms: int):
    """Pulses at arbitrary gaps, refreshes every second as the idle handler makes them, a 60 s timeout."""
    times = [T0 + S * 0 + sum(gaps_ms[:i]) * 1_000_000 for i in range(len(gaps_ms) + 1)]
    end = times[-1] + 70 * S
    with tempfile.TemporaryDirectory() as state_dir:
        clock = Clock(times[0])
        writer, sink = writer_at(Path(state_dir), clock, timeout_s=60)
        tick = times[0] + tick_phase_ms * 1_000_000
        for seq, ts in enumerate(times, 1):
            while tick < ts:
                clock.now = tick
                writer.refresh_power()
                tick += S
            clock.now = ts
            writer.handle_batch(deliveries(pulse(seq, (ts - T0) / S)))
        while tick < end:
            clock.now = tick
            writer.refresh_power()
            tick += S
    power = sink.power()
    for t, shown in power:
        last = max(ts for ts in times if ts <= t)
        if t > last:
            assert shown <= 3600 * S / (t - last), f"{shown} W shown {(t - last) / S} s after the last pulse"
    assert all(b - a >= S for (a, _), (b, _) in itertools.pairwise(power)), "two power messages within a second"
    assert power[-1][1] == 0.0 and power[-1][0] <= times[-1] + 61 * S, "0 within a refresh of the timeout"


def test_a_falling_bound_is_published_every_second_then_less_often_then_not_at_all(tmp_path: Path):
    clock = Clock(T0 + S)
    writer, sink = writer_at(tmp_path, clock)
    writer.handle_batch(deliveries(pulse(1, 0), pulse(2, 1)))  # 3.6 kW, last pulse at T0 + 1 s
    for second in range(2, 400):
        clock.now = T0 + second * S
        writer.refresh_power()
    times = [(t - T0) // S for t, _ in sink.power()]
    assert times[:6] == [1, 3, 4, 5, 6, 7], "after the pulse: the bound, once a second while it falls fast"
    assert 400 - 1 - times[-1] > 90 and sink.power()[-1][1] == 0.0, "0 at the timeout, then silence"
    gaps = [b - a for a, b in itertools.pairwise(times[:-1])]
    assert max(gaps) > 1, "once the bound falls by less than a watt a second, it is published less often"


def test_a_pulse_within_a_second_of_the_last_power_message_waits_for_the_next_refresh(tmp_path: Path):
    clock = Clock(T0 + S)
    writer, sink = writer_at(tmp_path, clock)
    writer.handle_batch(deliveries(pulse(1, 0), pulse(2, 1)))  # 3.6 kW
    clock.now = T0 + S + S // 2
    writer.handle_batch(deliveries(pulse(3, 1.5)))  # 7.2 kW, half a second later
    assert sink.retained["home/energy/active_power"] == "3.600"
    assert sink.retained["home/energy/active_energy"] == "0.003", "energy is never held back"
    clock.now = T0 + S + 9 * S // 10
    writer.refresh_power()
    assert sink.retained["home/energy/active_power"] == "3.600", "still within the second"
    clock.now = T0 + 2 * S
    writer.refresh_power()
    assert sink.retained["home/energy/active_power"] == "7.200"


def test_held_back_power_goes_out_as_soon_as_the_limit_allows_whatever_the_refresh_interval(tmp_path: Path):
    clock = Clock(T0 + S)
    writer, sink = writer_at(tmp_path, clock)
    writer.handle_batch(deliveries(pulse(1, 0), pulse(2, 1)))  # 3.6 kW
    clock.now = T0 + S + S // 2
    writer.handle_batch(deliveries(pulse(3, 1.5)))  # 7.2 kW, held back
    writer.release_held_power()
    assert sink.retained["home/energy/active_power"] == "3.600", "still within the second"
    clock.now = T0 + 2 * S
    writer.release_held_power()
    assert sink.retained["home/energy/active_power"] == "7.200"
    sent = len(sink.log)
    clock.now = T0 + 4 * S
    writer.release_held_power()
    assert len(sink.log) == sent, "nothing is held back any more: the idle bound waits for the refresh"


def test_a_refresh_looks_only_at_channels_whose_power_can_still_change(tmp_path: Path, monkeypatch):
    clock = Clock(T0 + S)
    writer, sink = writer_at(tmp_path, clock)
    for i in range(50):
        writer.handle_batch(deliveries(pulse(1, 0, meter=f"m{i}"), pulse(2, 1, meter=f"m{i}")))
    clock.now = T0 + 400 * S
    writer.refresh_power()  # every meter times out: 0 published, and they settle
    assert sum(1 for _, v in sink.power() if v == 0.0) == 50
    writer.handle_batch(deliveries(pulse(3, 399, meter="m7"), pulse(4, 400, meter="m7")))
    evaluated: list[ChannelState] = []

    def counting(state: ChannelState, now_ns: int, timeout_s: float) -> float | None:
        evaluated.append(state)
        return displayed_power_w(state, now_ns, timeout_s)

    monkeypatch.setattr(backend.writer, "displayed_power_w", counting)
    before = len(sink.log)
    clock.now = T0 + 405 * S
    writer.refresh_power()
    assert evaluated == [writer.ledger.channel("m7", "active")]
    assert [topic for _, topic, _ in sink.log[before:]] == ["home/energy/m7/active_power"]


def test_channels_loaded_from_the_state_file_still_time_out_without_a_pulse(tmp_path: Path):
    clock = Clock(T0 + S)
    writer, _ = writer_at(tmp_path, clock)
    writer.handle_batch(deliveries(pulse(1, 0), pulse(2, 1)))
    restarted, sink = writer_at(tmp_path, clock)  # no MQTT reconnect (publish_all) either, as in a simulation
    clock.now = T0 + 400 * S
    restarted.refresh_power()
    assert sink.retained["home/energy/active_power"] == "0.000"


class CountingWriter:
    def __init__(self) -> None:
        self.refreshes = 0

    def refresh_power(self) -> None:
        self.refreshes += 1

    def release_held_power(self) -> None:
        """Between refreshes: only what the once-a-second limit held back (nothing here)."""


def test_idle_handler_refreshes_at_every_wake_up_about_a_second_apart_and_never_catches_up():
    now = [100.0]
    writer = CountingWriter()
    on_idle = idle_handler(writer, None, 1.0, monotonic=lambda: now[0])  # type: ignore[arg-type]
    # The consumer calls it about once a second, a little early or late each time.
    for t in (100.5, 101.0, 101.999, 103.0, 103.98, 105.01):
        now[0] = t
        on_idle()
    assert writer.refreshes == 5
    now[0] = 130.0  # after a stall: one refresh, no catching up
    on_idle()
    on_idle()
    assert writer.refreshes == 6
    now[0] = 131.0
    on_idle()
    assert writer.refreshes == 7
