"""GPIO pulse input and the recorder thread that turns edges into stored pulses.

The interrupt side only records edges: :class:`PulseInput` (a gpiozero
``DigitalInputDevice``) puts ``(channel, ticks, active)`` on a queue, with the
ticks of the pin event itself (kernel timestamps under the lgpio factory). It
hands each activation over together with the deactivation that ends it, so the
recorder wakes once per pulse rather than once per edge.
:class:`PulseRecorder` filters the edges, timestamps accepted pulses in UTC
and records them in the outbox, then wakes the publisher. A pulse after a
quiet spell is committed at once; at high rates pulses share commits, at most
one per ``commit_interval_s`` (see :class:`~edge.commit_pacer.CommitPacer`).

Example::

    edges = queue.SimpleQueue()
    PulseInput(17, channel="active", sink=edges.put, pin_factory=factory)
    recorder = PulseRecorder(edges, outbox, clock, filters={"active": PulseFilter(0.002, 0.02)}, wh=1.0,
                             commit_interval_s=0.1, on_recorded=publisher.wake)
    recorder.start()
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from gpiozero import DigitalInputDevice

from edge.clock_sync import describe_sync
from edge.commit_pacer import CommitPacer
from edge.outbox import Outbox
from edge.pulse_filter import PulseFilter
from edge.tick_clock import TickClock

log = logging.getLogger("emdc.reader")

Edge = tuple[str, float, bool]
_STOP = ("", 0.0, False)
REANCHOR_EVERY_S = 10.0
_NEVER_SET = threading.Event()


def pause(seconds: float) -> None:
    """Wait ``seconds`` on the monotonic clock. Not time.sleep(), which fails with EINVAL under
    libfaketime when the wall clock alone is faked (as the clock tests do)."""
    _NEVER_SET.wait(seconds)


class PulseInput(DigitalInputDevice):
    """A digital input that reports every edge with the pin event's own ticks.

    ``pull_up=True`` suits an S0 open-collector output (a pulse pulls the line
    low); use ``pull_up=False`` for LED sensors that drive the line high.
    gpiozero's ``bounce_time`` is deliberately unused: it drops edges without
    telling us, while :class:`~edge.pulse_filter.PulseFilter` judges pulses
    by their measured width and spacing.

    An activation is held until the deactivation arrives and both go to
    ``sink`` together: a pulse is only complete at its end, and one hand-off
    instead of two saves a thread wake-up per pulse (~12 % of the edge's CPU at
    10 pulses/s). An activation still held when the input closes was not a
    complete pulse.
    """

    def __init__(self, pin: int, *, channel: str, sink: Callable[[Edge], None], pull_up: bool = True,
                 pin_factory: Any = None) -> None:
        self._channel = channel
        self._sink = sink
        self._held: Edge | None = None
        super().__init__(pin, pull_up=pull_up, pin_factory=pin_factory)

    def _fire_events(self, ticks: float, new_active: bool) -> None:
        previous = self._last_active
        super()._fire_events(ticks, new_active)
        if previous is None or previous == new_active:
            return
        edge = (self._channel, ticks, new_active)
        if new_active:
            self._held = edge
            return
        held, self._held = self._held, None
        if held is not None:
            self._sink(held)
        self._sink(edge)


class PulseRecorder(threading.Thread):
    """Consumes edges, stores accepted pulses in the outbox, calls ``on_recorded`` after each commit."""

    def __init__(self, edges: queue.SimpleQueue[Edge], outbox: Outbox, clock: TickClock,
                 filters: Mapping[str, PulseFilter], wh: float, commit_interval_s: float = 0.0,
                 on_recorded: Callable[[], None] = lambda: None,
                 clock_synced: Callable[[], bool | None] = lambda: None) -> None:
        super().__init__(name="emdc-recorder", daemon=True)
        self.edges = edges
        self.outbox = outbox
        self.clock = clock
        self.filters = filters
        self.wh = wh
        self.pacer = CommitPacer(commit_interval_s)
        self.on_recorded = on_recorded
        self._clock_synced = clock_synced
        self.synced = clock_synced()
        self._rejected_reported = 0
        self._next_noise_report = 0.0

    def stop(self) -> None:
        """Record every edge queued so far, then end the thread."""
        self.edges.put(_STOP)
        self.join()

    def run(self) -> None:
        stopping = False
        next_anchor = time.monotonic() + REANCHOR_EVERY_S
        while not stopping:
            edges = []
            try:
                edges.append(self.edges.get(timeout=REANCHOR_EVERY_S))
                # Pausing rather than waiting on the queue: edges arriving meanwhile cost no wake-up.
                # (Only when needed: a zero wait is still a system call, on every pulse at low rates.)
                if delay := self.pacer.delay(time.monotonic()):
                    pause(delay)
                while True:  # group what arrived meanwhile into one commit
                    edges.append(self.edges.get_nowait())
            except queue.Empty:
                pass
            stopping = any(e is _STOP for e in edges)
            self._record([e for e in edges if e is not _STOP])
            if time.monotonic() >= next_anchor:
                next_anchor = time.monotonic() + REANCHOR_EVERY_S
                self._reanchor()

    def _record(self, edges: list[Edge]) -> None:
        pulses = []
        for channel, ticks, active in edges:
            pulse_ticks = self.filters[channel].edge(ticks, active)
            if pulse_ticks is not None:
                pulses.append((channel, self.clock.to_utc_ns(pulse_ticks), self.wh))
        self._report_noise()
        if not pulses:
            return
        self.pacer.committed(time.monotonic())
        while True:
            try:
                self.outbox.record(pulses, self.synced)
                break
            except Exception:
                # The disk is the only place a pulse can survive; keep trying rather than lose it.
                log.exception("cannot write the outbox %s; retrying in 1 s", self.outbox.path)
                pause(1.0)
        self.on_recorded()

    def _report_noise(self) -> None:
        """One line per minute at most when the filter rejects pulses: wiring or thresholds may be wrong."""
        rejected = sum(f.rejected for f in self.filters.values())
        if rejected > self._rejected_reported and time.monotonic() >= self._next_noise_report:
            log.warning("%d edge pairs rejected as noise so far (shorter than min_pulse_ms or closer than "
                        "min_interval_ms to the previous pulse); check the wiring if pulses go missing",
                        rejected)
            self._rejected_reported = rejected
            self._next_noise_report = time.monotonic() + 60

    def _reanchor(self) -> None:
        step = self.clock.reanchor()
        if step > 0:
            log.warning("the wall clock stepped forward by %.1f s (NTP setting it?); pulse times follow it",
                        step / 1e9)
        elif step < 0:
            log.warning("the wall clock stepped back by %.1f s: pulses of the last while were stamped ahead; "
                        "pulse times follow it, and the writer counts every pulse either way", -step / 1e9)
        synced = self._clock_synced()
        if synced != self.synced:
            log.log(logging.INFO if synced else logging.WARNING, "the clock is now %s", describe_sync(synced))
            self.synced = synced
