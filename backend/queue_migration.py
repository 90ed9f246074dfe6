"""Re-declare a writer queue that an older version declared without single active consumer.

A queue's arguments cannot change, so the queue is rebuilt around a holding
queue, with no message lost and none left behind:

1. a holding queue ``<queue>.migrating`` gets the queue's bindings, so new
   pulses land there too (counting twice is impossible: the writer counts by
   counter, so a copy of a pulse counts nothing);
2. the old queue loses its bindings, its messages move to the holding queue,
   and it is deleted (only when empty);
3. the queue is declared anew with today's arguments, the holding queue's
   messages move into it, the queue gets its bindings back, the holding
   queue loses its own, the last arrivals move over and it is deleted.

A dead-letter exchange an older version declared *direct* (where RabbitMQ
checks no topic permissions, so each writer could dead-letter into the
other's queue) is re-declared as a topic exchange with the dead-letter
queues' bindings; it holds no messages, so nothing is lost.

Messages keep their routing key in a header (:data:`~common.topology.ROUTING_KEY_HEADER`),
honoured on messages that come through the default exchange, which only the
admin account may write. Writers must be stopped meanwhile; the edges may go
on publishing.

Example::

    moved = migrate(config, "queue_mqtt_writer", WRITER_BINDINGS)
"""

from __future__ import annotations

from typing import Any

import pika
import pika.exceptions

from backend.dead_letters import move_messages
from common.amqp import connection_parameters
from common.config import Config
from common.topology import (
    ROUTING_KEY_HEADER,
    dead_letter_exchange,
    dead_letter_queue,
    lease_queue,
    queue_arguments,
)

PRECONDITION_FAILED = 406


class MigrationRefused(RuntimeError):
    """The queue cannot be migrated now; the text says why and what to do."""


def holding_queue(queue: str) -> str:
    return f"{queue}.migrating"


def _keep_routing_key(method: pika.spec.Basic.GetOk, properties: pika.BasicProperties) -> dict[str, Any]:
    headers = dict(properties.headers or {})
    headers.setdefault(ROUTING_KEY_HEADER, method.routing_key)
    return headers


def _consumers(connection: pika.BlockingConnection, queue: str) -> int:
    """Consumers of ``queue``, 0 if it does not exist (a broker without writer leases)."""
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0


def _topic_dead_letter_exchange(connection: pika.BlockingConnection, config: Config) -> None:
    """Re-declare a direct dead-letter exchange as a topic one, binding every writer's dead-letter queue again."""
    dlx = dead_letter_exchange(config.exchange)
    try:
        connection.channel().exchange_declare(dlx, "topic", durable=True)
        return
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != PRECONDITION_FAILED:
            raise
    channel = connection.channel()
    channel.exchange_delete(dlx)
    channel.exchange_declare(dlx, "topic", durable=True)
    for queue in (config.queue, config.db_queue):
        try:
            channel.queue_declare(dead_letter_queue(queue), passive=True)
        except pika.exceptions.ChannelClosedByBroker:  # that writer never ran here
            channel = connection.channel()
            continue
        channel.queue_bind(dead_letter_queue(queue), dlx, queue)


def migrate(config: Config, queue: str, bindings: tuple[str, ...]) -> int:
    """Rebuild ``queue`` with today's arguments; return how many messages it held. Needs the admin account."""
    connection = pika.BlockingConnection(connection_parameters(config, "emdc-queue-migrate"))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        consumers = channel.queue_declare(queue, passive=True).method.consumer_count
        standbys = _consumers(connection, lease_queue(queue))
        if consumers or standbys:
            raise MigrationRefused(f"{queue} has {consumers + standbys} writer(s) consuming or standing by: stop "
                                   "its writers first")
        holding = holding_queue(queue)
        channel.queue_declare(holding, durable=True)
        for key in bindings:
            channel.queue_bind(holding, config.exchange, key)
        for key in bindings:
            channel.queue_unbind(queue, config.exchange, key)
        held = move_messages(channel, queue, holding, _keep_routing_key)
        channel.queue_delete(queue, if_empty=True)
        channel.queue_declare(queue, durable=True, arguments=queue_arguments(config.exchange, queue))
        channel.queue_declare(lease_queue(queue), durable=True)
        move_messages(channel, holding, queue, _keep_routing_key)
        for key in bindings:
            channel.queue_bind(queue, config.exchange, key)
        for key in bindings:
            channel.queue_unbind(holding, config.exchange, key)
        move_messages(channel, holding, queue, _keep_routing_key)
        channel.queue_delete(holding, if_empty=True)
        _topic_dead_letter_exchange(connection, config)
        return held
    finally:
        if connection.is_open:
            connection.close()
