"""Helpers the test modules share: plain functions and classes (the fixtures are in conftest.py).

The brokers' addresses, the per-test :class:`Names` and the broker tools come
from :mod:`bench.brokers`, which the benchmark uses too; they are re-exported
here so that a test module imports every helper from this one place.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions

from backend.batch import Delivery
from bench.brokers import (
    AMQP_URL,
    EMDC,
    MQTT_HOST,
    MQTT_PORT,
    ROOT,
    MqttWatcher,
    Names,
    amqp_parameters,
    clear_retained,
    declare_queue,
    port_open,
    publish,
    pulses,
    saved_total_uwh,
    unreachable_brokers,
    wait_until,
)
from common.message import Pulse, encode

__all__ = [
    "AMQP_URL",
    "EMDC",
    "MQTT_HOST",
    "MQTT_PORT",
    "ROOT",
    "T0",
    "EmdcProcess",
    "MqttWatcher",
    "Names",
    "S",
    "TcpProxy",
    "amqp_parameters",
    "amqp_url_at",
    "clear_retained",
    "consumers",
    "declare_queue",
    "deliveries",
    "free_port",
    "port_open",
    "publish",
    "pulse",
    "pulses",
    "queue_depth",
    "run_emdc",
    "saved_total_uwh",
    "start_writer",
    "unreachable_brokers",
    "wait_until",
    "writer_env",
]

S = 1_000_000_000  # ns per second
T0 = 1_800_000_000 * S  # the moment hand-made pulses count from (:func:`pulse`)


# -- network ----------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the moment of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def amqp_url_at(port: int, host: str = "127.0.0.1") -> str:
    """The test broker's URL (same credentials and vhost) pointed at ``host:port``: a proxy, or nothing at all."""
    parts = urlsplit(AMQP_URL)
    credentials, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{credentials}{at}{host}:{port}"))


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target``; :meth:`cut` drops every live connection.

    Example::

        proxy = TcpProxy(5672)
        proxy.start()
        url = amqp_url_at(proxy.port)
        proxy.cut()
    """

    def __init__(self, target_port: int, port: int = 0, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.cuts = 0
        self.connections = 0
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.cut()

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        if pairs:
            self.cuts += 1

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


# -- RabbitMQ ---------------------------------------------------------------------


def queue_depth(queue: str) -> int:
    """Messages ready in ``queue`` (not those a consumer holds unacknowledged)."""
    with pika.BlockingConnection(amqp_parameters()) as connection:
        return connection.channel().queue_declare(queue, passive=True).method.message_count


def consumers(queue: str) -> int:
    """Consumers of ``queue``; 0 if it does not exist."""
    with pika.BlockingConnection(amqp_parameters()) as connection:
        try:
            return connection.channel().queue_declare(queue, passive=True).method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return 0


# -- pulses and deliveries ----------------------------------------------------------


def pulse(seq: int, t_s: float | None = None, *, epoch: str = "e1", wh: float = 1.0, meter: str = "main",
          channel: str = "active") -> Pulse:
    """Pulse ``seq`` at ``t_s`` seconds after :data:`T0` (by default at ``seq`` seconds: 3.6 kW at 1 Wh)."""
    return Pulse(meter, channel, epoch, seq, T0 + round((seq if t_s is None else t_s) * S), wh)


def deliveries(*items: Pulse | bytes) -> list[Delivery]:
    """A batch as a transport hands it to a handler, tags from 1; raw bodies go to ``pulse.main.active``."""
    return [Delivery(i, item.routing_key if isinstance(item, Pulse) else "pulse.main.active",
                     encode(item) if isinstance(item, Pulse) else item) for i, item in enumerate(items, 1)]


# -- running emdc ---------------------------------------------------------------------


def writer_env(names: Names, **extra: object) -> dict[str, str]:
    """An ``emdc writer``'s environment for exact checks on its values."""
    # A long refresh keeps the idle-power decay (tested on its own) out of these exact checks.
    return names.writer_env(EMDC_POWER_REFRESH_S=3600, **extra)


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


def run_emdc(args: list[str], env: dict[str, str], timeout: float = 120,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `emdc ...` to completion; with ``check``, fail with its output unless it exits 0."""
    result = subprocess.run([*EMDC, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check:
        assert result.returncode == 0, f"emdc {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
    return result
