"""The bench's own plumbing: a run's scratch space, the processes it measures, its broker and MQTT probes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pika
import pika.exceptions
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from backend.amounts import format_kwh
from bench.brokers import (
    EMDC_MODULE,
    MQTT_HOST,
    MQTT_PORT,
    ROOT,
    Names,
    amqp_parameters,
    declare_queue,
    publish,
    pulses,
    saved_total_uwh,
    wait_until,
)

UWH_PER_WH = 1_000_000
WORK_PARENT = ROOT / "state"  # git-ignored, and on the repository's disk (not a tmpfs: fsync must cost)
# Settings for every `emdc` process of the run (--set name=value), as EMDC_* variables; empty: defaults.
OVERRIDES: dict[str, str] = {}


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
                 module: str = EMDC_MODULE) -> None:
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
            self.process = wait_until(lambda: self._python_child(), 10, "py-spy to start the program", 0.01)

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
        self.names.remove(*self.extra_queues)

    @property
    def energy_topic(self) -> str:
        return f"{self.names.prefix}/active_energy"

    @contextlib.contextmanager
    def energy_subscriber(self, count: int) -> Iterator[Subscriber]:
        """A subscriber to the energy topic, armed for the total of ``count`` 1 Wh pulses."""
        subscriber = Subscriber(self.energy_topic)
        try:
            subscriber.expect(self.energy_topic, energy_payload(count))
            yield subscriber
        finally:
            subscriber.close()

    def declare(self) -> None:
        """Declare the writer's queue (and exchange) as the writer would, so pulses wait there."""
        declare_queue(self.names)

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
        return self.names.writer_env(**{**OVERRIDES, **extra})

    def edge_env(self, **extra: object) -> dict[str, str]:
        return self.names.edge_env(**{**OVERRIDES, **extra})

    def spawn(self, args: list[str], env: dict[str, str], name: str, profile: bool = False,
              module: str = EMDC_MODULE) -> EmdcProcess:
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
            wait_until(lambda: not writer.alive() or broker.consumers(self.names.queue), 30, "the writer to consume",
                       0.01)
            if not writer.alive():
                raise RuntimeError(f"the writer exited:\n{writer.log()}")
            status.wait(30)
        finally:
            status.close()
        return writer

    def saved_total_uwh(self) -> int | None:
        return saved_total_uwh(self.names.writer_dir)


def fill_queue(scratch: Scratch, broker: Broker, count: int) -> None:
    """Queue a backlog of ``count`` consecutive 1 Wh pulses one second apart (3.6 kW) for the writer."""
    publish(scratch.names.exchange, pulses(count, epoch="be7c4"))
    wait_until(lambda: broker.depth(scratch.names.queue) == count, 60 + count / 1000, f"{count} messages queued",
               0.05)


def consume_all(channel: Any, queue: str, on_message: Callable[..., None], handled: Callable[[], int], count: int,
                timeout: float, what: str) -> None:
    """Consume ``queue`` until ``handled()`` reaches ``count``, then wait for a round trip: the broker has every ack."""
    channel.basic_consume(queue, on_message)
    deadline = time.monotonic() + timeout
    while handled() < count:
        channel.connection.process_data_events(time_limit=1)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: only {handled()} of {count} messages handled")
    channel.queue_declare(queue, passive=True)


def energy_payload(count: int) -> str:
    """The energy value on MQTT once ``count`` 1 Wh pulses are counted."""
    return format_kwh(count * UWH_PER_WH)


def pulses_in(payload: str) -> int:
    return int(Decimal(payload) * 1000)
