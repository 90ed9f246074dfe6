"""The root ``emdc`` group: it only *finds* each side's commands, importing a side when one of its commands runs.

A command is listed as ``"module:attribute"`` and imported when it is
listed or run. The sides' command modules import only click and
:mod:`common`; each command imports its side's machinery when it runs. So
the Pi never needs paho-mqtt or SQLAlchemy, and the server never needs
gpiozero (click's lazy-loading pattern). ``emdc simulate``, the one command
that composes both sides, declares the edge simulator's options from
:mod:`edge.cli` and runs :mod:`emdc.simulate`. Example::

    >>> from click.testing import CliRunner
    >>> CliRunner().invoke(main, ["--version"]).output
    'emdc, version 0.1.0\\n'
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from typing import Any

import click

from common import __version__
from common.command import CommandContext, configure_logging, setting_flags, state_dir, stop_on_signals
from edge.cli import simulation_config, simulation_options, simulation_plan_of

# Command name -> "module:attribute" of its click command or group.
SIDE_COMMANDS = {
    "edge": "edge.cli:edge",
    "writer": "backend.cli:writer",
    "state": "backend.cli:state",
    "ha": "backend.cli:ha",
    "db-writer": "backend.cli:db_writer",
    "dead-letters": "backend.cli:dead_letters",
    "queue": "backend.cli:queue_group",
    "report": "backend.cli:report",
}


class LazyGroup(click.Group):
    """A group whose ``lazy`` commands are imported only when listed or run."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module, attribute = self.lazy[cmd_name].split(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{self.lazy[cmd_name]} is not a click command")
        return command


@click.group(cls=LazyGroup, lazy=SIDE_COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    ctx.obj = CommandContext(config_path, log_level)


@main.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@click.pass_obj
def config_show(obj: CommandContext, /) -> None:
    """Print the effective settings (secrets masked) and where each came from."""
    cfg = obj.config({})
    for name, value in cfg.redacted().items():
        source = cfg.sources.get(name, "default")
        click.echo(f"{name} = {value!r}  # {source}")
    click.echo(f"# inputs ({cfg.inputs_source()})")
    for one in cfg.inputs():
        click.echo(f"input {one.describe()}  # {one.setting}")


@main.command(short_help="Simulated meter, edge and writer in one process.")
@simulation_options
@setting_flags("state_dir", "topic_prefix")
@click.pass_obj
def simulate(obj: CommandContext, /, **options: Any) -> None:
    """Run a simulated meter, the edge and the writer together, and print the final MQTT values.

    Without EMDC_AMQP_URL / EMDC_MQTT_HOST configured, pulses travel through an
    embedded in-process transport (no broker needed); with them, through the
    real brokers. By default it simulates an hour of a household with solar
    panels, a gas boiler and a water meter in seconds; after the values it
    prints the pulses the edge sent per channel.
    """
    from edge.simulator import SimulationRefused
    from emdc.simulate import run_simulation, simulation_settings

    plan, overrides = simulation_plan_of(options, default_speed="720")
    cfg = simulation_config(obj, overrides, plan)
    try:
        state_dir(simulation_settings(cfg))
        values, result = run_simulation(cfg, plan, stop_on_signals())
    except (TimeoutError, SimulationRefused) as exc:
        raise click.ClickException(str(exc)) from None
    for topic, value in sorted(values.items()):
        click.echo(f"{topic} = {value}")
    for line in result.sent_lines(cfg.inputs()):
        click.echo(line)



def default_service() -> str:
    """What this installation runs: the Pi's ``emdc[edge]`` has gpiozero but not paho-mqtt; the server has paho."""
    return "writer" if importlib.util.find_spec("paho") is not None else "edge"


@main.command(short_help="Check the configuration, brokers, permissions, clock and pins; say how to fix each.")
@click.option("--edge", "services", flag_value="edge", multiple=True, help="Check what `emdc edge run` needs.")
@click.option("--writer", "services", flag_value="writer", multiple=True, help="Check what `emdc writer` needs.")
@click.option("--db-writer", "services", flag_value="db-writer", multiple=True,
              help="Check what `emdc db-writer` needs.")
@setting_flags("state_dir", "meter_id", "queue", "topic_prefix", "mqtt_host", "mqtt_port")
@click.pass_obj
def doctor(obj: CommandContext, /, services: tuple[str, ...], **overrides: Any) -> None:
    """Check that this machine's EMDC service can work: one line per check, ✓ or ✗ with the fix.

    \b
    Always: the configuration (and unknown EMDC_* variables), the state dir,
    the RabbitMQ login (refused, DNS, TLS, authentication, vhost).
    --edge: publishing the meter's pulses (a publish that is rolled back, so
    nothing is delivered), clock synchronisation, the pins (opened and closed).
    --writer: consuming its queue, the MQTT login, and publishing under
    topic_prefix and discovery_prefix (a probe that must come back).
    --db-writer: consuming its queue.

    Without a flag: --edge on an edge installation (gpiozero without
    paho-mqtt), --writer otherwise. Exits 1 if any check fails. Run it as
    the service's user with its configuration, e.g. on the Pi
    `sudo -u emdc /opt/emdc/venv/bin/emdc --config /etc/emdc/emdc.toml doctor`.
    """
    from common.doctor import CheckFunction, RabbitMQ, configuration, results, state_directory

    cfg, checks = configuration(obj.config_path, {**overrides, "log_level": obj.log_level})
    configure_logging(cfg.log_level if cfg is not None else obj.log_level or "WARNING")
    failed = False
    for check in checks:
        click.echo(check.line())
        failed |= not check.ok
    if cfg is None:
        raise SystemExit(1)
    with contextlib.ExitStack() as stack:
        rabbit = stack.enter_context(RabbitMQ(cfg))
        functions: list[CheckFunction] = [lambda: state_directory(cfg), rabbit.login]
        for service in dict.fromkeys(services or (default_service(),)):
            if service == "edge":
                from edge.doctor import checks as edge_checks

                functions += edge_checks(cfg, rabbit)
            elif service == "writer":
                from backend.doctor import Mqtt, writer_checks

                functions += writer_checks(cfg, rabbit, stack.enter_context(Mqtt(cfg)))
            else:
                from backend.doctor import db_writer_checks

                functions += db_writer_checks(cfg, rabbit)
        for check in results(functions):
            click.echo(check.line())
            failed |= not check.ok
    if failed:
        raise SystemExit(1)
