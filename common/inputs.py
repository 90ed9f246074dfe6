"""The pulse inputs of a Pi: which pin reads which meter output, and how its pulses are told from noise.

An input is a GPIO pin wired to one pulse output (an S0 output, an LED
sensor or a reed switch), the channel it counts and the quantity of one
pulse in the channel's pulse unit. Its *type* sets the pull-up and the
filter preset; each filter value can be overridden::

    >>> gas = Input.of(pin=22, channel="gas", type="reed")
    >>> gas.per_pulse, gas.pull_up, gas.min_pulse_ms, gas.bounce_ms
    (0.01, True, 80.0, 20.0)
    >>> gas.min_interval_ms   # 0.01 m³ at twice 16 m³/h
    1125.0

The shortest interval between pulses follows from the quantity per pulse
and the channel's most plausible rate, with a margin (:func:`derived_min_interval_ms`):
a fixed 20 ms would, at 10,000 imp/kWh, refuse anything above 18 kW.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.channels import channel_spec

# Pulses may come this many times faster than the channel's plausible maximum before they count as noise.
RATE_MARGIN = 2.0


@dataclass(frozen=True, slots=True)
class InputType:
    """How one kind of pulse output is wired and what its pulses look like.

    ``min_pulse_ms`` is the shortest closure that is a pulse; an opening
    shorter than ``bounce_ms`` does not end one (contact bounce, a glitch):
    the pulse goes on and is counted once. ``nominal_pulse_ms`` is the width
    a typical meter gives (the simulator uses it).

    >>> INPUT_TYPES["s0"].min_pulse_ms, INPUT_TYPES["led"].pull_up
    (25.0, False)
    """

    name: str
    pull_up: bool
    min_pulse_ms: float
    bounce_ms: float
    nominal_pulse_ms: float
    wiring: str


# S0 (IEC 62053-31): on >= 30 ms and off >= 30 ms; 25 ms leaves room for the optocoupler's and the edge's skew.
# A reed contact of a gas or water meter closes for 100 ms or more (Honeywell EI3 >= 125 ms) and bounces for a
# few ms when it closes and opens.
_TYPES = (
    InputType("s0", True, 25.0, 0.0, 30.0, "S0 open collector between the pin and GND, pull-up to 3.3 V"),
    InputType("led", False, 2.0, 0.0, 10.0, "LED (photodiode) sensor driving the pin high while the LED is lit"),
    InputType("reed", True, 80.0, 20.0, 200.0, "reed switch between the pin and GND, pull-up to 3.3 V"),
)
INPUT_TYPES = {t.name: t for t in _TYPES}


def derived_min_interval_ms(channel: str, per_pulse: float) -> float:
    """The shortest plausible time between two pulses of ``per_pulse`` on ``channel``, in ms.

    One pulse at :data:`RATE_MARGIN` times the channel's ``default_max_rate``::

        >>> derived_min_interval_ms("active", 1.0), derived_min_interval_ms("active", 0.1)   # 1000 and 10,000 imp/kWh
        (18.0, 1.8)
    """
    spec = channel_spec(channel)
    per_second = RATE_MARGIN * spec.default_max_rate / spec.rate_factor
    return round(per_pulse / per_second * 1000, 6)


# The keys of one [[inputs]] table: (value type, default as documented, help). The docs' table is made from it.
INPUT_KEYS: dict[str, tuple[type, str, str]] = {
    "pin": (int, "required", "BCM GPIO number, 0 to 27 (GPIO17 is header pin 11); one input per pin"),
    "channel": (str, "required", "What the pulses count: active (import), export, reactive, gas or water; "
                                 "one input per channel"),
    "type": (str, "required", "s0 (open collector, pull-up), led (sensor driving the pin high) or reed "
                              "(switch, pull-up, contact bounce ignored)"),
    "per_pulse": (float, "the channel's usual", "Quantity of one pulse in the channel's unit: Wh (1000 imp/kWh = "
                                                "1), varh, m³ (gas, 0.01) or L (water, 1)"),
    "min_pulse_ms": (float, "the type's", "Closures shorter than this are noise"),
    "bounce_ms": (float, "the type's", "Openings shorter than this do not end a pulse: contact bounce or a glitch, "
                                       "the pulse is counted once"),
    "min_interval_ms": (float, "derived", "Pulses closer than this to the previous are noise (default: one "
                                          "pulse at twice the channel's plausible maximum rate)"),
}


@dataclass(frozen=True, slots=True)
class Input:
    """One configured pulse input with every filter value resolved.

    ``setting`` names where it was configured (``inputs[2]``, or
    ``active_pin`` for a configuration without ``[[inputs]]``), for messages.

    >>> Input.of(pin=17, channel="active", type="s0", per_pulse=0.1).describe()
    'GPIO17: active, s0, 0.1 Wh per pulse, pulses >= 25 ms, >= 1.8 ms apart'
    """

    pin: int
    channel: str
    type: str
    per_pulse: float
    min_pulse_ms: float
    bounce_ms: float
    min_interval_ms: float
    setting: str = field(default="", compare=False)

    @classmethod
    def of(cls, *, pin: int, channel: str, type: str, per_pulse: float | None = None,
           min_pulse_ms: float | None = None, bounce_ms: float | None = None,
           min_interval_ms: float | None = None, setting: str = "") -> Input:
        """An input with what is not given taken from its type and channel (both must exist)."""
        preset = INPUT_TYPES[type]
        quantity = channel_spec(channel).default_per_pulse if per_pulse is None else per_pulse
        return cls(pin, channel, type, quantity,
                   preset.min_pulse_ms if min_pulse_ms is None else min_pulse_ms,
                   preset.bounce_ms if bounce_ms is None else bounce_ms,
                   derived_min_interval_ms(channel, quantity) if min_interval_ms is None else min_interval_ms, setting)

    @property
    def pull_up(self) -> bool:
        return INPUT_TYPES[self.type].pull_up

    def describe(self) -> str:
        """One line for logs, ``emdc edge status`` and ``emdc config show``."""
        bounce = f", bounce {self.bounce_ms:g} ms" if self.bounce_ms else ""
        unit = channel_spec(self.channel).pulse_unit
        return (f"GPIO{self.pin}: {self.channel}, {self.type}, {self.per_pulse:g} {unit} per pulse"
                f", pulses >= {self.min_pulse_ms:g} ms{bounce}, >= {self.min_interval_ms:g} ms apart")

    def as_toml(self) -> dict[str, Any]:
        """The input as the keys of an ``[[inputs]]`` table."""
        return {"pin": self.pin, "channel": self.channel, "type": self.type, "per_pulse": self.per_pulse,
                "min_pulse_ms": self.min_pulse_ms, "bounce_ms": self.bounce_ms,
                "min_interval_ms": self.min_interval_ms}

