"""`emdc doctor`, run as a user runs it: one ✓/✗ line per check, a fix for each ✗, exit 1 if any, no traceback.

Against the real brokers with a good configuration, a wrong password and a
closed port (what each account of the deployment may do is in
tests/test_accounts.py, against its private broker); and Mosquitto with
the deployment's ACL and password file for a topic prefix the ACL does not
allow, which Mosquitto drops without a word.
"""

from __future__ import annotations

import uuid

from tests.support import Names, amqp_url_at, declare_queue, free_port, queue_depth, run_emdc
from tests.test_deploy import Mosquitto, mosquitto_broker  # noqa: F401  (fixtures)


def doctor(env: dict[str, str], *flags: str) -> tuple[int, list[str]]:
    """Run `emdc doctor`; its exit status and its lines, after checking it printed nothing else."""
    result = run_emdc(["doctor", *flags], env, check=False, timeout=90)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line[:2] in {"✓ ", "✗ "} for line in lines), output
    return result.returncode, lines


def failures(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("✗")]


def edge_env(names: Names, **extra: object) -> dict[str, str]:
    return names.edge_env(**{"GPIOZERO_PIN_FACTORY": "mock", "EMDC_CLOCK_SYNC": "unknown", **extra})


def test_a_good_configuration_passes_every_check_and_delivers_nothing(names: Names) -> None:
    declare_queue(names)
    env = edge_env(names, EMDC_REACTIVE_PIN=27, EMDC_DISCOVERY="device", EMDC_DISCOVERY_PREFIX=f"{names.prefix}/ha")
    status, lines = doctor(env, "--edge", "--writer")
    assert status == 0, lines
    assert [line.split(":")[0] for line in lines] == [
        "✓ configuration", "✓ state_dir", "✓ RabbitMQ", "✓ publish pulse.main.active", "✓ publish pulse.main.reactive",
        "✓ publish status.main", "✓ clock", "✓ GPIO17", "✓ GPIO27", f"✓ consume {names.queue}", "✓ MQTT",
        "✓ MQTT topic_prefix", "✓ MQTT discovery_prefix"]
    assert queue_depth(names.queue) == 0  # the publish probes were rolled back


def test_a_wrong_rabbitmq_password_names_authentication(names: Names) -> None:
    env = edge_env(names, EMDC_AMQP_URL=names.env()["EMDC_AMQP_URL"].replace(":guest@", ":Wrong-Secret9@"))
    status, lines = doctor(env, "--edge")
    assert status == 1
    assert failures(lines) == [
        "✗ RabbitMQ: authentication failed: 127.0.0.1:5672 refused user 'guest' and its password "
        "(amqp://guest:***@127.0.0.1:5672/%2F). Fix: correct the user and password in amqp_url (or the file "
        "EMDC_AMQP_URL_FILE names)"]
    assert "Wrong-Secret9" not in "\n".join(lines)


def test_a_closed_port_names_host_and_port_and_refused(names: Names) -> None:
    port = free_port()
    status, lines = doctor(edge_env(names, EMDC_AMQP_URL=amqp_url_at(port)), "--edge")
    assert status == 1
    assert failures(lines) == [
        f"✗ RabbitMQ: 127.0.0.1:{port} refused the connection (amqp://guest:***@127.0.0.1:{port}/%2F). Fix: start "
        "RabbitMQ, or correct the host and port in amqp_url (5672; amqps: 5671)"]


def test_a_misspelt_variable_and_an_unusable_setting_fail(names: Names) -> None:
    status, lines = doctor(edge_env(names, EMDC_MQTT_PROT=1884), "--edge")
    assert status == 1 and failures(lines)[0] == (
        "✗ configuration: environment variable EMDC_MQTT_PROT is not an EMDC setting and is ignored (did you mean "
        "EMDC_MQTT_PORT?). Fix: correct or unset the variable")
    status, lines = doctor(edge_env(names, EMDC_ACTIVE_PIN=99), "--edge")
    assert status == 1 and lines == [
        "✗ configuration: active_pin must be a BCM GPIO number from 0 to 27 (GPIO17 is header pin 11), got 99. "
        "Fix: correct that setting (docs: Configuration)"]


def test_pins_that_cannot_be_opened_say_why(names: Names) -> None:
    declare_queue(names)
    status, lines = doctor(edge_env(names, GPIOZERO_PIN_FACTORY="nonsense"), "--edge")
    assert status == 1
    assert failures(lines) == ["✗ GPIO17: no GPIO access here (Unable to find pin factory 'nonsense'): on a "
                               "Raspberry Pi install lgpio (`sudo apt install python3-lgpio`) and run as a user in "
                               "the gpio group; to try EMDC without a meter, use `emdc edge simulate`"]


def mqtt_env(names: Names, mosquitto: Mosquitto, **extra: object) -> dict[str, str]:
    declare_queue(names)
    return names.writer_env(**{"EMDC_MQTT_PORT": mosquitto.port, "EMDC_MQTT_USERNAME": "emdc-writer",
                               "EMDC_MQTT_PASSWORD": mosquitto.passwords["emdc-writer"], "EMDC_DISCOVERY": "device",
                               **extra})


def test_the_deployment_acl_lets_the_writer_publish_its_prefixes(names: Names,
                                                                 mosquitto_broker: Mosquitto) -> None:  # noqa: F811
    status, lines = doctor(mqtt_env(names, mosquitto_broker, EMDC_TOPIC_PREFIX="home/energy"), "--writer")
    assert status == 0, lines
    assert lines[-3] == f"✓ MQTT: logged in at 127.0.0.1:{mosquitto_broker.port} as emdc-writer"


def test_a_topic_prefix_outside_the_acl_is_named_with_the_acl(names: Names,
                                                             mosquitto_broker: Mosquitto) -> None:  # noqa: F811
    prefix = f"other/{uuid.uuid4().hex[:8]}"
    status, lines = doctor(mqtt_env(names, mosquitto_broker, EMDC_TOPIC_PREFIX=prefix), "--writer")
    assert status == 1
    [line] = failures(lines)
    assert line.startswith("✗ MQTT topic_prefix: a message published to ") and "did not come back" in line, line
    assert f"{prefix}/emdc-doctor/" in line
    assert line.endswith(f"Fix: allow user emdc-writer `topic readwrite {prefix}/#` in Mosquitto's ACL "
                         "(deploy/compose/mosquitto/config/acl), or set topic_prefix to a prefix the ACL allows")
    assert lines[-1].startswith("✓ MQTT discovery_prefix: published to homeassistant/emdc-doctor/")


def test_a_wrong_mqtt_password_is_refused_by_name(names: Names, mosquitto_broker: Mosquitto) -> None:  # noqa: F811
    env = mqtt_env(names, mosquitto_broker, EMDC_MQTT_PASSWORD="not-the-password")
    status, lines = doctor(env, "--writer")
    assert status == 1
    assert failures(lines) == [
        f"✗ MQTT: 127.0.0.1:{mosquitto_broker.port} refused user emdc-writer (Not authorized). Fix: correct "
        "mqtt_username and mqtt_password (the broker's password file must list the user)"]


def test_without_a_flag_a_server_installation_checks_the_writer(names: Names) -> None:
    declare_queue(names)
    status, lines = doctor(names.writer_env())  # this test environment has paho-mqtt: a server's installation
    assert status == 0, lines
    assert f"✓ consume {names.queue}" in "\n".join(lines) and "publish pulse" not in "\n".join(lines)


def test_a_check_that_fails_itself_is_a_failed_line_not_a_traceback() -> None:
    from common.doctor import good, results

    def pins() -> None:
        raise RuntimeError("no board")

    lines = [check.line() for check in results([lambda: good("clock", "synchronised"), pins, lambda: None])]
    assert lines == ["✓ clock: synchronised",
                     "✗ pins: the check itself failed (RuntimeError: no board). Fix: run `emdc --log-level debug "
                     "doctor` for the details"]
