"""Healthy means values reach Home Assistant: an unreachable Mosquitto, or one whose ACL drops the writer's
topics, is one log line and an unhealthy --check."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from backend.heartbeat import Heartbeat, HeartbeatStale
from common.message import Pulse
from tests.support import (
    MQTT_HOST,
    Names,
    free_port,
    publish,
    pulses,
    run_emdc,
    saved_total_uwh,
    start_writer,
    wait_until,
    writer_env,
)
from tests.test_deploy import Mosquitto, mosquitto_broker  # noqa: F401  (fixture)


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


@pytest.fixture
def acl_mosquitto(mosquitto_broker: Mosquitto) -> dict[str, str]:  # noqa: F811
    """The writer's MQTT settings for the deployment's Mosquitto: its ACL and password file, on a free port."""
    return {"EMDC_MQTT_HOST": "127.0.0.1", "EMDC_MQTT_PORT": str(mosquitto_broker.port),
            "EMDC_MQTT_USERNAME": "emdc-writer", "EMDC_MQTT_PASSWORD": mosquitto_broker.passwords["emdc-writer"]}


@contextlib.contextmanager
def observed(mqtt_env: dict[str, str], topic: str) -> Iterator[list[str]]:
    """The messages on ``topic`` while the block runs, read with the writer's account."""
    got: list[str] = []
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.username_pw_set(mqtt_env["EMDC_MQTT_USERNAME"], mqtt_env["EMDC_MQTT_PASSWORD"])
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = lambda _c, _u, message: got.append(message.payload.decode())
    client.connect("127.0.0.1", int(mqtt_env["EMDC_MQTT_PORT"]))
    client.loop_start()
    try:
        assert subscribed.wait(10)
        yield got
    finally:
        client.loop_stop()
        client.disconnect()


def test_a_topic_prefix_outside_the_acl_is_one_line_naming_it_and_an_unhealthy_check(names: Names, acl_mosquitto,
                                                                                      spawn) -> None:
    prefix = f"elsewhere/{names.prefix}"  # the ACL gives emdc-writer home/energy/# and homeassistant/#
    env = writer_env(names, EMDC_TOPIC_PREFIX=prefix, **acl_mosquitto)
    writer = start_writer(spawn, names, env)

    def unhealthy() -> subprocess.CompletedProcess[str] | None:
        check = run_emdc(["writer", "--check", "--max-age", "1"], env, check=False)
        return check if check.returncode == 1 and "for that user" in check.stderr else None

    check = wait_until(unhealthy, 60, "the check to turn unhealthy for the ACL")
    assert check.stderr.startswith(f"Error: unhealthy: the MQTT broker 127.0.0.1:{acl_mosquitto['EMDC_MQTT_PORT']} "
                                   f"drops what is published on {prefix}/echo")
    assert f"add 'topic readwrite {prefix}/#' for that user to the ACL" in check.stderr
    assert len(check.stderr.splitlines()) == 1
    assert writer.stop() == 0
    lines = [line for line in writer.log().splitlines() if "drops what is published" in line]
    assert len(lines) == 1, writer.log()


def test_a_topic_prefix_inside_the_acl_is_healthy(names: Names, acl_mosquitto, spawn) -> None:
    prefix = f"home/energy/{names.prefix}"
    env = writer_env(names, EMDC_TOPIC_PREFIX=prefix, **acl_mosquitto)
    writer = start_writer(spawn, names, env)
    with observed(acl_mosquitto, f"{prefix}/active_energy") as energy:
        publish(names.exchange, pulses(1))
        wait_until(lambda: "0.001" in energy, 30, "the total")
    # A fresh channel's 0 goes out only once the writer's scan of the broker, ended by its own echo, came back.
    assert energy[0] == "0" and set(energy[1:]) == {"0.001"}, energy  # it may be re-published after connecting
    check = run_emdc(["writer", "--check", "--max-age", "1"], env)
    assert check.stdout.startswith("healthy: heartbeat") and "(" not in check.stdout
    assert writer.stop() == 0
    assert "drops" not in writer.log() and "lost the MQTT broker" not in writer.log(), writer.log()


def test_ha_remove_says_in_one_line_when_the_acl_or_the_password_stops_it(names: Names, acl_mosquitto) -> None:
    outside = writer_env(names, EMDC_TOPIC_PREFIX=f"elsewhere/{names.prefix}", **acl_mosquitto)
    wrong_password = writer_env(names, **{**acl_mosquitto, "EMDC_MQTT_PASSWORD": "not-the-password"})
    for env, says in [(outside, f"drops what is published on elsewhere/{names.prefix}/echo"),
                      (wrong_password, "refused the connection: Not authorized (check mqtt_username and")]:
        result = run_emdc(["ha", "remove"], env, check=False)
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith(f"Error: the MQTT broker 127.0.0.1:{acl_mosquitto['EMDC_MQTT_PORT']} ")
        assert says in result.stderr


@pytest.mark.parametrize("setting", ["EMDC_TOPIC_PREFIX", "EMDC_DISCOVERY_PREFIX"])
def test_simulate_fails_in_one_line_when_the_acl_drops_its_topics(tmp_path: Path, acl_mosquitto, setting: str) -> None:
    prefix = f"elsewhere/{tmp_path.name}"  # the ACL gives emdc-writer home/energy/# and homeassistant/#
    env = {"PATH": os.environ["PATH"], "EMDC_STATE_DIR": str(tmp_path), setting: prefix, **acl_mosquitto}
    result = run_emdc(["simulate", "--power", "36000", "--count", "10", "--speed", "max"], env, check=False,
                      timeout=90)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: the MQTT broker 127.0.0.1:{acl_mosquitto['EMDC_MQTT_PORT']} drops what is "
                           f"published on {prefix}/echo"), result.stderr
    assert last.endswith("the simulated values never reached it") and f"{setting[5:].lower()} '{prefix}'" in last
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_discovery_prefix_outside_the_acl_is_an_unhealthy_check_naming_it(names: Names, acl_mosquitto,
                                                                           spawn) -> None:
    prefix = f"elsewhere/{names.prefix}"  # no device would ever appear in Home Assistant
    env = writer_env(names, EMDC_TOPIC_PREFIX=f"home/energy/{names.prefix}", EMDC_DISCOVERY="device",
                     EMDC_DISCOVERY_PREFIX=prefix, **acl_mosquitto)
    writer = start_writer(spawn, names, env)

    def unhealthy() -> subprocess.CompletedProcess[str] | None:
        check = run_emdc(["writer", "--check", "--max-age", "1"], env, check=False)
        return check if check.returncode == 1 and "for that user" in check.stderr else None

    check = wait_until(unhealthy, 20, "the check to turn unhealthy for the ACL")
    assert check.stderr.startswith(f"Error: unhealthy: the MQTT broker 127.0.0.1:{acl_mosquitto['EMDC_MQTT_PORT']} "
                                   f"drops what is published on {prefix}/echo")
    assert f"discovery_prefix '{prefix}'" in check.stderr and len(check.stderr.splitlines()) == 1
    assert writer.stop() == 0


def test_simulate_with_its_topics_inside_the_acl_succeeds(tmp_path: Path, acl_mosquitto) -> None:
    env = {"PATH": os.environ["PATH"], "EMDC_STATE_DIR": str(tmp_path),
           "EMDC_TOPIC_PREFIX": f"home/energy/{tmp_path.name}", **acl_mosquitto}
    result = run_emdc(["simulate", "--power", "36000", "--count", "10", "--speed", "max"], env, timeout=90)
    assert f"home/energy/{tmp_path.name}/active_energy = 0.01" in result.stdout.splitlines()
