"""The MQTT writer: draining a backlog (and the seed's naive design for comparison), and live latency."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pika
from paho.mqtt.enums import CallbackAPIVersion

from backend.amounts import format_kw, format_kwh
from bench.brokers import MQTT_HOST, MQTT_PORT, amqp_parameters, wait_until
from bench.harness import (
    UWH_PER_WH,
    Broker,
    Scratch,
    ServerCpu,
    consume_all,
    fill_queue,
    pulses_in,
    vm_kb,
)
from common.message import CONTENT_TYPE, Pulse, decode, encode
from common.topology import dead_letter_queue

LIVE_RATE_PER_S = 10.0


def measure_writer_drain(work: Path, broker: Broker, count: int, profile_dir: Path | None) -> dict[str, Any]:
    """``emdc writer`` drains ``count`` queued pulses: consumer appears -> exact total on MQTT."""
    with Scratch(work, "writer_drain", profile_dir) as scratch:
        scratch.declare()
        fill_queue(scratch, broker, count)
        with scratch.energy_subscriber(count) as subscriber:
            server = ServerCpu()
            writer = scratch.spawn(["writer"], scratch.writer_env(), "writer", profile=profile_dir is not None)
            wait_until(lambda: not writer.alive() or broker.consumers(scratch.names.queue), 60,
                       "the writer to consume", 0.002)
            started = time.perf_counter()
            if not writer.alive():
                raise RuntimeError(f"the writer exited:\n{writer.log()}")
            server.start()
            cpu_start, rss_start = writer.cpu_s(), vm_kb(writer.pid, "VmRSS")
            finished = subscriber.wait(60 + count / 200)
            cpu = writer.cpu_s() - cpu_start
            server_cpu = server.stop()
            peak_kb = vm_kb(writer.pid, "VmHWM")
            elapsed = finished - started
            wait_until(lambda: broker.depth(scratch.names.queue) == 0, 30, "the queue to be empty", 0.05)
            exact = scratch.saved_total_uwh() == count * UWH_PER_WH
            dead = broker.depth(dead_letter_queue(scratch.names.queue))
            returncode = writer.stop()
    return {"pulses": count, "seconds": round(elapsed, 3), "rate_per_s": round(count / elapsed),
            "batch_size": int(scratch.writer_env().get("EMDC_BATCH_SIZE", 500)), "exact_total": exact,
            "dead_letters": dead, "writer_cpu_s": round(cpu, 3), "writer_cpu_share": round(cpu / elapsed, 2),
            "writer_rss_mb_at_start": round(rss_start / 1024, 1), "writer_peak_rss_mb": round(peak_kb / 1024, 1),
            "server_cpu_s": server_cpu, "exit_code": returncode, "profiled": profile_dir is not None}


class NaiveWriter:
    """The seed's per-message design, kept only as a baseline (not production code).

    Prefetch 1; for every message: decode, update the totals, write the JSON
    state and fsync it, publish the four values at QoS 1 waiting for each
    PUBACK, then acknowledge that one message.
    """

    def __init__(self, state_path: Path, prefix: str) -> None:
        self.state_path = state_path
        self.prefix = prefix
        self.state: dict[str, Any] = {"active_uwh": 0, "reactive_uwh": 0, "active_w": 0.0, "reactive_w": 0.0,
                                      "last_ts_ns": {}}
        self.mqtt = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"emdc-bench-naive-{uuid.uuid4().hex[:8]}")
        self.mqtt.connect(MQTT_HOST, MQTT_PORT)
        self.mqtt.loop_start()

    def handle(self, body: bytes) -> None:
        pulse = decode(body)
        state = self.state
        state[f"{pulse.channel}_uwh"] += round(pulse.wh * UWH_PER_WH)
        last = state["last_ts_ns"].get(pulse.channel)
        if last is not None and pulse.ts_ns > last:
            state[f"{pulse.channel}_w"] = pulse.wh * 3600e9 / (pulse.ts_ns - last)
        state["last_ts_ns"][pulse.channel] = pulse.ts_ns
        tmp = self.state_path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            json.dump(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)
        for channel in ("active", "reactive"):
            for topic, payload in ((f"{self.prefix}/{channel}_energy", format_kwh(state[f"{channel}_uwh"])),
                                   (f"{self.prefix}/{channel}_power", format_kw(state[f"{channel}_w"]))):
                self.mqtt.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)

    def close(self) -> None:
        self.mqtt.loop_stop()
        self.mqtt.disconnect()


def measure_naive(work: Path, broker: Broker, count: int, ceiling_rate: float | None) -> dict[str, Any]:
    with Scratch(work, "naive_baseline") as scratch:
        scratch.declare()
        fill_queue(scratch, broker, count)
        scratch.names.writer_dir.mkdir(parents=True)
        naive = NaiveWriter(scratch.names.writer_dir / "energy_state.json", scratch.names.prefix)
        with scratch.energy_subscriber(count) as subscriber, contextlib.closing(naive):
            with pika.BlockingConnection(amqp_parameters()) as connection:
                channel = connection.channel()
                channel.basic_qos(prefetch_count=1)
                done = 0

                def on_message(ch: Any, method: Any, _props: Any, body: bytes) -> None:
                    nonlocal done
                    naive.handle(body)
                    ch.basic_ack(method.delivery_tag)
                    done += 1

                started = time.perf_counter()
                consume_all(channel, scratch.names.queue, on_message, lambda: done, count, 60 + count / 20,
                            "naive baseline")
                elapsed = time.perf_counter() - started
            subscriber.wait(10)
    rate = count / elapsed
    result: dict[str, Any] = {"pulses": count, "seconds": round(elapsed, 3), "rate_per_s": round(rate, 1)}
    if ceiling_rate:
        result["ratio_to_ceiling"] = round(rate / ceiling_rate, 4)
    return result


def measure_live_latency(work: Path, broker: Broker, count: int) -> dict[str, Any]:
    """A running writer; pulses published with pika at 10/s, ``ts_ns`` taken just before publishing."""
    with Scratch(work, "live_latency") as scratch:
        scratch.declare()
        with scratch.energy_subscriber(count) as subscriber:
            scratch.start_writer(broker)
            epoch = uuid.uuid4().hex[:16]
            sent: dict[int, int] = {}
            props = pika.BasicProperties(delivery_mode=2, content_type=CONTENT_TYPE)
            with pika.BlockingConnection(amqp_parameters()) as connection:
                channel = connection.channel()
                start = time.perf_counter() + 0.2
                for seq in range(1, count + 1):
                    delay = start + (seq - 1) / LIVE_RATE_PER_S - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    ts_ns = time.time_ns()
                    pulse = Pulse("main", "active", epoch, seq, ts_ns, 1.0)
                    channel.basic_publish(scratch.names.exchange, pulse.routing_key, encode(pulse), props)
                    sent[seq] = ts_ns
            subscriber.wait(30)
            latencies = arrival_latencies_ms(subscriber.arrivals(scratch.energy_topic), sent)
    return {"pulses": count, "rate_per_s": LIVE_RATE_PER_S, **latency_summary(latencies)}


def measure_edge_latency(work: Path, broker: Broker, count: int) -> dict[str, Any]:
    """End to end: ``emdc edge simulate --speed 1 --power 36000`` (10 pulses/s) -> broker -> writer -> MQTT.

    The simulator's ts_ns are synthetic but real-time. A tap queue bound to the same pulses, consumed
    here, splits the latency into edge -> broker (from ts_ns, so including any offset of the
    simulator's clock) and broker -> MQTT (both ends timed by this process's clock).
    """
    with Scratch(work, "edge_latency") as scratch:
        scratch.declare()
        tap = TapConsumer(scratch.declare_tap())
        with contextlib.closing(tap), scratch.energy_subscriber(count) as subscriber:
            scratch.start_writer(broker)
            power = LIVE_RATE_PER_S * 3600
            edge = scratch.spawn(["edge", "simulate", "--power", f"{power:g}", "--count", str(count), "--speed", "1"],
                                 scratch.edge_env(), "edge")
            returncode = edge.wait(60 + count / LIVE_RATE_PER_S)
            if returncode != 0:
                raise RuntimeError(f"edge simulate exited {returncode}:\n{edge.log()}")
            subscriber.wait(30)
            arrivals = subscriber.arrivals(scratch.energy_topic)
    sent = {seq: ts_ns for seq, (ts_ns, _) in tap.seen.items()}
    at_broker = {seq: at_ns for seq, (_, at_ns) in tap.seen.items()}
    if len(sent) != count:
        raise RuntimeError(f"the tap queue saw {len(sent)} distinct pulses, expected {count}")
    total = arrival_latencies_ms(arrivals, sent)
    backend = arrival_latencies_ms(arrivals, at_broker)
    edge_part = [(at_broker[seq] - sent[seq]) / 1e6 for seq in sorted(sent)]
    return {"pulses": count, "rate_per_s": LIVE_RATE_PER_S, **latency_summary(total),
            "edge_to_broker": latency_summary(edge_part), "broker_to_mqtt": latency_summary(backend)}


class TapConsumer:
    """Consumes a queue in a thread of its own, remembering each pulse's ts_ns and arrival time."""

    def __init__(self, queue: str) -> None:
        self.seen: dict[int, tuple[int, int]] = {}  # seq -> (ts_ns, time_ns at delivery)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(queue,), name="bench-tap", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError(f"could not consume {queue}")

    def _run(self, queue: str) -> None:
        with pika.BlockingConnection(amqp_parameters()) as connection:
            channel = connection.channel()

            def on_message(_ch: Any, _method: Any, _props: Any, body: bytes) -> None:
                at_ns = time.time_ns()
                pulse = decode(body)
                self.seen.setdefault(pulse.seq, (pulse.ts_ns, at_ns))

            channel.basic_consume(queue, on_message, auto_ack=True)
            self._ready.set()
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil without floats
    return ordered[int(rank) - 1]


def arrival_latencies_ms(arrivals: list[tuple[int, str]], sent_ns: dict[int, int]) -> list[float]:
    """Latency of each pulse: first arrival of an energy value that counts it, minus its ts_ns."""
    arrived: dict[int, int] = {}
    counted = 0
    for at_ns, payload in arrivals:
        now_counted = pulses_in(payload)
        for seq in range(counted + 1, now_counted + 1):
            arrived[seq] = at_ns
        counted = max(counted, now_counted)
    missing = sorted(set(sent_ns) - set(arrived))
    if missing:
        raise RuntimeError(f"{len(missing)} pulses never showed on MQTT (first: seq {missing[0]})")
    return [(arrived[seq] - ts) / 1e6 for seq, ts in sorted(sent_ns.items())]


def latency_summary(latencies: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(latencies), 2), "p99_ms": round(percentile(latencies, 99), 2),
            "max_ms": round(max(latencies), 2), "min_ms": round(min(latencies), 2)}
