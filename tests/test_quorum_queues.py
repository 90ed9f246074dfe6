"""Quorum writer queues (``queue_type = "quorum"``), replicated over a RabbitMQ cluster: declared, counted,
dead-lettered at the delivery limit, and migrated from a classic queue without losing a message. The real
RabbitMQ (a single node holds quorum queues as well as a cluster does)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pika

from common.topology import WRITER_BINDINGS, consumer_queue_steps, dead_letter_queue, lease_queue
from tests.support import (
    MqttWatcher,
    Names,
    amqp_parameters,
    fresh_pulses,
    publish,
    queue_depth,
    run_emdc,
    saved_total_uwh,
    start_writer,
    wait_until,
    writer_env,
)


def queue_types(*queues: str) -> dict[str, str]:
    """The type RabbitMQ gives each of ``queues`` (classic, quorum)."""
    listed = subprocess.run(["rabbitmqctl", "list_queues", "-q", "--formatter", "json", "name", "type"],
                            capture_output=True, text=True, check=True, timeout=60).stdout
    return {q["name"]: q["type"] for q in json.loads(listed) if q["name"] in queues}


def test_a_quorum_writer_queue_is_declared_counted_and_dead_letters(names: Names, spawn,
                                                                   watch: MqttWatcher) -> None:
    env = writer_env(names, EMDC_QUEUE_TYPE="quorum")
    writer = start_writer(spawn, names, env)
    publish(names.exchange, [*fresh_pulses(1, 5), ("pulse.main.active", b"not a pulse")])
    watch.wait_for(f"{names.prefix}/active_energy", lambda v: v == "0.005")
    wait_until(lambda: queue_depth(dead_letter_queue(names.queue)) == 1, 10, "the bad message to be dead-lettered")
    assert writer.stop() == 0
    assert queue_types(names.queue, dead_letter_queue(names.queue), lease_queue(names.queue)) == {
        names.queue: "quorum", dead_letter_queue(names.queue): "quorum", lease_queue(names.queue): "classic"}
    assert "declared by an older version" not in writer.log()


def test_a_message_delivered_delivery_limit_times_without_an_ack_is_dead_lettered(names: Names) -> None:
    with pika.BlockingConnection(amqp_parameters()) as connection:
        channel = connection.channel()
        for _what, step in consumer_queue_steps(names.exchange, names.queue, WRITER_BINDINGS, "quorum", 2):
            step(channel)
        channel.confirm_delivery()
        channel.basic_publish(names.exchange, "pulse.main.active", b"kills every writer that reads it")
        returned = 0
        # A writer that dies holding the message hands it back unacknowledged; here a reject with requeue.
        for method, _properties, _body in channel.consume(names.queue, inactivity_timeout=2):
            if method is None:
                break
            channel.basic_reject(method.delivery_tag, requeue=True)
            returned += 1
            assert returned <= 10, "the delivery limit did not dead-letter the message"
        channel.cancel()
    assert returned == 3, "delivered once and redelivered up to the limit of 2, then dead-lettered"
    wait_until(lambda: queue_depth(dead_letter_queue(names.queue)) == 1, 10, "the message in the dead-letter queue")


def test_queue_migrate_turns_classic_queues_into_quorum_ones_keeping_every_message(names: Names, spawn,
                                                                                   watch: MqttWatcher) -> None:
    classic = writer_env(names)
    writer = start_writer(spawn, names, classic)  # today's classic queues, with one dead letter
    publish(names.exchange, [("pulse.main.active", b"not a pulse")])
    wait_until(lambda: queue_depth(dead_letter_queue(names.queue)) == 1, 10, "the dead letter")
    assert writer.stop() == 0
    publish(names.exchange, fresh_pulses(1, 20))
    wait_until(lambda: queue_depth(names.queue) == 20, 10, "the backlog to queue")

    quorum = {**classic, "EMDC_QUEUE_TYPE": "quorum"}
    out = run_emdc(["queue", "migrate"], quorum).stdout
    assert f"migrated {names.queue}: quorum queue" in out and "20 message(s) kept" in out
    assert queue_types(names.queue, dead_letter_queue(names.queue)) == {names.queue: "quorum",
                                                                        dead_letter_queue(names.queue): "quorum"}
    writer = start_writer(spawn, names, quorum)
    watch.wait_for(f"{names.prefix}/active_energy", lambda v: v == "0.02")
    assert writer.stop() == 0
    assert "declared by an older version" not in writer.log(), "the writer finds today's arguments"
    assert saved_total_uwh(Path(classic["EMDC_STATE_DIR"])) == 20_000_000
    assert queue_depth(dead_letter_queue(names.queue)) == 1, "the dead letter moved with its queue"
