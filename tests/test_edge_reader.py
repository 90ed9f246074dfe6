"""The edge on gpiozero's MockFactory: pin events in, numbered pulses in the outbox out."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from common.config import load_config
from common.inputs import Input
from edge.outbox import FILENAME, Outbox
from edge.pulse_filter import PulseFilter
from edge.reader import PulseInput, PulseRecorder
from edge.service import EdgeService
from edge.simulator import LoadProfile, SimulatedMeter, VirtualClockFactory
from edge.tick_clock import TickClock
from tests.support import wait_until

S0_ACTIVE = Input.of(pin=17, channel="active", type="s0", per_pulse=1.0, min_pulse_ms=2.0, min_interval_ms=20.0)


def test_pulse_input_reports_edges_with_the_pin_events_own_ticks(factory: MockFactory) -> None:
    edges: list[tuple[str, float, bool]] = []
    device = PulseInput(17, channel="active", sink=edges.append, pull_up=True, pin_factory=factory)
    pin = factory.pin(17)
    pin.drive_low()  # S0 with pull-up: a pulse pulls the line low
    pin.drive_high()
    assert [(c, a) for c, _, a in edges] == [("active", True), ("active", False)]
    # The ticks are the ones the pin recorded for its own state changes.
    assert edges[1][1] - edges[0][1] == pytest.approx(pin.states[-1].timestamp, abs=1e-6)
    device.close()


@pytest.mark.parametrize(("pull_up", "activate", "release"), [
    (True, "drive_low", "drive_high"),   # S0 open collector: a pulse pulls the line low
    (False, "drive_high", "drive_low"),  # LED sensor driving the line: active high
])
def test_an_activation_is_handed_over_with_the_deactivation_that_ends_it(factory: MockFactory, pull_up: bool,
                                                                         activate: str, release: str) -> None:
    edges: list[tuple[str, float, bool]] = []
    device = PulseInput(4, channel="reactive", sink=edges.append, pull_up=pull_up, pin_factory=factory)
    pin = factory.pin(4)
    getattr(pin, activate)()
    assert edges == []  # held: the recorder is not woken for half a pulse
    getattr(pin, release)()
    assert [a for _, _, a in edges] == [True, False]
    device.close()


def _virtual(tmp_path: Path):
    clock_factory = VirtualClockFactory()
    edges: queue.SimpleQueue = queue.SimpleQueue()
    outbox = Outbox(tmp_path / FILENAME, "main", 1000)
    clock = TickClock(clock_factory.ticks, wall_ns=lambda: 1_700_000_000_000_000_000)
    recorder = PulseRecorder(edges, outbox, clock, {"active": PulseFilter(0.002, 0.02)},
                             per_pulse={"active": 1.0})
    device = PulseInput(17, channel="active", sink=edges.put, pin_factory=clock_factory)
    return clock_factory, outbox, recorder, device


def test_recorder_stores_filtered_pulses_with_utc_timestamps_from_ticks(tmp_path: Path) -> None:
    clock_factory, outbox, recorder, device = _virtual(tmp_path)
    pin = clock_factory.pin(17)
    recorder.start()
    for start, width in [(1.0, 0.03), (1.001 + 0.03, 0.0005), (2.2, 0.03), (2.21, 0.03)]:
        clock_factory.now = start
        pin.drive_low()
        clock_factory.now = start + width
        pin.drive_high()
    recorder.stop()
    rows = outbox.reader().pending(0, 10)
    # The 0.5 ms glitch and the pulse 10 ms after another are noise; two real pulses remain.
    assert [(p.seq, p.ts_ns) for _, p in rows] == [(1, 1_700_000_001_030_000_000), (2, 1_700_000_002_230_000_000)]
    assert recorder.filters["active"].rejected == 2
    device.close()
    outbox.close()


def test_simulated_meter_at_3600_w_pulses_once_a_second_through_the_real_reader(tmp_path: Path) -> None:
    clock_factory, outbox, recorder, device = _virtual(tmp_path)
    meter = SimulatedMeter(clock_factory, [S0_ACTIVE], LoadProfile.constant(3600))
    recorder.start()
    assert meter.run(count=50) == 50
    recorder.stop()
    rows = outbox.reader().pending(0, 100)
    times = [p.ts_ns for _, p in rows]
    assert [p.seq for _, p in rows] == list(range(1, 51))
    assert {b - a for a, b in itertools.pairwise(times)} == {1_000_000_000}
    device.close()
    outbox.close()


class RecordingPublisher:
    """Confirms every row immediately, like a broker that never fails."""

    def __init__(self, open_reader) -> None:
        self.open_reader = open_reader
        self.sent: list = []
        self.woken = threading.Event()

    def wake(self) -> None:
        self.woken.set()

    def run(self, stop: threading.Event) -> None:
        reader = self.open_reader()
        while not stop.is_set():
            self.woken.wait(0.05)
            self.woken.clear()
            rows = reader.pending(0, 100)
            self.sent += [p for _, p in rows]
            reader.confirm([i for i, _ in rows])
        reader.close()


def test_edge_service_counter_continues_across_restarts(tmp_path: Path) -> None:
    config = load_config(env={"EMDC_STATE_DIR": str(tmp_path)})
    publishers: list[RecordingPublisher] = []

    def make(open_reader):
        publishers.append(RecordingPublisher(open_reader))
        return publishers[-1]

    for _ in range(2):
        clock_factory = VirtualClockFactory()
        service = EdgeService(config, pin_factory=clock_factory, publisher_factory=make)
        service.start()
        SimulatedMeter(clock_factory, [S0_ACTIVE], LoadProfile.constant(3600)).run(count=5)
        service.recorder.stop()
        assert service.wait_drained()
        service.stop()
    seqs = [p.seq for pub in publishers for p in pub.sent]
    assert seqs == list(range(1, 11))
    assert len({p.epoch for pub in publishers for p in pub.sent}) == 1, "a clean stop continues the epoch"


class CommitLog(Outbox):
    """The real outbox, remembering how many pulses each commit carried and when it ended."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commits: list[tuple[int, float]] = []

    def record(self, pulses, synced=None):
        stored = super().record(pulses, synced)
        self.commits.append((len(stored), time.monotonic()))
        return stored


def _paced(tmp_path: Path, interval_s: float):
    edges: queue.SimpleQueue = queue.SimpleQueue()
    outbox = CommitLog(tmp_path / FILENAME, "main", 1000)
    recorder = PulseRecorder(edges, outbox, TickClock(time.monotonic), {"active": PulseFilter(0.002, 0.02)},
                             per_pulse={"active": 1.0}, commit_interval_s=interval_s)
    return edges, outbox, recorder


def _pulse(edges: queue.SimpleQueue, at: float) -> None:
    edges.put(("active", at, True))
    edges.put(("active", at + 0.01, False))


def test_recorder_commits_a_pulse_after_a_pause_at_once_even_with_a_long_commit_interval(tmp_path: Path) -> None:
    edges, outbox, recorder = _paced(tmp_path, interval_s=1.0)
    recorder.start()
    for n in range(1, 3):  # the very first pulse, then one after a pause longer than the interval
        sent = time.monotonic()
        _pulse(edges, sent)
        wait_until(lambda n=n: len(outbox.commits) == n, 2, "a commit")
        assert outbox.commits[-1][1] - sent < 0.5
        time.sleep(1.1)
    recorder.stop()
    assert [n for n, _ in outbox.commits] == [1, 1]
    outbox.close()


def test_recorder_groups_the_pulses_of_one_commit_slot_into_one_commit(tmp_path: Path) -> None:
    edges, outbox, recorder = _paced(tmp_path, interval_s=0.5)
    recorder.start()
    time.sleep(0.5 - time.monotonic() % 0.5 + 0.01)  # start just after a slot begins
    t = time.monotonic()
    _pulse(edges, t)
    wait_until(lambda: outbox.commits, 2, "the first commit")
    for i in range(1, 6):  # five more pulses, 30 ms apart: well within the next 0.5 s
        time.sleep(0.03)
        _pulse(edges, t + 0.03 * i)
    wait_until(lambda: sum(n for n, _ in outbox.commits) == 6, 3, "six pulses recorded")
    recorder.stop()
    assert [n for n, _ in outbox.commits] == [1, 5]
    assert outbox.commits[1][1] - outbox.commits[0][1] >= 0.45  # waited for the next slot
    assert [p.seq for _, p in outbox.reader().pending(0, 10)] == [1, 2, 3, 4, 5, 6]
    outbox.close()
