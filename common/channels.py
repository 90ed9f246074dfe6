"""The meter channels a pulse can belong to, and their units: the one table every side reads.

A pulse is a fixed quantity in the channel's *pulse unit* (the message's
``wh`` field: watt-hours for ``active`` and ``export``, var-hours for
``reactive``, cubic metres for ``gas``, litres for ``water``). Totals are
shown in the *total unit*, rates in the *rate unit*, each with a Home
Assistant device class::

    >>> CHANNELS
    ('active', 'reactive', 'export', 'gas', 'water')
    >>> gas = channel_spec("gas")
    >>> gas.total_topic, gas.total_unit, gas.rate_topic, gas.rate_unit
    ('gas_volume', 'm³', 'gas_flow', 'm³/h')

A rate follows from the quantity of the pulses over the time they took:
``quantity / seconds * rate_factor`` (1 Wh in 1 s is 3.6 kW)::

    >>> channel_spec("active").rate(1.0, 1.0), channel_spec("water").rate(1.0, 6.0)
    (3.6, 10.0)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Channel:
    """One kind of pulse output of a meter: its units, its MQTT topics and what Home Assistant makes of them.

    ``total_divisor`` pulse units make one total unit (1000 Wh in a kWh);
    ``rate_factor`` turns pulse units per second into the rate unit (Wh/s ×
    3.6 = kW). ``default_max_rate`` (in the rate unit) is the most a
    household meter of this kind plausibly measures; ``energy_section`` names
    the Home Assistant Energy dashboard section its total belongs in.

    >>> export = channel_spec("export")
    >>> export.label, export.total_device_class, export.energy_section
    ('Export', 'energy', 'return to grid')
    """

    name: str
    label: str
    pulse_unit: str
    total_unit: str
    rate_unit: str
    total_topic: str
    rate_topic: str
    total_device_class: str
    rate_device_class: str
    total_divisor: int
    rate_factor: float
    rate_decimals: int
    default_per_pulse: float
    default_max_rate: float
    energy_section: str
    # Decimals Home Assistant shows of the total (a Wh of a kWh, a litre of a m³).
    total_decimals: int = 3

    def rate(self, quantity: float, seconds: float) -> float:
        """The rate, in the rate unit, of ``quantity`` pulse units over ``seconds``."""
        return quantity / seconds * self.rate_factor


_TABLE = (
    Channel("active", "Active", "Wh", "kWh", "kW", "active_energy", "active_power", "energy", "power",
            1000, 3.6, 3, 1.0, 100.0, "grid consumption"),
    Channel("reactive", "Reactive", "varh", "kvarh", "kvar", "reactive_energy", "reactive_power",
            "reactive_energy", "reactive_power", 1000, 3.6, 3, 1.0, 100.0, ""),
    Channel("export", "Export", "Wh", "kWh", "kW", "export_energy", "export_power", "energy", "power",
            1000, 3.6, 3, 1.0, 100.0, "return to grid"),
    # A household gas meter (G4 to G10) passes at most 16 m³/h; a reed contact gives one pulse per 0.01 m³.
    Channel("gas", "Gas", "m³", "m³", "m³/h", "gas_volume", "gas_flow", "gas", "volume_flow_rate",
            1, 3600.0, 3, 0.01, 16.0, "gas consumption"),
    # A household water meter (Q3 4 m³/h) passes at most about 100 L/min.
    Channel("water", "Water", "L", "L", "L/min", "water_volume", "water_flow", "water", "volume_flow_rate",
            1, 60.0, 2, 1.0, 100.0, "water consumption", 1),
)
CHANNELS: tuple[str, ...] = tuple(c.name for c in _TABLE)
_BY_NAME = {c.name: c for c in _TABLE}


def channel_spec(name: str) -> Channel:
    """The channel called ``name``; ``KeyError`` if there is none (callers validate first)."""
    return _BY_NAME[name]
