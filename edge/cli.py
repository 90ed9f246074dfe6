"""The Raspberry Pi side's commands: ``emdc edge run``, ``status`` and ``simulate``.

Only click and :mod:`common` are imported here; gpiozero and pika are
imported when a command runs, so listing commands works anywhere.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from common.command import CommandContext, ConfigurationError, setting_flags, state_dir, stop_on_signals
from common.config import Config

if TYPE_CHECKING:
    from edge.simulator import SimulationPlan

F = TypeVar("F", bound=Callable[..., Any])
SIMULATED_REACTIVE_PIN = 27


@click.group()
def edge() -> None:
    """The Raspberry Pi side: read pulses and publish them."""


@edge.command("run", short_help="Read the meter on GPIO and publish every pulse.")
@setting_flags("state_dir", "meter_id")
@click.pass_obj
def edge_run(obj: CommandContext, /, **overrides: Any) -> None:
    """Read the meter's pulse outputs on GPIO and publish every pulse to RabbitMQ.

    Runs until SIGTERM/SIGINT. Under systemd (Type=notify) it reports READY
    once the pins and the outbox are open, and feeds the watchdog while its
    threads are alive. Pins that cannot be opened exit with status 78
    (EX_CONFIG), which the unit does not restart: retrying would not help.
    """
    from edge.outbox import OutboxError
    from edge.service import GpioUnavailable, run_edge

    try:
        cfg = obj.config(overrides)
        state_dir(cfg)
        sys.exit(run_edge(cfg, stop_on_signals()))
    except OutboxError as exc:
        raise click.ClickException(str(exc)) from None
    except GpioUnavailable as exc:
        raise ConfigurationError(str(exc)) from None



@edge.command("status", short_help="Counters, outbox depth, last confirm, link state.")
@setting_flags("state_dir")
@click.pass_obj
def edge_status(obj: CommandContext, /, **overrides: Any) -> None:
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


def simulation_options(command: F) -> F:
    """The load and pace options of a simulated meter (``emdc edge simulate`` and ``emdc simulate``)."""
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
                    duration: float | None, speed: str | None, profile: Path | None,
                    default_speed: str) -> SimulationPlan:
    """The plan the options of :func:`simulation_options` describe; a bad option is a usage error."""
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


def simulation_config(obj: CommandContext, overrides: dict[str, Any], plan: SimulationPlan) -> Config:
    """A load with reactive power needs a reactive input: use a mock pin unless one is configured."""
    cfg = obj.config(overrides)
    if cfg.reactive_pin < 0 and plan.profile.has_reactive():
        cfg = obj.config({**overrides, "reactive_pin": SIMULATED_REACTIVE_PIN})
    return cfg


@edge.command("simulate", short_help="Publish a simulated meter's pulses through the real edge code.")
@simulation_options
@setting_flags("state_dir", "meter_id")
@click.pass_obj
def edge_simulate(obj: CommandContext, /, power: float | None, reactive_power: float | None, count: int | None,
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
        state_dir(cfg)
        result = EdgeSimulation(cfg, plan).run(stop)
    except OutboxError as exc:
        raise click.ClickException(str(exc)) from None
    if stop.is_set():
        raise click.ClickException(f"stopped; pulses not yet confirmed stay in the outbox, counters {result.counters}")
    click.echo(f"confirmed by the broker; edge counters (epoch {result.epoch}): {result.counters}")
