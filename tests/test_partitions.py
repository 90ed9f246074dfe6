"""Writers sharded by meter: every meter in exactly one partition, each partition a queue of its own with an
active and a standby writer on its own shared state, Home Assistant's availability per partition."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pika
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backend.memory_transport import MemorySink
from backend.service import writer_bindings
from backend.shared_state import SharedStateStore
from backend.writer import EnergyWriter
from bench.brokers import mariadb_databases
from common.config import ConfigError, load_config
from common.message import Pulse
from common.topology import dead_letter_queue, lease_queue, partition_of, partition_queue
from tests.support import MqttWatcher, Names, publish, run_emdc, wait_until, writer_env
from tests.test_shared_state import SERVERS

METERS = ["main", "garage", *(f"flat{i:03d}" for i in range(10))]
meter_ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=64)


@given(st.lists(meter_ids, min_size=1, max_size=30, unique=True), st.integers(2, 8))
def test_every_meter_is_counted_by_exactly_one_partition(meters: list[str], partitions: int) -> None:
    env = {"EMDC_METERS": ",".join(meters), "EMDC_PARTITIONS": str(partitions)}
    counted = [load_config(env={**env, "EMDC_PARTITION": str(k)}).counted_meters() for k in range(partitions)]
    assert sorted(m for part in counted for m in part) == sorted(meters)
    for k, part in enumerate(counted):
        assert all(partition_of(meter, partitions) == k for meter in part)
        bindings = writer_bindings(load_config(env={**env, "EMDC_PARTITION": str(k)}))
        assert {b.split(".")[1] for b in bindings} == set(part), "bound to its own meters only"


def test_without_partitions_the_layout_is_the_single_writers() -> None:
    config = load_config(env={"EMDC_METERS": ",".join(METERS)})
    assert config.counted_meters() == tuple(METERS)
    assert config.writer_queue() == "queue_mqtt_writer" and writer_bindings(config)[0] == "pulse.#"


@pytest.mark.parametrize("env, says", [
    ({"EMDC_PARTITIONS": "2", "EMDC_PARTITION": "2"}, "partition must be 0 .. partitions-1"),
    ({"EMDC_PARTITIONS": "0"}, "partitions 1 .. 1000"),
    ({"EMDC_PARTITIONS": "2", "EMDC_ADMIT_NEW_METERS": "5"}, "admit_new_meters works only without partitions"),
])
def test_a_wrong_partition_setting_is_one_clear_line(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_config(env=env)


def discovered_availability(tmp_path: Path, **env: str) -> set[str]:
    config = load_config(env={"EMDC_STATE_DIR": str(tmp_path), "EMDC_METERS": ",".join(METERS), **env})
    sink = MemorySink()
    writer = EnergyWriter.open(config, sink=sink)
    writer.publish_all()
    writer.store.close()
    configs = [json.loads(payload) for topic, payload in sink.retained.items() if topic.endswith("/config")]
    assert configs, "discovery was published"
    return {c["availability_topic"] for c in configs}


def test_discovery_names_the_availability_topic_of_the_partition_that_counts_the_meter(tmp_path: Path) -> None:
    assert discovered_availability(tmp_path / "single") == {"home/energy/status"}
    for k in (0, 1):
        assert discovered_availability(tmp_path / str(k), EMDC_PARTITIONS="2",
                                       EMDC_PARTITION=str(k)) == {f"home/energy/status/{k}"}


@pytest.fixture
def databases() -> Iterator[list[str]]:
    """One state per partition."""
    with mariadb_databases(2, SERVERS["mariadb"]) as urls:
        yield urls


def wave(first: int, count: int, start_ns: int) -> list[Pulse]:
    """Pulses ``first`` .. of every meter, 1 Wh a second after ``start_ns``."""
    return [Pulse(meter, "active", "feed", seq, start_ns + (seq - first) * 10**9, 1.0)
            for seq in range(first, first + count) for meter in METERS]


def topic(names: Names, meter: str) -> str:
    return f"{names.prefix}/active_energy" if meter == "main" else f"{names.prefix}/{meter}/active_energy"


def test_two_partitions_of_two_writers_count_every_meter_once_whichever_writer_dies(
        names: Names, watch: MqttWatcher, spawn, tmp_path: Path, databases: list[str]) -> None:
    queues = [partition_queue(names.queue, k, 2) for k in (0, 1)]
    try:
        envs = [[{**writer_env(names, EMDC_METERS=",".join(METERS), EMDC_PARTITIONS=2, EMDC_PARTITION=k,
                               EMDC_STATE_URL=databases[k]), "EMDC_STATE_DIR": str(tmp_path / f"state-{k}-{w}")}
                 for w in "ab"] for k in (0, 1)]
        writers = [[spawn(["writer"], envs[k][0], f"writer-{k}a")] for k in (0, 1)]
        for k in (0, 1):
            wait_until(lambda k=k: "active: counting" in writers[k][0].log(), 30, f"partition {k} to count")
            writers[k].append(spawn(["writer"], envs[k][1], f"writer-{k}b"))
            wait_until(lambda k=k: "standby" in writers[k][1].log(), 30, f"partition {k}'s standby")
        start_ns = time.time_ns() - 3600 * 10**9
        publish(names.exchange, wave(1, 10, start_ns))
        for meter in METERS:
            watch.wait_for(topic(names, meter), lambda v: v == "0.01")
        # Calibrations: the broker routes each to the partition counting its meter.
        for meter, k in (("main", 0), ("garage", 1)):
            assert partition_of(meter, 2) == k
            run_emdc(["state", "set-total", "--meter", meter, "--channel", "active", "--kwh", "100"], envs[k][0])
            watch.wait_for(topic(names, meter), lambda v: v == "100")
        time.sleep(0.5)
        later_ns = time.time_ns()  # the next pulses happen after the readings
        writers[0][0].kill9()  # the active writer of partition 0, then the standby of partition 1
        writers[1][1].kill9()
        publish(names.exchange, wave(11, 5, later_ns))
        writers[1][0].kill9()  # and the active one of partition 1: nobody left there until it restarts
        publish(names.exchange, wave(16, 5, later_ns + 5 * 10**9))
        writers[1].append(spawn(["writer"], envs[1][1], "writer-1b-again"))
        for meter in METERS:
            calibrated = meter in ("main", "garage")
            watch.wait_for(topic(names, meter), lambda v, c=calibrated: v == ("100.01" if c else "0.02"), 90)
        for k in (0, 1):
            watch.wait_for(f"{names.prefix}/status/{k}", lambda v: v == "online")
        assert f"{names.prefix}/status" not in watch.values, "no writer uses the single writer's topic"
        for process in (writers[0][1], writers[1][2]):
            assert process.stop() == 0, process.log()
        for meter in METERS:
            history = [Decimal(v) for t, v, _ in watch.history if t == topic(names, meter) and v]
            assert history == sorted(history), f"{meter}: the retained total dropped: {history}"
        saved = [SharedStateStore.open(url).load() or {"meters": {}} for url in databases]
        counted = [set(doc["meters"]) for doc in saved]
        assert counted[0] | counted[1] == set(METERS) and not counted[0] & counted[1], "each meter in one state"
        for k, doc in enumerate(saved):
            for meter, channels in doc["meters"].items():
                expected = 100_010_000_000 if meter in ("main", "garage") else 20_000_000
                assert channels["active"]["total_uwh"] == expected, (k, meter)
        assert "Traceback" not in "".join(p.log() for part in writers for p in part)
    finally:
        with pika.BlockingConnection(pika.URLParameters(names.env()["EMDC_AMQP_URL"])) as connection:
            channel = connection.channel()
            for queue in queues:
                for name in (queue, dead_letter_queue(queue), lease_queue(queue)):
                    channel.queue_delete(name)
