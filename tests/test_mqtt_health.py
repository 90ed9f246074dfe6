"""Healthy means values reach Home Assistant: an unreachable Mosquitto is one log line and an unhealthy --check."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from backend.heartbeat import Heartbeat, HeartbeatStale
from common.message import Pulse
from tests.support import (
    MQTT_HOST,
    Names,
    free_port,
    publish,
    run_emdc,
    saved_total_uwh,
    start_writer,
    wait_until,
    writer_env,
)


def test_a_writer_without_mosquitto_counts_logs_it_once_and_turns_unhealthy(names: Names, spawn) -> None:
    port = free_port()
    env = writer_env(names, EMDC_MQTT_PORT=port)
    writer = start_writer(spawn, names, env)
    now = time.time_ns()
    publish(names.exchange, [Pulse("main", "active", "e1", seq, now - (3 - seq) * 10**9, 1.0) for seq in (1, 2, 3)])
    wait_until(lambda: saved_total_uwh(names.writer_dir) == 3_000_000, 20, "the pulses counted")
    healthy = run_emdc(["writer", "--check", "--max-age", "30"], env)
    assert "healthy" in healthy.stdout and f"cannot reach the MQTT broker {MQTT_HOST}:{port}" in healthy.stdout
    time.sleep(3)
    check = run_emdc(["writer", "--check", "--max-age", "2"], env, check=False)
    assert check.returncode == 1
    assert check.stderr.startswith(f"Error: unhealthy: cannot reach the MQTT broker {MQTT_HOST}:{port} "
                                   "(Connection refused), for ")
    assert writer.stop() == 0
    lines = [line for line in writer.log().splitlines() if "MQTT broker" in line]
    assert len(lines) == 1, lines


def test_simulate_fails_when_its_values_never_reach_mqtt(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "EMDC_MQTT_HOST": "127.0.0.1", "EMDC_MQTT_PORT": str(free_port()),
           "EMDC_STATE_DIR": str(tmp_path)}
    result = run_emdc(["simulate", "--count", "10", "--speed", "max"], env, check=False, timeout=90)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith("the simulated values never reached it")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_trouble_turns_the_check_unhealthy_only_once_it_lasts_longer_than_allowed(tmp_path: Path) -> None:
    beat = Heartbeat(tmp_path / "writer.heartbeat")
    beat.note("cannot reach the MQTT broker m:1883 (Connection refused)", since=time.time() - 30)
    beat.touch()
    assert beat.check(60).endswith("(cannot reach the MQTT broker m:1883 (Connection refused), for 30 s)")
    with pytest.raises(HeartbeatStale, match=r"unhealthy: cannot reach the MQTT broker m:1883 .*, for 30 s"):
        beat.check(10)
    beat.note("")
    assert beat.check(10).startswith("healthy: heartbeat")
