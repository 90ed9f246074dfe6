"""Drain the outbox into a function instead of RabbitMQ: the embedded transport of ``emdc simulate``.

Same contract as :class:`~edge.amqp_publisher.AmqpPublisher`: rows leave the
outbox only after ``deliver`` returned (the in-process "confirm").
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from common.message import encode
from edge.outbox import OutboxReader

BATCH = 512


class MemoryPublisher:
    def __init__(self, open_reader: Callable[[], OutboxReader], deliver: Callable[[str, bytes], None]) -> None:
        self._open_reader = open_reader
        self._deliver = deliver
        self._wakeup = threading.Event()

    def wake(self) -> None:
        self._wakeup.set()

    def run(self, stop: threading.Event) -> None:
        reader = self._open_reader()
        try:
            while not stop.is_set():
                self._wakeup.wait(0.2)
                self._wakeup.clear()
                while rows := reader.pending(0, BATCH):
                    for _, pulse in rows:
                        self._deliver(pulse.routing_key, encode(pulse))
                    reader.confirm([row_id for row_id, _ in rows])
        finally:
            reader.close()
