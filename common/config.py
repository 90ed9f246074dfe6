"""Configuration: the one place settings are defined and loaded.

Precedence, lowest first: built-in defaults, a TOML file (``--config`` or
``EMDC_CONFIG``), environment variables (``EMDC_<NAME>``), command-line flags.
Secrets can also be read from a file named by ``EMDC_<NAME>_FILE`` (or the
TOML key ``<name>_file``), so they never need to appear on a command line.

Example::

    >>> cfg = load_config(env={"EMDC_METER_ID": "garage"}, overrides={"mqtt_port": 8883})
    >>> cfg.meter_id, cfg.mqtt_port
    ('garage', 8883)

The pulse inputs of a Pi are ``[[inputs]]`` tables of the file (see
:mod:`common.inputs`). Without them, the single-meter settings
``active_pin``, ``reactive_pin``, ``wh_per_pulse``, ``pull_up``,
``min_pulse_ms`` and ``min_interval_ms`` describe one or two inputs, exactly
as they always have::

    >>> [i.describe() for i in load_config(env={"EMDC_REACTIVE_PIN": "27"}).inputs()]
    ['GPIO17: active, s0, 1 Wh per pulse, pulses >= 2 ms, >= 20 ms apart', \
'GPIO27: reactive, s0, 1 varh per pulse, pulses >= 2 ms, >= 20 ms apart']
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from common.channels import CHANNELS, channel_spec
from common.inputs import INPUT_KEYS, INPUT_TYPES, Input
from common.message import MAX_WH, MessageError, validate_meter_id
from common.topology import QUEUE_TYPES, partition_of, partition_queue

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"
# The GPIOs of a Raspberry Pi's 40-pin header, by BCM number.
GPIO_PINS = range(28)
# How often an edge reports on itself unless told otherwise: the writer waits three of these before calling it offline.
DEFAULT_STATUS_INTERVAL_S = 30.0
# The settings of a single meter's one or two inputs, used only when the file has no [[inputs]].
SINGLE_METER_SETTINGS = ("active_pin", "reactive_pin", "wh_per_pulse", "pull_up", "min_pulse_ms", "min_interval_ms")


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names it and where it came from."""


def _setting(default: Any, help: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "secret": secret})


@dataclass(frozen=True)
class Config:
    """All EMDC settings. Field ``x`` is TOML key ``x`` and variable ``EMDC_X``."""

    # Brokers
    amqp_url: str = _setting(DEFAULT_AMQP_URL, "RabbitMQ URL (amqp:// or amqps://); a secret", secret=True)
    exchange: str = _setting("EMDC", "Topic exchange pulses are published to")
    queue: str = _setting("queue_mqtt_writer", "Queue the MQTT writer consumes")
    db_queue: str = _setting("queue_db_writer", "Queue the database writer consumes")
    declare_topology: bool = _setting(True, "Declare exchange/queues at start (false if a definitions file does)")
    queue_type: str = _setting("classic", "Writer queues: classic, or quorum (replicated over a RabbitMQ cluster)")
    partitions: int = _setting(1, "Writer queues split by meter over this many partitions, each with its own "
                                  "writers and state (1: one queue, see the scaling guide)")
    partition: int = _setting(0, "With partitions > 1: the partition this writer counts, 0 .. partitions-1")
    delivery_limit: int = _setting(20, "Quorum queues: a message delivered this often without an ack is "
                                       "dead-lettered")
    amqp_ca_file: str = _setting("", "CA bundle for amqps:// (empty: system CAs)")
    mqtt_host: str = _setting("localhost", "Mosquitto host")
    mqtt_port: int = _setting(1883, "Mosquitto port (8883 is usual with TLS)")
    mqtt_username: str = _setting("", "MQTT user name (empty: anonymous)")
    mqtt_password: str = _setting("", "MQTT password; a secret", secret=True)
    mqtt_keepalive: int = _setting(60, "MQTT keepalive in seconds (the last will fires after 1.5x this)")
    mqtt_tls: bool = _setting(False, "Use TLS to Mosquitto")
    mqtt_ca_file: str = _setting("", "CA bundle for MQTT TLS (empty: system CAs)")
    mqtt_cert_file: str = _setting("", "Client certificate for MQTT TLS (optional)")
    mqtt_key_file: str = _setting("", "Client key for MQTT TLS (optional)")
    # Identity and storage
    meter_id: str = _setting("main", "Meter id: routing key pulse.<meter>.<channel>, topic sub-level")
    state_dir: str = _setting("./state", "Directory for energy_state.sqlite3 (writer) or edge.sqlite3 (edge)")
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    # Writer
    topic_prefix: str = _setting("home/energy", "MQTT topic prefix; other meters get <prefix>/<meter>/...")
    batch_size: int = _setting(500, "Writer prefetch and largest batch per state write")
    meters: str = _setting("", "Meter ids the writer counts, comma-separated (empty: meter_id); pulses of others "
                               "are dead-lettered")
    admit_new_meters: int = _setting(0, "Writer: count up to this many meters beyond `meters` as they appear "
                                        "(0: none, unknown meters are dead-lettered)")
    max_power_w: float = _setting(100_000.0, "A counter jump implying more than this is dead-lettered (active, "
                                             "export and reactive, in W or var)")
    max_gas_flow_m3h: float = _setting(channel_spec("gas").default_max_rate, "A gas counter jump implying more "
                                       "than this flow in m³/h is dead-lettered")
    max_water_flow_lpm: float = _setting(channel_spec("water").default_max_rate, "A water counter jump implying "
                                         "more than this flow in L/min is dead-lettered")
    gas_calorific_kwh_m3: float = _setting(0.0, "Writer: calorific value of the gas in kWh/m³, as the bill states "
                                                "it (e.g. 11.2); above 0 a gas energy sensor in kWh is published too")
    gas_correction_factor: float = _setting(1.0, "Writer: the gas bill's volume correction factor (e.g. 0.9523), "
                                                 "applied with gas_calorific_kwh_m3")
    channels: str = _setting("", "Writer: channels announced to Home Assistant for meter_id before their first "
                                 "pulse, comma-separated (e.g. active,export,gas); active always is, others once "
                                 "counted")
    max_clock_ahead_s: float = _setting(600.0, "Pulses stamped further than this in the future are dead-lettered")
    power_refresh_s: float = _setting(1.0, "How often a falling idle power bound is re-evaluated (published on change)")
    power_timeout_s: float = _setting(300.0, "With no pulse for this long, power is published as 0")
    power_smoothing_pulses: int = _setting(1, "Average power over the last N pulse intervals (1: off)")
    discovery: str = _setting("device", "Home Assistant discovery: device, entity or off")
    discovery_prefix: str = _setting("homeassistant", "Home Assistant discovery prefix")
    ha_status_topic: str = _setting("homeassistant/status", "Home Assistant birth/will topic")
    ha_legacy_units: bool = _setting(False, "Reactive sensors without device class (Home Assistant < 2025.6)")
    ha_birth_delay_s: float = _setting(5.0, "Re-announce within this many seconds (random) of HA's birth message")
    ha_url: str = _setting("", "Home Assistant URL (http://homeassistant.local:8123): the writer moves late pulses' "
                               "energy in its hourly statistics to the hours they happened in (empty: off)")
    ha_token: str = _setting("", "Long-lived access token of a Home Assistant administrator, for ha_url; a secret",
                             secret=True)
    db_url: str = _setting("", "Database URL for db-writer/report (empty: SQLite in state dir); a secret",
                           secret=True)
    state_url: str = _setting("", "Writer state shared by an active/standby pair: a MariaDB or PostgreSQL URL "
                                  "(empty: SQLite in state dir); a secret", secret=True)
    # Edge: a single meter's inputs (without [[inputs]])
    active_pin: int = _setting(17, "BCM pin of the active-energy pulse output (without [[inputs]])")
    reactive_pin: int = _setting(-1, "BCM pin of the reactive-energy output (-1: none; without [[inputs]])")
    pull_up: bool = _setting(True, "Enable the pull-up (S0 open collector); false for LED sensors (without "
                                   "[[inputs]])")
    wh_per_pulse: float = _setting(1.0, "Energy per pulse in Wh (1000 imp/kWh = 1; without [[inputs]]); set "
                                        "for the writer, a first pulse stating another is dead-lettered")
    min_pulse_ms: float = _setting(2.0, "Pulses shorter than this are noise (without [[inputs]])")
    min_interval_ms: float = _setting(20.0, "Pulses closer than this to the previous are noise (without "
                                            "[[inputs]])")
    outbox_max: int = _setting(1_000_000, "Largest outbox on the Pi; beyond it the oldest timing detail goes")
    commit_interval_ms: float = _setting(100.0, "Edge: at most one disk commit (fsync) per interval; closer pulses "
                                                "share it, a pulse after a pause is committed at once (0: never wait)")
    publish_window: int = _setting(512, "Edge: messages in flight awaiting broker confirms")
    status_interval_s: float = _setting(DEFAULT_STATUS_INTERVAL_S, "Edge: send a status (counters, outbox, link, "
                                        "clock) this often, and on each change of the link or the clock (0: none)")
    edge_timeout_s: float = _setting(0.0, "Writer: an edge that sent a status once is offline after this long "
                                          "without any message (0: 3 x status_interval_s)")
    clock_sync: str = _setting("kernel", "Edge: tell the writer whether the clock is synchronised as the kernel "
                                         "says (kernel), or claim nothing (unknown)")
    # The file's [[inputs]] tables, resolved; empty: the single-meter settings describe the inputs.
    configured_inputs: tuple[Input, ...] = ()
    # Where each non-default value came from (file, variable or flag); not a setting.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    # What loading noticed but did not refuse (an unknown EMDC_* variable), for the log; not a setting.
    warnings: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def counted_meters(self) -> tuple[str, ...]:
        """The meters the writer counts: ``meters``, or ``meter_id`` if that is empty; with partitions, those of
        them in this writer's partition (every partition's writers may share one ``meters`` list).

        >>> load_config(env={"EMDC_METERS": "main, garage"}).counted_meters()
        ('main', 'garage')
        >>> load_config(env={"EMDC_METERS": "main, garage", "EMDC_PARTITIONS": "2"}).counted_meters()
        ('main',)
        """
        return tuple(meter for meter in self.listed_meters() if partition_of(meter, self.partitions) == self.partition)

    def listed_meters(self) -> tuple[str, ...]:
        """``meters``, or ``meter_id`` if that is empty: every partition's."""
        return tuple(meter.strip() for meter in self.meters.split(",") if meter.strip()) or (self.meter_id,)

    def writer_queue(self) -> str:
        """The queue the MQTT writer consumes: ``queue``, or its partition's (see ``partitions``).

        >>> load_config(env={"EMDC_PARTITIONS": "2", "EMDC_PARTITION": "1"}).writer_queue()
        'queue_mqtt_writer.1'
        """
        return partition_queue(self.queue, self.partition, self.partitions)

    def partition_label(self) -> str:
        """What tells this partition's MQTT topics (availability, state identity) from the others': "" without
        partitions, which keeps the single writer's topics."""
        return str(self.partition) if self.partitions > 1 else ""

    def inputs(self) -> tuple[Input, ...]:
        """The pulse inputs the edge reads: the ``[[inputs]]`` tables, or those the single-meter settings describe.

        Without ``[[inputs]]``, ``active_pin`` (and ``reactive_pin`` unless
        -1) become inputs of type ``s0`` (``pull_up = true``) or ``led``
        (false), ``wh_per_pulse`` each, with ``min_pulse_ms`` and
        ``min_interval_ms`` as their filter and no bounce time: what the edge
        has always done with those settings.

        >>> load_config(env={"EMDC_PULL_UP": "false", "EMDC_WH_PER_PULSE": "0.5"}).inputs()[0].as_toml()
        {'pin': 17, 'channel': 'active', 'type': 'led', 'per_pulse': 0.5, 'min_pulse_ms': 2.0, 'bounce_ms': 0.0, \
'min_interval_ms': 20.0}
        """
        if self.configured_inputs:
            return self.configured_inputs
        pins = {"active": (self.active_pin, "active_pin")}
        if self.reactive_pin >= 0:
            pins["reactive"] = (self.reactive_pin, "reactive_pin")
        return tuple(Input.of(pin=pin, channel=channel, type="s0" if self.pull_up else "led",
                              per_pulse=self.wh_per_pulse, min_pulse_ms=self.min_pulse_ms, bounce_ms=0.0,
                              min_interval_ms=self.min_interval_ms, setting=setting)
                     for channel, (pin, setting) in pins.items())

    def inputs_source(self) -> str:
        """Where :meth:`inputs` come from, for ``emdc config show``."""
        if self.configured_inputs:
            return self.sources.get("inputs", "[[inputs]]")
        given = [name for name in SINGLE_METER_SETTINGS if self.is_set(name)]
        return f"no [[inputs]]: from {', '.join(given) if given else 'the single-meter defaults'}"

    def edge_timeout(self) -> float:
        """Seconds of silence after which the writer calls an edge offline: ``edge_timeout_s``, or three status
        intervals.

        >>> load_config(env={"EMDC_STATUS_INTERVAL_S": "10"}).edge_timeout()
        30.0
        """
        return self.edge_timeout_s or 3 * (self.status_interval_s or DEFAULT_STATUS_INTERVAL_S)

    def announced_channels(self) -> tuple[str, ...]:
        """The ``channels`` setting as names.

        >>> load_config(env={"EMDC_CHANNELS": "active, gas"}).announced_channels()
        ('active', 'gas')
        """
        return tuple(channel.strip() for channel in self.channels.split(",") if channel.strip())

    def is_set(self, name: str) -> bool:
        """True if ``name`` was given explicitly rather than left at its default."""
        return name in self.sources

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict with secrets masked, safe to log."""
        out: dict[str, Any] = {}
        for f in _settings():
            value = getattr(self, f.name)
            if f.name == "amqp_url":
                value = redact_url(value)
            elif f.metadata["secret"] and value:
                value = "***"
            out[f.name] = value
        return out


def redact_url(url: str) -> str:
    """A URL fit for a log line: its password masked, also when the URL is malformed.

    What cannot be told from a password is masked whole: text that is no URL
    (a bare password, more than one line), or a port that is no number
    (``user:password`` without the ``@``).

    >>> redact_url("amqp://edge:S3cret@broker:5672/%2F")
    'amqp://edge:***@broker:5672/%2F'
    >>> redact_url("amqp//edge:S3cret@broker")   # a typo: no scheme, but still a password
    '***@broker'
    >>> redact_url("amqp://edge:S3cret/"), redact_url("S3cret"), redact_url("sqlite:////var/lib/emdc/pulses.db")
    ('***', '***', 'sqlite:////var/lib/emdc/pulses.db')
    """
    if not url.isprintable():  # a second line (a comment in a secret file), a tab: no URL
        return "***"
    try:
        parts = urlsplit(url)
        password, _port = parts.password, parts.port
    except ValueError:  # an unclosed [IPv6 address, or a port that is no number (it may be the password)
        password = None
        parts = None
    if parts is not None and password is not None:
        netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    if parts is not None and parts.scheme and (parts.netloc or parts.path.startswith("/")):
        return url  # a well-formed URL without a password (sqlite:///path has no host)
    if "@" in url:  # not parseable as user:password@host, but may still hold one
        head, _, tail = url.rpartition("@")
        scheme, sep, _ = head.partition("://")
        return f"{scheme}{sep}***@{tail}" if sep and scheme.isalnum() else f"***@{tail}"
    return "***"


def _settings() -> list[Any]:
    return [f for f in fields(Config) if "help" in f.metadata]


def env_name(name: str) -> str:
    return f"EMDC_{name.upper()}"


def settings_table() -> list[tuple[str, str, Any, str]]:
    """(TOML key, environment variable, default, help) for every setting."""
    return [(f.name, env_name(f.name), f.default, f.metadata["help"]) for f in _settings()]


def load_config(path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Build a :class:`Config` from defaults, file, environment and overrides.

    ``path`` defaults to ``$EMDC_CONFIG``; ``overrides`` (from CLI flags) whose
    value is ``None`` are ignored.
    """
    env = os.environ if env is None else env
    # (key, value, origin) in increasing precedence; within the file and the
    # environment a secret's _FILE form comes after its plain form.
    raw: list[tuple[str, Any, str]] = []
    path = path or env.get("EMDC_CONFIG")
    if path:
        entries = _read_toml(Path(path))
        raw += sorted(((k, v, f"{path}: {label}") for k, v, label in entries),
                      key=lambda item: item[0].endswith("_file"))
    for suffix in ("", "_FILE"):
        raw += [(f.name + suffix.lower(), env[var], var) for f in _settings()
                if env.get(var := env_name(f.name) + suffix, "") != ""]
    raw += [(k, v, f"--{k.replace('_', '-')}") for k, v in (overrides or {}).items() if v is not None]
    return replace(_build(raw), warnings=tuple(_unknown_variables(env)))


def _unknown_variables(env: Mapping[str, str]) -> list[str]:
    """A line for each ``EMDC_*`` variable that is no setting: a typo must not pass unnoticed."""
    known = {"EMDC_CONFIG", *(env_name(f.name) for f in _settings()),
             *(env_name(f.name) + "_FILE" for f in _settings() if f.metadata["secret"])}
    lines = []
    for var in sorted(env):
        if var.startswith("EMDC_") and not var.startswith("EMDC_TEST_") and var not in known:
            close = difflib.get_close_matches(var, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            lines.append(f"environment variable {var} is not an EMDC setting and is ignored{hint}")
    return lines


def _did_you_mean(key: str, origin: str) -> str:
    """A suggestion for a misspelt setting; a key in a TOML table is also tried with its table's name."""
    names = [f.name for f in _settings()] + ["inputs"]
    written = origin.rpartition(": ")[2].replace(".", "_")
    close = difflib.get_close_matches(key, names, n=1) or difflib.get_close_matches(written, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_toml(path: Path) -> list[tuple[str, Any, str]]:
    """(setting name, value, the key as written: ``mqtt.port``) for every key of the file."""
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    # Tables only group keys for the reader: [mqtt] port = 1 means mqtt_port,
    # [edge] active_pin = 17 means active_pin.
    known = {f.name for f in _settings()}
    entries: list[tuple[str, Any, str]] = []
    for key, value in doc.items():
        if key == "inputs" or not isinstance(value, dict):
            entries.append((key, value, key))
            continue
        for sub, sub_value in value.items():
            if isinstance(sub_value, dict) and sub_value:  # no setting is a table: name its keys by their path
                entries += [(leaf, leaf_value, f"{key}.{sub}.{path}") for leaf, leaf_value, path in _leaves(sub_value)]
                continue
            prefixed = f"{key}_{sub}"
            is_known = prefixed in known or (prefixed.endswith("_file") and prefixed[:-5] in known)
            entries.append((prefixed if is_known else sub, sub_value, f"{key}.{sub}"))
    return entries


def _leaves(table: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(key, value, dotted path) of every non-table value in ``table``, however deep.

    >>> _leaves({"gpio": {"active": 3}, "x": 1})
    [('active', 3, 'gpio.active'), ('x', 1, 'x')]
    """
    found: list[tuple[str, Any, str]] = []
    for key, value in table.items():
        if isinstance(value, dict) and value:
            found += [(leaf, leaf_value, f"{key}.{path}") for leaf, leaf_value, path in _leaves(value)]
        else:
            found.append((key, value, key))
    return found


def _build(raw: list[tuple[str, Any, str]]) -> Config:
    known = {f.name: f for f in _settings()}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, value, origin in raw:
        if key == "inputs":  # only a file has [[inputs]] (or [[edge.inputs]]): no variable or flag names it
            file = origin.rpartition(": ")[0]
            values["configured_inputs"] = _parse_inputs(value, f"{file}: ")
            sources["inputs"] = file
            continue
        if key.endswith("_file") and key[:-5] in known and known[key[:-5]].metadata["secret"]:
            values[key[:-5]] = _read_secret(str(value), origin)
            sources[key[:-5]] = origin
            continue
        if key not in known:
            raise ConfigError(f"{origin}: unknown setting {key!r}{_did_you_mean(key, origin)}")
        values[key] = _coerce(value, type(known[key].default), origin, secret=known[key].metadata["secret"])
        sources[key] = origin
    cfg = replace(Config(), **values, sources=sources)
    _check(cfg)
    return cfg


def _parse_inputs(value: Any, where: str) -> tuple[Input, ...]:
    """The ``[[inputs]]`` tables of a file (``where`` is ``"<path>: "``); the first mistake is a ConfigError."""
    if not isinstance(value, list) or not value or not all(isinstance(table, dict) for table in value):
        raise ConfigError(f"{where}inputs must be one or more [[inputs]] tables, got {value!r:.60}")
    inputs = [_parse_input(table, f"[[inputs]] #{n}", where) for n, table in enumerate(value, 1)]
    by_pin: dict[int, Input] = {}
    by_channel: dict[str, Input] = {}
    for one in inputs:
        if (other := by_pin.setdefault(one.pin, one)) is not one:
            raise ConfigError(f"{where}{one.setting}: GPIO{one.pin} is already the pin of {other.setting} "
                              f"({other.channel}): each input needs its own pin")
        if (other := by_channel.setdefault(one.channel, one)) is not one:
            raise ConfigError(f"{where}{one.setting}: channel {one.channel} is already read by {other.setting} "
                              f"(GPIO{other.pin}): one input per channel (a meter's export output is channel "
                              "export)")
    return tuple(inputs)


def _parse_input(table: dict[str, Any], setting: str, where: str) -> Input:
    """One ``[[inputs]]`` table, checked key by key; errors name the file (``where``) and the table."""
    at = f"{where}{setting}"
    for key in table:
        if key not in INPUT_KEYS:
            close = difflib.get_close_matches(key, INPUT_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{at}: unknown key {key!r}{hint}; an input has {', '.join(INPUT_KEYS)}")
    for key in ("pin", "channel", "type"):
        if key not in table:
            raise ConfigError(f"{at}: {key} is missing ({INPUT_KEYS[key][2]})")
    for key, value in table.items():  # a file's values are typed: "17" is no pin
        if isinstance(value, str) and INPUT_KEYS[key][0] is not str:
            raise ConfigError(f"{at}: {key}: expected {INPUT_KEYS[key][0].__name__}, got {value!r}")
    given = {key: _coerce(value, INPUT_KEYS[key][0], f"{at}: {key}") for key, value in table.items()}
    if given["pin"] not in GPIO_PINS:
        raise ConfigError(f"{at}: pin must be a BCM GPIO number from 0 to 27 (GPIO17 is header pin 11), "
                          f"got {given['pin']}")
    if given["channel"] not in CHANNELS:
        raise ConfigError(f"{at}: unknown channel {given['channel']!r}; one of {', '.join(CHANNELS)}")
    if given["type"] not in INPUT_TYPES:
        raise ConfigError(f"{at}: unknown type {given['type']!r}; one of {', '.join(INPUT_TYPES)}")
    per_pulse = given.get("per_pulse")
    if per_pulse is not None and not 0 < per_pulse <= MAX_WH:  # also rejects NaN
        raise ConfigError(f"{at}: per_pulse must be > 0 and at most {MAX_WH:g}, got {per_pulse}")
    for key in ("min_pulse_ms", "bounce_ms", "min_interval_ms"):
        if key in given and not 0 <= given[key] <= 3_600_000:  # also rejects NaN and infinity
            raise ConfigError(f"{at}: {key} must be from 0 to 3600000 (an hour), got {given[key]}")
    return Input.of(**given, setting=setting)


def _read_secret(path: str, origin: str) -> str:
    """The value a secret file holds: one line (a comment line would become part of the secret)."""
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{origin}: cannot read secret file {path}: {exc.strerror}") from None
    if "\n" in value:
        raise ConfigError(f"{origin}: secret file {path} holds {len(value.splitlines())} lines: it must hold the "
                          "value alone, on one line, without comments")
    return value


def _coerce(value: Any, kind: type, origin: str, secret: bool = False) -> Any:
    """Parse text (environment, flags) into ``kind``; typed TOML values must already be of it."""
    shown = f"a {type(value).__name__}" if secret else repr(value)
    error = ConfigError(f"{origin}: expected {kind.__name__}, got {shown}")
    if not isinstance(value, str):
        numeric = kind is float and isinstance(value, int) and not isinstance(value, bool)
        if type(value) is not kind and not numeric:
            raise error
        return kind(value)
    if kind is bool:
        text = value.strip().lower()
        if text not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            raise error
        return text in {"1", "true", "yes", "on"}
    try:
        return kind(value)
    except ValueError:
        raise error from None


def _check(cfg: Config) -> None:
    for name in SINGLE_METER_SETTINGS:
        if cfg.configured_inputs and cfg.is_set(name):
            raise ConfigError(f"{cfg.sources[name]}: {name} applies only without [[inputs]]; with [[inputs]] in "
                              f"{cfg.sources['inputs']}, set it in each input's table")
    try:
        validate_meter_id(cfg.meter_id)
    except MessageError as exc:
        raise ConfigError(f"meter_id: {exc}") from None
    for meter in cfg.listed_meters():
        try:
            validate_meter_id(meter)
        except MessageError as exc:
            raise ConfigError(f"meters: {exc} (a comma-separated list of meter ids)") from None
    if cfg.admit_new_meters < 0:
        raise ConfigError(f"admit_new_meters must be 0 (off) or a positive cap, got {cfg.admit_new_meters}")
    if cfg.queue_type not in QUEUE_TYPES:
        raise ConfigError(f"queue_type must be {' or '.join(QUEUE_TYPES)}, got {cfg.queue_type!r}")
    if not 1 <= cfg.partitions <= 1000 or not 0 <= cfg.partition < cfg.partitions:
        raise ConfigError(f"partition must be 0 .. partitions-1 and partitions 1 .. 1000, got partition "
                          f"{cfg.partition} of partitions {cfg.partitions}")
    if cfg.partitions > 1 and cfg.admit_new_meters:
        raise ConfigError("admit_new_meters works only without partitions: a partition's queue receives the "
                          "pulses of the meters listed in `meters` only; list every meter there")
    if not 1 <= cfg.delivery_limit <= 1000:
        raise ConfigError(f"delivery_limit must be between 1 and 1000, got {cfg.delivery_limit}")
    try:
        scheme, port = urlsplit(cfg.amqp_url).scheme, urlsplit(cfg.amqp_url).port
    except ValueError as exc:  # the parser's message would quote the port, which may be the password
        why = ("an unclosed [ of an IPv6 address" if "IPv6" in str(exc) else
               "its port is no number: write it as amqp://user:password@host:5672/%2F, a : or @ in the password "
               "as %3A or %40")
        raise ConfigError(f"amqp_url is not a valid URL ({why}), got {redact_url(cfg.amqp_url)!r}") from None
    if scheme not in {"amqp", "amqps"}:
        raise ConfigError(f"amqp_url must start with amqp:// or amqps://, got {redact_url(cfg.amqp_url)!r}")
    if port == 0:
        raise ConfigError("amqp_url: port must be 1-65535")
    unknown = set(cfg.announced_channels()) - set(CHANNELS)
    if unknown:
        raise ConfigError(f"channels: {', '.join(sorted(unknown))} is no channel (one of {', '.join(CHANNELS)})")
    if not 0 <= cfg.gas_calorific_kwh_m3 <= 100:  # also rejects NaN
        raise ConfigError(f"gas_calorific_kwh_m3 must be 0 (off) or a value in kWh/m³ (about 10), got "
                          f"{cfg.gas_calorific_kwh_m3}")
    positive = ("mqtt_port", "mqtt_keepalive", "batch_size", "max_power_w", "max_gas_flow_m3h", "max_water_flow_lpm",
                "gas_correction_factor", "max_clock_ahead_s", "power_refresh_s",
                "power_timeout_s", "power_smoothing_pulses", "wh_per_pulse", "outbox_max", "publish_window")
    for name in positive:
        if not getattr(cfg, name) > 0:  # also rejects NaN
            raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)}")
    if not cfg.status_interval_s >= 0:  # also rejects NaN
        raise ConfigError(f"status_interval_s must be 0 (no status) or more, got {cfg.status_interval_s}")
    if not cfg.edge_timeout_s >= 0:  # also rejects NaN
        raise ConfigError(f"edge_timeout_s must be 0 (3 x status_interval_s) or more, got {cfg.edge_timeout_s}")
    if not (cfg.commit_interval_ms == 0 or 1 <= cfg.commit_interval_ms <= 1000):  # also rejects NaN
        raise ConfigError(f"commit_interval_ms must be 0 or between 1 and 1000, got {cfg.commit_interval_ms}")
    limits = {"mqtt_port": 65535, "batch_size": 65535, "publish_window": 65535, "wh_per_pulse": MAX_WH}
    for name, limit in limits.items():  # AMQP's prefetch count is 16 bits; ports are too
        if getattr(cfg, name) > limit:
            raise ConfigError(f"{name} must be at most {limit:g}, got {getattr(cfg, name)}")
    if cfg.active_pin not in GPIO_PINS:
        raise ConfigError(f"active_pin must be a BCM GPIO number from 0 to 27 (GPIO17 is header pin 11), "
                          f"got {cfg.active_pin}")
    if cfg.reactive_pin != -1 and cfg.reactive_pin not in GPIO_PINS:
        raise ConfigError(f"reactive_pin must be -1 (none) or a BCM GPIO number from 0 to 27, got {cfg.reactive_pin}")
    if cfg.reactive_pin == cfg.active_pin:
        raise ConfigError(f"active_pin and reactive_pin are both GPIO{cfg.active_pin}: each output needs its own pin")
    if cfg.clock_sync not in {"kernel", "unknown"}:
        raise ConfigError(f"clock_sync must be kernel or unknown, got {cfg.clock_sync!r}")
    if cfg.discovery not in {"device", "entity", "off"}:
        raise ConfigError(f"discovery must be device, entity or off, got {cfg.discovery!r}")
    if cfg.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {cfg.log_level!r}")
    if cfg.ha_url:
        if urlsplit(cfg.ha_url).scheme not in {"http", "https"} or not urlsplit(cfg.ha_url).netloc:
            raise ConfigError(f"ha_url must be an http:// or https:// URL, got {redact_url(cfg.ha_url)!r}")
        if not cfg.ha_token:
            raise ConfigError("ha_url is set but ha_token is empty: give a long-lived access token of a Home "
                              "Assistant administrator (EMDC_HA_TOKEN_FILE, or ha_token_file in the config file)")
    if cfg.topic_prefix.endswith("/") or any(c in cfg.topic_prefix for c in "+#"):
        raise ConfigError(f"topic_prefix must not end with / or contain + or #, got {cfg.topic_prefix!r}")
