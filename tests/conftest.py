"""Shared fixtures: real brokers, isolated names, running `emdc` processes, an MQTT watcher.

Every test that talks to a broker gets its own queue, topic prefix and state
directories, so tests never see each other's messages. Brokers that are down
make the session fail loudly instead of skipping: CI must not pass vacuously.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pika
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from common.topology import WRITER_BINDINGS, dead_letter_exchange, dead_letter_queue, declare_consumer_queue

AMQP_URL = os.environ.get("EMDC_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
MQTT_HOST = os.environ.get("EMDC_TEST_MQTT_HOST", "127.0.0.1")
MQTT_PORT = int(os.environ.get("EMDC_TEST_MQTT_PORT", "1883"))
EMDC = [sys.executable, "-m", "emdc"]
ROOT = Path(__file__).resolve().parent.parent


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="session")
def brokers() -> None:
    missing = [name for name, port in (("RabbitMQ", 5672), ("Mosquitto", MQTT_PORT))
               if not port_open("127.0.0.1", port)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not reachable on 127.0.0.1; start them (see .ci/run)")


class Names:
    """Unique broker names for one test."""

    def __init__(self, tmp_path: Path) -> None:
        token = uuid.uuid4().hex[:10]
        self.queue = f"test_{token}"
        self.exchange = f"EMDC_test_{token}"
        self.prefix = f"test/{token}"
        self.writer_dir = tmp_path / "writer"
        self.edge_dir = tmp_path / "edge"

    def env(self, **extra: object) -> dict[str, str]:
        """Environment for an `emdc` process under test."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMDC_")}
        env.update({"EMDC_AMQP_URL": AMQP_URL, "EMDC_EXCHANGE": self.exchange, "EMDC_QUEUE": self.queue,
                    "EMDC_TOPIC_PREFIX": self.prefix,
                    "EMDC_MQTT_HOST": MQTT_HOST, "EMDC_MQTT_PORT": str(MQTT_PORT), "EMDC_DISCOVERY": "off",
                    "PYTHONPATH": str(ROOT)})
        env.update({k: str(v) for k, v in extra.items()})
        return env


@pytest.fixture
def names(tmp_path: Path, brokers: None) -> Iterator[Names]:
    n = Names(tmp_path)
    yield n
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as connection:
        channel = connection.channel()
        for queue in (n.queue, dead_letter_queue(n.queue)):
            channel.queue_delete(queue)
        for exchange in (n.exchange, dead_letter_exchange(n.exchange)):
            channel.exchange_delete(exchange)
    clear_retained(n.prefix)


@pytest.fixture
def amqp() -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    yield connection.channel()
    connection.close()


def queue_depth(queue: str) -> int:
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as connection:
        return connection.channel().queue_declare(queue, passive=True).method.message_count


def consumers(queue: str) -> int:
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as connection:
        try:
            return connection.channel().queue_declare(queue, passive=True).method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return 0


def declare_queue(names: Names) -> None:
    """Declare the test's queue as the writer would, so pulses can wait in it before a writer runs."""
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as connection:
        declare_consumer_queue(connection.channel(), names.exchange, names.queue, WRITER_BINDINGS)


class MqttWatcher:
    """Subscribes to ``<prefix>/#`` and remembers the latest payload of every topic."""

    def __init__(self, topic: str, host: str = MQTT_HOST, port: int = MQTT_PORT) -> None:
        self.values: dict[str, str] = {}
        self.history: list[tuple[str, str, bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            payload = message.payload.decode()
            self.values[message.topic] = payload
            self.history.append((message.topic, payload, bool(message.retain)))

    def wait_for(self, topic: str, predicate: Callable[[str], bool], timeout: float = 30) -> str:
        wait_until(lambda: topic in self.values and predicate(self.values[topic]), timeout,
                   f"{topic} to satisfy the condition (last value {self.values.get(topic)!r})")
        return self.values[topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def watch(names: Names) -> Iterator[MqttWatcher]:
    watcher = MqttWatcher(f"{names.prefix}/#")
    yield watcher
    watcher.close()


def clear_retained(prefix: str) -> None:
    """Remove retained test topics so the broker does not accumulate them."""
    watcher = MqttWatcher(f"{prefix}/#")
    time.sleep(0.3)
    for topic in list(watcher.values):
        watcher.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    watcher.close()


class EmdcProcess:
    """A long-running `emdc ...` subprocess with its log captured to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen([*EMDC, *args], env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=ROOT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)


def start_writer(spawn: Callable[..., EmdcProcess], names: Names, env: dict[str, str]) -> EmdcProcess:
    """Start `emdc writer` and wait until it consumes its queue."""
    writer = spawn(["writer"], env, "writer")
    wait_until(lambda: writer.proc.poll() is not None or consumers(names.queue) > 0, 30, "the writer to consume")
    assert writer.proc.poll() is None, writer.log()
    return writer


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., EmdcProcess]]:
    started: list[EmdcProcess] = []

    def start(args: list[str], env: dict[str, str], name: str = "emdc") -> EmdcProcess:
        process = EmdcProcess(args, env, tmp_path / f"{name}-{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.stop(signal.SIGKILL)


def run_emdc(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `emdc ...` to completion; fail with its output if it does not exit 0."""
    result = subprocess.run([*EMDC, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, f"emdc {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
    return result
