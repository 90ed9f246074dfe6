"""The edge's AmqpPublisher against the real RabbitMQ: confirmed rows leave the outbox."""

from __future__ import annotations

import time

import pika
from gpiozero.pins.mock import MockFactory

from common.config import load_config
from common.message import decode
from common.topology import DB_WRITER_BINDINGS
from edge.outbox import FILENAME, Outbox, OutboxReader
from edge.service import EdgeService
from tests.support import AMQP_URL, Names, declare_queue, queue_depth, wait_until

# A queue of pulses alone, as the database writer's: the edge's statuses would add to the depths counted here.
PULSES = DB_WRITER_BINDINGS


def test_a_stop_right_after_delivery_leaves_no_confirmed_row_behind(names: Names, factory: MockFactory) -> None:
    declare_queue(names, PULSES)
    config = load_config(env=names.env(EMDC_STATE_DIR=names.edge_dir))
    service = EdgeService(config, pin_factory=factory)
    service.start()
    pin = factory.pin(config.active_pin)
    for _ in range(5):  # 5 ms pulses 30 ms apart: real ones for the filter
        pin.drive_low()
        time.sleep(0.005)
        pin.drive_high()
        time.sleep(0.025)
    wait_until(lambda: queue_depth(names.queue) == 5, 10, "five pulses at the broker")
    service.stop()  # at once: deletes are batched once a second, the stop must flush them
    reader = OutboxReader(names.edge_dir / FILENAME)
    assert reader.depth() == 0
    assert reader.counters() == {("main", "active"): 5}
    reader.close()
    assert queue_depth(names.queue) == 5  # each pulse delivered once


def test_a_backlog_many_windows_long_arrives_complete_and_in_order(names: Names, factory: MockFactory) -> None:
    declare_queue(names, PULSES)
    config = load_config(env=names.env(EMDC_STATE_DIR=names.edge_dir, EMDC_PUBLISH_WINDOW="4"))
    backlog = Outbox(names.edge_dir / FILENAME, config.meter_id, config.outbox_max)
    backlog.record([("active", time.time_ns() - (25 - i) * 10**9, 1.0) for i in range(25)])  # as after an outage
    backlog.close()
    service = EdgeService(config, pin_factory=factory)
    started = time.monotonic()
    service.start()
    wait_until(lambda: queue_depth(names.queue) == 25, 15, "the backlog at the broker")
    # Each confirm refills the window; waiting for the 1 s safety-net tick instead would take 6 s.
    assert time.monotonic() - started < 3.0
    service.stop()
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as connection:
        channel = connection.channel()
        got = [channel.basic_get(names.queue, auto_ack=True) for _ in range(25)]
    assert [decode(body).seq for _, _, body in got] == list(range(1, 26))
    # Each pulse names its account, which the broker checked against the connection's.
    assert {props.user_id for _, props, _ in got} == {pika.URLParameters(AMQP_URL).credentials.username}


def test_unroutable_pulses_stay_in_the_outbox_until_a_queue_is_bound(names: Names, factory: MockFactory) -> None:
    config = load_config(env=names.env(EMDC_STATE_DIR=names.edge_dir))  # the edge declares the exchange only
    backlog = Outbox(names.edge_dir / FILENAME, config.meter_id, config.outbox_max)
    backlog.record([("active", time.time_ns() - (3 - i) * 10**9, 1.0) for i in range(3)])
    backlog.close()
    service = EdgeService(config, pin_factory=factory)
    service.start()
    reader = OutboxReader(names.edge_dir / FILENAME)
    try:
        wait_until(lambda: reader.status().get("link_state", "").startswith("unroutable"), 10,
                   "the broker to return the pulses")
        assert reader.depth() == 3
        declare_queue(names, PULSES)  # the next resend (backoff 0.5, 1, 2 ... s) is routed
        wait_until(lambda: reader.depth() == 0, 15, "the outbox to empty")
        assert reader.status()["link_state"].startswith("publishing")
    finally:
        service.stop()
        reader.close()
    assert queue_depth(names.queue) == 3  # each pulse delivered once: returned ones were never queued


def test_pulses_the_broker_refuses_are_sent_again_until_taken(names: Names, factory: MockFactory) -> None:
    # A full queue that refuses new messages (as a quorum queue's backlog cap does) nacks them.
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as connection:
        channel = connection.channel()
        channel.exchange_declare(names.exchange, "topic", durable=True)
        channel.queue_declare(names.queue, durable=True, arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
        channel.queue_bind(names.queue, names.exchange, "pulse.#")
    config = load_config(env=names.env(EMDC_STATE_DIR=names.edge_dir))
    backlog = Outbox(names.edge_dir / FILENAME, config.meter_id, config.outbox_max)
    backlog.record([("active", time.time_ns() - (6 - i) * 10**9, 1.0) for i in range(6)])
    backlog.close()
    service = EdgeService(config, pin_factory=factory)
    service.start()
    reader = OutboxReader(names.edge_dir / FILENAME)
    seqs: list[int] = []
    try:
        wait_until(lambda: "refused" in reader.status().get("link_state", ""), 10, "the broker to refuse pulses")
        with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as connection:
            channel = connection.channel()

            def take() -> bool:
                while (got := channel.basic_get(names.queue, auto_ack=True))[0] is not None:
                    seqs.append(decode(got[2]).seq)
                return reader.depth() == 0 and len(seqs) >= 6
            wait_until(take, 30, "every refused pulse to be sent again and taken")
        assert reader.status()["link_state"].startswith("publishing")
    finally:
        service.stop()
        reader.close()
    assert seqs == [1, 2, 3, 4, 5, 6], "each pulse once, in order"
