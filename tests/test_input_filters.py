"""The filter of each input type (S0, LED sensor, reed switch) and the minimum interval derived from the quantity
per pulse: clean pulses at any plausible rate count exactly, bounce never adds a count, short closures are noise."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from common.channels import CHANNELS, channel_spec
from common.inputs import INPUT_TYPES, RATE_MARGIN, Input, derived_min_interval_ms
from edge.pulse_filter import PulseFilter

Edges = list[tuple[float, bool]]
QUANTITIES = {"active": [0.1, 0.5, 1.0, 2.0, 10.0], "reactive": [0.1, 1.0, 10.0], "export": [0.1, 1.0, 10.0],
              "gas": [0.001, 0.01, 0.1], "water": [0.1, 1.0, 10.0]}


def count(flt: PulseFilter, edges: Edges) -> int:
    return sum(flt.edge(t, active) is not None for t, active in edges)


def train(n: int, period_s: float, width_s: float, start_s: float = 1.0) -> Edges:
    """``n`` clean pulses: closed for ``width_s`` at the start of every ``period_s``."""
    edges: Edges = []
    for k in range(n):
        rise = start_s + k * period_s
        edges += [(rise, True), (rise + width_s, False)]
    return edges


@st.composite
def configured(draw: st.DrawFn) -> Input:
    channel = draw(st.sampled_from(CHANNELS))
    return Input.of(pin=17, channel=channel, type=draw(st.sampled_from(sorted(INPUT_TYPES))),
                    per_pulse=draw(st.sampled_from(QUANTITIES[channel])))


@st.composite
def clean_train(draw: st.DrawFn, one: Input) -> tuple[Edges, int]:
    """A train of pulses as the meter makes them, at a rate up to the bound the input's interval derives from."""
    spec = channel_spec(one.channel)
    rate = draw(st.floats(0.001, 0.999)) * RATE_MARGIN * spec.default_max_rate  # in the rate unit
    at_rate_s = one.per_pulse / (rate / spec.rate_factor)
    width_s = draw(st.floats(1.001, 5.0)) * one.min_pulse_ms / 1000  # clear of the threshold, as ticks are floats
    off_s = one.bounce_ms / 1000 + draw(st.floats(0.001, 0.1))
    period_s = max(at_rate_s, width_s + off_s)
    n = draw(st.integers(1, 40))
    return train(n, period_s, width_s), n


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_clean_pulse_train_at_any_rate_up_to_the_bound_is_counted_exactly(data: st.DataObject) -> None:
    one = data.draw(configured())
    edges, n = data.draw(clean_train(one))
    flt = PulseFilter.for_input(one)
    assert count(flt, edges) == n
    assert flt.rejected == 0


@st.composite
def bouncing(draw: st.DrawFn, edges: Edges, bounce_s: float) -> Edges:
    """``edges`` with each closure and each opening chattering for less than ``bounce_s``."""
    out: Edges = []
    for t, active in edges:
        out.append((t, active))
        chatter = draw(st.integers(0, 4))
        step = draw(st.floats(0.05, 0.24)) * bounce_s  # each bounce edge follows the last within the window
        for k in range(chatter):
            # After a closure it opens and closes again; after an opening it closes and opens again.
            out += [(t + (2 * k + 1) * step, not active), (t + (2 * k + 2) * step, active)]
    return out


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_bounce_within_the_window_never_adds_a_count(data: st.DataObject) -> None:
    channel = data.draw(st.sampled_from(["gas", "water"]))
    one = Input.of(pin=22, channel=channel, type="reed", per_pulse=data.draw(st.sampled_from(QUANTITIES[channel])))
    # Reed pulses: long closures, long openings (the chatter of both ends stays inside them).
    n = data.draw(st.integers(1, 20))
    width_s = data.draw(st.floats(0.1, 0.5))
    period_s = max(one.min_interval_ms / 1000, width_s + 0.2) * data.draw(st.floats(1.001, 3.0))
    edges = data.draw(bouncing(train(n, period_s, width_s), one.bounce_ms / 1000))
    flt = PulseFilter.for_input(one)
    assert count(flt, edges) == n
    assert flt.rejected == 0  # bounce is no noise: the wiring is fine


@settings(max_examples=200, deadline=None)
@given(configured(), st.floats(0.0, 0.999))
def test_a_closure_shorter_than_the_presets_minimum_is_noise(one: Input, fraction: float) -> None:
    assume(one.min_pulse_ms > 0)
    flt = PulseFilter.for_input(one)
    short = fraction * one.min_pulse_ms / 1000
    gap = one.bounce_ms / 1000 + one.min_interval_ms / 1000 + 0.5
    real = 1.0 + short + gap
    edges = [(1.0, True), (1.0 + short, False), (real, True), (real + one.min_pulse_ms / 1000 * 2, False)]
    assert [flt.edge(t, a) for t, a in edges] == [None, None, None, real + one.min_pulse_ms / 1000 * 2]
    assert flt.rejected == 1


def test_a_reed_pulse_counts_one_edge_only_not_both() -> None:
    flt = PulseFilter.for_input(Input.of(pin=22, channel="gas", type="reed"))
    assert count(flt, train(10, 2.0, 0.25)) == 10  # ten closures and ten openings: ten pulses of 0.01 m³


def test_an_s0_glitch_inside_a_pulse_neither_loses_nor_doubles_it_with_a_bounce_time() -> None:
    one = Input.of(pin=17, channel="active", type="s0", bounce_ms=5.0)
    flt = PulseFilter.for_input(one)
    # 15 ms on, a 1 ms drop-out, 15 ms on: one 31 ms pulse.
    assert count(flt, [(1.0, True), (1.015, False), (1.016, True), (1.031, False)]) == 1
    # Without the bounce time the two halves are each shorter than 25 ms: both are noise.
    bare = PulseFilter.for_input(Input.of(pin=17, channel="active", type="s0"))
    assert count(bare, [(1.0, True), (1.015, False), (1.016, True), (1.031, False)]) == 0


@pytest.mark.parametrize("kind", sorted(INPUT_TYPES))
def test_a_pulse_of_the_types_nominal_width_passes_its_preset(kind: str) -> None:
    preset = INPUT_TYPES[kind]
    flt = PulseFilter(preset.min_pulse_ms / 1000, 0.0, preset.bounce_ms / 1000)
    assert count(flt, train(3, 1.0, preset.nominal_pulse_ms / 1000)) == 3


def test_the_s0_preset_accepts_iec_62053_31_pulses_with_a_little_tolerance() -> None:
    s0 = Input.of(pin=17, channel="active", type="s0")
    assert 20 <= s0.min_pulse_ms < 30  # the standard's 30 ms, less the edges' skew
    flt = PulseFilter.for_input(s0)
    assert count(flt, train(5, 0.06, 0.03)) == 5  # 30 ms on, 30 ms off: the fastest S0 output
    assert count(flt, [(10.0, True), (10.01, False)]) == 0  # 10 ms is no S0 pulse


# --- the minimum interval, derived ----------------------------------------------------------------

@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("per_pulse", [0.001, 0.01, 0.1, 1.0, 10.0])
def test_the_derived_interval_is_one_pulse_at_the_margin_times_the_channels_maximum_rate(channel: str,
                                                                                        per_pulse: float) -> None:
    spec = channel_spec(channel)
    interval_s = derived_min_interval_ms(channel, per_pulse) / 1000
    assert spec.rate(per_pulse, interval_s) == pytest.approx(RATE_MARGIN * spec.default_max_rate, rel=1e-4)
    assert Input.of(pin=4, channel=channel, type="led", per_pulse=per_pulse).min_interval_ms == pytest.approx(
        interval_s * 1000)


def test_at_10000_imp_per_kwh_a_30_kw_load_is_counted_where_a_fixed_20_ms_refused_it() -> None:
    led = Input.of(pin=17, channel="active", type="led", per_pulse=0.1)
    period_s = 0.1 / (30 / 3.6)  # 30 kW: 0.1 Wh every 12 ms
    pulses = train(100, period_s, 0.004)
    assert count(PulseFilter.for_input(led), pulses) == 100
    assert count(PulseFilter(0.002, 0.020), pulses) == 50  # the old fixed interval: every other pulse refused


def test_an_override_replaces_the_derived_interval() -> None:
    assert Input.of(pin=22, channel="gas", type="reed", min_interval_ms=500).min_interval_ms == 500
    assert Input.of(pin=22, channel="gas", type="reed", per_pulse=0.1).min_interval_ms == pytest.approx(11250)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 0.3), st.booleans()), max_size=80), st.floats(0.0, 0.05))
def test_whatever_the_line_does_counts_are_never_closer_than_the_interval_nor_more_than_closures(
        steps: list[tuple[float, bool]], bounce_s: float) -> None:
    flt = PulseFilter(min_width_s=0.08, min_interval_s=0.3, bounce_s=bounce_s)
    ticks, accepted, closures, last = 0.0, [], 0, None
    for dt, active in steps:
        ticks += dt
        if active and last is not True:
            closures += 1
        last = active
        if flt.edge(ticks, active) is not None:
            accepted.append(ticks)
    assert all(b - a >= 0.3 for a, b in itertools.pairwise(accepted))
    assert len(accepted) <= closures
