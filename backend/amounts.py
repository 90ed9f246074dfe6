"""How energy and power amounts are written, from the integer micro-units the writer counts in.

Totals published to MQTT are exact (a billing value must not round); the
report's tables round to one Wh (three decimals of a kWh)::

    >>> format_kwh(1_234_600_000), format_kwh_rounded(1_234_600_000), format_kw(1234.6)
    ('1.2346', '1.235', '1.235')
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

UWH_PER_KWH = 10**9


def format_kwh(total_uwh: int) -> str:
    """Exact decimal kWh (kvarh) from integer microwatt-hours, without trailing zeros."""
    whole, frac = divmod(total_uwh, UWH_PER_KWH)
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".")


def format_kwh_rounded(total_uwh: int) -> str:
    """kWh (kvarh) with three decimals, half to even: one Wh, for tables."""
    return str((Decimal(total_uwh) / UWH_PER_KWH).quantize(Decimal("0.001"), ROUND_HALF_EVEN))


def format_kw(power_w: float) -> str:
    """kW (kvar) with three decimals, from watts."""
    return f"{power_w / 1000:.3f}"
