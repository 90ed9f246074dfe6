"""Composition root of the edge: pins → recorder → outbox → publisher.

Example (real GPIO, the pin factory chosen by ``GPIOZERO_PIN_FACTORY``)::

    service = EdgeService(config)
    service.start()
    ...
    service.stop()
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from gpiozero.exc import BadPinFactory, GPIOPinInUse, GPIOZeroError, PinFactoryFallback, PinInvalidPin

from common.config import Config
from common.inputs import Input
from edge.clock_sync import describe_sync, kernel_clock_synced
from edge.outbox import FILENAME, Outbox, OutboxReader
from edge.pulse_filter import PulseFilter
from edge.reader import Edge, PulseInput, PulseRecorder, pause
from edge.status_report import EdgeFacts
from edge.tick_clock import TickClock

log = logging.getLogger("emdc.edge")

# How long a stop may take: systemd's stop timeout is longer, and a stop that hangs helps no one. Pulses held in
# memory get most of it to reach the disk (RECORDER_STOP_S); the publisher gets what is left.
STOP_TIMEOUT_S = 10.0
RECORDER_STOP_S = 6.0


class Publisher(Protocol):
    def run(self, stop: threading.Event) -> None: ...

    def wake(self) -> None: ...


class GpioUnavailable(RuntimeError):
    """The configured pins cannot be opened; the text says why and what to do. Retrying will not help."""


def gpio_failure(exc: BaseException, one: Input) -> str:
    """One line for a pin that cannot be opened, naming the input's setting and the likely fix."""
    pin = one.pin
    setting = f"{one.setting}: {one.channel}" if one.setting.startswith("[[") else f"{one.setting} = {pin}"
    if isinstance(exc, BadPinFactory):  # before ImportError, which it extends
        return (f"no GPIO access here ({exc}): on a Raspberry Pi install lgpio (`sudo apt install python3-lgpio`) "
                "and run as a user in the gpio group; to try EMDC without a meter, use `emdc edge simulate`")
    if isinstance(exc, ImportError):
        return (f"the GPIO library is missing ({exc}): on a Raspberry Pi install it with "
                "`sudo apt install python3-lgpio` (or `pip install lgpio` in the edge's venv)")
    if isinstance(exc, GPIOPinInUse):
        return f"GPIO{pin} ({setting}) is already in use: is another `emdc edge run` running? ({exc})"
    if isinstance(exc, PinInvalidPin):
        return f"GPIO{pin} ({setting}) does not exist on this board ({exc})"
    return f"cannot open GPIO{pin} ({setting}): {exc}"


class EdgeService:
    """Owns the edge's threads; ``publisher_factory`` receives the outbox's reader factory."""

    def __init__(self, config: Config, *, pin_factory: Any = None,
                 publisher_factory: Callable[[Callable[[], OutboxReader]], Publisher] | None = None,
                 clock: TickClock | None = None, clock_synced: Callable[[], bool | None] | None = None) -> None:
        if publisher_factory is None:
            from edge.amqp_publisher import AmqpPublisher

            def publisher_factory(open_reader: Callable[[], OutboxReader]) -> Publisher:
                return AmqpPublisher(config, open_reader, facts=self.facts if config.status_interval_s else None)

        self.config = config
        self._started_ns = time.time_ns()
        self.outbox = Outbox(Path(config.state_dir) / FILENAME, config.meter_id, config.outbox_max)
        self.publisher = publisher_factory(self.outbox.reader)
        self._stop_publisher = threading.Event()
        self._publisher_thread = threading.Thread(target=self.publisher.run, args=(self._stop_publisher,),
                                                  name="emdc-publisher", daemon=True)
        inputs = config.inputs()
        filters = {one.channel: PulseFilter.for_input(one) for one in inputs}
        edges: queue.SimpleQueue[Edge] = queue.SimpleQueue()
        self.inputs: list[PulseInput] = []
        try:
            for one in inputs:
                try:
                    with warnings.catch_warnings():
                        # gpiozero warns about each factory it cannot load; the error below says it once.
                        warnings.simplefilter("ignore", PinFactoryFallback)
                        self.inputs.append(PulseInput(one.pin, channel=one.channel, sink=edges.put,
                                                      pull_up=one.pull_up, pin_factory=pin_factory))
                except (GPIOZeroError, ImportError, OSError) as exc:
                    raise GpioUnavailable(gpio_failure(exc, one)) from exc
        except Exception:
            self._close_inputs()
            self.outbox.close()
            raise
        factory = self.inputs[0].pin_factory
        clock = clock or TickClock(factory.ticks)
        if clock_synced is None:
            clock_synced = kernel_clock_synced if config.clock_sync == "kernel" else lambda: None
        per_pulse = {one.channel: one.per_pulse for one in inputs}
        self.recorder = PulseRecorder(edges, self.outbox, clock, filters, per_pulse,
                                      commit_interval_s=config.commit_interval_ms / 1000,
                                      on_recorded=self.publisher.wake, clock_synced=clock_synced)
        if self.outbox.started_epoch_because:
            log.warning("meter %s: new counter epoch %s: %s; the writer counts on from it", config.meter_id,
                        self.outbox.epoch, self.outbox.started_epoch_because)
        behind_ns = self.outbox.last_ts_ns - clock.now_ns()
        if behind_ns > 0:
            log.warning("the wall clock is %.0f s behind the last recorded pulse, so it is wrong now (%s) or was "
                        "wrong then; pulse times follow it, and the writer counts every pulse either way",
                        behind_ns / 1e9, describe_sync(self.recorder.synced))
        log.info("meter %s: %s; counter store %s (epoch %s, counters %s)", config.meter_id,
                 "; ".join(one.describe() for one in inputs), self.outbox.path, self.outbox.epoch,
                 self.outbox.counters() or "new")
        log.log(logging.WARNING if self.recorder.synced is False else logging.INFO,
                "the clock is %s; pulses say so, and the writer trusts only times it can check",
                describe_sync(self.recorder.synced))

    def facts(self) -> EdgeFacts:
        """What the recorder side knows for a status message (read from the publisher's thread)."""
        recorder = self.recorder
        return EdgeFacts(recorder.synced, {channel: f.rejected for channel, f in recorder.filters.items()},
                         self.outbox.last_ts_ns, self._started_ns)

    def start(self) -> None:
        self.recorder.start()
        self._publisher_thread.start()

    def alive(self) -> bool:
        """True while the edge can count (for the systemd watchdog): both threads run and the store is not damaged.

        A full or read-only disk keeps it alive: pulses are counted in memory
        meanwhile. A damaged store does not: the restart it leads to refuses
        the store with instructions, instead of a process that counts nothing.
        """
        return (not self.outbox.health.damaged and self.recorder.is_alive()
                and self._publisher_thread.is_alive())

    def failure(self) -> str:
        """Why :meth:`alive` is False, in a few words for the log."""
        if self.outbox.health.damaged:
            return (f"the counter store {self.outbox.path} is damaged ({self.outbox.health.damaged}); the restart "
                    "checks it and says what to do")
        dead = [t.name for t in (self.recorder, self._publisher_thread) if not t.is_alive()]
        return f"a worker thread died ({', '.join(dead)})" if dead else ""

    def wait_drained(self, stop: threading.Event | None = None, poll_s: float = 0.05) -> bool:
        """Block until every recorded pulse is confirmed by the broker (False if stopped first)."""
        reader = self.outbox.reader()
        try:
            while reader.depth():
                if stop is not None and stop.is_set():
                    return False
                pause(poll_s)
            return True
        finally:
            reader.close()

    def stop(self) -> None:
        """Stop reading pins, record what is queued, stop publishing; unconfirmed pulses stay in the outbox.

        Takes at most about :data:`STOP_TIMEOUT_S`. Pulses the disk still refuses
        by then are lost, and one ERROR line says how many and why: the writer
        cannot know of them, so the log is the only place the loss shows.
        """
        deadline = time.monotonic() + STOP_TIMEOUT_S
        self._close_inputs()
        if self.recorder.is_alive():
            self.recorder.stop(timeout=RECORDER_STOP_S)
        self._stop_publisher.set()
        self.publisher.wake()
        if self._publisher_thread.is_alive():
            self._publisher_thread.join(timeout=max(0.5, deadline - time.monotonic()))
        if lost := self.recorder.unwritten:
            log.error("%d pulses counted in memory could not be written to the outbox before the stop (%s) and "
                      "are lost: the writer's total stays %d pulses short of the meter", lost,
                      self.recorder.store_fault or "the recorder stopped", lost)
        if self.recorder.is_alive():
            # Still inside a write: closing its connection under it is unsafe. Without the clean-stop mark the
            # next start begins a new epoch, which is always safe.
            log.error("the recorder did not stop in time; the next start begins a new counter epoch")
            return
        self.outbox.close()
        log.info("edge stopped; counters %s", self.outbox.counters())

    def _close_inputs(self) -> None:
        for device in self.inputs:
            device.close()


def run_edge(config: Config, stop: threading.Event) -> int:
    """``emdc edge run``: real GPIO until ``stop``; talks to systemd when run under it.

    Returns the exit status: 0 after a requested stop, 1 if a worker thread died
    (systemd's ``Restart=on-failure`` then starts a fresh process).
    """
    from edge.systemd_notify import READY, STOPPING, WATCHDOG, notify, watchdog_interval

    service = EdgeService(config)
    service.start()
    notify(READY)
    interval = watchdog_interval()
    # Feed the watchdog at twice its rate, and only while our threads live:
    # no pulses is normal, a dead thread is not.
    tick = interval / 2 if interval else 5.0
    try:
        while not stop.wait(tick):
            if not service.alive():
                log.error("%s: exiting so that the service is restarted", service.failure())
                return 1
            notify(WATCHDOG)
        return 0
    finally:
        notify(STOPPING)
        service.stop()
