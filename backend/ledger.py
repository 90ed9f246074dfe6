"""Exact, idempotent energy counting: the functional core of the writer.

The edge numbers every pulse with a counter ``seq`` per (meter, channel,
epoch). The ledger remembers the highest ``seq`` it has counted per epoch, so

* a ``seq`` at or below it is a duplicate and counts nothing;
* a jump counts every pulse the counter says happened (``seq - last_seq``);
* a new epoch (the edge's counter store was recreated) counts its ``seq``
  pulses since that counter began, on top of the same total;
* a ``seq`` at or below the highest one but stamped later than every pulse
  counted in its epoch, or the highest one itself stamped differently, is no
  duplicate but a reused counter (a restored backup or a cloned copy of the
  Pi's store): refused. Later than the highest ``seq``'s own time is not
  enough: the edge follows its wall clock back, so after a step back a resent
  lower ``seq`` carries a later time than the newest pulse.

No single message may move a total by more than physics allows:

* a channel's energy per pulse is fixed when its first pulse is counted;
  a pulse stating another is refused (:meth:`Ledger.set_pulse_energy` changes it);
* a jump (several pulses at once, a new epoch starting high, a channel's
  first pulse) is refused if it implies more than ``max_power_w`` over the
  time since the channel's last counted pulse; a channel with no history
  is judged from when its meter was admitted (:meth:`Ledger.admit`) or,
  by the edge's word, when the epoch began. A refused pulse moves nothing,
  so a wild ``seq`` cannot freeze a channel;
* pulses one by one are held to the same limit: a channel's credit
  (:func:`backend.trust.credit_doubt`) refuses those that come faster than
  ``max_power_w`` allows since its last pulse with a trusted timestamp, by
  the edge's clock or the writer's, one pulse of slack;
* once a newer epoch has been counted on a channel, an older one must not
  advance: two edges count under one meter id (two Pis with one
  configuration); refused;
* a channel keeps at most :data:`EPOCHS_KEPT` epochs.

A person may readmit a refused pulse after inspection: it is then counted
without the power bound and the epoch order (never with another energy per
pulse), and the channel's credit starts again from it.

Timestamps are believed only where :mod:`backend.trust` says so: a pulse
with an untrusted timestamp (ahead of the writer's clock, behind the
channel's previous pulse, from an unsynchronised edge) is counted all the
same, but its time is used neither for power nor for judging counter jumps.

A calibration sets a total to a meter reading taken at some time; pulses up
to that time that arrive afterwards (a Pi's backlog) are already part of the
reading, so they advance the counters without adding energy.

Every kind of channel (:mod:`common.channels`) is counted the same way: a
pulse is a fixed quantity of its pulse unit (the message's ``wh``: Wh, varh,
m³ or L), kept as an integer number of micro-units (µWh, µvarh, µm³, µL), so
sums are exact; the names below say energy and power for all of them, power
being in pulse units per hour (W, var, m³/h, L/h). The physical limit of a
jump is ``max_power_w`` for electricity and the channel's own limit from
``max_rates`` (gas flow, water flow). Power comes only from two consecutive
trusted pulses of one epoch. No I/O;
the writer's clock is passed in (``now_ns``).

Example::

    >>> ledger = Ledger(max_power_w=100_000, fixed_wh=True)
    >>> ledger.admit("main", 0)
    True
    >>> ledger.apply(Pulse("main", "active", "e1", 1, 1_000_000_000_000, 1.0))
    1
    >>> ledger.apply(Pulse("main", "active", "e1", 1, 1_000_000_000_000, 1.0))
    0
    >>> ledger.apply(Pulse("main", "active", "e1", 3, 1_000_000_000_000 + 2_400_000_000, 1.0))
    2
    >>> ledger.channel("main", "active").total_uwh
    3000000
    >>> ledger.apply(Pulse("main", "gas", "e1", 2, 1_000_000_000_000, 0.01))  # 0.01 m³ per pulse
    2
    >>> ledger.channel("main", "gas").total_uwh  # in µm³
    20000
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from backend.amounts import per_rate_unit
from backend.load_level import LoadLevel
from backend.trust import credit_doubt, jump_doubt, limit_ns, timestamp_doubt
from common.channels import CHANNELS
from common.config import Config
from common.message import MAX_WH, MIN_WH, MessageError, Pulse, validate_meter_id

UWH_PER_WH = 1_000_000
NS_PER_S = 1_000_000_000
CALIBRATIONS_KEPT = 32
EPOCHS_KEPT = 16
# A new epoch that began this much before the current epoch's last trusted pulse ran beside it: a second
# edge (a restarted one begins after its last pulse, by the same clock). The margin is for two Pis' clocks,
# which agree only as well as NTP keeps them.
SECOND_EDGE_MARGIN_NS = 5 * NS_PER_S


class Implausible(ValueError):
    """A pulse the ledger refuses to count; the text says why (it goes to the dead-letter queue)."""


class Interleaved(Implausible):
    """An older epoch advanced after a newer one was counted: two edges count under one meter id."""


class OtherPulseEnergy(Implausible):
    """A pulse states another energy per pulse than its channel's."""


def wh_to_uwh(wh: float) -> int:
    """Micro-units of a quantity in pulse units (µWh of Wh, µm³ of m³)."""
    return round(wh * UWH_PER_WH)


@dataclass
class Cursor:
    """The newest counted pulse of one epoch: its ``seq`` and timestamp as sent, the epoch's last
    trusted timestamp, the writer's clock when it was counted (None where unknown), the latest
    timestamp of any pulse counted in the epoch, which tells a duplicate from a reused counter
    (None: ``ts_ns``, as for cursors saved by older versions or seeded from a database), and when the
    epoch began: as its edge said, else its first pulse's time (None: not known, older versions)."""

    seq: int
    ts_ns: int
    trusted_ns: int | None = None
    received_ns: int | None = None
    latest_ns: int | None = None
    began_ns: int | None = None

    def latest_counted_ns(self) -> int:
        return self.ts_ns if self.latest_ns is None else self.latest_ns

    def to_json(self) -> list[int | None]:
        return [self.seq, self.ts_ns, self.trusted_ns, self.received_ns, self.latest_ns, self.began_ns]

    @classmethod
    def from_json(cls, doc: list[Any]) -> Cursor:
        """``[seq, ts_ns]`` (saved by older versions, whose timestamps were all trusted), the four- and
        five-item forms of versions that did not keep the latest timestamp or the epoch's start, or the full
        form."""
        if len(doc) == 2:
            return cls(_int(doc[0]), _int(doc[1]), _int(doc[1]))
        if len(doc) not in (4, 5, 6):
            raise ValueError(f"a cursor has 2, 4, 5 or 6 items, not {len(doc)}")
        seq, ts_ns, trusted_ns, received_ns, *rest = doc
        latest, began = (*rest, None, None)[:2]
        return cls(_int(seq), _int(ts_ns), _optional_int(trusted_ns), _optional_int(received_ns),
                   _optional_int(latest), _optional_int(began))


@dataclass
class ChannelState:
    """Totals and timing of one (meter, channel): ``total_uwh`` and ``wh`` are in (micro) pulse units of its
    ``kind`` (µWh and Wh for active, µm³ and m³ for gas)."""

    total_uwh: int = 0
    epochs: dict[str, Cursor] = field(default_factory=dict)
    # The newest trusted timestamp of any epoch: the idle time of power is measured from it.
    last_ts_ns: int | None = None
    # The energy per pulse, fixed (``wh_fixed``) by the first counted pulse or by a command.
    wh: float = 1.0
    wh_fixed: bool = False
    # The writer's clock when the channel last counted a pulse, and why that
    # pulse's timestamp was not trusted ("" if it was).
    received_ns: int | None = None
    ts_doubt: str = ""
    # Pulses of this channel held back in the dead-letter queue so far, and the last reason.
    held_back: int = 0
    held_back_reason: str = ""
    # Epochs found to be a second edge's under this meter id: their pulses are held back.
    barred: list[str] = field(default_factory=list)
    # Intervals between the most recent consecutive pulses, newest last; empty
    # after a gap, since power may only come from consecutive pulses.
    intervals_ns: list[int] = field(default_factory=list)
    # The credit (see backend.trust): when the energy counted so far would have been delivered at the limit,
    # by the edge's clock and by the writer's (each None where that clock cannot tell); None as a whole until
    # the first pulse counted by this version, which takes it from the channel's last pulse or admission.
    credit_ns: tuple[int | None, int | None] | None = None
    # The latest calibration's reading time, and the ids of recent commands
    # (a redelivered command must not reset the total a second time).
    calibrated_at_ns: int = 0
    calibrations: list[str] = field(default_factory=list)
    # The channel this is the state of: it decides the units (not saved: the state file's key says it).
    kind: str = "active"
    # Where the load is now and its recent floor, for the power shown (not saved: learnt again from pulses).
    level: LoadLevel = field(default_factory=LoadLevel, compare=False, repr=False)

    def power_w(self) -> float | None:
        """Mean power over the remembered intervals in pulse units per hour (W, m³/h, L/h), or None if unknown."""
        if not self.intervals_ns:
            return None
        return len(self.intervals_ns) * self.wh * 3600 * NS_PER_S / sum(self.intervals_ns)

    def to_json(self) -> dict[str, Any]:
        return {"total_uwh": self.total_uwh, "epochs": {e: c.to_json() for e, c in self.epochs.items()},
                "last_ts_ns": self.last_ts_ns, "wh": self.wh, "wh_fixed": self.wh_fixed,
                "intervals_ns": list(self.intervals_ns),
                "calibrated_at_ns": self.calibrated_at_ns, "calibrations": list(self.calibrations),
                "received_ns": self.received_ns, "ts_doubt": self.ts_doubt, "held_back": self.held_back,
                "held_back_reason": self.held_back_reason, "barred": list(self.barred),
                "credit_ns": None if self.credit_ns is None else list(self.credit_ns)}

    @classmethod
    def from_json(cls, doc: dict[str, Any], kind: str = "active") -> ChannelState:
        """The saved form; older versions kept no ``wh_fixed`` but took ``wh`` from trusted pulses, so a
        channel that had one has a ``wh`` to hold to."""
        last_ts_ns = _optional_int(doc["last_ts_ns"])
        state = cls(total_uwh=_int(doc["total_uwh"]),
                    epochs={str(e): Cursor.from_json(c) for e, c in doc["epochs"].items()},
                    last_ts_ns=last_ts_ns,
                    wh=float(doc["wh"]), wh_fixed=bool(doc.get("wh_fixed", last_ts_ns is not None)),
                    intervals_ns=[_int(i) for i in doc["intervals_ns"]],
                    calibrated_at_ns=_int(doc.get("calibrated_at_ns", 0)),
                    calibrations=[str(c) for c in doc.get("calibrations", [])],
                    received_ns=_optional_int(doc.get("received_ns")), ts_doubt=str(doc.get("ts_doubt", "")),
                    held_back=_int(doc.get("held_back", 0)), held_back_reason=str(doc.get("held_back_reason", "")),
                    barred=[str(e) for e in doc.get("barred", [])], credit_ns=_credit(doc.get("credit_ns")),
                    kind=kind)
        if state.total_uwh < 0 or not 0 < state.wh <= 1000:
            raise ValueError(f"implausible channel state: total {state.total_uwh}, wh {state.wh}")
        return state


def _began(pulse: Pulse) -> int | None:
    """When the pulse's epoch began by its edge's word, if that word is plausible (not after the pulse)."""
    return pulse.epoch_ns if pulse.epoch_ns is not None and pulse.epoch_ns <= pulse.ts_ns else None


def _two_edges(pulse: Pulse, why: str) -> Interleaved:
    return Interleaved(f"epoch {pulse.epoch} of {pulse.meter}/{pulse.channel} {why}: two edges count under meter id "
                       f"{pulse.meter!r} (a copied configuration or SD card); give each Pi its own meter_id")


def _second_edge(pulse: Pulse, state: ChannelState, cursor: Cursor | None) -> str:
    """Refuse the pulses of a second edge under the channel's meter id; the edge that counted first counts on.
    Return the epoch to bar once ``pulse`` counts ("" for none).

    A Pi starts a new epoch after an unclean stop, so a new epoch alone is
    no second edge, and its clock says so: a restarted edge's epoch begins
    after the last pulse of its previous one. A new epoch that began
    :data:`SECOND_EDGE_MARGIN_NS` or more before the current epoch's last
    trusted pulse ran beside it: refused from its first pulse, also when
    that pulse reaches the writer after later ones of the current epoch (two
    Pis' messages race), unless it happened before the current epoch began
    (an old epoch's backlog). Without its start, the first sign is the
    current epoch counting on after the new one appeared (a pulse later than
    the new epoch's start: earlier ones are the backlog of an outbox sent
    late); the new epoch is then barred. An epoch whose clock stepped back is
    no evidence, and judged by neither rule.
    """
    if pulse.epoch in state.barred:
        raise _two_edges(pulse, "was found to run beside another epoch")
    if not state.epochs:
        return ""
    newest_name = next(reversed(state.epochs))
    newest = state.epochs[newest_name]
    if cursor is None:
        began = _began(pulse)
        newest_began = newest.trusted_ns if newest.began_ns is None else newest.began_ns
        if (began is not None and newest.trusted_ns is not None and newest_began is not None
                and pulse.synced is not False and pulse.ts_ns >= newest_began
                and newest.trusted_ns > began + SECOND_EDGE_MARGIN_NS):
            raise _two_edges(pulse, f"began {(newest.trusted_ns - began) / NS_PER_S:.0f} s before the last pulse "
                                    f"of epoch {newest_name}")
        return ""
    if pulse.epoch == newest_name or (newest.began_ns is not None and pulse.ts_ns < newest.began_ns):
        return ""
    return newest_name


def rate_limits(config: Config) -> dict[str, float]:
    """The configured limits of the channels that are no electricity, in pulse units per hour (m³/h, L/h)."""
    return {"gas": config.max_gas_flow_m3h * per_rate_unit("gas"),
            "water": config.max_water_flow_lpm * per_rate_unit("water")}


@dataclass(frozen=True)
class Changed:
    """The channels and meters (admissions) whose state changed: all that a save of those changes must write.

    >>> Changed(frozenset({("main", "active")})) | Changed(meters=frozenset({"main"}))
    Changed(channels=frozenset({('main', 'active')}), meters=frozenset({'main'}))
    """

    channels: frozenset[tuple[str, str]] = frozenset()
    meters: frozenset[str] = frozenset()

    def __or__(self, other: Changed) -> Changed:
        return Changed(self.channels | other.channels, self.meters | other.meters)

    def __bool__(self) -> bool:
        return bool(self.channels or self.meters)


# A meter's admission before a change, when it had none (``None`` means admitted at an unknown time).
_UNKNOWN = "unknown"


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r:.40}")
    return value


def _optional_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def _credit(value: Any) -> tuple[int | None, int | None] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"a credit has two items, not {value!r:.40}")
    return _optional_int(value[0]), _optional_int(value[1])


class Ledger:
    """Cumulative energy of every (meter, channel), counted exactly once per pulse.

    It also remembers which meters were admitted, and when (the writer's
    clock): a meter's new channel is judged from that time. ``fixed_wh``
    holds each channel to its energy per pulse; a ledger that does not see
    the commands changing it (the database writer's) counts each pulse's own.
    ``max_rates`` holds the limits, in pulse units per hour, of channels not
    bounded by ``max_power_w`` (gas and water: :func:`rate_limits`).
    """

    def __init__(self, max_power_w: float, smoothing_pulses: int = 1, max_ahead_s: float = 600.0, *,
                 fixed_wh: bool = False, max_rates: Mapping[str, float] | None = None) -> None:
        self.max_power_w = max_power_w
        self.max_rates = dict(max_rates or {})
        self.smoothing_pulses = smoothing_pulses
        self.max_ahead_s = max_ahead_s
        self.fixed_wh = fixed_wh
        # The energy per pulse the configuration states for a channel (with ``fixed_wh``): its first pulse is
        # held to it instead of setting it.
        self.pulse_energy: dict[tuple[str, str], float] = {}
        self._channels: dict[tuple[str, str], ChannelState] = {}
        # When each meter was admitted (None: known from an older state file, time unknown).
        self._admitted: dict[str, int | None] = {}
        # Between begin() and commit() or rollback(): each touched channel's and meter's state before.
        self._before: tuple[dict[tuple[str, str], ChannelState | None], dict[str, int | str | None]] | None = None

    def channel(self, meter: str, channel: str) -> ChannelState:
        """The state of (``meter``, ``channel``), created if new; every change of a channel goes through here."""
        key = (meter, channel)
        if self._before is not None and key not in self._before[0]:
            self._before[0][key] = copy.deepcopy(self._channels.get(key))
        state = self._channels.get(key)
        if state is None:
            state = self._channels[key] = ChannelState(kind=channel)
        return state

    def begin(self) -> None:
        """Remember, from now on, each channel and meter as it was before it is first touched (a batch starts).

        Only what a batch touches is copied, so neither :meth:`changed` nor
        :meth:`rollback` costs more with more meters. A batch neither
        committed nor rolled back (it raised) is rolled back here: it will be
        redelivered, and must not then look counted.
        """
        if self._before is not None:
            self.rollback()
        self._before = ({}, {})

    def changed(self) -> Changed:
        """The channels and meters whose state differs from when :meth:`begin` was called."""
        if self._before is None:
            return Changed()
        channels, meters = self._before
        return Changed(frozenset(key for key, state in channels.items() if self._channels.get(key) != state),
                       frozenset(m for m, ns in meters.items() if self._admitted.get(m, _UNKNOWN) != ns))

    def commit(self) -> None:
        """Keep the changes since :meth:`begin` (they were saved) and stop remembering."""
        self._before = None

    def rollback(self) -> None:
        """Put every channel and meter touched since :meth:`begin` back as it was (its save failed)."""
        if self._before is None:
            return
        channels, meters = self._before
        self._before = None
        for key, state in channels.items():
            if state is None:
                self._channels.pop(key, None)
            else:
                self._channels[key] = state
        for meter, admitted_ns in meters.items():
            if admitted_ns == _UNKNOWN:
                self._admitted.pop(meter, None)
            else:
                self._admitted[meter] = None if admitted_ns is None else int(admitted_ns)

    def _touch_meter(self, meter: str) -> None:
        if self._before is not None and meter not in self._before[1]:
            self._before[1][meter] = self._admitted.get(meter, _UNKNOWN)

    def get(self, meter: str, channel: str) -> ChannelState | None:
        """The state of (``meter``, ``channel``) if it has one, without creating it."""
        return self._channels.get((meter, channel))

    def __iter__(self) -> Iterator[tuple[tuple[str, str], ChannelState]]:
        return iter(sorted(self._channels.items()))

    def meters(self) -> list[str]:
        """Every admitted meter or meter with a channel, sorted."""
        return sorted(self._admitted.keys() | {meter for meter, _ in self._channels})

    def is_known(self, meter: str) -> bool:
        return meter in self._admitted or any((meter, channel) in self._channels for channel in CHANNELS)

    def admitted_ns(self, meter: str) -> int | None:
        return self._admitted.get(meter)

    def admit(self, meter: str, now_ns: int) -> bool:
        """Admit ``meter`` as of ``now_ns`` unless its admission time is known; True if it was new."""
        new = not self.is_known(meter)
        if self._admitted.get(meter) is None:
            self._touch_meter(meter)
            self._admitted[meter] = now_ns
        return new

    def forget(self, meter: str) -> list[str]:
        """Drop ``meter``'s admission and channels; return the channels it had."""
        self._touch_meter(meter)
        self._admitted.pop(meter, None)
        gone = sorted(channel for m, channel in self._channels if m == meter)
        for channel in gone:
            self.channel(meter, channel)  # remembered as it was, for a rollback
            del self._channels[(meter, channel)]
        return gone

    def apply(self, pulse: Pulse, now_ns: int | None = None, *, readmitted: bool = False) -> int:
        """Count ``pulse``; return how many new pulses it accounted for (0 for a duplicate).

        ``now_ns`` is the writer's clock (None: no clock-based checks).
        Raises :class:`Implausible` (and changes nothing) for a reused
        counter, another energy per pulse than the channel's, a jump implying
        more than ``max_power_w`` or an older epoch advancing after a newer
        one (:class:`Interleaved`); the last two unless the pulse was
        ``readmitted`` by a person after inspection.
        """
        state = self.channel(pulse.meter, pulse.channel)
        cursor = state.epochs.get(pulse.epoch)
        if cursor is not None and pulse.seq <= cursor.seq:
            _check_duplicate(pulse, cursor)
            return 0
        wh_uwh = wh_to_uwh(pulse.wh)
        configured = self.pulse_energy.get((pulse.meter, pulse.channel))
        if configured is not None and self.fixed_wh and not state.wh_fixed:
            state.wh, state.wh_fixed = configured, True
        if self.fixed_wh and state.wh_fixed and wh_uwh != wh_to_uwh(state.wh):
            raise OtherPulseEnergy(f"wh {pulse.wh:g} differs from the channel's {state.wh:g} per pulse; if the "
                                   f"meter's constant really changed, run `emdc state set-pulse-energy --meter "
                                   f"{pulse.meter} --channel {pulse.channel} --wh {pulse.wh:g}` and readmit")
        if wh_uwh == 0:
            raise Implausible(f"wh {pulse.wh:g} is below the 1 uWh the ledger counts")
        to_bar = "" if readmitted else _second_edge(pulse, state, cursor)
        # A person readmitting a barred epoch's pulse decided that this edge is the one (a replacement Pi): the
        # epoch counting until now is barred instead.
        unbar = readmitted and pulse.epoch in state.barred
        if unbar and next(reversed(state.epochs)) != pulse.epoch:
            to_bar = next(reversed(state.epochs))
        new = pulse.seq if cursor is None else pulse.seq - cursor.seq
        reference_ns = state.last_ts_ns if cursor is None or cursor.trusted_ns is None else cursor.trusted_ns
        doubt = timestamp_doubt(pulse.ts_ns, now_ns=now_ns, previous_ns=reference_ns,
                                max_ahead_ns=round(self.max_ahead_s * NS_PER_S), synced=pulse.synced)
        limit = self.max_rates.get(pulse.channel, self.max_power_w)
        pulse_uwh = wh_to_uwh(state.wh) if self.fixed_wh and state.wh_fixed else wh_uwh
        credit = state.credit_ns or self._first_credit(pulse, state)
        if not readmitted:
            if new > 1:  # a single pulse is no jump: the credit judges it
                self._check_jump(pulse, state, cursor, new, reference_ns, doubt, now_ns)
            credit = self._check_credit(pulse, credit, new * pulse_uwh, pulse_uwh, limit, doubt, now_ns)
        else:  # counted by a person's decision: the credit starts again from it
            credit = (credit[0] if doubt else pulse.ts_ns, credit[1] if now_ns is None else now_ns)
        state.credit_ns = credit

        if to_bar or unbar:
            state.barred = [e for e in [*state.barred, to_bar] if e and e != pulse.epoch][-EPOCHS_KEPT:]
            if pulse.epoch in state.epochs:
                state.epochs[pulse.epoch] = state.epochs.pop(pulse.epoch)  # the newest again: the one counting
        if not (self.fixed_wh and state.wh_fixed):
            state.wh, state.wh_fixed = pulse.wh, self.fixed_wh
        # Pulses up to a calibration's reading time are part of the reading. An untrusted timestamp cannot
        # say when a pulse happened: the writer's receive time decides instead, so none is silently lost.
        happened_ns = pulse.ts_ns if not doubt or now_ns is None else now_ns
        if happened_ns > state.calibrated_at_ns:
            state.total_uwh += new * wh_to_uwh(state.wh)
        if not doubt:
            trusted_ns: int | None = pulse.ts_ns
        else:  # the epoch's last trusted time stays the reference for its next pulse
            trusted_ns = reference_ns
        latest_ns = pulse.ts_ns if cursor is None else max(pulse.ts_ns, cursor.latest_counted_ns())
        began_ns = (_began(pulse) or pulse.ts_ns) if cursor is None else cursor.began_ns
        state.epochs[pulse.epoch] = Cursor(pulse.seq, pulse.ts_ns, trusted_ns, now_ns, latest_ns, began_ns)
        if cursor is None and len(state.epochs) > EPOCHS_KEPT:
            del state.epochs[min(list(state.epochs)[:-1], key=lambda e: state.epochs[e].received_ns or 0)]
        state.received_ns = now_ns
        state.ts_doubt = doubt
        if doubt:
            state.intervals_ns = []  # power is unknown until two consecutive trusted pulses
            state.level.forget()
        elif state.last_ts_ns is None or pulse.ts_ns > state.last_ts_ns:
            consecutive = (cursor is not None and new == 1 and cursor.ts_ns == cursor.trusted_ns
                           and cursor.ts_ns == state.last_ts_ns)
            if consecutive and cursor is not None:
                interval_ns = pulse.ts_ns - cursor.ts_ns
                state.intervals_ns = [*state.intervals_ns, interval_ns][-self.smoothing_pulses:]
                state.level.observe(pulse.ts_ns, interval_ns, correct=self.smoothing_pulses == 1)
            else:
                state.intervals_ns = []
                state.level.forget()
            state.last_ts_ns = pulse.ts_ns
        return new

    def _first_credit(self, pulse: Pulse, state: ChannelState) -> tuple[int | None, int | None]:
        """The credit of a channel that has none yet: spent up to its last counted pulse (its last trusted
        timestamp and the writer's clock then) or, without one, up to its meter's admission and, by the edge's
        word, the epoch's start."""
        if state.epochs:
            edge_from, received_from = state.last_ts_ns, state.received_ns
        else:  # an epoch said to begin after its pulse cannot tell when the pulse's energy was there
            edge_from = pulse.epoch_ns if pulse.epoch_ns is not None and pulse.epoch_ns < pulse.ts_ns else None
            received_from = None
        return edge_from, self._admitted.get(pulse.meter) if received_from is None else received_from

    def _check_credit(self, pulse: Pulse, credit: tuple[int | None, int | None], uwh: int, pulse_uwh: int,
                      limit: float, doubt: str, now_ns: int | None) -> tuple[int | None, int | None]:
        """The channel's credit with ``uwh`` more; raise :class:`Implausible` if it comes faster than ``limit``.

        Only a timestamp the edge's clock vouches for (trusted, and leaving
        room at the limit for all the energy before it) says when the energy
        was there: such a pulse spends the credit up to its time on both
        clocks (idle time before it cannot be drawn on later); any other
        leaves the references where they were (a trusted timestamp stamped
        too early, after a clock step, must not discard the writer's time).
        The edge's clock is charged with every pulse, as all of them happened
        in its time; the writer's only with those the edge's clock did not
        vouch for, since a pulse stamped in the past took none of the
        writer's time.
        """
        slack_ns = limit_ns(pulse_uwh, max_power_w=limit)
        spent_ns = slack_ns if uwh == pulse_uwh else limit_ns(uwh, max_power_w=limit)
        edge, received = credit
        if edge is not None:
            edge += spent_ns
        edge_ahead = None if doubt or edge is None else edge - pulse.ts_ns
        vouched = edge_ahead is not None and edge_ahead <= slack_ns
        if received is not None and not vouched:
            received += spent_ns
        too_fast = "" if vouched else credit_doubt(
            edge_ahead_ns=edge_ahead, received_ahead_ns=None if now_ns is None or received is None
            else received - now_ns, slack_ns=slack_ns, max_power_w=limit,
            channel=pulse.channel if pulse.channel in self.max_rates else "active")
        if too_fast:
            raise Implausible(too_fast)
        # A trusted timestamp no energy contradicts (the edge's clock had no reference yet, or vouched for it).
        uncontradicted = not doubt and (edge_ahead is None or vouched)
        if not doubt:
            edge = pulse.ts_ns if edge is None else max(edge, pulse.ts_ns)
        if now_ns is not None and (uncontradicted or received is None):
            received = now_ns if received is None else max(received, now_ns)
        return edge, received

    def _check_jump(self, pulse: Pulse, state: ChannelState, cursor: Cursor | None, new: int,
                    reference_ns: int | None, doubt: str, now_ns: int | None) -> None:
        """Refuse ``new`` pulses at once if more than ``max_power_w`` over the time since the channel's
        last counted pulse (a channel without one: since its meter was admitted or its epoch began)."""
        if state.epochs:
            edge_from = reference_ns
            received_from = state.received_ns if cursor is None else cursor.received_ns
        else:
            edge_from, received_from = pulse.epoch_ns, None
        if received_from is None:
            received_from = self._admitted.get(pulse.meter)
        jump = jump_doubt(
            new, wh=state.wh if self.fixed_wh and state.wh_fixed else pulse.wh,
            edge_elapsed_ns=None if doubt or edge_from is None or edge_from >= pulse.ts_ns
            else pulse.ts_ns - edge_from,
            received_elapsed_ns=None if now_ns is None or received_from is None else now_ns - received_from,
            # A channel without a limit of its own is judged, and described, by max_power_w (in kW).
            max_power_w=self.max_rates.get(pulse.channel, self.max_power_w),
            channel=pulse.channel if pulse.channel in self.max_rates else "active")
        if not jump:
            return
        if cursor is not None:
            raise Implausible(f"counter: {jump}")
        where = "" if state.epochs else " on a channel with no history"
        raise Implausible(f"new epoch {pulse.epoch} starting at seq {pulse.seq}{where}: {jump}")

    def set_total(self, meter: str, channel: str, total_uwh: int, *, as_of_ns: int = 0,
                  command_id: str = "") -> int | None:
        """Calibrate a total to a meter reading taken at ``as_of_ns``; return the previous total.

        Returns None, changing nothing, for a command id already applied.
        """
        if channel not in CHANNELS:
            raise ValueError(f"channel must be one of {', '.join(CHANNELS)}")
        if total_uwh < 0:
            raise ValueError("a total cannot be negative")
        state = self.channel(meter, channel)
        if not _first_time(state, command_id):
            return None
        old, state.total_uwh = state.total_uwh, total_uwh
        state.calibrated_at_ns = max(state.calibrated_at_ns, as_of_ns)
        return old

    def set_pulse_energy(self, meter: str, channel: str, wh: float, *, command_id: str = "") -> float | None:
        """Fix a channel's energy per pulse to ``wh``; return the previous one (None: a repeated command)."""
        if channel not in CHANNELS:
            raise ValueError(f"channel must be one of {', '.join(CHANNELS)}")
        if not 0 < wh_to_uwh(wh) <= wh_to_uwh(MAX_WH):
            raise ValueError(f"wh must be from {MIN_WH:g} to {MAX_WH:g}")
        state = self.channel(meter, channel)
        if not _first_time(state, command_id):
            return None
        old = state.wh
        state.wh, state.wh_fixed = wh, True
        state.intervals_ns = []  # power over intervals of the old energy per pulse would be wrong
        state.level = LoadLevel()
        return old

    def to_json(self) -> dict[str, Any]:
        meters: dict[str, dict[str, Any]] = {}
        for (meter, channel), state in self:
            meters.setdefault(meter, {})[channel] = state.to_json()
        return {"meters": meters, "admitted": {meter: self._admitted.get(meter) for meter in self.meters()}}

    @classmethod
    def from_json(cls, doc: dict[str, Any], max_power_w: float, smoothing_pulses: int = 1,
                  max_ahead_s: float = 600.0, *, fixed_wh: bool = False,
                  max_rates: Mapping[str, float] | None = None) -> Ledger:
        """Build a ledger from :meth:`to_json` output; raises KeyError/TypeError/ValueError if malformed."""
        ledger = cls(max_power_w, smoothing_pulses, max_ahead_s, fixed_wh=fixed_wh, max_rates=max_rates)
        ledger.load_json(doc)
        return ledger

    def load_json(self, doc: dict[str, Any]) -> None:
        """Replace every channel's state and the admissions with ``doc``'s (all or nothing).

        Older versions kept no admissions: their meters are known, since when is not.
        """
        channels = {}
        admitted: dict[str, int | None] = {}
        try:
            for meter, by_channel in doc["meters"].items():
                validate_meter_id(meter)
                admitted[meter] = None
                for channel, state in by_channel.items():
                    if channel not in CHANNELS:
                        raise ValueError(f"unknown channel {channel!r}")
                    channels[(meter, channel)] = ChannelState.from_json(state, channel)
            for meter, admitted_ns in doc.get("admitted", {}).items():
                admitted[validate_meter_id(meter)] = _optional_int(admitted_ns)
        except AttributeError as exc:  # a list or number where an object belongs
            raise TypeError(str(exc)) from None
        except MessageError as exc:
            raise ValueError(str(exc)) from None
        self._channels = channels
        self._admitted = admitted


def _check_duplicate(pulse: Pulse, cursor: Cursor) -> None:
    """Return if ``pulse`` (not above ``cursor``) may be a resend of a counted one; raise if it cannot."""
    if pulse.ts_ns > cursor.latest_counted_ns():
        raise Implausible(f"seq {pulse.seq} of epoch {pulse.epoch} was already counted at an earlier "
                          "time: was the edge's counter store restored from a backup or copied to a second Pi?")
    if pulse.seq == cursor.seq and pulse.ts_ns != cursor.ts_ns:
        raise Implausible(f"seq {pulse.seq} of epoch {pulse.epoch} was counted with ts_ns {cursor.ts_ns}, this one "
                          f"says {pulse.ts_ns}: two edges count with one counter store (a cloned SD card or a "
                          "restored backup); give each Pi its own store and meter_id")


def _first_time(state: ChannelState, command_id: str) -> bool:
    """True (and remembered) unless the command ``command_id`` was applied to ``state`` before."""
    if not command_id:
        return True
    if command_id in state.calibrations:
        return False
    state.calibrations = [*state.calibrations, command_id][-CALIBRATIONS_KEPT:]
    return True
