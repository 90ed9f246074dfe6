"""End to end on the real RabbitMQ and Mosquitto: `emdc writer` + `emdc edge simulate`."""

from __future__ import annotations

import json

import pytest

from tests.conftest import MqttWatcher, Names, queue_depth, run_emdc, start_writer, wait_until

SIM_300 = ["edge", "simulate", "--power", "3000", "--count", "300", "--speed", "max"]


def writer_env(names: Names, **extra: object) -> dict[str, str]:
    # A long refresh keeps the idle-power decay (tested on its own) out of these exact checks.
    return names.env(EMDC_STATE_DIR=names.writer_dir, EMDC_POWER_REFRESH_S=3600, **extra)


def edge_env(names: Names) -> dict[str, str]:
    return names.env(EMDC_STATE_DIR=names.edge_dir)


def test_300_pulses_at_3kw_give_exactly_0_3_kwh_and_3_kw(names: Names, watch: MqttWatcher, spawn) -> None:
    writer = start_writer(spawn, names, writer_env(names))
    run_emdc(SIM_300, edge_env(names))

    assert watch.wait_for(f"{names.prefix}/active_energy", lambda v: v == "0.3") == "0.3"
    power = float(watch.wait_for(f"{names.prefix}/active_power", lambda v: True))
    assert power == pytest.approx(3.0, rel=0.02)
    assert writer.stop() == 0, writer.log()
    assert "writer stopped" in writer.log()


def test_state_show_prints_the_persisted_total(names: Names, watch: MqttWatcher, spawn) -> None:
    writer = start_writer(spawn, names, writer_env(names))
    run_emdc([*SIM_300[:-4], "--count", "25", "--speed", "max"], edge_env(names))
    watch.wait_for(f"{names.prefix}/active_energy", lambda v: v == "0.025")
    writer.stop()

    shown = run_emdc(["state", "show"], writer_env(names)).stdout
    assert "main" in shown and "active" in shown and "0.025 kWh" in shown
    saved = json.loads((names.writer_dir / "energy_state.json").read_text())
    assert saved["state"]["meters"]["main"]["active"]["total_uwh"] == 25_000_000


def test_restarting_writer_and_edge_never_loses_or_repeats_a_pulse(names: Names, watch: MqttWatcher,
                                                                    spawn) -> None:
    topic = f"{names.prefix}/active_energy"
    writer = start_writer(spawn, names, writer_env(names))
    run_emdc(["edge", "simulate", "--power", "3000", "--count", "150", "--speed", "max"], edge_env(names))
    watch.wait_for(topic, lambda v: v == "0.15")
    assert writer.stop() == 0

    # The edge runs again while the writer is down: pulses wait in the (durable) queue.
    run_emdc(["edge", "simulate", "--power", "3000", "--count", "150", "--speed", "max"], edge_env(names))
    assert queue_depth(names.queue) == 150

    writer = start_writer(spawn, names, writer_env(names))
    assert watch.wait_for(topic, lambda v: v == "0.3") == "0.3"
    wait_until(lambda: queue_depth(names.queue) == 0, 10, "the queue to drain")
    # The edge's counter continued from 150: the second run's pulses are 151..300, none repeated.
    status = run_emdc(["edge", "status"], edge_env(names)).stdout
    assert "counter main/active: 300 pulses" in status
    assert "outbox: 0 pulses" in status
    assert writer.stop() == 0


def test_writer_refuses_a_corrupt_state_file_with_one_clear_line(names: Names) -> None:
    names.writer_dir.mkdir(parents=True)
    (names.writer_dir / "energy_state.json").write_text('{"format": 1, "state": {"meters": {"main": ')
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "emdc", "writer"], env=writer_env(names),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "corrupt" in result.stderr and "refusing to start from zero" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_setting_fails_at_start_with_one_line(names: Names) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "emdc", "writer"],
                            env=names.env(EMDC_MQTT_PORT="eighty"), capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert result.stderr.strip() == "Error: configuration: EMDC_MQTT_PORT: expected int, got 'eighty'"
