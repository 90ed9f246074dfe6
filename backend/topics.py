"""MQTT topic names for the four values of each meter.

Meter ``main`` keeps the original system's topics (``home/energy/active_energy``);
any other meter gets a sub-level (``home/energy/garage/active_energy``)::

    >>> state_topic("home/energy", "main", "active", "energy")
    'home/energy/active_energy'
    >>> state_topic("home/energy", "garage", "reactive", "power")
    'home/energy/garage/reactive_power'

Payloads are formatted by :mod:`backend.amounts`.
"""

from __future__ import annotations

QUANTITIES = ("energy", "power")


def meter_prefix(prefix: str, meter: str) -> str:
    return prefix if meter == "main" else f"{prefix}/{meter}"


def echo_topic(prefix: str) -> str:
    """Where the writer checks that the broker delivers what it publishes under ``prefix`` (not retained)."""
    return f"{prefix}/echo"


def state_topic(prefix: str, meter: str, channel: str, quantity: str) -> str:
    return f"{meter_prefix(prefix, meter)}/{channel}_{quantity}"


def availability_topic(prefix: str) -> str:
    return f"{prefix}/status"


def writer_state_topic(prefix: str) -> str:
    """Retained: the identity of the state the active writer counts in (see :mod:`backend.takeover`)."""
    return f"{prefix}/writer_state"
