"""End to end on the real RabbitMQ and Mosquitto: `emdc writer` + `emdc edge simulate`."""

from __future__ import annotations

import pytest

from tests.support import (
    MqttWatcher,
    Names,
    queue_depth,
    run_emdc,
    saved_total_uwh,
    start_writer,
    wait_until,
    writer_env,
)

SIM_300 = ["edge", "simulate", "--power", "3000", "--count", "300", "--speed", "max"]


def test_300_pulses_at_3kw_give_exactly_0_3_kwh_and_3_kw(names: Names, watch: MqttWatcher, spawn) -> None:
    writer = start_writer(spawn, names, writer_env(names))
    run_emdc(SIM_300, names.edge_env())

    assert watch.wait_for(f"{names.prefix}/active_energy", lambda v: v == "0.3") == "0.3"
    # Power goes out at most once a second per channel: the present value follows the backlog's soon after.
    power = float(watch.wait_for(f"{names.prefix}/active_power", lambda v: float(v) > 0, timeout=10))
    assert power == pytest.approx(3.0, rel=0.02)
    assert writer.stop() == 0, writer.log()
    assert "writer stopped" in writer.log()


def test_state_show_prints_the_persisted_total(names: Names, watch: MqttWatcher, spawn) -> None:
    writer = start_writer(spawn, names, writer_env(names))
    run_emdc([*SIM_300[:-4], "--count", "25", "--speed", "max"], names.edge_env())
    watch.wait_for(f"{names.prefix}/active_energy", lambda v: v == "0.025")
    writer.stop()

    shown = run_emdc(["state", "show"], writer_env(names)).stdout
    assert "main" in shown and "active" in shown and "0.025 kWh" in shown
    assert saved_total_uwh(names.writer_dir) == 25_000_000


def test_restarting_writer_and_edge_never_loses_or_repeats_a_pulse(names: Names, watch: MqttWatcher,
                                                                    spawn) -> None:
    topic = f"{names.prefix}/active_energy"
    writer = start_writer(spawn, names, writer_env(names))
    # 54 kW: 150 pulses in 10 s, so that the second run, which may not stamp ahead of now, waits 10 s at most.
    run_emdc(["edge", "simulate", "--power", "54000", "--count", "150", "--speed", "max"], names.edge_env())
    watch.wait_for(topic, lambda v: v == "0.15")
    assert writer.stop() == 0

    # The edge runs again while the writer is down: pulses wait in the (durable) queue.
    # Without statuses, so that the queue holds the pulses alone.
    run_emdc(["edge", "simulate", "--power", "54000", "--count", "150", "--speed", "max"],
             names.edge_env(EMDC_STATUS_INTERVAL_S=0))
    assert queue_depth(names.queue) == 150

    writer = start_writer(spawn, names, writer_env(names))
    assert watch.wait_for(topic, lambda v: v == "0.3") == "0.3"
    wait_until(lambda: queue_depth(names.queue) == 0, 10, "the queue to drain")
    # The edge's counter continued from 150: the second run's pulses are 151..300, none repeated.
    status = run_emdc(["edge", "status"], names.edge_env()).stdout
    assert "counter main/active: 300 pulses" in status
    assert "outbox: 0 pulses" in status
    assert writer.stop() == 0


def test_writer_refuses_a_corrupt_state_file_with_one_clear_line(names: Names) -> None:
    names.writer_dir.mkdir(parents=True)
    (names.writer_dir / "energy_state.json").write_text('{"format": 1, "state": {"meters": {"main": ')
    result = run_emdc(["writer"], writer_env(names), timeout=30, check=False)
    assert result.returncode != 0
    assert "corrupt" in result.stderr and "refusing to start from zero" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_setting_fails_at_start_with_one_line(names: Names) -> None:
    result = run_emdc(["writer"], names.env(EMDC_MQTT_PORT="eighty"), timeout=30, check=False)
    assert result.returncode != 0
    assert result.stderr.strip() == "Error: configuration: EMDC_MQTT_PORT: expected int, got 'eighty'"
