"""The contract between a transport and a batch handler (the MQTT writer, the db-writer).

A transport (RabbitMQ's :class:`~backend.amqp_consumer.BatchConsumer`, or the
in-process queue of ``emdc simulate``) hands a handler a sequence of
:class:`Delivery` and gets back the :class:`DeadLetter` list. It acknowledges
the batch only after the handler returned: a handler that raises leaves the
batch unacknowledged, so it is delivered again. Example::

    >>> def count_all(batch: Sequence[Delivery]) -> list[DeadLetter]:
    ...     return [DeadLetter(d, "empty body") for d in batch if not d.body]
    >>> handler: BatchHandler = count_all
    >>> [dead.delivery.tag for dead in handler([Delivery(1, "pulse.main.active", b""),
    ...                                          Delivery(2, "pulse.main.active", b"{}")])]
    [1]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from backend.trust import sender_doubt
from common.message import MessageError, Pulse, decode_routed


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message as the transport received it: its delivery tag, routing key and raw body.

    ``readmitted`` marks a dead letter a person sent back after inspection: the
    handler counts it without the counter-jump guard that held it back.
    ``user_id`` is the account that published it, which RabbitMQ checks.
    """

    tag: int
    routing_key: str
    body: bytes
    readmitted: bool = False
    # The publishing account, as the broker vouches for it ("" if the message does not say).
    user_id: str = ""


def decode_pulse(delivery: Delivery) -> Pulse:
    """The pulse a delivery carries, if its body, its routing key and its sender agree; else MessageError."""
    pulse = decode_routed(delivery.body, delivery.routing_key)
    doubt = sender_doubt(delivery.user_id, pulse.meter)
    if doubt:
        raise MessageError(doubt)
    return pulse


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A delivery the handler refuses, and why: the transport parks it with the reason for a person to inspect."""

    delivery: Delivery
    reason: str


BatchHandler = Callable[[Sequence[Delivery]], list[DeadLetter]]


def report_held_back(dead: Sequence[DeadLetter], log: logging.Logger) -> None:
    """One log line per batch for what it held back, saying why and where to look (a flood stays one line)."""
    if not dead:
        return
    first = dead[0]
    if len(dead) == 1:
        log.warning("held back message %d (%s) in the dead-letter queue: %s; inspect it with "
                    "`emdc dead-letters list`", first.delivery.tag, first.delivery.routing_key, first.reason)
        return
    reasons = len({d.reason.split(":")[0] for d in dead})
    log.warning("held back %d messages of a batch in the dead-letter queue (%d kind(s) of reason), the first, "
                "%d (%s): %s; inspect them with `emdc dead-letters list`", len(dead), reasons, first.delivery.tag,
                first.delivery.routing_key, first.reason)
