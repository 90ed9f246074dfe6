"""One Pi reading every meter of a house (import, export, gas, water) on gpiozero mock pins, through the real edge
and the real RabbitMQ: each pulse arrives under pulse.<meter>.<channel> with its channel's seq and quantity."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pika
import pytest
from click.testing import CliRunner
from gpiozero import DigitalInputDevice

from common import __version__
from common.config import load_config
from common.message import decode
from common.topology import DB_WRITER_BINDINGS
from edge.service import EdgeService, GpioUnavailable
from edge.simulator import VirtualClockFactory
from edge.tick_clock import TickClock
from emdc.cli import main
from tests.support import AMQP_URL, HOUSE_INPUTS, Names, declare_queue, queue_depth, wait_until

HOUSE = HOUSE_INPUTS + """

[[inputs]]
pin = 23
channel = "water"
type = "led"
per_pulse = 0.5
"""
T0_NS = 1_764_000_000_000_000_000


def drive(factory: VirtualClockFactory, pin: int, closed: bool, at_s: float, pull_up: bool = True) -> None:
    """Move pin ``pin`` at virtual time ``at_s``: ``closed`` is the meter's output on (low with a pull-up)."""
    factory.now = at_s
    level = closed != pull_up
    factory.pin(pin).drive_high() if level else factory.pin(pin).drive_low()


def test_one_pi_reads_import_export_gas_and_water_each_on_its_own_channel(names: Names, tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    declare_queue(names, DB_WRITER_BINDINGS)  # pulses alone: the edge's statuses would add to the depth
    path = tmp_path / "emdc.toml"
    path.write_text(HOUSE)
    config = load_config(path, env=names.env(EMDC_STATE_DIR=names.edge_dir))
    factory = VirtualClockFactory()
    clock = TickClock(factory.ticks, wall_ns=lambda: T0_NS, follow_wall_clock=False)
    service = EdgeService(config, pin_factory=factory, clock=clock, clock_synced=lambda: None)
    # The LED sensor drives its line high; the others are pulled up and pulled low by a pulse.
    assert [device.pull_up for device in service.inputs] == [True, True, True, False]
    service.start()
    edges: list[tuple[float, int, bool, bool]] = []  # (time, pin, closed, pulled up)
    for k in range(6):  # 30 ms S0 pulses of import, then of export, every 100 ms
        edges += [(1 + k * 0.1, 17, True, True), (1.03 + k * 0.1, 17, False, True)]
        edges += [(5 + k * 0.1, 27, True, True), (5.03 + k * 0.1, 27, False, True)]
    for k in range(3):  # 250 ms reed closures 3 s apart, each bouncing as it closes and opens
        t = 10 + 3 * k
        edges += [(t, 22, True, True), (t + 0.002, 22, False, True), (t + 0.004, 22, True, True),
                  (t + 0.25, 22, False, True), (t + 0.253, 22, True, True), (t + 0.255, 22, False, True)]
    for k in range(4):  # 10 ms LED flashes a second apart, and a 0.5 ms glitch
        edges += [(20 + k, 23, True, False), (20.01 + k, 23, False, False)]
    edges += [(30, 23, True, False), (30.0005, 23, False, False)]
    for at_s, pin, closed, pull_up in sorted(edges):
        drive(factory, pin, closed, at_s, pull_up)
    expected = {"active": 6, "export": 6, "gas": 3, "water": 4}
    wait_until(lambda: queue_depth(names.queue) == sum(expected.values()), 15, "every pulse at the broker")
    service.stop()

    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as connection:
        channel = connection.channel()
        got = [channel.basic_get(names.queue, auto_ack=True) for _ in range(sum(expected.values()))]
    by_channel: dict[str, list] = collections.defaultdict(list)
    for method, _, body in got:
        pulse = decode(body)
        assert method.routing_key == f"pulse.house.{pulse.channel}"
        by_channel[pulse.channel].append(pulse)
    assert {c: [p.seq for p in ps] for c, ps in by_channel.items()} == {c: list(range(1, n + 1))
                                                                       for c, n in expected.items()}
    assert {c: {p.wh for p in ps} for c, ps in by_channel.items()} == {"active": {0.1}, "export": {0.1},
                                                                      "gas": {0.01}, "water": {0.5}}
    # A gas pulse is stamped at the first opening of its closure, its bounces ignored.
    assert [p.ts_ns for p in by_channel["gas"]] == [T0_NS + round((10 + 3 * k + 0.25) * 1e9) for k in range(3)]
    assert service.recorder.filters["gas"].rejected == 0
    assert service.recorder.filters["water"].rejected == 1  # the glitch
    assert "1 edge pairs rejected as noise so far (water 1)" in caplog.text  # the log names the channel

    status = CliRunner().invoke(main, ["--config", str(path), "edge", "status"],
                                env=names.env(EMDC_STATE_DIR=names.edge_dir)).output.splitlines()
    assert status[:4] == [
        "input GPIO17: active, s0, 0.1 Wh per pulse, pulses >= 25 ms, >= 1.8 ms apart",
        "input GPIO27: export, s0, 0.1 Wh per pulse, pulses >= 25 ms, >= 1.8 ms apart",
        "input GPIO22: gas, reed, 0.01 m³ per pulse, pulses >= 80 ms, bounce 20 ms, >= 1125 ms apart",
        "input GPIO23: water, led, 0.5 L per pulse, pulses >= 2 ms, >= 150 ms apart",
    ]
    assert "counter house/gas: 3 pulses" in status and "counter house/water: 4 pulses" in status
    assert f"software: emdc {__version__}" in status
    assert any(line.startswith("CPU temperature: ") and (line.endswith(" °C") or line.endswith("by the kernel"))
               for line in status)


def test_a_pin_that_cannot_be_opened_names_its_input(names: Names, tmp_path: Path) -> None:
    path = tmp_path / "emdc.toml"
    path.write_text(HOUSE)
    config = load_config(path, env=names.env(EMDC_STATE_DIR=names.edge_dir))
    factory = VirtualClockFactory()
    blocker = DigitalInputDevice(22, pin_factory=factory)  # another program holds the gas input's pin
    try:
        with pytest.raises(GpioUnavailable, match=re.escape("GPIO22 ([[inputs]] #3: gas) is already in use")):
            EdgeService(config, pin_factory=factory, clock=TickClock(factory.ticks), clock_synced=lambda: None)
    finally:
        blocker.close()
