"""Inspect and re-admit what a writer held back: ``emdc dead-letters list`` and ``readmit``.

A writer never drops a message it refuses: it parks it in ``<queue>.dead``
with the reason in a header. After inspection, a person can send such
messages back to the writer's queue, marked as re-admitted; the writer then
counts them without the counter-jump guard (duplicates still count nothing,
and a malformed message is refused again). Re-admission publishes through the
default exchange, so it needs an account allowed to write there (the admin
account of the deployment), never an edge account.

Example::

    for letter in peek(config, "queue_mqtt_writer", limit=20):
        print(letter.routing_key, letter.reason)
    readmit(config, "queue_mqtt_writer", limit=None)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions

from common.amqp import connection_parameters
from common.config import Config
from common.topology import ERROR_HEADER, READMITTED_HEADER, ROUTING_KEY_HEADER, dead_letter_queue

BODY_SHOWN = 300
NOT_FOUND = 404


@dataclass(frozen=True, slots=True)
class HeldBack:
    """One message in a dead-letter queue: the routing key it came with, why it was refused, its body."""

    routing_key: str
    reason: str
    body: bytes

    def describe(self) -> str:
        text = self.body[:BODY_SHOWN].decode("utf-8", "replace")
        more = f" ... ({len(self.body)} bytes)" if len(self.body) > BODY_SHOWN else ""
        return f"{self.routing_key}: {self.reason}\n    {text}{more}"


def _held_back(properties: pika.BasicProperties, body: bytes) -> HeldBack:
    headers = properties.headers or {}
    return HeldBack(str(headers.get(ROUTING_KEY_HEADER, "?")), str(headers.get(ERROR_HEADER, "no reason recorded")),
                    body)


def peek(config: Config, queue: str, limit: int) -> tuple[list[HeldBack], int]:
    """Up to ``limit`` held-back messages of ``queue`` (left in place) and how many there are in all."""
    connection = pika.BlockingConnection(connection_parameters(config, "emdc-dead-letters"))
    try:
        channel = connection.channel()
        try:
            total = channel.queue_declare(dead_letter_queue(queue), passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == NOT_FOUND:  # the writer never declared it: nothing was ever held back
                return [], 0
            raise
        letters = []
        for _ in range(min(limit, total)):
            method, properties, body = channel.basic_get(dead_letter_queue(queue), auto_ack=False)
            if method is None:
                break
            letters.append(_held_back(properties, body))
        # Closing the channel without acknowledging puts every message back, in order.
        channel.close()
        return letters, total
    finally:
        connection.close()


def move_messages(channel: pika.adapters.blocking_connection.BlockingChannel, source: str, target: str,
                  headers: Callable[[pika.spec.Basic.GetOk, pika.BasicProperties], dict[str, Any]],
                  limit: int | None = None) -> int:
    """Move up to ``limit`` (None: all) messages from ``source`` to ``target`` through the default exchange.

    ``channel`` must be in confirm mode. Each message is published (with the
    ``headers`` given for it) and confirmed before it is acknowledged, so an
    interruption can repeat a message (harmless: counting is by counter),
    never lose one.
    """
    moved = 0
    while limit is None or moved < limit:
        method, properties, body = channel.basic_get(source, auto_ack=False)
        if method is None:
            break
        channel.basic_publish("", target, body, pika.BasicProperties(
            delivery_mode=2, content_type=properties.content_type, headers=headers(method, properties)),
            mandatory=True)
        channel.basic_ack(method.delivery_tag)
        moved += 1
    return moved


def readmit(config: Config, queue: str, limit: int | None) -> int:
    """Send up to ``limit`` (None: all) held-back messages of ``queue`` back to it; return how many."""
    connection = pika.BlockingConnection(connection_parameters(config, "emdc-dead-letters"))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        return move_messages(channel, dead_letter_queue(queue), queue,
                             lambda _method, props: {**(props.headers or {}), READMITTED_HEADER: True}, limit)
    finally:
        connection.close()
