"""Valid-looking messages that must not move a total: unknown meters, wild seqs, another energy per pulse,
two edges on one meter id. Through the ledger (properties), the writer's batch handler and the real writer."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pika
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.ledger import EPOCHS_KEPT, Implausible, Ledger, wh_to_uwh
from backend.state_store import StateStore
from backend.writer import UNKNOWN_REPORTED
from common.message import ForgetMeter, Pulse, SetPulseEnergy, SetTotal, encode, encode_control
from common.topology import ERROR_HEADER, dead_letter_queue
from edge.outbox import Outbox
from tests.support import (
    T0,
    MqttWatcher,
    Names,
    S,
    amqp_parameters,
    deliveries,
    free_port,
    publish,
    pulse,
    queue_depth,
    run_emdc,
    start_writer,
    wait_until,
    writer_env,
)
from tests.test_writer import FakeClock, make_writer

MAX_W = 100_000.0
HOUR = 3600 * S


def control(command: SetTotal | SetPulseEnergy | ForgetMeter, tag: int = 1) -> list:
    from backend.batch import Delivery

    return [Delivery(tag, command.routing_key, encode_control(command))]


# --- the ledger under attack (properties) ---------------------------------------------------------

GENUINE_WH = 1.0


@st.composite
def attack(draw: st.DrawFn) -> list[tuple[int, Pulse]]:
    """A genuine Pi's pulses on main/active (with restarts) as (writer clock, pulse), hostile ones between."""
    events: list[tuple[int, Pulse]] = []
    now, epoch, seq = T0, "a0", 0
    flood_seq = 0  # the counter of a flooding Pi, meter "fl"
    for step in range(draw(st.integers(1, 40))):
        if draw(st.integers(0, 9)) == 0:  # the Pi restarts uncleanly: a new epoch from seq 1
            epoch, seq = f"a{step + 1:x}", 0
        now += draw(st.integers(S // 10, 600 * S))
        seq += 1
        events.append((now + draw(st.integers(0, S)), Pulse("main", "active", epoch, seq, now, GENUINE_WH)))
        for _ in range(draw(st.integers(0, 2))):
            events.append((now + S, draw(hostile(epoch, seq, now))))
        if draw(st.integers(0, 3)) == 0:  # consecutive one-pulse messages, faster than any meter
            received, ts = now + S, now + draw(st.integers(-S, S))
            synced = draw(st.sampled_from([None, True, False]))
            for _ in range(draw(st.integers(1, 300))):
                flood_seq += 1
                received += draw(st.sampled_from([0, 1, 1_000_000]))
                ts += draw(st.sampled_from([0, 1, 1_000_000, 10_000_000]))
                events.append((received, Pulse("fl", "active", "f", flood_seq, ts, GENUINE_WH, synced)))
    return events


@st.composite
def hostile(draw: st.DrawFn, epoch: str, seq: int, now: int) -> Pulse:
    kind = draw(st.sampled_from(["huge seq", "other wh", "new epoch", "other channel", "other meter"]))
    ts = draw(st.integers(T0, now + 10 * S))
    synced = draw(st.sampled_from([None, True, False]))
    epoch_ns = draw(st.none() | st.integers(1, now))
    huge = draw(st.integers(2**50, 2**63 - 1))
    wh = draw(st.sampled_from([1e-300, 1e-7, 0.5, 2.0, 1000.0]))
    if kind == "huge seq":
        return Pulse("main", "active", draw(st.sampled_from([epoch, "a0", "a1"])), huge, ts, GENUINE_WH, synced,
                     epoch_ns)
    if kind == "other wh":
        return Pulse("main", "active", epoch, draw(st.integers(1, seq + 5)), ts, wh, synced, epoch_ns)
    if kind == "new epoch":
        return Pulse("main", "active", "bad", huge, ts, draw(st.sampled_from([GENUINE_WH, wh])), synced, epoch_ns)
    seq_any = draw(st.integers(1, 2**63 - 1))
    if kind == "other channel":
        return Pulse("main", "reactive", "bad", seq_any, ts, wh, synced, epoch_ns)
    return Pulse(f"x{draw(st.integers(0, 3))}", "active", "bad", seq_any, ts, wh, synced, epoch_ns)


class Bound:
    """What a channel may have been credited in all, kept independently of the ledger: the limit over the time
    from its meter's admission (or, by the edge's word, the start of its first counted epoch) to the latest
    of the writer's clock and the trusted timestamps counted, plus a pulse of slack on each clock."""

    def __init__(self, admitted_ns: int) -> None:
        self.start_ns = admitted_ns
        self.latest_ns = admitted_ns
        self.trusted_ns: int | None = None  # the latest trusted timestamp (a later one is needed to be trusted)
        self.counted = False

    def trusts(self, pulse: Pulse, now: int) -> bool:
        return (pulse.synced is not False and pulse.ts_ns <= now + 600 * S
                and (self.trusted_ns is None or pulse.ts_ns > self.trusted_ns))

    def allowed_uwh(self, pulse: Pulse, now: int, pulse_uwh: int) -> float:
        start, latest = self.start_ns, max(self.latest_ns, now)
        if self.trusts(pulse, now):
            latest = max(latest, pulse.ts_ns)
            if not self.counted and pulse.epoch_ns is not None and pulse.epoch_ns < pulse.ts_ns:
                start = min(start, pulse.epoch_ns)
        return MAX_W * (latest - start) / HOUR * 1_000_000 * (1 + 1e-9) + 2 * pulse_uwh + 1

    def counted_at(self, pulse: Pulse, now: int) -> None:
        if self.trusts(pulse, now):
            self.latest_ns = max(self.latest_ns, now, pulse.ts_ns)
            if not self.counted and pulse.epoch_ns is not None and pulse.epoch_ns < pulse.ts_ns:
                self.start_ns = min(self.start_ns, pulse.epoch_ns)
            self.trusted_ns = pulse.ts_ns
        self.latest_ns = max(self.latest_ns, now)
        self.counted = True


@settings(max_examples=300, deadline=None)
@given(attack())
def test_hostile_messages_leave_the_genuine_total_exact_and_no_total_beats_physics(
        events: list[tuple[int, Pulse]]) -> None:
    ledger = Ledger(MAX_W, fixed_wh=True)
    for meter in ["main", "x0", "x1", "x2", "x3", "fl"]:
        ledger.admit(meter, T0)
    bounds: dict[tuple[str, str], Bound] = {}
    fixed_wh: dict[tuple[str, str], float] = {}
    genuine = 0
    for now, p in events:
        key = (p.meter, p.channel)
        bound = bounds.setdefault(key, Bound(T0))
        before = ledger.channel(*key).total_uwh
        try:
            new = ledger.apply(p, now)
        except ValueError:
            continue
        total = ledger.channel(*key).total_uwh
        if p.meter == "main" and p.channel == "active" and p.wh == GENUINE_WH and p.epoch != "bad":
            genuine += new
        if new:
            wh = fixed_wh.setdefault(key, p.wh)
            assert total - before == new * wh_to_uwh(wh), "counted with another energy per pulse than the channel's"
            assert total <= bound.allowed_uwh(p, now, wh_to_uwh(wh)), f"{p} brings the total to {total} uWh"
            bound.counted_at(p, now)
    genuine_sent = sum(1 for _, p in events if p.meter == "main" and p.channel == "active" and p.epoch != "bad"
                       and p.wh == GENUINE_WH and p.seq < 2**50)
    assert genuine == genuine_sent
    assert ledger.channel("main", "active").total_uwh == genuine_sent * wh_to_uwh(GENUINE_WH)
    assert all(len(state.epochs) <= EPOCHS_KEPT for _, state in ledger)


@settings(max_examples=200, deadline=None)
@given(count=st.integers(2, 3000), ts_step=st.sampled_from([0, 1, 1_000_000, 10_000_000]),
       received_step=st.sampled_from([0, 1, 1_000, 1_000_000]),
       synced=st.sampled_from([None, True, False, "alternating"]),
       quiet=st.integers(0, 60 * S), ahead=st.integers(-HOUR, 600 * S))
def test_a_flood_of_consecutive_pulses_is_credited_no_faster_than_the_limit(
        count: int, ts_step: int, received_step: int, synced: bool | str | None, quiet: int, ahead: int) -> None:
    """One-pulse messages, each seq+1: however they are stamped, the total grows by at most the limit over
    the time that passed (by the writer's clock, or the edge's, which may run up to max_clock_ahead ahead),
    plus a pulse; the rest is refused with the reason, and the channel counts on once time has passed.
    "alternating" interleaves pulses the edge's clock may vouch for with ones only the writer's can judge."""
    ledger = Ledger(MAX_W, fixed_wh=True)
    ledger.admit("main", T0)
    for seq in range(1, 4):  # the genuine meter: 1 Wh a second
        assert ledger.apply(Pulse("main", "active", "e1", seq, T0 + seq * S, 1.0), T0 + seq * S) == 1
    received, ts = T0 + 3 * S + quiet, T0 + 3 * S + quiet + ahead
    refused: list[str] = []
    for seq in range(4, 4 + count):
        received += received_step
        ts += ts_step
        try:
            claim = (None if seq % 2 == 0 else False) if isinstance(synced, str) else synced
            ledger.apply(Pulse("main", "active", "e1", seq, ts, 1.0, claim), received)
        except Implausible as exc:
            refused.append(str(exc))
    credited_wh = ledger.channel("main", "active").total_uwh / 1_000_000 - 3
    edge_s = max(0, ts - (T0 + 3 * S)) / S if synced is not False else 0
    elapsed_s = min(max(edge_s, (received - (T0 + 3 * S)) / S), (received - (T0 + 3 * S)) / S + 600)
    assert credited_wh <= MAX_W * elapsed_s / 3600 + 2, f"{credited_wh} Wh in {elapsed_s} s"
    if refused:
        assert "limit" in refused[0], refused[0]
    later = received + HOUR
    last = ledger.channel("main", "active").epochs["e1"].seq
    assert ledger.apply(Pulse("main", "active", "e1", last + 1, max(ts, later) + 1, 1.0), later) == 1


def test_the_probe_of_10_kwh_in_10_ms_is_held_back(tmp_path: Path) -> None:
    """The reviewer's probe: 10,000 one-pulse messages of 1 Wh within 10 ms, a second after the last pulse."""
    writer, _, clock = genuine_writer(tmp_path)
    flood = [Pulse("main", "active", "e1", seq, T0 + 3 * S + (seq - 4) * 1_000, 1.0) for seq in range(4, 10_004)]
    clock.now += S
    dead = writer.handle_batch(deliveries(*flood))
    credited_wh = main_total(writer) / 1_000_000 - 3
    assert credited_wh <= MAX_W * 1.01 / 3600 + 1, f"{credited_wh} Wh credited"
    assert len(dead) == 10_000 - credited_wh
    assert "faster than the 100 kW limit" in dead[0].reason
    assert writer.ledger.channel("main", "active").held_back == len(dead)
    # A person who finds them genuine readmits them (`emdc dead-letters readmit`): counted, and the meter counts on.
    clock.now += S
    assert writer.handle_batch([replace(d.delivery, readmitted=True) for d in dead]) == []
    assert main_total(writer) == 10_003_000_000
    clock.now += S
    assert writer.handle_batch(deliveries(pulse(10_004, 5))) == []


def test_genuine_backlogs_and_bursts_count_exactly() -> None:
    """What a real meter sends must all count: an outage's backlog received at once (its times trusted or not),
    a burst at 90 % of the limit, and a backlog stamped by a clock that stepped back during the outage."""
    ledger = Ledger(MAX_W, fixed_wh=True)
    ledger.admit("main", T0)
    now, seq = T0, 0

    def send(count: int, interval_ns: int, *, received_at: int | None = None, ts_shift: int = 0,
             synced: bool | None = None) -> None:
        nonlocal now, seq
        for _ in range(count):
            now += interval_ns
            seq += 1
            at = now if received_at is None else received_at
            assert ledger.apply(Pulse("main", "active", "e1", seq, now + ts_shift, 1.0, synced), at) == 1

    send(100, 3 * S)  # 1.2 kW, live
    send(3000, round(36 * S / 1000 / 0.9))  # 90 kW for two minutes, live
    outage_end = now + 3600 * S  # an hour at 3.6 kW: received when the network returns
    send(3600, S, received_at=outage_end)
    now = outage_end
    send(50, S)
    untrusted_end = now + 3600 * S  # the same with the edge's clock unsynchronised
    send(3600, S, received_at=untrusted_end, synced=False)
    now = untrusted_end
    send(50, S)
    assert ledger.channel("main", "active").total_uwh == seq * 1_000_000


# --- the writer's batch handler, the cases of a hostile edge account --------------------------------

def test_a_first_message_at_seq_2_63_on_a_new_channel_is_dead_lettered(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    writer, _ = make_writer(tmp_path, clock)
    clock.now += 10 * S
    wild = Pulse("main", "reactive", "e9", 2**63 - 1, T0 + 5 * S, 1000.0)
    [dead] = writer.handle_batch(deliveries(wild, pulse(1, 9)))
    assert "on a channel with no history" in dead.reason and "kW limit" in dead.reason
    assert writer.ledger.channel("main", "reactive").epochs == {}
    assert writer.handle_batch(deliveries(pulse(1, 9.5, channel="reactive"))) == []  # not frozen
    assert writer.ledger.channel("main", "reactive").total_uwh == 1_000_000


def genuine_writer(tmp_path: Path, **settings_: str):
    """A writer that has counted main/active seqs 1-3 (1 Wh each, a second apart), its clock at the last one."""
    clock = FakeClock(T0)
    writer, sink = make_writer(tmp_path, clock, **settings_)
    clock.now = T0 + 2 * S
    assert writer.handle_batch(deliveries(pulse(1, 0), pulse(2, 1), pulse(3, 2))) == []
    return writer, sink, clock


def main_total(writer) -> int:
    return writer.ledger.channel("main", "active").total_uwh


def test_cursor_poisoning_is_dead_lettered_and_the_meter_counts_on(tmp_path: Path) -> None:
    writer, _, clock = genuine_writer(tmp_path)
    clock.now += S
    dead = writer.handle_batch(deliveries(pulse(2**62, 2.5, wh=1e-300), pulse(2**62, 2.6), pulse(4, 3)))
    assert len(dead) == 2
    assert "wh 1e-300 differs from the channel's 1 per pulse" in dead[0].reason
    assert "emdc state set-pulse-energy --meter main --channel active" in dead[0].reason
    assert "kW limit" in dead[1].reason
    clock.now += S
    assert writer.handle_batch(deliveries(pulse(5, 4))) == []
    assert main_total(writer) == 5_000_000


def test_a_new_epoch_of_1_kwh_pulses_after_an_hour_is_dead_lettered(tmp_path: Path) -> None:
    writer, _, clock = genuine_writer(tmp_path)
    clock.now += HOUR
    inflated = pulse(116, 3602, epoch="e2", wh=1000.0)  # 116 kWh at once
    fast = pulse(116_000, 3602, epoch="e3")  # the same with the channel's 1 Wh: 116 kW for an hour
    dead = writer.handle_batch(deliveries(inflated, fast, pulse(4, 3602)))
    assert "wh 1000 differs" in dead[0].reason and "new epoch e3 starting at seq 116000" in dead[1].reason
    assert main_total(writer) == 4_000_000


def test_a_flood_of_new_meter_ids_grows_nothing_and_announces_nothing(tmp_path: Path, caplog) -> None:
    writer, sink, _ = genuine_writer(tmp_path, EMDC_DISCOVERY="device")
    before = len(sink.log)
    caplog.set_level(logging.WARNING, "emdc.writer")
    for start in range(0, 5000, 500):
        batch = [Pulse(f"m{i}", channel, "e1", 2**40, T0 + 3 * S, 1000.0)
                 for i in range(start, start + 500) for channel in ("active", "reactive")]
        dead = writer.handle_batch(deliveries(*batch))
        assert len(dead) == len(batch)
    assert "not one this writer counts (main)" in dead[0].reason and "EMDC_METERS" in dead[0].reason
    assert writer.ledger.meters() == ["main"]
    assert sink.log[before:] == [], "no discovery, no value for an unknown meter"
    saved = StateStore(tmp_path).load()
    assert saved is not None
    assert list(saved["meters"]) == ["main"] and list(saved["admitted"]) == ["main"]
    assert len(writer.admission._reported) == UNKNOWN_REPORTED
    lines = [r.getMessage() for r in caplog.records if "logged once per meter" in r.getMessage()]
    assert len(lines) == UNKNOWN_REPORTED and "'m0'" in lines[0]
    writer.handle_batch(deliveries(Pulse("m0", "active", "e1", 1, T0, 1.0)))
    assert len([r for r in caplog.records if "logged once per meter" in r.getMessage()]) == UNKNOWN_REPORTED
    writer.publish_all()
    assert {t for t, _ in sink.log} == {"homeassistant/device/emdc_main/config", "home/energy/active_energy",
                                       "home/energy/active_power"}


def test_new_meters_are_admitted_automatically_only_up_to_the_cap(tmp_path: Path) -> None:
    writer, _, clock = genuine_writer(tmp_path, EMDC_ADMIT_NEW_METERS="2")
    dead = writer.handle_batch(deliveries(*(pulse(1, 2, meter=m) for m in ("garage", "shed", "attic"))))
    assert [d.delivery.routing_key for d in dead] == ["pulse.attic.active"]
    assert writer.ledger.meters() == ["garage", "main", "shed"]
    assert writer.ledger.admitted_ns("garage") == clock.now


def test_a_calibration_admits_a_meter_and_forget_drops_it_with_its_device(tmp_path: Path) -> None:
    writer, sink, _ = genuine_writer(tmp_path, EMDC_DISCOVERY="device")
    assert writer.handle_batch(control(SetTotal("garage", "active", Decimal(5), T0, "c1"))) == []
    assert writer.handle_batch(deliveries(pulse(1, 2, meter="garage"))) == []
    assert sink.retained["home/energy/garage/active_energy"] == "5.001"
    assert writer.handle_batch(control(ForgetMeter("garage", "f1"))) == []
    assert writer.ledger.meters() == ["main"]
    assert sink.retained["homeassistant/device/emdc_garage/config"] == ""
    assert sink.retained["home/energy/garage/active_energy"] == ""
    [dead] = writer.handle_batch(deliveries(pulse(2, 3, meter="garage")))
    assert "not one this writer counts" in dead.reason
    [refused] = writer.handle_batch(control(ForgetMeter("main", "f2")))
    assert "in the meters setting" in refused.reason and main_total(writer) == 3_000_000


def test_a_forget_in_the_batch_of_the_meters_last_pulses_keeps_it_forgotten(tmp_path: Path) -> None:
    writer, sink, _ = genuine_writer(tmp_path, EMDC_DISCOVERY="device")
    assert writer.handle_batch(control(SetTotal("garage", "active", Decimal(5), T0, "c1"))) == []
    batch = [*deliveries(pulse(1, 2, meter="garage")), *control(ForgetMeter("garage", "f1"), tag=2)]
    assert writer.handle_batch(batch) == []
    assert writer.ledger.meters() == ["main"], "publishing the batch brought the meter back"
    assert sink.retained["homeassistant/device/emdc_garage/config"] == ""
    assert sink.retained["home/energy/garage/active_energy"] == ""
    [dead] = writer.handle_batch(deliveries(pulse(40_000, 3, meter="garage")))
    assert "not one this writer counts" in dead.reason


def test_an_energy_per_pulse_set_before_the_first_pulse_still_publishes_the_zero_first(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    writer, sink = make_writer(tmp_path, clock, EMDC_DISCOVERY="off")
    assert writer.handle_batch(control(SetPulseEnergy("main", "active", 0.5, "d1"))) == []
    clock.now = T0 + 2 * S
    assert writer.handle_batch(deliveries(pulse(1, 1, wh=0.5))) == []
    energy = [payload for topic, payload in sink.log if topic == "home/energy/active_energy"]
    assert energy[:2] == ["0", "0.0005"], "Home Assistant takes the first value as the zero point"


def test_a_configured_energy_per_pulse_holds_a_channels_first_pulse_to_it(tmp_path: Path, caplog) -> None:
    clock = FakeClock(T0 + 2 * S)
    writer, _ = make_writer(tmp_path, clock, EMDC_WH_PER_PULSE="0.1")  # the meter's 10,000 imp/kWh
    [dead] = writer.handle_batch(deliveries(pulse(1, 0, wh=1000)))  # before, the first pulse said what counts
    assert "wh 1000 differs from the channel's 0.1 per pulse" in dead.reason
    assert writer.handle_batch(deliveries(pulse(1, 1, wh=0.1))) == []
    assert main_total(writer) == 100_000
    # Without the setting, the first pulse fixes it, as a Pi configured on its own says.
    other, _ = make_writer(tmp_path / "unset", clock)
    assert other.handle_batch(deliveries(pulse(1, 1, wh=0.5))) == [] and main_total(other) == 500_000
    # A saved state that holds another is kept, with one warning.
    caplog.set_level(logging.WARNING, "emdc.writer")
    make_writer(tmp_path / "unset", clock, EMDC_WH_PER_PULSE="0.1")
    assert "main/active: the configuration says 0.1 per pulse, the saved state 0.5" in caplog.text


def test_another_energy_per_pulse_counts_once_the_command_changed_it(tmp_path: Path) -> None:
    writer, _, clock = genuine_writer(tmp_path)
    clock.now += S
    half = pulse(4, 3, wh=0.5)
    [dead] = writer.handle_batch(deliveries(half))
    assert writer.handle_batch(control(SetPulseEnergy("main", "active", 0.5, "d1"))) == []
    assert writer.handle_batch([replace(dead.delivery, readmitted=True)]) == []
    assert main_total(writer) == 3_500_000
    assert writer.handle_batch(deliveries(pulse(5, 4))) != [], "1 Wh is now the other energy per pulse"


def test_two_pis_on_one_meter_id_are_refused_loudly_once_per_channel(tmp_path: Path, caplog) -> None:
    writer, _, clock = genuine_writer(tmp_path)
    caplog.set_level(logging.ERROR, "emdc.writer")
    clock.now += 10 * S
    # The second Pi's first pulse is indistinguishable from a restart of the first: counted. The first Pi counts
    # on after it, which tells: the second Pi is held back from then on, the first counts on.
    assert writer.handle_batch(deliveries(pulse(1, 3, epoch="e2"))) == []
    dead = writer.handle_batch(deliveries(pulse(4, 4), pulse(5, 5), pulse(2, 6, epoch="e2"), pulse(3, 7, epoch="e2")))
    assert len(dead) == 2
    assert "epoch e2 of main/active was found to run beside another epoch" in dead[0].reason
    assert "give each Pi its own meter_id" in dead[0].reason
    assert len([r for r in caplog.records if "two edges count under meter id 'main'" in r.getMessage()]) == 1
    assert main_total(writer) == 6_000_000  # the first Pi's five pulses and the second's first
    assert writer.handle_batch(deliveries(pulse(6, 8))) == []


def test_a_second_pi_that_says_when_its_epoch_began_is_refused_from_its_first_pulse(tmp_path: Path) -> None:
    writer, _, clock = genuine_writer(tmp_path)
    clock.now = T0 + 100 * S
    assert writer.handle_batch(deliveries(*(pulse(seq, seq - 1) for seq in range(4, 101)))) == []
    # EMDC's edge states when its epoch began: the second Pi's began long before the first Pi's last pulse.
    second = [Pulse("main", "active", "e2", seq, T0 + round((99.5 + seq) * S), 1.0, epoch_ns=T0) for seq in (1, 2)]
    clock.now = T0 + 102 * S
    dead = writer.handle_batch(deliveries(*second, pulse(101, 100), pulse(102, 101)))
    assert [d.delivery.routing_key for d in dead] == ["pulse.main.active"] * 2
    assert all("began 99 s before the last pulse of epoch e1" in d.reason for d in dead)
    assert main_total(writer) == 102_000_000, "the first Pi's pulses, exactly"


def test_an_old_epoch_backlog_ahead_of_the_new_epoch_counts(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    writer, _ = make_writer(tmp_path, clock)
    clock.now += HOUR  # the Pi was offline; it restarted uncleanly and sends its outbox in order
    batch = [pulse(1, 0), pulse(2, 1), pulse(3, 2), pulse(1, 10, epoch="e2"), pulse(2, 11, epoch="e2")]
    assert writer.handle_batch(deliveries(*batch)) == []
    assert main_total(writer) == 5_000_000


def test_a_cloned_counter_store_is_refused_not_silently_dropped(tmp_path: Path) -> None:
    writer, _, clock = genuine_writer(tmp_path)
    clock.now += S
    # The clone sends the same epoch's seq 3 at another time, and seq 2 after the original's last pulse.
    dead = writer.handle_batch(deliveries(pulse(3, 1.5), pulse(2, 2.5)))
    assert "was counted with ts_ns" in dead[0].reason and "cloned SD card" in dead[0].reason
    assert "copied to a second Pi" in dead[1].reason
    assert writer.handle_batch(deliveries(pulse(3, 2))) == [], "a resend is still a duplicate"
    assert main_total(writer) == 3_000_000


def test_the_edges_epoch_start_lets_a_new_channel_begin_high(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    writer, _ = make_writer(tmp_path, clock)  # the writer's state was lost; the Pi counted for two hours
    clock.now += S
    late = pulse(5000, 0)
    [dead] = writer.handle_batch(deliveries(late))
    assert "on a channel with no history" in dead.reason
    assert writer.handle_batch(deliveries(replace(late, epoch_ns=T0 - 2 * HOUR))) == []  # 2.5 kW: plausible
    assert main_total(writer) == 5_000_000_000


def test_a_state_file_of_an_older_version_loads_and_holds_its_channels_to_their_energy(tmp_path: Path) -> None:
    channel = {"total_uwh": 7_000_000, "epochs": {"e1": [7, T0 + 7 * S]}, "last_ts_ns": T0 + 7 * S, "wh": 1.0,
               "intervals_ns": []}
    untimed = {**channel, "last_ts_ns": None}
    doc = {"meters": {"main": {"active": channel, "reactive": untimed}}}
    StateStore(tmp_path).replace(doc)
    clock = FakeClock(T0 + 8 * S)
    writer, _ = make_writer(tmp_path, clock)
    assert writer.ledger.admitted_ns("main") == clock.now
    [dead] = writer.handle_batch(deliveries(pulse(8, 8, wh=0.5)))
    assert "differs" in dead.reason
    assert writer.handle_batch(deliveries(pulse(8, 8, wh=0.5, channel="reactive"))) == []  # its wh was unknown


def test_an_edge_states_when_its_epoch_began_also_after_a_clean_restart(tmp_path: Path) -> None:
    before = time.time_ns()
    box = Outbox(tmp_path / "edge.sqlite3", meter="main", max_rows=100)
    [first] = box.record([("active", T0, 1.0)])
    assert first.epoch_ns is not None and before <= first.epoch_ns <= time.time_ns()
    assert json.loads(encode(first))["epoch_ns"] == first.epoch_ns
    box.close()
    again = Outbox(tmp_path / "edge.sqlite3", meter="main", max_rows=100)
    [second] = again.record([("active", T0 + S, 1.0)])
    assert (second.epoch, second.epoch_ns) == (first.epoch, first.epoch_ns)
    reader = again.reader()
    assert [p.epoch_ns for _, p in reader.pending(0, 10)] == [first.epoch_ns] * 2
    reader.close()
    again.close()


# --- the real writer on the real RabbitMQ ----------------------------------------------------------

def test_the_running_writer_dead_letters_hostile_messages_and_counts_the_genuine_meter_exactly(
        names: Names, watch: MqttWatcher, spawn) -> None:
    """The hostile list, bodies of 6 and 8 KiB (over the schema's limit, under the broker's) and a flood of 300
    unknown meter ids, between genuine pulses: the writer lives, counts main exactly and announces nothing else,
    in Home Assistant's discovery (under this test's prefix) or its values."""
    discovery = f"{names.prefix}/ha"
    writer = start_writer(spawn, names, writer_env(names, EMDC_DISCOVERY="device", EMDC_DISCOVERY_PREFIX=discovery))
    now = time.time_ns()
    genuine = [Pulse("main", "active", "e1", seq, now - (10 - seq) * S, 1.0) for seq in range(1, 6)]
    hostile = [Pulse("main", "active", "e1", 2**62, now, 1e-300), Pulse("main", "reactive", "e9", 2**63 - 1, now, 1000),
               Pulse("main", "active", "e2", 116, now, 1000.0), Pulse("intruder", "active", "e1", 1, now, 1.0)]
    padded = json.loads(encode(Pulse("main", "active", "e1", 6, now, 1.0))) | {"note": "x" * 6 * 1024}
    big = [("pulse.main.active", json.dumps(padded).encode()),
           ("pulse.main.active", b"{" + b" " * (8 * 1024 - 2) + b"}")]
    flood = [Pulse(f"flood{i:03d}", channel, "e1", seq, now, 1.0)
             for i in range(300) for channel, seq in (("active", 1), ("reactive", 2**40))]
    publish(names.exchange, [*genuine[:3], *hostile, *big, *flood, *genuine[3:]])
    watch.wait_for(f"{names.prefix}/active_energy", lambda v: v == "0.005")
    held = len(hostile) + len(big) + len(flood)
    wait_until(lambda: queue_depth(dead_letter_queue(names.queue)) == held, 30, "the hostile messages held")
    assert writer.proc.poll() is None
    assert f"{names.prefix}/intruder/active_energy" not in watch.values
    # What a Home Assistant subscribing now would get: main's device and values, nothing of the flood.
    retained = MqttWatcher(f"{names.prefix}/#")
    try:
        wait_until(lambda: f"{discovery}/device/emdc_main/config" in retained.values, 10, "main's retained device")
        time.sleep(0.5)
        assert retained.values[f"{names.prefix}/active_energy"] == "0.005"
        strangers = [topic for topic in retained.values if "flood" in topic or "intruder" in topic]
        assert strangers == [], f"{len(strangers)} retained topics of unknown meters, e.g. {strangers[:3]}"
    finally:
        retained.close()
    assert not [topic for topic in watch.values if "flood" in topic], "published something of an unknown meter"
    assert writer.stop() == 0
    assert "meter 'intruder' is not one this writer counts" in writer.log()
    reasons = dead_reasons(dead_letter_queue(names.queue))
    assert len(reasons) == held and len([r for r in reasons if "limit is 4096" in r]) == len(big), reasons[:8]


def dead_reasons(queue: str) -> list[str]:
    """The writer's reason header of every dead letter in ``queue``, taken."""
    with pika.BlockingConnection(amqp_parameters()) as connection:
        channel = connection.channel()
        reasons = []
        while (message := channel.basic_get(queue, auto_ack=True))[0] is not None:
            reasons.append(str((message[1].headers or {}).get(ERROR_HEADER)))
        return reasons


# --- the commands ------------------------------------------------------------------------------------

def test_forget_and_set_pulse_energy_refuse_meters_they_must_not_touch(tmp_path: Path) -> None:
    env = {"EMDC_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F", "EMDC_STATE_DIR": str(tmp_path),
           "EMDC_METERS": "main,garage", "PATH": "/usr/bin:/bin"}
    configured = run_emdc(["state", "forget", "--meter", "garage"], env, check=False)
    assert configured.returncode == 2 and "'garage' is in the meters setting (main, garage)" in configured.stderr
    typo = run_emdc(["state", "forget", "--meter", "grage"], env, check=False)
    assert typo.returncode == 2 and "'grage' is not a meter the writer knows (garage, main)" in typo.stderr
    energy = ["state", "set-pulse-energy", "--channel", "active", "--wh", "0.5", "--meter"]
    assert "is not a meter the writer knows" in run_emdc([*energy, "shed"], env, check=False).stderr
    bad = run_emdc([*energy[:-3], "--wh", "0", "--meter", "main"], env, check=False)
    assert bad.returncode == 2 and "wh must be a number from 1e-06 to 1000" in bad.stderr
    sent = run_emdc([*energy, "main"], env, check=False)
    assert sent.returncode == 1 and "RabbitMQ at" in sent.stderr  # past the checks, to the broker
