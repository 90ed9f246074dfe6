"""Every pulse meter in the house: import, export, gas and water counted exactly, each in its own units.

Unit and property tests of the per-kind totals and rates, then the real writer
(RabbitMQ, Mosquitto) with one meter that has all four, `emdc state set-total`
in each unit, and the db-writer and report per kind.
"""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.amounts import GasEnergy, format_rate, format_total, micro_per_total, per_rate_unit
from backend.database import PulseStore
from backend.db_writer import DbWriter
from backend.discovery import Discovery
from backend.ledger import ChannelState, Implausible, Ledger, rate_limits, wh_to_uwh
from backend.power import displayed_power_w, physical_bound_w
from backend.report import build_report, plot, render_csv, render_table, slots_from_pulses
from common.channels import CHANNELS, channel_spec
from common.config import ConfigError, load_config
from common.message import MessageError, Pulse, SetTotal, decode_control, encode_control
from emdc.cli import main
from tests.support import T0, MqttWatcher, Names, S, deliveries, publish, run_emdc, sensor_classes, start_writer
from tests.test_writer import RecordingSink

KINDS = ("active", "export", "gas", "water")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- totals and rates per kind ---------------------------------------------------------------


@pytest.mark.parametrize(("channel", "micro", "text"), [
    ("active", 1_234_500_000, "1.2345"),
    ("export", 1, "0.000000001"),
    ("gas", 10_000, "0.01"),
    ("gas", 1_234_560_000, "1234.56"),
    ("water", 1_000_000, "1"),
    ("water", 12_500_001, "12.500001"),
    ("water", 0, "0"),
])
def test_totals_are_written_exactly_in_the_unit_of_their_kind(channel: str, micro: int, text: str) -> None:
    assert format_total(channel, micro) == text


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(CHANNELS), st.integers(0, 10**24))
def test_a_total_is_its_exact_integer_micro_units(channel: str, micro: int) -> None:
    assert Decimal(format_total(channel, micro)) * micro_per_total(channel) == micro


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CHANNELS), st.sampled_from([0.001, 0.01, 0.5, 1.0, 10.0]), st.integers(1, 2000))
def test_every_kind_counts_its_pulses_exactly_in_micro_units(channel: str, per_pulse: float, count: int) -> None:
    ledger = Ledger(100_000, fixed_wh=True)
    for seq in range(1, count + 1):
        ledger.apply(Pulse("main", channel, "e1", seq, T0 + seq * 60 * S, per_pulse), T0 + (count + 1) * 60 * S)
    assert ledger.channel("main", channel).total_uwh == count * wh_to_uwh(per_pulse)


def test_rates_are_written_in_the_rate_unit_of_their_kind() -> None:
    # 0.01 m³ every 36 s is 1 m³/h; 1 L every 6 s is 10 L/min; 1 Wh every 1.2 s is 3 kW.
    gas = ChannelState(last_ts_ns=0, wh=0.01, intervals_ns=[36 * S], kind="gas")
    water = ChannelState(last_ts_ns=0, wh=1.0, intervals_ns=[6 * S], kind="water")
    export = ChannelState(last_ts_ns=0, wh=1.0, intervals_ns=[1_200_000_000], kind="export")
    shown = {state.kind: format_rate(state.kind, displayed_power_w(state, S // 10, 300) or -1)
             for state in (gas, water, export)}
    assert shown == {"gas": "1.000", "water": "10.00", "export": "3.000"}


def test_an_idle_bound_is_rounded_down_in_the_rate_unit() -> None:
    # 1 L a second, then 4.7 s of silence: at most 12.77 L/min, and the pulse is overdue: 30 % of it, 3.8297...
    # L/min, shown as 3.82, never rounded up to 3.83.
    water = ChannelState(last_ts_ns=0, wh=1.0, intervals_ns=[S], kind="water")
    assert format_rate("water", displayed_power_w(water, 4_700_000_000, 300) or -1) == "3.82"
    # 0.01 m³, then 27.5 s: 30 % of at most 1.309 m³/h, 0.3927... m³/h, shown as 0.392.
    gas = ChannelState(last_ts_ns=0, wh=0.01, intervals_ns=[S], kind="gas")
    assert format_rate("gas", displayed_power_w(gas, 27_500_000_000, 300) or -1) == "0.392"
    assert displayed_power_w(gas, 300 * S, 300) == 0.0


kinded_states = st.builds(
    ChannelState,
    last_ts_ns=st.integers(0, 10**15),
    wh=st.sampled_from([0.001, 0.01, 0.1, 0.5, 1.0, 2.0, 10.0]),
    intervals_ns=st.lists(st.integers(1, 3600 * S), max_size=5),
    kind=st.sampled_from(CHANNELS),
)


@settings(max_examples=500, deadline=None)
@given(kinded_states, st.integers(1, 10**13), st.floats(1, 3600))
def test_a_published_rate_of_any_kind_is_never_above_the_physical_bound(state: ChannelState, idle_ns: int,
                                                                       timeout_s: float) -> None:
    now_ns = (state.last_ts_ns or 0) + idle_ns
    shown = displayed_power_w(state, now_ns, timeout_s)
    if shown is None:
        return
    bound = Fraction(physical_bound_w(state, now_ns))
    assert Fraction(shown) <= bound
    published = Fraction(format_rate(state.kind, shown)) * Fraction(per_rate_unit(state.kind))
    assert published <= bound, f"{format_rate(state.kind, shown)} {channel_spec(state.kind).rate_unit} is above it"


def test_each_kind_has_its_own_plausibility_limit() -> None:
    config = load_config(env={"EMDC_MAX_GAS_FLOW_M3H": "16", "EMDC_MAX_WATER_FLOW_LPM": "100"})
    ledger = Ledger(config.max_power_w, fixed_wh=True, max_rates=rate_limits(config))
    ledger.admit("main", T0)
    # 0.01 m³ pulses: 1600 in one hour is 16 m³/h, allowed; 1601 is not.
    assert ledger.apply(Pulse("main", "gas", "e1", 1600, T0 + 3600 * S, 0.01), T0 + 3600 * S) == 1600
    with pytest.raises(Implausible, match=r"implies 16\.0 m³/h, above the 16 m³/h limit"):
        ledger.apply(Pulse("main", "gas", "e1", 3201, T0 + 7200 * S, 0.01), T0 + 7200 * S)
    # 1 L pulses: 100 L/min is 6000 in an hour.
    with pytest.raises(Implausible, match=r"L/min, above the 100 L/min limit"):
        ledger.apply(Pulse("main", "water", "e1", 6001, T0 + 3600 * S, 1.0), T0 + 3600 * S)
    assert ledger.apply(Pulse("main", "water", "e1", 6000, T0 + 3600 * S, 1.0), T0 + 3600 * S) == 6000


@pytest.mark.parametrize(("env", "message"), [
    ({"EMDC_CHANNELS": "active,solar"}, "channels: solar is no channel"),
    ({"EMDC_MAX_GAS_FLOW_M3H": "0"}, "max_gas_flow_m3h must be > 0"),
    ({"EMDC_MAX_WATER_FLOW_LPM": "nan"}, "max_water_flow_lpm must be > 0"),
    ({"EMDC_GAS_CALORIFIC_KWH_M3": "-1"}, "gas_calorific_kwh_m3 must be 0 .off. or a value in kWh/m³"),
    ({"EMDC_GAS_CALORIFIC_KWH_M3": "nan"}, "gas_calorific_kwh_m3 must be 0"),
    ({"EMDC_GAS_CORRECTION_FACTOR": "0"}, "gas_correction_factor must be > 0"),
])
def test_kind_settings_that_cannot_work_are_refused_at_start(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(env=env)


# -- gas energy: the bill's kWh from the gas volume ---------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**15), st.integers(0, 10**9), st.sampled_from([8.9, 10.0, 11.2, 11.5613]),
       st.sampled_from([1.0, 0.9523, 0.9642]))
def test_gas_energy_grows_with_the_volume_and_is_never_above_the_billed_energy(volume: int, more: int,
                                                                               calorific: float,
                                                                               correction: float) -> None:
    energy = GasEnergy(calorific, correction)
    billed = Decimal(volume) * Decimal(str(calorific)) * Decimal(str(correction)) * 1000  # µm³ → µWh
    assert billed - 1 < energy.uwh(volume) <= billed
    assert energy.uwh(volume + more) >= energy.uwh(volume)


def test_a_calorific_value_adds_a_gas_energy_sensor_with_its_zero_point(tmp_path: Path) -> None:
    from backend.memory_transport import MemorySink
    from backend.writer import EnergyWriter

    config = load_config(env={"EMDC_STATE_DIR": str(tmp_path), "EMDC_GAS_CALORIFIC_KWH_M3": "11.2",
                              "EMDC_GAS_CORRECTION_FACTOR": "0.9523"})
    sink = RecordingSink()
    writer = EnergyWriter.open(config, sink=sink, clock=lambda: T0 + 3600 * S)
    batch = [Pulse("main", "gas", "e1", seq, T0 + seq * 36 * S, 0.01) for seq in (1, 2, 3)]
    assert writer.handle_batch(deliveries(*batch)) == []
    # 0.03 m³ × 11.2 kWh/m³ × 0.9523 = 0.3199728 kWh, after a 0 for Home Assistant's zero point.
    assert [p for t, p in sink.log if t == "home/energy/gas_energy"] == ["0", "0.3199728"]
    sensor = json.loads(sink.retained["homeassistant/device/emdc_main/config"])["components"]["gas_energy"]
    assert (sensor["device_class"], sensor["unit_of_measurement"], sensor["state_class"], sensor["state_topic"]) == (
        "energy", "kWh", "total_increasing", "home/energy/gas_energy")
    without = EnergyWriter.open(load_config(env={"EMDC_STATE_DIR": str(tmp_path)}), sink=(plain := MemorySink()),
                                clock=lambda: T0 + 3600 * S)
    without.publish_all()
    assert "home/energy/gas_energy" not in plain.retained
    assert "gas_energy" not in json.loads(plain.retained["homeassistant/device/emdc_main/config"])["components"]


# -- control messages carry each unit exactly -------------------------------------------------


@pytest.mark.parametrize(("channel", "key", "total", "micro"), [
    ("active", "kwh", "12345.678901234", 12_345_678_901_234),
    ("export", "kwh", "0.5", 500_000_000),
    ("gas", "m3", "1234.567891", 1_234_567_891),
    ("water", "litres", "98765.4", 98_765_400_000),
])
def test_set_total_names_its_reading_after_the_unit_and_keeps_it_exact(channel: str, key: str, total: str,
                                                                      micro: int) -> None:
    command = SetTotal("main", channel, Decimal(total), T0, "ab12")
    body = encode_control(command)
    assert json.loads(body)[key] == total
    decoded = decode_control(body)
    assert decoded == command and decoded.total_uwh == micro


def test_a_reading_in_another_unit_than_the_channels_is_refused() -> None:
    body = json.dumps({"v": 1, "type": "set_total", "id": "ab", "meter": "main", "channel": "gas", "kwh": "1",
                       "ts_ns": T0}).encode()
    with pytest.raises(MessageError, match="lacks 'm3'"):
        decode_control(body)


@pytest.mark.parametrize(("channel", "flag"), [("gas", "--kwh"), ("water", "--m3"), ("active", "--litres"),
                                               ("export", "--m3")])
def test_set_total_refuses_a_unit_that_does_not_fit_the_channel(channel: str, flag: str) -> None:
    result = CliRunner().invoke(main, ["state", "set-total", "--meter", "main", "--channel", channel, flag, "1"])
    assert result.exit_code == 2
    fits = {"gas": "--m3 (and no other)", "water": "--litres", "active": "--kwh", "export": "--kwh"}[channel]
    assert f"channel {channel} is read in {channel_spec(channel).total_unit}: give its reading as {fits}" \
        in result.output


# -- Home Assistant discovery per kind ---------------------------------------------------------


EXPECTED_SENSORS = sensor_classes("active_energy", "active_power", "export_energy", "export_power", "gas_volume",
                                  "gas_flow", "water_volume", "water_flow")


def test_entity_discovery_names_each_kinds_sensors_by_their_topics() -> None:
    discovery = Discovery("homeassistant", "home/energy", style="entity")
    topics = [topic for topic, _ in discovery.messages("main", ("active", "gas"))]
    assert topics == [f"homeassistant/sensor/emdc_main/{name}/config"
                      for name in ("active_energy", "active_power", "gas_volume", "gas_flow")]


# -- the real writer: one meter with import, export, gas and water ------------------------------


def ha_env(names: Names, **extra: object) -> dict[str, str]:
    return names.writer_env(EMDC_DISCOVERY="device", EMDC_DISCOVERY_PREFIX=f"{names.prefix}/ha",
                            EMDC_HA_STATUS_TOPIC=f"{names.prefix}/ha/status", EMDC_POWER_REFRESH_S=3600, **extra)


def series(channel: str, count: int, interval_s: float, per_pulse: float, meter: str = "main") -> list[Pulse]:
    """``count`` pulses of ``channel``, ``interval_s`` apart, the last one stamped now."""
    now = time.time_ns()
    return [Pulse(meter, channel, "feed", seq, now - round((count - seq) * interval_s * S), per_pulse)
            for seq in range(1, count + 1)]


def components(watch: MqttWatcher, names: Names, meter: str, wanted: set[str]) -> dict:
    topic = f"{names.prefix}/ha/device/emdc_{meter}/config"
    payload = watch.wait_for(topic, lambda v: v != "" and set(json.loads(v)["components"]) == wanted)
    return json.loads(payload)["components"]


def test_one_meter_with_import_export_gas_and_water_through_the_real_writer(names: Names, watch: MqttWatcher,
                                                                            spawn) -> None:
    writer = start_writer(spawn, names, ha_env(names))
    components(watch, names, "main", {"active_energy", "active_power"})  # a meter has active from the start
    publish(names.exchange, series("active", 5, 1.2, 1.0) + series("export", 2, 1.2, 1.0)
            + series("gas", 3, 36, 0.01) + series("water", 4, 6, 1.0))
    values = {"active_energy": "0.005", "export_energy": "0.002", "gas_volume": "0.03", "water_volume": "4",
              "active_power": "3.000", "export_power": "3.000", "gas_flow": "1.000", "water_flow": "10.00"}
    for name, value in values.items():
        assert watch.wait_for(f"{names.prefix}/{name}", lambda v, want=value: v == want) == value
    # Each newly seen channel updated the device's discovery: now all four kinds, still no reactive.
    sensors = components(watch, names, "main", set(EXPECTED_SENSORS))
    for key, (device_class, unit, state_class) in EXPECTED_SENSORS.items():
        sensor = sensors[key]
        assert (sensor["device_class"], sensor["unit_of_measurement"], sensor["state_class"]) == (
            device_class, unit, state_class), key
        assert sensor["state_topic"] == f"{names.prefix}/{key}" and sensor["unique_id"] == f"emdc_main_{key}"
    assert writer.stop() == 0

    shown = run_emdc(["state", "show"], ha_env(names)).stdout.splitlines()
    gas = next(line for line in shown if " gas " in line)
    water = next(line for line in shown if " water " in line)
    assert gas.split()[:4] == ["main", "gas", "0.03", "m³"] and "0.01 m³ per pulse" in gas
    assert water.split()[:4] == ["main", "water", "4", "L"] and "1 L per pulse" in water


def test_configured_channels_are_announced_before_their_first_pulse(names: Names, watch: MqttWatcher,
                                                                    spawn) -> None:
    start_writer(spawn, names, ha_env(names, EMDC_CHANNELS="export,gas", EMDC_METERS="main,cellar"))
    expected = {"active_energy", "active_power", "export_energy", "export_power", "gas_volume", "gas_flow"}
    assert set(components(watch, names, "main", expected)) == expected
    # The setting is about meter_id; another meter gets a kind once its pulses are seen.
    publish(names.exchange, series("water", 2, 6, 1.0, meter="cellar"))
    assert watch.wait_for(f"{names.prefix}/cellar/water_volume", lambda v: v == "2")
    cellar = {"active_energy", "active_power", "water_volume", "water_flow"}
    assert set(components(watch, names, "cellar", cellar)) == cellar


def test_set_total_in_each_unit_through_the_broker(names: Names, watch: MqttWatcher, spawn) -> None:
    writer = start_writer(spawn, names, ha_env(names))
    publish(names.exchange, series("gas", 2, 36, 0.01) + series("water", 2, 6, 1.0) + series("export", 2, 2, 1.0))
    for name, value in (("gas_volume", "0.02"), ("water_volume", "2"), ("export_energy", "0.002")):
        watch.wait_for(f"{names.prefix}/{name}", lambda v, want=value: v == want)
    for channel, flag, reading, topic in (("gas", "--m3", "1234.567", "gas_volume"),
                                          ("water", "--litres", "98765.4", "water_volume"),
                                          ("export", "--kwh", "321.5", "export_energy")):
        out = run_emdc(["state", "set-total", "--meter", "main", "--channel", channel, flag, reading],
                       ha_env(names)).stdout
        assert f"set main/{channel} to {reading} {channel_spec(channel).total_unit}" in out
        assert watch.wait_for(f"{names.prefix}/{topic}", lambda v, want=reading: v == want) == reading
    publish(names.exchange, [Pulse("main", "gas", "feed", 3, time.time_ns(), 0.01)])
    assert watch.wait_for(f"{names.prefix}/gas_volume", lambda v: v == "1234.577") == "1234.577"
    assert "calibrated main/gas: total 0.02 -> 1234.567" in writer.log()
    assert "calibrated main/water: total 2 -> 98765.4" in writer.log()


# -- db-writer and report per kind --------------------------------------------------------------


def hourly(channel: str, per_pulse: float, pulses_per_hour: int, hours: int, start: datetime) -> list[Pulse]:
    step = 3600 * S // pulses_per_hour
    first = round(start.timestamp()) * S
    return [Pulse("main", channel, "e1", i + 1, first + (i + 1) * step - 1, per_pulse)
            for i in range(pulses_per_hour * hours)]


START = datetime(2026, 11, 16, tzinfo=UTC)
# A day of a house: 400 W import, 120 W export, 0.5 m³/h of gas (0.01 m³ pulses), 6 L/min of water (1 L pulses).
HOUSE = (hourly("active", 10.0, 40, 24, START) + hourly("export", 10.0, 12, 24, START)
         + hourly("gas", 0.01, 50, 24, START) + hourly("water", 1.0, 360, 24, START))


def test_the_db_writer_stores_every_kind_and_refuses_an_implausible_gas_jump(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'pulses.sqlite3'}"
    store = PulseStore.open(url)
    later = round((START + timedelta(days=2)).timestamp()) * S
    writer = DbWriter(store, max_power_w=100_000, clock=lambda: later, max_rates=rate_limits(load_config(env={})))
    assert writer.handle_batch(deliveries(*HOUSE)) == []
    wild = Pulse("main", "gas", "e1", 10**6, round((START + timedelta(days=1, hours=1)).timestamp()) * S, 0.01)
    [dead] = writer.handle_batch(deliveries(wild))
    assert "m³/h, above the 16 m³/h limit" in dead.reason
    slots = list(store.slots("main", 0, 2**62))
    store.close()
    assert {s.channel for s in slots} == set(KINDS)
    assert {c: sum(s.uwh for s in slots if s.channel == c) for c in KINDS} == {
        "active": 9_600_000_000, "export": 2_880_000_000, "gas": 12_000_000, "water": 8_640_000_000}


def test_the_report_gives_each_kind_in_its_unit_and_a_chart_per_kind(tmp_path: Path) -> None:
    report = build_report(slots_from_pulses(HOUSE), meter="main", by="day", tz=UTC, start=START,
                          end=START + timedelta(days=1), now=START + timedelta(days=2))
    lines = render_table(report).splitlines()
    assert lines[2].split() == ["period", "active", "kWh", "avg", "kW", "export", "kWh", "gas", "m³", "water", "L",
                                "no", "data", "note"]
    assert lines[4].split() == ["2026-11-16", "Mon", "9.600", "0.400", "2.880", "12.000", "8640.0"]
    [row] = csv.DictReader(io.StringIO(render_csv(report)))
    assert (row["export_kwh"], row["gas_m3"], row["water_l"]) == ("2.880", "12.000", "8640.0")
    chart = tmp_path / "house.png"
    plot(report, chart)
    png = chart.read_bytes()
    assert png[:8] == PNG_SIGNATURE
    assert struct.unpack(">II", png[16:24]) == (1000, 4 * 460), "one chart of 460 px per kind"
    active_only = build_report(slots_from_pulses(HOUSE[:960]), meter="main", by="day", tz=UTC, start=START,
                               end=START + timedelta(days=1), now=START + timedelta(days=2))
    assert "gas" not in render_table(active_only) and "gas_m3" not in render_csv(active_only)


def test_emdc_report_reads_every_kind_from_the_database(tmp_path: Path) -> None:
    store = PulseStore.open(f"sqlite:///{tmp_path / 'pulses.sqlite3'}")
    store.insert(HOUSE)
    store.close()
    env = {k: None for k in os.environ if k.startswith("EMDC_")}
    result = CliRunner().invoke(main, ["report", "--by", "day", "--from", "2026-11-16", "--to", "2026-11-17",
                                       "--utc"], env={**env, "EMDC_STATE_DIR": str(tmp_path)},
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    total = next(line for line in result.stdout.splitlines() if line.startswith("total"))
    assert total.split() == ["total", "9.600", "0.400", "2.880", "12.000", "8640.0"]


def test_a_writer_restarted_on_its_state_keeps_every_kinds_total(tmp_path: Path) -> None:
    from backend.memory_transport import MemorySink
    from backend.writer import EnergyWriter

    config = load_config(env={"EMDC_STATE_DIR": str(tmp_path), "EMDC_DISCOVERY": "off"})

    def clock() -> int:
        return T0 + 3600 * S

    writer = EnergyWriter.open(config, sink=MemorySink(), clock=clock)
    batch = [Pulse("main", c, "e1", seq, T0 + seq * 60 * S, w) for c, w in (("gas", 0.01), ("water", 0.5))
             for seq in (1, 2, 3)]
    assert writer.handle_batch(deliveries(*batch)) == []
    sink = MemorySink()
    restarted = EnergyWriter.open(config, sink=sink, clock=clock)
    restarted.publish_all()
    assert (sink.retained["home/energy/gas_volume"], sink.retained["home/energy/water_volume"]) == ("0.03", "1.5")
    assert restarted.ledger.channel("main", "water").kind == "water"
