"""Fault injection against the real brokers: nothing lost, nothing counted twice.

Each test breaks something for real (kill -9, cut TCP connections, an
unreachable or restarted broker, poison messages) and then checks the exact
totals, an empty queue, and the dead-letter queue.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pika
import pytest

from backend.ledger import Ledger
from backend.state_store import StateStore
from common.message import Pulse, encode
from common.topology import ERROR_HEADER, dead_letter_queue
from tests.support import (
    MqttWatcher,
    Names,
    TcpProxy,
    amqp_parameters,
    amqp_url_at,
    consumers,
    declare_queue,
    free_port,
    port_open,
    publish,
    pulses,
    queue_depth,
    run_emdc,
    saved_total_uwh,
    start_writer,
    wait_until,
    writer_env,
)

pytestmark = pytest.mark.slow
AMQP_PORT = amqp_parameters().port


def test_kill_9_while_draining_a_20000_pulse_backlog_keeps_totals_exact(names: Names, spawn) -> None:
    declare_queue(names)
    backlog = pulses(24_000)
    publish(names.exchange, backlog)
    wait_until(lambda: queue_depth(names.queue) == 24_000, 30, "the backlog to be queued")

    rng = random.Random(7)
    kills = 0
    while kills < 5:
        before = queue_depth(names.queue)
        assert before > 0, f"the backlog drained after only {kills} kills; make it larger"
        writer = spawn(["writer"], writer_env(names, EMDC_BATCH_SIZE=200), "writer")
        # Kill at a random moment once it is visibly draining.
        wait_until(lambda b=before: queue_depth(names.queue) < b, 30, "the writer to start draining",
                   interval=0.01)
        time.sleep(rng.uniform(0, 0.15))
        writer.kill9()
        kills += 1

    writer = start_writer(spawn, names, writer_env(names))
    wait_until(lambda: queue_depth(names.queue) == 0, 60, "the queue to drain")
    wait_until(lambda: saved_total_uwh(names.writer_dir) == 24_000 * 10**6, 10, "the exact total")
    assert writer.stop() == 0
    assert saved_total_uwh(names.writer_dir) == 24_000 * 10**6
    assert queue_depth(dead_letter_queue(names.queue)) == 0


def test_kill_9_while_draining_many_meters_of_a_migrated_state_keeps_every_total_exact(names: Names, spawn) -> None:
    # An older version's energy_state.json with 2,000 meters, each 5 Wh; 10 of them then drain a backlog.
    long_ago = time.time_ns() - 7 * 24 * 3600 * 10**9
    old = Ledger(100_000, fixed_wh=True)
    meters = [f"m{i:04d}" for i in range(2000)]
    for meter in meters:
        old.admit(meter, long_ago)
        old.apply(Pulse(meter, "active", "old", 5, long_ago + 5 * 10**9, 1.0), long_ago + 6 * 10**9)
    names.writer_dir.mkdir(parents=True)
    (names.writer_dir / "energy_state.json").write_text(json.dumps({"format": 1, "state": old.to_json()}))
    draining = meters[:10]
    end = time.time_ns()
    backlog = [Pulse(meter, "active", "feed", seq, end - (1000 - seq) * 10**9, 1.0)
               for seq in range(1, 1001) for meter in draining]
    declare_queue(names)
    publish(names.exchange, backlog)
    wait_until(lambda: queue_depth(names.queue) == len(backlog), 30, "the backlog to be queued")

    rng = random.Random(11)
    for kill in range(4):
        before = queue_depth(names.queue)
        assert before > 0, f"the backlog drained after only {kill} kills; make it larger"
        writer = spawn(["writer"], writer_env(names, EMDC_BATCH_SIZE=200), "writer")
        wait_until(lambda b=before: queue_depth(names.queue) < b, 120, "the writer to start draining", interval=0.01)
        time.sleep(rng.uniform(0, 0.15))
        writer.kill9()
        if kill == 0:
            assert "migrated " in writer.log() and "energy_state.json.migrated" in writer.log()

    writer = start_writer(spawn, names, writer_env(names))
    # Counted, not merely delivered: an empty queue can still mean pulses the writer holds unacknowledged.
    wait_until(lambda: all(saved_total_uwh(names.writer_dir, meter=m) == 1005 * 10**6 for m in draining), 120,
               "every draining meter's backlog counted")
    wait_until(lambda: queue_depth(names.queue) == 0, 60, "the queue to drain")
    assert writer.stop() == 0
    saved = StateStore(names.writer_dir).load()
    assert saved is not None
    totals = {meter: channels["active"]["total_uwh"] for meter, channels in saved["meters"].items()}
    assert totals == {meter: (1005 if meter in draining else 5) * 10**6 for meter in meters}
    assert (names.writer_dir / "energy_state.json.migrated").exists()
    assert not (names.writer_dir / "energy_state.json").exists()
    assert queue_depth(dead_letter_queue(names.queue)) == 0


def test_edge_connection_cut_repeatedly_while_publishing_5000_pulses(names: Names, watch: MqttWatcher,
                                                                     spawn) -> None:
    start_writer(spawn, names, writer_env(names))
    proxy = TcpProxy(AMQP_PORT).start()
    edge_env = names.edge_env(EMDC_AMQP_URL=amqp_url_at(proxy.port))
    # Paced to last about 10 s whatever the machine's speed (2 pulses/s simulated, 250 times faster), so that
    # the connection is cut several times while pulses are in flight.
    edge = spawn(["edge", "simulate", "--power", "7200", "--count", "5000", "--speed", "250"], edge_env, "edge")
    seen = 0
    while edge.proc.poll() is None:
        time.sleep(0.3)
        if proxy.connections > seen:  # cut each new connection once it has carried some traffic
            seen = proxy.connections
            proxy.cut()
    assert edge.proc.returncode == 0, edge.log()
    proxy.stop()

    assert watch.wait_for(f"{names.prefix}/active_energy", lambda v: v == "5", timeout=60) == "5"
    assert proxy.cuts >= 5, f"only {proxy.cuts} cuts happened while publishing"
    assert "lost RabbitMQ" in edge.log()
    wait_until(lambda: queue_depth(names.queue) == 0, 10, "the queue to drain")
    assert saved_total_uwh(names.writer_dir) == 5000 * 10**6


def test_writer_connection_cut_repeatedly_while_draining(names: Names, spawn) -> None:
    declare_queue(names)
    publish(names.exchange, pulses(10_000))
    wait_until(lambda: queue_depth(names.queue) == 10_000, 30, "the backlog to be queued")
    proxy = TcpProxy(AMQP_PORT).start()
    env = writer_env(names, EMDC_AMQP_URL=amqp_url_at(proxy.port), EMDC_BATCH_SIZE=100)
    writer = spawn(["writer"], env, "writer")
    seen = 0
    while queue_depth(names.queue) > 0:
        time.sleep(0.2)
        if proxy.connections > seen:
            seen = proxy.connections
            proxy.cut()
    wait_until(lambda: saved_total_uwh(names.writer_dir) == 10_000 * 10**6, 20, "the exact total")
    assert proxy.cuts >= 3
    assert writer.proc.poll() is None, "the writer must survive lost connections"
    assert writer.stop() == 0
    assert saved_total_uwh(names.writer_dir) == 10_000 * 10**6


def test_broker_unreachable_at_edge_start_then_pulses_are_delivered(names: Names, watch: MqttWatcher,
                                                                    spawn) -> None:
    start_writer(spawn, names, writer_env(names))
    port = free_port()
    edge_env = names.edge_env(EMDC_AMQP_URL=amqp_url_at(port))
    edge = spawn(["edge", "simulate", "--power", "3600", "--count", "200", "--speed", "max"], edge_env, "edge")
    time.sleep(3)
    assert edge.proc.poll() is None, "the edge must keep running while the broker is unreachable"
    status = run_emdc(["edge", "status"], edge_env).stdout
    assert "outbox: 200 pulses waiting" in status
    assert "cannot reach RabbitMQ" in status

    proxy = TcpProxy(AMQP_PORT, port=port).start()
    try:
        assert edge.proc.wait(60) == 0, edge.log()
    finally:
        proxy.stop()
    assert watch.wait_for(f"{names.prefix}/active_energy", lambda v: v == "0.2") == "0.2"
    # One log line per state change, not one per retry.
    assert edge.log().count("cannot reach RabbitMQ") == 1, edge.log()


@pytest.fixture
def private_mosquitto(tmp_path: Path):
    """A Mosquitto of our own on a free port, without persistence, that the test may kill."""
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")

    class Broker:
        def __init__(self) -> None:
            self.port = port
            self.proc: subprocess.Popen[bytes] | None = None

        def start(self) -> None:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            wait_until(lambda: port_open("127.0.0.1", port), 10, "mosquitto to listen")

        def kill(self) -> None:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    broker = Broker()
    broker.start()
    yield broker
    if broker.proc and broker.proc.poll() is None:
        broker.kill()


def test_mosquitto_restart_republishes_the_persisted_state(names: Names, private_mosquitto, spawn) -> None:
    env = writer_env(names, EMDC_MQTT_PORT=private_mosquitto.port)
    start_writer(spawn, names, env)
    topic = f"{names.prefix}/active_energy"
    all_pulses = pulses(150)
    publish(names.exchange, all_pulses[:100])
    watcher = MqttWatcher(f"{names.prefix}/#", port=private_mosquitto.port)
    watcher.wait_for(topic, lambda v: v == "0.1")
    watcher.close()

    private_mosquitto.kill()
    # Pulses keep being counted and persisted while MQTT is down.
    publish(names.exchange, all_pulses[100:])
    wait_until(lambda: saved_total_uwh(names.writer_dir) == 150 * 10**6, 20, "the writer to persist")
    private_mosquitto.start()

    # A fresh subscriber sees only what the writer re-published after reconnecting.
    watcher = MqttWatcher(f"{names.prefix}/#", port=private_mosquitto.port)
    try:
        assert watcher.wait_for(topic, lambda v: v == "0.15", timeout=60) == "0.15"
        assert watcher.values[f"{names.prefix}/status"] == "online"
    finally:
        watcher.close()


def malformed_bodies(count: int) -> list[bytes]:
    good = json.loads(encode(Pulse("main", "active", "aa", 1, time.time_ns(), 1.0)))
    variants: list[bytes] = [
        b"", b"not json", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'"pulse"', b"42", b"null",
        b"x" * 5000, json.dumps({**good, "pad": "y" * 10_000}).encode(),
    ]
    for key, bad in [("v", 2), ("v", "1"), ("v", True), ("channel", "apparent"), ("channel", None),
                     ("seq", -1), ("seq", 0), ("seq", "7"), ("seq", 1.5), ("seq", True), ("ts_ns", -5),
                     ("ts_ns", "now"), ("wh", 0), ("wh", -1), ("wh", "1"), ("epoch", "NOT-HEX"),
                     ("meter", "a/b"), ("meter", "")]:
        variants.append(json.dumps({**good, key: bad}).encode())
    for key in good:
        variants.append(json.dumps({k: v for k, v in good.items() if k != key}).encode())
    return [variants[i % len(variants)] for i in range(count)]


def test_1000_malformed_bodies_are_dead_lettered_and_change_nothing(names: Names, spawn) -> None:
    declare_queue(names)
    valid = pulses(2000)
    bad = malformed_bodies(1000)
    messages = [(p.routing_key, encode(p)) for p in valid]
    for i, body in enumerate(bad):
        messages.insert(i * 3 % len(messages), ("pulse.main.active", body))
    publish(names.exchange, messages)
    wait_until(lambda: queue_depth(names.queue) == 3000, 30, "all messages to be queued")

    writer = start_writer(spawn, names, writer_env(names))
    wait_until(lambda: queue_depth(names.queue) == 0, 60, "the queue to drain")
    wait_until(lambda: queue_depth(dead_letter_queue(names.queue)) == 1000, 20, "1000 dead letters")
    assert writer.proc.poll() is None, "the writer must survive poison messages"
    assert saved_total_uwh(names.writer_dir) == 2000 * 10**6

    with pika.BlockingConnection(amqp_parameters()) as connection:
        channel = connection.channel()
        method, properties, body = channel.basic_get(dead_letter_queue(names.queue), auto_ack=False)
        assert method is not None
        assert properties.headers[ERROR_HEADER]
        assert body in bad
    assert writer.stop() == 0


def test_implausible_jump_is_dead_lettered_with_its_reason(names: Names, spawn) -> None:
    declare_queue(names)
    now = time.time_ns()
    first = Pulse("main", "active", "cafe", 1, now - 10**9, 1.0)
    # 1,000 Wh in one second would be 3.6 MW.
    jump = Pulse("main", "active", "cafe", 1001, now, 1.0)
    publish(names.exchange, [first, jump])
    writer = start_writer(spawn, names, writer_env(names))
    wait_until(lambda: queue_depth(dead_letter_queue(names.queue)) == 1, 20, "the dead letter")
    with pika.BlockingConnection(amqp_parameters()) as connection:
        _, properties, _ = connection.channel().basic_get(dead_letter_queue(names.queue), auto_ack=True)
    assert "kW limit" in properties.headers[ERROR_HEADER]
    assert saved_total_uwh(names.writer_dir) == 10**6
    assert "held back message" in writer.log()
    assert writer.stop(signal.SIGINT) == 0


def test_writer_keeps_running_across_a_consumer_cancellation(names: Names, spawn) -> None:
    writer = start_writer(spawn, names, writer_env(names))
    with pika.BlockingConnection(amqp_parameters()) as connection:
        connection.channel().queue_delete(names.queue)  # cancels the writer's consumer
    # The writer re-declares its queue and consumes again.
    wait_until(lambda: consumers(names.queue) > 0, 30, "the writer to consume again")
    publish(names.exchange, pulses(10))
    wait_until(lambda: saved_total_uwh(names.writer_dir) == 10 * 10**6, 20, "the pulses to be counted")
    assert writer.proc.poll() is None


def test_sigterm_finishes_the_work_in_hand_and_exits_0(names: Names, spawn) -> None:
    declare_queue(names)
    publish(names.exchange, pulses(5000))
    wait_until(lambda: queue_depth(names.queue) == 5000, 30, "the backlog to be queued")
    writer = spawn(["writer"], writer_env(names), "writer")
    wait_until(lambda: saved_total_uwh(names.writer_dir), 30, "the first batch to be saved", interval=0.005)
    assert writer.stop(signal.SIGTERM) == 0
    counted = saved_total_uwh(names.writer_dir) // 10**6
    # Everything counted was acknowledged, and everything acknowledged was counted.
    assert 0 < counted < 5000
    assert counted + queue_depth(names.queue) == 5000


def test_dns_failure_at_the_edge_spools_pulses_and_says_so(names: Names, spawn) -> None:
    edge_env = names.edge_env(EMDC_AMQP_URL=amqp_url_at(AMQP_PORT, "broker.invalid"))
    edge = spawn(["edge", "simulate", "--power", "3600", "--count", "20", "--speed", "max"], edge_env, "edge")
    wait_until(lambda: (names.edge_dir / "edge.sqlite3").exists(), 30, "the edge to open its outbox")
    wait_until(lambda: "outbox: 20 pulses waiting" in run_emdc(["edge", "status"], edge_env).stdout, 30,
               "the pulses to be spooled")
    assert edge.proc.poll() is None
    # The publisher notes its failed attempt on its own thread: on a busy machine after the pulses are spooled.
    wait_until(lambda: "cannot reach RabbitMQ" in run_emdc(["edge", "status"], edge_env).stdout, 30,
               "the edge status to say that RabbitMQ cannot be reached")


def test_broker_memory_alarm_blocks_publishing_without_losing_pulses(names: Names, watch: MqttWatcher,
                                                                     spawn) -> None:
    start_writer(spawn, names, writer_env(names))
    edge_env = names.edge_env()
    subprocess.run(["rabbitmqctl", "set_vm_memory_high_watermark", "0"], check=True, capture_output=True)
    try:
        edge = spawn(["edge", "simulate", "--power", "3600", "--count", "100", "--speed", "max"], edge_env, "edge")
        time.sleep(3)
        assert edge.proc.poll() is None, "the edge waits while the broker blocks publishers"
        assert f"{names.prefix}/active_energy" not in watch.values or watch.values[
            f"{names.prefix}/active_energy"] != "0.1"
    finally:
        subprocess.run(["rabbitmqctl", "set_vm_memory_high_watermark", "0.4"], check=True, capture_output=True)
    assert edge.proc.wait(60) == 0, edge.log()
    assert watch.wait_for(f"{names.prefix}/active_energy", lambda v: v == "0.1") == "0.1"
