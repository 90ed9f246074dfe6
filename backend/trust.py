"""What the writer believes of a pulse: its counter always, its timestamp only when it can.

The counter (``epoch``, ``seq``) is the truth about energy; a timestamp only
carries timing. So a pulse is counted whatever its timestamp says, and the
timestamp is used for power and for time-based checks only if it is
*trusted*: not further ahead of the writer's own clock than allowed, after
the channel's last trusted pulse, and not from an edge that reports its clock
unsynchronised. An untrusted timestamp is kept for the record.

A counter jump (``seq`` advancing by more than one, or a new epoch starting
high) must still be plausible, without relying on the edge's clock: the
jump's implied power is judged over the *longer* of the edge's trusted
interval and the writer's own receive interval, so a wrong edge clock can
loosen the bound but never make it refuse genuine pulses.

A stream of single pulses is held to the same limit by a *credit* per
channel, kept on both clocks: the time by which the energy credited so far
would have been delivered at the limit, counted from the channel's last
pulse with a trusted timestamp that leaves room for the energy before it
(only such a pulse says when the energy was there; before one, from the
meter's admission or the epoch's start). A pulse
may be counted if that time, with its own energy added, is not further
ahead of the pulse's time than one pulse at the limit, by either clock: on
the edge's clock (a trusted timestamp) an outage's backlog received at once
counts, as its pulses are stamped across the outage; on the writer's clock
a backlog whose timestamps cannot be trusted counts too, as the outage's
time is still unspent. A flood faster than the limit cannot pass either.
Example::

    >>> S = 10**9
    >>> timestamp_doubt(1000 * S, now_ns=1000 * S, previous_ns=990 * S, max_ahead_ns=600 * S, synced=None)
    ''
    >>> timestamp_doubt(4600 * S, now_ns=1000 * S, previous_ns=990 * S, max_ahead_ns=600 * S, synced=None)
    "ts_ns 4600000000000 is 3600 s ahead of the writer's clock"
    >>> jump_doubt(3600, wh=1.0, edge_elapsed_ns=None, received_elapsed_ns=3600 * S, max_power_w=3600)
    ''
    >>> jump_doubt(3601, wh=1.0, edge_elapsed_ns=None, received_elapsed_ns=3600 * S, max_power_w=3600)
    'a jump of 3601 pulses in 3600.000 s implies 3.6 kW, above the 3.6 kW limit'
    >>> limit_ns(1_000_000, max_power_w=100_000)  # 1 Wh at 100 kW takes 36 ms
    36000000
    >>> credit_doubt(edge_ahead_ns=None, received_ahead_ns=36_000_000, slack_ns=36_000_000, max_power_w=100_000)
    ''
    >>> credit_doubt(edge_ahead_ns=80_000_000, received_ahead_ns=72_000_000, slack_ns=36_000_000,
    ...              max_power_w=100_000)
    'pulses arrive faster than the 100 kW limit allows: at that power this one could not come for another 0.036 s'
"""

from __future__ import annotations

import math

from backend.amounts import per_rate_unit
from common.channels import channel_spec
from common.topology import EDGE_USER_PREFIX

NS_PER_S = 1_000_000_000


def timestamp_doubt(ts_ns: int, *, now_ns: int | None, previous_ns: int | None, max_ahead_ns: int,
                    synced: bool | None) -> str:
    """Why ``ts_ns`` cannot be trusted, or ``""`` if it can.

    ``now_ns`` is the writer's clock (None: no such check), ``previous_ns`` the
    channel's last trusted timestamp, ``synced`` what the edge says of its
    clock (None: it does not say).
    """
    if synced is False:
        return "the edge reports its clock as not synchronised"
    if now_ns is not None and ts_ns > now_ns + max_ahead_ns:
        return f"ts_ns {ts_ns} is {(ts_ns - now_ns) / NS_PER_S:.0f} s ahead of the writer's clock"
    if previous_ns is not None and ts_ns <= previous_ns:
        return f"ts_ns {ts_ns} is not after the channel's previous pulse ({previous_ns})"
    return ""


def jump_doubt(new: int, *, wh: float, edge_elapsed_ns: int | None, received_elapsed_ns: int | None,
               max_power_w: float, channel: str = "active") -> str:
    """Why counting ``new`` pulses of ``wh`` at once is implausible, or ``""`` if it is not.

    ``wh`` is the quantity per pulse in the channel's pulse unit and
    ``max_power_w`` the limit in pulse units per hour (W for Wh pulses, L/h
    for litre pulses); the reason names both in the channel's rate unit.

    ``edge_elapsed_ns`` is the time since the reference pulse by trusted edge
    timestamps (None if either is untrusted), ``received_elapsed_ns`` by the
    writer's receive times (None if unknown). With neither, a jump cannot be
    judged and is accepted.
    """
    if new <= 1:
        return ""
    elapsed = max(edge_elapsed_ns or 0, received_elapsed_ns or 0)
    if edge_elapsed_ns is None and received_elapsed_ns is None:
        return ""
    implied_w = new * wh * 3600 * NS_PER_S / elapsed if elapsed > 0 else float("inf")
    if implied_w <= max_power_w:
        return ""
    unit, per_unit = channel_spec(channel).rate_unit, per_rate_unit(channel)
    return (f"a jump of {new} pulses in {elapsed / NS_PER_S:.3f} s implies {implied_w / per_unit:.1f} {unit}, "
            f"above the {max_power_w / per_unit:g} {unit} limit")


def limit_ns(uwh: int, *, max_power_w: float) -> int:
    """How long ``uwh`` micro pulse units take at ``max_power_w`` pulse units per hour, in ns (rounded up)."""
    return math.ceil(uwh * 3_600_000 / max_power_w)


def credit_doubt(*, edge_ahead_ns: int | None, received_ahead_ns: int | None, slack_ns: int,
                 max_power_w: float, channel: str = "active") -> str:
    """Why a pulse that would put a channel's credit ``edge_ahead_ns`` ahead of its timestamp and
    ``received_ahead_ns`` ahead of the writer's clock comes too fast ("" if it does not).

    Either clock may vouch for the pulse (None: that clock cannot judge it;
    neither: nothing to judge by, accepted); ``slack_ns`` is one pulse at the
    limit, since pulses at the limit come at most one pulse early.
    """
    if edge_ahead_ns is None:
        if received_ahead_ns is None or received_ahead_ns <= slack_ns:
            return ""
    elif edge_ahead_ns <= slack_ns or (received_ahead_ns is not None and received_ahead_ns <= slack_ns):
        return ""
    known = [ahead for ahead in (edge_ahead_ns, received_ahead_ns) if ahead is not None]
    unit, per_unit = channel_spec(channel).rate_unit, per_rate_unit(channel)
    return (f"pulses arrive faster than the {max_power_w / per_unit:g} {unit} limit allows: at that power this "
            f"one could not come for another {(min(known) - slack_ns) / NS_PER_S:.3f} s")


def sender_doubt(user_id: str, meter: str) -> str:
    """Why a pulse of ``meter`` cannot come from the account ``user_id`` ("" if it can).

    RabbitMQ vouches for ``user_id`` (it refuses one that is not the
    publishing connection's user). A Pi's own account is named after its
    meter, so such an account sending another meter's pulse means a broker
    permission that is too wide; other accounts (the shared edge account of
    older installs, an admin's tools) are not judged here.

    >>> sender_doubt("emdc-edge-garage", "garage"), sender_doubt("emdc-edge", "garage")
    ('', '')
    >>> sender_doubt("emdc-edge-shed", "garage")
    "published by emdc-edge-shed, the account of meter 'shed', not of meter 'garage'"
    """
    own = user_id.removeprefix(EDGE_USER_PREFIX)
    if own in (user_id, meter):
        return ""
    return f"published by {user_id}, the account of meter {own!r}, not of meter {meter!r}"
