"""Consume a RabbitMQ queue in batches, forever, surviving broker restarts.

The consumer takes whatever is immediately available (up to the prefetch
count) as one batch, hands it to a handler, publishes the dead letters the
handler returns to ``<exchange>.dead`` (with the reason in a header, confirmed
by the broker) and acknowledges the whole batch with one ``multiple=True``
ack. A lone live message is a batch of one, so batching adds no latency.

Example::

    consumer = BatchConsumer(config, config.queue, WRITER_BINDINGS, writer.handle_batch,
                             heartbeat=Heartbeat.of(config, WRITER))
    consumer.run(stop_event)
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import pika
import pika.exceptions

from backend.batch import BatchHandler, Delivery
from backend.heartbeat import Heartbeat
from common.amqp import connection_parameters, describe, reason
from common.backoff import Backoff
from common.config import Config
from common.topology import (
    ERROR_HEADER,
    READMITTED_HEADER,
    ROUTING_KEY_HEADER,
    dead_letter_exchange,
    declare_consumer_queue,
)

log = logging.getLogger("emdc.amqp")

def delivery(method: pika.spec.Basic.Deliver, props: pika.BasicProperties, body: bytes) -> Delivery:
    """The :class:`Delivery` of a received message; a re-admitted dead letter keeps its original routing key."""
    headers = props.headers or {}
    # Only through the default exchange: an edge account can set any header, but may write only its exchange.
    if method.exchange == "" and headers.get(READMITTED_HEADER) is True:
        return Delivery(method.delivery_tag, str(headers.get(ROUTING_KEY_HEADER, method.routing_key)), body, True)
    return Delivery(method.delivery_tag, method.routing_key, body)


class ConsumerCancelled(Exception):
    """The broker cancelled our consumer (queue deleted, node failover)."""


class BatchConsumer:
    """Runs ``handler`` over batches from ``queue`` until ``stop`` is set."""

    def __init__(self, config: Config, queue: str, bindings: tuple[str, ...], handler: BatchHandler, *,
                 heartbeat: Heartbeat, name: str = "emdc-writer", on_idle: Callable[[], None] | None = None,
                 idle_interval_s: float = 1.0, trouble: Callable[[], str] = lambda: "") -> None:
        self.config = config
        self.queue = queue
        self.bindings = bindings
        self.handler = handler
        self.name = name
        self.on_idle = on_idle
        self.idle_interval_s = idle_interval_s
        self.heartbeat = heartbeat
        self.trouble = trouble
        self._trouble = ""
        self._trouble_since = 0.0
        self._state = ""

    def run(self, stop: threading.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            try:
                self._session(stop, backoff)
            except (pika.exceptions.AMQPError, ConsumerCancelled) as exc:
                self._log_state(f"disconnected from {describe(self.config)} ({reason(exc)}); retrying",
                                logging.WARNING)
                stop.wait(backoff.next_delay())
            except OSError as exc:
                # Saving or storing the batch failed (disk full, database down): it stays unacknowledged.
                self._log_state(f"cannot process a batch from {self.queue} ({exc}); it stays in the queue, "
                                "retrying", logging.WARNING)
                stop.wait(backoff.next_delay())
            except Exception:
                # Unacked messages are redelivered, so retrying is safe; say loudly why.
                log.exception("unexpected error while consuming %s; reconnecting", self.queue)
                self._state = ""
                stop.wait(backoff.next_delay())

    def _log_state(self, text: str, level: int = logging.INFO) -> None:
        # One line per change of state, not one per retry.
        if text != self._state:
            self._state = text
            log.log(level, "%s", text)

    def _session(self, stop: threading.Event, backoff: Backoff) -> None:
        connection = pika.BlockingConnection(connection_parameters(self.config, self.name))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            if self.config.declare_topology:
                declare_consumer_queue(channel, self.config.exchange, self.queue, self.bindings)
            channel.basic_qos(prefetch_count=self.config.batch_size)
            pending: list[Delivery] = []
            cancelled: list[object] = []

            def on_message(_ch: object, method: pika.spec.Basic.Deliver, props: pika.BasicProperties,
                           body: bytes) -> None:
                pending.append(delivery(method, props, body))

            channel.add_on_cancel_callback(cancelled.append)
            channel.basic_consume(self.queue, on_message)
            next_idle = 0.0
            while not stop.is_set():
                connection.process_data_events(time_limit=min(self.idle_interval_s, 0.5))
                if cancelled:
                    raise ConsumerCancelled(f"consumer on {self.queue} cancelled by the broker")
                while pending and len(pending) < self.config.batch_size:
                    before = len(pending)
                    connection.process_data_events(time_limit=0)
                    if len(pending) == before:
                        break
                if pending:
                    batch, pending[:] = list(pending), []
                    self._finish(channel, batch)
                if time.monotonic() >= next_idle:
                    # Healthy only once a pass, and any batch in it, went through: a handler that
                    # fails every time (database down, disk full) backs off like a lost connection.
                    self._log_state(f"consuming {self.queue} on {describe(self.config)}")
                    backoff.reset()
                    next_idle = time.monotonic() + self.idle_interval_s
                    self._beat()
                    if self.on_idle:
                        self.on_idle()
            # Messages delivered but not yet handled are simply redelivered later.
            connection.close()
            self._log_state("consumer stopped")
        finally:
            if connection.is_open:
                with contextlib.suppress(pika.exceptions.AMQPError):
                    connection.close()

    def _beat(self) -> None:
        """Touch the heartbeat; note when ``trouble`` (e.g. MQTT out of reach) begins, changes or ends."""
        trouble = self.trouble()
        if trouble != self._trouble:
            if not self._trouble:
                self._trouble_since = time.time()
            self.heartbeat.note(trouble, self._trouble_since)
            self._trouble = trouble
        self.heartbeat.touch()

    def _finish(self, channel: pika.adapters.blocking_connection.BlockingChannel, batch: list[Delivery]) -> None:
        for dead in self.handler(batch):
            headers = {ERROR_HEADER: dead.reason[:1000], ROUTING_KEY_HEADER: dead.delivery.routing_key}
            channel.basic_publish(dead_letter_exchange(self.config.exchange), self.queue, dead.delivery.body,
                                  pika.BasicProperties(delivery_mode=2, headers=headers), mandatory=True)
        channel.basic_ack(batch[-1].tag, multiple=True)
