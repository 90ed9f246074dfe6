"""What the writer publishes to announce a meter, given what the broker retains: the pure decisions, no broker."""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from backend.batch import Delivery
from backend.discovery import MIGRATE, Discovery
from backend.memory_transport import MemorySink
from backend.writer import EnergyWriter
from common.config import load_config
from common.message import SetTotal, encode_set_total
from tests.support import T0, S, deliveries, pulse

PREFIX = "homeassistant"
DEVICE = f"{PREFIX}/device/emdc_main/config"
SENSORS = ["active_energy", "active_power", "reactive_energy", "reactive_power"]
ENTITIES = {name: f"{PREFIX}/sensor/emdc_main/{name}/config" for name in SENSORS}


def apply(retained: dict[str, str], messages: list[tuple[str, str]]) -> dict[str, str]:
    """The broker's retained messages after ``messages``: an empty payload removes one."""
    after = dict(retained)
    for topic, payload in messages:
        if payload:
            after[topic] = payload
        else:
            after.pop(topic, None)
    return after


def configs(style: str, channels: Sequence[str]) -> dict[str, str]:
    return dict(Discovery(PREFIX, "home/energy", style).messages("main", channels))


# What a broker may hold for meter main: any mix of both styles' configs, leftovers of an interrupted hand-over,
# and another meter's config, which is none of this meter's business.
retained_states = st.builds(
    lambda device, entities, other: {
        **({DEVICE: device} if device is not None else {}),
        **{ENTITIES[name]: payload for name, payload in entities.items()},
        **({f"{PREFIX}/device/emdc_garage/config": "{}"} if other else {}),
    },
    st.sampled_from([None, configs("device", ["active"])[DEVICE], configs("device", ["active", "reactive"])[DEVICE],
                     MIGRATE]),
    st.dictionaries(st.sampled_from(SENSORS), st.sampled_from(["{}", MIGRATE])),
    st.booleans(),
)


@given(retained_states, st.sampled_from(["device", "entity"]), st.sampled_from([["active"], ["active", "reactive"]]))
def test_a_handover_leaves_exactly_the_new_configs_and_unloads_each_sensor_before_taking_it_over(
        retained: dict[str, str], style: str, channels: list[str]) -> None:
    messages = Discovery(PREFIX, "home/energy", style).handover("main", retained, channels)
    wanted = configs(style, channels)
    after = apply(retained, messages)
    assert {t: p for t, p in after.items() if "emdc_main" in t} == wanted
    assert after.get(f"{PREFIX}/device/emdc_garage/config") == retained.get(f"{PREFIX}/device/emdc_garage/config")
    touched = {topic for topic, _ in messages}
    assert touched <= set(retained) | set(wanted), "only topics that hold a config are cleared"
    first_config = min(i for i, (topic, _) in enumerate(messages) if topic in wanted)
    unloads = [i for i, (_, payload) in enumerate(messages) if payload == MIGRATE]
    assert all(i < first_config for i in unloads), "Home Assistant must unload an entity before it is taken over"


@given(retained_states)
def test_removal_clears_every_config_of_the_meter_and_per_entity_ones_first(retained: dict[str, str]) -> None:
    messages = Discovery(PREFIX, "home/energy").removal_messages(["main"], retained)
    assert not [t for t in apply(retained, messages) if "emdc_main" in t]
    assert all(payload == "" and topic in retained for topic, payload in messages)
    topics = [topic for topic, _ in messages]
    assert topics == sorted(topics, key=lambda topic: topic == DEVICE)


def test_a_handover_from_entity_to_device_follows_home_assistants_migration() -> None:
    old = {ENTITIES["active_energy"]: "{}", ENTITIES["active_power"]: "{}"}
    messages = Discovery(PREFIX, "home/energy", "device").handover("main", old, ["active"])
    assert [(t, p if p in ("", MIGRATE) else "config") for t, p in messages] == [
        (ENTITIES["active_energy"], MIGRATE), (ENTITIES["active_power"], MIGRATE),
        (ENTITIES["active_energy"], ""), (ENTITIES["active_power"], ""), (DEVICE, "config")]


def test_discovery_off_touches_nothing() -> None:
    assert Discovery(PREFIX, "home/energy", "off").handover("main", {DEVICE: "{}"}) == []


class BrokerSink(MemorySink):
    """A sink that, like Mosquitto, can be asked what it retains (None: it cannot tell right now)."""

    def __init__(self, retained: dict[str, str] | None = None) -> None:
        super().__init__()
        self.retained.update(retained or {})
        self.log: list[tuple[str, str]] = []
        self.unknown = False

    def publish(self, topic: str, payload: str) -> None:
        super().publish(topic, payload)
        self.log.append((topic, payload))

    def scan_retained(self, filters: Sequence[str]) -> dict[str, str] | None:
        return None if self.unknown else dict(self.retained)

    def hold(self, topic: str) -> None:
        """Holding values back is the broker adapter's job (tests/test_home_assistant.py)."""


def writer(tmp_path: Path, sink: BrokerSink, **settings: str) -> EnergyWriter:
    env = {"EMDC_STATE_DIR": str(tmp_path), "EMDC_DISCOVERY": "device", **settings}
    return EnergyWriter.open(load_config(env=env), sink=sink, clock=lambda: T0 + 10 * S)


def energies(sink: BrokerSink, channel: str = "active") -> list[str]:
    return [payload for topic, payload in sink.log if topic == f"home/energy/{channel}_energy"]


def test_0_is_published_just_before_the_first_total_and_power_not_before_it_is_measured(tmp_path: Path) -> None:
    sink = BrokerSink()
    w = writer(tmp_path, sink)
    w.publish_all()
    assert energies(sink) == [], "nothing before the first pulse: a calibration may come first"
    w.handle_batch(deliveries(pulse(1, 1)))
    assert energies(sink) == ["0", "0.001"] and "home/energy/active_power" not in sink.retained
    assert energies(sink, "reactive") == [], "a meter without a reactive input has no reactive sensors"
    w.handle_batch(deliveries(pulse(2, 2)))
    w.publish_all()
    assert energies(sink) == ["0", "0.001", "0.002", "0.002"]


def test_no_0_over_a_saved_total_a_retained_value_or_a_calibration(tmp_path: Path) -> None:
    w = writer(tmp_path / "a", BrokerSink())
    w.handle_batch(deliveries(pulse(1, 1)))
    restarted = BrokerSink()
    writer(tmp_path / "a", restarted).publish_all()
    assert energies(restarted) == ["0.001"]

    lost_state = BrokerSink({"home/energy/active_energy": "1234.5"})  # e.g. a writer whose state was lost
    writer(tmp_path / "b", lost_state).publish_all()
    assert energies(lost_state) == []

    calibrated = BrokerSink()
    w = writer(tmp_path / "c", calibrated, EMDC_METER_ID="garage")
    command = SetTotal("main", "active", Decimal("12345.678"), T0, "c1")
    w.handle_batch([Delivery(1, command.routing_key, encode_set_total(command))])
    assert energies(calibrated) == ["12345.678"], "a meter reading is its own zero point"


def test_while_the_broker_cannot_say_what_it_retains_no_0_is_published_nor_later_over_a_total(
        tmp_path: Path) -> None:
    sink = BrokerSink()
    sink.unknown = True
    w = writer(tmp_path, sink, EMDC_REACTIVE_PIN="27")
    w.publish_all()
    assert set(json.loads(sink.retained[DEVICE])["components"]) == set(SENSORS)
    w.handle_batch(deliveries(pulse(1, 1)))
    assert energies(sink) == ["0.001"]
    sink.unknown = False
    w.handle_batch(deliveries(pulse(2, 2), pulse(1, 1, channel="reactive")))
    assert energies(sink) == ["0.001", "0.002"] and energies(sink, "reactive") == ["0", "0.001"]
