"""EMDC in a real Home Assistant Core, connected to the real Mosquitto: what a user sees.

One Home Assistant for the module (tests/ha_core.py), its MQTT integration
added through the config flow as in the UI, on the default discovery prefix
``homeassistant``. Each test runs the real writer for a meter of its own (an
id derived from its names, so no two tests ever share a device) and checks
through Home Assistant's REST and websocket APIs: the device and its sensors
with their classes and units, states equal to what EMDC publishes,
availability when the writer dies and across a restart of Home Assistant, the
Energy dashboard's and the recorder's validation, the switch between
discovery styles and ``emdc ha remove``, with nothing in Home Assistant's
log. Each test removes its device with ``emdc ha remove``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil
import pytest

from common import __version__
from common.channels import CHANNELS
from common.message import Pulse
from tests.ha_core import HomeAssistant, missing_tools, running
from tests.support import (
    MQTT_HOST,
    MQTT_PORT,
    EmdcProcess,
    MqttWatcher,
    Names,
    publish,
    run_emdc,
    sensor_classes,
    start_writer,
    wait_until,
    writer_env,
)

pytestmark = [pytest.mark.brokers, pytest.mark.ha_core]

SENSORS = sensor_classes("active_energy", "active_power", "reactive_energy", "reactive_power")
# A line of Home Assistant's log at WARNING or above, with its logger.
PROBLEM = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) \([^)]*\) \[([^\]]+)\]")


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory, brokers: None) -> Iterator[HomeAssistant]:
    if os.geteuid() != 0 or missing_tools():
        pytest.fail(f"Home Assistant runs in a chroot: needs root and {', '.join(missing_tools()) or 'nothing else'}"
                    " (apt-get install debootstrap; see .ci/run)")
    with running(tmp_path_factory.mktemp("home-assistant"), MQTT_HOST, MQTT_PORT) as instance:
        yield instance


class Meter:
    """One meter of a test in Home Assistant: its writers, its pulses, its device and entities as HA has them."""

    def __init__(self, ha: HomeAssistant, names: Names, spawn: Callable[..., EmdcProcess]) -> None:
        self.ha = ha
        self.names = names
        self.spawn = spawn
        self.id = f"t{names.queue.removeprefix('test_')}"
        self.writers: list[EmdcProcess] = []
        self.seq = dict.fromkeys(CHANNELS, 0)  # the pulse counter of each channel

    def env(self, **extra: object) -> dict[str, str]:
        settings: dict[str, object] = {"EMDC_DISCOVERY": "device", "EMDC_DISCOVERY_PREFIX": "homeassistant",
                                       "EMDC_METER_ID": self.id, "EMDC_HA_BIRTH_DELAY_S": "0.2"}
        return writer_env(self.names, **{**settings, **extra})

    def start_writer(self, **extra: object) -> EmdcProcess:
        writer = start_writer(self.spawn, self.names, self.env(**extra))
        self.writers.append(writer)
        return writer

    def stop_writers(self) -> None:
        for writer in self.writers:
            if writer.proc.poll() is None:
                assert writer.stop() == 0, writer.log()

    def count(self, pulses: int, channel: str = "active", per_pulse: float = 1.0, every_s: int = 1) -> None:
        """``pulses`` pulses of this meter (1 Wh or varh, or ``per_pulse`` of the channel's unit), ``every_s``
        apart, ending now."""
        now = time.time_ns()
        first = self.seq[channel] + 1
        self.seq[channel] += pulses
        publish(self.names.exchange, [Pulse(self.id, channel, "ab", seq,
                                            now - (self.seq[channel] - seq) * every_s * 10**9, per_pulse)
                                      for seq in range(first, self.seq[channel] + 1)])

    def topic(self, sensor: str) -> str:
        return f"{self.names.prefix}/{self.id}/{sensor}"

    def device(self) -> dict[str, Any] | None:
        devices = [d for d in self.ha.ws("config/device_registry/list")
                   if ["mqtt", f"emdc_{self.id}"] in d["identifiers"]]
        assert len(devices) <= 1, devices
        return devices[0] if devices else None

    def entities(self) -> dict[str, dict[str, Any]]:
        """The registry entries of this meter's entities, by sensor (``active_energy``, ...)."""
        prefix = f"emdc_{self.id}_"
        return {e["unique_id"].removeprefix(prefix): e for e in self.ha.ws("config/entity_registry/list")
                if e["platform"] == "mqtt" and e["unique_id"].startswith(prefix)}

    def wait_for_entities(self, sensors: set[str]) -> dict[str, dict[str, Any]]:
        def complete() -> dict[str, dict[str, Any]] | None:
            entities = self.entities()
            return entities if set(entities) == sensors else None

        found: dict[str, dict[str, Any]] = wait_until(
            complete, 30, f"Home Assistant to have the sensors {sorted(sensors)} of meter {self.id}")
        return found

    def state(self, sensor: str) -> dict[str, Any]:
        state: dict[str, Any] = self.ha.rest("GET", f"/api/states/{self.entities()[sensor]['entity_id']}")
        return state

    def wait_for_state(self, sensor: str, condition: Callable[[str], bool], what: str) -> str:
        def reached() -> str | None:
            state: str = self.state(sensor)["state"]
            return state if condition(state) else None

        value: str = wait_until(reached, 30, f"{sensor} of meter {self.id} in Home Assistant to be {what}")
        return value

    def wait_until_shown(self, watch: MqttWatcher, totals: dict[str, str], sensors: Iterable[str] = SENSORS) -> None:
        """Wait until the writer has published ``totals`` (energy sensor -> value) and Home Assistant shows, for
        every one of ``sensors``, the value the writer published last."""
        for sensor, total in totals.items():
            watch.wait_for(self.topic(sensor), lambda v, t=total: v == t)
        for sensor in sensors:
            topic = self.topic(sensor)
            self.wait_for_state(sensor, lambda s, t=topic: s == watch.values.get(t), "the value published last")

    def discovery_topics(self) -> dict[str, str]:
        """The discovery topic Home Assistant took each entity's config from, by entity id."""
        device = self.device()
        assert device is not None
        info = self.ha.ws("mqtt/device/debug_info", device_id=device["id"])
        return {e["entity_id"]: e["discovery_data"]["topic"] for e in info["entities"]}


@pytest.fixture
def meter(ha: HomeAssistant, names: Names, spawn: Callable[..., EmdcProcess]) -> Iterator[Meter]:
    m = Meter(ha, names, spawn)
    yield m
    m.stop_writers()
    if m.device() is not None:
        run_emdc(["ha", "remove"], m.env())
        wait_until(lambda: m.device() is None, 30, f"Home Assistant to remove the device of meter {m.id}")


def problems(ha: HomeAssistant, since: int, meter: Meter) -> list[str]:
    """Home Assistant's log lines at WARNING or above since byte ``since`` from its MQTT integration (a
    "conflicting MQTT discovery message", say) or about ``meter``."""
    lines = []
    for line in ha.log(since).splitlines():
        match = PROBLEM.match(line)
        if match and (match.group(2).startswith("homeassistant.components.mqtt") or meter.id in line):
            lines.append(line)
    return lines


def test_the_device_and_its_sensors_as_home_assistant_shows_them(meter: Meter, watch: MqttWatcher) -> None:
    meter.start_writer(EMDC_REACTIVE_PIN=27)  # a meter with a reactive output: all four sensors
    entities = meter.wait_for_entities(set(SENSORS))
    device = meter.device()
    assert device is not None
    assert (device["name"], device["manufacturer"], device["sw_version"]) == (f"EMDC {meter.id} meter", "EMDC",
                                                                              __version__)
    assert device["model"]
    assert {e["device_id"] for e in entities.values()} == {device["id"]}
    assert entities["active_energy"]["entity_id"] == f"sensor.emdc_{meter.id}_meter_active_energy"

    meter.count(5)
    meter.count(3, channel="reactive")
    meter.wait_until_shown(watch, {"active_energy": "0.005", "reactive_energy": "0.003"})
    for sensor, (device_class, unit, state_class) in SENSORS.items():
        attributes = meter.state(sensor)["attributes"]
        assert (attributes["device_class"], attributes["unit_of_measurement"], attributes["state_class"]) == (
            device_class, unit, state_class), sensor
        assert attributes["friendly_name"] == f"EMDC {meter.id} meter {sensor.replace('_', ' ').capitalize()}"


def test_a_dead_writer_makes_the_sensors_unavailable_until_a_writer_is_back(meter: Meter) -> None:
    writer = meter.start_writer(EMDC_MQTT_KEEPALIVE=1)
    meter.wait_for_entities({"active_energy", "active_power"})
    meter.count(3)
    meter.wait_for_state("active_energy", lambda s: s == "0.003", "0.003")
    writer.kill9()  # the broker publishes the writer's last will
    for sensor in ("active_energy", "active_power"):
        meter.wait_for_state(sensor, lambda s: s == "unavailable", "unavailable")

    meter.start_writer()
    meter.wait_for_state("active_energy", lambda s: s == "0.003", "0.003 again")
    meter.count(2)
    meter.wait_for_state("active_energy", lambda s: s == "0.005", "0.005")


def test_a_restart_of_home_assistant_shows_the_same_device_and_values(meter: Meter, ha: HomeAssistant,
                                                                     watch: MqttWatcher) -> None:
    meter.start_writer()
    before = meter.wait_for_entities({"active_energy", "active_power"})
    meter.count(4)
    meter.wait_for_state("active_energy", lambda s: s == "0.004", "0.004")
    meter.wait_for_state("active_power", lambda s: s not in ("unknown", "unavailable"), "measured")
    device = meter.device()

    assert ha.stop() == 0
    ha.start()  # its birth message makes the writer announce the device and its values again
    assert meter.wait_for_entities({"active_energy", "active_power"}) == before
    assert meter.device() == device
    meter.wait_for_state("active_energy", lambda s: s == "0.004", "0.004 after the restart")
    # The power as it is now: the idle bound has fallen meanwhile, and the re-announcement says so.
    power = meter.topic("active_power")
    meter.wait_for_state("active_power", lambda s: s == watch.values.get(power), "the power published last")
    meter.count(1)
    meter.wait_for_state("active_energy", lambda s: s == "0.005", "0.005")


def discovery_topics(meter: Meter, style: str) -> set[str]:
    if style == "device":
        return {f"homeassistant/device/emdc_{meter.id}/config"}
    return {f"homeassistant/sensor/emdc_{meter.id}/active_{quantity}/config" for quantity in ("energy", "power")}


# Home Assistant 2026.11 reads an empty config that clears an old topic after the new config as a conflicting
# discovery message (and ignores it); cleared between the migration request and the new config, it is not.
def test_switching_to_device_discovery_keeps_the_entities_and_logs_no_warning(meter: Meter,
                                                                               ha: HomeAssistant) -> None:
    meter.start_writer(EMDC_DISCOVERY="entity")
    entities = meter.wait_for_entities({"active_energy", "active_power"})
    meter.count(3)
    meter.wait_for_state("active_energy", lambda s: s == "0.003", "0.003")
    wait_until(lambda: set(meter.discovery_topics().values()) == discovery_topics(meter, "entity"), 30,
               "per-entity discovery")
    meter.stop_writers()
    since = ha.log_size()

    meter.start_writer(EMDC_DISCOVERY="device")  # the documented upgrade: nothing else to do
    wait_until(lambda: set(meter.discovery_topics().values()) == discovery_topics(meter, "device"), 30,
               "Home Assistant to take the sensors over from device discovery")
    assert meter.entities() == entities, "the same entities, with their ids and history"
    meter.count(1)
    meter.wait_for_state("active_energy", lambda s: s == "0.004", "0.004")
    assert problems(ha, since, meter) == []


def test_switching_back_to_entity_discovery_keeps_the_entities(meter: Meter) -> None:
    meter.start_writer(EMDC_DISCOVERY="device")
    entities = meter.wait_for_entities({"active_energy", "active_power"})
    meter.count(2)
    meter.wait_for_state("active_energy", lambda s: s == "0.002", "0.002")
    meter.stop_writers()

    meter.start_writer(EMDC_DISCOVERY="entity")
    wait_until(lambda: set(meter.discovery_topics().values()) == discovery_topics(meter, "entity"), 30,
               "Home Assistant to take the sensors over from per-entity discovery")
    assert meter.entities() == entities
    meter.count(1)
    meter.wait_for_state("active_energy", lambda s: s == "0.003", "0.003")


@pytest.mark.parametrize("style", ["device", "entity"])
def test_ha_remove_removes_the_device_and_logs_no_warning(meter: Meter, ha: HomeAssistant, style: str) -> None:
    since = ha.log_size()
    meter.start_writer(EMDC_DISCOVERY=style)
    meter.wait_for_entities({"active_energy", "active_power"})
    meter.count(2)
    meter.wait_for_state("active_energy", lambda s: s == "0.002", "0.002")
    meter.stop_writers()

    out = run_emdc(["ha", "remove"], meter.env()).stdout
    assert f"removed the Home Assistant discovery of meter(s) {meter.id}" in out
    wait_until(lambda: meter.device() is None and not meter.entities(), 30, "the device and its entities removed")
    assert problems(ha, since, meter) == []


def inside_a_statistics_period() -> None:
    """The recorder compiles statistics every 5 minutes (at :00, :05, ... and 10 s): wait, if need be, to count
    well inside a period, so that the first one holds the zero point and the counted total."""
    now = datetime.now(UTC)
    if (now.minute % 5) * 60 + now.second > 4 * 60 + 40:
        time.sleep(5 * 60 - (now.minute % 5) * 60 - now.second + 1)


def compiled_statistics(ha: HomeAssistant, ids: dict[str, str], sensors: dict[str, tuple[str, str, str]],
                        sums: dict[str, float]) -> None:
    """Wait for the first statistics of the entities ``ids`` (by sensor), and check them: the first period holds
    the zero point (the 0 before the first total) and the total, so each total's sum is all it counted (``sums``);
    each statistic has the unit of its sensor, a sum if a total; the recorder's validation has no issue."""
    def compiled() -> list[dict[str, Any]] | None:
        start = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        rows = ha.ws("recorder/statistics_during_period", start_time=start, statistic_ids=list(ids.values()),
                     period="5minute", types=["sum", "state", "mean"])
        return rows if set(rows) == set(ids.values()) else None

    rows = wait_until(compiled, 6 * 60, "the recorder to compile the first statistics of the meter", interval=5)
    for sensor, total in sums.items():
        assert rows[ids[sensor]][-1]["state"] == pytest.approx(total), json.dumps(rows)
        assert rows[ids[sensor]][-1]["sum"] == pytest.approx(total), json.dumps(rows)
    listed = {s["statistic_id"]: s for s in ha.ws("recorder/list_statistic_ids")}
    for sensor, (_, unit, state_class) in sensors.items():
        statistic = listed[ids[sensor]]
        assert statistic["statistics_unit_of_measurement"] == unit, sensor
        assert statistic["has_sum"] == (state_class == "total_increasing"), sensor
    issues = ha.ws("recorder/validate_statistics")
    assert {entity: issues[entity] for entity in ids.values() if entity in issues} == {}


def test_the_energy_dashboard_and_the_statistics_accept_every_energy_sensor(meter: Meter, ha: HomeAssistant,
                                                                          watch: MqttWatcher) -> None:
    inside_a_statistics_period()
    meter.start_writer(EMDC_REACTIVE_PIN=27)
    entities = meter.wait_for_entities(set(SENSORS))
    ids = {sensor: entry["entity_id"] for sensor, entry in entities.items()}
    meter.count(5)
    meter.count(2, channel="reactive")
    meter.wait_until_shown(watch, {"active_energy": "0.005", "reactive_energy": "0.002"})
    compiled_statistics(ha, ids, SENSORS, {"active_energy": 0.005, "reactive_energy": 0.002})

    ha.ws("energy/save_prefs", energy_sources=[
        {"type": "grid", "stat_energy_from": ids["active_energy"], "stat_rate": ids["active_power"],
         "cost_adjustment_day": 0}],
        device_consumption=[{"stat_consumption": ids["active_energy"], "stat_rate": ids["active_power"]}])
    # The dashboard's validation, as its configuration page shows it: no issue for any source or device.
    assert ha.ws("energy/validate") == {"energy_sources": [[]], "device_consumption": [[]],
                                        "device_consumption_water": []}


# A house's meter with import, export (solar), gas and water.
HOUSE_SENSORS = sensor_classes("active_energy", "active_power", "export_energy", "export_power", "gas_volume",
                               "gas_flow", "gas_energy", "water_volume", "water_flow")


def test_the_energy_dashboard_takes_import_export_gas_and_water_of_one_meter(meter: Meter, ha: HomeAssistant,
                                                                             watch: MqttWatcher) -> None:
    inside_a_statistics_period()
    meter.start_writer(EMDC_CHANNELS="export,gas,water", EMDC_GAS_CALORIFIC_KWH_M3=11.2,
                       EMDC_GAS_CORRECTION_FACTOR=0.9523)
    entities = meter.wait_for_entities(set(HOUSE_SENSORS))
    ids = {sensor: entry["entity_id"] for sensor, entry in entities.items()}
    for sensor, (device_class, unit, state_class) in HOUSE_SENSORS.items():
        attributes = meter.state(sensor)["attributes"]
        assert (attributes.get("device_class"), attributes["unit_of_measurement"], attributes["state_class"]) == (
            device_class, unit, state_class), sensor
    meter.count(5)
    meter.count(3, channel="export")
    meter.count(4, channel="gas", per_pulse=0.01, every_s=5)  # 7.2 m³/h: a second apart is above a house's
    meter.count(6, channel="water")
    meter.wait_until_shown(watch, {"active_energy": "0.005", "export_energy": "0.003", "gas_volume": "0.04",
                                   "gas_energy": "0.4266304", "water_volume": "6"}, HOUSE_SENSORS)
    compiled_statistics(ha, ids, HOUSE_SENSORS, {"active_energy": 0.005, "export_energy": 0.003,
                                                 "gas_volume": 0.04, "gas_energy": 0.4266304, "water_volume": 6})

    # Home Assistant 2026.11's grid source: import and export of one connection, with its power; gas by volume
    # and, as the bill reckons it, by energy.
    ha.ws("energy/save_prefs", energy_sources=[
        {"type": "grid", "stat_energy_from": ids["active_energy"], "stat_energy_to": ids["export_energy"],
         "stat_rate": ids["active_power"], "cost_adjustment_day": 0},
        {"type": "gas", "stat_energy_from": ids["gas_volume"], "stat_rate": ids["gas_flow"]},
        {"type": "gas", "stat_energy_from": ids["gas_energy"]},
        {"type": "water", "stat_energy_from": ids["water_volume"], "stat_rate": ids["water_flow"]}],
        device_consumption=[])
    assert ha.ws("energy/validate") == {"energy_sources": [[], [], [], []], "device_consumption": [],
                                        "device_consumption_water": []}


def test_home_assistant_set_everything_up_and_talks_only_to_this_machine(ha: HomeAssistant) -> None:
    assert ha.process is not None
    remote = {c.raddr.ip for c in psutil.Process(ha.process.pid).net_connections("inet") if c.raddr}
    assert remote <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, remote
    assert [line for line in ha.log().splitlines() if "Setup failed for" in line] == []
    # Its HTTP settings are confirmed: unconfirmed, Home Assistant reverts them and exits five minutes on.
    assert ha.ws("http/config")["pending"] is None


def test_a_silent_edge_makes_the_rates_unavailable_while_the_totals_keep_their_value(meter: Meter,
                                                                                       ha: HomeAssistant) -> None:
    import threading

    from common.message import ChannelStatus, Status, encode_status

    def status(seq: int) -> None:
        """What an edge sends about itself (a hand-made one: the contract is public)."""
        body = Status(meter.id, time.time_ns(), 60, __version__, "up", 0, {"active": ChannelStatus("ab", seq, 1)},
                      synced=True, last_pulse_ns=time.time_ns())
        publish(meter.names.exchange, [(f"status.{meter.id}", encode_status(body))])

    def edge_alive(silent: threading.Event) -> None:
        while not silent.wait(1):
            status(3)

    since, started = ha.log_size(), datetime.now(UTC)
    meter.start_writer(EMDC_EDGE_TIMEOUT_S=3)
    meter.wait_for_entities({"active_energy", "active_power"})
    meter.count(3)
    status(3)
    silent = threading.Event()
    alive = threading.Thread(target=edge_alive, args=(silent,), daemon=True)
    alive.start()
    diagnostics = {"edge_connectivity", "edge_pending", "edge_outbox", "edge_last_pulse", "edge_rejected",
                   "edge_clock_synced", "edge_version", "edge_cpu_temperature", "writer_mqtt", "writer_rabbitmq",
                   "writer_dead_letters"}
    entities = meter.wait_for_entities({"active_energy", "active_power"} | diagnostics)
    assert all(entities[name]["entity_category"] == "diagnostic" for name in diagnostics)
    meter.wait_for_state("active_energy", lambda s: s == "0.003", "0.003")
    meter.wait_for_state("active_power", lambda s: s not in ("unavailable", "unknown"), "a power")
    meter.wait_for_state("edge_connectivity", lambda s: s == "on", "connected")
    meter.wait_for_state("edge_version", lambda s: s == __version__, "the edge's version")
    meter.wait_for_state("edge_rejected", lambda s: s == "1", "1")
    meter.wait_for_state("writer_mqtt", lambda s: s == "on", "connected")
    meter.wait_for_state("writer_rabbitmq", lambda s: s == "on", "connected")
    meter.wait_for_state("writer_dead_letters", lambda s: s == "0", "0")

    # The edge falls silent: after the timeout its rates are unavailable, its total keeps its exact value.
    silent.set()
    alive.join()
    meter.wait_for_state("active_power", lambda s: s == "unavailable", "unavailable")
    meter.wait_for_state("edge_connectivity", lambda s: s == "off", "disconnected")
    assert meter.state("active_energy")["state"] == "0.003"

    meter.count(2)  # back, with its backlog
    status(5)
    meter.wait_for_state("active_energy", lambda s: s == "0.005", "0.005")
    meter.wait_for_state("active_power", lambda s: s != "unavailable", "available again")
    assert problems(ha, since, meter) == []
    # What the recorder kept of the total, which its statistics are compiled from: never unavailable and never
    # lower than before, so the Energy dashboard sees no reset across the outage.
    energy = meter.entities()["active_energy"]["entity_id"]

    def recorded() -> list[str] | None:
        history = ha.ws("history/history_during_period", start_time=started.isoformat(), entity_ids=[energy],
                        minimal_response=True, no_attributes=True)[energy]
        values = [h["s"] for h in history]
        return values if values[-1] == "0.005" else None

    values = wait_until(recorded, 30, "the recorder to hold the last total")
    first = next(i for i, v in enumerate(values) if v not in ("unavailable", "unknown"))  # before the writer's 0
    assert "unavailable" not in values[first:] and "unknown" not in values[first:], values
    assert [float(v) for v in values[first:]] == sorted(float(v) for v in values[first:]), values
