"""A standby writer waits for the queue's lease without loading the broker: it asks about once a
``LEASE_RETRY_S``, and takes over as soon as the lease is free (real RabbitMQ)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pika

from backend.amqp_consumer import LEASE_RETRY_S, BatchConsumer
from backend.heartbeat import Heartbeat
from common.config import load_config
from common.topology import WRITER_BINDINGS, lease_queue
from tests.support import Names, amqp_parameters, declare_queue, wait_until


class CountingConsumer(BatchConsumer):
    """Counts the standby's requests for the lease (each is followed by a heartbeat)."""

    asked = 0

    def _beat(self, trouble: str | None = None) -> None:
        if trouble == "":
            self.asked += 1
        super()._beat(trouble)


def test_a_standby_asks_for_the_lease_once_a_retry_interval_and_takes_it_when_free(names: Names,
                                                                                   tmp_path: Path) -> None:
    declare_queue(names)
    holder = pika.BlockingConnection(amqp_parameters())  # the active writer, as the broker sees it
    holder.channel().basic_consume(lease_queue(names.queue), lambda *_: None, exclusive=True)
    config = load_config(env={**names.writer_env(), "EMDC_STATE_DIR": str(tmp_path)})
    consumer = CountingConsumer(config, names.queue, WRITER_BINDINGS, lambda batch: [],
                                heartbeat=Heartbeat(tmp_path / "hb"))
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,))
    started = time.monotonic()
    thread.start()
    try:
        wait_until(lambda: consumer.asked >= 2, 30, "the standby to ask twice")
        holder.process_data_events(time_limit=2 * LEASE_RETRY_S)
        waited = time.monotonic() - started
        # At most one request per interval (and one to start with): never a tight loop of channel openings.
        assert consumer.asked <= waited / LEASE_RETRY_S + 2, f"{consumer.asked} requests in {waited:.1f} s"
        assert not consumer.active.is_set()
        holder.close()
        wait_until(consumer.active.is_set, 30, "the standby to take the free lease")
    finally:
        stop.set()
        thread.join(30)
        if holder.is_open:
            holder.close()
