"""Two writers on one queue, as happens by mistake (a second container) or on purpose (a standby).

Exactly one counts at a time; a standby says so and takes over when the
active one stops, but only with the state Home Assistant's totals came
from, so the retained total never drops. Real RabbitMQ and Mosquitto.
"""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

import pika

from common.topology import WRITER_BINDINGS, dead_letter_exchange, queue_arguments
from tests.support import (
    MqttWatcher,
    Names,
    amqp_parameters,
    consumers,
    fresh_pulses,
    publish,
    queue_depth,
    run_emdc,
    saved_total_uwh,
    start_writer,
    wait_until,
    writer_env,
)


def count_calibrate_count(names: Names, watch: MqttWatcher, env: dict[str, str], *, kwh: int, after: int) -> None:
    """Count pulses 1-10, calibrate main/active to ``kwh``, count ``after`` more pulses (11 on) on top of it."""
    energy = f"{names.prefix}/active_energy"
    publish(names.exchange, fresh_pulses(1, 10))
    watch.wait_for(energy, lambda v: v == "0.01")
    run_emdc(["state", "set-total", "--meter", "main", "--channel", "active", "--kwh", str(kwh)], env)
    watch.wait_for(energy, lambda v: v == str(kwh))
    time.sleep(0.5)  # the next pulses happen after the reading
    publish(names.exchange, fresh_pulses(11, after))
    watch.wait_for(energy, lambda v: Decimal(v) == kwh + Decimal(after) / 1000)


def unhealthy(env: dict[str, str]) -> str:
    """What ``emdc writer --check`` says when it fails ("" while healthy)."""
    health = run_emdc(["writer", "--check", "--max-age", "3"], env, check=False)
    return health.stderr if health.returncode else ""


def energy_history(watch: MqttWatcher, names: Names) -> list[float]:
    topic = f"{names.prefix}/active_energy"
    return [float(payload) for t, payload, _ in watch.history if t == topic and payload]


def test_writers_with_separate_state_take_turns_and_never_lower_the_total(names: Names, watch: MqttWatcher,
                                                                          spawn, tmp_path: Path) -> None:
    env_a = writer_env(names)
    env_b = {**env_a, "EMDC_STATE_DIR": str(tmp_path / "other-state")}
    energy = f"{names.prefix}/active_energy"
    a = start_writer(spawn, names, env_a)
    b = spawn(["writer"], env_b, "writer-b")
    wait_until(lambda: "standby: another writer is consuming" in b.log(), 30, "the second writer to stand by")
    assert consumers(names.queue) == 1, "a standby must not consume the queue"

    count_calibrate_count(names, watch, env_a, kwh=100, after=10)

    a.kill9()
    wait_until(lambda: "not taking over" in b.log(), 60, "the standby to refuse a state that is not Home Assistant's")
    publish(names.exchange, fresh_pulses(21, 10))
    time.sleep(1)
    assert queue_depth(names.queue) == 10, "the refusing standby must leave the pulses queued"
    assert "--take-over" in b.log()
    health = wait_until(lambda: unhealthy(env_b), 30, "the refusing standby to report itself unhealthy")
    assert "another writer with a separate state dir" in health

    a = start_writer(spawn, names, env_a)
    watch.wait_for(energy, lambda v: v == "100.02")
    history = energy_history(watch, names)
    assert history == sorted(history), f"the retained total dropped: {history}"
    assert saved_total_uwh(Path(env_a["EMDC_STATE_DIR"])) == 100_020_000_000
    assert saved_total_uwh(tmp_path / "other-state") is None, "the standby counted"

    b.stop()
    a.stop()
    assert b.log().count("Traceback") == 0


def test_a_standby_that_stops_leaves_the_active_writer_online(names: Names, watch: MqttWatcher, spawn,
                                                              tmp_path: Path) -> None:
    env_a = writer_env(names)
    a = start_writer(spawn, names, env_a)
    watch.wait_for(f"{names.prefix}/status", lambda v: v == "online")
    b = spawn(["writer"], {**env_a, "EMDC_STATE_DIR": str(tmp_path / "b")}, "writer-b")
    wait_until(lambda: "standby" in b.log(), 30, "the second writer to stand by")
    b.kill9()
    publish(names.exchange, fresh_pulses(1, 3))
    watch.wait_for(f"{names.prefix}/active_energy", lambda v: v == "0.003")
    assert watch.values[f"{names.prefix}/status"] == "online"
    assert [p for t, p, _ in watch.history if t == f"{names.prefix}/status"] == ["online"]
    a.stop()


def test_a_writer_on_the_same_state_takes_over_exactly_with_its_calibration(names: Names, watch: MqttWatcher,
                                                                            spawn) -> None:
    env = writer_env(names)
    energy = f"{names.prefix}/active_energy"
    a = start_writer(spawn, names, env)
    # A second writer on the same files refuses at once, in one line.
    refused = run_emdc(["writer"], env, timeout=60, check=False)
    assert refused.returncode != 0 and "in use by another writer" in refused.stderr
    assert "Traceback" not in refused.stderr

    count_calibrate_count(names, watch, env, kwh=50, after=5)
    a.kill9()
    publish(names.exchange, fresh_pulses(16, 5))
    b = start_writer(spawn, names, env)
    watch.wait_for(energy, lambda v: v == "50.01")
    b.stop()
    assert saved_total_uwh(Path(env["EMDC_STATE_DIR"])) == 50_010_000_000
    history = energy_history(watch, names)
    assert history == sorted(history), f"the retained total dropped: {history}"


def declare_old_queue(names: Names) -> None:
    """The writer queue as an older version declared it: bound, but without single active consumer."""
    with pika.BlockingConnection(amqp_parameters()) as connection:
        channel = connection.channel()
        channel.exchange_declare(names.exchange, "topic", durable=True)
        channel.exchange_declare(dead_letter_exchange(names.exchange), "direct", durable=True)
        old = {k: v for k, v in queue_arguments(names.exchange, names.queue).items()
               if k != "x-single-active-consumer"}
        channel.queue_declare(names.queue, durable=True, arguments=old)
        for key in WRITER_BINDINGS:
            channel.queue_bind(names.queue, names.exchange, key)


def test_a_queue_declared_without_single_active_consumer_is_explained_and_still_counted(names: Names, spawn,
                                                                                        watch: MqttWatcher) -> None:
    declare_old_queue(names)
    writer = start_writer(spawn, names, writer_env(names))
    publish(names.exchange, fresh_pulses(1, 2))
    watch.wait_for(f"{names.prefix}/active_energy", lambda v: v == "0.002")
    writer.stop()
    lines = [line for line in writer.log().splitlines() if "declared by an older version" in line]
    assert len(lines) == 2 and all("emdc queue migrate" in line for line in lines), writer.log()
    assert "x-single-active-consumer" in lines[1] and f"exchange {dead_letter_exchange(names.exchange)}" in lines[0]


def test_queue_migrate_rebuilds_the_queue_keeping_every_message(names: Names, spawn, watch: MqttWatcher) -> None:
    declare_old_queue(names)
    env = writer_env(names)
    publish(names.exchange, fresh_pulses(1, 20))
    wait_until(lambda: queue_depth(names.queue) == 20, 10, "the backlog to queue")
    writer = start_writer(spawn, names, env)
    refused = run_emdc(["queue", "migrate"], env, check=False)
    assert refused.returncode != 0 and "stop its writers first" in refused.stderr
    writer.stop()
    publish(names.exchange, fresh_pulses(21, 5))

    out = run_emdc(["queue", "migrate"], env).stdout
    assert "migrated" in out
    with pika.BlockingConnection(amqp_parameters()) as connection:  # today's arguments are accepted as equal
        connection.channel().queue_declare(names.queue, durable=True,
                                           arguments=queue_arguments(names.exchange, names.queue))
    publish(names.exchange, [*fresh_pulses(26, 5), ("pulse.main.active", b"not a pulse")])
    writer = start_writer(spawn, names, env)
    watch.wait_for(f"{names.prefix}/active_energy", lambda v: v == "0.03")
    wait_until(lambda: queue_depth(f"{names.queue}.dead") == 1, 10, "the bad message to be dead-lettered")
    writer.stop()
    assert "declared by an older version" not in writer.log(), "the queue and the dead-letter exchange are new"
    assert saved_total_uwh(Path(env["EMDC_STATE_DIR"])) == 30_000_000
    assert queue_depth(f"{names.queue}.dead") == 1, "a moved message lost its routing key"


def test_the_active_writer_answers_another_writers_last_will_with_online(names: Names, watch: MqttWatcher,
                                                                       spawn) -> None:
    writer = start_writer(spawn, names, writer_env(names))
    status = f"{names.prefix}/status"
    watch.wait_for(status, lambda v: v == "online")
    # What a writer that lost its lease leaves behind when it dies: its last will.
    watch.client.publish(status, "offline", qos=1, retain=True).wait_for_publish(5)
    wait_until(lambda: [p for t, p, _ in watch.history if t == status][-2:] == ["offline", "online"], 10,
               "the active writer to say online again")
    writer.stop()
    assert watch.values[status] == "offline", "its own stop still says offline"
