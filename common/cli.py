"""The ``emdc`` command. Sub-commands import their side lazily: the Pi never
needs paho-mqtt, the server never needs gpiozero."""

from __future__ import annotations

import logging
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import click

from common import __version__
from common.config import Config, ConfigError, load_config

log = logging.getLogger("emdc")

# Settings that may also be given as flags. Secrets are deliberately absent:
# command lines are visible to every user of the machine (ps, /proc).
FLAG_SETTINGS = {
    "state_dir": ("--state-dir", str, "Directory for state files."),
    "meter_id": ("--meter", str, "Meter id."),
    "queue": ("--queue", str, "RabbitMQ queue to consume."),
    "topic_prefix": ("--topic-prefix", str, "MQTT topic prefix."),
    "mqtt_host": ("--mqtt-host", str, "Mosquitto host."),
    "mqtt_port": ("--mqtt-port", int, "Mosquitto port."),
}


def setting_flags(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add ``--flag`` options for settings; their values arrive as ``overrides``."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(names):
            flag, kind, help_text = FLAG_SETTINGS[name]
            command = click.option(flag, name, type=kind, default=None,
                                   help=f"{help_text} [env EMDC_{name.upper()}]")(command)
        return command

    return decorate


class DecimalType(click.ParamType):
    """An exact decimal number (a meter reading), rejected with a usage error if malformed."""

    name = "decimal"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Decimal:
        try:
            number = Decimal(str(value))
        except InvalidOperation:
            self.fail(f"{value!r} is not a decimal number", param, ctx)
        if not number.is_finite():
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class Context:
    def __init__(self, config_path: str | None, log_level: str | None) -> None:
        self.config_path = config_path
        self.log_level = log_level

    def config(self, overrides: dict[str, Any]) -> Config:
        if self.log_level:
            overrides = {**overrides, "log_level": self.log_level}
        try:
            cfg = load_config(self.config_path, overrides=overrides)
        except ConfigError as exc:
            raise click.ClickException(f"configuration: {exc}") from None
        logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        if cfg.log_level.upper() != "DEBUG":
            logging.getLogger("pika").setLevel(logging.WARNING)
        return cfg


def check_heartbeat(path: Path, max_age_s: float) -> None:
    """The health check of a consumer: exit 0 if ``path`` was touched within ``max_age_s``."""
    from backend.amqp_consumer import heartbeat_age_s

    age = heartbeat_age_s(path)
    if age is None or age > max_age_s:
        raise click.ClickException(f"unhealthy: no heartbeat in {path} for "
                                   f"{'ever' if age is None else f'{age:.0f} s'}")
    click.echo(f"healthy: heartbeat {age:.1f} s ago")


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so services finish the work in hand and exit 0."""
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        log.info("received %s: finishing the work in hand", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", envvar="EMDC_CONFIG", type=click.Path(dir_okay=False),
              help="TOML configuration file [env EMDC_CONFIG].")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Log verbosity [env EMDC_LOG_LEVEL].")
@click.version_option(__version__, prog_name="emdc")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, log_level: str | None) -> None:
    """EMDC: electricity meter pulses from a Raspberry Pi to RabbitMQ, MQTT and Home Assistant.

    Settings come from defaults, a TOML file, EMDC_* environment variables and
    flags, later ones winning. `emdc config show` prints the result.
    """
    ctx.obj = Context(config_path, log_level)


@main.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@click.pass_obj
def config_show(obj: Context) -> None:
    """Print the effective settings (secrets masked) and where each came from."""
    cfg = obj.config({})
    for name, value in cfg.redacted().items():
        source = cfg.sources.get(name, "default")
        click.echo(f"{name} = {value!r}  # {source}")


# -- edge -------------------------------------------------------------------

@main.group()
def edge() -> None:
    """The Raspberry Pi side: read pulses and publish them."""


@edge.command("run", short_help="Read the meter on GPIO and publish every pulse.")
@setting_flags("state_dir", "meter_id")
@click.pass_obj
def edge_run(obj: Context, **overrides: Any) -> None:
    """Read the meter's pulse outputs on GPIO and publish every pulse to RabbitMQ.

    Runs until SIGTERM/SIGINT. Under systemd (Type=notify) it reports READY
    once the pins and the outbox are open, and feeds the watchdog while its
    threads are alive.
    """
    from edge.outbox import OutboxError
    from edge.service import run_edge

    try:
        sys.exit(run_edge(obj.config(overrides), stop_on_signals()))
    except OutboxError as exc:
        raise click.ClickException(str(exc)) from None


@edge.command("status", short_help="Counters, outbox depth, last confirm, link state.")
@setting_flags("state_dir")
@click.pass_obj
def edge_status(obj: Context, **overrides: Any) -> None:
    """Show the pulse counters, the outbox depth and the link to RabbitMQ."""
    from edge.outbox import OutboxError
    from edge.status import edge_status_lines

    cfg = obj.config(overrides)
    try:
        lines = edge_status_lines(Path(cfg.state_dir))
    except (FileNotFoundError, OutboxError) as exc:
        raise click.ClickException(str(exc)) from None
    for line in lines:
        click.echo(line)


def simulation_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--power", type=click.FloatRange(min=0, max=10_000_000, min_open=True),
                     help="Constant active load in W (default: a household load profile)."),
        click.option("--reactive-power", type=click.FloatRange(min=0, max=10_000_000),
                     help="Constant reactive load in var (enables the reactive channel)."),
        click.option("--count", type=click.IntRange(min=1), help="Stop after N active pulses."),
        click.option("--duration", type=click.FloatRange(min=0, min_open=True),
                     help="Simulated seconds to run (default 3600 unless --count is given)."),
        click.option("--speed", default=None, help="Time compression factor, or 'max' (as fast as confirmed)."),
        click.option("--profile", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="CSV load profile: seconds,active_w[,reactive_var] per row."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def simulation_plan(*, power: float | None, reactive_power: float | None, count: int | None,
                    duration: float | None, speed: str | None, profile: Path | None, default_speed: str) -> Any:
    from edge.simulator import LoadProfile, SimulationPlan

    if profile is not None:
        try:
            load = LoadProfile.from_csv(profile)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--profile") from None
    elif power is not None:
        load = LoadProfile.constant(power)
    else:
        load = LoadProfile.household()
    if reactive_power is not None:
        load = load.with_reactive(reactive_power)
    speed = speed or default_speed
    try:
        factor = None if speed == "max" else float(speed)
    except ValueError:
        raise click.BadParameter("must be a number or 'max'", param_hint="--speed") from None
    if factor is not None and factor <= 0:
        raise click.BadParameter("must be > 0", param_hint="--speed")
    if count is None and duration is None:
        duration = 3600.0
    return SimulationPlan(load, count=count, duration_s=duration, speed=factor)


def simulation_config(obj: Context, overrides: dict[str, Any], plan: Any) -> Config:
    """A load with reactive power needs a reactive input: use mock pin 27 unless one is configured."""
    cfg = obj.config(overrides)
    if cfg.reactive_pin < 0 and any(step[2] > 0 for step in plan.profile.steps):
        cfg = obj.config({**overrides, "reactive_pin": 27})
    return cfg


@edge.command("simulate", short_help="Publish a simulated meter's pulses through the real edge code.")
@simulation_options
@setting_flags("state_dir", "meter_id")
@click.pass_obj
def edge_simulate(obj: Context, power: float | None, reactive_power: float | None, count: int | None,
                  duration: float | None, speed: str | None, profile: Path | None, **overrides: Any) -> None:
    """Publish the pulses of a simulated meter to RabbitMQ, through the real edge code.

    gpiozero mock pins are driven by a load profile with a virtual clock, so
    timestamps are realistic at any --speed. With --count it exits once all N
    pulses are confirmed by the broker. Example:

    \b
        emdc edge simulate --power 3000 --count 300 --speed max
    """
    from edge.outbox import OutboxError
    from edge.simulator import EdgeSimulation

    plan = simulation_plan(power=power, reactive_power=reactive_power, count=count, duration=duration,
                           speed=speed, profile=profile, default_speed="1")
    cfg = simulation_config(obj, overrides, plan)
    stop = stop_on_signals()
    try:
        result = EdgeSimulation(cfg, plan).run(stop)
    except OutboxError as exc:
        raise click.ClickException(str(exc)) from None
    if stop.is_set():
        raise click.ClickException(f"stopped; pulses not yet confirmed stay in the outbox, counters {result.counters}")
    click.echo(f"confirmed by the broker; edge counters (epoch {result.epoch}): {result.counters}")


# -- backend ----------------------------------------------------------------

@main.command(short_help="Count pulses exactly and publish them to MQTT.")
@click.option("--check", is_flag=True, help="Exit 0 if a running writer showed life recently (health check).")
@click.option("--max-age", default=60.0, show_default=True, help="With --check: seconds of silence allowed.")
@setting_flags("state_dir", "queue", "topic_prefix", "mqtt_host", "mqtt_port")
@click.pass_obj
def writer(obj: Context, check: bool, max_age: float, **overrides: Any) -> None:
    """Consume pulses from RabbitMQ, keep exact energy totals, publish them to MQTT.

    State lives in <state dir>/energy_state.json and is saved before each
    acknowledgement, so restarts never lose or repeat a pulse.
    """
    from backend.service import heartbeat_path, run_writer
    from backend.state_store import StateError

    cfg = obj.config(overrides)
    if check:
        check_heartbeat(heartbeat_path(cfg), max_age)
        return
    try:
        run_writer(cfg, stop_on_signals())
    except StateError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def state() -> None:
    """Inspect or calibrate the writer's saved totals."""


@state.command("show")
@setting_flags("state_dir")
@click.pass_obj
def state_show(obj: Context, **overrides: Any) -> None:
    """Print the persisted total of each meter and channel."""
    from backend.ledger import Ledger
    from backend.state_store import StateError, StateStore
    from backend.topics import format_kwh

    cfg = obj.config(overrides)
    store = StateStore(Path(cfg.state_dir))
    try:
        doc = store.load()
    except StateError as exc:
        raise click.ClickException(str(exc)) from None
    if doc is None:
        click.echo(f"no state saved in {store.path} yet")
        return
    unit = {"active": "kWh", "reactive": "kvarh"}
    try:
        ledger = Ledger.from_json(doc, cfg.max_power_w)
    except (KeyError, TypeError, ValueError) as exc:
        raise click.ClickException(f"{store.path} does not hold a valid ledger: {exc!r}") from None
    for (meter, channel), st in ledger:
        click.echo(f"{meter:<12} {channel:<9} {format_kwh(st.total_uwh):>16} {unit[channel]:<5} "
                   f"({len(st.epochs)} epoch(s), last seq {max((c.seq for c in st.epochs.values()), default=0)})")


@state.command("set-total")
@click.option("--meter", required=True, help="Meter id, e.g. main.")
@click.option("--channel", required=True, type=click.Choice(["active", "reactive"]))
@click.option("--kwh", required=True, type=DecimalType(), help="The physical meter's reading (kWh or kvarh).")
@click.pass_obj
def state_set_total(obj: Context, meter: str, channel: str, kwh: Decimal) -> None:
    """Set a total to the physical meter reading, through the broker.

    The command is queued with the pulses, so the running writer applies it in
    order, without racing its state file, and logs the old and new value.
    """
    import pika.exceptions

    from common.amqp import reason
    from common.control import send_set_total
    from common.message import MessageError, SetTotal

    cfg = obj.config({})
    try:
        send_set_total(cfg, SetTotal(meter, channel, kwh, time.time_ns(), secrets.token_hex(8)))
    except MessageError as exc:
        raise click.BadParameter(str(exc)) from None
    except pika.exceptions.UnroutableError:
        raise click.ClickException(f"no queue is bound for control.{meter} on exchange {cfg.exchange}: start "
                                   "the writer once so that it declares its queue") from None
    except pika.exceptions.AMQPError as exc:
        raise click.ClickException(f"RabbitMQ: {reason(exc)}") from None
    click.echo(f"sent: set {meter}/{channel} to {kwh}; the writer applies it in order with the pulses")


@main.group()
def ha() -> None:
    """Home Assistant integration."""


@ha.command("remove")
@click.option("--meter", "meters", multiple=True, help="Meter id (repeatable; default: every meter in the state "
              "file and the configured meter).")
@setting_flags("state_dir", "topic_prefix", "mqtt_host", "mqtt_port")
@click.pass_obj
def ha_remove(obj: Context, meters: tuple[str, ...], **overrides: Any) -> None:
    """Remove EMDC's devices from Home Assistant (empty retained discovery configs).

    Stop the writer first, or it announces them again when it reconnects or
    Home Assistant restarts; or set EMDC_DISCOVERY=off for it.
    """
    from backend.discovery import Discovery
    from backend.mqtt_publisher import publish_once
    from backend.state_store import StateError, StateStore

    cfg = obj.config(overrides)
    if not meters:
        try:
            doc = StateStore(Path(cfg.state_dir)).load() or {"meters": {}}
        except StateError as exc:
            raise click.ClickException(str(exc)) from None
        meters = tuple(sorted({cfg.meter_id, *doc.get("meters", {})}))
    discovery = Discovery(cfg.discovery_prefix, cfg.topic_prefix)
    topics = [topic for meter in meters for topic in discovery.topics(meter)]
    try:
        publish_once(cfg, [(topic, "") for topic in topics])
    except (OSError, TimeoutError) as exc:
        raise click.ClickException(f"MQTT {cfg.mqtt_host}:{cfg.mqtt_port}: {exc}") from None
    click.echo(f"removed the Home Assistant discovery of meter(s) {', '.join(meters)} ({len(topics)} topics)")


@main.command(short_help="Simulated meter, edge and writer in one process.")
@simulation_options
@setting_flags("state_dir", "topic_prefix")
@click.pass_obj
def simulate(obj: Context, power: float | None, reactive_power: float | None, count: int | None,
             duration: float | None, speed: str | None, profile: Path | None, **overrides: Any) -> None:
    """Run a simulated meter, the edge and the writer together, and print the final MQTT values.

    Without EMDC_AMQP_URL / EMDC_MQTT_HOST configured, pulses travel through an
    embedded in-process transport (no broker needed); with them, through the
    real brokers. By default it simulates an hour of household load in seconds.
    """
    from common.simulation import run_simulation

    plan = simulation_plan(power=power, reactive_power=reactive_power, count=count, duration=duration,
                           speed=speed, profile=profile, default_speed="720")
    cfg = simulation_config(obj, overrides, plan)
    try:
        values = run_simulation(cfg, plan, stop_on_signals())
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None
    for topic, value in sorted(values.items()):
        click.echo(f"{topic} = {value}")


# -- database and reports ---------------------------------------------------

@main.command("db-writer", short_help="Store every pulse once in SQLite or MariaDB.")
@click.option("--check", is_flag=True, help="Exit 0 if a running db-writer showed life recently (health check).")
@click.option("--max-age", default=60.0, show_default=True, help="With --check: seconds of silence allowed.")
@click.option("--queue", "db_queue", default=None, help="RabbitMQ queue to consume. [env EMDC_DB_QUEUE]")
@setting_flags("state_dir")
@click.pass_obj
def db_writer(obj: Context, check: bool, max_age: float, **overrides: Any) -> None:
    """Consume pulses from their own RabbitMQ queue and store each one once in a database.

    EMDC_DB_URL selects the database (empty: SQLite in <state dir>/pulses.sqlite3):

    \b
        EMDC_DB_URL=mysql+pymysql://emdc:PASSWORD@host/emdc emdc db-writer

    The schema is created on first start; each batch is committed before it is
    acknowledged, so restarts never lose or repeat a pulse.
    """
    cfg = obj.config(overrides)
    try:
        from sqlalchemy.exc import OperationalError

        from backend.database import DatabaseError
        from backend.db_writer import heartbeat_path, run_db_writer
    except ImportError as exc:
        raise click.ClickException(f"{exc}: install the database extra, pip install 'emdc[db]'") from None
    if check:
        check_heartbeat(heartbeat_path(cfg), max_age)
        return
    try:
        run_db_writer(cfg, stop_on_signals())
    except DatabaseError as exc:
        raise click.ClickException(str(exc)) from None
    except OperationalError as exc:
        raise click.ClickException(f"cannot use the database: {str(exc.orig)[:300]}") from None


@main.command(short_help="Energy per hour, day or month: table, CSV or chart.")
@click.option("--by", type=click.Choice(["hour", "day", "month"]), default="day", show_default=True,
              help="Period of each row.")
@click.option("--from", "from_", metavar="TIME",
              help="Start: 2026-11-16, 2026-11-16T08:00 or 2026-11 (default: the last 24 hours, 7 days or "
                   "12 months, by --by).")
@click.option("--to", metavar="TIME", help="End, exclusive (default: the end of the current period).")
@click.option("--tz", "tz_name", metavar="ZONE", help="Time zone of the periods, e.g. Europe/Berlin "
              "(default: local time).")
@click.option("--utc", is_flag=True, help="Periods in UTC.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV for spreadsheets instead of the table.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png",
              help="Also draw the periods as a bar chart with the average power into this PNG.")
@click.option("--gap-minutes", type=click.FloatRange(min=15), default=30.0, show_default=True,
              help="A silence this long with no pulse on any channel is shown as no data.")
@setting_flags("state_dir", "meter_id")
@click.pass_obj
def report(obj: Context, by: str, from_: str | None, to: str | None, tz_name: str | None, utc: bool,
           as_csv: bool, plot: Path | None, gap_minutes: float, **overrides: Any) -> None:
    """Energy per hour, day or month from the db-writer's database, active and reactive.

    Periods without any pulse and pulses whose timing was lost are flagged, not
    hidden. Example, one week by day in Berlin time with a chart:

    \b
        emdc report --by day --from 2026-11-16 --to 2026-11-23 --tz Europe/Berlin --plot week.png
    """
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    cfg = obj.config(overrides)
    try:
        from sqlalchemy.exc import OperationalError

        from backend.database import DatabaseError, PulseStore, database_url
        from backend.report import load_report, local_zone, parse_time, render_csv, render_table, report_window
    except ImportError as exc:
        raise click.ClickException(f"{exc}: install the database extra, pip install 'emdc[db]'") from None
    if utc and tz_name:
        raise click.BadParameter("give --tz or --utc, not both", param_hint="--utc")
    try:
        tz = UTC if utc else ZoneInfo(tz_name) if tz_name else local_zone()
    except (ZoneInfoNotFoundError, ValueError):
        raise click.BadParameter(f"unknown time zone {tz_name!r}", param_hint="--tz") from None
    now = datetime.now(UTC)
    try:
        start = None if from_ is None else parse_time(from_, tz)
        end = None if to is None else parse_time(to, tz)
        start, end = report_window(by, tz, now, start, end)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--from/--to") from None
    if start >= now:
        raise click.BadParameter("the report starts in the future", param_hint="--from")
    try:
        store = PulseStore.open(database_url(cfg), create=False)
        try:
            result = load_report(store, meter=cfg.meter_id, by=by, tz=tz, start=start, end=end, now=now,
                                 gap_s=gap_minutes * 60)
        finally:
            store.close()
    except DatabaseError as exc:
        raise click.ClickException(str(exc)) from None
    except OperationalError as exc:
        raise click.ClickException(f"cannot read the database: {str(exc.orig)[:300]}") from None
    click.echo(render_csv(result) if as_csv else render_table(result), nl=False)
    if plot is not None:
        from backend.report import plot as draw

        try:
            draw(result, plot)  # imports matplotlib
        except ImportError as exc:
            raise click.ClickException(f"{exc}: install the report extra, pip install 'emdc[report]'") from None
        except OSError as exc:
            raise click.ClickException(f"cannot write {plot}: {exc.strerror}") from None
        click.echo(f"chart written to {plot}", err=True)


if __name__ == "__main__":
    main()
