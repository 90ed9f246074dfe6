"""backend.ledger: exact, idempotent counting of numbered pulses."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.ledger import EPOCHS_KEPT, ChannelState, Cursor, Implausible, Interleaved, Ledger, wh_to_uwh
from common.message import Pulse
from tests.support import T0, S, pulse

MAX_W = 100_000.0


@pytest.fixture
def ledger() -> Ledger:
    return Ledger(max_power_w=MAX_W, fixed_wh=True)


def total(ledger: Ledger, meter: str = "main", channel: str = "active") -> int:
    return ledger.channel(meter, channel).total_uwh


def snapshot(ledger: Ledger) -> str:
    return json.dumps(ledger.to_json(), sort_keys=True)


# --- counting -------------------------------------------------------------------------------------

def test_first_pulse_counts_its_seq(ledger: Ledger):
    assert ledger.apply(pulse(1, 0)) == 1
    assert total(ledger) == 1_000_000


def test_first_pulse_ever_with_high_seq_counts_all_of_them(ledger: Ledger):
    assert ledger.apply(pulse(500, 0)) == 500
    assert total(ledger) == 500_000_000


def test_duplicate_counts_nothing(ledger: Ledger):
    ledger.apply(pulse(1, 0))
    ledger.apply(pulse(2, 1))
    before = snapshot(ledger)
    assert ledger.apply(pulse(2, 1)) == 0
    assert ledger.apply(pulse(1, 0)) == 0
    assert snapshot(ledger) == before


def test_older_seq_with_an_earlier_timestamp_is_a_duplicate(ledger: Ledger):
    ledger.apply(pulse(5, 10))
    assert ledger.apply(pulse(3, 5)) == 0
    assert total(ledger) == 5_000_000


def test_older_seq_with_a_later_timestamp_is_a_reused_counter(ledger: Ledger):
    ledger.apply(pulse(5, 10))
    with pytest.raises(Implausible, match="restored from a backup"):
        ledger.apply(pulse(3, 999))
    assert total(ledger) == 5_000_000


def test_a_pulse_resent_after_a_step_back_is_a_duplicate(ledger: Ledger):
    for seq in range(1, 6):
        ledger.apply(pulse(seq))
    for seq in range(6, 9):  # the edge's clock stepped back an hour
        ledger.apply(pulse(seq, seq - 3600))
    before = snapshot(ledger)
    assert ledger.apply(pulse(4)) == 0  # later than seq 8's time, but not than seq 5's
    assert snapshot(ledger) == before


def test_a_reused_seq_stamped_after_every_counted_pulse_is_refused_after_a_step_back_too(ledger: Ledger):
    for seq in range(1, 6):
        ledger.apply(pulse(seq))
    ledger.apply(pulse(6, 6 - 3600))
    with pytest.raises(Implausible, match="restored from a backup"):
        ledger.apply(pulse(3, 5.5))
    assert total(ledger) == 6_000_000


def test_a_timestamp_far_in_the_future_is_counted_but_not_trusted(ledger: Ledger):
    now = 1_000 * S
    assert ledger.apply(Pulse("main", "active", "e1", 1, now + 3600 * S, 1.0), now_ns=now) == 1
    state = ledger.channel("main", "active")
    assert "3600 s ahead of the writer's clock" in state.ts_doubt
    assert state.last_ts_ns is None and state.epochs["e1"].trusted_ns is None
    assert ledger.apply(Pulse("main", "active", "e1", 2, now + 60 * S, 1.0), now_ns=now) == 1
    assert state.ts_doubt == "" and total(ledger) == 2_000_000


def test_a_repeated_calibration_is_ignored(ledger: Ledger):
    ledger.apply(pulse(1, 0))
    assert ledger.set_total("main", "active", 7_000_000, as_of_ns=1, command_id="c1") == 1_000_000
    ledger.apply(pulse(2, 10))
    assert ledger.set_total("main", "active", 7_000_000, as_of_ns=1, command_id="c1") is None
    assert total(ledger) == 8_000_000


def test_backlog_pulses_from_before_a_calibration_are_part_of_the_reading(ledger: Ledger):
    ledger.apply(pulse(1, 0))
    # The meter was read at t=100 s; the Pi's backlog up to then arrives afterwards.
    ledger.set_total("main", "active", 50_000_000, as_of_ns=T0 + 100 * S, command_id="c2")
    assert ledger.apply(pulse(20, 90)) == 19
    assert total(ledger) == 50_000_000
    ledger.apply(pulse(21, 110))
    assert total(ledger) == 51_000_000


def test_jump_counts_the_missing_pulses(ledger: Ledger):
    ledger.apply(pulse(1, 0))
    assert ledger.apply(pulse(4, 3.6)) == 3
    assert total(ledger) == 4_000_000


def test_new_epoch_counts_its_seq_on_top_of_the_total(ledger: Ledger):
    ledger.apply(pulse(10, 0, epoch="aa"))
    assert ledger.apply(pulse(3, 100, epoch="bb")) == 3
    assert total(ledger) == 13_000_000
    assert set(ledger.channel("main", "active").epochs) == {"aa", "bb"}


def test_a_late_pulse_of_an_old_epoch_from_before_the_newer_began_counts(ledger: Ledger):
    # An outbox sent late: the old epoch's pulse at 5 s happened before the new epoch's first, at 10 s.
    ledger.apply(pulse(1, 0, epoch="aa"), now_ns=T0)
    ledger.apply(pulse(1, 10, epoch="bb"), now_ns=T0 + 10 * S)
    assert ledger.apply(pulse(3, 5, epoch="aa"), now_ns=T0 + 60 * S) == 2
    assert total(ledger) == 4_000_000
    assert ledger.channel("main", "active").last_ts_ns == T0 + 10 * S
    assert ledger.apply(pulse(2, 70, epoch="bb"), now_ns=T0 + 70 * S) == 1, "the new epoch counts on"


def test_an_old_epoch_counting_on_after_a_new_one_began_bars_the_new_one(ledger: Ledger):
    # A second Pi with a copied configuration: its first pulse looks like a restart, counted; then the first
    # Pi's epoch goes on, and the second's is held back from then on, whatever it sends.
    ledger.apply(pulse(1, 0, epoch="aa"))
    ledger.apply(pulse(1, 10, epoch="bb"))
    assert ledger.apply(pulse(2, 12, epoch="aa")) == 1
    before = snapshot(ledger)
    for seq, t in ((2, 13), (3, 14)):
        with pytest.raises(Interleaved, match="epoch bb of main/active was found to run beside another epoch: "
                                              "two edges count under meter id 'main'"):
            ledger.apply(pulse(seq, t, epoch="bb"))
    assert snapshot(ledger) == before
    assert ledger.apply(pulse(3, 15, epoch="aa")) == 1
    assert total(ledger) == 4_000_000
    # A person may decide otherwise (the second Pi replaces the first): readmitted, it is the one counting.
    assert ledger.apply(pulse(3, 16, epoch="bb"), readmitted=True) == 2
    assert ledger.apply(pulse(4, 17, epoch="bb")) == 1
    with pytest.raises(Interleaved, match="epoch aa of main/active was found to run beside another epoch"):
        ledger.apply(pulse(4, 18, epoch="aa"))


def test_a_new_epoch_that_began_while_the_current_one_counted_is_refused_from_its_first_pulse(ledger: Ledger):
    for seq in range(1, 4):
        ledger.apply(pulse(seq, 100 * seq, epoch="aa"))
    copied = Pulse("main", "active", "bb", 1, T0 + 301 * S, 1.0, epoch_ns=T0 + 200 * S)  # began 100 s before
    with pytest.raises(Interleaved, match="epoch bb of main/active began 100 s before the last pulse of epoch aa"):
        ledger.apply(copied)
    raced = Pulse("main", "active", "bb", 1, T0 + 299 * S, 1.0, epoch_ns=T0 + 200 * S)  # arrives after aa's 300 s
    with pytest.raises(Interleaved, match="epoch bb of main/active began 100 s before the last pulse of epoch aa"):
        ledger.apply(raced)
    restarted = Pulse("main", "active", "cc", 1, T0 + 320 * S, 1.0, epoch_ns=T0 + 310 * S)  # after the last
    assert ledger.apply(restarted) == 1
    stepped_back = Pulse("main", "active", "dd", 1, T0 + 10 * S, 1.0, epoch_ns=T0 + 5 * S)  # no evidence
    assert ledger.apply(stepped_back) == 1
    assert total(ledger) == 5_000_000


def test_fractional_wh_is_counted_exactly_in_micro_wh(ledger: Ledger):
    for seq in range(1, 11):
        ledger.apply(pulse(seq, seq, wh=0.1))
    assert total(ledger) == 1_000_000  # ten times 0.1 Wh is exactly 1 Wh


def test_wh_to_uwh_rounds_to_the_nearest_micro_wh():
    assert wh_to_uwh(1.0) == 1_000_000
    assert wh_to_uwh(0.1) == 100_000
    assert wh_to_uwh(0.0000014) == 1
    assert wh_to_uwh(1000.0) == 1_000_000_000


def test_meters_and_channels_are_independent(ledger: Ledger):
    ledger.apply(pulse(3, 0, meter="main", channel="active"))
    ledger.apply(pulse(5, 0, meter="main", channel="reactive"))
    ledger.apply(pulse(7, 0, meter="garage", channel="active"))
    assert total(ledger, "main", "active") == 3_000_000
    assert total(ledger, "main", "reactive") == 5_000_000
    assert total(ledger, "garage", "active") == 7_000_000
    assert [key for key, _ in ledger] == [("garage", "active"), ("main", "active"), ("main", "reactive")]


# --- plausibility guard ---------------------------------------------------------------------------

def test_jump_implying_too_much_power_is_implausible_and_changes_nothing(ledger: Ledger):
    ledger.apply(pulse(1, 0))
    before = snapshot(ledger)
    # 101 Wh in 3.6 s is 101 kW, above the 100 kW limit
    with pytest.raises(Implausible, match=r"jump of 101 pulses in 3\.600 s implies 101\.0 kW, above the 100 kW"):
        ledger.apply(pulse(102, 3.6))
    assert snapshot(ledger) == before


def test_jump_at_exactly_the_limit_is_accepted(ledger: Ledger):
    ledger.apply(pulse(1, 0))
    assert ledger.apply(pulse(101, 3.6)) == 100  # exactly 100 kW


def test_new_epoch_implying_too_much_power_is_implausible(ledger: Ledger):
    ledger.apply(pulse(1, 0, epoch="aa"))
    before = snapshot(ledger)
    with pytest.raises(Implausible, match="new epoch bb starting at seq 1000"):
        ledger.apply(pulse(1000, 1, epoch="bb"))
    assert snapshot(ledger) == before
    assert "bb" not in ledger.channel("main", "active").epochs


def test_implausible_pulse_can_be_followed_by_a_plausible_one(ledger: Ledger):
    ledger.apply(pulse(1, 0))
    with pytest.raises(Implausible):
        ledger.apply(pulse(1000, 1))
    assert ledger.apply(pulse(1000, 3600)) == 999  # 999 Wh in an hour: fine


@pytest.mark.parametrize("t_s", [0, -1])
def test_time_not_after_the_previous_pulse_counts_without_power(ledger: Ledger, t_s: float):
    ledger.apply(pulse(1, 0))
    ledger.apply(pulse(2, 1))
    assert ledger.apply(pulse(3, t_s)) == 1
    state = ledger.channel("main", "active")
    assert "is not after the channel's previous pulse" in state.ts_doubt
    assert state.power_w() is None and state.last_ts_ns == T0 + S
    assert total(ledger) == 3_000_000


def test_new_epoch_not_after_the_newest_pulse_counts_without_power(ledger: Ledger):
    ledger.apply(pulse(1, 100, epoch="aa"))
    assert ledger.apply(pulse(1, 50, epoch="bb")) == 1
    assert total(ledger) == 2_000_000
    assert ledger.channel("main", "active").ts_doubt != ""


def test_guard_uses_the_configured_limit():
    strict = Ledger(max_power_w=1000, fixed_wh=True)
    strict.apply(pulse(1, 0))
    with pytest.raises(Implausible, match="above the 1 kW limit"):
        strict.apply(pulse(3, 3.6))  # 2 Wh in 3.6 s = 2 kW


def test_implausible_is_a_value_error():
    assert issubclass(Implausible, ValueError)


# --- power ----------------------------------------------------------------------------------------

def test_power_unknown_before_two_consecutive_pulses(ledger: Ledger):
    assert ledger.channel("main", "active").power_w() is None
    ledger.apply(pulse(1, 0))
    assert ledger.channel("main", "active").power_w() is None


def test_power_from_consecutive_pulses(ledger: Ledger):
    ledger.apply(pulse(1, 0))
    ledger.apply(pulse(2, 1.2))
    assert ledger.channel("main", "active").power_w() == pytest.approx(3000.0)


def test_power_uses_the_pulse_wh(ledger: Ledger):
    ledger.apply(pulse(1, 0, wh=0.5))
    ledger.apply(pulse(2, 1.8, wh=0.5))
    assert ledger.channel("main", "active").power_w() == pytest.approx(1000.0)


def test_jump_clears_power(ledger: Ledger):
    ledger.apply(pulse(1, 0))
    ledger.apply(pulse(2, 1.2))
    ledger.apply(pulse(4, 2.4))
    assert ledger.channel("main", "active").power_w() is None
    ledger.apply(pulse(5, 6))  # consecutive again
    assert ledger.channel("main", "active").power_w() == pytest.approx(1000.0)


def test_new_epoch_clears_power(ledger: Ledger):
    ledger.apply(pulse(1, 0, epoch="aa"))
    ledger.apply(pulse(2, 1.2, epoch="aa"))
    ledger.apply(pulse(1, 2.4, epoch="bb"))
    assert ledger.channel("main", "active").power_w() is None


def test_duplicate_leaves_power_unchanged(ledger: Ledger):
    ledger.apply(pulse(1, 0))
    ledger.apply(pulse(2, 1.2))
    ledger.apply(pulse(1, 0))
    ledger.apply(pulse(2, 1.2))
    assert ledger.channel("main", "active").power_w() == pytest.approx(3000.0)


def test_late_old_epoch_pulse_does_not_touch_power(ledger: Ledger):
    ledger.apply(pulse(1, 0, epoch="aa"))
    ledger.apply(pulse(1, 10, epoch="bb"))
    ledger.apply(pulse(2, 11.2, epoch="bb"))
    ledger.apply(pulse(2, 5, epoch="aa"), readmitted=True)  # a straggler of the old epoch, older than the newest
    state = ledger.channel("main", "active")
    assert state.power_w() == pytest.approx(3000.0)
    assert state.last_ts_ns == T0 + round(11.2 * S)


def test_smoothing_averages_the_last_n_intervals():
    smooth = Ledger(max_power_w=MAX_W, smoothing_pulses=3, fixed_wh=True)
    for seq, t in enumerate([0, 1.0, 3.0, 6.0, 10.0], start=1):  # intervals 1, 2, 3, 4 s
        smooth.apply(pulse(seq, t))
    state = smooth.channel("main", "active")
    assert state.intervals_ns == [2 * S, 3 * S, 4 * S]
    assert state.power_w() == pytest.approx(3 * 3600 / 9)


def test_smoothing_of_one_uses_the_last_interval_only(ledger: Ledger):
    for seq, t in enumerate([0, 1.0, 3.0], start=1):
        ledger.apply(pulse(seq, t))
    assert ledger.channel("main", "active").intervals_ns == [2 * S]
    assert ledger.channel("main", "active").power_w() == pytest.approx(1800.0)


def test_power_w_is_mean_power_over_the_intervals():
    state = ChannelState(wh=2.0, intervals_ns=[1 * S, 3 * S])
    assert state.power_w() == pytest.approx(2 * 2 * 3600 / 4)


# --- set_total ------------------------------------------------------------------------------------

def test_set_total_returns_the_previous_total_and_counting_continues(ledger: Ledger):
    ledger.apply(pulse(1, 0))
    assert ledger.set_total("main", "active", 5_000_000_000) == 1_000_000
    assert total(ledger) == 5_000_000_000
    assert ledger.apply(pulse(1, 0)) == 0  # the epoch cursor survives calibration
    ledger.apply(pulse(2, 1))
    assert total(ledger) == 5_001_000_000


def test_set_total_on_an_unseen_channel(ledger: Ledger):
    assert ledger.set_total("garage", "reactive", 42) == 0
    assert total(ledger, "garage", "reactive") == 42


def test_set_total_rejects_bad_channel_and_negative_total(ledger: Ledger):
    with pytest.raises(ValueError, match="channel"):
        ledger.set_total("main", "apparent", 1)
    with pytest.raises(ValueError, match="negative"):
        ledger.set_total("main", "active", -1)
    assert total(ledger) == 0


# --- persistence ----------------------------------------------------------------------------------

def busy_ledger() -> Ledger:
    ledger = Ledger(max_power_w=MAX_W, smoothing_pulses=2, fixed_wh=True)
    for seq, t in enumerate([0, 1.2, 2.4, 3.0], start=1):
        ledger.apply(pulse(seq, t, epoch="aa"))
    ledger.apply(pulse(2, 10, epoch="bb"))
    ledger.apply(pulse(7, 5, meter="garage", channel="reactive", wh=0.5))
    ledger.set_total("main", "reactive", 123)
    return ledger


def test_to_json_is_plain_json(ledger: Ledger):
    doc = busy_ledger().to_json()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["meters"]["main"]["active"]["epochs"]["aa"] == [4, T0 + 3 * S, T0 + 3 * S, None, T0 + 3 * S, T0]


def test_json_roundtrip_preserves_state_and_behaviour():
    original = busy_ledger()
    doc = json.loads(json.dumps(original.to_json()))
    restored = Ledger.from_json(doc, max_power_w=MAX_W, smoothing_pulses=2, fixed_wh=True)
    assert restored.to_json() == original.to_json()
    # Same answers to the same next pulses.
    for p in [pulse(2, 10, epoch="bb"), pulse(3, 11, epoch="bb"), pulse(8, 12, meter="garage", channel="reactive",
                                                                         wh=0.5)]:
        assert restored.apply(p) == original.apply(p)
    assert restored.to_json() == original.to_json()
    assert restored.channel("main", "active").power_w() == original.channel("main", "active").power_w()


def test_from_json_of_an_empty_ledger():
    restored = Ledger.from_json({"meters": {}}, max_power_w=MAX_W, fixed_wh=True)
    assert list(restored) == []
    assert restored.max_power_w == MAX_W


def test_from_json_uses_the_given_limits():
    restored = Ledger.from_json(busy_ledger().to_json(), max_power_w=5, smoothing_pulses=4)
    assert (restored.max_power_w, restored.smoothing_pulses) == (5, 4)


def channel_doc() -> dict[str, Any]:
    return {"total_uwh": 1, "epochs": {"aa": [1, 2]}, "last_ts_ns": 2, "wh": 1.0, "intervals_ns": [3]}


def test_channel_from_json_reads_cursors():
    state = ChannelState.from_json(channel_doc())
    assert state.epochs == {"aa": Cursor(1, 2, 2)}  # the short form of older versions: trusted
    assert state.total_uwh == 1 and state.intervals_ns == [3]


def test_channel_from_json_reads_the_four_item_cursors_of_the_previous_version():
    state = ChannelState.from_json({**channel_doc(), "epochs": {"aa": [5, 20, 10, None]}})
    assert state.epochs["aa"].latest_counted_ns() == 20  # its own time: the check of that version


def test_channel_from_json_accepts_null_last_ts():
    assert ChannelState.from_json({**channel_doc(), "last_ts_ns": None}).last_ts_ns is None


def with_channel(changes: dict[str, Any], remove: str | None = None) -> dict[str, Any]:
    state = {**channel_doc(), **changes}
    if remove:
        del state[remove]
    return {"meters": {"main": {"active": state}}}


@pytest.mark.parametrize("doc", [
    {},
    [],
    {"meters": {"main": {"apparent": channel_doc()}}},
    {"meters": {"main": {"active": []}}},
    with_channel({}, remove="total_uwh"),
    with_channel({}, remove="epochs"),
    with_channel({}, remove="wh"),
    with_channel({"total_uwh": "1"}),
    with_channel({"total_uwh": 1.5}),
    with_channel({"total_uwh": True}),
    with_channel({"epochs": {"aa": [1]}}),
    with_channel({"epochs": {"aa": [1, 2, 3]}}),
    with_channel({"epochs": {"aa": [1, 2, 2, None, 2, 2, 2]}}),
    with_channel({"epochs": {"aa": [1, 2, 2, None, "2"]}}),
    with_channel({"epochs": {"aa": ["1", 2]}}),
    with_channel({"epochs": {"aa": 5}}),
    with_channel({"last_ts_ns": 1.5}),
    with_channel({"wh": "lots"}),
    with_channel({"wh": None}),
    with_channel({"intervals_ns": [1.5]}),
    with_channel({"intervals_ns": 3}),
], ids=lambda d: json.dumps(d)[:60])
def test_from_json_rejects_malformed_documents(doc: Any):
    with pytest.raises((KeyError, TypeError, ValueError)):
        Ledger.from_json(copy.deepcopy(doc), max_power_w=MAX_W)


@pytest.mark.parametrize("doc", [{"meters": []}, with_channel({"epochs": []})], ids=["meters", "epochs"])
def test_from_json_rejects_non_object_containers_with_documented_errors(doc: Any):
    with pytest.raises((KeyError, TypeError, ValueError)):
        Ledger.from_json(doc, max_power_w=MAX_W, fixed_wh=True)


# --- the central property: exact totals however the broker delivers -------------------------------

@dataclass(frozen=True)
class Epoch:
    name: str
    wh: float
    pulses: tuple[Pulse, ...]


WH_CHOICES = [0.1, 0.25, 0.5, 1.0, 1.0, 1.0, 2.0, 10.0]


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[Epoch], list[Pulse]]:
    """Several epochs, delivered in epoch order with drops, local reordering and duplicates."""
    epochs: list[Epoch] = []
    now = T0
    wh = draw(st.sampled_from(WH_CHOICES))  # a channel's energy per pulse is fixed
    for index in range(draw(st.integers(1, 4))):
        # The shortest interval keeps the implied power at or below half the limit.
        min_ns = -(-round(wh * 3600 * S) // round(MAX_W / 2))
        gaps = draw(st.lists(st.integers(min_ns, min_ns * 2000), min_size=1, max_size=25))
        name = f"{index:x}" + draw(st.sampled_from(["a", "b", "0f", "c3"]))
        pulses = []
        for seq, gap in enumerate(gaps, start=1):
            now += gap
            pulses.append(Pulse("main", "active", name, seq, now, wh))
        epochs.append(Epoch(name, wh, tuple(pulses)))

    stream: list[Pulse] = []
    for epoch in epochs:
        n = len(epoch.pulses)
        keep = draw(st.lists(st.booleans(), min_size=n - 1, max_size=n - 1))
        kept = [p for p, k in zip(epoch.pulses, keep, strict=False) if k] + [epoch.pulses[-1]]
        if len(kept) > 1:  # local reordering: a few adjacent swaps
            for i in draw(st.lists(st.integers(0, len(kept) - 2), max_size=len(kept))):
                kept[i], kept[i + 1] = kept[i + 1], kept[i]
        # Duplicates of anything already delivered, drawn as fractions of the stream so far.
        dups = draw(st.lists(st.lists(st.floats(0, 1, exclude_max=True), max_size=2),
                             min_size=len(kept), max_size=len(kept)))
        for p, before in zip(kept, dups, strict=True):
            stream.extend(stream[int(f * len(stream))] for f in before if stream)
            stream.append(p)
    for f in draw(st.lists(st.floats(0, 1, exclude_max=True), max_size=3)):
        stream.append(stream[int(f * len(stream))])
    return epochs, stream


@settings(max_examples=200, deadline=None)
@given(deliveries())
def test_total_is_exact_under_duplicates_drops_and_reordering(case: tuple[list[Epoch], list[Pulse]]):
    epochs, stream = case
    ledger = Ledger(max_power_w=MAX_W, fixed_wh=True)
    totals = []
    counted = 0
    for p in stream:
        counted += ledger.apply(p)
        totals.append(total(ledger))
    assert totals == sorted(totals), "the total decreased"
    assert counted == sum(len(e.pulses) for e in epochs)
    assert total(ledger) == sum(len(e.pulses) * round(e.wh * 1_000_000) for e in epochs)


@settings(max_examples=200, deadline=None)
@given(deliveries(), st.data())
def test_total_is_exact_across_a_save_and_restore_at_any_point(case: tuple[list[Epoch], list[Pulse]],
                                                              data: st.DataObject):
    epochs, stream = case
    cut = data.draw(st.integers(0, len(stream)))
    ledger = Ledger(max_power_w=MAX_W, fixed_wh=True)
    for p in stream[:cut]:
        ledger.apply(p)
    ledger = Ledger.from_json(json.loads(json.dumps(ledger.to_json())), max_power_w=MAX_W, fixed_wh=True)
    for p in stream[cut:]:
        ledger.apply(p)
    assert total(ledger) == sum(len(e.pulses) * round(e.wh * 1_000_000) for e in epochs)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-2 * 365 * 86_400 * S, 2 * 365 * 86_400 * S), min_size=1, max_size=25), st.data())
def test_a_resent_pulse_is_a_duplicate_and_a_reused_seq_refused_however_the_clock_stepped(
        steps_ns: list[int], data: st.DataObject):
    """The edge's clock may step either way between pulses, so times need not grow with seq (the writer
    receives them a second apart: its clock vouches for those whose times it cannot trust)."""
    ledger = Ledger(max_power_w=MAX_W, fixed_wh=True)
    sent = []
    ts = T0
    for seq, step in enumerate(steps_ns, start=1):
        ts += S + step
        sent.append(Pulse("main", "active", "aa", seq, ts, 1.0))
        ledger.apply(sent[-1], now_ns=T0 + seq * S)
    if data.draw(st.booleans(), label="saved and restored"):
        ledger = Ledger.from_json(json.loads(json.dumps(ledger.to_json())), max_power_w=MAX_W, fixed_wh=True)
    before = snapshot(ledger)
    for resent in data.draw(st.lists(st.sampled_from(sent), max_size=10), label="resent"):
        assert ledger.apply(resent, now_ns=T0) == 0
    assert snapshot(ledger) == before
    seq = data.draw(st.integers(1, len(sent)), label="reused seq")
    later = max(p.ts_ns for p in sent) + data.draw(st.integers(1, 3600 * S), label="after the latest")
    with pytest.raises(Implausible, match="restored from a backup"):
        ledger.apply(Pulse("main", "active", "aa", seq, later, 1.0), now_ns=T0)
    assert total(ledger) == len(sent) * 1_000_000


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(S // 1000, 10 * 3600 * S), min_size=2, max_size=20),
       st.integers(1, 5), st.sampled_from(WH_CHOICES))
def test_power_of_in_order_pulses_is_the_mean_of_the_last_intervals(intervals: list[int], smoothing: int,
                                                                    wh: float):
    ledger = Ledger(max_power_w=10**12, smoothing_pulses=smoothing, fixed_wh=True)
    ts = T0
    ledger.apply(Pulse("main", "active", "aa", 1, ts, wh))
    for seq, gap in enumerate(intervals, start=2):
        ts += gap
        ledger.apply(Pulse("main", "active", "aa", seq, ts, wh))
    window = intervals[-smoothing:]
    assert ledger.channel("main", "active").power_w() == pytest.approx(len(window) * wh * 3600 * S / sum(window))


def test_a_channel_keeps_a_bounded_number_of_epochs_dropping_the_least_recently_counted():
    ledger = Ledger(max_power_w=MAX_W, fixed_wh=True)
    for n in range(EPOCHS_KEPT + 4):
        ledger.apply(pulse(1, n, epoch=f"{n:x}0"), T0 + n * S)
    epochs = ledger.channel("main", "active").epochs
    assert list(epochs) == [f"{n:x}0" for n in range(4, EPOCHS_KEPT + 4)]
    assert total(ledger) == (EPOCHS_KEPT + 4) * 1_000_000


def test_admission_is_kept_and_forget_drops_a_meter():
    ledger = Ledger(max_power_w=MAX_W, fixed_wh=True)
    assert ledger.admit("garage", T0) and not ledger.admit("garage", T0 + S)
    ledger.apply(pulse(1, 0, meter="garage"), T0)
    restored = Ledger.from_json(json.loads(json.dumps(ledger.to_json())), max_power_w=MAX_W, fixed_wh=True)
    assert restored.admitted_ns("garage") == T0
    assert restored.forget("garage") == ["active"]
    assert restored.meters() == [] and not restored.is_known("garage")


def test_set_pulse_energy_is_applied_once_per_command():
    ledger = Ledger(max_power_w=MAX_W, fixed_wh=True)
    ledger.apply(pulse(1, 0))
    assert ledger.set_pulse_energy("main", "active", 0.5, command_id="ab") == 1.0
    assert ledger.set_pulse_energy("main", "active", 2.0, command_id="ab") is None
    assert ledger.apply(pulse(2, 1, wh=0.5)) == 1
    assert total(ledger) == 1_500_000
    with pytest.raises(ValueError, match="wh must be"):
        ledger.set_pulse_energy("main", "active", 1e-9)
