"""What power (or flow) to show right now: honest at low and falling load.

With 1 Wh per pulse a 100 W load pulses every 36 s, so the last measured power
can be stale for a long time. While a channel is idle, the power cannot be
higher than one pulse over the time since the last one, ``wh·3600/idle``; we
show that bound once it is below the measurement, and 0 after a timeout.

What is measured is the load's level (:mod:`backend.load_level`): the last
interval, except that the first interval after a drop, a mix of the old level
and the new, is read as the level it fell to. Once the next pulse is overdue
(the level's interval × :data:`~backend.load_level.MIXED_FACTOR`), the load has
fallen, at a moment no pulse can tell yet. The bound assumes it fell right after
the last pulse, the most it can be; we show :data:`OVERDUE_SHARE` of it, or the
channel's floor (the lowest level of the last hour, where a house's load
usually falls back to) if that is higher, never more than the bound.

On the benchmark's held-out households (``make bench``, power truth; see
docs/performance.md) this makes the error in the 5 minutes after a drop less
than half that of ESPHome's hold rule; the constants were chosen on its tuning
household only.

The same holds for every kind of channel: rates are reckoned in pulse units
per hour (W for Wh pulses, m³/h for gas, L/h for water), and the bound is
rounded down to the channel's display precision in its rate unit (a whole W,
0.001 m³/h, 0.01 L/min), so the published value never exceeds it.
After a pulse whose timestamp the writer could not trust, power is unknown:
nothing is shown until two trusted pulses measure it again, or 0 once the
writer itself has received nothing for the timeout.

The writer re-evaluates this every second (``power_refresh_s``) for the
channels that are not :func:`settled` and publishes a value only when it
changes at the display precision, at most once per :data:`MIN_PUBLISH_INTERVAL_S`.

Example (1 Wh pulses 1.2 s apart = 3 kW, then silence)::

    >>> s = ChannelState(last_ts_ns=0, wh=1.0, intervals_ns=[1_200_000_000])
    >>> displayed_power_w(s, now_ns=1_000_000_000, timeout_s=300)
    3000.0
    >>> displayed_power_w(s, now_ns=36_000_000_000, timeout_s=300)  # at most 100 W, and overdue
    30.0
    >>> displayed_power_w(s, now_ns=300_000_000_000, timeout_s=300)
    0.0
    >>> settled(s, now_ns=36_000_000_000, timeout_s=300), settled(s, now_ns=300_000_000_000, timeout_s=300)
    (False, True)

Litres a second apart, then one 7 s after the last would be at most 8.57 L/min; overdue, 30 % of it shows,
2.57 L/min (2.571... rounded down), as 154.2 L/h::

    >>> water = ChannelState(last_ts_ns=0, wh=1.0, intervals_ns=[1_000_000_000], kind="water")
    >>> displayed_power_w(water, now_ns=7_000_000_000, timeout_s=300)
    154.2
"""

from __future__ import annotations

import math
from fractions import Fraction

from backend.amounts import per_hour_to_rate
from backend.ledger import NS_PER_S, ChannelState
from backend.load_level import MIXED_FACTOR
from common.channels import channel_spec

# A channel's power is published at most once per this interval: a display that
# follows the load, not a stream of messages.
MIN_PUBLISH_INTERVAL_S = 1.0
# Once the next pulse is overdue the load fell; how far, no pulse can tell yet. The bound assumes it fell just
# after the last pulse (the most it can be); the estimate is this share of it, or the floor if that is higher.
OVERDUE_SHARE = 0.3


def displayed_power_w(state: ChannelState, now_ns: int, timeout_s: float) -> float | None:
    """Power to publish at ``now_ns`` in pulse units per hour (W for Wh pulses), or None when nothing honest
    can be said."""
    if state.ts_doubt:
        quiet = state.received_ns is not None and now_ns - state.received_ns >= timeout_s * NS_PER_S
        return 0.0 if quiet else None
    if state.last_ts_ns is None:
        return None
    idle_ns = now_ns - state.last_ts_ns
    if idle_ns >= timeout_s * NS_PER_S:
        return 0.0
    measured = state.power_w()
    if measured is None:
        return None
    level_ns = state.level.interval_ns
    floor = _rate(state, state.level.floor_interval_ns(now_ns))
    if level_ns is not None:
        measured = min(measured, max(floor, _rate(state, level_ns)))
    if idle_ns <= 0:
        return measured
    bound = physical_bound_w(state, now_ns)
    shown = bound
    if idle_ns > MIXED_FACTOR * (level_ns or state.intervals_ns[-1]):
        shown = min(bound, max(floor, OVERDUE_SHARE * bound))
    return min(measured, rounded_down(state.kind, shown))


def _rate(state: ChannelState, interval_ns: int | None) -> float:
    """One pulse over ``interval_ns`` per hour; 0 for no interval."""
    return state.wh * 3600 * NS_PER_S / interval_ns if interval_ns else 0.0


def rounded_down(channel: str, per_hour: float) -> float:
    """``per_hour`` rounded down to the display precision of ``channel``'s rate unit (whole watts for kW with
    three decimals), exactly, so that rounding the published value never lifts it above the bound."""
    spec = channel_spec(channel)
    quantum = per_hour_to_rate(spec) * 10**spec.rate_decimals  # display steps per pulse unit per hour
    return float(Fraction(math.floor(Fraction(per_hour) * quantum)) / quantum)


def physical_bound_w(state: ChannelState, now_ns: int) -> float:
    """The most a channel can draw on average since its last pulse, per hour: one pulse over the idle time (inf
    at 0)."""
    if state.last_ts_ns is None or now_ns <= state.last_ts_ns:
        return math.inf
    return state.wh * 3600 * NS_PER_S / (now_ns - state.last_ts_ns)


def settled(state: ChannelState, now_ns: int, timeout_s: float) -> bool:
    """True once time alone can no longer change :func:`displayed_power_w` (until the next pulse).

    That is after the timeout, or when nothing can ever be shown: such a
    channel need not be re-evaluated.
    """
    if state.ts_doubt:
        return state.received_ns is None or now_ns - state.received_ns >= timeout_s * NS_PER_S
    return state.last_ts_ns is None or now_ns - state.last_ts_ns >= timeout_s * NS_PER_S
