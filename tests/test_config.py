"""common.config: defaults < TOML file < environment < overrides, secrets, validation, redaction."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from common.config import (
    DEFAULT_AMQP_URL,
    Config,
    ConfigError,
    env_name,
    load_config,
    redact_url,
    settings_table,
)


@pytest.fixture
def toml(tmp_path: Path):
    """Write a TOML config file and return its path."""
    def write(text: str, name: str = "emdc.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


@pytest.fixture
def secret_file(tmp_path: Path):
    def write(content: str, name: str = "secret") -> Path:
        path = tmp_path / name
        path.write_text(content)
        return path
    return write


# --- defaults and precedence ----------------------------------------------------------------------

def test_defaults_with_empty_environment():
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.meter_id == "main"
    assert cfg.amqp_url == DEFAULT_AMQP_URL
    assert cfg.mqtt_port == 1883
    assert dict(cfg.sources) == {}


def test_process_environment_is_used_when_env_is_not_given(monkeypatch):
    monkeypatch.delenv("EMDC_CONFIG", raising=False)
    monkeypatch.setenv("EMDC_METER_ID", "from-os-env")
    assert load_config().meter_id == "from-os-env"


def test_toml_file_beats_defaults(toml):
    path = toml('meter_id = "garage"\nmqtt_port = 8883\n')
    cfg = load_config(path, env={})
    assert (cfg.meter_id, cfg.mqtt_port) == ("garage", 8883)
    assert cfg.sources["meter_id"] == f"{path}: meter_id"


def test_environment_beats_toml_file(toml):
    path = toml('meter_id = "garage"\n')
    cfg = load_config(path, env={"EMDC_METER_ID": "shed"})
    assert cfg.meter_id == "shed"
    assert cfg.sources["meter_id"] == "EMDC_METER_ID"


def test_overrides_beat_environment_and_file(toml):
    path = toml("mqtt_port = 1000\n")
    cfg = load_config(path, env={"EMDC_MQTT_PORT": "2000"}, overrides={"mqtt_port": 3000})
    assert cfg.mqtt_port == 3000
    assert cfg.sources["mqtt_port"] == "--mqtt-port"


def test_none_overrides_are_ignored():
    cfg = load_config(env={"EMDC_MQTT_PORT": "2000"}, overrides={"mqtt_port": None, "meter_id": None})
    assert cfg.mqtt_port == 2000
    assert cfg.meter_id == "main"
    assert not cfg.is_set("meter_id")


def test_empty_environment_variable_counts_as_unset(toml):
    path = toml('meter_id = "garage"\n')
    cfg = load_config(path, env={"EMDC_METER_ID": ""})
    assert cfg.meter_id == "garage"


def test_config_path_from_emdc_config_variable(toml):
    path = toml('exchange = "X"\n')
    assert load_config(env={"EMDC_CONFIG": str(path)}).exchange == "X"


def test_explicit_path_beats_emdc_config_variable(toml):
    explicit = toml('exchange = "explicit"\n', "a.toml")
    other = toml('exchange = "variable"\n', "b.toml")
    assert load_config(explicit, env={"EMDC_CONFIG": str(other)}).exchange == "explicit"


# --- TOML tables ----------------------------------------------------------------------------------

def test_table_prefix_forms_the_setting_name(toml):
    cfg = load_config(toml('[mqtt]\nport = 1\nhost = "broker"\n[power]\ntimeout_s = 60.0\n'), env={})
    assert (cfg.mqtt_port, cfg.mqtt_host, cfg.power_timeout_s) == (1, "broker", 60.0)


def test_table_only_groups_when_prefix_is_not_part_of_the_name(toml):
    cfg = load_config(toml("[edge]\nactive_pin = 27\nwh_per_pulse = 0.5\n[mqtt]\nmqtt_keepalive = 30\n"), env={})
    assert (cfg.active_pin, cfg.wh_per_pulse, cfg.mqtt_keepalive) == (27, 0.5, 30)


def test_unknown_key_inside_a_table_is_an_error(toml):
    path = toml("[mqtt]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'prot'") as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


# --- secrets from files ---------------------------------------------------------------------------

def test_secret_from_env_file_variable_is_read_and_stripped(secret_file):
    path = secret_file("s3cret\n")
    cfg = load_config(env={"EMDC_MQTT_PASSWORD_FILE": str(path)})
    assert cfg.mqtt_password == "s3cret"
    assert cfg.sources["mqtt_password"] == "EMDC_MQTT_PASSWORD_FILE"
    assert cfg.is_set("mqtt_password")


def test_secret_from_toml_file_key(toml, secret_file):
    secret = secret_file("  amqp://u:pw@rabbit:5672/%2F \n")
    cfg = load_config(toml(f'amqp_url_file = "{secret}"\n'), env={})
    assert cfg.amqp_url == "amqp://u:pw@rabbit:5672/%2F"


def test_secret_file_key_inside_a_table(toml, secret_file):
    secret = secret_file("pw\n")
    cfg = load_config(toml(f'[mqtt]\npassword_file = "{secret}"\n'), env={})
    assert cfg.mqtt_password == "pw"


def test_env_secret_file_beats_toml_value(toml, secret_file):
    secret = secret_file("from-file")
    cfg = load_config(toml('mqtt_password = "from-toml"\n'), env={"EMDC_MQTT_PASSWORD_FILE": str(secret)})
    assert cfg.mqtt_password == "from-file"


def test_env_value_beats_toml_secret_file(toml, secret_file):
    secret = secret_file("from-file")
    cfg = load_config(toml(f'mqtt_password_file = "{secret}"\n'), env={"EMDC_MQTT_PASSWORD": "from-env"})
    assert cfg.mqtt_password == "from-env"


def test_override_beats_env_secret_file(toml, secret_file):
    secret = secret_file("from-env-file")
    cfg = load_config(toml('mqtt_password = "from-toml"\n'), env={"EMDC_MQTT_PASSWORD_FILE": str(secret)},
                      overrides={"mqtt_password": "from-flag"})
    assert cfg.mqtt_password == "from-flag"


def test_env_value_beats_toml_value_and_toml_secret_file(toml, secret_file):
    secret = secret_file("from-toml-file")
    path = toml(f'mqtt_password = "from-toml"\nmqtt_password_file = "{secret}"\n')
    cfg = load_config(path, env={"EMDC_MQTT_PASSWORD": "from-env"})
    assert cfg.mqtt_password == "from-env"


def test_missing_secret_file_names_the_origin(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"EMDC_MQTT_PASSWORD_FILE: cannot read secret file .*nope"):
        load_config(env={"EMDC_MQTT_PASSWORD_FILE": str(tmp_path / "nope")})


def test_file_variable_for_a_non_secret_is_an_error(secret_file):
    with pytest.raises(ConfigError, match="EMDC_MQTT_HOST_FILE: unknown setting"):
        load_config(env={"EMDC_MQTT_HOST_FILE": str(secret_file("host"))})


# --- errors ---------------------------------------------------------------------------------------

def test_unknown_toml_key_is_an_error_naming_file_and_key(toml):
    path = toml("mqtt_prot = 1\n")
    with pytest.raises(ConfigError, match=rf"{path}: mqtt_prot: unknown setting 'mqtt_prot'"):
        load_config(path, env={})


def test_unknown_override_is_an_error():
    with pytest.raises(ConfigError, match="--no-such: unknown setting 'no_such'"):
        load_config(env={}, overrides={"no_such": 1})


def test_unrelated_environment_variables_are_ignored():
    assert load_config(env={"EMDC_NO_SUCH": "1", "HOME": "/root"}) == Config()


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml", env={})


def test_invalid_toml(toml):
    path = toml("meter_id = \n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path, env={})


@pytest.mark.parametrize(("env", "origin", "kind"), [
    ({"EMDC_MQTT_PORT": "abc"}, "EMDC_MQTT_PORT", "int"),
    ({"EMDC_MQTT_PORT": "1.5"}, "EMDC_MQTT_PORT", "int"),
    ({"EMDC_MAX_POWER_W": "lots"}, "EMDC_MAX_POWER_W", "float"),
    ({"EMDC_MQTT_TLS": "maybe"}, "EMDC_MQTT_TLS", "bool"),
])
def test_bad_environment_types_name_the_variable(env: dict[str, str], origin: str, kind: str):
    with pytest.raises(ConfigError, match=rf"{origin}: expected {kind}"):
        load_config(env=env)


@pytest.mark.parametrize(("line", "kind"), [
    ("mqtt_port = 1.5", "int"),
    ('mqtt_port = "abc"', "int"),
    ('max_power_w = "lots"', "float"),
    ('pull_up = "sometimes"', "bool"),
    ("pull_up = 2", "bool"),
])
def test_bad_toml_types_name_file_and_key(toml, line: str, kind: str):
    path = toml(line + "\n")
    key = line.split()[0]
    with pytest.raises(ConfigError, match=rf"{path}: {key}: expected {kind}"):
        load_config(path, env={})


@pytest.mark.parametrize("line", ["mqtt_port = true", "batch_size = false", 'exchange = ["a", "b"]'])
def test_toml_values_of_the_wrong_kind_are_rejected(toml, line: str):
    with pytest.raises(ConfigError, match="expected"):
        load_config(toml(line + "\n"), env={})


def test_bad_override_type_names_the_flag():
    with pytest.raises(ConfigError, match="--mqtt-port: expected int"):
        load_config(env={}, overrides={"mqtt_port": "x"})


@pytest.mark.parametrize(("text", "expected"), [
    ("1", True), ("true", True), ("Yes", True), (" ON ", True),
    ("0", False), ("FALSE", False), ("no", False), ("off", False),
])
def test_boolean_spellings_from_environment(text: str, expected: bool):
    assert load_config(env={"EMDC_MQTT_TLS": text}).mqtt_tls is expected


def test_numbers_from_environment_and_toml_get_the_setting_type(toml):
    cfg = load_config(toml("max_power_w = 5000\n"), env={"EMDC_MQTT_PORT": "8883"})
    assert cfg.mqtt_port == 8883 and isinstance(cfg.mqtt_port, int)
    assert cfg.max_power_w == 5000.0 and isinstance(cfg.max_power_w, float)


# --- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("meter", ["bad id", "a/b", "x" * 65])
def test_invalid_meter_id(meter: str):
    with pytest.raises(ConfigError, match="meter_id"):
        load_config(env={}, overrides={"meter_id": meter})


def test_meter_id_with_trailing_newline_is_invalid():
    with pytest.raises(ConfigError, match="meter_id"):
        load_config(env={"EMDC_METER_ID": "main\n"})


@pytest.mark.parametrize("url", ["http://u:pw@host/", "rabbit:5672", "mqtt://host"])
def test_amqp_url_scheme_must_be_amqp(url: str):
    with pytest.raises(ConfigError, match="amqp_url must start with amqp:// or amqps://") as info:
        load_config(env={}, overrides={"amqp_url": url})
    assert "pw" not in str(info.value)


def test_amqps_url_is_accepted():
    assert load_config(env={}, overrides={"amqp_url": "amqps://h:5671/"}).amqp_url == "amqps://h:5671/"


POSITIVE = ["mqtt_port", "mqtt_keepalive", "batch_size", "max_power_w", "power_refresh_s", "power_timeout_s",
            "power_smoothing_pulses", "wh_per_pulse", "outbox_max", "publish_window"]


@pytest.mark.parametrize("name", POSITIVE)
@pytest.mark.parametrize("value", [0, -1])
def test_settings_that_must_be_positive(name: str, value: int):
    with pytest.raises(ConfigError, match=rf"{name} must be > 0, got {value}"):
        load_config(env={env_name(name): str(value)})


@pytest.mark.parametrize("value", ["-1", "1001", "nan", "0.5", "1e-310"])
def test_commit_interval_is_0_or_between_1_and_1000_ms(value: str):
    with pytest.raises(ConfigError, match="commit_interval_ms must be 0 or between 1 and 1000"):
        load_config(env={"EMDC_COMMIT_INTERVAL_MS": value})


@pytest.mark.parametrize("value", ["0", "1", "1000"])
def test_commit_interval_bounds_are_allowed(value: str):
    assert load_config(env={"EMDC_COMMIT_INTERVAL_MS": value}).commit_interval_ms == float(value)


@pytest.mark.parametrize("name", ["max_power_w", "power_timeout_s", "wh_per_pulse"])
def test_nan_is_not_a_positive_number(name: str):
    with pytest.raises(ConfigError, match=name):
        load_config(env={env_name(name): "nan"})


@pytest.mark.parametrize("value", ["device", "entity", "off"])
def test_discovery_values(value: str):
    assert load_config(env={"EMDC_DISCOVERY": value}).discovery == value


@pytest.mark.parametrize("value", ["auto", "Device", ""])
def test_invalid_discovery(value: str):
    with pytest.raises(ConfigError, match="discovery must be device, entity or off"):
        load_config(env={}, overrides={"discovery": value})


def test_log_level_is_case_insensitive_but_checked():
    assert load_config(env={"EMDC_LOG_LEVEL": "debug"}).log_level == "debug"
    with pytest.raises(ConfigError, match="log_level"):
        load_config(env={"EMDC_LOG_LEVEL": "verbose"})


@pytest.mark.parametrize("prefix", ["home/energy/", "home/+/energy", "home/#"])
def test_invalid_topic_prefix(prefix: str):
    with pytest.raises(ConfigError, match="topic_prefix"):
        load_config(env={}, overrides={"topic_prefix": prefix})


# --- redaction, sources ---------------------------------------------------------------------------

def test_redacted_masks_every_secret():
    cfg = load_config(env={"EMDC_AMQP_URL": "amqp://emdc:hunter2@rabbit:5672/%2F",
                           "EMDC_MQTT_PASSWORD": "mqttpw", "EMDC_DB_URL": "mysql://u:dbpw@db/emdc"})
    red = cfg.redacted()
    assert red["amqp_url"] == "amqp://emdc:***@rabbit:5672/%2F"
    assert red["mqtt_password"] == "***"
    assert red["db_url"] == "***"
    assert not any(s in repr(red) for s in ("hunter2", "mqttpw", "dbpw"))


def test_redacted_keeps_non_secrets_and_empty_secrets():
    red = load_config(env={"EMDC_METER_ID": "garage"}).redacted()
    assert red["meter_id"] == "garage"
    assert red["mqtt_password"] == ""
    assert red["db_url"] == ""
    assert set(red) == {name for name, *_ in settings_table()}
    assert "sources" not in red


@pytest.mark.parametrize(("url", "expected"), [
    ("amqp://user:secret@host/", "amqp://user:***@host/"),
    ("amqp://host:5672/%2F", "amqp://host:5672/%2F"),
    ("amqp://user@host/", "amqp://user@host/"),
    ("amqps://u:p%40ss:word@host:5671/vh", "amqps://u:***@host:5671/vh"),
    ("amqp://secret:secret@host/", "amqp://secret:***@host/"),
])
def test_redact_url(url: str, expected: str):
    assert redact_url(url) == expected


def test_is_set_distinguishes_explicit_from_default():
    cfg = load_config(env={"EMDC_MQTT_PORT": "1883"})  # explicitly the default value
    assert cfg.is_set("mqtt_port")
    assert not cfg.is_set("mqtt_host")


def test_sources_do_not_affect_equality():
    assert load_config(env={"EMDC_MQTT_PORT": "1883"}) == Config()


def test_settings_table_covers_every_setting():
    table = settings_table()
    names = [name for name, *_ in table]
    fields = [f.name for f in dataclasses.fields(Config) if f.name not in {"sources", "warnings", "configured_inputs"}]
    assert names == fields
    for name, variable, default, help_text in table:
        assert variable == "EMDC_" + name.upper()
        assert default == getattr(Config(), name)
        assert help_text


def test_config_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().meter_id = "x"  # type: ignore[misc]


def _load(**env: Any) -> Config:
    return load_config(env={k: str(v) for k, v in env.items()})


def test_every_setting_can_come_from_its_environment_variable():
    samples = {str: "x", int: "7", float: "2.5", bool: "false"}
    special = {"amqp_url": "amqps://h/", "meter_id": "m1", "discovery": "off", "log_level": "ERROR",
               "clock_sync": "unknown", "topic_prefix": "t/p", "queue_type": "quorum", "channels": "gas",
               "partition": "0", "ha_url": "http://ha:8123"}
    needs = {"ha_url": {"EMDC_HA_TOKEN": "t"}}  # a setting that is only valid with another
    for name, variable, default, _ in settings_table():
        value = special.get(name, samples[type(default)])
        cfg = _load(**{variable: value, **needs.get(name, {})})
        assert cfg.is_set(name), name
        assert str(getattr(cfg, name)).lower() == value.lower(), name


@pytest.mark.parametrize(("env", "message"), [
    ({"EMDC_QUEUE_TYPE": "stream"}, "queue_type must be classic or quorum"),
    ({"EMDC_DELIVERY_LIMIT": "0"}, "delivery_limit must be between 1 and 1000"),
    ({"EMDC_AMQP_URL": "amqp://u:pw@host:56x72/"}, "amqp_url is not a valid URL"),
    ({"EMDC_AMQP_URL": "amqp://u:pw@[::1/"}, "amqp_url is not a valid URL"),
    ({"EMDC_BATCH_SIZE": "70000"}, "batch_size must be at most 65535"),
    ({"EMDC_MQTT_PORT": "70000"}, "mqtt_port must be at most 65535"),
    ({"EMDC_WH_PER_PULSE": "2000"}, "wh_per_pulse must be at most 1000"),
    ({"EMDC_WH_PER_PULSE": "inf"}, "wh_per_pulse must be at most 1000"),
    ({"EMDC_HA_URL": "homeassistant.local:8123", "EMDC_HA_TOKEN": "pw"}, "ha_url must be an http"),
    ({"EMDC_HA_URL": "http://homeassistant.local:8123"}, "ha_url is set but ha_token is empty"),
])
def test_settings_that_would_fail_later_are_refused_at_start(env: dict[str, str], message: str):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(env=env)
    assert "pw" not in str(info.value)


def test_a_secret_of_the_wrong_type_is_not_printed(toml):
    with pytest.raises(ConfigError) as info:
        load_config(toml("mqtt_password = 73519284\n"), env={})
    assert "73519284" not in str(info.value) and "expected str, got a int" in str(info.value)


def test_a_misspelt_variable_is_warned_about_with_a_suggestion():
    cfg = load_config(env={"EMDC_MQTT_PROT": "1884", "EMDC_TEST_AMQP_URL": "x", "EMDC_MQTT_PASSWORD_FILE": "/dev/null"})
    assert cfg.warnings == ("environment variable EMDC_MQTT_PROT is not an EMDC setting and is ignored "
                            "(did you mean EMDC_MQTT_PORT?)",)


def test_a_misspelt_key_in_a_table_names_its_path_and_a_suggestion(toml):
    with pytest.raises(ConfigError, match=r"mqtt\.prot: unknown setting 'prot' \(did you mean 'mqtt_port'\?\)"):
        load_config(toml("[mqtt]\nprot = 1\n"), env={})


@pytest.mark.parametrize("url", ["amqp//edge:S3cretPw@host/", "amqp://edge:S3cretPw@[::1/", "edge:S3cretPw@host"])
def test_a_malformed_url_is_never_echoed_with_its_password(url: str):
    with pytest.raises(ConfigError) as info:
        load_config(env={"EMDC_AMQP_URL": url})
    assert "S3cretPw" not in str(info.value)


@pytest.mark.parametrize(("env", "message"), [
    ({"EMDC_ACTIVE_PIN": "99"}, "active_pin must be a BCM GPIO number from 0 to 27"),
    ({"EMDC_ACTIVE_PIN": "-1"}, "active_pin must be a BCM GPIO number from 0 to 27"),
    ({"EMDC_REACTIVE_PIN": "28"}, "reactive_pin must be -1 (none) or a BCM GPIO number from 0 to 27"),
    ({"EMDC_ACTIVE_PIN": "22", "EMDC_REACTIVE_PIN": "22"}, "active_pin and reactive_pin are both GPIO22"),
])
def test_pins_a_pi_does_not_have_or_shares_are_refused_with_the_setting_named(env: dict[str, str], message: str):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(env=env)


@pytest.mark.parametrize("url", ["S3cretPw", "amqp://edge:S3cretPw/", "amqp://edge:S3cretPw:5672/%2F",
                                 "# the edge's password is S3cretPw\namqp://edge:S3cretPw@host/",
                                 "amqp//edge:S3cretPw@host/\n# S3cretPw"])
def test_no_part_of_a_malformed_secret_is_ever_in_the_message_and_the_message_is_one_line(url: str, secret_file):
    for env in ({"EMDC_AMQP_URL": url}, {"EMDC_AMQP_URL_FILE": str(secret_file(url + "\n"))}):
        with pytest.raises(ConfigError) as info:
            load_config(env=env)
        message = str(info.value)
        assert "S3cretPw" not in message and "\n" not in message and "password is" not in message, message
        assert message.startswith(("amqp_url", "EMDC_AMQP_URL")), message


def test_a_secret_file_of_more_than_one_line_is_refused_naming_the_file_not_its_lines(secret_file):
    path = secret_file("# the MQTT password\nS3cretPw\n")
    with pytest.raises(ConfigError) as info:
        load_config(env={"EMDC_MQTT_PASSWORD_FILE": str(path)})
    assert str(info.value) == (f"EMDC_MQTT_PASSWORD_FILE: secret file {path} holds 2 lines: it must hold the "
                               "value alone, on one line, without comments")


@pytest.mark.parametrize(("url", "shown"), [("S3cretPw", "***"), ("amqp//edge:S3cretPw@host", "***@host"),
                                            ("# S3cretPw\namqp://e:S3cretPw@host", "***"),
                                            ("amqp://host:5672/%2F", "amqp://host:5672/%2F")])
def test_redact_url_masks_what_it_cannot_tell_from_a_password(url: str, shown: str):
    assert redact_url(url) == shown


@pytest.mark.parametrize(("text", "path"), [
    ("[edge.gpio]\nactive = 3\n", r"edge\.gpio\.active: unknown setting 'active'"),
    ("[a.b.c]\nd = 1\n", r"a\.b\.c\.d: unknown setting 'd'"),
    ("[mqtt]\ntls = {on = true}\n", r"mqtt\.tls\.on: unknown setting 'on'"),
])
def test_a_key_in_a_nested_table_is_named_by_its_full_path(toml, text: str, path: str):
    with pytest.raises(ConfigError, match=path):
        load_config(toml(text), env={})
