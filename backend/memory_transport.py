"""In-process stand-ins for a RabbitMQ queue and for Mosquitto, used by ``emdc simulate``
when no broker is configured. The writer logic they drive is the production one.

Example::

    queue, sink = MemoryQueue(), MemorySink()
    writer = EnergyWriter.open(config, sink)
    threading.Thread(target=queue.run, args=(stop, writer.handle_batch)).start()
    queue.put("pulse.main.active", body)
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable

from backend.batch import BatchHandler, DeadLetter, Delivery


class MemoryQueue:
    """A FIFO of deliveries consumed in batches, with dead letters kept in a list."""

    def __init__(self, batch_size: int = 500) -> None:
        self.batch_size = batch_size
        self.dead: list[DeadLetter] = []
        self._queue: queue.SimpleQueue[Delivery] = queue.SimpleQueue()
        self._tags = itertools.count(1)
        self._lock = threading.Lock()

    def put(self, routing_key: str, body: bytes) -> None:
        with self._lock:
            self._queue.put(Delivery(next(self._tags), routing_key, body))

    def empty(self) -> bool:
        return self._queue.empty()

    def run(self, stop: threading.Event, handler: BatchHandler, on_idle: Callable[[], None] = lambda: None) -> None:
        while not (stop.is_set() and self._queue.empty()):
            batch: list[Delivery] = []
            try:
                batch.append(self._queue.get(timeout=0.2))
                while len(batch) < self.batch_size:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            if batch:
                self.dead.extend(handler(batch))
            on_idle()


class MemorySink:
    """Keeps the retained value of every topic, like a broker would."""

    def __init__(self) -> None:
        self.retained: dict[str, str] = {}

    def publish(self, topic: str, payload: str) -> None:
        self.retained[topic] = payload
