"""Helpers the test modules share: plain functions and classes (the fixtures are in conftest.py).

The brokers' addresses, the per-test :class:`Names` and the broker tools come
from :mod:`bench.brokers`, which the benchmark uses too; they are re-exported
here so that a test module imports every helper from this one place.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
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
    "MeteredEdge",
    "MqttWatcher",
    "Names",
    "S",
    "TcpProxy",
    "amqp_parameters",
    "amqp_url_at",
    "cached_directory",
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



# A house's Pi with grid import and export (solar) and a gas meter: the start of an edge's config file, for a test
# to add its water meter to.
HOUSE_INPUTS = """\
meter_id = "house"

[[inputs]]
pin = 17
channel = "active"
type = "s0"
per_pulse = 0.1

[[inputs]]
pin = 27
channel = "export"
type = "s0"
per_pulse = 0.1

[[inputs]]
pin = 22
channel = "gas"
type = "reed"
"""

# What Home Assistant shows for each EMDC sensor, by the end of its unique id: (device class, unit, state class).
SENSOR_CLASSES = {
    "active_energy": ("energy", "kWh", "total_increasing"),
    "active_power": ("power", "kW", "measurement"),
    "reactive_energy": ("reactive_energy", "kvarh", "total_increasing"),
    "reactive_power": ("reactive_power", "kvar", "measurement"),
    "export_energy": ("energy", "kWh", "total_increasing"),
    "export_power": ("power", "kW", "measurement"),
    "gas_volume": ("gas", "m³", "total_increasing"),
    "gas_flow": ("volume_flow_rate", "m³/h", "measurement"),
    "gas_energy": ("energy", "kWh", "total_increasing"),
    "water_volume": ("water", "L", "total_increasing"),
    "water_flow": ("volume_flow_rate", "L/min", "measurement"),
}


def sensor_classes(*sensors: str) -> dict[str, tuple[str, str, str]]:
    """:data:`SENSOR_CLASSES` of ``sensors``."""
    return {sensor: SENSOR_CLASSES[sensor] for sensor in sensors}


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
    """Forwards 127.0.0.1:<port> to ``target``; :meth:`cut` drops every live connection, :meth:`hold_replies`
    holds back what the target sends on the connections open now (until the next cut), :meth:`partition`
    lets nothing through either way, like a network gone silent (no reset, no refusal), until :meth:`heal`.

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
        self._holding: frozenset[socket.socket] = frozenset()
        self._silent = False

    def partition(self) -> None:
        """Nothing passes either way, and a new connection hangs before it reaches the target."""
        self._silent = True

    def heal(self) -> None:
        self._silent = False

    def hold_replies(self) -> None:
        """E.g. RabbitMQ's publisher confirms: the client's messages still arrive, their confirms do not."""
        with self._lock:
            self._holding = frozenset(upstream for _, upstream in self._pairs)

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
        """Cut every connection and refuse new ones (until a new proxy listens on the port)."""
        if self._listener is not None:
            # close() alone does not wake the accept() blocked in another thread: it would still take one more
            # connection. shutdown() does.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        self.cut()

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self._holding = frozenset()
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
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        while self._silent:
            time.sleep(0.05)
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._pairs.append((client, upstream))
            self.connections += 1
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                while source in self._holding:
                    time.sleep(0.05)
                data = source.recv(65536)
                if not data:
                    break
                while self._silent:
                    time.sleep(0.05)
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


# -- cached root file systems (tests/nspawn.py, tests/ha_core.py) ---------------------


def cached_directory(cache: Path, name: str, build: Callable[[Path], None]) -> Path:
    """``cache/name``, built if absent: by ``build(directory)`` into a temporary directory, then renamed, under
    a lock, so a build that fails or another run building the same never leaves a half-built one in place."""
    path = cache / name
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_dir():
            return path
        building = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
        try:
            build(building)
            building.rename(path)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return path


# -- pulses and deliveries ----------------------------------------------------------


def pulse(seq: int, t_s: float | None = None, *, epoch: str = "e1", wh: float = 1.0, meter: str = "main",
          channel: str = "active") -> Pulse:
    """Pulse ``seq`` at ``t_s`` seconds after :data:`T0` (by default at ``seq`` seconds: 3.6 kW at 1 Wh)."""
    return Pulse(meter, channel, epoch, seq, T0 + round((seq if t_s is None else t_s) * S), wh)


_fresh_after_ns = 0  # the latest timestamp fresh_pulses gave


def fresh_pulses(first: int, count: int) -> list[Pulse]:
    """Pulses ``first`` .. ``first + count - 1`` of epoch ``feed``, stamped just before now, 40 ms apart, and
    after every pulse an earlier call stamped: 90 kW at 1 Wh, within the writer's 100 kW limit (which holds
    back pulses that come faster) however quickly the calls follow each other."""
    global _fresh_after_ns
    start = max(time.time_ns() - (count - 1) * 40_000_000, _fresh_after_ns + 40_000_000)
    stamped = [Pulse("main", "active", "feed", seq, start + (seq - first) * 40_000_000, 1.0)
               for seq in range(first, first + count)]
    _fresh_after_ns = stamped[-1].ts_ns
    return stamped


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


# -- a Pi with a meter: the real `emdc edge run` process ---------------------------


class MeteredEdge:
    """One Pi across restarts of its edge: one counter store, one meter (tests/metered_edge.py).

    Each run is ``python -m tests.metered_edge edge run`` with its own log file;
    the meter's files (``meter.on``, ``meter.count``) live in ``directory``, the
    counter store in the edge directory of ``names``. Times are not claimed as
    synchronised (``EMDC_CLOCK_SYNC=unknown``) unless a run asks for ``kernel``.
    """

    def __init__(self, names: Names, directory: Path, rate: float = 10, **env: object) -> None:
        directory.mkdir()
        self.directory = directory
        self.store = names.edge_dir / "edge.sqlite3"
        self.env = names.edge_env(EMDC_TEST_METER_DIR=directory, EMDC_TEST_METER_RATE=rate,
                                  EMDC_CLOCK_SYNC="unknown", **env)
        self.runs: list[tuple[subprocess.Popen[bytes], Path]] = []

    @staticmethod
    def command() -> list[str]:
        return [sys.executable, "-m", "tests.metered_edge", "edge", "run"]

    def start(self, **env: str) -> None:
        """Start the edge; return once its pins and counter store are open."""
        log_path = self.directory / f"edge-{len(self.runs)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(self.command(), env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=ROOT)
        self.runs.append((proc, log_path))
        wait_until(lambda: proc.poll() is not None or "counter store" in self.log(), 30, "the edge to start")
        assert proc.poll() is None, self.log()

    def refused(self, *wrapper: str) -> str:
        """Run the edge (under ``wrapper``) expecting it to refuse to start at once; return its one line."""
        result = subprocess.run([*wrapper, *self.command()], env=self.env, capture_output=True, text=True,
                                timeout=30, cwd=ROOT)
        output = (result.stdout + result.stderr).strip()
        assert result.returncode != 0, output
        assert "Traceback" not in output and len(output.splitlines()) == 1, output
        return output

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.runs[-1][0]

    def log(self, run: int = -1) -> str:
        return self.runs[run][1].read_text(errors="replace")

    def produced(self) -> int:
        """Pulses the meter produced so far, over all runs."""
        path = self.directory / "meter.count"
        return int(path.read_text()) if path.exists() else 0

    def meter_on(self) -> None:
        (self.directory / "meter.on").touch()

    def meter_off(self) -> int:
        """Stop the meter; return the pulses it produced, once the pulse under way (if any) has ended."""
        (self.directory / "meter.on").unlink()
        idle = self.directory / "meter.idle"
        idle.unlink(missing_ok=True)
        if self.runs and self.proc.poll() is None:  # the meter runs in the edge's process
            # It makes the file again only when it finds meter.on gone: then no pulse is under way.
            wait_until(idle.exists, 10, "the meter to stop")
        return self.produced()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def end(self) -> None:
        """End any run a failed test left behind: SIGTERM first (a preloaded libfaketime then cleans up
        its /dev/shm files, which a later process with the same pid would trip over), then SIGKILL."""
        for proc, _ in self.runs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    for name in (f"faketime_shm_{proc.pid}", f"sem.faketime_sem_{proc.pid}"):
                        (Path("/dev/shm") / name).unlink(missing_ok=True)
