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

While the outbox cannot be written (a full or read-only disk, an I/O error),
the recorder keeps counting into a bounded :class:`~edge.pulse_hold.PulseHold`
and writes it out in order as soon as the disk takes it, trying again with a
capped backoff (:class:`~edge.store_retry.StoreRetry`) while it still consumes
edges; it logs the start and the end of such a spell, one line each.

Example::

    edges = queue.SimpleQueue()
    PulseInput(17, channel="active", sink=edges.put, pin_factory=factory)
    recorder = PulseRecorder(edges, outbox, clock, filters={"active": PulseFilter(0.002, 0.02)},
                             per_pulse={"active": 1.0}, commit_interval_s=0.1, on_recorded=publisher.wake)
    recorder.start()
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from gpiozero import DigitalInputDevice

from edge.clock_sync import describe_sync
from edge.commit_pacer import CommitPacer
from edge.outbox import Outbox, StoreError
from edge.pulse_filter import PulseFilter
from edge.pulse_hold import HOLD_MAX, PulseHold, Stamped
from edge.store_retry import StoreRetry
from edge.tick_clock import TickClock

log = logging.getLogger("emdc.reader")

Edge = tuple[str, float, bool]
_STOP = ("", 0.0, False)
REANCHOR_EVERY_S = 10.0
# Held pulses per transaction once the disk takes writes again. The first write of each attempt is small, so
# that an attempt on a disk that is still full costs little; the later ones are large, so that a long hold
# goes out in a few commits.
PROBE_WRITE = 100
HOLD_WRITE = 10_000
_NEVER_SET = threading.Event()


def pause(seconds: float) -> None:
    """Wait ``seconds`` on the monotonic clock. Not time.sleep(), which fails with EINVAL under
    libfaketime when the wall clock alone is faked (as the clock tests do)."""
    _NEVER_SET.wait(seconds)


class PulseInput(DigitalInputDevice):
    """A digital input that reports every edge with the pin event's own ticks.

    ``pull_up=True`` suits an S0 open-collector output or a reed switch (a
    pulse pulls the line low); use ``pull_up=False`` for LED sensors that
    drive the line high (the input type says which, see :mod:`common.inputs`).
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
    """Consumes edges, stores accepted pulses in the outbox, calls ``on_recorded`` after each commit.

    Each channel has its own filter and its quantity per pulse (``per_pulse``,
    in the channel's pulse unit), which every pulse of it carries.

    A storage fault (:class:`~edge.outbox.StoreError`) never ends the thread:
    the pulses wait in memory (a damaged store ends the service instead, through
    its health). Any other exception is a bug and ends the thread, which the
    service reports.
    """

    def __init__(self, edges: queue.SimpleQueue[Edge], outbox: Outbox, clock: TickClock,
                 filters: Mapping[str, PulseFilter], per_pulse: Mapping[str, float], commit_interval_s: float = 0.0,
                 on_recorded: Callable[[], None] = lambda: None,
                 clock_synced: Callable[[], bool | None] = lambda: None, hold_limit: int = HOLD_MAX) -> None:
        super().__init__(name="emdc-recorder", daemon=True)
        self.edges = edges
        self.outbox = outbox
        self.clock = clock
        self.filters = filters
        self.per_pulse = per_pulse
        self.pacer = CommitPacer(commit_interval_s)
        self.on_recorded = on_recorded
        self._clock_synced = clock_synced
        self.synced = clock_synced()
        self._rejected_reported = 0
        self._next_noise_report = 0.0
        self._hold = PulseHold(hold_limit)
        self._holding = False  # the hold has pulses: new ones queue behind them (the one check while healthy)
        self._retry = StoreRetry()
        self._written_from_hold = 0
        self._stop_by = math.inf

    @property
    def unwritten(self) -> int:
        """Pulses counted but not in the outbox yet; what is lost if the process ends now."""
        return self._hold.pending

    @property
    def store_fault(self) -> str:
        """Why the outbox cannot be written right now ("" when it can)."""
        return self._retry.failing

    def stop(self, timeout: float = math.inf) -> None:
        """Record every edge queued so far, then end the thread.

        Pulses held in memory get until ``timeout`` seconds from now to reach the
        disk; what it still refuses then stays in :attr:`unwritten`.
        """
        self._stop_by = time.monotonic() + timeout
        self.edges.put(_STOP)
        self.join(None if timeout == math.inf else timeout + 1.0)

    def run(self) -> None:
        stopping = False
        next_anchor = time.monotonic() + REANCHOR_EVERY_S
        while not stopping:
            edges = []
            wait = REANCHOR_EVERY_S if not self._holding else self._retry.wait(time.monotonic())
            try:
                edges.append(self.edges.get(timeout=wait))
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
        # At a stop, held pulses get until the deadline to reach the disk; a damaged store will not take them.
        while self._holding and not self.outbox.health.damaged and (now := time.monotonic()) < self._stop_by:
            self._write_held(now)
            if self._holding:
                pause(min(self._retry.wait(time.monotonic()), max(0.0, self._stop_by - time.monotonic())))

    def _record(self, edges: list[Edge]) -> None:
        pulses = []
        for channel, ticks, active in edges:
            pulse_ticks = self.filters[channel].edge(ticks, active)
            if pulse_ticks is not None:
                pulses.append((channel, self.clock.to_utc_ns(pulse_ticks), self.per_pulse[channel]))
        self._report_noise()
        if self._holding:
            self._hold_back(pulses)
            self._write_held(time.monotonic())
            return
        if not pulses:
            return
        self.pacer.committed(time.monotonic())
        try:
            self.outbox.record(pulses, self.synced)
        except StoreError as exc:
            self._holding = True
            self._written_from_hold = 0
            self._hold_back(pulses)
            self._write_failed(exc)
            return
        self.on_recorded()

    def _hold_back(self, pulses: list[Stamped]) -> None:
        """Queue ``pulses`` in memory behind those already held; say so once if timings start to be dropped."""
        dropping = self._hold.dropped
        self._hold.add(pulses, self.synced)
        if self._hold.dropped and not dropping:
            log.warning("holding %d pulses in memory, the most it keeps: dropping the oldest pulses' timing "
                        "detail; they are still counted, so no energy is lost", self._hold.limit)

    def _write_failed(self, exc: StoreError) -> None:
        # A damaged store ends the service, which says so in one line of its own.
        if self._retry.failed(exc.reason, time.monotonic()) and not exc.damaged:
            log.warning("cannot write the outbox %s (%s): holding pulses in memory until the disk takes them "
                        "(%d so far)", self.outbox.path, exc.reason, self._hold.pending)

    def _write_held(self, now: float) -> None:
        """Write the held pulses in order, if a retry is due; stop at the first failure, keeping the rest."""
        if not self._retry.due(now):
            return
        limit = PROBE_WRITE
        while self._hold.pending:
            batch = self._hold.batch(limit)
            try:
                self.outbox.record(batch.pulses, batch.synced, batch.skipped)
            except StoreError as exc:
                self._write_failed(exc)
                return
            self._hold.written(batch)
            self._written_from_hold += len(batch.pulses) + sum(batch.skipped.values())
            self.on_recorded()
            limit = HOLD_WRITE
        self._holding = False
        self._retry.succeeded()
        log.info("outbox writable again: wrote the %d held pulse(s)", self._written_from_hold)

    def _report_noise(self) -> None:
        """One line per minute at most when the filter rejects pulses: wiring or thresholds may be wrong."""
        rejected = sum(f.rejected for f in self.filters.values())
        if rejected > self._rejected_reported and time.monotonic() >= self._next_noise_report:
            log.warning("%d edge pairs rejected as noise so far (%s): shorter than min_pulse_ms or closer than "
                        "min_interval_ms to the previous pulse; check the wiring and the input's type if pulses go "
                        "missing", rejected, ", ".join(f"{channel} {f.rejected}" for channel, f in self.filters.items()
                                                         if f.rejected))
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
