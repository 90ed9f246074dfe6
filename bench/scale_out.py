"""Beyond one writer: how long a standby takes over, and what a second partition adds to the drain rate.

Failover: an active and a standby ``emdc writer`` on one state shared in
MariaDB (``state_url``) and the shared RabbitMQ; the active one is killed
with SIGKILL and one pulse published at once; the time until its total is on
MQTT, counted by the standby, is the failover time. The writers then swap
roles (the killed one restarts as the standby) for the next round.

Partitions: the same backlog of pulses of two meters, drained by one writer
(one queue) and by two partitions with a writer each (``partitions = 2``);
reported as pulses per second and the ratio of the two. The meters are
``main`` and ``garage``, which the partition function puts in partitions 0
and 1.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import pika

from bench.brokers import amqp_parameters, mariadb_databases, publish, wait_until
from bench.harness import Broker, EmdcProcess, Scratch, Subscriber, energy_payload
from common.config import load_config
from common.message import Pulse
from common.topology import (
    WRITER_BINDINGS,
    dead_letter_queue,
    declare_consumer_queue,
    lease_queue,
    meter_bindings,
    partition_of,
    partition_queue,
)

METERS = ("main", "garage")


def feed(meter: str, first: int, count: int, end_ns: int, step_ns: int = 10**9) -> list[Pulse]:
    """1 Wh pulses ``first`` .. of ``meter``, ``step_ns`` apart, the last at ``end_ns``."""
    last = first + count - 1
    return [Pulse(meter, "active", "be7c4", seq, end_ns - (last - seq) * step_ns, 1.0)
            for seq in range(first, last + 1)]


def measure_failover(work: Path, broker: Broker, rounds: int) -> dict[str, Any]:
    """Seconds from SIGKILL of the active writer to the standby's first counted pulse on MQTT, per round."""
    with Scratch(work, "failover") as scratch, mariadb_databases(1) as [state_url]:
        scratch.declare()
        envs = [scratch.writer_env(EMDC_STATE_URL=state_url, EMDC_STATE_DIR=scratch.dir / f"state-{w}") for w in "ab"]
        writers: list[EmdcProcess] = [scratch.start_writer(broker, **envs[0])]
        subscriber = Subscriber(scratch.energy_topic)
        seconds, counted = [], 0
        try:
            for turn in range(rounds):
                standby_env = envs[(turn + 1) % 2]
                standby = scratch.spawn(["writer"], standby_env, f"writer-{turn}")
                wait_until(lambda s=standby: "standby" in s.log() or not s.alive(), 60, "the standby", 0.01)
                counted += 10
                # 100 ms apart (36 kW), all after the previous round's pulses.
                publish(scratch.names.exchange, feed("main", counted - 9, 10, time.time_ns(), 10**8))
                subscriber.expect(scratch.energy_topic, energy_payload(counted))
                subscriber.wait(60)
                writers[-1].kill()
                killed = time.perf_counter()
                counted += 1
                publish(scratch.names.exchange, feed("main", counted, 1, time.time_ns()))
                subscriber.expect(scratch.energy_topic, energy_payload(counted))
                seconds.append(subscriber.wait(60) - killed)
                writers.append(standby)
            exact = subscriber.latest(scratch.energy_topic) == energy_payload(counted)
        finally:
            subscriber.close()
            for process in writers:
                process.kill()
    return {"rounds": rounds, "seconds": [round(s, 2) for s in seconds],
            "median_s": round(statistics.median(seconds), 2), "max_s": round(max(seconds), 2), "exact_total": exact}


def declare_partitions(scratch: Scratch, partitions: int) -> list[str]:
    """Declare the queues of ``partitions`` (bound to their meters' pulses) before the backlog; their names."""
    queues = []
    with pika.BlockingConnection(amqp_parameters()) as connection:
        for k in range(partitions):
            queue = partition_queue(scratch.names.queue, k, partitions)
            meters = [m for m in METERS if partition_of(m, partitions) == k]
            bindings = WRITER_BINDINGS if partitions == 1 else meter_bindings(WRITER_BINDINGS, meters)
            declare_consumer_queue(connection.channel(), scratch.names.exchange, queue, bindings)
            queues.append(queue)
    if partitions > 1:
        scratch.extra_queues += [name for q in queues for name in (q, dead_letter_queue(q), lease_queue(q))]
    return queues


def drain(work: Path, broker: Broker, count: int, partitions: int) -> dict[str, Any]:
    """``count`` queued pulses, half of each meter, drained by one writer per partition."""
    with Scratch(work, f"drain-{partitions}") as scratch:
        queues = declare_partitions(scratch, partitions)
        each = count // len(METERS)
        end_ns = time.time_ns()
        publish(scratch.names.exchange, [p for meter in METERS for p in feed(meter, 1, each, end_ns)])
        wait_until(lambda: sum(broker.depth(q) for q in queues) == each * len(METERS), 60 + count / 1000,
                   "the backlog queued", 0.05)
        subscriber = Subscriber(f"{scratch.names.prefix}/#")
        try:
            common = {"EMDC_METERS": ",".join(METERS), "EMDC_PARTITIONS": partitions}
            writers = [scratch.spawn(["writer"], scratch.writer_env(**common, EMDC_PARTITION=k,
                                                                    EMDC_STATE_DIR=scratch.dir / f"state-{k}"),
                                     f"writer-{k}") for k in range(partitions)]
            wait_until(lambda: all(broker.consumers(q) for q in queues) or not all(w.alive() for w in writers),
                       60, "the writers to consume", 0.002)
            started = time.perf_counter()
            finished = 0.0
            for meter in METERS:
                topic = scratch.energy_topic if meter == "main" else f"{scratch.names.prefix}/{meter}/active_energy"
                subscriber.expect(topic, energy_payload(each))
                finished = max(finished, subscriber.wait(60 + count / 200))
        finally:
            subscriber.close()
        elapsed = finished - started
        for writer in writers:
            writer.stop()
    return {"partitions": partitions, "pulses": each * len(METERS), "seconds": round(elapsed, 3),
            "rate_per_s": round(each * len(METERS) / elapsed)}


def measure_partitions(work: Path, broker: Broker, count: int) -> dict[str, Any]:
    """The drain rate of one writer against two partitions with a writer each, on the same backlog."""
    assert {partition_of(m, 2) for m in METERS} == {0, 1}, "one meter per partition"
    assert load_config(env={"EMDC_METERS": ",".join(METERS), "EMDC_PARTITIONS": "2"}).counted_meters() == ("main",)
    one, two = drain(work, broker, count, 1), drain(work, broker, count, 2)
    return {"one": one, "two": two, "ratio": round(two["rate_per_s"] / one["rate_per_s"], 2)}
