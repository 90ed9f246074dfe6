"""The real brokers that the bench and the test suite run against, and one run's private names on them.

Shared by ``python -m bench`` and tests/ (which import it through tests/support.py):
the brokers' addresses, overridable with ``EMDC_TEST_AMQP_URL``,
``EMDC_TEST_MQTT_HOST`` and ``EMDC_TEST_MQTT_PORT``; :class:`Names`, a queue,
exchange, topic prefix and state directories of one run's own, with the
environment of an ``emdc`` process that uses them, and their removal; and the
small tools around them (publishing, an MQTT watcher, waiting, the writer's
saved total).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pika
from paho.mqtt.enums import CallbackAPIVersion

from common.message import CONTENT_TYPE, Pulse, encode
from common.topology import (
    WRITER_BINDINGS,
    dead_letter_exchange,
    dead_letter_queue,
    declare_consumer_queue,
    lease_queue,
)

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("EMDC_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
MQTT_HOST = os.environ.get("EMDC_TEST_MQTT_HOST", "127.0.0.1")
MQTT_PORT = int(os.environ.get("EMDC_TEST_MQTT_PORT", "1883"))
MARIADB_URL = os.environ.get("EMDC_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/")
EMDC_MODULE = "emdc"  # `python -m emdc` is the `emdc` command
EMDC = [sys.executable, "-m", EMDC_MODULE]


def amqp_parameters(url: str = AMQP_URL) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.heartbeat = 0  # helper connections may sit idle while a test or a measurement waits
    return params


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def unreachable_brokers() -> list[str]:
    """The brokers that do not accept a connection, as ``"RabbitMQ at host:port"`` (none when both are up)."""
    amqp = amqp_parameters()
    return [f"{name} at {host}:{port}"
            for name, host, port in (("RabbitMQ", amqp.host, amqp.port), ("Mosquitto", MQTT_HOST, MQTT_PORT))
            if not port_open(host, port)]


@contextlib.contextmanager
def mariadb_databases(count: int, server_url: str = MARIADB_URL) -> Iterator[list[str]]:
    """URLs of ``count`` fresh databases of the caller's own on the MariaDB server (a writer's shared state, see
    ``state_url``), dropped afterwards."""
    import sqlalchemy as sa

    url = sa.make_url(server_url)
    if not port_open(url.host or "127.0.0.1", url.port or 0):
        raise ConnectionError(f"MariaDB not reachable at {url.host}:{url.port}; start it (see .ci/run)")
    server = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    created = [f"emdc_state_{uuid.uuid4().hex[:10]}" for _ in range(count)]
    with server.connect() as conn:
        for name in created:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        yield [url.set(database=name).render_as_string(hide_password=False) for name in created]
    finally:
        with server.connect() as conn:
            for name in created:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        server.dispose()


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Return the first truthy ``condition()``, asked every ``interval`` s; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Names:
    """Broker names and state directories of one test or measurement, unique to it."""

    def __init__(self, directory: Path) -> None:
        token = uuid.uuid4().hex[:10]
        self.queue = f"test_{token}"
        self.exchange = f"EMDC_test_{token}"
        self.prefix = f"test/{token}"
        self.writer_dir = directory / "writer"
        self.edge_dir = directory / "edge"

    def env(self, **extra: object) -> dict[str, str]:
        """Environment for an `emdc` process under test: these names, the test brokers, no other EMDC_*."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMDC_")}
        env.update({"EMDC_AMQP_URL": AMQP_URL, "EMDC_EXCHANGE": self.exchange, "EMDC_QUEUE": self.queue,
                    "EMDC_TOPIC_PREFIX": self.prefix,
                    "EMDC_MQTT_HOST": MQTT_HOST, "EMDC_MQTT_PORT": str(MQTT_PORT), "EMDC_DISCOVERY": "off",
                    "PYTHONPATH": str(ROOT)})
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def writer_env(self, **extra: object) -> dict[str, str]:
        """:meth:`env` of an ``emdc writer`` (or db-writer) keeping its state in :attr:`writer_dir`."""
        return self.env(**{"EMDC_STATE_DIR": self.writer_dir, **extra})

    def edge_env(self, **extra: object) -> dict[str, str]:
        """:meth:`env` of an ``emdc edge`` command keeping its outbox in :attr:`edge_dir`."""
        return self.env(EMDC_STATE_DIR=self.edge_dir, **extra)

    def remove(self, *extra_queues: str) -> None:
        """Delete the queues and exchanges (and ``extra_queues``), and clear the retained topics."""
        with pika.BlockingConnection(amqp_parameters()) as connection:
            channel = connection.channel()
            for queue in (self.queue, dead_letter_queue(self.queue), lease_queue(self.queue), *extra_queues):
                channel.queue_delete(queue)
            for exchange in (self.exchange, dead_letter_exchange(self.exchange)):
                channel.exchange_delete(exchange)
        clear_retained(self.prefix)


def declare_queue(names: Names, bindings: tuple[str, ...] = WRITER_BINDINGS) -> None:
    """Declare the queue (and exchange) as its consumer would, so that messages can wait there before it runs."""
    with pika.BlockingConnection(amqp_parameters()) as connection:
        declare_consumer_queue(connection.channel(), names.exchange, names.queue, bindings)


def publish(exchange: str, messages: Iterable[Pulse | tuple[str, bytes]]) -> int:
    """Publish pulses or (routing key, body) pairs straight to ``exchange``, persistent; return how many.

    Without publisher confirms (they would make a backlog of tens of thousands take a
    minute): the caller waits for the queue depth instead.
    """
    count = 0
    with pika.BlockingConnection(amqp_parameters()) as connection:
        channel = connection.channel()
        props = pika.BasicProperties(delivery_mode=2, content_type=CONTENT_TYPE)
        for message in messages:
            key, body = (message.routing_key, encode(message)) if isinstance(message, Pulse) else message
            channel.basic_publish(exchange, key, body, props)
            count += 1
    return count


class MqttWatcher:
    """Subscribes to a topic filter and remembers the latest payload of every topic, and the history."""

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
        try:
            wait_until(lambda: topic in self.values and predicate(self.values[topic]), timeout,
                       f"{topic} to satisfy the condition")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc} (last value {self.values.get(topic)!r})") from None
        return self.values[topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def clear_retained(prefix: str) -> None:
    """Remove the retained topics under ``prefix`` so that the broker does not accumulate them."""
    watcher = MqttWatcher(f"{prefix}/#")
    time.sleep(0.3)
    for topic in list(watcher.values):
        watcher.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    watcher.close()


def pulses(count: int, *, epoch: str = "feed", interval_s: float = 1.0, channel: str = "active") -> list[Pulse]:
    """``count`` consecutive 1 Wh pulses of meter main ending now (3.6 kW at the default interval)."""
    end = time.time_ns()
    step = round(interval_s * 1e9)
    return [Pulse("main", channel, epoch, seq, end - (count - seq) * step, 1.0) for seq in range(1, count + 1)]


def saved_total_uwh(state_dir: Path, channel: str = "active", meter: str = "main") -> int | None:
    """The total an ``emdc writer`` persisted in ``state_dir``, in µWh; None before its first save.

    Read-only, straight from the database: a writer may be saving meanwhile.
    """
    path = state_dir / "energy_state.sqlite3"
    if not path.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as conn:
            row = conn.execute("SELECT state FROM channels WHERE meter = ? AND channel = ?",
                               (meter, channel)).fetchone()
    except sqlite3.OperationalError:  # created, but no table yet
        return None
    return None if row is None else int(json.loads(row[0])["total_uwh"])
