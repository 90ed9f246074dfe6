"""Truthful when the Pi is silent: the real `emdc edge run` (mock pin, a meter pulsing it) and the real writer.

A Pi killed with SIGKILL, alive with its broker link cut, or behind a network
gone silent (nothing passes, nothing is refused), stops being heard:
within the edge timeout the writer says ``offline`` on the meter's edge topic,
which the rate sensors' availability includes, while the totals keep their
exact last value. When the Pi is back its backlog is counted exactly and the
edge is ``online`` again. The diagnostics follow the real edge's state: the
first status after an outage shows the outbox the outage left and the pulses
the writer has not counted yet. The writer's own health (its RabbitMQ link,
its dead letters of the last hour) is published beside them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from tests.support import (
    EmdcProcess,
    MeteredEdge,
    MqttWatcher,
    Names,
    TcpProxy,
    amqp_parameters,
    amqp_url_at,
    publish,
    saved_total_uwh,
    start_writer,
    wait_until,
)

pytestmark = pytest.mark.slow
TIMEOUT_S = 3


def writer_with_discovery(spawn, names: Names) -> EmdcProcess:  # type: ignore[no-untyped-def]
    env = names.writer_env(EMDC_DISCOVERY="device", EMDC_DISCOVERY_PREFIX=f"{names.prefix}/ha",
                           EMDC_HA_STATUS_TOPIC=f"{names.prefix}/ha/status", EMDC_EDGE_TIMEOUT_S=TIMEOUT_S)
    return start_writer(spawn, names, env)


@pytest.fixture
def edge(names: Names, tmp_path: Path) -> Iterator[MeteredEdge]:
    metered = MeteredEdge(names, tmp_path / "meter", rate=10, EMDC_STATUS_INTERVAL_S=1)
    yield metered
    metered.end()


def total_topic(names: Names) -> str:
    return f"{names.prefix}/active_energy"


def edge_is(watch: MqttWatcher, names: Names, state: str) -> None:
    watch.wait_for(f"{names.prefix}/edge", lambda v: v == state, timeout=30)


def count_exactly(edge: MeteredEdge, names: Names, watch: MqttWatcher) -> int:
    """Let the meter pulse a few times more, stop it; wait until the writer saved and published every pulse it
    produced; return how many."""
    before = edge.produced()
    wait_until(lambda: edge.produced() >= before + 5, 30, "the meter to pulse")
    produced = edge.meter_off()
    wait_until(lambda: saved_total_uwh(names.writer_dir) == produced * 10**6, 60, "every pulse at the writer")
    watch.wait_for(total_topic(names), lambda v: Decimal(v) == Decimal(produced) / 1000)
    return produced


def diagnostics(watch: MqttWatcher, names: Names) -> list[dict]:
    topic = f"{names.prefix}/edge_status"
    return [json.loads(payload) for t, payload, _ in list(watch.history) if t == topic and payload]


def test_a_killed_edge_makes_the_rates_unavailable_and_the_totals_stay(names: Names, watch: MqttWatcher,
                                                                        spawn, edge: MeteredEdge) -> None:
    writer = writer_with_discovery(spawn, names)
    edge.start()
    edge.meter_on()
    edge_is(watch, names, "online")
    config = json.loads(watch.wait_for(f"{names.prefix}/ha/device/emdc_main/config", lambda v: "edge_pending" in v))
    rate, total = config["components"]["active_power"], config["components"]["active_energy"]
    assert {"topic": f"{names.prefix}/edge"} in rate["availability"] and rate["availability_mode"] == "all"
    assert total["availability"] == [{"topic": f"{names.prefix}/status"}]
    assert config["components"]["edge_connectivity"]["entity_category"] == "diagnostic"
    first = count_exactly(edge, names, watch)

    edge.proc.kill()
    edge.proc.wait()
    edge_is(watch, names, "offline")
    assert "meter main: edge offline (nothing for" in writer.log()
    assert Decimal(watch.values[total_topic(names)]) == Decimal(first) / 1000  # the total keeps its exact value

    edge.start()
    edge.meter_on()
    edge_is(watch, names, "online")
    produced = count_exactly(edge, names, watch)
    assert produced > first
    wait_until(lambda: "meter main: edge back" in writer.log(), 30, "the writer to log the edge back")
    assert diagnostics(watch, names)[-1]["version"]


def test_an_edge_cut_off_from_rabbitmq_goes_offline_and_reports_its_backlog_when_back(
        names: Names, watch: MqttWatcher, spawn, tmp_path: Path) -> None:
    writer = writer_with_discovery(spawn, names)
    proxy = TcpProxy(amqp_parameters().port).start()
    edge = MeteredEdge(names, tmp_path / "meter", rate=10, EMDC_STATUS_INTERVAL_S=1,
                       EMDC_AMQP_URL=amqp_url_at(proxy.port))
    try:
        edge.start()
        edge.meter_on()
        edge_is(watch, names, "online")
        first = count_exactly(edge, names, watch)
        assert diagnostics(watch, names)[-1]["outbox"] == 0

        proxy.stop()
        edge.meter_on()  # the Pi counts on into its outbox
        edge_is(watch, names, "offline")
        assert Decimal(watch.values[total_topic(names)]) == Decimal(first) / 1000
        held = edge.meter_off()
        assert edge.proc.poll() is None  # alive all along: only its link was cut
        seen = len(diagnostics(watch, names))

        proxy = TcpProxy(amqp_parameters().port, port=proxy.port).start()
        edge_is(watch, names, "online")
        wait_until(lambda: saved_total_uwh(names.writer_dir) == held * 10**6, 60, "the backlog at the writer")
        after = diagnostics(watch, names)[seen:]
        # The first status after the outage overtakes the backlog: it shows it waiting on the Pi and not
        # counted yet by the writer.
        assert after[0]["outbox"] == held - first and after[0]["pending"] == held - first, after
        wait_until(lambda: diagnostics(watch, names)[-1]["outbox"] == 0, 30, "an empty outbox reported")
        assert "meter main: edge back" in writer.log()
    finally:
        edge.end()
        proxy.stop()


def test_an_edge_behind_a_silent_network_goes_offline_and_its_total_is_exact_when_the_network_is_back(
        names: Names, watch: MqttWatcher, spawn, tmp_path: Path) -> None:
    writer = writer_with_discovery(spawn, names)
    proxy = TcpProxy(amqp_parameters().port).start()
    edge = MeteredEdge(names, tmp_path / "meter", rate=10, EMDC_STATUS_INTERVAL_S=1,
                       EMDC_AMQP_URL=amqp_url_at(proxy.port))
    try:
        edge.start()
        edge.meter_on()
        edge_is(watch, names, "online")
        first = count_exactly(edge, names, watch)

        proxy.partition()  # no reset reaches either side: the edge only learns of it by its heartbeat
        edge.meter_on()
        edge_is(watch, names, "offline")
        assert Decimal(watch.values[total_topic(names)]) == Decimal(first) / 1000
        assert edge.proc.poll() is None
        proxy.heal()
        edge_is(watch, names, "online")
        produced = count_exactly(edge, names, watch)
        assert produced > first
        wait_until(lambda: "meter main: edge back" in writer.log(), 30, "the writer to log the edge back")
    finally:
        edge.end()
        proxy.stop()


def test_the_writer_publishes_its_rabbitmq_link_and_dead_letters_for_home_assistant(
        names: Names, watch: MqttWatcher, spawn) -> None:
    proxy = TcpProxy(amqp_parameters().port).start()
    env = names.writer_env(EMDC_DISCOVERY="device", EMDC_DISCOVERY_PREFIX=f"{names.prefix}/ha",
                           EMDC_AMQP_URL=amqp_url_at(proxy.port))
    health = f"{names.prefix}/writer_health"
    try:
        writer = start_writer(spawn, names, env)
        watch.wait_for(health, lambda v: json.loads(v) == {"rabbitmq": "ON", "dead_letters_hour": 0})
        publish(names.exchange, [("pulse.main.active", b"not a pulse")])
        watch.wait_for(health, lambda v: json.loads(v)["dead_letters_hour"] == 1)

        proxy.stop()
        watch.wait_for(health, lambda v: json.loads(v)["rabbitmq"] == "OFF")
        assert writer.proc.poll() is None
        proxy = TcpProxy(amqp_parameters().port, port=proxy.port).start()
        # The cut may come between the dead letter and its acknowledgement: then the message comes again and is
        # held back once more (a second copy in the dead-letter queue, counted too).
        watch.wait_for(health, lambda v: json.loads(v)["rabbitmq"] == "ON" and json.loads(v)["dead_letters_hour"]
                       in (1, 2), timeout=60)
    finally:
        proxy.stop()


def test_during_a_writer_backlog_the_status_shows_the_pulses_waiting_for_the_writer(
        names: Names, watch: MqttWatcher, spawn, edge: MeteredEdge) -> None:
    # Small batches, so that the backlog takes the writer many batches: statuses are read at once beside them.
    env = names.writer_env(EMDC_DISCOVERY="device", EMDC_DISCOVERY_PREFIX=f"{names.prefix}/ha",
                           EMDC_EDGE_TIMEOUT_S=60, EMDC_BATCH_SIZE=5)
    writer = start_writer(spawn, names, env)
    edge.start()
    edge.meter_on()
    edge_is(watch, names, "online")
    first = count_exactly(edge, names, watch)
    writer.stop()

    edge.meter_on()  # the Pi counts and publishes on; the pulses wait in the writer's queue
    before = edge.produced()
    wait_until(lambda: edge.produced() >= before + 60, 60, "a backlog of pulses")
    backlog = edge.meter_off() - first
    seen = len(diagnostics(watch, names))
    start_writer(spawn, names, env)
    wait_until(lambda: saved_total_uwh(names.writer_dir) == (first + backlog) * 10**6, 60, "the backlog counted")
    pending = [d["pending"] for d in diagnostics(watch, names)[seen:]]
    assert pending and max(pending) >= backlog // 2, pending  # the status overtook the pulses behind it
    wait_until(lambda: diagnostics(watch, names)[-1]["pending"] == 0, 30, "nothing pending once counted")
