"""MQTT topic names for the two values of each channel of each meter: its total and its rate.

Meter ``main`` keeps the original system's topics (``home/energy/active_energy``);
any other meter gets a sub-level (``home/energy/garage/active_energy``). The
quantity ``energy`` is a channel's total and ``power`` its rate, named as the
channel table says (:mod:`common.channels`)::

    >>> state_topic("home/energy", "main", "active", "energy")
    'home/energy/active_energy'
    >>> state_topic("home/energy", "garage", "reactive", "power")
    'home/energy/garage/reactive_power'
    >>> state_topic("home/energy", "main", "gas", "energy"), state_topic("home/energy", "main", "water", "power")
    ('home/energy/gas_volume', 'home/energy/water_flow')

Payloads are formatted by :mod:`backend.amounts`.
"""

from __future__ import annotations

from common.channels import channel_spec

QUANTITIES = ("energy", "power")
# The gas total converted to kWh (``gas_energy``), published when a calorific value is set.
ENERGY_KWH = "energy_kwh"


def meter_prefix(prefix: str, meter: str) -> str:
    return prefix if meter == "main" else f"{prefix}/{meter}"


def echo_topic(prefix: str) -> str:
    """Where the writer checks that the broker delivers what it publishes under ``prefix`` (not retained)."""
    return f"{prefix}/echo"


def value_name(channel: str, quantity: str) -> str:
    """The last topic level of a channel's total (``energy``) or rate (``power``): ``gas_volume``, ``gas_flow``;
    of the total in kWh (:data:`ENERGY_KWH`): ``gas_energy``."""
    spec = channel_spec(channel)
    if quantity == ENERGY_KWH:
        return f"{channel}_energy"
    return spec.total_topic if quantity == "energy" else spec.rate_topic


def state_topic(prefix: str, meter: str, channel: str, quantity: str) -> str:
    return f"{meter_prefix(prefix, meter)}/{value_name(channel, quantity)}"


def availability_topic(prefix: str, partition: str = "") -> str:
    """Retained ``online``/``offline`` of the writer, with its last will; a partition's writers have their own,
    so that one partition's writer going away marks only its meters unavailable.

    >>> availability_topic("home/energy"), availability_topic("home/energy", "1")
    ('home/energy/status', 'home/energy/status/1')
    """
    return f"{prefix}/status/{partition}" if partition else f"{prefix}/status"


def writer_health_topic(prefix: str, partition: str = "") -> str:
    """Retained JSON: the active writer's RabbitMQ link and dead letters of the last hour
    (:mod:`backend.writer_health`); one per partition, as its availability.

    >>> writer_health_topic("home/energy"), writer_health_topic("home/energy", "1")
    ('home/energy/writer_health', 'home/energy/writer_health/1')
    """
    return f"{prefix}/writer_health/{partition}" if partition else f"{prefix}/writer_health"


def writer_state_topic(prefix: str, partition: str = "") -> str:
    """Retained: the identity of the state the active writer counts in (see :mod:`backend.takeover`); one per
    partition, each of which counts in a state of its own."""
    return f"{prefix}/writer_state/{partition}" if partition else f"{prefix}/writer_state"


def edge_topic(prefix: str, meter: str) -> str:
    """Retained ``online`` or ``offline``: whether ``meter``'s edge is heard from (only for edges that send a
    status). Rate sensors are available only while it and the writer both say ``online``.

    >>> edge_topic("home/energy", "main"), edge_topic("home/energy", "garage")
    ('home/energy/edge', 'home/energy/garage/edge')
    """
    return f"{meter_prefix(prefix, meter)}/edge"


def edge_status_topic(prefix: str, meter: str) -> str:
    """Retained JSON: the diagnostics of ``meter``'s edge, published once per status it sends."""
    return f"{meter_prefix(prefix, meter)}/edge_status"
