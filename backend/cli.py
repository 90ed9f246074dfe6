"""The server side's commands: ``emdc writer``, ``state``, ``ha``, ``db-writer`` and ``report``.

Only click and :mod:`common` are imported here; pika, paho-mqtt and
SQLAlchemy are imported when a command runs, so listing commands works anywhere.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import click

from common.channels import CHANNELS, channel_spec
from common.command import CommandContext, setting_flags, state_dir, stop_on_signals
from common.config import Config
from common.message import ControlCommand
from common.topology import control_routing_key

DB_EXTRA = "install the database extra, pip install 'emdc[db]'"


def exact_decimal(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Decimal | None:
    """An exact decimal number (a meter reading), rejected with a usage error if malformed (None if not given)."""
    if value is None:
        return None
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise click.BadParameter(f"{value!r} is not a decimal number") from None
    if not number.is_finite():
        raise click.BadParameter(f"{value!r} is not a finite number")
    return number


@contextlib.contextmanager
def rabbitmq_failures(config: Config) -> Iterator[None]:
    """Turn a broker failure into one line naming the broker (without its password), what failed and the fix,
    in the words of ``emdc doctor``."""
    import pika.exceptions

    from common.amqp import describe, diagnose

    try:
        yield
    except (pika.exceptions.AMQPError, OSError) as exc:  # OSError: the host name does not resolve
        what, fix = diagnose(config, exc)
        raise click.ClickException(f"RabbitMQ at {describe(config)}: {what}. Fix: {fix}") from None


def check_heartbeat(config: Config, service: str, max_age_s: float) -> None:
    """``--check``: print ``healthy`` (exit 0) if ``service`` touched its heartbeat within ``max_age_s``."""
    from backend.heartbeat import Heartbeat, HeartbeatStale

    try:
        click.echo(Heartbeat.of(config, service).check(max_age_s))
    except HeartbeatStale as exc:
        raise click.ClickException(str(exc)) from None


@click.command(short_help="Count pulses exactly and publish them to MQTT.")
@click.option("--check", is_flag=True, help="Exit 0 if a running writer showed life recently (health check).")
@click.option("--max-age", default=60.0, show_default=True, help="With --check: seconds of silence allowed.")
@click.option("--take-over", is_flag=True,
              help="Count even though Home Assistant's totals came from another writer's state (a deliberate move).")
@setting_flags("state_dir", "queue", "topic_prefix", "mqtt_host", "mqtt_port")
@click.pass_obj
def writer(obj: CommandContext, /, check: bool, max_age: float, take_over: bool, **overrides: Any) -> None:
    """Consume pulses from RabbitMQ, keep exact energy totals, publish them to MQTT.

    State lives in <state dir>/energy_state.sqlite3 and is saved before each
    acknowledgement, so restarts never lose or repeat a pulse. Writers on one
    queue take turns: one counts, the others stand by and take over when it
    stops, provided their state is the one Home Assistant's totals came from.
    """
    from backend.heartbeat import WRITER

    cfg = obj.config(overrides)
    if check:
        check_heartbeat(cfg, WRITER, max_age)
        return
    from backend.service import run_writer
    from backend.state_store import StateError

    try:
        state_dir(cfg)
        run_writer(cfg, stop_on_signals(), take_over=take_over)
    except StateError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def state() -> None:
    """Inspect or calibrate the writer's saved totals."""


@state.command("show")
@setting_flags("state_dir")
@click.pass_obj
def state_show(obj: CommandContext, /, **overrides: Any) -> None:
    """Print the persisted total of each meter and channel."""
    from backend.state_store import StateError
    from backend.writer import saved_totals

    try:
        lines = saved_totals(obj.config(overrides))
    except StateError as exc:
        raise click.ClickException(str(exc)) from None
    for line in lines:
        click.echo(line)


@state.command("backup")
@click.argument("target", type=click.Path(dir_okay=False, path_type=Path))
@setting_flags("state_dir")
@click.pass_obj
def state_backup(obj: CommandContext, /, target: Path, **overrides: Any) -> None:
    """Copy the saved totals into TARGET, a database file, also while the writer runs."""
    from backend.state_store import StateError, StateStore

    config = obj.config(overrides)
    if config.state_url:
        raise click.ClickException("the writer's state is in the database of state_url: back it up with that "
                                   "database's own tools (mariadb-dump, pg_dump)")
    store = StateStore(Path(config.state_dir))
    try:
        channels = store.backup(target)
    except StateError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"backed up {channels} channel(s) from {store.path} to {target}")


def require_known(config: Config, meter: str, hint: str) -> None:
    """Refuse a meter the writer does not know (a typo), naming the ones it does and ``hint``."""
    from backend.state_store import StateError
    from backend.writer import known_meters

    try:
        known = known_meters(config)
    except StateError as exc:
        raise click.ClickException(str(exc)) from None
    if meter not in known:
        raise click.BadParameter(f"{meter!r} is not a meter the writer knows ({', '.join(known)}){hint}",
                                 param_hint="--meter")


def send_command(config: Config, command: ControlCommand) -> None:
    """Queue ``command`` for the running writer; one line for a broker failure or a missing queue."""
    import pika.exceptions

    from backend.control import send_control
    from common.message import MessageError

    try:
        with rabbitmq_failures(config):
            send_control(config, command)
    except MessageError as exc:
        raise click.BadParameter(str(exc)) from None
    except pika.exceptions.UnroutableError:
        raise click.ClickException(f"no queue is bound for {control_routing_key(command.meter)} on exchange "
                                   f"{config.exchange}: start the writer once so that it declares its queue") from None


@state.command("set-total")
@click.option("--meter", required=True, help="Meter id, e.g. main.")
@click.option("--channel", required=True, type=click.Choice(CHANNELS))
@click.option("--kwh", metavar="DECIMAL", callback=exact_decimal,
              help="The physical meter's reading in kWh (kvarh): active, export or reactive.")
@click.option("--m3", metavar="DECIMAL", callback=exact_decimal, help="The gas meter's reading in m³.")
@click.option("--litres", metavar="DECIMAL", callback=exact_decimal, help="The water meter's reading in litres.")
@click.option("--new-meter", is_flag=True, help="The meter has no total yet: admit and calibrate it anyway (a typo "
              "would otherwise create a meter, and a Home Assistant device).")
@setting_flags("state_dir")
@click.pass_obj
def state_set_total(obj: CommandContext, /, meter: str, channel: str, kwh: Decimal | None, m3: Decimal | None,
                    litres: Decimal | None, new_meter: bool, **overrides: Any) -> None:
    """Set a total to the physical meter reading, through the broker.

    The command is queued with the pulses, so the running writer applies it in
    order, without racing its state file, and logs the old and new value. Run it
    where the writer's state dir is (the meters it knows are read from there).
    A new meter calibrated with --new-meter is admitted: the writer counts it.
    The reading is given in the channel's unit: --kwh for active, export and
    reactive, --m3 for gas, --litres for water.
    """
    from common.message import SetTotal, total_key

    given = {key: value for key, value in (("kwh", kwh), ("m3", m3), ("litres", litres)) if value is not None}
    fits = total_key(channel)
    if list(given) != [fits]:
        unit = channel_spec(channel).total_unit
        raise click.UsageError(f"channel {channel} is read in {unit}: give its reading as --{fits} (and no other)")
    reading = given[fits]
    cfg = obj.config(overrides)
    if not new_meter:
        require_known(cfg, meter, "; to calibrate a new meter on purpose, add --new-meter")
    send_command(cfg, SetTotal(meter, channel, reading, time.time_ns(), secrets.token_hex(8)))
    click.echo(f"sent: set {meter}/{channel} to {reading} {channel_spec(channel).total_unit}; the writer applies it "
               "in order with the pulses")


@state.command("set-pulse-energy")
@click.option("--meter", required=True, help="Meter id, e.g. main.")
@click.option("--channel", required=True, type=click.Choice(CHANNELS))
@click.option("--wh", required=True, type=float, help="Quantity per pulse in the channel's pulse unit: Wh or varh "
              "(1000 imp/kWh = 1), m³ for gas, L for water.")
@setting_flags("state_dir")
@click.pass_obj
def state_set_pulse_energy(obj: CommandContext, /, meter: str, channel: str, wh: float, **overrides: Any) -> None:
    """Change a channel's energy per pulse (the meter's constant), through the broker.

    A channel keeps the energy per pulse of its first counted pulse; pulses
    stating another one are held back in the dead-letter queue. After a real
    change (a new meter, a new constant) run this, then readmit them with
    `emdc dead-letters readmit`.
    """
    from common.message import SetPulseEnergy

    cfg = obj.config(overrides)
    require_known(cfg, meter, "")
    send_command(cfg, SetPulseEnergy(meter, channel, wh, secrets.token_hex(8)))
    click.echo(f"sent: {meter}/{channel} counts {wh:g} per pulse from now on; readmit what was held back for it")


@state.command("forget")
@click.option("--meter", required=True, help="Meter id to forget.")
@setting_flags("state_dir")
@click.pass_obj
def state_forget(obj: CommandContext, /, meter: str, **overrides: Any) -> None:
    """Drop a meter's totals and its Home Assistant device, through the broker.

    For a meter that is gone or was never yours (a typo, a stray Pi): the
    writer stops counting it and clears its discovery and values. A meter in
    the meters setting must be removed there first.
    """
    from common.message import ForgetMeter

    cfg = obj.config(overrides)
    if meter in cfg.counted_meters():
        raise click.BadParameter(f"{meter!r} is in the meters setting ({', '.join(cfg.counted_meters())}): remove "
                                 "it there and restart the writer first", param_hint="--meter")
    require_known(cfg, meter, "")
    send_command(cfg, ForgetMeter(meter, secrets.token_hex(8)))
    click.echo(f"sent: forget meter {meter}; the writer drops its totals and its Home Assistant device")


@click.group()
def ha() -> None:
    """Home Assistant integration."""


@ha.command("remove")
@click.option("--meter", "meters", multiple=True, help="Meter id (repeatable; default: every meter in the state "
              "file and the configured meters).")
@setting_flags("state_dir", "topic_prefix", "mqtt_host", "mqtt_port")
@click.pass_obj
def ha_remove(obj: CommandContext, /, meters: tuple[str, ...], **overrides: Any) -> None:
    """Remove EMDC's devices from Home Assistant (empty retained discovery configs).

    Only topics that hold a config are cleared. Stop the writer first, or it
    announces them again when it reconnects or Home Assistant restarts; or set
    EMDC_DISCOVERY=off for it.
    """
    from backend.discovery import Discovery
    from backend.mqtt_publisher import MqttFailure, publish_once
    from backend.state_store import StateError
    from backend.writer import known_meters

    cfg = obj.config(overrides)
    if not meters:
        try:
            meters = known_meters(cfg)
        except StateError as exc:
            raise click.ClickException(str(exc)) from None
    discovery = Discovery(cfg.discovery_prefix, cfg.topic_prefix)
    filters = [f for meter in meters for f in discovery.scan_filters(meter)]
    try:
        cleared = publish_once(cfg, filters, lambda retained: discovery.removal_messages(meters, retained))
    except MqttFailure as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot reach the MQTT broker {cfg.mqtt_host}:{cfg.mqtt_port} "
                                   f"({exc.strerror or exc})") from None
    click.echo(f"removed the Home Assistant discovery of meter(s) {', '.join(meters)} ({cleared} topics)")


def writer_queue(config: Config, writer_name: str) -> str:
    return config.db_queue if writer_name == "db" else config.writer_queue()


WRITER_CHOICE = click.option("--writer", "writer_name", type=click.Choice(["mqtt", "db"]), default="mqtt",
                             show_default=True, help="Whose dead letters: the MQTT writer's or the db-writer's queue.")


@click.group("dead-letters")
def dead_letters() -> None:
    """Inspect and re-admit the messages a writer held back."""


@dead_letters.command("list", short_help="Show held-back messages and why each was refused.")
@WRITER_CHOICE
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Show at most N.")
@click.pass_obj
def dead_letters_list(obj: CommandContext, /, writer_name: str, limit: int) -> None:
    """Show held-back messages with the reason each was refused; they stay where they are."""
    from backend.dead_letters import peek

    cfg = obj.config({})
    queue = writer_queue(cfg, writer_name)
    with rabbitmq_failures(cfg):
        letters, total = peek(cfg, queue, limit)
    for number, letter in enumerate(letters, 1):
        click.echo(f"{number}. {letter.describe()}")
    click.echo(f"{total} message(s) held back in {queue}.dead" + (f", {len(letters)} shown" if total else ""))


@dead_letters.command("readmit", short_help="Send held-back messages back to their writer.")
@WRITER_CHOICE
@click.option("--count", type=click.IntRange(min=1), help="Re-admit only the first N (default: all).")
@click.pass_obj
def dead_letters_readmit(obj: CommandContext, /, writer_name: str, count: int | None) -> None:
    """Send held-back messages back to their writer, which then counts them without the counter-jump guard.

    Inspect them first with `emdc dead-letters list`. Needs an account that may
    publish to the default exchange (the deployment's admin account).
    """
    from backend.dead_letters import readmit

    cfg = obj.config({})
    queue = writer_queue(cfg, writer_name)
    with rabbitmq_failures(cfg):
        moved = readmit(cfg, queue, count)
    click.echo(f"re-admitted {moved} message(s) from {queue}.dead to {queue}")


@click.command("db-writer", short_help="Store every pulse once in SQLite or MariaDB.")
@click.option("--check", is_flag=True, help="Exit 0 if a running db-writer showed life recently (health check).")
@click.option("--max-age", default=60.0, show_default=True, help="With --check: seconds of silence allowed.")
@click.option("--queue", "db_queue", default=None, help="RabbitMQ queue to consume. [env EMDC_DB_QUEUE]")
@setting_flags("state_dir")
@click.pass_obj
def db_writer(obj: CommandContext, /, check: bool, max_age: float, **overrides: Any) -> None:
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
        from backend.db_writer import run_db_writer
        from backend.heartbeat import DB_WRITER
    except ImportError as exc:
        raise click.ClickException(f"{exc}: {DB_EXTRA}") from None
    if check:
        check_heartbeat(cfg, DB_WRITER, max_age)
        return
    try:
        state_dir(cfg)
        run_db_writer(cfg, stop_on_signals())
    except DatabaseError as exc:
        raise click.ClickException(str(exc)) from None
    except OperationalError as exc:
        raise click.ClickException(f"cannot use the database: {str(exc.orig)[:300]}") from None


@click.command(short_help="Energy per hour, day or month: table, CSV or chart.")
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
def report(obj: CommandContext, /, by: str, from_: str | None, to: str | None, tz_name: str | None, utc: bool,
           as_csv: bool, plot: Path | None, gap_minutes: float, **overrides: Any) -> None:
    """Energy per hour, day or month from the db-writer's database: every kind of channel, each in its unit.

    Periods without any pulse and pulses whose timing was lost are flagged, not
    hidden. Example, one week by day in Berlin time with a chart:

    \b
        emdc report --by day --from 2026-11-16 --to 2026-11-23 --tz Europe/Berlin --plot week.png
    """
    from datetime import UTC, datetime

    cfg = obj.config(overrides)
    try:
        from sqlalchemy.exc import OperationalError

        from backend.database import DatabaseError, PulseStore, database_url
        from backend.report import BadRequest, load_report, render_csv, render_table, request_window, request_zone
    except ImportError as exc:
        raise click.ClickException(f"{exc}: {DB_EXTRA}") from None
    now = datetime.now(UTC)
    try:
        tz = request_zone(tz_name, utc)
        start, end = request_window(by, tz, now, from_, to)
    except BadRequest as exc:
        raise click.BadParameter(str(exc), param_hint=exc.option) from None
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


@click.group("queue")
def queue_group() -> None:
    """Maintain the writers' RabbitMQ queues."""


@queue_group.command("migrate", short_help="Re-declare a writer queue with today's arguments and queue type.")
@click.option("--writer", "writer_name", type=click.Choice(["mqtt", "db"]), default="mqtt", show_default=True,
              help="Whose queue: the MQTT writer's or the db-writer's.")
@click.pass_obj
def queue_migrate(obj: CommandContext, /, writer_name: str) -> None:
    """Rebuild a writer queue and its dead-letter queue with today's arguments, losing no message.

    For a queue an older version declared without single active consumer, or
    to turn a classic queue into a quorum queue (set queue_type = "quorum").

    Stop that queue's writers first; the edges may keep publishing. Needs an
    account that may declare queues (the deployment's admin account, e.g.
    EMDC_AMQP_URL=amqp://emdc-admin:PASSWORD@host/).
    """
    from backend.queue_migration import MigrationRefused, migrate
    from common.topology import DB_WRITER_BINDINGS, WRITER_BINDINGS

    cfg = obj.config({})
    queue = writer_queue(cfg, writer_name)
    try:
        with rabbitmq_failures(cfg):
            held = migrate(cfg, queue, DB_WRITER_BINDINGS if writer_name == "db" else WRITER_BINDINGS)
    except MigrationRefused as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"migrated {queue}: {cfg.queue_type} queue with single active consumer, {held} message(s) kept; "
               "start its writers again")
