"""The meter channels a pulse can belong to, and their units: the one table every side reads.

A pulse is a fixed quantity in the channel's *pulse unit* (``wh`` in the
message, watt-hours for ``active``, var-hours for ``reactive``). Totals are
shown in the *total unit*, rates in the *rate unit*::

    >>> CHANNELS
    ('active', 'reactive')
    >>> channel_spec("reactive").total_unit, channel_spec("reactive").rate_unit
    ('kvarh', 'kvar')
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Channel:
    """One kind of pulse output of a meter and the units it is counted in.

    >>> Channel("active", "Active", "Wh", "kWh", "kW").total_unit
    'kWh'
    """

    name: str
    label: str
    pulse_unit: str
    total_unit: str
    rate_unit: str


_TABLE = (
    Channel("active", "Active", "Wh", "kWh", "kW"),
    Channel("reactive", "Reactive", "varh", "kvarh", "kvar"),
)
CHANNELS: tuple[str, ...] = tuple(c.name for c in _TABLE)
_BY_NAME = {c.name: c for c in _TABLE}


def channel_spec(name: str) -> Channel:
    """The channel called ``name``; ``KeyError`` if there is none (callers validate first)."""
    return _BY_NAME[name]
