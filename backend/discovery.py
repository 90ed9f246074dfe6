"""Home Assistant MQTT discovery: one device per meter with its four sensors.

Device-based discovery (one retained message on
``<prefix>/device/emdc_<meter>/config``, Home Assistant ≥ 2024.11) is the
default; per-entity discovery (``<prefix>/sensor/emdc_<meter>/<name>/config``)
serves older installations. Sensors read the plain state topics, so
hand-made sensors keep working beside them.

Example::

    >>> d = Discovery("homeassistant", "home/energy", style="device")
    >>> [topic for topic, _ in d.messages("main")]
    ['homeassistant/device/emdc_main/config']
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from backend.topics import availability_topic, state_topic
from common import __version__
from common.channels import channel_spec

ORIGIN = {"name": "emdc", "sw": __version__, "url": "https://github.com/emdc-energy/emdc"}


@dataclass(frozen=True)
class SensorSpec:
    channel: str
    quantity: str
    name: str
    device_class: str | None
    unit: str
    state_class: str
    precision: int


def sensor_specs(legacy_units: bool) -> list[SensorSpec]:
    """The four sensors; ``legacy_units`` drops the reactive device classes HA < 2025.6 lacks."""
    reactive_energy_class = None if legacy_units else "reactive_energy"
    reactive_power_class = None if legacy_units else "reactive_power"
    active, reactive = channel_spec("active"), channel_spec("reactive")
    return [
        SensorSpec("active", "energy", "Active energy", "energy", active.total_unit, "total_increasing", 3),
        SensorSpec("active", "power", "Active power", "power", active.rate_unit, "measurement", 3),
        SensorSpec("reactive", "energy", "Reactive energy", reactive_energy_class, reactive.total_unit,
                   "total_increasing", 3),
        SensorSpec("reactive", "power", "Reactive power", reactive_power_class, reactive.rate_unit,
                   "measurement", 3),
    ]


class Discovery:
    """Builds the retained discovery messages (topic, JSON payload) for a meter."""

    def __init__(self, discovery_prefix: str, topic_prefix: str, style: str = "device",
                 legacy_units: bool = False) -> None:
        self.discovery_prefix = discovery_prefix
        self.topic_prefix = topic_prefix
        self.style = style
        self.legacy_units = legacy_units

    @staticmethod
    def device_id(meter: str) -> str:
        return f"emdc_{meter}"

    def _device(self, meter: str) -> dict[str, Any]:
        return {"identifiers": [self.device_id(meter)], "name": f"EMDC {meter} meter", "manufacturer": "EMDC",
                "model": "Pulse meter (S0/LED)", "sw_version": __version__}

    def _sensor(self, meter: str, spec: SensorSpec) -> dict[str, Any]:
        config: dict[str, Any] = {
            "name": spec.name,
            "unique_id": f"{self.device_id(meter)}_{spec.channel}_{spec.quantity}",
            "state_topic": state_topic(self.topic_prefix, meter, spec.channel, spec.quantity),
            "unit_of_measurement": spec.unit,
            "state_class": spec.state_class,
            "suggested_display_precision": spec.precision,
        }
        if spec.device_class:
            config["device_class"] = spec.device_class
        return config

    def topics(self, meter: str) -> list[str]:
        """Every discovery topic of ``meter`` in either style (for removal)."""
        node = self.device_id(meter)
        return [f"{self.discovery_prefix}/device/{node}/config"] + [
            f"{self.discovery_prefix}/sensor/{node}/{s.channel}_{s.quantity}/config" for s in sensor_specs(False)]

    def removal_messages(self, meters: Iterable[str]) -> list[tuple[str, str]]:
        """Empty retained configs on every discovery topic of ``meters``: Home Assistant removes the devices."""
        return [(topic, "") for meter in meters for topic in self.topics(meter)]

    def messages(self, meter: str) -> list[tuple[str, str]]:
        """Discovery messages for ``meter`` in the configured style (none if ``off``)."""
        availability = availability_topic(self.topic_prefix)
        specs = sensor_specs(self.legacy_units)
        if self.style == "device":
            payload = {
                "device": self._device(meter),
                "origin": ORIGIN,
                "components": {f"{s.channel}_{s.quantity}": {"platform": "sensor", **self._sensor(meter, s)}
                               for s in specs},
                "availability_topic": availability,
                "qos": 1,
            }
            return [(f"{self.discovery_prefix}/device/{self.device_id(meter)}/config", json.dumps(payload))]
        if self.style == "entity":
            return [(f"{self.discovery_prefix}/sensor/{self.device_id(meter)}/{s.channel}_{s.quantity}/config",
                     json.dumps({**self._sensor(meter, s), "device": self._device(meter), "origin": ORIGIN,
                                 "availability_topic": availability, "qos": 1}))
                    for s in specs]
        return []
