"""Clock faults on the real edge: ``emdc edge run`` under libfaketime, a real writer on the real clock.

A Pi has no real-time clock: it may start hours or years off, and NTP or an
operator then steps the clock, forwards or back. The edge stamps pulses by the
wall clock and follows each step (edge/tick_clock.py); the writer counts every
pulse by its counter and trusts a timestamp only where it can check it
(backend/trust.py). Unit tests cover those rules one by one; these run the
whole path as deployed, because the faults live between the parts: the
recorder's re-anchoring, the counter store across restarts, the trust
decisions of a writer that sees only messages.

The edge process is tests/metered_edge.py, whose meter pulses the mock pin at
a known rate and writes how many pulses it produced. It runs under libfaketime
with only the wall clock faked: the pin ticks stay on the real monotonic
clock, as a Pi's kernel timestamps do, and the offset is re-read from a file at
every call, so a test steps the clock of the running edge by rewriting that
file. The writer runs on the real clock: it is the reference.

Each case checks what matters to a user: the writer's total equals the pulses
the meter produced, exactly; nothing is dead-lettered; power is shown only
while timestamps can be trusted; and the logs tell the story in a few lines
(the step once, with its direction; distrust once; trust again once), not a
line per pulse.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from common.topology import dead_letter_queue
from edge.clock_sync import kernel_clock_synced
from edge.outbox import FILENAME, OutboxReader
from tests.support import (
    EmdcProcess,
    MeteredEdge,
    MqttWatcher,
    Names,
    TcpProxy,
    amqp_parameters,
    amqp_url_at,
    queue_depth,
    saved_total_uwh,
    start_writer,
    wait_until,
    writer_env,
)

pytestmark = pytest.mark.slow

# The multi-threaded variant: with the plain libfaketime.so.1, threads reading the clock at the same time
# now and then get the real time instead of the faked one (hundreds of times a second with four threads),
# which looks to the edge like a wall clock stepping back and forth.
LIBFAKETIME_PATTERNS = ("/usr/lib/*/faketime/libfaketimeMT.so.1", "/usr/lib/faketime/libfaketimeMT.so.1",
                        "/usr/local/lib/faketime/libfaketimeMT.so.1")
HOUR_S = 3600.0
TWO_YEARS_S = 2 * 365 * 86_400.0  # libfaketime's "y" is 365 days
UWH_PER_PULSE = 1_000_000  # the default 1 Wh per pulse
# The recorder re-anchors its clock every 10 s (edge/reader.py), so a step shows within that, plus slack.
REANCHOR_WAIT_S = 20.0

Spawn = Callable[..., EmdcProcess]


@pytest.fixture(scope="session")
def libfaketime() -> str:
    """The preload library of Debian's faketime package (installed by .ci/run), for a multi-threaded process."""
    for pattern in LIBFAKETIME_PATTERNS:
        if found := sorted(glob.glob(pattern)):
            return found[0]
    pytest.fail("libfaketime not found: install the faketime package (see .ci/run)")


class Pi(MeteredEdge):
    """A :class:`~tests.support.MeteredEdge` whose wall clock the test sets, through libfaketime's clock file."""

    def __init__(self, names: Names, directory: Path, libfaketime: str) -> None:
        # The offset is read from the clock file at every call (no cache), so a step takes effect at once.
        super().__init__(names, directory, LD_PRELOAD=libfaketime, FAKETIME_DONT_FAKE_MONOTONIC=1,
                         FAKETIME_TIMESTAMP_FILE=directory / "faketime", FAKETIME_NO_CACHE=1)
        self.clock_file = directory / "faketime"
        self.env.pop("FAKETIME", None)  # it would take priority over the file

    def set_clock(self, offset: str) -> None:
        """Set the edge's wall clock relative to the real one, in libfaketime's syntax: "+0", "-3600", "-2y"."""
        tmp = self.clock_file.with_suffix(".tmp")
        tmp.write_text(offset + "\n")
        tmp.replace(self.clock_file)  # never a half-written file for the edge to read

    def start(self, clock: str = "+0", clock_sync: str = "unknown", **env: str) -> None:
        """Start the edge with its wall clock at ``clock``; return once its pins and counter store are open."""
        self.set_clock(clock)
        super().start(EMDC_CLOCK_SYNC=clock_sync, **env)

    def stop_cleanly(self) -> None:
        """Stop the running edge (SIGTERM), as systemd does: its epoch continues at the next start."""
        assert self.stop() == 0, self.log()
        assert "Traceback" not in self.log(), self.log()


@pytest.fixture
def pi(names: Names, tmp_path: Path, libfaketime: str) -> Iterator[Pi]:
    device = Pi(names, tmp_path / "pi", libfaketime)
    yield device
    device.end()


class PowerWatcher(MqttWatcher):
    """An MQTT watcher that tells which batch of the writer each active power value came with.

    The writer publishes a batch's values (energy, then power) after it has
    logged what the batch changed, so a value published with the batch that
    logged a line arrives after that line's time, and values of earlier
    batches may arrive a little later too. Each power value is therefore timed
    by the energy value before it, which the same batch published first: the
    batch is from before a log line exactly when its energy arrived before it.
    """

    def __init__(self, prefix: str) -> None:
        self.energy_topic = f"{prefix}/active_energy"
        self.power_topic = f"{prefix}/active_power"
        self._batch_at = 0.0  # arrival of the latest energy value
        self.power_values: list[tuple[float, str]] = []  # (arrival of its batch's energy, power)
        self._power_lock = threading.Lock()
        super().__init__(f"{prefix}/#")

    def _on_message(self, client: object, userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.energy_topic:
            self._batch_at = time.time()
        elif message.topic == self.power_topic:
            with self._power_lock:
                self.power_values.append((self._batch_at, message.payload.decode()))
        super()._on_message(client, userdata, message)

    def power_published(self, after: float, before: float = float("inf")) -> list[str]:
        """Active power values of the batches published between ``after`` and ``before`` (epoch seconds)."""
        with self._power_lock:
            return [value for at, value in self.power_values if after <= at < before]

    def wait_for_power_after(self, after: float, timeout: float = 10) -> None:
        wait_until(lambda: self.power_published(after), timeout, "the writer to publish active power")


@pytest.fixture
def power(names: Names) -> Iterator[PowerWatcher]:
    watcher = PowerWatcher(names.prefix)
    yield watcher
    watcher.close()


# -- reading the logs -----------------------------------------------------------------

STEP = re.compile(r"the wall clock stepped (forward|back) by ([0-9.]+) s")
BEHIND = re.compile(r"the wall clock is ([0-9.]+) s behind the last recorded pulse")
DISTRUST = re.compile(r"timestamps not trusted: (.*); power is unknown")
TRUSTED_AGAIN = "timestamps trusted again"


def steps(log: str) -> list[tuple[str, float]]:
    """The clock steps an edge logged, in order: ("forward" or "back", seconds)."""
    return [(direction, float(seconds)) for direction, seconds in STEP.findall(log)]


def assert_steps(log: str, *expected: tuple[str, float]) -> None:
    """The edge logged exactly these clock steps, in order (in seconds within 1 s: measured, not set)."""
    found = steps(log)
    assert [direction for direction, _ in found] == [direction for direction, _ in expected], log
    assert all(abs(seconds - want) <= 1 for (_, seconds), (_, want) in zip(found, expected, strict=True)), log


def logged_at(log: str, text: str) -> float:
    """When the first line containing ``text`` was logged (epoch seconds; for the writer, by the real clock)."""
    line = next(line for line in log.splitlines() if text in line)
    return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def wait_logged(process: Callable[[], str], text: str, timeout: float, what: str) -> float:
    """Wait for ``text`` in a log; return when it was logged."""
    wait_until(lambda: text in process(), timeout, what)
    return logged_at(process(), text)


def assert_counted_exactly(names: Names, produced: int) -> None:
    """The writer's saved total is the meter's pulses, no more and no less; no pulse was dead-lettered."""
    expected = produced * UWH_PER_PULSE
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: saved_total_uwh(names.writer_dir) == expected, 30, "the writer's total")
    assert saved_total_uwh(names.writer_dir) == expected, f"the meter produced {produced} pulses"
    assert queue_depth(dead_letter_queue(names.queue)) == 0


def assert_distrusted_for_good(writer_log: str, reason: str, power: PowerWatcher, since: float) -> None:
    """The writer said once, with ``reason``, that it stopped trusting the times, never that it trusts them
    again, and published no power from ``since`` on."""
    [distrust] = DISTRUST.findall(writer_log)
    assert reason in distrust
    assert TRUSTED_AGAIN not in writer_log
    assert power.power_published(since) == []


def run_meter_until(pi: Pi, more: int, timeout: float = 30) -> None:
    """Let the meter produce ``more`` pulses from now (so that some are stamped by the clock as it is now)."""
    target = pi.produced() + more
    wait_until(lambda: pi.produced() >= target, timeout, f"{more} more pulses")


# -- the cases --------------------------------------------------------------------------


def test_an_hour_ahead_for_15_s_then_corrected(names: Names, spawn: Spawn, pi: Pi, power: PowerWatcher) -> None:
    """Someone sets the Pi's clock an hour ahead, then corrects it: the edge follows both steps; pulses
    stamped ahead are counted, not trusted, and power shows again once the times are right."""
    writer = start_writer(spawn, names, writer_env(names))
    pi.start("+0")
    pi.meter_on()
    power.wait_for_power_after(0)

    pi.set_clock("+3600")
    ahead_since = time.monotonic()
    wait_until(lambda: steps(pi.log()), REANCHOR_WAIT_S, "the edge to follow the step forward")
    distrusted_at = wait_logged(writer.log, "timestamps not trusted", 10, "the writer to distrust the times")
    pause = ahead_since + 15 - time.monotonic()
    if pause > 0:
        time.sleep(pause)
    pi.set_clock("+0")
    trusted_at = wait_logged(writer.log, TRUSTED_AGAIN, REANCHOR_WAIT_S, "the writer to trust the times again")
    power.wait_for_power_after(trusted_at)
    produced = pi.meter_off()

    assert_counted_exactly(names, produced)
    pi.stop_cleanly()
    assert_steps(pi.log(), ("forward", HOUR_S), ("back", HOUR_S))
    [distrust] = DISTRUST.findall(writer.log())
    assert "ahead of the writer's clock" in distrust
    assert writer.log().count(TRUSTED_AGAIN) == 1, writer.log()
    assert power.power_published(distrusted_at, trusted_at) == []


def test_two_years_behind_after_a_clean_stop_then_an_ntp_step_forward(names: Names, spawn: Spawn, pi: Pi,
                                                                       power: PowerWatcher) -> None:
    """A Pi restarts without its clock, two years behind, then NTP sets it: the epoch continues across the
    clean stop, the pulses stamped in the past are counted without being trusted, and power comes back."""
    writer = start_writer(spawn, names, writer_env(names))
    pi.start("+0")
    pi.meter_on()
    power.wait_for_power_after(0)
    run_meter_until(pi, 20)
    assert_counted_exactly(names, pi.meter_off())
    pi.stop_cleanly()

    pi.start("-2y")  # the Pi rebooted without its clock, and NTP has not set it yet
    pi.meter_on()
    distrusted_at = wait_logged(writer.log, "timestamps not trusted", 15, "the writer to distrust the times")
    run_meter_until(pi, 20)
    pi.set_clock("+0")
    trusted_at = wait_logged(writer.log, TRUSTED_AGAIN, REANCHOR_WAIT_S, "the writer to trust the times again")
    power.wait_for_power_after(trusted_at)
    produced = pi.meter_off()

    assert_counted_exactly(names, produced)
    pi.stop_cleanly()
    [behind] = BEHIND.findall(pi.log())
    assert float(behind) == pytest.approx(TWO_YEARS_S, abs=60)
    assert_steps(pi.log(0))
    assert_steps(pi.log(), ("forward", TWO_YEARS_S))
    assert "new counter epoch" not in pi.log() + writer.log(), "the clean stop continues the epoch"
    [distrust] = DISTRUST.findall(writer.log())
    assert "not after the channel's previous pulse" in distrust
    assert writer.log().count(TRUSTED_AGAIN) == 1, writer.log()
    assert power.power_published(distrusted_at, trusted_at) == []


def test_first_start_two_years_behind_and_unsynchronised_then_an_ntp_step_forward(
        names: Names, spawn: Spawn, pi: Pi, power: PowerWatcher) -> None:
    """A new Pi's first boot: a new counter store, the clock far behind, and the kernel says it is unsynchronised.

    On a Pi, NTP then also marks the clock synchronised; this case needs a host
    whose kernel says it is not (clock_sync=kernel), and it stays so throughout.
    """
    if kernel_clock_synced() is not False:
        pytest.skip("this host's kernel reports its clock synchronised, so no edge here can say it is not")
    writer = start_writer(spawn, names, writer_env(names))
    pi.start("-2y", clock_sync="kernel")
    pi.meter_on()
    wait_logged(writer.log, "timestamps not trusted", 15, "the writer to distrust the times")
    pi.set_clock("+0")
    wait_until(lambda: steps(pi.log()), REANCHOR_WAIT_S, "the edge to follow the step forward")
    run_meter_until(pi, 20)
    produced = pi.meter_off()

    assert_counted_exactly(names, produced)
    pi.stop_cleanly()
    assert_steps(pi.log(), ("forward", TWO_YEARS_S))
    assert pi.log().count("NOT synchronised") == 1, "said once at the start, not per pulse"
    assert_distrusted_for_good(writer.log(), "the edge reports its clock as not synchronised", power, 0)


def test_stepped_back_an_hour_while_running(names: Names, spawn: Spawn, pi: Pi, power: PowerWatcher) -> None:
    """The clock of a running edge goes back an hour, the wrong way: the edge follows it; the pulses after the
    step are behind the last trusted one, so they are counted without power until the times pass it."""
    writer = start_writer(spawn, names, writer_env(names))
    pi.start("+0")
    pi.meter_on()
    power.wait_for_power_after(0)

    pi.set_clock("-3600")
    wait_until(lambda: steps(pi.log()), REANCHOR_WAIT_S, "the edge to follow the step back")
    distrusted_at = wait_logged(writer.log, "timestamps not trusted", 10, "the writer to distrust the times")
    run_meter_until(pi, 20)
    produced = pi.meter_off()

    assert_counted_exactly(names, produced)
    pi.stop_cleanly()
    assert_steps(pi.log(), ("back", HOUR_S))
    assert_distrusted_for_good(writer.log(), "not after the channel's previous pulse", power, distrusted_at)


def test_restarted_an_hour_behind_after_a_clean_stop(names: Names, spawn: Spawn, pi: Pi,
                                                     power: PowerWatcher) -> None:
    """Stopped cleanly at the right time, restarted an hour behind: the edge says so when it starts, the epoch
    continues, and the writer counts on without trusting the times or showing power."""
    writer = start_writer(spawn, names, writer_env(names))
    pi.start("+0")
    pi.meter_on()
    power.wait_for_power_after(0)
    run_meter_until(pi, 20)
    assert_counted_exactly(names, pi.meter_off())
    pi.stop_cleanly()

    pi.start("-3600")
    pi.meter_on()
    distrusted_at = wait_logged(writer.log, "timestamps not trusted", 15, "the writer to distrust the times")
    run_meter_until(pi, 20)
    produced = pi.meter_off()

    assert_counted_exactly(names, produced)
    pi.stop_cleanly()
    [behind] = BEHIND.findall(pi.log())
    assert float(behind) == pytest.approx(HOUR_S, abs=60)
    assert_steps(pi.log(0) + pi.log())
    assert "new counter epoch" not in pi.log() + writer.log(), "the clean stop continues the epoch"
    assert_distrusted_for_good(writer.log(), "not after the channel's previous pulse", power, distrusted_at)


def test_pulses_resent_across_a_step_back_are_duplicates(names: Names, spawn: Spawn, pi: Pi,
                                                         power: PowerWatcher) -> None:
    """The link loses the confirms of pulses stamped on both sides of a step back; the edge resends them all.

    Resent pulses from before the step carry later times than the newest pulse
    counted (stamped after the step): they are still duplicates, not a counter
    store restored from a backup, so nothing is counted twice or dead-lettered.
    """
    writer = start_writer(spawn, names, writer_env(names))
    # hold_replies(): the edge's messages reach the queue, their confirms never reach the edge.
    proxy = TcpProxy(amqp_parameters().port)
    proxy.start()
    try:
        pi.start("+0", EMDC_AMQP_URL=amqp_url_at(proxy.port))
        pi.meter_on()
        power.wait_for_power_after(0)
        proxy.hold_replies()
        pi.set_clock("-3600")
        wait_until(lambda: steps(pi.log()), REANCHOR_WAIT_S, "the edge to follow the step back")
        wait_logged(writer.log, "timestamps not trusted", 10, "the writer to count pulses stamped after the step")
        run_meter_until(pi, 10)
        outbox = OutboxReader(names.edge_dir / FILENAME)
        unconfirmed = [p.ts_ns for _, p in outbox.pending(after_id=0, limit=100_000)]
        assert max(unconfirmed) > unconfirmed[-1], "the unconfirmed pulses span the step"
        proxy.cut()
        wait_until(lambda: outbox.depth() == 0, 30, "the edge to resend and have every pulse confirmed")
        outbox.close()
        produced = pi.meter_off()

        assert_counted_exactly(names, produced)
        pi.stop_cleanly()
    finally:
        proxy.stop()
    assert proxy.connections >= 2, "the edge reconnected"
    assert_steps(pi.log(), ("back", HOUR_S))
    assert len(DISTRUST.findall(writer.log())) == 1, writer.log()
    assert "already counted" not in writer.log(), writer.log()
