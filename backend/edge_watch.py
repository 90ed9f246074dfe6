"""Whether each meter's edge is heard from, and what its status says: truthful values while a Pi is silent.

Without this, a dead Pi (or one cut off from the broker) looks like a house
using nothing: the writer stays online, power decays to 0 and the total stays
flat. An edge that sends statuses (:class:`~common.message.Status`) is heard
at least every ``status_interval_s``; after ``edge_timeout`` without any
message from it (status or pulse) it is *offline*: the writer says so on the
meter's edge topic, which the rate sensors' availability includes, so Home
Assistant shows them unavailable. The totals stay available with their last
exact value (a gap in a ``total_increasing`` sensor is not a reset); once the
edge is back its backlog is counted exactly and the rates return.

Only meters whose edge has sent a status are judged (since the writer
started, or before it, as its retained discovery shows: :meth:`EdgeWatch.adopt`):
an older edge, or an ESP32 publishing pulses only, sends pulses only when the
meter turns, and judging it would flap offline between pulses.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from backend.batch import Delivery
from backend.topics import edge_status_topic, edge_topic
from backend.trust import sender_doubt
from common.message import MessageError, Status, decode_status_routed

log = logging.getLogger("emdc.writer")
NS_PER_S = 1_000_000_000


class EdgeLiveness:
    """Which edges are online, from when each was last heard; pure, the caller passes the time.

    An edge is judged only once it sent a status (``status=True``); :meth:`changes`
    returns each change once, the first verdict of a meter included::

        >>> S = NS_PER_S
        >>> live = EdgeLiveness(timeout_s=90)
        >>> live.heard("main", 0, status=False)      # pulses alone: never judged
        >>> live.changes(1000 * S)
        []
        >>> live.heard("main", 1000 * S, status=True)
        >>> live.changes(1000 * S)
        [('main', True, 0.0, True)]
        >>> live.changes(1090 * S), live.changes(1091 * S)
        ([], [('main', False, 91.0, False)])
        >>> live.heard("main", 1200 * S, status=False)  # a pulse is a sign of life too
        >>> live.changes(1200 * S), live.online("main")
        ([('main', True, 0.0, False)], True)
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_ns = int(timeout_s * NS_PER_S)
        self._heard: dict[str, int] = {}  # meters whose edge sent a status: when last heard
        self._verdict: dict[str, bool] = {}  # the last verdict reported by changes()

    def heard(self, meter: str, now_ns: int, *, status: bool) -> None:
        """A message of ``meter`` arrived at ``now_ns``; ``status``: it was a status."""
        if status or meter in self._heard:
            self._heard[meter] = max(now_ns, self._heard.get(meter, now_ns))

    def judged(self, meter: str) -> bool:
        """True once ``meter``'s edge sent a status."""
        return meter in self._heard

    def online(self, meter: str) -> bool | None:
        """The last verdict on ``meter``'s edge (None: not judged yet)."""
        return self._verdict.get(meter)

    def changes(self, now_ns: int) -> list[tuple[str, bool, float, bool]]:
        """The meters whose verdict changed since the last call: (meter, online, seconds since last heard,
        whether it is the meter's first verdict)."""
        changed = []
        for meter, heard_ns in sorted(self._heard.items()):
            silent_ns = max(0, now_ns - heard_ns)
            online = silent_ns <= self.timeout_ns
            if self._verdict.get(meter) != online:
                changed.append((meter, online, silent_ns / NS_PER_S, meter not in self._verdict))
                self._verdict[meter] = online
        return changed

    def forget(self, meter: str) -> None:
        self._heard.pop(meter, None)
        self._verdict.pop(meter, None)


@dataclass(frozen=True, slots=True)
class Diagnostics:
    """What Home Assistant's diagnostic entities of a meter show, from its edge's latest status and the writer's
    own counters: ``pending`` pulses the edge counted that the writer has not yet (summed over channels).

    >>> from common.message import ChannelStatus
    >>> status = Status("main", 1, 60, "0.1.0", "up", 3, {"active": ChannelStatus("ab", 10, 2)}, synced=True)
    >>> Diagnostics.of(status, cursor=lambda channel, epoch: 4).payload()
    '{"pending": 6, "outbox": 3, "rejected": 2, "synced": "ON", "version": "0.1.0", "cpu_c": null, "last_pulse": null}'
    """

    pending: int
    outbox: int
    rejected: int
    synced: bool | None
    version: str
    cpu_c: float | None
    last_pulse_ns: int | None

    @classmethod
    def of(cls, status: Status, cursor: Callable[[str, str], int]) -> Diagnostics:
        """``cursor(channel, epoch)`` is the writer's count of that epoch (0 if it has none)."""
        pending = sum(max(0, c.seq - cursor(name, c.epoch)) for name, c in status.channels.items())
        return cls(pending, status.outbox, sum(c.rejected for c in status.channels.values()), status.synced,
                   status.version, status.cpu_c, status.last_pulse_ns)

    def payload(self) -> str:
        synced = None if self.synced is None else ("ON" if self.synced else "OFF")
        last = (None if not self.last_pulse_ns else
                dt.datetime.fromtimestamp(self.last_pulse_ns / 1e9, dt.UTC).isoformat(timespec="seconds"))
        return json.dumps({"pending": self.pending, "outbox": self.outbox, "rejected": self.rejected,
                           "synced": synced, "version": self.version, "cpu_c": self.cpu_c, "last_pulse": last})


class EdgeWatch:
    """The writer's side of edge statuses: takes them from the queue, judges liveness, publishes the edge topic
    and the diagnostics. A status never changes a total. Example::

        watch = EdgeWatch(prefix, timeout_s=90, publish=sink.publish, cursor=ledger_cursor)
        watch.take(delivery, now_ns)   # a status; raises MessageError for a bad one
        watch.heard_pulse("main", now_ns)
        watch.publish(now_ns)          # after each batch, and on each idle pass
    """

    def __init__(self, topic_prefix: str, timeout_s: float, publish: Callable[[str, str], object],
                 cursor: Callable[[str, str, str], int]) -> None:
        self.topic_prefix = topic_prefix
        self.liveness = EdgeLiveness(timeout_s)
        self._publish = publish
        self._cursor = cursor
        self._latest: dict[str, Diagnostics] = {}
        self._fresh: set[str] = set()  # meters with a status whose diagnostics are not published yet

    def take(self, delivery: Delivery, now_ns: int, counted: Iterable[str]) -> str:
        """Take a status delivery; return the meter whose discovery must now include its edge ("" if none).
        Raises :class:`MessageError` for a status that is malformed, misrouted, sent by another meter's account,
        or of a meter not in ``counted``."""
        status = decode_status_routed(delivery.body, delivery.routing_key)
        if doubt := sender_doubt(delivery.user_id, status.meter):
            raise MessageError(doubt)
        if status.meter not in counted:
            raise MessageError(f"status of meter {status.meter!r}, which this writer does not count")
        new = not self.liveness.judged(status.meter)
        self.liveness.heard(status.meter, now_ns, status=True)
        # Compared with the writer's count as the status arrives: a status overtakes the backlog it describes.
        self._latest[status.meter] = Diagnostics.of(status, lambda channel, epoch: self._cursor(status.meter, channel,
                                                                                                 epoch))
        self._fresh.add(status.meter)
        return status.meter if new else ""

    def adopt(self, meter: str, now_ns: int) -> None:
        """Judge ``meter``'s edge from ``now_ns`` on, as if it had sent a status then: it did so before this writer
        started (Home Assistant holds its edge entities), and a writer restart must not hide that it fell silent."""
        self.liveness.heard(meter, now_ns, status=True)

    def heard_pulse(self, meter: str, now_ns: int) -> None:
        self.liveness.heard(meter, now_ns, status=False)

    def reports(self, meter: str) -> bool:
        """True if ``meter``'s edge sends statuses: its discovery includes the edge topic and diagnostics."""
        return self.liveness.judged(meter)

    def publish(self, now_ns: int) -> None:
        """Publish the changes of liveness (one log line each) and the diagnostics of fresh statuses."""
        for meter, online, silent_s, first in self.liveness.changes(now_ns):
            if not online:
                log.warning("meter %s: edge offline (nothing for %.0f s); its rates are unavailable, its totals "
                            "keep their last value", meter, silent_s)
            elif not first:
                log.info("meter %s: edge back", meter)
            self._publish(edge_topic(self.topic_prefix, meter), "online" if online else "offline")
        for meter in sorted(self._fresh):
            self._publish_diagnostics(meter)
        self._fresh.clear()

    def publish_all(self) -> None:
        """Publish the edge topic and diagnostics of every judged meter again (after an MQTT reconnect)."""
        for meter in sorted(self._latest):
            online = self.liveness.online(meter)
            if online is not None:
                self._publish(edge_topic(self.topic_prefix, meter), "online" if online else "offline")
            self._publish_diagnostics(meter)

    def _publish_diagnostics(self, meter: str) -> None:
        self._publish(edge_status_topic(self.topic_prefix, meter), self._latest[meter].payload())

    def forget(self, meter: str) -> None:
        self.liveness.forget(meter)
        self._latest.pop(meter, None)
        self._fresh.discard(meter)
