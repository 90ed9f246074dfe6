"""The ceiling: what this broker can do for this load, with pika alone and no processing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pika

from bench.brokers import amqp_parameters
from bench.harness import Broker, Scratch, ServerCpu, consume_all, fill_queue


def measure_ceiling(work: Path, broker: Broker, count: int) -> dict[str, Any]:
    """pika alone: consume and ack ``count`` queued persistent pulses, prefetch 1000, ack every 200."""
    with Scratch(work, "ceiling") as scratch:
        scratch.declare()
        fill_queue(scratch, broker, count)
        queue = scratch.names.queue
        server = ServerCpu()
        with pika.BlockingConnection(amqp_parameters()) as connection:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=1000)
            received = 0

            def on_message(ch: Any, method: Any, _props: Any, _body: bytes) -> None:
                nonlocal received
                received += 1
                if received % 200 == 0 or received == count:
                    ch.basic_ack(method.delivery_tag, multiple=True)

            server.start()
            started, cpu_start = time.perf_counter(), time.process_time()
            consume_all(channel, queue, on_message, lambda: received, count, 60 + count / 500, "ceiling")
            elapsed = time.perf_counter() - started
            consumer_cpu = time.process_time() - cpu_start
            server_cpu = server.stop()
        left = broker.depth(queue)
    return {"messages": count, "seconds": round(elapsed, 3), "rate_per_s": round(count / elapsed),
            "prefetch": 1000, "ack_every": 200, "left_in_queue": left, "consumer_cpu_s": round(consumer_cpu, 3),
            "consumer_cpu_share": round(consumer_cpu / elapsed, 2), "server_cpu_s": server_cpu}
