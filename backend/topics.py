"""MQTT topic names and payload formatting for the four values of each meter.

Meter ``main`` keeps the original system's topics (``home/energy/active_energy``);
any other meter gets a sub-level (``home/energy/garage/active_energy``)::

    >>> state_topic("home/energy", "main", "active", "energy")
    'home/energy/active_energy'
    >>> format_kwh(1_234_500_000)
    '1.2345'
"""

from __future__ import annotations

QUANTITIES = ("energy", "power")


def meter_prefix(prefix: str, meter: str) -> str:
    return prefix if meter == "main" else f"{prefix}/{meter}"


def state_topic(prefix: str, meter: str, channel: str, quantity: str) -> str:
    return f"{meter_prefix(prefix, meter)}/{channel}_{quantity}"


def availability_topic(prefix: str) -> str:
    return f"{prefix}/status"


def format_kwh(total_uwh: int) -> str:
    """Exact decimal kWh (kvarh) from integer microwatt-hours."""
    whole, frac = divmod(total_uwh, 10**9)
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".")


def format_kw(power_w: float) -> str:
    return f"{power_w / 1000:.3f}"
