"""The Raspberry Pi side's commands: ``emdc edge run``, ``status`` and ``simulate``.

Only click and :mod:`common` are imported here; gpiozero and pika are
imported when a command runs, so listing commands works anywhere.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from common.command import CommandContext, ConfigurationError, setting_flags, state_dir, stop_on_signals
from common.config import GPIO_PINS, Config
from common.inputs import Input

if TYPE_CHECKING:
    from edge.simulator import SimulationPlan

F = TypeVar("F", bound=Callable[..., Any])
# The mock pins of the inputs a simulated load needs and the configuration lacks (another free one if taken).
SIMULATED_PINS = {"active": 17, "reactive": 27, "export": 26, "gas": 22, "water": 23}


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
    """Show the configured inputs, the pulse counters, the outbox depth and the link to RabbitMQ."""
    from edge.outbox import OutboxError
    from edge.status import edge_status_lines

    cfg = obj.config(overrides)
    try:
        lines = edge_status_lines(Path(cfg.state_dir), cfg.inputs())
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
        click.option("--export-power", type=click.FloatRange(min=0, max=10_000_000),
                     help="Constant power returned to the grid in W (enables the export channel)."),
        click.option("--gas-flow", type=click.FloatRange(min=0, max=10_000),
                     help="Constant gas flow in m³/h (enables the gas channel)."),
        click.option("--water-flow", type=click.FloatRange(min=0, max=10_000),
                     help="Constant water flow in L/min (enables the water channel)."),
        click.option("--count", type=click.IntRange(min=1),
                     help="Stop after N active pulses (of the first input if none counts active)."),
        click.option("--duration", type=click.FloatRange(min=0, min_open=True),
                     help="Simulated seconds to run (default 3600 unless --count is given)."),
        click.option("--speed", default=None, help="Time compression factor, or 'max' (as fast as confirmed)."),
        click.option("--profile", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="CSV load profile: seconds,active_w[,reactive_var[,export_w[,gas_m3_per_h"
                          "[,water_l_per_min]]]] per row."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def simulation_plan(*, power: float | None, reactive_power: float | None, export_power: float | None,
                    gas_flow: float | None, water_flow: float | None, count: int | None,
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
    constants = {"reactive": reactive_power, "export": export_power, "gas": gas_flow, "water": water_flow}
    for channel, rate in constants.items():
        if rate is not None:
            load = load.with_constant(channel, rate)
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


def simulation_plan_of(options: dict[str, Any], default_speed: str) -> tuple[SimulationPlan, dict[str, Any]]:
    """The plan of a command's :func:`simulation_options`, and its other options (setting flags)."""
    names = ("power", "reactive_power", "export_power", "gas_flow", "water_flow", "count", "duration", "speed",
             "profile")
    plan = simulation_plan(**{name: options[name] for name in names}, default_speed=default_speed)
    return plan, {key: value for key, value in options.items() if key not in names}


def simulation_config(obj: CommandContext, overrides: dict[str, Any], plan: SimulationPlan) -> Config:
    """The configuration, with an input on a mock pin for each channel of the load that it has none for.

    A reactive or export input is the same kind of output as the configured
    first one (a meter's outputs are alike); a gas or water input is a reed
    switch with the channel's usual quantity per pulse.
    """
    cfg = obj.config(overrides)
    inputs = list(cfg.inputs())
    like = next((one for one in inputs if one.channel == "active"), None)
    missing = [channel for channel in plan.profile.channels() if channel not in {one.channel for one in inputs}]
    for channel in missing:
        used = {one.pin for one in inputs}
        pin = SIMULATED_PINS[channel] if SIMULATED_PINS[channel] not in used else min(set(GPIO_PINS) - used)
        if channel in {"reactive", "export"} and like is not None:
            inputs.append(dataclasses.replace(like, pin=pin, channel=channel, setting="simulated"))
        else:
            kind = "s0" if channel in {"active", "reactive", "export"} else "reed"
            inputs.append(Input.of(pin=pin, channel=channel, type=kind, setting="simulated"))
    return dataclasses.replace(cfg, configured_inputs=tuple(inputs)) if missing else cfg


@edge.command("simulate", short_help="Publish a simulated meter's pulses through the real edge code.")
@simulation_options
@setting_flags("state_dir", "meter_id")
@click.pass_obj
def edge_simulate(obj: CommandContext, /, **options: Any) -> None:
    """Publish the pulses of a simulated meter to RabbitMQ, through the real edge code.

    gpiozero mock pins are driven by a load profile with a virtual clock, so
    timestamps are realistic at any --speed. With --count it exits once all N
    pulses are confirmed by the broker; it then prints the pulses it sent per
    channel. A channel of the load without a configured input gets one on a
    mock pin. Example:

    \b
        emdc edge simulate --power 3000 --count 300 --speed max
        emdc edge simulate --power 500 --export-power 2000 --gas-flow 1.2 --duration 600 --speed max
    """
    from edge.outbox import OutboxError
    from edge.simulator import EdgeSimulation, SimulationRefused

    plan, overrides = simulation_plan_of(options, default_speed="1")
    cfg = simulation_config(obj, overrides, plan)
    stop = stop_on_signals()
    try:
        state_dir(cfg)
        result = EdgeSimulation(cfg, plan).run(stop)
    except (OutboxError, SimulationRefused) as exc:
        raise click.ClickException(str(exc)) from None
    if stop.is_set():
        raise click.ClickException(f"stopped; pulses not yet confirmed stay in the outbox, counters {result.counters}")
    click.echo(f"confirmed by the broker; edge counters (epoch {result.epoch}): {result.counters}")
    for line in result.sent_lines(cfg.inputs()):
        click.echo(line)
