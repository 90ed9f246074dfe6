"""Commands that talk to RabbitMQ fail in one line naming the broker (never its password) and the reason."""

from __future__ import annotations

import importlib.util

import pytest

from tests.support import AMQP_URL, free_port, run_emdc

COMMANDS = [["dead-letters", "list"], ["dead-letters", "readmit"],
            ["state", "set-total", "--meter", "main", "--channel", "active", "--kwh", "1", "--new-meter"]]


@pytest.mark.parametrize("args", COMMANDS)
@pytest.mark.parametrize(("host", "why", "fix"), [
    ("127.0.0.1", "refused the connection", "start RabbitMQ, or correct the host and port in amqp_url"),
    ("nonexistent.invalid", "the host name 'nonexistent.invalid' does not resolve", "correct the host in amqp_url"),
])
def test_an_unreachable_broker_is_one_line_with_its_address_the_reason_and_the_fix(tmp_path, args: list[str],
                                                                                   host: str, why: str,
                                                                                   fix: str) -> None:
    url = f"amqp://guest:Secret123@{host}:{free_port()}/%2F"
    result = run_emdc(args, {"EMDC_AMQP_URL": url, "EMDC_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
                      check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: RabbitMQ at amqp://guest:***@{host}:") and why in lines[0], lines[0]
    assert f". Fix: {fix}" in lines[0], lines[0]
    assert "Secret123" not in result.stderr + result.stdout


@pytest.mark.parametrize("args", COMMANDS)
def test_a_wrong_password_is_one_line_naming_the_user_and_the_fix(brokers: None, tmp_path, args: list[str]) -> None:
    url = AMQP_URL.replace("guest:guest@", "guest:not-the-password@")  # the real RabbitMQ, a wrong password
    assert url != AMQP_URL
    env = {"EMDC_AMQP_URL": url, "EMDC_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = run_emdc(args, env, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "authentication failed: " in lines[0] and "refused user 'guest' and its password. Fix: correct the " \
        "user and password in amqp_url" in lines[0], lines[0]
    assert "not-the-password" not in result.stderr and "ConnectionClosedByBroker" not in result.stderr


def test_set_total_refuses_a_meter_the_writer_does_not_know_unless_told_it_is_new(tmp_path) -> None:
    env = {"EMDC_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F", "EMDC_STATE_DIR": str(tmp_path),
           "PATH": "/usr/bin:/bin"}
    args = ["state", "set-total", "--meter", "mian", "--channel", "active", "--kwh", "1"]
    refused = run_emdc(args, env, check=False)
    assert refused.returncode == 2
    assert "'mian' is not a meter the writer knows (main); to calibrate a new meter on purpose, add --new-meter" \
        in refused.stderr
    on_purpose = run_emdc([*args, "--new-meter"], env, check=False)
    assert on_purpose.returncode == 1 and "RabbitMQ at" in on_purpose.stderr  # past the check, to the broker


@pytest.mark.parametrize(("factory", "message"), [
    ("nonsense", "no GPIO access here (Unable to find pin factory 'nonsense'): on a Raspberry Pi install lgpio"),
    pytest.param("lgpio", "the GPIO library is missing (No module named 'lgpio'): on a Raspberry Pi install it",
                 marks=pytest.mark.skipif(importlib.util.find_spec("lgpio") is not None, reason="lgpio is here")),
])
def test_edge_run_without_usable_gpio_is_one_line_and_a_status_systemd_does_not_restart(tmp_path, factory: str,
                                                                                        message: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "EMDC_STATE_DIR": str(tmp_path), "GPIOZERO_PIN_FACTORY": factory}
    result = run_emdc(["edge", "run"], env, check=False)
    assert result.returncode == 78, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {message}"), result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr


def test_a_bad_setting_is_a_configuration_error_too() -> None:
    result = run_emdc(["edge", "run"], {"PATH": "/usr/bin:/bin", "EMDC_ACTIVE_PIN": "99"}, check=False)
    assert result.returncode == 78
    assert result.stderr.strip() == ("Error: configuration: active_pin must be a BCM GPIO number from 0 to 27 "
                                     "(GPIO17 is header pin 11), got 99")


@pytest.mark.parametrize("command", [["writer"], ["db-writer"], ["edge", "run"],
                                     ["edge", "simulate", "--count", "5"], ["simulate", "--count", "5"]])
def test_a_state_dir_under_a_file_is_one_line_naming_the_setting(tmp_path, command: list[str]) -> None:
    (tmp_path / "a-file").write_text("")
    env = {"PATH": "/usr/bin:/bin", "EMDC_STATE_DIR": str(tmp_path / "a-file" / "state")}
    result = run_emdc(command, env, check=False)
    assert result.returncode == 78
    assert result.stderr.strip() == (f"Error: state_dir {tmp_path / 'a-file' / 'state'} cannot be created "
                                     "(Not a directory: a part of the path is a file)")


@pytest.mark.parametrize(("env", "error", "cause"), [
    ({"GPIOZERO_PIN_FACTORY": "nonsense"}, "Error: no GPIO access here", "BadPinFactory"),
    ({"EMDC_ACTIVE_PIN": "99"}, "Error: configuration: active_pin must be a BCM GPIO number", "ConfigError"),
    ({"EMDC_AMQP_URL": "amqp://edge:S3cretPw/"}, "Error: configuration: amqp_url is not a valid URL", "ConfigError"),
])
@pytest.mark.parametrize("debug", [["--log-level", "debug"], [], "EMDC_LOG_LEVEL"])
def test_a_start_up_failure_shows_its_traceback_only_at_debug_and_never_a_secret(tmp_path, env: dict[str, str],
                                                                                 error: str, cause: str,
                                                                                 debug: list[str] | str) -> None:
    env = {"PATH": "/usr/bin:/bin", "EMDC_STATE_DIR": str(tmp_path), **env}
    if debug == "EMDC_LOG_LEVEL":
        env, debug = {**env, "EMDC_LOG_LEVEL": "DEBUG"}, []
    result = run_emdc([*debug, "edge", "run"], env, check=False)
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(error), result.stderr
    if "EMDC_LOG_LEVEL" in env or debug:
        assert "Traceback (most recent call last)" in result.stderr and cause in result.stderr, result.stderr
    else:
        assert len(lines) == 1, result.stderr
    assert "S3cretPw" not in result.stderr
