"""Home Assistant MQTT discovery: one device per meter with two sensors per channel, its total and its rate.

Device-based discovery (one retained message on
``<prefix>/device/emdc_<meter>/config``, Home Assistant ≥ 2024.11) is the
default; per-entity discovery (``<prefix>/sensor/emdc_<meter>/<name>/config``)
serves older installations. Sensors read the plain state topics, so
hand-made sensors keep working beside them. Each total is a
``total_increasing`` sensor with the device class and unit of its channel
(energy in kWh, gas in m³, water in L), which the Energy dashboard accepts;
each rate a ``measurement``. The writer announces only the channels a meter
has (see :meth:`backend.writer.EnergyWriter`).

Home Assistant refuses a config for a sensor it already knows from the other
style ("conflicting MQTT discovery message"). So announcing takes the configs
retained for the meter into account: those of the other style are handed over
as Home Assistant's migration asks (``migrate_discovery`` on the old topic,
the old topic cleared, then the new config: a real Home Assistant reads a
clear after the new config as a conflict), which keeps the entities and
their history. Only topics that hold a config are touched.

A meter whose edge sends statuses (``edge=True``) also gets diagnostic
entities (:data:`DIAGNOSTICS`: its edge's health and the writer's), and its rate sensors are available only while
both the writer and the edge say ``online`` (``availability_mode: all``): a
silent edge makes its rates unavailable, while its totals keep their last
value. Every entity then names its own availability (the writer's MQTT link
has none: a dead writer shows as disconnected), since Home Assistant
refuses an entity that has both the shared ``availability_topic`` and an
``availability`` list.

Example::

    >>> d = Discovery("homeassistant", "home/energy", style="device")
    >>> [topic for topic, _ in d.messages("main")]
    ['homeassistant/device/emdc_main/config']
    >>> old = "homeassistant/sensor/emdc_main/active_energy/config"
    >>> for topic, payload in d.handover("main", {old: "{...}"}):
    ...     print(topic, payload[:12] or "(empty)")
    homeassistant/sensor/emdc_main/active_energy/config {"migrate_di
    homeassistant/sensor/emdc_main/active_energy/config (empty)
    homeassistant/device/emdc_main/config {"device": {
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from backend.topics import (
    ENERGY_KWH,
    availability_topic,
    edge_status_topic,
    edge_topic,
    state_topic,
    value_name,
    writer_health_topic,
)
from common import __version__
from common.channels import CHANNELS, channel_spec

ORIGIN = {"name": "emdc", "sw": __version__, "url": "https://github.com/emdc-energy/emdc"}
# Home Assistant unloads the entities of a topic carrying this, keeping them for the config that takes them over.
MIGRATE = json.dumps({"migrate_discovery": True})


@dataclass(frozen=True)
class SensorSpec:
    channel: str
    quantity: str
    name: str
    device_class: str | None
    unit: str
    state_class: str
    precision: int


    @property
    def component(self) -> str:
        """Its key in a device config, and the last level of its state topic: ``active_energy``, ``gas_flow``."""
        return value_name(self.channel, self.quantity)


# Device classes Home Assistant before 2025.6 does not know (``ha_legacy_units`` leaves them out).
LEGACY_CLASSES = ("reactive_energy", "reactive_power")


def sensor_specs(legacy_units: bool, gas_energy: bool = False) -> list[SensorSpec]:
    """The total and rate sensor of every channel; ``legacy_units`` drops the reactive device classes HA < 2025.6
    lacks, ``gas_energy`` adds the gas total in kWh (a calorific value is set).

    >>> gas = [s for s in sensor_specs(False) if s.channel == "gas"]
    >>> [(s.component, s.device_class, s.unit, s.state_class) for s in gas]
    [('gas_volume', 'gas', 'm³', 'total_increasing'), ('gas_flow', 'volume_flow_rate', 'm³/h', 'measurement')]
    """
    specs = []
    for channel in CHANNELS:
        spec = channel_spec(channel)
        for quantity, device_class, unit, state_class, precision in (
                ("energy", spec.total_device_class, spec.total_unit, "total_increasing", spec.total_decimals),
                ("power", spec.rate_device_class, spec.rate_unit, "measurement", spec.rate_decimals)):
            name = value_name(channel, quantity).replace("_", " ").capitalize()
            shown_class = None if legacy_units and device_class in LEGACY_CLASSES else device_class
            specs.append(SensorSpec(channel, quantity, name, shown_class, unit, state_class, precision))
    if gas_energy:
        energy = channel_spec("active")
        specs.append(SensorSpec("gas", ENERGY_KWH, "Gas energy", energy.total_device_class, energy.total_unit,
                                "total_increasing", energy.total_decimals))
    return specs


@dataclass(frozen=True)
class DiagnosticSpec:
    """One diagnostic entity of a meter whose edge sends statuses. ``source`` is the topic it reads: ``edge``
    (online/offline), ``edge_status`` (its JSON), ``writer`` (the writer's availability: online/offline, the
    entity itself always available, so that a dead writer shows as disconnected) or ``writer_health`` (its
    JSON); ``key`` names the value in a JSON topic."""

    component: str
    name: str
    platform: str
    source: str
    key: str | None = None
    device_class: str | None = None
    unit: str | None = None
    state_class: str | None = None


DIAGNOSTICS = (
    DiagnosticSpec("edge_connectivity", "Edge connectivity", "binary_sensor", "edge", None, "connectivity"),
    DiagnosticSpec("edge_pending", "Pulses pending", "sensor", "edge_status", "pending", None, "pulses",
                   "measurement"),
    DiagnosticSpec("edge_outbox", "Edge outbox", "sensor", "edge_status", "outbox", None, "pulses", "measurement"),
    DiagnosticSpec("edge_last_pulse", "Last pulse", "sensor", "edge_status", "last_pulse", "timestamp"),
    DiagnosticSpec("edge_rejected", "Rejected noise pulses", "sensor", "edge_status", "rejected", None, "pulses",
                   "total_increasing"),
    DiagnosticSpec("edge_clock_synced", "Clock synchronised", "binary_sensor", "edge_status", "synced"),
    DiagnosticSpec("edge_version", "Edge software version", "sensor", "edge_status", "version"),
    DiagnosticSpec("edge_cpu_temperature", "CPU temperature", "sensor", "edge_status", "cpu_c", "temperature", "°C",
                   "measurement"),
    DiagnosticSpec("writer_mqtt", "Writer connected to MQTT", "binary_sensor", "writer", None, "connectivity"),
    DiagnosticSpec("writer_rabbitmq", "Writer connected to RabbitMQ", "binary_sensor", "writer_health", "rabbitmq",
                   "connectivity"),
    DiagnosticSpec("writer_dead_letters", "Dead letters in the last hour", "sensor", "writer_health",
                   "dead_letters_hour", None, "messages", "measurement"),
)


PLATFORMS = ("sensor", "binary_sensor")


class Discovery:
    """Builds the retained discovery messages (topic, JSON payload) for a meter."""

    def __init__(self, discovery_prefix: str, topic_prefix: str, style: str = "device",
                 legacy_units: bool = False, gas_energy: bool = False, availability: str = "",
                 health: str = "") -> None:
        self.discovery_prefix = discovery_prefix
        # The availability topic of the writer that counts the meters: its partition's, if partitioned.
        self.availability = availability or availability_topic(topic_prefix)
        # The health topic of that writer (its RabbitMQ link and dead letters: backend.writer_health).
        self.health = health or writer_health_topic(topic_prefix)
        self.topic_prefix = topic_prefix
        self.style = style
        self.legacy_units = legacy_units
        self.gas_energy = gas_energy

    @staticmethod
    def device_id(meter: str) -> str:
        return f"emdc_{meter}"

    def _device(self, meter: str) -> dict[str, Any]:
        return {"identifiers": [self.device_id(meter)], "name": f"EMDC {meter} meter", "manufacturer": "EMDC",
                "model": "Pulse meter (S0/LED)", "sw_version": __version__}

    def _sensor(self, meter: str, spec: SensorSpec) -> dict[str, Any]:
        config: dict[str, Any] = {
            "name": spec.name,
            "unique_id": f"{self.device_id(meter)}_{spec.component}",
            "state_topic": state_topic(self.topic_prefix, meter, spec.channel, spec.quantity),
            "unit_of_measurement": spec.unit,
            "state_class": spec.state_class,
            "suggested_display_precision": spec.precision,
        }
        if spec.device_class:
            config["device_class"] = spec.device_class
        return config

    def scan_filters(self, meter: str) -> list[str]:
        """The topic filters of every discovery config of ``meter`` in either style: what to scan for retained ones."""
        node = self.device_id(meter)
        return [f"{self.discovery_prefix}/device/{node}/config", f"{self.discovery_prefix}/sensor/{node}/+/config",
                f"{self.discovery_prefix}/binary_sensor/{node}/+/config"]

    def _components(self, meter: str, topic: str, payload: str) -> set[str] | None:
        """The sensors (``active_energy``, ...) a retained config on ``topic`` describes; None if not one of ours."""
        node = self.device_id(meter)
        levels = topic.removeprefix(f"{self.discovery_prefix}/").split("/")
        if levels == ["device", node, "config"]:
            try:
                return set(json.loads(payload)["components"])
            except (ValueError, KeyError, TypeError):  # e.g. a handover interrupted half way: assume all
                return {s.component for s in sensor_specs(False, gas_energy=True)} | {d.component for d in DIAGNOSTICS}
        if len(levels) == 4 and levels[0] in PLATFORMS and levels[1] == node and levels[3] == "config":
            return {levels[2]}
        return None

    def _held(self, meter: str, retained: Mapping[str, str]) -> dict[str, set[str]]:
        """The topics of ``meter`` that hold a config, with the sensors of each, sorted by topic."""
        held = {}
        for topic in sorted(retained):
            components = self._components(meter, topic, retained[topic]) if retained[topic] else None
            if components is not None:
                held[topic] = components
        return held

    def announced_edge(self, meter: str, retained: Mapping[str, str]) -> bool:
        """True if ``retained`` (a scan of :meth:`scan_filters`) announces ``meter`` with its edge's diagnostics."""
        edge = {d.component for d in DIAGNOSTICS}
        return any(held & edge for held in self._held(meter, retained).values())

    def handover(self, meter: str, retained: Mapping[str, str],
                 channels: Collection[str] = CHANNELS, edge: bool = False) -> list[tuple[str, str]]:
        """What to publish, in this order, to announce ``meter`` while ``retained`` (topic → payload, a scan of
        :meth:`scan_filters`) holds its configs: stale configs of sensors announced anew are handed over
        (``migrate_discovery``, then cleared, then the new config: the order a real Home Assistant accepts
        without a warning), those of sensors no longer announced are cleared. Nothing at all when discovery is
        ``off``."""
        messages = self.messages(meter, channels, edge)
        if not messages:
            return []
        announced = {topic for topic, _ in messages}
        sensors = set().union(*(self._components(meter, topic, payload) or set() for topic, payload in messages))
        stale = {topic: held for topic, held in self._held(meter, retained).items() if topic not in announced}
        taken = [topic for topic, held in stale.items() if held & sensors]
        # Cleared before the new config: Home Assistant reads a clear after it as a conflicting message.
        return [(topic, MIGRATE) for topic in taken] + [(topic, "") for topic in stale] + messages

    def removal_messages(self, meters: Iterable[str], retained: Mapping[str, str]) -> list[tuple[str, str]]:
        """Empty retained configs on the topics of ``meters`` that hold one in ``retained`` (a scan of
        :meth:`scan_filters`): Home Assistant removes the devices. Per-entity configs go first: a leftover device
        config beside them is one Home Assistant ignored, and clearing it first would conflict with them."""
        messages = []
        for meter in meters:
            held = self._held(meter, retained)
            messages += sorted(((topic, "") for topic in held), key=lambda message: "/device/" in message[0])
        return messages

    def _diagnostic(self, meter: str, spec: DiagnosticSpec) -> dict[str, Any]:
        config: dict[str, Any] = {"name": spec.name, "unique_id": f"{self.device_id(meter)}_{spec.component}",
                                  "entity_category": "diagnostic"}
        topic = {"edge": edge_topic(self.topic_prefix, meter), "writer": self.availability,
                 "edge_status": edge_status_topic(self.topic_prefix, meter), "writer_health": self.health}[spec.source]
        config["state_topic"] = topic
        if spec.key is None:
            config |= {"payload_on": "online", "payload_off": "offline"}
        else:
            config["value_template"] = f"{{{{ value_json.{spec.key} }}}}"
        for key, value in (("device_class", spec.device_class), ("unit_of_measurement", spec.unit),
                           ("state_class", spec.state_class)):
            if value:
                config[key] = value
        if spec.source != "writer":
            config |= self._availability(meter, False)
        return config

    def _availability(self, meter: str, rate: bool) -> dict[str, Any]:
        """The availability of an entity of a meter whose edge sends statuses: the writer's, and for a rate also
        the edge's."""
        topics = [self.availability, *([edge_topic(self.topic_prefix, meter)] if rate else [])]
        return {"availability": [{"topic": topic} for topic in topics], "availability_mode": "all"}

    def _entities(self, meter: str, channels: Collection[str], edge: bool) -> list[tuple[str, str, dict[str, Any]]]:
        """(platform, component, config) of every entity of ``meter``; with ``edge``, each with its availability."""
        specs = [s for s in sensor_specs(self.legacy_units, self.gas_energy) if s.channel in channels]
        entities = [("sensor", s.component, self._sensor(meter, s)
                     | (self._availability(meter, s.quantity == "power") if edge else {})) for s in specs]
        if edge:
            entities += [(d.platform, d.component, self._diagnostic(meter, d)) for d in DIAGNOSTICS]
        return entities

    def messages(self, meter: str, channels: Collection[str] = CHANNELS, edge: bool = False) -> list[tuple[str, str]]:
        """Discovery messages for ``meter`` with the sensors of ``channels`` (and, with ``edge``, its diagnostics
        and the edge's availability on its rates), in the configured style (none if ``off``)."""
        entities = self._entities(meter, channels, edge)
        shared = {} if edge else {"availability_topic": self.availability}
        if self.style == "device":
            payload = {
                "device": self._device(meter),
                "origin": ORIGIN,
                "components": {component: {"platform": platform, **config}
                               for platform, component, config in entities},
                **shared,
                "qos": 1,
            }
            return [(f"{self.discovery_prefix}/device/{self.device_id(meter)}/config", json.dumps(payload))]
        if self.style == "entity":
            return [(f"{self.discovery_prefix}/{platform}/{self.device_id(meter)}/{component}/config",
                     json.dumps({**config, "device": self._device(meter), "origin": ORIGIN, **shared, "qos": 1}))
                    for platform, component, config in entities]
        return []
