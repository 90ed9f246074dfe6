"""Re-declare a writer queue with today's arguments: single active consumer, and the configured queue type.

An older version declared writer queues without single active consumer; a
classic queue becomes a quorum queue (``queue_type = "quorum"``) the same way.
A queue's arguments cannot change, so the queue (and then its dead-letter
queue) is rebuilt around a holding queue, with no message lost and none left
behind:

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
    dead_letter_queue_arguments,
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


def _exists(connection: pika.BlockingConnection, queue: str) -> bool:
    try:
        connection.channel().queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker:
        return False
    return True


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
    for queue in (config.writer_queue(), config.db_queue):
        if _exists(connection, dead_letter_queue(queue)):  # else that writer never ran here
            channel.queue_bind(dead_letter_queue(queue), dlx, queue)


def _rebuild(connection: pika.BlockingConnection, queue: str, arguments: dict[str, Any],
             bindings: list[tuple[str, str]]) -> int:
    """Rebuild ``queue`` with ``arguments`` and its ``bindings`` (exchange, key); return how many messages it held.

    Already declared with ``arguments``, the queue is left as it is. The
    holding queue is classic whatever the queue becomes: only a classic queue
    can be deleted *if empty*, which is what keeps the last arrivals."""
    try:
        return int(connection.channel().queue_declare(queue, durable=True, arguments=arguments).method.message_count)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != PRECONDITION_FAILED:
            raise
        if "current is 'quorum'" in exc.reply_text:  # basic.get, which moves the messages, fails on it
            raise MigrationRefused(f"{queue} is a quorum queue: emdc queue migrate does not turn it back into a "
                                   "classic one") from None
    channel = _confirming(connection)
    holding = holding_queue(queue)
    channel.queue_declare(holding, durable=True)
    for exchange, key in bindings:
        channel.queue_bind(holding, exchange, key)
    for exchange, key in bindings:
        channel.queue_unbind(queue, exchange, key)
    held = move_messages(channel, queue, holding, _keep_routing_key)
    channel.queue_delete(queue, if_empty=True)
    channel.queue_declare(queue, durable=True, arguments=arguments)
    # A new channel: RabbitMQ 3.10's channel still routes to the deleted queue's type (a classic queue
    # redeclared as a quorum one crashes the channel on the next publish).
    channel = _confirming(connection)
    move_messages(channel, holding, queue, _keep_routing_key)
    for exchange, key in bindings:
        channel.queue_bind(queue, exchange, key)
    for exchange, key in bindings:
        channel.queue_unbind(holding, exchange, key)
    move_messages(channel, holding, queue, _keep_routing_key)
    channel.queue_delete(holding, if_empty=True)
    return held


def _confirming(connection: pika.BlockingConnection) -> pika.adapters.blocking_connection.BlockingChannel:
    channel = connection.channel()
    channel.confirm_delivery()
    return channel


def migrate(config: Config, queue: str, bindings: tuple[str, ...]) -> int:
    """Rebuild ``queue`` and its dead-letter queue with today's arguments and ``config.queue_type``; return how
    many messages the queue held. Needs the admin account."""
    connection = pika.BlockingConnection(connection_parameters(config, "emdc-queue-migrate"))
    try:
        consumers = connection.channel().queue_declare(queue, passive=True).method.consumer_count
        standbys = _consumers(connection, lease_queue(queue))
        if consumers or standbys:
            raise MigrationRefused(f"{queue} has {consumers + standbys} writer(s) consuming or standing by: stop "
                                   "its writers first")
        _topic_dead_letter_exchange(connection, config)
        dlx, dlq = dead_letter_exchange(config.exchange), dead_letter_queue(queue)
        typed = dead_letter_queue_arguments(config.queue_type)
        if not _exists(connection, dlq):  # that writer never dead-lettered here: nothing to rebuild but the binding
            channel = connection.channel()
            channel.queue_declare(dlq, durable=True, arguments=typed)
            channel.queue_bind(dlq, dlx, queue)
        held = _rebuild(connection, queue, queue_arguments(config.exchange, queue, config.queue_type,
                                                           config.delivery_limit),
                        [(config.exchange, key) for key in bindings])
        connection.channel().queue_declare(lease_queue(queue), durable=True)
        _rebuild(connection, dlq, typed, [(dlx, queue)])
        return held
    finally:
        if connection.is_open:
            connection.close()
