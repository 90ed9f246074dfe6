"""Storage faults of the edge's counter store, one layer at a time and without a broker.

A real ``SQLITE_FULL`` comes from ``PRAGMA max_page_count`` on the outbox's own
connection (the disk-full case of tests/test_edge_storage.py needs a mount);
damage is garbage written into the file, as there.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.outbox import FILENAME, DamagedStoreError, Outbox, OutboxError, OutboxReader, StoreError
from edge.pulse_filter import PulseFilter
from edge.reader import PulseRecorder
from edge.tick_clock import TickClock
from tests.support import wait_until

T0 = 1_764_000_000_000_000_000


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Outbox]:
    outbox = Outbox(tmp_path / FILENAME, "main", 1_000_000)
    yield outbox
    outbox.close()


def disk_full(outbox: Outbox) -> None:
    """Let the store grow by no page, and fill its last one: SQLite then reports the disk full, as on a full card."""
    conn = outbox._conn
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    with contextlib.suppress(StoreError):
        while True:
            outbox.record([("active", T0, 1.0)])


def disk_back(outbox: Outbox) -> None:
    outbox._conn.execute(f"PRAGMA max_page_count = {2**30}")


def test_skipped_pulses_advance_the_counter_before_the_next_seq(box: Outbox) -> None:
    box.record([("active", T0, 1.0)])
    pulses = box.record([("active", T0 + 5, 1.0)], skipped={"active": 3, "reactive": 2})
    assert [p.seq for p in pulses] == [5]
    assert box.counters() == {"active": 5, "reactive": 2}
    reader = box.reader()
    try:
        # the reactive counter has moved without a row: its next pulse carries the two skipped ones
        assert reader.counters() == {("main", "active"): 5, ("main", "reactive"): 2}
    finally:
        reader.close()
    box.close()
    again = Outbox(box.path, "main", 1_000_000)
    try:
        assert again.record([("reactive", T0 + 9, 1.0)])[0].seq == 3
    finally:
        again.close()


def test_a_full_disk_is_a_passing_store_error_and_takes_the_numbers_back(box: Outbox) -> None:
    disk_full(box)
    counters = box.counters()
    with pytest.raises(StoreError, match="database or disk is full") as raised:
        box.record([("active", T0, 1.0)] * 200, skipped={"active": 4})
    assert not raised.value.damaged and not box.health.damaged
    assert box.counters() == counters
    disk_back(box)
    assert box.record([("active", T0, 1.0)])[0].seq == counters["active"] + 1


def test_damage_found_by_a_reader_is_noted_for_the_whole_store(box: Outbox) -> None:
    box.record([("active", T0 + i, 1.0) for i in range(2000)])
    reader = box.reader()
    try:
        box._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        root = box._conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'outbox'").fetchone()[0]
        with box.path.open("r+b") as fh:
            fh.seek((root - 1) * 4096)
            fh.write(os.urandom(4096))
        box._conn.execute("PRAGMA user_version = 1")  # a commit: every connection reads pages from disk again
        with pytest.raises(StoreError, match="malformed") as raised:
            reader.pending(0, 10)
        assert raised.value.damaged
        assert box.health.damaged == "database disk image is malformed"
    finally:
        reader.close()


def test_a_store_with_a_garbage_page_is_refused_at_start_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    box = Outbox(path, "main", 1_000_000)
    box.record([("active", T0 + i, 1.0) for i in range(2000)])
    box.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'outbox'").fetchone()[0]
    with path.open("r+b") as fh:
        fh.seek((root - 1) * 4096)
        fh.write(os.urandom(4096))
    with pytest.raises(DamagedStoreError) as raised:
        Outbox(path, "main", 1_000_000)
    message = str(raised.value)
    assert message.startswith(f"the counter store {path} is damaged (quick_check: ")
    assert f"mv {path} {path}.damaged)" in message  # no -wal is left to move along
    assert "\n" not in message


def test_an_unclassified_error_is_not_a_store_error(box: Outbox) -> None:
    with pytest.raises(OverflowError):
        box.record([("active", 2**70, 1.0)])
    assert StoreError.of(sqlite3.IntegrityError("constraint")) is None


def _recorder(outbox: Outbox) -> tuple[queue.SimpleQueue, PulseRecorder]:
    edges: queue.SimpleQueue = queue.SimpleQueue()
    recorder = PulseRecorder(edges, outbox, TickClock(time.monotonic), {"active": PulseFilter(0.002, 0.02)},
                             per_pulse={"active": 1.0})
    return edges, recorder


def _pulses(edges: queue.SimpleQueue, count: int) -> None:
    start = time.monotonic()
    for i in range(count):
        edges.put(("active", start + i * 0.05, True))
        edges.put(("active", start + i * 0.05 + 0.01, False))


def test_the_recorder_holds_pulses_while_the_disk_is_full_and_writes_them_when_it_is_back(
        box: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    edges, recorder = _recorder(box)
    disk_full(box)
    stored = box.counters()["active"]
    with caplog.at_level("INFO", logger="emdc.reader"):
        recorder.start()
        _pulses(edges, 30)
        wait_until(lambda: recorder.unwritten == 30, 5, "30 pulses held")
        time.sleep(1)  # several retries meanwhile, all refused
        assert recorder.is_alive() and box.counters()["active"] == stored
        disk_back(box)
        wait_until(lambda: recorder.unwritten == 0, 5, "the held pulses written")
        recorder.stop()
    assert box.counters()["active"] == stored + 30
    lines = [r.getMessage() for r in caplog.records]
    assert sum("cannot write the outbox" in line for line in lines) == 1, lines
    assert "outbox writable again: wrote the 30 held pulse(s)" in lines
    assert not [r for r in caplog.records if r.exc_info], "no traceback"


def test_a_stop_while_the_disk_is_full_ends_in_time_and_reports_the_held_pulses(box: Outbox) -> None:
    edges, recorder = _recorder(box)
    disk_full(box)
    recorder.start()
    _pulses(edges, 5)
    started = time.monotonic()
    recorder.stop(timeout=0.5)
    assert not recorder.is_alive() and time.monotonic() - started < 1.5
    assert (recorder.unwritten, recorder.store_fault) == (5, "database or disk is full")


def test_a_store_in_a_missing_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match=r"cannot create the counter store .*: No such file or directory on the"):
        OutboxReader(tmp_path / "none" / FILENAME)


class CountingOutbox(Outbox):
    """The real outbox, counting write attempts."""

    attempts = 0

    def record(self, *args, **kwargs):
        self.attempts += 1
        return super().record(*args, **kwargs)


def test_while_the_disk_is_full_new_pulses_do_not_bring_the_next_attempt_forward(tmp_path: Path) -> None:
    box = CountingOutbox(tmp_path / FILENAME, "main", 1_000_000)
    disk_full(box)
    edges, recorder = _recorder(box)
    box.attempts = 0
    recorder.start()
    for _ in range(40):  # a pulse every 25 ms for a second
        _pulses(edges, 1)
        time.sleep(0.025)
    recorder.stop(timeout=0)
    box.close()
    assert recorder.unwritten == 40
    assert box.attempts <= 6, "attempts back off (0.1 s, 0.2 s, 0.4 s, ...), not one per pulse"
