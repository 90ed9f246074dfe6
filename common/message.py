"""The pulse message: the public contract between an edge and the backend.

One JSON object per meter pulse (schema version 1)::

    {"v": 1, "meter": "main", "channel": "active", "epoch": "3f9a0c1d2e4b5a69",
     "seq": 42, "ts_ns": 1764384000123456789, "wh": 1}

``seq`` is the edge's cumulative pulse count for (meter, channel) within
``epoch``, so a receiver can count exactly even when it sees a message twice or
misses one. An optional ``"synced"`` (true or false) says whether the edge's
clock was synchronised when it stamped ``ts_ns``; without it, nothing is
claimed. An optional ``"epoch_ns"`` says when the edge began ``epoch`` (by its
clock): a receiver that has never seen the channel may then believe a first
``seq`` as high as that time allows. Example::

    >>> p = Pulse("main", "active", "ab12", 7, 1_700_000_000_000_000_000, 1.0)
    >>> decode(encode(p)) == p
    True
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from common.channels import CHANNELS, channel_spec
from common.topology import control_routing_key, pulse_routing_key, status_routing_key

SCHEMA_VERSION = 1
CONTENT_TYPE = "application/json"
MAX_BODY_BYTES = 4096
MAX_WH = 1000.0
# The ledger counts whole microwatt-hours: a smaller energy per pulse would count as nothing.
MIN_WH = 0.000001

_METER_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_EPOCH_RE = re.compile(r"[0-9a-f]{1,64}")
_FIELDS = {"v", "meter", "channel", "epoch", "seq", "ts_ns", "wh"}


class MessageError(ValueError):
    """A message body is not a valid pulse; the text says what is wrong."""


@dataclass(frozen=True, slots=True)
class Pulse:
    """One meter pulse: ``wh`` is its quantity in the channel's pulse unit (Wh for active and export, varh for
    reactive, m³ for gas, L for water: :mod:`common.channels`); the pulse ended at ``ts_ns``.

    ``epoch_ns`` (None: not stated) is when the edge began the epoch; it describes the epoch, not the
    pulse, so it takes no part in comparing pulses.
    """

    meter: str
    channel: str
    epoch: str
    seq: int
    ts_ns: int
    wh: float = 1.0
    synced: bool | None = None
    epoch_ns: int | None = field(default=None, compare=False)

    @property
    def routing_key(self) -> str:
        return pulse_routing_key(self.meter, self.channel)

    @property
    def message_id(self) -> str:
        """Unique per pulse, stable across re-sends."""
        return f"{self.meter}:{self.channel}:{self.epoch}:{self.seq}"


def validate_meter_id(meter: object) -> str:
    """Return ``meter`` if it is a usable meter id, else raise :class:`MessageError`."""
    if not isinstance(meter, str) or not _METER_RE.fullmatch(meter):
        raise MessageError(f"meter must be 1-64 characters of A-Z a-z 0-9 _ -, got {meter!r:.80}")
    return meter


def encode(pulse: Pulse) -> bytes:
    """Serialise a pulse to its JSON body (validating it first)."""
    _validate(pulse)
    wh = int(pulse.wh) if float(pulse.wh).is_integer() else pulse.wh
    doc: dict[str, Any] = {"v": SCHEMA_VERSION, "meter": pulse.meter, "channel": pulse.channel,
                           "epoch": pulse.epoch, "seq": pulse.seq, "ts_ns": pulse.ts_ns, "wh": wh}
    if pulse.synced is not None:
        doc["synced"] = pulse.synced
    if pulse.epoch_ns is not None:
        doc["epoch_ns"] = pulse.epoch_ns
    return json.dumps(doc, separators=(",", ":")).encode()


def decode(body: bytes) -> Pulse:
    """Parse and validate a message body; raise :class:`MessageError` if it is not a pulse."""
    if not body:
        raise MessageError("empty body")
    if len(body) > MAX_BODY_BYTES:
        raise MessageError(f"body is {len(body)} bytes, limit is {MAX_BODY_BYTES}")
    doc = _parse_object(body)
    _check_version(doc)
    missing = _FIELDS - doc.keys()
    if missing:
        raise MessageError(f"missing field(s): {', '.join(sorted(missing))}")
    pulse = Pulse(doc["meter"], doc["channel"], doc["epoch"], doc["seq"], doc["ts_ns"], doc["wh"], doc.get("synced"),
                  doc.get("epoch_ns"))
    _validate(pulse)
    return Pulse(pulse.meter, pulse.channel, pulse.epoch, pulse.seq, pulse.ts_ns, float(pulse.wh), pulse.synced,
                 pulse.epoch_ns)


def decode_routed(body: bytes, routing_key: str) -> Pulse:
    """:func:`decode` a pulse that arrived under ``routing_key``, which must name its meter and channel.

    The broker's permissions are written on routing keys: a body naming
    another meter than its key would bypass them, so it is refused.
    """
    pulse = decode(body)
    if pulse.routing_key != routing_key:
        raise MessageError(f"routing key {routing_key!r:.80} does not match the body's meter and channel "
                           f"({pulse.routing_key})")
    return pulse


def _parse_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MessageError(f"body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"body is not JSON: {str(exc)[:100]}") from None
    if not isinstance(doc, dict):
        raise MessageError(f"body must be a JSON object, got {type(doc).__name__}")
    return doc


def _check_version(doc: dict[str, Any]) -> None:
    if not _is_int(doc.get("v")) or doc.get("v") != SCHEMA_VERSION:
        raise MessageError(f"unsupported schema version v={doc.get('v')!r:.40} (expected {SCHEMA_VERSION})")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(p: Pulse) -> None:
    validate_meter_id(p.meter)
    if p.channel not in CHANNELS:
        raise MessageError(f"channel must be one of {', '.join(CHANNELS)}, got {p.channel!r:.40}")
    if not isinstance(p.epoch, str) or not _EPOCH_RE.fullmatch(p.epoch):
        raise MessageError(f"epoch must be 1-64 lowercase hex digits, got {p.epoch!r:.80}")
    if not _is_int(p.seq) or not 1 <= p.seq < 2**63:
        raise MessageError(f"seq must be an integer from 1 to 2^63-1, got {p.seq!r:.40}")
    if not _is_int(p.ts_ns) or not 0 < p.ts_ns < 2**63:
        raise MessageError(f"ts_ns must be a positive 64-bit integer, got {p.ts_ns!r:.40}")
    if not isinstance(p.wh, int | float) or isinstance(p.wh, bool) or not 0 < p.wh <= MAX_WH:
        raise MessageError(f"wh must be a number > 0 and <= {MAX_WH:g}, got {p.wh!r:.40}")
    if p.synced is not None and not isinstance(p.synced, bool):
        raise MessageError(f"synced must be true or false when present, got {p.synced!r:.40}")
    if p.epoch_ns is not None and (not _is_int(p.epoch_ns) or not 0 < p.epoch_ns < 2**63):
        raise MessageError(f"epoch_ns must be a positive 64-bit integer when present, got {p.epoch_ns!r:.40}")


@dataclass(frozen=True, slots=True)
class SetTotal:
    """Control message: calibrate a channel's total to a physical meter reading.

    Sent through the broker (routing key ``control.<meter>``) so the writer
    applies it in order with the pulses, without racing its state file.
    ``ts_ns`` is when the meter was read: pulses up to then are part of the
    reading, even if they reach the writer later (a Pi's backlog). ``id``
    makes a redelivered command harmless. ``total`` is the reading in the
    channel's total unit (kWh, kvarh, m³ or L), exact; the message names it
    after that unit (:func:`total_key`)::

        >>> command = SetTotal("main", "gas", Decimal("1234.56"), 1_700_000_000_000_000_000, "ab12")
        >>> json.loads(encode_control(command))["m3"], command.total_uwh
        ('1234.56', 1234560000)
    """

    meter: str
    channel: str
    total: Decimal
    ts_ns: int
    id: str

    @property
    def routing_key(self) -> str:
        return control_routing_key(self.meter)

    @property
    def kwh(self) -> Decimal:
        """The reading of an electricity channel in kWh (kvarh), as the message's ``kwh`` says."""
        return self.total

    @property
    def total_uwh(self) -> int:
        """The reading in micro pulse units (µWh, µvarh, µm³, µL), as the ledger counts."""
        return int(self.total * 10**6 * channel_spec(self.channel).total_divisor)


@dataclass(frozen=True, slots=True)
class SetPulseEnergy:
    """Control message: the energy per pulse of a channel changed (a new meter constant).

    A channel's energy per pulse is fixed when its first pulse is counted, and
    pulses stating another one are refused: only this command changes it.
    Example::

        >>> command = SetPulseEnergy("main", "active", 0.5, "ab12")
        >>> decode_control(encode_control(command)) == command
        True
    """

    meter: str
    channel: str
    wh: float
    id: str

    @property
    def routing_key(self) -> str:
        return control_routing_key(self.meter)


@dataclass(frozen=True, slots=True)
class ForgetMeter:
    """Control message: the writer drops a meter's totals and its Home Assistant device."""

    meter: str
    id: str

    @property
    def routing_key(self) -> str:
        return control_routing_key(self.meter)


ControlCommand = SetTotal | SetPulseEnergy | ForgetMeter


# The key of a set_total message's reading, by the channel's total unit: also the unit's command-line flag.
_TOTAL_KEYS = {"kWh": "kwh", "kvarh": "kwh", "m³": "m3", "L": "litres"}


def total_key(channel: str) -> str:
    """What a reading of ``channel`` is called in a set_total message: ``kwh``, ``m3`` or ``litres``.

    >>> total_key("active"), total_key("reactive"), total_key("gas"), total_key("water")
    ('kwh', 'kwh', 'm3', 'litres')
    """
    return _TOTAL_KEYS[channel_spec(channel).total_unit]


def encode_set_total(command: SetTotal) -> bytes:
    return encode_control(command)


def encode_control(command: ControlCommand) -> bytes:
    """Serialise a control command to its JSON body (validating it first)."""
    _validate_control(command)
    doc: dict[str, Any] = {"v": SCHEMA_VERSION, "id": command.id, "meter": command.meter}
    if isinstance(command, SetTotal):
        doc |= {"type": "set_total", "channel": command.channel, total_key(command.channel): str(command.total),
                "ts_ns": command.ts_ns}
    elif isinstance(command, SetPulseEnergy):
        doc |= {"type": "set_pulse_energy", "channel": command.channel, "wh": command.wh}
    else:
        doc["type"] = "forget_meter"
    return json.dumps(doc).encode()


def decode_control(body: bytes) -> ControlCommand:
    """Parse a control message; raise :class:`MessageError` if it is not one we know."""
    if len(body) > MAX_BODY_BYTES:
        raise MessageError(f"body is {len(body)} bytes, limit is {MAX_BODY_BYTES}")
    doc = _parse_object(body)
    _check_version(doc)
    kind = doc.get("type")
    # An unknown channel is refused below, by name.
    key = total_key(doc["channel"]) if doc.get("channel") in CHANNELS else "kwh"
    try:
        command: ControlCommand
        if kind == "set_total":
            command = SetTotal(doc["meter"], doc["channel"], Decimal(str(doc[key])), doc["ts_ns"], doc["id"])
        elif kind == "set_pulse_energy":
            command = SetPulseEnergy(doc["meter"], doc["channel"], doc["wh"], doc["id"])
        elif kind == "forget_meter":
            command = ForgetMeter(doc["meter"], doc["id"])
        else:
            raise MessageError(f"unknown control message type {kind!r:.40} (expected set_total, set_pulse_energy "
                               "or forget_meter)")
    except KeyError as exc:
        raise MessageError(f"control message lacks {exc}") from None
    except InvalidOperation:
        raise MessageError(f"{key} must be a decimal number, got {doc[key]!r:.40}") from None
    _validate_control(command)
    if isinstance(command, SetPulseEnergy):
        return SetPulseEnergy(command.meter, command.channel, float(command.wh), command.id)
    return command


def _validate_control(c: ControlCommand) -> None:
    validate_meter_id(c.meter)
    if not isinstance(c.id, str) or not _EPOCH_RE.fullmatch(c.id):
        raise MessageError(f"id must be 1-64 lowercase hex digits, got {c.id!r:.80}")
    if isinstance(c, ForgetMeter):
        return
    if c.channel not in CHANNELS:
        raise MessageError(f"channel must be one of {', '.join(CHANNELS)}, got {c.channel!r:.40}")
    if isinstance(c, SetPulseEnergy):
        if not isinstance(c.wh, int | float) or isinstance(c.wh, bool) or not MIN_WH <= c.wh <= MAX_WH:
            raise MessageError(f"wh must be a number from {MIN_WH:g} to {MAX_WH:g}, got {c.wh!r:.40}")
        return
    if not c.total.is_finite() or c.total < 0 or c.total > Decimal(10) ** 9:
        raise MessageError(f"{total_key(c.channel)} must be a number from 0 to 1e9, got {c.total}")
    if not _is_int(c.ts_ns) or not 0 < c.ts_ns < 2**63:
        raise MessageError(f"ts_ns must be a positive 64-bit integer, got {c.ts_ns!r:.40}")


LINK_STATES = ("up", "down")
MAX_VERSION_CHARS = 40
_STATUS_FIELDS = {"v", "type", "meter", "ts_ns", "uptime_s", "version", "link", "outbox", "channels"}
_STATUS_OPTIONAL = {"synced", "last_confirm_ns", "last_pulse_ns", "cpu_c"}
_COUNTER_FIELDS = {"epoch", "seq", "rejected"}
_VERSION_RE = re.compile(r"[A-Za-z0-9.+_-]{1,40}")


@dataclass(frozen=True, slots=True)
class ChannelStatus:
    """What an edge has counted on one channel: its counter (``epoch``, ``seq``; ``seq`` 0 before the first pulse)
    and the pulses its filter refused as noise since it started."""

    epoch: str
    seq: int
    rejected: int = 0


@dataclass(frozen=True, slots=True)
class Status:
    """An edge's report on itself (routing key ``status.<meter>``), sent every ``status_interval_s`` and when
    its link or clock changes. Replaceable: only the newest matters, and it never changes a total; the writer
    learns from it that the edge lives, and what it still holds. ``ts_ns`` is when it was made (by the edge's
    clock), ``last_confirm_ns`` the broker's last confirm of a pulse, ``last_pulse_ns`` the last recorded pulse
    (0 or None: never), ``cpu_c`` the processor's temperature in °C (None: the kernel does not say). Example::

        >>> s = Status("main", 1_700_000_000_000_000_000, 3600, "1.2.0", "up", 0,
        ...            {"active": ChannelStatus("ab12", 42, 1)}, synced=True, cpu_c=48.3)
        >>> decode_status(encode_status(s)) == s, s.routing_key
        (True, 'status.main')
    """

    meter: str
    ts_ns: int
    uptime_s: int
    version: str
    link: str
    outbox: int
    channels: dict[str, ChannelStatus]
    synced: bool | None = None
    last_confirm_ns: int | None = None
    last_pulse_ns: int | None = None
    cpu_c: float | None = None

    @property
    def routing_key(self) -> str:
        return status_routing_key(self.meter)


def encode_status(status: Status) -> bytes:
    """Serialise a status to its JSON body (validating it first); optional fields that are None are left out."""
    _validate_status(status)
    doc: dict[str, Any] = {"v": SCHEMA_VERSION, "type": "status", "meter": status.meter, "ts_ns": status.ts_ns,
                           "uptime_s": status.uptime_s, "version": status.version, "link": status.link,
                           "outbox": status.outbox,
                           "channels": {name: {"epoch": c.epoch, "seq": c.seq, "rejected": c.rejected}
                                        for name, c in status.channels.items()}}
    for key in sorted(_STATUS_OPTIONAL):
        if (value := getattr(status, key)) is not None:
            doc[key] = value
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_status(body: bytes) -> Status:
    """Parse and validate a status body; raise :class:`MessageError` if it is not one (unknown fields too)."""
    if len(body) > MAX_BODY_BYTES:
        raise MessageError(f"body is {len(body)} bytes, limit is {MAX_BODY_BYTES}")
    doc = _parse_object(body)
    _check_version(doc)
    if doc.get("type") != "status":
        raise MessageError(f"type must be 'status', got {doc.get('type')!r:.40}")
    missing, unknown = _STATUS_FIELDS - doc.keys(), doc.keys() - _STATUS_FIELDS - _STATUS_OPTIONAL
    if missing or unknown:
        raise MessageError(f"status: missing field(s) {', '.join(sorted(missing)) or 'none'}, unknown field(s) "
                           f"{', '.join(sorted(unknown))[:80] or 'none'}")
    channels = doc["channels"]
    if not isinstance(channels, dict) or len(channels) > len(CHANNELS):
        raise MessageError(f"channels must be an object of at most {len(CHANNELS)} channels")
    counters = {}
    for name, counter in channels.items():
        if not isinstance(counter, dict) or counter.keys() != _COUNTER_FIELDS:
            raise MessageError(f"channels.{name:.40} must hold exactly epoch, seq and rejected")
        counters[name] = ChannelStatus(counter["epoch"], counter["seq"], counter["rejected"])
    status = Status(doc["meter"], doc["ts_ns"], doc["uptime_s"], doc["version"], doc["link"], doc["outbox"],
                    counters, doc.get("synced"), doc.get("last_confirm_ns"), doc.get("last_pulse_ns"),
                    doc.get("cpu_c"))
    _validate_status(status)
    return status


def decode_status_routed(body: bytes, routing_key: str) -> Status:
    """:func:`decode_status` a status that arrived under ``routing_key``, which must name its meter (as a
    pulse's must, :func:`decode_routed`)."""
    status = decode_status(body)
    if status.routing_key != routing_key:
        raise MessageError(f"routing key {routing_key!r:.80} does not match the body's meter ({status.routing_key})")
    return status


def _is_count(value: object, limit: int = 2**63) -> bool:
    return _is_int(value) and 0 <= value < limit  # type: ignore[operator]


def _validate_status(s: Status) -> None:
    validate_meter_id(s.meter)
    for name in ("ts_ns", "uptime_s", "outbox"):
        if not _is_count(getattr(s, name)):
            raise MessageError(f"{name} must be an integer from 0 to 2^63-1, got {getattr(s, name)!r:.40}")
    for name in ("last_confirm_ns", "last_pulse_ns"):
        if getattr(s, name) is not None and not _is_count(getattr(s, name)):
            raise MessageError(f"{name} must be an integer from 0 to 2^63-1 when present, got "
                               f"{getattr(s, name)!r:.40}")
    if not isinstance(s.version, str) or not _VERSION_RE.fullmatch(s.version):
        raise MessageError(f"version must be 1-{MAX_VERSION_CHARS} characters of A-Z a-z 0-9 . + _ -, "
                           f"got {s.version!r:.60}")
    if s.link not in LINK_STATES:
        raise MessageError(f"link must be one of {', '.join(LINK_STATES)}, got {s.link!r:.40}")
    if s.synced is not None and not isinstance(s.synced, bool):
        raise MessageError(f"synced must be true or false when present, got {s.synced!r:.40}")
    if s.cpu_c is not None and (not isinstance(s.cpu_c, int | float) or isinstance(s.cpu_c, bool)
                                or not -100 <= s.cpu_c <= 200):
        raise MessageError(f"cpu_c must be a number from -100 to 200 when present, got {s.cpu_c!r:.40}")
    for name, c in s.channels.items():
        if name not in CHANNELS:
            raise MessageError(f"channel must be one of {', '.join(CHANNELS)}, got {name!r:.40}")
        if not isinstance(c.epoch, str) or not _EPOCH_RE.fullmatch(c.epoch):
            raise MessageError(f"channels.{name}.epoch must be 1-64 lowercase hex digits, got {c.epoch!r:.80}")
        if not _is_count(c.seq) or not _is_count(c.rejected):
            raise MessageError(f"channels.{name}: seq and rejected must be integers from 0 to 2^63-1")
