"""RabbitMQ topology: the names and arguments every component must agree on.

``deploy/compose/rabbitmq/definitions.template.json`` declares the same objects for production;
a test keeps the two in step. Example (a pika ``BlockingChannel``)::

    declare_consumer_queue(channel, "EMDC", "queue_mqtt_writer", WRITER_BINDINGS)
"""

from __future__ import annotations

from typing import Any

PULSE_BINDING = "pulse.#"
CONTROL_BINDING = "control.#"
WRITER_BINDINGS = (PULSE_BINDING, CONTROL_BINDING)
DB_WRITER_BINDINGS = (PULSE_BINDING,)
ERROR_HEADER = "x-emdc-error"


def dead_letter_exchange(exchange: str) -> str:
    """Each consumer queue ``q`` dead-letters to this direct exchange with key ``q``."""
    return f"{exchange}.dead"


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dead"


def queue_arguments(exchange: str, queue: str) -> dict[str, Any]:
    """Arguments of a consumer queue; they must be identical wherever it is declared."""
    return {"x-dead-letter-exchange": dead_letter_exchange(exchange), "x-dead-letter-routing-key": queue}


def declare_exchange(channel: Any, exchange: str) -> None:
    channel.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)


def declare_consumer_queue(channel: Any, exchange: str, queue: str, bindings: tuple[str, ...]) -> None:
    """Declare ``exchange``, ``queue`` with its bindings, and its dead-letter queue."""
    dlx = dead_letter_exchange(exchange)
    declare_exchange(channel, exchange)
    channel.exchange_declare(exchange=dlx, exchange_type="direct", durable=True)
    channel.queue_declare(queue=dead_letter_queue(queue), durable=True)
    channel.queue_bind(queue=dead_letter_queue(queue), exchange=dlx, routing_key=queue)
    channel.queue_declare(queue=queue, durable=True, arguments=queue_arguments(exchange, queue))
    for key in bindings:
        channel.queue_bind(queue=queue, exchange=exchange, routing_key=key)
