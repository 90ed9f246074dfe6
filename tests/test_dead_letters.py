"""Held-back pulses are visible and can be re-admitted: `emdc dead-letters list` and `readmit`, real brokers."""

from __future__ import annotations

import time

import pika

from common.message import Pulse, encode
from common.topology import READMITTED_HEADER, dead_letter_queue
from tests.support import (
    AMQP_URL,
    MqttWatcher,
    Names,
    publish,
    queue_depth,
    run_emdc,
    start_writer,
    wait_until,
    writer_env,
)

JUMP = 1_000_000  # a counter jump of a million pulses within a second: held back


def jump_pulses() -> list[Pulse]:
    now = time.time_ns()
    return [Pulse("main", "active", "e1", 1, now - 10**9, 1.0), Pulse("main", "active", "e1", 1 + JUMP, now, 1.0)]


def test_a_held_back_jump_is_listed_with_its_reason_and_counted_once_readmitted(names: Names, watch: MqttWatcher,
                                                                                spawn) -> None:
    writer = start_writer(spawn, names, writer_env(names))
    publish(names.exchange, jump_pulses())
    topic = f"{names.prefix}/active_energy"
    watch.wait_for(topic, lambda v: v == "0.001")
    wait_until(lambda: queue_depth(dead_letter_queue(names.queue)) == 1, 10, "the jump in the dead-letter queue")
    assert "emdc dead-letters list" in writer.log()

    listed = run_emdc(["dead-letters", "list"], writer_env(names)).stdout
    assert f"pulse.main.active: counter: a jump of {JUMP} pulses" in listed
    assert "1 message(s) held back" in listed
    assert queue_depth(dead_letter_queue(names.queue)) == 1, "listing must leave the messages in place"
    shown = run_emdc(["state", "show"], writer_env(names)).stdout
    assert "1 pulse message(s) held back so far, the last: counter: a jump of" in shown

    readmitted = run_emdc(["dead-letters", "readmit"], writer_env(names)).stdout
    assert "re-admitted 1 message(s)" in readmitted
    assert watch.wait_for(topic, lambda v: v == "1000.001") == "1000.001"
    assert queue_depth(dead_letter_queue(names.queue)) == 0
    assert writer.stop() == 0


def test_a_readmitted_header_from_the_pulse_exchange_is_not_believed(names: Names, watch: MqttWatcher,
                                                                     spawn) -> None:
    start_writer(spawn, names, writer_env(names))
    first, jump = jump_pulses()
    publish(names.exchange, [first])
    watch.wait_for(f"{names.prefix}/active_energy", lambda v: v == "0.001")
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as connection:
        connection.channel().basic_publish(names.exchange, jump.routing_key, encode(jump), pika.BasicProperties(
            delivery_mode=2, headers={READMITTED_HEADER: True}))
    wait_until(lambda: queue_depth(dead_letter_queue(names.queue)) == 1, 10, "the forged jump held back")
    assert watch.values[f"{names.prefix}/active_energy"] == "0.001"
