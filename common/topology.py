"""RabbitMQ topology: the names and arguments every component must agree on.

``deploy/compose/rabbitmq/definitions.template.json`` declares the same objects for production;
a test keeps the two in step. Example (a pika ``BlockingChannel``)::

    declare_consumer_queue(channel, "EMDC", "queue_mqtt_writer", WRITER_BINDINGS)
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import Any

PULSE_PREFIX = "pulse"
CONTROL_PREFIX = "control"
# An edge's status (``status.<meter>``): only the MQTT writer reads it, to tell a silent edge from a quiet meter.
STATUS_PREFIX = "status"
PULSE_BINDING = f"{PULSE_PREFIX}.#"
CONTROL_BINDING = f"{CONTROL_PREFIX}.#"
STATUS_BINDING = f"{STATUS_PREFIX}.*"
WRITER_BINDINGS = (PULSE_BINDING, CONTROL_BINDING)
# Statuses wait in a queue of their own beside the writer's (:func:`status_queue`), so that a status is read
# at once even behind a backlog of pulses: it then shows that backlog as pending.
STATUS_BINDINGS = (STATUS_BINDING,)
DB_WRITER_BINDINGS = (PULSE_BINDING,)
# Only the newest statuses matter: the status queue keeps a few minutes' worth, bounded in count and bytes.
STATUS_QUEUE_ARGUMENTS = {"x-message-ttl": 300_000, "x-max-length": 100_000, "x-max-length-bytes": 16 * 2**20,
                          "x-overflow": "drop-head"}
# Headers of a dead letter: why it was refused, and the routing key it came with.
ERROR_HEADER = "x-emdc-error"
ROUTING_KEY_HEADER = "x-emdc-routing-key"
# Set on a dead letter a person re-admitted after inspection (``emdc dead-letters readmit``). Honoured
# only on messages that reach the queue through the default exchange, which no edge account may write.
READMITTED_HEADER = "x-emdc-readmitted"


# Writer queues are classic (one node) or quorum (replicated over a cluster, see the scaling guide).
QUEUE_TYPES = ("classic", "quorum")
DEFAULT_DELIVERY_LIMIT = 20


# The deployment names each Pi's RabbitMQ account after its meter (``render_secrets.py add-edge``).
EDGE_USER_PREFIX = "emdc-edge-"


def edge_user(meter: str) -> str:
    """The RabbitMQ account of the Pi that reads ``meter``.

    >>> edge_user("garage")
    'emdc-edge-garage'
    """
    return f"{EDGE_USER_PREFIX}{meter}"


def pulse_routing_key(meter: str, channel: str) -> str:
    """The routing key a pulse is published under.

    >>> pulse_routing_key("main", "active")
    'pulse.main.active'
    """
    return f"{PULSE_PREFIX}.{meter}.{channel}"


def control_routing_key(meter: str) -> str:
    """The routing key of a control message (calibration) for ``meter``: it queues with the pulses."""
    return f"{CONTROL_PREFIX}.{meter}"


def status_routing_key(meter: str) -> str:
    """The routing key of an edge's status message.

    >>> status_routing_key("garage"), is_status(status_routing_key("garage")), is_status("pulse.garage.active")
    ('status.garage', True, False)
    """
    return f"{STATUS_PREFIX}.{meter}"


def is_status(routing_key: str) -> bool:
    """True for the routing key of an edge's status message."""
    return routing_key.startswith(f"{STATUS_PREFIX}.")


def is_control(routing_key: str) -> bool:
    """True for a control message's routing key, false for a pulse's.

    >>> is_control(control_routing_key("main")), is_control(pulse_routing_key("main", "active"))
    (True, False)
    """
    return routing_key.startswith(f"{CONTROL_PREFIX}.")


def dead_letter_exchange(exchange: str) -> str:
    """Each consumer queue ``q`` dead-letters to this direct exchange with key ``q``."""
    return f"{exchange}.dead"


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dead"


def status_queue(queue: str) -> str:
    """The queue of the edges' statuses for the writer of ``queue``: classic whatever the writer queue is (a
    status lost with a node is replaced by the next), read only by the writer holding the lease.

    >>> status_queue("queue_mqtt_writer"), status_queue("queue_mqtt_writer.1")
    ('queue_mqtt_writer.status', 'queue_mqtt_writer.1.status')
    """
    return f"{queue}.status"


def lease_queue(queue: str) -> str:
    """The queue whose exclusive consumer is the one writer allowed to consume ``queue``.

    It is never bound and holds no messages: holding it is the lease. A writer
    that cannot take it is a standby, and knows it (single active consumer
    alone keeps the standby's consumer silent without telling it).

    >>> lease_queue("queue_mqtt_writer")
    'queue_mqtt_writer.active'
    """
    return f"{queue}.active"


def queue_arguments(exchange: str, queue: str, queue_type: str = "classic",
                    delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> dict[str, Any]:
    """Arguments of a consumer queue; they must be identical wherever it is declared.

    Single active consumer: whatever else connects to the queue, the broker
    delivers to one consumer only, so no two writers ever count side by side.
    A quorum queue also dead-letters a message delivered ``delivery_limit``
    times without an ack (a message that kills every writer that reads it),
    *at least once*: the dead letter is confirmed before the message goes,
    which RabbitMQ allows only when a full queue refuses new messages (the
    edge keeps them and retries) rather than dropping its oldest.

    >>> arguments = queue_arguments("EMDC", "q", "quorum", 5)
    >>> arguments["x-queue-type"], arguments["x-delivery-limit"], arguments["x-overflow"]
    ('quorum', 5, 'reject-publish')
    """
    arguments: dict[str, Any] = {"x-dead-letter-exchange": dead_letter_exchange(exchange),
                                 "x-dead-letter-routing-key": queue, "x-single-active-consumer": True}
    if queue_type == "quorum":
        arguments |= {"x-queue-type": "quorum", "x-delivery-limit": delivery_limit,
                      "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    return arguments


def dead_letter_queue_arguments(queue_type: str = "classic") -> dict[str, Any]:
    """Arguments of a dead-letter queue: replicated like its writer queue.

    >>> dead_letter_queue_arguments("quorum"), dead_letter_queue_arguments()
    ({'x-queue-type': 'quorum'}, {})
    """
    return {"x-queue-type": "quorum"} if queue_type == "quorum" else {}


def partition_of(meter: str, partitions: int) -> int:
    """The partition that counts ``meter`` among ``partitions``: CRC-32 of its id, modulo their number.

    A pure function of the id, the same in every process and version (unlike
    Python's ``hash``), so every writer of a deployment agrees on it without
    asking anyone, and the Pis need not know partitions exist.

    >>> partition_of("garage", 1), partition_of("garage", 2), partition_of("main", 2)
    (0, 1, 0)
    """
    return zlib.crc32(meter.encode()) % partitions


def partition_queue(queue: str, partition: int, partitions: int) -> str:
    """The queue of ``partition``: ``queue`` itself without partitions, else ``<queue>.<partition>`` (with its
    own lease ``<queue>.<partition>.active`` and dead-letter queue ``<queue>.<partition>.dead``).

    >>> partition_queue("queue_mqtt_writer", 0, 1), partition_queue("queue_mqtt_writer", 1, 2)
    ('queue_mqtt_writer', 'queue_mqtt_writer.1')
    """
    return queue if partitions == 1 else f"{queue}.{partition}"


def meter_bindings(bindings: Iterable[str], meters: Iterable[str]) -> tuple[str, ...]:
    """``bindings`` narrowed to ``meters``: each ``<kind>.#`` becomes ``<kind>.<meter>.#`` for every meter, so a
    partition's queue receives the pulses and control messages of its meters only (``#`` also matches none,
    so ``control.<meter>.#`` takes ``control.<meter>``).

    >>> meter_bindings(("pulse.#", "control.#"), ("a", "b"))
    ('pulse.a.#', 'pulse.b.#', 'control.a.#', 'control.b.#')
    """
    meters = tuple(meters)
    return tuple(f"{binding.split('.', 1)[0]}.{meter}.#" for binding in bindings for meter in meters)


def declare_exchange(channel: Any, exchange: str, **kwargs: Any) -> None:
    """Declare the pulse exchange; ``kwargs`` go to ``exchange_declare`` (e.g. ``callback=`` on an async channel)."""
    channel.exchange_declare(exchange=exchange, exchange_type="topic", durable=True, **kwargs)


def consumer_queue_steps(exchange: str, queue: str, bindings: tuple[str, ...], queue_type: str = "classic",
                         delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> list[tuple[str, Callable[[Any], None]]]:
    """The declarations behind a consumer queue, in order, each with what it declares: each is idempotent,
    so a consumer can run them one by one and explain a step that clashes with what an older version declared.

    The lease queue stays classic whatever ``queue_type`` is: RabbitMQ ignores
    an exclusive consumer on a quorum queue."""
    dlx, dlq, lease = dead_letter_exchange(exchange), dead_letter_queue(queue), lease_queue(queue)
    arguments = queue_arguments(exchange, queue, queue_type, delivery_limit)
    # Topic, not direct: RabbitMQ checks topic permissions only on topic exchanges, and they keep each writer
    # to its own dead-letter queue.
    return [
        (f"exchange {exchange}", lambda ch: declare_exchange(ch, exchange)),
        (f"exchange {dlx}", lambda ch: ch.exchange_declare(exchange=dlx, exchange_type="topic", durable=True)),
        (f"queue {dlq}", lambda ch: ch.queue_declare(queue=dlq, durable=True,
                                                     arguments=dead_letter_queue_arguments(queue_type))),
        (f"binding of {dlq}", lambda ch: ch.queue_bind(queue=dlq, exchange=dlx, routing_key=queue)),
        (f"queue {lease}", lambda ch: ch.queue_declare(queue=lease, durable=True)),
        (f"queue {queue}", lambda ch: ch.queue_declare(queue=queue, durable=True, arguments=arguments)),
        *((f"binding {key} of {queue}", lambda ch, key=key: ch.queue_bind(queue=queue, exchange=exchange,
                                                                           routing_key=key))
          for key in bindings),
    ]


def status_queue_steps(exchange: str, queue: str, bindings: tuple[str, ...]) -> list[tuple[str, Callable[[Any], None]]]:
    """The declarations of the status queue of ``queue``'s writer, bound with ``bindings``; and the unbinding
    of those from ``queue`` itself, where earlier versions queued statuses with the pulses."""
    statuses = status_queue(queue)
    return [
        (f"queue {statuses}", lambda ch: ch.queue_declare(queue=statuses, durable=True,
                                                          arguments=STATUS_QUEUE_ARGUMENTS)),
        *((f"binding {key} of {statuses}", lambda ch, key=key: ch.queue_bind(queue=statuses, exchange=exchange,
                                                                              routing_key=key))
          for key in bindings),
        *((f"no binding {key} of {queue}", lambda ch, key=key: ch.queue_unbind(queue=queue, exchange=exchange,
                                                                                routing_key=key))
          for key in bindings),
    ]


def declare_consumer_queue(channel: Any, exchange: str, queue: str, bindings: tuple[str, ...]) -> None:
    """Declare ``exchange``, ``queue`` with its bindings, its dead-letter queue and its lease queue."""
    for _what, step in consumer_queue_steps(exchange, queue, bindings):
        step(channel)
