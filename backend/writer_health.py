"""The writer's own health, as Home Assistant's diagnostic entities show it next to the edge's.

Whether the writer is alive and reaches Mosquitto is its availability topic
(with its last will). What that cannot show is published here, retained, as
JSON on the writer's health topic (:func:`~backend.topics.writer_health_topic`):
whether it is connected to RabbitMQ, and how many messages it dead-lettered
in the last hour (held back with their reason: ``emdc dead-letters list``).
It is published when it changes, so a quiet hour costs one message when the
count falls back to 0. Pure but for ``publish``: the caller passes its clock.

Example::

    >>> sent = []
    >>> health = WriterHealth("home/energy/writer_health", lambda topic, payload: sent.append(payload))
    >>> health.link(True, now_ns=0)
    >>> health.dead_lettered(2, now_ns=10 * NS_PER_S)
    >>> health.publish(now_ns=3599 * NS_PER_S)  # nothing new
    >>> health.publish(now_ns=3611 * NS_PER_S)  # the two are more than an hour old
    >>> sent
    ['{"rabbitmq": "ON", "dead_letters_hour": 0}', '{"rabbitmq": "ON", "dead_letters_hour": 2}', \
'{"rabbitmq": "ON", "dead_letters_hour": 0}']
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable

NS_PER_S = 1_000_000_000
MINUTE_NS = 60 * NS_PER_S
HOUR_MINUTES = 60


class WriterHealth:
    """The RabbitMQ link and the dead letters of the last hour (in minute buckets), published to ``topic``."""

    def __init__(self, topic: str, publish: Callable[[str, str], object]) -> None:
        self.topic = topic
        self._publish = publish
        self._connected: bool | None = None
        self._minutes: deque[tuple[int, int]] = deque()  # (minute, dead letters in it), oldest first
        self._sent = ""

    def link(self, connected: bool, now_ns: int) -> None:
        """The RabbitMQ link came up or went down: published at once."""
        self._connected = connected
        self.publish(now_ns)

    def dead_lettered(self, count: int, now_ns: int) -> None:
        """``count`` messages of a batch were dead-lettered: published at once."""
        minute = now_ns // MINUTE_NS
        if self._minutes and self._minutes[-1][0] == minute:
            self._minutes[-1] = (minute, self._minutes[-1][1] + count)
        else:
            self._minutes.append((minute, count))
        self.publish(now_ns)

    def last_hour(self, now_ns: int) -> int:
        """Messages dead-lettered within the last hour (to the minute)."""
        minute = now_ns // MINUTE_NS
        while self._minutes and self._minutes[0][0] <= minute - HOUR_MINUTES:
            self._minutes.popleft()
        return sum(count for _, count in self._minutes)

    def payload(self, now_ns: int) -> str:
        return json.dumps({"rabbitmq": "ON" if self._connected else "OFF", "dead_letters_hour": self.last_hour(now_ns)})

    def publish(self, now_ns: int, *, force: bool = False) -> None:
        """Publish the health if it changed since it was last published (or with ``force``); nothing before the
        link's state is known (the writer has not tried RabbitMQ yet)."""
        if self._connected is None:
            return
        payload = self.payload(now_ns)
        if force or payload != self._sent:
            self._publish(self.topic, payload)
            self._sent = payload
