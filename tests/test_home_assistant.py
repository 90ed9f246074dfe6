"""Home Assistant integration against the real Mosquitto: discovery, availability, birth, calibration."""

from __future__ import annotations

import json
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from common.message import Pulse
from tests.support import MQTT_HOST, MQTT_PORT, MqttWatcher, Names, publish, pulses, run_emdc, start_writer, wait_until


def ha_env(names: Names, **extra: object) -> dict[str, str]:
    settings = {"EMDC_DISCOVERY": "device", "EMDC_DISCOVERY_PREFIX": f"{names.prefix}/ha",
                "EMDC_HA_STATUS_TOPIC": f"{names.prefix}/ha/status", "EMDC_HA_BIRTH_DELAY_S": "0.2"}
    return names.writer_env(**{**settings, **extra})


def discovery(watch: MqttWatcher, names: Names, meter: str = "main") -> dict:
    topic = f"{names.prefix}/ha/device/emdc_{meter}/config"
    return json.loads(watch.wait_for(topic, lambda v: v != ""))


def test_device_discovery_describes_four_sensors_for_the_energy_dashboard(names: Names, watch: MqttWatcher,
                                                                         spawn) -> None:
    start_writer(spawn, names, ha_env(names))
    config = discovery(watch, names)
    assert config["device"]["identifiers"] == ["emdc_main"]
    assert {"name", "model", "sw_version", "manufacturer"} <= config["device"].keys()
    assert config["origin"]["name"] == "emdc"
    assert config["availability_topic"] == f"{names.prefix}/status"
    assert config["qos"] == 1
    sensors = config["components"]
    expected = {
        "active_energy": ("energy", "kWh", "total_increasing"),
        "active_power": ("power", "kW", "measurement"),
        "reactive_energy": ("reactive_energy", "kvarh", "total_increasing"),
        "reactive_power": ("reactive_power", "kvar", "measurement"),
    }
    for key, (device_class, unit, state_class) in expected.items():
        sensor = sensors[key]
        assert sensor["platform"] == "sensor"
        assert (sensor["device_class"], sensor["unit_of_measurement"], sensor["state_class"]) == (
            device_class, unit, state_class)
        assert sensor["unique_id"] == f"emdc_main_{key}"
        assert sensor["state_topic"] == f"{names.prefix}/{key}"
        assert sensor["suggested_display_precision"] == 3
    assert watch.wait_for(f"{names.prefix}/status", lambda v: v == "online")


def test_entity_discovery_and_legacy_units_for_older_home_assistant(names: Names, watch: MqttWatcher,
                                                                   spawn) -> None:
    start_writer(spawn, names, ha_env(names, EMDC_DISCOVERY="entity", EMDC_HA_LEGACY_UNITS="true"))
    base = f"{names.prefix}/ha/sensor/emdc_main"
    energy = json.loads(watch.wait_for(f"{base}/active_energy/config", bool))
    reactive = json.loads(watch.wait_for(f"{base}/reactive_energy/config", bool))
    assert energy["device_class"] == "energy" and energy["device"]["identifiers"] == ["emdc_main"]
    assert "device_class" not in reactive and reactive["unit_of_measurement"] == "kvarh"
    assert reactive["availability_topic"] == f"{names.prefix}/status"


def test_last_will_says_offline_after_sigkill_and_clean_stop_says_offline(names: Names, watch: MqttWatcher,
                                                                          spawn) -> None:
    status = f"{names.prefix}/status"
    writer = start_writer(spawn, names, ha_env(names, EMDC_MQTT_KEEPALIVE="1"))
    watch.wait_for(status, lambda v: v == "online")
    writer.kill9()
    watch.wait_for(status, lambda v: v == "offline", timeout=10)

    writer = start_writer(spawn, names, ha_env(names))
    watch.wait_for(status, lambda v: v == "online")
    assert writer.stop() == 0
    watch.wait_for(status, lambda v: v == "offline", timeout=5)


def test_home_assistant_birth_message_triggers_a_republish(names: Names, watch: MqttWatcher, spawn) -> None:
    start_writer(spawn, names, ha_env(names))
    topic = f"{names.prefix}/ha/device/emdc_main/config"
    discovery(watch, names)
    before = sum(1 for t, _, _ in watch.history if t == topic)
    watch.client.publish(f"{names.prefix}/ha/status", "online", qos=1).wait_for_publish(5)
    wait_until(lambda: sum(1 for t, _, _ in watch.history if t == topic) > before, 10,
               "discovery to be re-published after the birth message")


def test_calibration_while_running_goes_through_the_broker(names: Names, watch: MqttWatcher, spawn) -> None:
    writer = start_writer(spawn, names, ha_env(names))
    all_pulses = pulses(20)
    publish(names.exchange, all_pulses[:10])
    energy = f"{names.prefix}/active_energy"
    watch.wait_for(energy, lambda v: v == "0.01")

    out = run_emdc(["state", "set-total", "--meter", "main", "--channel", "active", "--kwh", "12345.678"],
                   ha_env(names)).stdout
    assert "sent" in out
    watch.wait_for(energy, lambda v: v == "12345.678")
    # Pulses from before the reading that arrive late (a Pi's backlog) are part of it ...
    publish(names.exchange, all_pulses[10:15])
    # ... pulses after it are added.
    later = [Pulse("main", "active", "feed", seq, time.time_ns() + (seq - 15) * 10**9, 1.0) for seq in range(16, 21)]
    publish(names.exchange, later)
    assert watch.wait_for(energy, lambda v: v == "12345.683") == "12345.683"
    assert "calibrated main/active: total 0.01 -> 12345.678" in writer.log()


def test_two_meters_side_by_side(names: Names, watch: MqttWatcher, spawn) -> None:
    start_writer(spawn, names, ha_env(names, EMDC_METERS="main,garage"))
    now = time.time_ns()
    garage = [Pulse("garage", "active", "ab", seq, now - (5 - seq) * 10**9, 1.0) for seq in range(1, 6)]
    publish(names.exchange, pulses(3) + garage)
    assert watch.wait_for(f"{names.prefix}/active_energy", lambda v: v == "0.003")
    assert watch.wait_for(f"{names.prefix}/garage/active_energy", lambda v: v == "0.005")
    garage_device = discovery(watch, names, "garage")
    assert garage_device["components"]["active_energy"]["unique_id"] == "emdc_garage_active_energy"
    assert discovery(watch, names, "main")["device"]["identifiers"] == ["emdc_main"]


def test_ha_remove_clears_the_retained_discovery(names: Names, watch: MqttWatcher, spawn) -> None:
    writer = start_writer(spawn, names, ha_env(names))
    discovery(watch, names)
    writer.stop()
    out = run_emdc(["ha", "remove"], ha_env(names)).stdout
    assert "removed the Home Assistant discovery of meter(s) main" in out

    retained: dict[str, bytes] = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.on_message = lambda _c, _u, m: retained.__setitem__(m.topic, m.payload)
    client.connect(MQTT_HOST, MQTT_PORT)
    client.subscribe(f"{names.prefix}/ha/#")
    client.loop_start()
    time.sleep(1)
    client.loop_stop()
    client.disconnect()
    assert retained == {}, "no discovery config may remain retained"
