"""How totals and rates are written, from the integer micro-units the writer counts in.

Every channel is counted in micro-units of its pulse unit (µWh, µvarh, µm³,
µL; see :mod:`common.channels`). Totals published to MQTT are exact in the
channel's total unit (a billing value must not round); the report's tables
round to the channel's rate precision. Rates come in pulse units per hour
(W for watt-hour pulses) and are written in the rate unit::

    >>> format_kwh(1_234_600_000), format_kwh_rounded(1_234_600_000), format_kw(1234.6)
    ('1.2346', '1.235', '1.235')
    >>> format_total("gas", 1_234_560_000), format_total("water", 12_500_000), format_rate("water", 750.0)
    ('1234.56', '12.5', '12.50')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

from common.channels import Channel, channel_spec

MICRO = 10**6
UWH_PER_KWH = 10**9
SECONDS_PER_HOUR = 3600


def micro_per_total(channel: str) -> int:
    """Micro pulse units in one total unit: 10⁹ µWh in a kWh, 10⁶ µm³ in a m³."""
    return MICRO * channel_spec(channel).total_divisor


def format_total(channel: str, total_micro: int) -> str:
    """Exact decimal total in the channel's total unit from integer micro pulse units, without trailing zeros."""
    per = micro_per_total(channel)
    whole, frac = divmod(total_micro, per)
    digits = len(str(per)) - 1
    return f"{whole}.{frac:0{digits}d}".rstrip("0").rstrip(".")


def format_total_rounded(channel: str, total_micro: int, decimals: int = 3) -> str:
    """The total in its unit with ``decimals`` decimals, half to even (three: one Wh of a kWh): for tables."""
    step = Decimal(1).scaleb(-decimals)
    return str((Decimal(total_micro) / micro_per_total(channel)).quantize(step, ROUND_HALF_EVEN))


def format_kwh(total_uwh: int) -> str:
    """Exact decimal kWh (kvarh) from integer microwatt-hours, without trailing zeros."""
    return format_total("active", total_uwh)


def format_kwh_rounded(total_uwh: int) -> str:
    """kWh (kvarh) with three decimals, half to even: one Wh, for tables."""
    return format_total_rounded("active", total_uwh)


@dataclass(frozen=True)
class GasEnergy:
    """The energy of a gas volume, as the gas bill reckons it: m³ × calorific value (kWh/m³) × correction factor.

    The values are the bill's decimals, taken as written (not as binary floats), and the energy is rounded
    down to the µWh, so it grows with the volume and is never above the billed energy::

        >>> GasEnergy(11.2, 0.9523).uwh(1_000_000)  # 1 m³
        10665760000
        >>> format_kwh(GasEnergy(11.2, 0.9523).uwh(1_234_560_000))
        '13167.5206656'
    """

    calorific_kwh_m3: float
    correction: float = 1.0

    def uwh(self, total_um3: int) -> int:
        """µWh of ``total_um3`` µm³ of gas."""
        factor = Fraction(str(self.calorific_kwh_m3)) * Fraction(str(self.correction))
        return math.floor(total_um3 * factor * 1000)  # µm³ · kWh/m³ = mWh; 1000 µWh each


def per_hour_to_rate(spec: Channel) -> Fraction:
    """What a rate in pulse units per hour (W, var, m³/h, L/h) is multiplied by to be in the rate unit."""
    return Fraction(str(spec.rate_factor)) / SECONDS_PER_HOUR


def per_rate_unit(channel: str) -> float:
    """Pulse units per hour in one rate unit: 1000 W in a kW, 60 L/h in a L/min."""
    return float(1 / per_hour_to_rate(channel_spec(channel)))


def format_rate(channel: str, per_hour: float) -> str:
    """The rate in the channel's rate unit with its decimals, from pulse units per hour."""
    return f"{per_hour / per_rate_unit(channel):.{channel_spec(channel).rate_decimals}f}"


def format_kw(power_w: float) -> str:
    """kW (kvar) with three decimals, from watts."""
    return format_rate("active", power_w)
