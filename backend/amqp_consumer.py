"""Consume a RabbitMQ queue in batches, forever, surviving broker restarts.

The consumer takes whatever is immediately available (up to the prefetch
count) as one batch, hands it to a handler, publishes the dead letters the
handler returns to ``<exchange>.dead`` (with the reason in a header, confirmed
by the broker) and acknowledges the whole batch with one ``multiple=True``
ack. A lone live message is a batch of one, so batching adds no latency.

Only one consumer may count a queue. Before consuming, the consumer takes
the queue's lease (an exclusive consumer on ``<queue>.active``, see
:func:`~common.topology.lease_queue`); while another writer holds it, this
one is a standby, says so once, and takes over when the lease frees up. The
queue's single-active-consumer argument guards the same against consumers
that take no lease (older versions). ``on_active`` runs on every takeover
and may refuse it (:class:`TakeoverRefused`), e.g. when this writer's state
is not the one Home Assistant's totals came from.

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
from dataclasses import replace

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
    consumer_queue_steps,
    dead_letter_exchange,
    lease_queue,
    status_queue,
    status_queue_steps,
)

log = logging.getLogger("emdc.amqp")
# How often a standby asks for the lease (the most a takeover waits for it once the active writer is gone), and
# how long a refused takeover waits before it asks again.
LEASE_RETRY_S = 1.0
REFUSED_RETRY_S = 30.0

def _ignore(*_: object) -> None:
    """The lease queue is never bound: nothing ever arrives on it."""


def delivery(method: pika.spec.Basic.Deliver, props: pika.BasicProperties, body: bytes) -> Delivery:
    """The :class:`Delivery` of a received message; a message moved by a person (a re-admitted dead letter,
    a queue migration) keeps its original routing key."""
    headers = props.headers or {}
    # Only through the default exchange: an edge account can set any header, but may write only its exchange.
    if method.exchange == "" and ROUTING_KEY_HEADER in headers:
        return Delivery(method.delivery_tag, str(headers[ROUTING_KEY_HEADER]), body,
                        headers.get(READMITTED_HEADER) is True)
    return Delivery(method.delivery_tag, method.routing_key, body, user_id=props.user_id or "")


class ConsumerCancelled(Exception):
    """The broker cancelled our consumer (queue deleted, node failover)."""


class TakeoverRefused(Exception):
    """``on_active`` refused to count this queue; the text says why and what to do."""


def _link_unwatched(connected: bool) -> None:
    """Nobody shows this consumer's link."""


def _nothing_to_check() -> None:
    return None


class BatchConsumer:
    """Runs ``handler`` over batches from ``queue`` until ``stop`` is set.

    With ``status_bindings`` it also reads the edges' statuses from the status queue beside ``queue``
    (:func:`~common.topology.status_queue`), on a channel of its own and without acknowledgements: a status
    is replaceable, and read at once, not behind the pulses waiting in ``queue``.
    """

    def __init__(self, config: Config, queue: str, bindings: tuple[str, ...], handler: BatchHandler, *,
                 heartbeat: Heartbeat, name: str = "emdc-writer", on_idle: Callable[[], None] | None = None,
                 idle_interval_s: float = 1.0, trouble: Callable[[], str] = lambda: "",
                 on_active: Callable[[], None] = _nothing_to_check,
                 on_link: Callable[[bool], None] = _link_unwatched,
                 status_bindings: tuple[str, ...] = ()) -> None:
        self.config = config
        self.queue = queue
        self.bindings = bindings
        self.status_bindings = status_bindings
        self.handler = handler
        self.name = name
        self.on_idle = on_idle
        self.idle_interval_s = idle_interval_s
        self.heartbeat = heartbeat
        self.trouble = trouble
        self.on_active = on_active
        # Told when the link to RabbitMQ is up (this consumer counting) and when it is lost.
        self.on_link = on_link
        # Set while this consumer holds the queue's lease (it is the one writer counting it).
        self.active = threading.Event()
        self._refused = ""
        self._trouble = ""
        self._trouble_since = 0.0
        self._state = ""

    def run(self, stop: threading.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            try:
                self._session(stop, backoff)
            except TakeoverRefused as exc:
                # Leaving the session released the lease: a writer whose state is right may take it.
                self._refused = str(exc)
                self._log_state(f"not taking over {self.queue}: {exc}", logging.ERROR)
                retry_at = time.monotonic() + REFUSED_RETRY_S
                while not stop.is_set() and time.monotonic() < retry_at:
                    self._beat()  # alive, and unhealthy once the refusal lasts
                    stop.wait(self.idle_interval_s)
            except (pika.exceptions.AMQPError, ConsumerCancelled) as exc:
                self._log_state(f"disconnected from {describe(self.config)} ({reason(exc)}); retrying",
                                logging.WARNING)
                self.on_link(False)
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
            if self.config.declare_topology:
                self._declare(connection)
            channel = self._take_lease(connection, stop)
            if channel is None:
                return
            self.on_active()
            self._refused = ""
            self.active.set()
            self.on_link(True)
            channel.confirm_delivery()
            channel.basic_qos(prefetch_count=self.config.batch_size)
            pending: list[Delivery] = []
            cancelled: list[object] = []

            def on_message(_ch: object, method: pika.spec.Basic.Deliver, props: pika.BasicProperties,
                           body: bytes) -> None:
                pending.append(delivery(method, props, body))

            def on_status(_ch: object, method: pika.spec.Basic.Deliver, props: pika.BasicProperties,
                          body: bytes) -> None:
                pending.append(replace(delivery(method, props, body), tag=0))  # nothing to acknowledge

            channel.add_on_cancel_callback(cancelled.append)
            channel.basic_consume(self.queue, on_message)
            if self.status_bindings:
                self._consume_statuses(connection, on_status)
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
            self.active.clear()  # the lease ends with the connection
            if connection.is_open:
                with contextlib.suppress(pika.exceptions.AMQPError):
                    connection.close()

    def _declare(self, connection: pika.BlockingConnection) -> None:
        """Declare the topology; what clashes with an older version's declarations is explained, not fatal.

        The arguments of an existing queue or exchange cannot change: a writer
        queue without single active consumer (the lease still allows one writer
        only) or a direct dead-letter exchange (routing by key still works)
        each get one warning line with the way to migrate.
        """
        channel = connection.channel()
        steps = consumer_queue_steps(self.config.exchange, self.queue, self.bindings, self.config.queue_type,
                                     self.config.delivery_limit)
        if self.status_bindings:
            steps += status_queue_steps(self.config.exchange, self.queue, self.status_bindings)
        for what, step in steps:
            try:
                step(channel)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == 404 and what == f"queue {lease_queue(self.queue)}":
                    channel = connection.channel()  # its node is down: _take_lease says so
                    continue
                if exc.reply_code == 403 and what.startswith("exchange "):
                    # An account that may declare its queues but not the exchanges (the deployment's writer
                    # account, for a partition's queues): the broker definitions made them; they must exist.
                    channel = connection.channel()
                    channel.exchange_declare(what.removeprefix("exchange "), passive=True)
                    continue
                if exc.reply_code != 406:
                    raise
                log.warning("%s was declared by an older version (%s); it works as it is. To migrate, see "
                            "'Upgrade' in the security guide (emdc queue migrate)", what,
                            exc.reply_text.split(" - ", 1)[-1])
                channel = connection.channel()

    def _consume_statuses(self, connection: pika.BlockingConnection, on_status: Callable[..., None]) -> None:
        """Read the status queue on a channel of its own; without it (a deployment that does not declare it),
        one warning, and the writer counts on without statuses."""
        statuses = status_queue(self.queue)
        try:
            connection.channel().basic_consume(statuses, on_status, auto_ack=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            self._log_state(f"no status queue {statuses} on {describe(self.config)}: edges' statuses are not read "
                            "(see 'Upgrade' in the security guide)", logging.WARNING)

    def _take_lease(self, connection: pika.BlockingConnection,
                    stop: threading.Event) -> pika.adapters.blocking_connection.BlockingChannel | None:
        """A channel holding the queue's lease, once no other writer holds it (None if stopped meanwhile)."""
        lease = lease_queue(self.queue)
        while not stop.is_set():
            channel = connection.channel()
            try:
                channel.basic_consume(lease, _ignore, exclusive=True)
                return channel
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == 403 and "exclusive use" in exc.reply_text:
                    self._log_state(f"standby: another writer is consuming {self.queue} on "
                                    f"{describe(self.config)}; taking over when it stops")
                elif exc.reply_code == 404 and "is down or inaccessible" in exc.reply_text:
                    # A classic queue lives on one node of a cluster; the queue's single active consumer still
                    # lets one writer count at a time. The lease is tried again on the next connection.
                    log.warning("cannot take the writer lease %s: its RabbitMQ node is down (%s); counting %s with "
                                "single active consumer alone until this writer reconnects", lease,
                                exc.reply_text, self.queue)
                    return connection.channel()
                elif exc.reply_code in (403, 404):
                    # Broker definitions of an older version: no lease queue, or no right to read it.
                    log.warning("cannot take the writer lease %s (%s); counting %s with single active consumer "
                                "alone, which cannot tell a standby that it is one. Add %s to the broker "
                                "definitions (see the security guide)", lease, exc.reply_text, self.queue, lease)
                    return connection.channel()
                else:
                    raise
            self._beat("")  # a standby is healthy: it is ready to take over
            # sleep, not process_data_events: after the refused channel that returns at once, and a standby
            # would ask the broker for the lease thousands of times a second.
            connection.sleep(LEASE_RETRY_S)
        return None

    def _beat(self, trouble: str | None = None) -> None:
        """Touch the heartbeat; note when ``trouble`` (by default: a refused takeover, or e.g. MQTT out of
        reach) begins, changes or ends."""
        if trouble is None:
            trouble = self._refused or self.trouble()
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
        acknowledged = max(d.tag for d in batch)  # statuses (tag 0) need none
        if acknowledged:
            channel.basic_ack(acknowledged, multiple=True)
