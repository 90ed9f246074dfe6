"""Benchmark EMDC against the real brokers: ``make bench`` or ``python -m bench [options]``.

Everything below is measured in one run, each measurement on its own exchange,
queue, topic prefix and state directories, all removed afterwards:

ceiling         pika consuming and acknowledging N small persistent messages (prefetch 1000, one
                ``multiple=True`` ack every 200), no processing: what this broker can do for this load.
writer_drain    ``emdc writer`` (default settings: fsync'd state before every ack) draining a backlog
                of the same N pulses, from its consumer appearing until an MQTT subscriber receives
                the exact final total; also as a ratio to the ceiling.
naive_baseline  the seed's per-message design, re-implemented here: prefetch 1; per message update the
                JSON state with fsync, publish the four values at QoS 1 waiting for each PUBACK, ack.
live_latency    pulses at 10/s in real time into a running writer; latency from the pulse's ``ts_ns``
                to the arrival of its energy value at an MQTT subscriber (p50, p99, max), published
                directly with pika and, end to end, by ``emdc edge simulate --speed 1``.
edge            outbox replay rate (a pre-filled outbox drained with confirms), ``emdc edge simulate
                --speed max`` rate, and peak RSS and CPU time per 1,000 pulses at 30 pulses/s, projected
                to a Raspberry Pi Zero, for ``emdc edge simulate --speed 1`` and for the production chain
                alone (``--edge-harness``: EdgeService as ``emdc edge run`` builds it, on a mock pin fed
                the way lgpio feeds it), the latter also at a household rate of 3 pulses/s.
million         (``--million`` only) edge -> broker -> writer on 1,000,000 pulses, sampling both
                processes' RSS and state-file sizes: memory and state must stay flat.

The results print as a table and go to ``bench-results.json`` (git-ignored). Timings are
informative: targets are marked PASS/MISS but nothing here fails on them. ``--size small``
runs everything in under a minute; tests/test_bench.py runs it smaller still in CI. Method,
figures and the Pi Zero assumption: docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pika
import pika.exceptions
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from backend.amounts import format_kw, format_kwh
from common.message import CONTENT_TYPE, Pulse, decode, encode
from common.topology import WRITER_BINDINGS, dead_letter_exchange, dead_letter_queue, declare_consumer_queue
from edge.outbox import FILENAME as OUTBOX_FILENAME
from edge.outbox import Outbox
from edge.simulator import S0_PULSE_WIDTH_S
from tests.conftest import AMQP_URL, MQTT_HOST, MQTT_PORT, ROOT, Names, clear_retained, port_open

UWH_PER_WH = 1_000_000
RESULTS = ROOT / "bench-results.json"
WORK_PARENT = ROOT / "state"  # git-ignored, and on the repository's disk (not a tmpfs: fsync must cost)

# Targets from the performance issue (informative only).
DRAIN_RATIO_TARGET = 0.6
LATENCY_P99_TARGET_MS = 20.0
REPLAY_TARGET_PER_S = 3000.0
EDGE_RSS_TARGET_MB = 40.0
LIVE_RATE_PER_S = 10.0
EDGE_LIVE_RATE_PER_S = 30.0
HOUSEHOLD_RATE_PER_S = 3.0  # 10.8 kW at 1 Wh per pulse: a busy household, the edge's everyday load

# Pi Zero projection. calibration_workload() is a fixed interpreter-bound workload, timed in every
# run. Its time on a Pi Zero (ARM1176 at 1 GHz, Python 3.11) is an ASSUMPTION, not a measurement:
# 20x the 0.029 s it takes on one core of the reference host (2-vCPU AMD EPYC VM), the slow end of
# the usual 10-20x estimate (docs/performance.md, "Pi Zero projection"). Run `python -m bench --calibrate` on a real
# Pi Zero and put its figure here to turn the projection into a measurement.
REFERENCE_CALIBRATION_S = 0.029
PI_ZERO_FACTOR_VS_REFERENCE = 20.0
PI_ZERO_CALIBRATION_S = PI_ZERO_FACTOR_VS_REFERENCE * REFERENCE_CALIBRATION_S
# Two bars for the projected share of the Pi Zero's single core: "keeps up" leaves a quarter of it
# for the OS and everything else at the 30 pulses/s; "unnoticed" is our own stricter budget.
PI_ZERO_KEEPS_UP_SHARE = 0.75
PI_ZERO_BUDGET_SHARE = 0.25


EDGE_LIVE_RUNS = (("live", "edge simulate"), ("live_production", "edge production chain"),
                  ("live_production_household", "edge production chain"))


@dataclass(frozen=True)
class Sizes:
    pulses: int  # ceiling and writer-drain backlog (the same N for both)
    naive: int  # messages through the naive baseline (it is slow)
    latency: int  # live pulses per latency measurement
    edge_replay: int  # outbox rows replayed, and pulses of the simulate --speed max run
    edge_live_s: float  # measuring window of the live edge run
    warmup_s: float  # edge live: ignored after its first pulse
    repeat: int  # ceiling and writer drain run this many times, interleaved; medians are reported


PRESETS = {
    "full": Sizes(pulses=30_000, naive=1_000, latency=200, edge_replay=30_000, edge_live_s=30.0, warmup_s=2.0,
                  repeat=3),
    "small": Sizes(pulses=2_000, naive=60, latency=30, edge_replay=2_000, edge_live_s=3.0, warmup_s=1.0, repeat=1),
}
PHASES = ("ceiling", "writer_drain", "naive_baseline", "live_latency", "edge")
# Settings for every `emdc` process of the run (--set name=value), as EMDC_* variables; empty: defaults.
OVERRIDES: dict[str, str] = {}


# -- plumbing -------------------------------------------------------------------


def amqp_parameters() -> pika.URLParameters:
    params = pika.URLParameters(AMQP_URL)
    params.heartbeat = 0  # the bench's connections sit idle while it measures
    return params


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil without floats
    return ordered[int(rank) - 1]


class Broker:
    """One long-lived AMQP channel for cheap passive declares (queue depth, consumer count)."""

    def __init__(self) -> None:
        self.connection = pika.BlockingConnection(amqp_parameters())
        self.channel = self.connection.channel()
        props = self.connection._impl.server_properties
        self.version = f"{props.get('product', b'?')!s} {props.get('version', b'?')!s}"

    def queue(self, name: str) -> tuple[int, int]:
        """(ready messages, consumers) of ``name``; (0, 0) if it does not exist."""
        try:
            ok = self.channel.queue_declare(name, passive=True).method
        except pika.exceptions.ChannelClosedByBroker:
            self.channel = self.connection.channel()
            return 0, 0
        return ok.message_count, ok.consumer_count

    def depth(self, name: str) -> int:
        return self.queue(name)[0]

    def consumers(self, name: str) -> int:
        return self.queue(name)[1]

    def close(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError):
            self.connection.close()


def poll(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.005) -> Any:
    """Return the first truthy ``condition()``; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def process_cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def vm_kb(pid: int, field: str) -> int:
    """A ``Vm*`` line of /proc/<pid>/status in kB (VmHWM: peak RSS, VmRSS: current RSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class ServerCpu:
    """CPU seconds used by the brokers (RabbitMQ's beam.smp, mosquitto) over an interval, where visible."""

    def __init__(self) -> None:
        self.processes: dict[str, psutil.Process] = {}
        for proc in psutil.process_iter(["name"]):
            for label, name in (("rabbitmq", "beam.smp"), ("mosquitto", "mosquitto")):
                if proc.info["name"] == name and label not in self.processes:
                    self.processes[label] = proc
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        return {label: round(end[label] - self._start[label], 3) for label in end if label in self._start}

    def _sample(self) -> dict[str, float]:
        out = {}
        for label, proc in self.processes.items():
            with contextlib.suppress(psutil.Error):
                out[label] = process_cpu_s(proc)
        return out


class Subscriber:
    """An MQTT subscriber that timestamps every message of one topic filter."""

    def __init__(self, topic: str) -> None:
        self.events: list[tuple[int, float, str, str]] = []  # (time_ns, perf_counter, topic, payload)
        self._lock = threading.Lock()
        self._wanted: tuple[str, str] | None = None
        self._hit = threading.Event()
        self._subscribed = threading.Event()
        self.hit_at = 0.0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"emdc-bench-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(MQTT_HOST, MQTT_PORT)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError(f"no SUBACK from Mosquitto for {topic}")

    def _on_message(self, _client: object, _userdata: object, message: mqtt.MQTTMessage) -> None:
        now_ns, now = time.time_ns(), time.perf_counter()
        payload = message.payload.decode(errors="replace")
        with self._lock:
            self.events.append((now_ns, now, message.topic, payload))
            if self._wanted == (message.topic, payload) and not self._hit.is_set():
                self.hit_at = now
                self._hit.set()

    def expect(self, topic: str, payload: str) -> None:
        """Arm :meth:`wait` for ``payload`` on ``topic`` (including one that already arrived)."""
        with self._lock:
            self._wanted = (topic, payload)
            self._hit.clear()
            for _ns, at, seen_topic, seen in self.events:
                if (seen_topic, seen) == self._wanted:
                    self.hit_at = at
                    self._hit.set()
                    break

    def wait(self, timeout: float) -> float:
        """perf_counter() at the arrival of the expected message."""
        if not self._hit.wait(timeout):
            last = self.latest(self._wanted[0]) if self._wanted else None
            raise TimeoutError(f"MQTT value {self._wanted} not seen in {timeout:.0f} s (last: {last!r})")
        return self.hit_at

    def arrived(self, timeout: float) -> bool:
        """Whether the expected message has arrived, waiting up to ``timeout`` s for it."""
        return self._hit.wait(timeout)

    def latest(self, topic: str) -> str | None:
        with self._lock:
            return next((p for _, _, t, p in reversed(self.events) if t == topic), None)

    def arrivals(self, topic: str) -> list[tuple[int, str]]:
        with self._lock:
            return [(ns, payload) for ns, _, t, payload in self.events if t == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class EmdcProcess:
    """An ``emdc`` subprocess with its log in a file; optionally run under ``py-spy record``."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, profile: Path | None = None,
                 module: str = "common.cli") -> None:
        self.log_path = log_path
        self.profile = profile
        wrapper: list[str] = []
        if profile is not None:
            # Wall clock (--idle): waits for the disk and the network count too.
            wrapper = [pyspy(), "record", "--idle", "--rate", "250", "--nonblocking", "--format", "raw", "--output",
                       str(profile), "--"]
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen([*wrapper, sys.executable, "-m", module, *args], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=ROOT)
        self.process = psutil.Process(self.popen.pid)
        if profile is not None:  # measure the Python process, not py-spy
            self.process = poll(lambda: self._python_child(), 10, "py-spy to start the program", 0.01)

    def _python_child(self) -> psutil.Process | None:
        children = self.process.children()
        return children[0] if children else None

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_s(self) -> float:
        return process_cpu_s(self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (the services finish the work in hand and exit 0); SIGKILL if that takes too long."""
        if self.alive():
            with contextlib.suppress(psutil.Error):
                self.process.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.popen.returncode

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the program (and py-spy around it, if any)."""
        if self.alive():
            with contextlib.suppress(psutil.Error):
                self.process.kill()
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


def pyspy() -> str:
    found = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


class Scratch:
    """One measurement's broker names, directories and processes, all removed on exit."""

    def __init__(self, work: Path, label: str, profile_dir: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=work))
        self.names = Names(self.dir)
        self.label = label
        self.profile_dir = profile_dir
        self.processes: list[EmdcProcess] = []
        self.extra_queues: list[str] = []

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        failed = exc_info[0] is not None
        for process in self.processes:
            if process.alive():
                process.kill()
            if failed:
                tail = process.log()[-3000:]
                print(f"--- {process.log_path.name} (last 3000 characters) ---\n{tail}", file=sys.stderr)
        with pika.BlockingConnection(amqp_parameters()) as connection:
            channel = connection.channel()
            for queue in (self.names.queue, dead_letter_queue(self.names.queue), *self.extra_queues):
                channel.queue_delete(queue)
            for exchange in (self.names.exchange, dead_letter_exchange(self.names.exchange)):
                channel.exchange_delete(exchange)
        clear_retained(self.names.prefix)

    @property
    def energy_topic(self) -> str:
        return f"{self.names.prefix}/active_energy"

    def declare(self) -> None:
        """Declare the writer's queue (and exchange) as the writer would, so pulses wait there."""
        with pika.BlockingConnection(amqp_parameters()) as connection:
            declare_consumer_queue(connection.channel(), self.names.exchange, self.names.queue, WRITER_BINDINGS)

    def declare_tap(self) -> str:
        """A second queue bound to every pulse, so that the bench sees each pulse reach the broker."""
        tap = f"{self.names.queue}_tap"
        with pika.BlockingConnection(amqp_parameters()) as connection:
            channel = connection.channel()
            channel.queue_declare(tap, durable=True)
            channel.queue_bind(tap, self.names.exchange, "pulse.#")
        self.extra_queues.append(tap)
        return tap

    def writer_env(self, **extra: object) -> dict[str, str]:
        return self.names.env(EMDC_STATE_DIR=self.names.writer_dir, **{**OVERRIDES, **extra})

    def edge_env(self, **extra: object) -> dict[str, str]:
        return self.names.env(EMDC_STATE_DIR=self.names.edge_dir, **{**OVERRIDES, **extra})

    def spawn(self, args: list[str], env: dict[str, str], name: str, profile: bool = False,
              module: str = "common.cli") -> EmdcProcess:
        target = self.profile_dir / f"{self.label}-{name}.txt" if profile and self.profile_dir else None
        process = EmdcProcess(args, env, self.dir / f"{name}.log", profile=target, module=module)
        self.processes.append(process)
        return process

    def start_writer(self, broker: Broker, **env: object) -> EmdcProcess:
        """Start ``emdc writer`` and return once it consumes and has said ``online`` on MQTT."""
        status = Subscriber(f"{self.names.prefix}/status")
        try:
            status.expect(f"{self.names.prefix}/status", "online")
            writer = self.spawn(["writer"], self.writer_env(**env), "writer")
            poll(lambda: not writer.alive() or broker.consumers(self.names.queue), 30, "the writer to consume", 0.01)
            if not writer.alive():
                raise RuntimeError(f"the writer exited:\n{writer.log()}")
            status.wait(30)
        finally:
            status.close()
        return writer

    def saved_total_uwh(self) -> int:
        doc = json.loads((self.names.writer_dir / "energy_state.json").read_text())
        return doc["state"]["meters"]["main"]["active"]["total_uwh"]


def publish(exchange: str, messages: Iterable[tuple[str, bytes]]) -> int:
    """Publish persistent messages without confirms (the caller waits for the queue depth)."""
    count = 0
    with pika.BlockingConnection(amqp_parameters()) as connection:
        channel = connection.channel()
        props = pika.BasicProperties(delivery_mode=2, content_type=CONTENT_TYPE)
        for key, body in messages:
            channel.basic_publish(exchange, key, body, props)
            count += 1
    return count


def backlog(first: int, count: int, *, epoch: str = "be7c4", t0_ns: int) -> Iterator[tuple[str, bytes]]:
    """Consecutive 1 Wh pulses one second apart (3.6 kW): pulse ``seq`` ends at ``t0_ns + seq`` s."""
    for seq in range(first, first + count):
        pulse = Pulse("main", "active", epoch, seq, t0_ns + seq * 1_000_000_000, 1.0)
        yield pulse.routing_key, encode(pulse)


def fill_queue(scratch: Scratch, broker: Broker, count: int) -> None:
    t0_ns = time.time_ns() - (count + 1) * 1_000_000_000
    publish(scratch.names.exchange, backlog(1, count, t0_ns=t0_ns))
    poll(lambda: broker.depth(scratch.names.queue) == count, 60 + count / 1000, f"{count} messages queued", 0.05)


def energy_payload(pulses: int) -> str:
    return format_kwh(pulses * UWH_PER_WH)


def pulses_in(payload: str) -> int:
    return int(Decimal(payload) * 1000)


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


# -- measurements -----------------------------------------------------------------


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
            channel.basic_consume(queue, on_message)
            deadline = time.monotonic() + 60 + count / 500
            while received < count:
                connection.process_data_events(time_limit=1)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ceiling: only {received} of {count} messages delivered")
            channel.queue_declare(queue, passive=True)  # a round trip: the broker has taken every ack
            elapsed = time.perf_counter() - started
            consumer_cpu = time.process_time() - cpu_start
            server_cpu = server.stop()
        left = broker.depth(queue)
    return {"messages": count, "seconds": round(elapsed, 3), "rate_per_s": round(count / elapsed),
            "prefetch": 1000, "ack_every": 200, "left_in_queue": left, "consumer_cpu_s": round(consumer_cpu, 3),
            "consumer_cpu_share": round(consumer_cpu / elapsed, 2), "server_cpu_s": server_cpu}


def measure_writer_drain(work: Path, broker: Broker, count: int, profile_dir: Path | None) -> dict[str, Any]:
    """``emdc writer`` drains ``count`` queued pulses: consumer appears -> exact total on MQTT."""
    with Scratch(work, "writer_drain", profile_dir) as scratch:
        scratch.declare()
        fill_queue(scratch, broker, count)
        subscriber = Subscriber(scratch.energy_topic)
        try:
            subscriber.expect(scratch.energy_topic, energy_payload(count))
            server = ServerCpu()
            writer = scratch.spawn(["writer"], scratch.writer_env(), "writer", profile=profile_dir is not None)
            poll(lambda: not writer.alive() or broker.consumers(scratch.names.queue), 60, "the writer to consume",
                 0.002)
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
            poll(lambda: broker.depth(scratch.names.queue) == 0, 30, "the queue to be empty", 0.05)
            exact = scratch.saved_total_uwh() == count * UWH_PER_WH
            dead = broker.depth(dead_letter_queue(scratch.names.queue))
            returncode = writer.stop()
        finally:
            subscriber.close()
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
        subscriber = Subscriber(scratch.energy_topic)
        naive = NaiveWriter(scratch.names.writer_dir / "energy_state.json", scratch.names.prefix)
        try:
            subscriber.expect(scratch.energy_topic, energy_payload(count))
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
                channel.basic_consume(scratch.names.queue, on_message)
                deadline = time.monotonic() + 60 + count / 20
                while done < count:
                    connection.process_data_events(time_limit=1)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"naive baseline: only {done} of {count} handled")
                channel.queue_declare(scratch.names.queue, passive=True)
                elapsed = time.perf_counter() - started
            subscriber.wait(10)
        finally:
            naive.close()
            subscriber.close()
    rate = count / elapsed
    result: dict[str, Any] = {"pulses": count, "seconds": round(elapsed, 3), "rate_per_s": round(rate, 1)}
    if ceiling_rate:
        result["ratio_to_ceiling"] = round(rate / ceiling_rate, 4)
    return result


def measure_live_latency(work: Path, broker: Broker, count: int) -> dict[str, Any]:
    """A running writer; pulses published with pika at 10/s, ``ts_ns`` taken just before publishing."""
    with Scratch(work, "live_latency") as scratch:
        scratch.declare()
        subscriber = Subscriber(scratch.energy_topic)
        try:
            scratch.start_writer(broker)
            subscriber.expect(scratch.energy_topic, energy_payload(count))
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
        finally:
            subscriber.close()
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
        subscriber = Subscriber(scratch.energy_topic)
        try:
            scratch.start_writer(broker)
            subscriber.expect(scratch.energy_topic, energy_payload(count))
            power = LIVE_RATE_PER_S * 3600
            edge = scratch.spawn(["edge", "simulate", "--power", f"{power:g}", "--count", str(count), "--speed", "1"],
                                 scratch.edge_env(), "edge")
            returncode = edge.wait(60 + count / LIVE_RATE_PER_S)
            if returncode != 0:
                raise RuntimeError(f"edge simulate exited {returncode}:\n{edge.log()}")
            subscriber.wait(30)
            arrivals = subscriber.arrivals(scratch.energy_topic)
        finally:
            tap.close()
            subscriber.close()
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


def prefill_outbox(edge_dir: Path, count: int) -> None:
    """Record ``count`` pulses in the edge's outbox as if the broker had been unreachable for a while."""
    outbox = Outbox(edge_dir / OUTBOX_FILENAME, "main", max_rows=max(count, 1_000_000))
    try:
        t0_ns = time.time_ns() - (count + 10) * 1_000_000_000
        for first in range(0, count, 1000):
            outbox.record([("active", t0_ns + i * 1_000_000_000, 1.0) for i in range(first, min(first + 1000, count))])
    finally:
        outbox.close()


def below(value: int, limit: int) -> tuple[int] | None:
    """``(value,)`` (truthy even for 0) if ``value < limit``, for :func:`poll`."""
    return (value,) if value < limit else None


def at_least(value: int, limit: int) -> tuple[int] | None:
    return (value,) if value >= limit else None


def outbox_depth(connection: sqlite3.Connection) -> int:
    return connection.execute("SELECT count(*) FROM outbox").fetchone()[0]


def measure_edge_replay(work: Path, broker: Broker, count: int, profile_dir: Path | None) -> dict[str, Any]:
    """An outbox holding ``count`` pulses is replayed with confirms: first confirm -> outbox empty."""
    with Scratch(work, "edge_replay", profile_dir) as scratch:
        scratch.declare()
        prefill_outbox(scratch.names.edge_dir, count)
        db = sqlite3.connect(scratch.names.edge_dir / OUTBOX_FILENAME, timeout=30)
        try:
            initial = outbox_depth(db)
            # One extra simulated pulse: the simulator needs a count, and it checks the drain for us.
            edge = scratch.spawn(["edge", "simulate", "--power", "3600", "--count", "1", "--speed", "max"],
                                 scratch.edge_env(), "edge", profile=profile_dir is not None)
            # Rows are deleted as the broker confirms them: time from the first delete to an empty outbox.
            first_depth = poll(lambda: below(outbox_depth(db), initial), 60, "the first confirm")[0]
            started = time.perf_counter()
            cpu_start = edge.cpu_s()
            poll(lambda: outbox_depth(db) == 0, 60 + count / 500, "the outbox to drain")
            elapsed = time.perf_counter() - started
            cpu = edge.cpu_s() - cpu_start
            peak_kb = vm_kb(edge.pid, "VmHWM") if edge.alive() else 0
            returncode = edge.wait(30)
        finally:
            db.close()
        queued = broker.depth(scratch.names.queue)
    return {"pulses": count, "seconds": round(elapsed, 3), "rate_per_s": round(first_depth / elapsed),
            "confirmed_in_window": first_depth, "edge_cpu_s": round(cpu, 3),
            "edge_cpu_share": round(cpu / elapsed, 2), "edge_peak_rss_mb": round(peak_kb / 1024, 1),
            "queued_at_broker": queued, "exit_code": returncode, "profiled": profile_dir is not None}


def measure_edge_simulate(work: Path, broker: Broker, count: int) -> dict[str, Any]:
    """``emdc edge simulate --speed max --count N``: pulses generated, recorded and published with confirms."""
    with Scratch(work, "edge_simulate") as scratch:
        scratch.declare()
        queue = scratch.names.queue
        launched = time.perf_counter()
        edge = scratch.spawn(["edge", "simulate", "--power", "3600", "--count", str(count), "--speed", "max"],
                             scratch.edge_env(), "edge")
        first = poll(lambda: broker.depth(queue), 60, "the first pulse at the broker", 0.002)
        started = time.perf_counter()
        returncode = edge.wait(60 + count / 300)
        elapsed = time.perf_counter() - started
        if returncode != 0:
            raise RuntimeError(f"edge simulate exited {returncode}:\n{edge.log()}")
        wall = time.perf_counter() - launched
        queued = poll(lambda: at_least(broker.depth(queue), count), 10, f"{count} pulses at the broker", 0.05)[0]
    return {"pulses": count, "seconds": round(elapsed, 3), "rate_per_s": round((count - first) / elapsed),
            "process_wall_s": round(wall, 2), "queued_at_broker": queued, "exit_code": returncode}


def measure_edge_live(work: Path, broker: Broker, window_s: float, warmup_s: float, calibration_s: float,
                      production: bool = False, rate: float = EDGE_LIVE_RATE_PER_S) -> dict[str, Any]:
    """The edge at ``rate`` pulses/s in real time: peak RSS, CPU per 1,000 pulses, Pi Zero projection.

    ``emdc edge simulate --speed 1 --power 108000``, or with ``production`` the production chain
    alone (:func:`edge_harness`: what ``emdc edge run`` does, on a mock pin instead of lgpio), since
    the simulator's virtual-clock machinery costs CPU that a real edge does not spend.

    The projection divides by the machine's best calibration time: ``calibration_s`` from the
    start of the run or a best of 10 right before or after the window, whichever is lowest. This
    shared VM has slow phases lasting seconds to minutes in which the workload takes up to 1.7x
    as long (29-51 ms in one hour), while the edge's CPU per pulse moved by a few per cent over
    the same runs: the phases slow the workload, not the edge, so the quiet speed is the scale.
    """
    label = f"edge_live_production_{rate:g}" if production else "edge_live"
    with Scratch(work, label) as scratch:
        scratch.declare()
        queue = scratch.names.queue
        duration = warmup_s + window_s + 30
        if production:
            edge = scratch.spawn(["--edge-harness", f"{rate:g}", f"{duration:g}"], scratch.edge_env(),
                                 "edge", module="bench")
        else:
            power = rate * 3600  # W at 1 Wh per pulse
            edge = scratch.spawn(["edge", "simulate", "--power", f"{power:g}", "--duration", f"{duration:g}",
                                  "--speed", "1"], scratch.edge_env(), "edge")
        poll(lambda: not edge.alive() or broker.depth(queue), 60, "the first pulse", 0.01)
        if not edge.alive():
            raise RuntimeError(f"the edge exited:\n{edge.log()}")
        startup_cpu = edge.cpu_s()
        time.sleep(warmup_s)
        calibrations = [calibrate(10)]
        t0, cpu0, depth0 = time.perf_counter(), edge.cpu_s(), broker.depth(queue)
        rss_mb: list[float] = []
        while time.perf_counter() - t0 < window_s:
            rss_mb.append(round(vm_kb(edge.pid, "VmRSS") / 1024, 1))
            time.sleep(min(0.5, window_s / 10))
        t1, cpu1, depth1 = time.perf_counter(), edge.cpu_s(), broker.depth(queue)
        peak_kb = vm_kb(edge.pid, "VmHWM")
        calibrations.append(calibrate(10))
        edge.stop()  # simulate exits 1 when stopped before its duration: expected here
    pulses = depth1 - depth0
    elapsed = t1 - t0
    cpu = cpu1 - cpu0
    cpu_per_1000 = cpu / pulses * 1000
    return {"command": "bench --edge-harness" if production else "emdc edge simulate --speed 1",
            "pulses_per_s": round(pulses / elapsed, 1), "window_s": round(elapsed, 1), "pulses": pulses,
            "cpu_s": round(cpu, 3), "cpu_s_per_1000_pulses": round(cpu_per_1000, 3),
            "cpu_share_here": round(cpu / elapsed, 4), "startup_cpu_s": round(startup_cpu, 2),
            "peak_rss_mb": round(peak_kb / 1024, 1), "rss_mb_first": rss_mb[0], "rss_mb_last": rss_mb[-1],
            "calibration_s": [round(c, 4) for c in calibrations],
            "pi_zero": pi_zero_projection(cpu_per_1000, min(calibration_s, *calibrations), rate)}


def pi_zero_projection(cpu_s_per_1000: float, calibration_s: float, rate: float) -> dict[str, Any]:
    """Scale CPU seconds measured here at ``rate`` pulses/s to a Pi Zero (see PI_ZERO_CALIBRATION_S).

    The cost per pulse depends on the rate (above 10 pulses/s pulses share commits and publish
    cycles), so the share of the core is only projected at the rate it was measured at.
    """
    factor = PI_ZERO_CALIBRATION_S / calibration_s
    per_1000 = cpu_s_per_1000 * factor
    return {"factor": round(factor, 1), "cpu_s_per_1000_pulses": round(per_1000, 2), "rate_per_s": rate,
            "cpu_share": round(per_1000 / 1000 * rate, 3), "budget_share": PI_ZERO_BUDGET_SHARE,
            "cpu_share_if_factor": {f: round(cpu_s_per_1000 * f / 1000 * rate, 3) for f in (10, 15, 20, 30)}}


LGPIO_EVENT = struct.Struct("QBBBBI")  # lgpio's notification record: tick (ns), chip, gpio, level, flags, pad


def drive_edges(fd: int, gpio: int, active_level: int, rate: float, duration_s: float) -> None:
    """The meter side of :func:`edge_harness`, in its own process: write lgpio-style edge records."""
    start = time.monotonic()
    pulses = 0
    while time.monotonic() - start < duration_s:
        delay = start + pulses / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for level in (active_level, 1 - active_level):
            os.write(fd, LGPIO_EVENT.pack(time.monotonic_ns(), 0, gpio, level, 0, 0))
            if level == active_level:
                time.sleep(S0_PULSE_WIDTH_S)
        pulses += 1


def edge_harness(rate: float, duration_s: float) -> None:
    """``--edge-harness``: the production edge fed ``rate`` pulses a second the way lgpio feeds it.

    :class:`~edge.service.EdgeService` exactly as ``emdc edge run`` builds it (gpiozero input, pulse
    filter, recorder, SQLite outbox, AmqpPublisher, settings from EMDC_*), on gpiozero's MockFactory.
    A forked process plays the meter and the kernel: it writes timestamped edge records to a pipe,
    and a thread here does what lgpio's notification thread does (a blocking read per record, then
    the pin's ``_call_when_changed(ticks, level)``). So this process's CPU time is the edge's own,
    without the cost of timing the pulses. Stops after ``duration_s`` or SIGTERM.
    """
    import logging

    from gpiozero.pins.mock import MockFactory
    from gpiozero.pins.pi import PiPin

    from common.config import load_config
    from edge.service import EdgeService

    config = load_config()
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    read_fd, write_fd = os.pipe()
    driver = os.fork()
    if driver == 0:
        os.close(read_fd)
        try:
            drive_edges(write_fd, config.active_pin, 0 if config.pull_up else 1, rate, duration_s)
        finally:
            os._exit(0)
    os.close(write_fd)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    factory = MockFactory()
    service = EdgeService(config, pin_factory=factory)
    pin = factory.pin(config.active_pin)

    def notification_thread() -> None:
        try:
            with os.fdopen(read_fd, "rb", buffering=0) as events:
                while record := events.read(LGPIO_EVENT.size):
                    ticks_ns, _chip, _gpio, level, _flags, _pad = LGPIO_EVENT.unpack(record)
                    PiPin._call_when_changed(pin, ticks_ns / 1e9, level)
        finally:  # the meter finished, or the edge's callback failed (the traceback is printed)
            stop.set()

    service.start()
    threading.Thread(target=notification_thread, name="lgpio-notify", daemon=True).start()
    try:
        stop.wait()
    finally:
        os.kill(driver, signal.SIGTERM)
        os.waitpid(driver, 0)
        service.stop()


def calibration_workload() -> int:
    """A fixed, interpreter-bound mix (calls, dicts, strings, ints, small objects): the CPU yardstick."""

    @dataclass
    class Item:
        key: str
        value: int

    table: dict[str, Item] = {}
    total = 0
    for i in range(60_000):
        key = f"k{i % 512}"
        item = table.get(key)
        if item is None:
            item = table[key] = Item(key, 0)
        item.value += i & 0xFF
        total += len(key) + item.value % 7
        if i % 3 == 0:
            total += sum(divmod(i, 13))
    return total


def calibrate(repeat: int = 20) -> float:
    """Best-of-``repeat`` CPU seconds (like the edge's cost it scales) of :func:`calibration_workload`."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        calibration_workload()
        best = min(best, time.process_time() - start)
    return best


def measure_million(work: Path, broker: Broker, count: int) -> dict[str, Any]:
    """Edge -> broker -> writer on ``count`` pulses, sampling RSS and state-file sizes once a second."""
    with Scratch(work, "million") as scratch:
        scratch.declare()
        subscriber = Subscriber(scratch.energy_topic)
        try:
            writer = scratch.start_writer(broker)
            subscriber.expect(scratch.energy_topic, energy_payload(count))
            edge = scratch.spawn(["edge", "simulate", "--power", "3600", "--count", str(count), "--speed", "max"],
                                 scratch.edge_env(), "edge")
            started = time.perf_counter()
            state = scratch.names.writer_dir / "energy_state.json"
            outbox = scratch.names.edge_dir / OUTBOX_FILENAME
            samples: list[dict[str, Any]] = []
            while not subscriber.arrived(0):
                if not writer.alive():
                    raise RuntimeError(f"the writer died:\n{writer.log()}")
                latest = subscriber.latest(scratch.energy_topic)
                sample = {"t_s": round(time.perf_counter() - started, 1),
                          "counted": pulses_in(latest) if latest else 0,
                          "writer_rss_mb": round(vm_kb(writer.pid, "VmRSS") / 1024, 1),
                          "state_bytes": state.stat().st_size if state.exists() else 0}
                if edge.alive():
                    with contextlib.suppress(FileNotFoundError, ProcessLookupError, psutil.Error):
                        sample["edge_rss_mb"] = round(vm_kb(edge.pid, "VmRSS") / 1024, 1)
                        sample["outbox_bytes"] = sum(p.stat().st_size for p in outbox.parent.glob(outbox.name + "*"))
                samples.append(sample)
                if time.perf_counter() - started > 120 + count / 200:
                    raise TimeoutError(f"million: only {sample['counted']} pulses counted")
                subscriber.arrived(1.0)
            elapsed = subscriber.wait(0) - started
            edge_code = edge.wait(60)
            exact = scratch.saved_total_uwh() == count * UWH_PER_WH
            writer_code = writer.stop()
        finally:
            subscriber.close()
    return {"pulses": count, "seconds": round(elapsed, 1), "rate_per_s": round(count / elapsed),
            "exact_total": exact, "exit_codes": {"edge": edge_code, "writer": writer_code},
            "writer": flatness(samples, "writer_rss_mb", count), "edge": flatness(samples, "edge_rss_mb", count),
            "state_bytes": {"min": min((s["state_bytes"] for s in samples if s["state_bytes"]), default=0),
                            "max": max(s["state_bytes"] for s in samples)},
            "outbox_bytes_max": max((s.get("outbox_bytes", 0) for s in samples), default=0),
            "samples": samples}


def flatness(samples: list[dict[str, Any]], key: str, count: int) -> dict[str, Any]:
    """Peak RSS over the whole run, and growth from 10 % of the pulses counted to the end (MB per 100,000)."""
    every = [s[key] for s in samples if key in s]
    points = [(s["counted"], s[key]) for s in samples if key in s and s["counted"] >= count // 10]
    if not every:
        return {"samples": 0}
    out: dict[str, Any] = {"rss_mb_first": every[0], "rss_mb_max": max(every), "samples": len(every)}
    if len(points) >= 2:
        (n0, first), (n1, last) = points[0], points[-1]
        out.update(rss_mb_at_10pct=first, rss_mb_last=last,
                   growth_mb_per_100k=round((last - first) / max(n1 - n0, 1) * 100_000, 3))
    return out


# -- profiling summary ------------------------------------------------------------


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Wall-clock shares from py-spy's raw (collapsed) output, start-up imports excluded.

    Per thread (named by the function it was started with): its share of all samples, where its
    samples were (``self_pct``, with line numbers, so a wait shows as the call that waits) and
    per function including callees (``inclusive_pct``); shares are of that thread's samples.
    """
    per_thread: dict[str, tuple[Counter[str], Counter[str]]] = {}
    sizes: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or "_find_and_load" in stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        role = thread_role(frames)
        self_time, inclusive = per_thread.setdefault(role, (Counter(), Counter()))
        sizes[role] += count
        self_time[frames[-1]] += count
        for frame in {strip_line(frame) for frame in frames}:
            inclusive[frame] += count
    total = sum(sizes.values())
    threads = {}
    for role, samples in sizes.most_common():
        self_time, inclusive = per_thread[role]
        threads[role] = {
            "pct": round(100 * samples / total, 1),
            "self_pct": [(name, round(100 * n / samples, 1)) for name, n in self_time.most_common(top)],
            "inclusive_pct": [(name, round(100 * n / samples, 1)) for name, n in inclusive.most_common(top)]}
    return {"samples": total, "threads": threads}


def thread_role(frames: list[str]) -> str:
    """The function a thread was started with (the frame after ``Thread.run``), or ``main``."""
    names = [strip_line(frame).split(" (")[0] for frame in frames]
    if "Thread.run" in names and names.index("Thread.run") + 1 < len(names):
        return names[names.index("Thread.run") + 1]
    if "Thread._bootstrap_inner" in names and names.index("Thread._bootstrap_inner") + 1 < len(names):
        return names[names.index("Thread._bootstrap_inner") + 1]
    return "main"


def strip_line(frame: str) -> str:
    """``f (pkg/mod.py:12)`` -> ``f (pkg/mod.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


# -- report -----------------------------------------------------------------------


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def fsync_ms(directory: Path, repeat: int = 50) -> float:
    """Median cost of writing and fsyncing a small file where the state lives."""
    probe = directory / "fsync-probe"
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        with probe.open("wb") as fh:
            fh.write(b"x" * 300)
            fh.flush()
            os.fsync(fh.fileno())
        times.append(time.perf_counter() - start)
    probe.unlink()
    return round(statistics.median(times) * 1000, 3)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met (informative only)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, target: str, ok: bool) -> None:
        out.append({"name": name, "value": value, "target": target, "ok": ok})

    drain = results.get("writer_drain", {})
    if "ratio_to_ceiling" in drain:
        add("writer drain / ceiling", drain["ratio_to_ceiling"], f">= {DRAIN_RATIO_TARGET}",
            drain["ratio_to_ceiling"] >= DRAIN_RATIO_TARGET)
    live = results.get("live_latency", {})
    if "direct" in live:
        add("live latency p99 (ms)", live["direct"]["p99_ms"], f"<= {LATENCY_P99_TARGET_MS:g}",
            live["direct"]["p99_ms"] <= LATENCY_P99_TARGET_MS)
    if "via_edge" in live:
        p99 = live["via_edge"]["broker_to_mqtt"]["p99_ms"]
        add("live latency via edge, broker -> MQTT p99 (ms)", p99, f"<= {LATENCY_P99_TARGET_MS:g}",
            p99 <= LATENCY_P99_TARGET_MS)
    edge = results.get("edge", {})
    if "replay" in edge:
        add("edge outbox replay (pulses/s)", edge["replay"]["rate_per_s"], f">= {REPLAY_TARGET_PER_S:g}",
            edge["replay"]["rate_per_s"] >= REPLAY_TARGET_PER_S)
    if "live" in edge:  # the harness process also carries the bench's imports, so RSS comes from simulate
        add("edge peak RSS (MB)", edge["live"]["peak_rss_mb"], f"<= {EDGE_RSS_TARGET_MB:g}",
            edge["live"]["peak_rss_mb"] <= EDGE_RSS_TARGET_MB)
    for key, what in EDGE_LIVE_RUNS[1:]:  # the production chain: the simulator's own machinery is no Pi's load
        if key in edge:
            pi = edge[key]["pi_zero"]
            rate = f"{pi['rate_per_s']:g} pulses/s"
            if pi["rate_per_s"] >= EDGE_LIVE_RATE_PER_S:
                add(f"{what}: Pi Zero keeps up at {rate} (projected share of its core)", pi["cpu_share"],
                    f"<= {PI_ZERO_KEEPS_UP_SHARE}", pi["cpu_share"] <= PI_ZERO_KEEPS_UP_SHARE)
            add(f"{what}: Pi Zero unnoticed at {rate} (projected share of its core)", pi["cpu_share"],
                f"<= {PI_ZERO_BUDGET_SHARE}", pi["cpu_share"] <= PI_ZERO_BUDGET_SHARE)
    million = results.get("million", {})
    for side in ("writer", "edge"):
        growth = million.get(side, {}).get("growth_mb_per_100k")
        if growth is not None:
            add(f"million: {side} RSS growth (MB per 100k pulses)", growth, "< 0.1", growth < 0.1)
    if "rss_mb_max" in million.get("edge", {}):
        peak = million["edge"]["rss_mb_max"]
        add("million: edge peak RSS (MB)", peak, f"<= {EDGE_RSS_TARGET_MB:g}", peak <= EDGE_RSS_TARGET_MB)
    if "state_bytes" in million:
        sizes = million["state_bytes"]
        add("million: writer state file growth (bytes)", sizes["max"] - sizes["min"], "< 64",
            sizes["max"] - sizes["min"] < 64)
    return out


def print_table(results: dict[str, Any]) -> None:
    meta = results["meta"]
    rows: list[tuple[str, str, str]] = []
    ceiling = results.get("ceiling")
    if ceiling:
        rows.append((f"ceiling: pika consume+ack, {ceiling['messages']:,} msgs", f"{fmt_rate(ceiling['rate_per_s'])}/s",
                     f"median of {runs(ceiling)}; consumer CPU {ceiling['consumer_cpu_share']:.0%}"))
    drain = results.get("writer_drain")
    if drain:
        ratio = f"{drain['ratio_to_ceiling']:.2f} x ceiling; " if "ratio_to_ceiling" in drain else ""
        rows.append((f"writer drain, {drain['pulses']:,} pulses", f"{fmt_rate(drain['rate_per_s'])}/s",
                     f"{ratio}median of {runs(drain)}; writer CPU {drain['writer_cpu_share']:.0%}"))
    naive = results.get("naive_baseline")
    if naive:
        extra = f"{naive['ratio_to_ceiling']:.3f} x ceiling" if "ratio_to_ceiling" in naive else ""
        if "speedup" in naive:
            extra += f"; the writer drains {naive['speedup']:.0f}x faster"
        rows.append((f"naive per-message baseline, {naive['pulses']:,} pulses", f"{naive['rate_per_s']:,.0f}/s",
                     extra))
    live = results.get("live_latency", {})
    if "direct" in live:
        rows.append((f"live latency, {live['direct']['pulses']} pulses at 10/s (pika -> writer -> MQTT)",
                     latency_text(live["direct"]), "p50 / p99 / max"))
    if "via_edge" in live:
        via = live["via_edge"]
        rows.append((f"live latency, {via['pulses']} pulses at 10/s (edge simulate -> ... -> MQTT)",
                     latency_text(via), "from the simulator's ts_ns"))
        rows.append(("  of which edge -> broker", latency_text(via["edge_to_broker"]),
                     "incl. the simulator's clock offset"))
        rows.append(("  of which broker -> writer -> MQTT", latency_text(via["broker_to_mqtt"]), ""))
    edge = results.get("edge", {})
    if "replay" in edge:
        r = edge["replay"]
        rows.append((f"edge outbox replay, {r['pulses']:,} pulses", f"{fmt_rate(r['rate_per_s'])}/s",
                     f"with confirms; edge CPU {r['edge_cpu_share']:.0%}"))
    if "simulate_max" in edge:
        r = edge["simulate_max"]
        rows.append((f"edge simulate --speed max, {r['pulses']:,} pulses", f"{fmt_rate(r['rate_per_s'])}/s",
                     f"recorded + published; process {r['process_wall_s']:.1f} s"))
    for key, what in EDGE_LIVE_RUNS:
        if key in edge:
            r = edge[key]
            pi = r["pi_zero"]
            rss_note = " (+ the bench's imports)" if key.startswith("live_production") else ""
            rows.append((f"{what} at {r['pulses_per_s']:.0f} pulses/s: peak RSS", f"{r['peak_rss_mb']:.1f} MB",
                         f"RSS {r['rss_mb_first']:.1f} -> {r['rss_mb_last']:.1f} MB over {r['window_s']:.0f} s"
                         f"{rss_note}"))
            rows.append((f"{what}: CPU per 1,000 pulses", f"{r['cpu_s_per_1000_pulses']:.3f} s",
                         f"Pi Zero (x{pi['factor']}): {pi['cpu_s_per_1000_pulses']:.1f} s, "
                         f"{pi['cpu_share']:.0%} of its core at {pi['rate_per_s']:g}/s"))
    million = results.get("million")
    if million:
        rows.append((f"million: edge -> writer, {million['pulses']:,} pulses", f"{fmt_rate(million['rate_per_s'])}/s",
                     f"{million['seconds']:.0f} s, exact total: {million['exact_total']}"))
        for side in ("writer", "edge"):
            m = million[side]
            if "rss_mb_last" in m:
                rows.append((f"million: {side} RSS at 10 % -> end", f"{m['rss_mb_at_10pct']} -> {m['rss_mb_last']} MB",
                             f"{m['growth_mb_per_100k']:+.3f} MB per 100k pulses; peak {m['rss_mb_max']} MB"))
        rows.append(("million: writer state file", f"{million['state_bytes']['min']}-{million['state_bytes']['max']} B",
                     f"edge outbox files <= {million['outbox_bytes_max'] / 1e6:.1f} MB"))
    print(f"\nEMDC benchmark  {meta['date']}  rev {meta['revision']}  {meta['cpus']} x {meta['cpu']}")
    print(f"  Python {meta['python']}, {meta['rabbitmq']}, fsync {meta['fsync_ms']} ms, calibration "
          f"{meta['calibration_s'] * 1000:.0f} ms, load average {meta['load_average_at_start'][0]:.2f}\n")
    width = max((len(r[0]) for r in rows), default=10)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>22}  {note}")
    if results["targets"]:
        print("\n  targets (informative):")
        for t in results["targets"]:
            print(f"    {'PASS' if t['ok'] else 'MISS'}  {t['name']}: {t['value']} (target {t['target']})")
    for name, profile in results.get("profiles", {}).items():
        print(f"\n  py-spy {name}: {profile['samples']} samples (wall clock, imports excluded)")
        for thread, summary in profile["threads"].items():
            print(f"    thread {thread} ({summary['pct']:.0f}% of samples); where its time goes:")
            for frame, pct in summary["self_pct"][:8]:
                print(f"      {pct:5.1f}%  {frame}")
    print()


def runs(result: dict[str, Any]) -> str:
    rates = result.get("rates_per_s", [result["rate_per_s"]])
    return f"{len(rates)} ({', '.join(fmt_rate(r) for r in rates)})" if len(rates) > 1 else "1"


def latency_text(summary: dict[str, Any]) -> str:
    return f"{summary['p50_ms']:.1f} / {summary['p99_ms']:.1f} / {summary['max_ms']:.1f} ms"


# -- main -------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(PRESETS), default="full", help="preset sizes (default full)")
    parser.add_argument("--pulses", type=int, help="N for the ceiling and the writer drain")
    parser.add_argument("--naive-pulses", type=int, help="messages through the naive baseline (default N/30)")
    parser.add_argument("--latency-pulses", type=int, help="pulses per live-latency measurement")
    parser.add_argument("--edge-pulses", type=int, help="outbox rows replayed / pulses simulated at --speed max")
    parser.add_argument("--edge-live-s", type=float, help="seconds of the live edge CPU/RSS window")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(PHASES)}")
    parser.add_argument("--million", nargs="?", type=int, const=1_000_000, default=None, metavar="N",
                        help="also run edge -> writer on N (default 1,000,000) pulses for flat memory")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for every emdc process, e.g. --set batch_size=2000 (repeatable)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record py-spy profiles of the writer drain and edge replay into DIR")
    parser.add_argument("--keep-work", action="store_true", help="keep the logs and state directories (printed)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS.name})")
    parser.add_argument("--repeat", type=int, help="runs of the ceiling and writer drain (median reported)")
    parser.add_argument("--edge-harness", nargs=2, type=float, metavar=("RATE", "SECONDS"), help=argparse.SUPPRESS)
    parser.add_argument("--calibrate", action="store_true",
                        help="only time the CPU calibration workload (run it on a Pi Zero to replace the assumption)")
    return parser.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = PRESETS[args.size]
    if args.pulses:
        sizes = replace(sizes, pulses=args.pulses, naive=max(20, args.pulses // 30))
    overrides = {"naive": args.naive_pulses, "latency": args.latency_pulses, "edge_replay": args.edge_pulses,
                 "edge_live_s": args.edge_live_s, "repeat": args.repeat}
    return replace(sizes, **{k: v for k, v in overrides.items() if v})


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = sizes_from(args)
    phases = set(args.only.split(",")) if args.only else set(PHASES)
    unknown = phases - set(PHASES)
    if unknown:
        raise SystemExit(f"--only: unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    missing = [name for name, port in (("RabbitMQ", 5672), ("Mosquitto", MQTT_PORT))
               if not port_open("127.0.0.1", port)]
    if missing:
        raise SystemExit(f"{' and '.join(missing)} not reachable on 127.0.0.1; start them (see .ci/run)")
    for setting in args.set:
        name, sep, value = setting.partition("=")
        if not sep or not name:
            raise SystemExit(f"--set expects NAME=VALUE, got {setting!r}")
        OVERRIDES[f"EMDC_{name.upper()}"] = value
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        pyspy()

    WORK_PARENT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=WORK_PARENT))
    broker = Broker()
    calibration_s = calibrate()
    results: dict[str, Any] = {"meta": {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "revision": git_revision(),
        "command": " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
        "python": platform.python_version(), "cpu": cpu_model(), "cpus": os.cpu_count(),
        "rabbitmq": broker.version, "pika": pika.__version__, "fsync_ms": fsync_ms(work),
        "calibration_s": round(calibration_s, 4), "pi_zero_calibration_s": PI_ZERO_CALIBRATION_S,
        "load_average_at_start": os.getloadavg(), "sizes": asdict(sizes), "settings": dict(OVERRIDES)}}

    def phase(name: str, action: Callable[[], Any]) -> Any:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        value = action()
        print(f"[bench] {name} done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        return value

    try:
        ceilings: list[dict[str, Any]] = []
        drains: list[dict[str, Any]] = []
        for i in range(1, sizes.repeat + 1):  # interleaved, so drift in the machine's load hits both alike
            of = f" {i}/{sizes.repeat}" if sizes.repeat > 1 else ""
            if "ceiling" in phases:
                ceilings.append(phase(f"ceiling{of}", lambda: measure_ceiling(work, broker, sizes.pulses)))
            if "writer_drain" in phases:
                drains.append(phase(f"writer drain{of}", lambda i=i: measure_writer_drain(
                    work, broker, sizes.pulses, args.profile if i == 1 else None)))
        if ceilings:
            results["ceiling"] = median_run(ceilings)
        ceiling_rate = results.get("ceiling", {}).get("rate_per_s")
        if drains:
            drain = median_run(drains)
            if ceiling_rate:
                drain["ratio_to_ceiling"] = round(drain["rate_per_s"] / ceiling_rate, 3)
            results["writer_drain"] = drain
        if "naive_baseline" in phases:
            naive = phase("naive baseline", lambda: measure_naive(work, broker, sizes.naive, ceiling_rate))
            if "writer_drain" in results:
                naive["speedup"] = round(results["writer_drain"]["rate_per_s"] / naive["rate_per_s"], 1)
            results["naive_baseline"] = naive
        if "live_latency" in phases:
            results["live_latency"] = {
                "direct": phase("live latency (pika)", lambda: measure_live_latency(work, broker, sizes.latency)),
                "via_edge": phase("live latency (edge)", lambda: measure_edge_latency(work, broker, sizes.latency)),
            }
        if "edge" in phases:
            results["edge"] = {
                "replay": phase("edge replay",
                                lambda: measure_edge_replay(work, broker, sizes.edge_replay, args.profile)),
                "simulate_max": phase("edge simulate --speed max",
                                      lambda: measure_edge_simulate(work, broker, sizes.edge_replay)),
                "live": phase("edge live (simulate)", lambda: measure_edge_live(
                    work, broker, sizes.edge_live_s, sizes.warmup_s, calibration_s)),
                "live_production": phase("edge live (production chain)", lambda: measure_edge_live(
                    work, broker, sizes.edge_live_s, sizes.warmup_s, calibration_s, production=True)),
                "live_production_household": phase("edge live (production chain, household rate)",
                                                   lambda: measure_edge_live(
                    work, broker, sizes.edge_live_s, sizes.warmup_s, calibration_s, production=True,
                    rate=HOUSEHOLD_RATE_PER_S)),
            }
        if args.million:
            results["million"] = phase("million", lambda: measure_million(work, broker, args.million))
        if args.profile:
            results["profiles"] = {path.stem: summarize_profile(path) for path in sorted(args.profile.glob("*.txt"))}
    finally:
        broker.close()
        if args.keep_work:
            print(f"[bench] logs and state kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["meta"]["load_average_at_end"] = os.getloadavg()
    results["targets"] = targets(results)
    return results


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (the lower middle one for an even count), plus every run's rate."""
    ordered = sorted(runs, key=lambda run: run["rate_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "runs": len(runs), "rates_per_s": [run["rate_per_s"] for run in runs]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.edge_harness:
        edge_harness(*args.edge_harness)
        return 0
    if args.calibrate:
        seconds = calibrate()
        print(f"calibration workload: {seconds * 1000:.1f} ms (best of 20) on {cpu_model()}, "
              f"Python {platform.python_version()}")
        return 0
    results = run(args)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
