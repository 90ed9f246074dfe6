"""Home Assistant integration against the real Mosquitto: discovery, availability, birth, calibration, the
hand-over between discovery styles and the zero point of a fresh channel."""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt
import pytest
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


def retained_now(topic_filter: str) -> dict[str, str]:
    """Every message Mosquitto retains on ``topic_filter``, complete: read up to a marker published after
    subscribing (a subscription's retained messages come first)."""
    marker = f"{topic_filter.removesuffix('/#')}/observer-marker"
    retained: dict[str, str] = {}
    done = threading.Event()

    def on_message(_c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        if message.topic == marker:
            done.set()
        elif message.retain:
            retained[message.topic] = message.payload.decode()

    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.on_message = on_message
    client.connect(MQTT_HOST, MQTT_PORT)
    client.loop_start()
    try:
        client.subscribe([(topic_filter, 1), (marker, 1)])
        client.publish(marker, "", qos=1)
        assert done.wait(10), "the marker never came back"
    finally:
        client.loop_stop()
        client.disconnect()
    return retained


def messages_on(watch: MqttWatcher, topic: str) -> list[str]:
    return [payload for t, payload, _ in watch.history if t == topic]


def test_device_discovery_describes_four_sensors_for_the_energy_dashboard(names: Names, watch: MqttWatcher,
                                                                         spawn) -> None:
    start_writer(spawn, names, ha_env(names, EMDC_REACTIVE_PIN=27))  # a meter with a reactive output
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
    start_writer(spawn, names, ha_env(names, EMDC_DISCOVERY="entity", EMDC_HA_LEGACY_UNITS="true",
                                      EMDC_REACTIVE_PIN=27))
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


@pytest.mark.parametrize(("style", "other"), [("device", "sensor"), ("entity", "device")])
def test_ha_remove_clears_only_the_configs_that_exist(names: Names, watch: MqttWatcher, spawn, style: str,
                                                       other: str) -> None:
    writer = start_writer(spawn, names, ha_env(names, EMDC_DISCOVERY=style))
    wait_until(lambda: retained_now(f"{names.prefix}/ha/#"), 30, "the discovery to be retained")
    writer.stop()
    out = run_emdc(["ha", "remove"], ha_env(names)).stdout
    assert "removed the Home Assistant discovery of meter(s) main" in out
    assert retained_now(f"{names.prefix}/ha/#") == {}, "no discovery config may remain retained"
    # Clearing a topic that holds nothing makes Home Assistant log a conflict with the config it does hold.
    assert not [topic for topic, _, _ in watch.history if f"/ha/{other}/" in topic]


def test_switching_discovery_styles_hands_the_sensors_over(names: Names, watch: MqttWatcher, spawn) -> None:
    device = f"{names.prefix}/ha/device/emdc_main/config"
    entities = [f"{names.prefix}/ha/sensor/emdc_main/active_{quantity}/config" for quantity in ("energy", "power")]
    writer = start_writer(spawn, names, ha_env(names, EMDC_DISCOVERY="entity"))
    wait_until(lambda: set(retained_now(f"{names.prefix}/ha/#")) == set(entities), 30, "per-entity discovery")
    assert writer.stop() == 0

    writer = start_writer(spawn, names, ha_env(names))  # the documented upgrade to device discovery
    wait_until(lambda: set(retained_now(f"{names.prefix}/ha/#")) == {device}, 30, "the per-entity configs gone")
    assert writer.stop() == 0
    # Home Assistant's migration: unload each old entity, clear the old topic, then announce the device.
    announced = watch.history.index(next(m for m in watch.history if m[0] == device and m[1]))
    for topic in entities:
        (migrate, _), (cleared, _) = [(i, m) for i, m in enumerate(watch.history) if m[0] == topic][-2:]
        assert json.loads(watch.history[migrate][1]) == {"migrate_discovery": True}
        assert migrate < cleared < announced and watch.history[cleared][1] == ""

    start_writer(spawn, names, ha_env(names, EMDC_DISCOVERY="entity"))  # and back
    wait_until(lambda: set(retained_now(f"{names.prefix}/ha/#")) == set(entities), 30, "the device config gone")
    assert messages_on(watch, device)[-2:] == [json.dumps({"migrate_discovery": True}), ""]


def test_reactive_sensors_appear_once_a_reactive_pulse_is_counted(names: Names, watch: MqttWatcher,
                                                                  spawn) -> None:
    start_writer(spawn, names, ha_env(names))
    assert set(discovery(watch, names)["components"]) == {"active_energy", "active_power"}
    publish(names.exchange, pulses(2, channel="reactive"))
    wait_until(lambda: "reactive_energy" in discovery(watch, names)["components"], 30, "reactive sensors")
    assert set(discovery(watch, names)["components"]) == {"active_energy", "active_power", "reactive_energy",
                                                          "reactive_power"}
    # Home Assistant subscribes to a new sensor's state topic once it has set the sensor up: the value it then
    # finds retained is its zero point, and must be the 0, although the pulses were counted with the discovery.
    assert retained_now(f"{names.prefix}/reactive_energy") == {f"{names.prefix}/reactive_energy": "0"}
    watch.wait_for(f"{names.prefix}/reactive_energy", lambda v: v == "0.002")
    assert messages_on(watch, f"{names.prefix}/reactive_energy")[0] == "0"


def test_a_fresh_channel_starts_at_0_and_0_never_covers_a_total_after_a_restart(names: Names, watch: MqttWatcher,
                                                                               spawn) -> None:
    energy, power = f"{names.prefix}/active_energy", f"{names.prefix}/active_power"
    writer = start_writer(spawn, names, ha_env(names))
    discovery(watch, names)
    assert energy not in watch.values and power not in watch.values, "unknown until the first pulse"
    publish(names.exchange, pulses(3))
    watch.wait_for(energy, lambda v: v == "0.003")
    assert writer.stop() == 0

    writer = start_writer(spawn, names, ha_env(names))
    watch.wait_for(f"{names.prefix}/status", lambda v: v == "online")
    wait_until(lambda: messages_on(watch, energy).count("0.003") == 2, 30, "the total re-published")
    assert writer.stop() == 0
    published = messages_on(watch, energy)  # the pulses may have come in more than one batch
    assert published[0] == "0" and "0" not in published[1:], published
