"""edge.outbox: the durable per-channel counter and the outbox of numbered pulses (SQLite)."""

from __future__ import annotations

import re
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from backend.ledger import Ledger
from common.message import Pulse
from edge.outbox import FILENAME, Outbox, OutboxError, OutboxReader

T0 = 1_764_000_000_000_000_000
S = 1_000_000_000


class Opened:
    """Opens outboxes and readers on one database file and closes them all at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._open: list[Outbox | OutboxReader] = []

    def outbox(self, meter: str = "main", max_rows: int = 1_000_000, path: Path | None = None) -> Outbox:
        box = Outbox(path or self.path, meter=meter, max_rows=max_rows)
        self._open.append(box)
        return box

    def reader(self, box: Outbox) -> OutboxReader:
        reader = box.reader()
        self._open.append(reader)
        return reader

    def close_all(self) -> None:
        for thing in reversed(self._open):
            thing.close()
        self._open.clear()


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[Opened]:
    o = Opened(tmp_path / "state" / FILENAME)
    yield o
    o.close_all()


def active(n: int, start_s: int = 0) -> list[tuple[str, int, float]]:
    return [("active", T0 + (start_s + i) * S, 1.0) for i in range(n)]


# --- a fresh outbox -------------------------------------------------------------------------------

def test_fresh_outbox_is_empty_with_a_random_hex_epoch(opened: Opened):
    box = opened.outbox()
    assert box.counters() == {}
    assert box.last_ts_ns == 0
    assert re.fullmatch(r"[0-9a-f]{16}", box.epoch)
    assert box.path.exists()
    assert opened.reader(box).depth() == 0


def test_record_numbers_pulses_per_channel(opened: Opened):
    box = opened.outbox(meter="garage")
    pulses = box.record([("active", T0, 1.0), ("reactive", T0 + 1, 0.5), ("active", T0 + 2, 1.0)])
    assert pulses == [Pulse("garage", "active", box.epoch, 1, T0, 1.0),
                      Pulse("garage", "reactive", box.epoch, 1, T0 + 1, 0.5),
                      Pulse("garage", "active", box.epoch, 2, T0 + 2, 1.0)]
    assert box.counters() == {"active": 2, "reactive": 1}


def test_seq_continues_across_batches(opened: Opened):
    box = opened.outbox()
    box.record(active(3))
    assert [p.seq for p in box.record(active(2, start_s=3))] == [4, 5]


def test_counters_returns_a_copy(opened: Opened):
    box = opened.outbox()
    box.record(active(1))
    box.counters()["active"] = 99
    assert box.counters() == {"active": 1}


def test_last_ts_ns_tracks_the_newest_pulse_of_any_channel(opened: Opened):
    box = opened.outbox()
    box.record([("active", T0 + 5, 1.0), ("reactive", T0 + 9, 1.0)])
    assert box.last_ts_ns == T0 + 9


def test_recording_an_empty_batch_is_a_no_op(opened: Opened):
    box = opened.outbox()
    assert box.record([]) == []
    assert box.counters() == {}


# --- persistence across restarts ------------------------------------------------------------------

def test_counters_epoch_and_last_ts_survive_reopening(opened: Opened):
    box = opened.outbox()
    box.record([*active(3), ("reactive", T0 + 100 * S, 1.0)])
    epoch = box.epoch
    box.close()
    again = opened.outbox()
    assert again.epoch == epoch
    assert again.counters() == {"active": 3, "reactive": 1}
    assert again.last_ts_ns == T0 + 100 * S
    assert [p.seq for p in again.record(active(2, start_s=200))] == [4, 5]
    assert {p.epoch for _, p in opened.reader(again).pending(0, 100)} == {epoch}


def test_unconfirmed_pulses_survive_reopening(opened: Opened):
    box = opened.outbox()
    recorded = box.record(active(3))
    box.close()
    again = opened.outbox()
    assert [p for _, p in opened.reader(again).pending(0, 100)] == recorded


def test_a_new_database_file_gets_a_new_epoch_and_starts_at_one(opened: Opened, tmp_path: Path):
    first = opened.outbox()
    first.record(active(5))
    second = opened.outbox(path=tmp_path / "other" / FILENAME)
    assert second.epoch != first.epoch
    assert second.record(active(1))[0].seq == 1


def test_meters_sharing_a_file_have_separate_counters(opened: Opened):
    main = opened.outbox(meter="main")
    main.record(active(3))
    main.close()
    garage = opened.outbox(meter="garage")
    assert garage.counters() == {}
    assert garage.record(active(1))[0] == Pulse("garage", "active", garage.epoch, 1, T0, 1.0)
    assert opened.reader(garage).counters() == {("main", "active"): 3, ("garage", "active"): 1}


# --- the publisher's reader -----------------------------------------------------------------------

def test_pending_returns_rows_in_recording_order(opened: Opened):
    box = opened.outbox()
    recorded = box.record(active(3)) + box.record([("reactive", T0 + 10 * S, 1.0)]) + box.record(active(1, 20))
    rows = opened.reader(box).pending(after_id=0, limit=100)
    assert [p for _, p in rows] == recorded
    ids = [row_id for row_id, _ in rows]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_pending_pages_with_after_id_and_limit(opened: Opened):
    box = opened.outbox()
    recorded = box.record(active(5))
    reader = opened.reader(box)
    first = reader.pending(after_id=0, limit=2)
    second = reader.pending(after_id=first[-1][0], limit=2)
    third = reader.pending(after_id=second[-1][0], limit=2)
    assert [p for _, p in first + second + third] == recorded
    assert reader.pending(after_id=third[-1][0], limit=2) == []


def test_reader_sees_pulses_recorded_after_it_opened(opened: Opened):
    box = opened.outbox()
    reader = opened.reader(box)
    assert reader.pending(0, 10) == []
    box.record(active(1))
    assert len(reader.pending(0, 10)) == 1


def test_confirm_deletes_exactly_the_confirmed_rows(opened: Opened):
    box = opened.outbox()
    box.record(active(4))
    reader = opened.reader(box)
    rows = reader.pending(0, 100)
    reader.confirm([rows[0][0], rows[2][0]])
    assert [p.seq for _, p in reader.pending(0, 100)] == [2, 4]
    assert reader.depth() == 2
    assert box.counters() == {"active": 4}  # confirming never touches the counter


def test_confirm_of_unknown_or_already_deleted_ids_is_harmless(opened: Opened):
    box = opened.outbox()
    box.record(active(2))
    reader = opened.reader(box)
    row_id = reader.pending(0, 10)[0][0]
    reader.confirm([row_id])
    reader.confirm([row_id, 10_000])
    assert reader.depth() == 1


def test_confirmed_rows_stay_deleted_after_reopening(opened: Opened):
    box = opened.outbox()
    box.record(active(3))
    reader = opened.reader(box)
    reader.confirm([row_id for row_id, _ in reader.pending(0, 2)])
    opened.close_all()
    again = opened.outbox()
    assert [p.seq for _, p in opened.reader(again).pending(0, 10)] == [3]


def test_reader_knows_the_epoch(opened: Opened):
    box = opened.outbox()
    assert opened.reader(box).epoch == box.epoch


def test_status_is_stored_and_read_back(opened: Opened):
    box = opened.outbox()
    reader = opened.reader(box)
    reader.set_status(broker="connected", last_publish_ns="123")
    reader.set_status(broker="down")
    status = reader.status()
    assert status["broker"] == "down"
    assert status["last_publish_ns"] == "123"
    assert status["epoch"] == box.epoch
    box.close()
    assert opened.reader(opened.outbox()).status()["broker"] == "down"


def test_status_does_not_change_the_epoch(opened: Opened):
    box = opened.outbox()
    opened.reader(box).set_status(other="x")
    box.close()
    assert opened.outbox().epoch == box.epoch


# --- the row cap ----------------------------------------------------------------------------------

def test_max_rows_keeps_the_newest_rows_and_an_exact_counter(opened: Opened):
    box = opened.outbox(max_rows=3)
    for i in range(5):
        box.record(active(1, start_s=i))
    reader = opened.reader(box)
    assert reader.depth() == 3
    assert [p.seq for _, p in reader.pending(0, 100)] == [3, 4, 5]
    assert box.counters() == {"active": 5}
    assert box.record(active(1, start_s=10))[0].seq == 6


def test_one_batch_larger_than_max_rows(opened: Opened):
    box = opened.outbox(max_rows=2)
    pulses = box.record(active(7))
    assert [p.seq for p in pulses] == list(range(1, 8))
    assert [p.seq for _, p in opened.reader(box).pending(0, 100)] == [6, 7]
    assert box.counters() == {"active": 7}


def test_confirmed_rows_make_room_under_the_cap(opened: Opened):
    box = opened.outbox(max_rows=3)
    box.record(active(3))
    reader = opened.reader(box)
    reader.confirm([row_id for row_id, _ in reader.pending(0, 100)])
    box.record(active(2, start_s=3))
    assert [p.seq for _, p in reader.pending(0, 100)] == [4, 5]


def test_the_cap_applies_to_rows_left_by_an_earlier_run(opened: Opened):
    earlier = Outbox(opened.path, meter="main", max_rows=1_000_000)
    earlier.record(active(5))
    earlier.close()
    box = opened.outbox(max_rows=3)
    box.record(active(1, start_s=5))
    assert [p.seq for _, p in opened.reader(box).pending(0, 100)] == [4, 5, 6]


def test_the_cap_holds_after_a_failed_trim(opened: Opened):
    box = opened.outbox(max_rows=2)
    box.record(active(2))
    with closing(sqlite3.connect(box.path)) as db:
        db.execute("CREATE TRIGGER fail BEFORE DELETE ON outbox BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        db.commit()
    with pytest.raises(sqlite3.Error, match="disk full"):
        box.record(active(1, start_s=2))
    with closing(sqlite3.connect(box.path)) as db:
        db.execute("DROP TRIGGER fail")
        db.commit()
    box.record(active(1, start_s=2))
    assert [p.seq for _, p in opened.reader(box).pending(0, 100)] == [2, 3]


def test_trimming_is_logged_once_per_episode(opened: Opened, caplog):
    box = opened.outbox(max_rows=1)
    with caplog.at_level("INFO", logger="emdc.outbox"):
        box.record(active(3))
        box.record(active(3, start_s=3))
    assert sum("outbox is full" in r.message for r in caplog.records) == 1


# --- a failed commit ------------------------------------------------------------------------------

def test_failed_commit_takes_the_numbers_back(opened: Opened):
    box = opened.outbox()
    box.record(active(2))
    with closing(sqlite3.connect(box.path)) as db:  # make every insert fail, like a full disk would
        db.execute("CREATE TRIGGER fail BEFORE INSERT ON outbox BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        db.commit()
    with pytest.raises(sqlite3.Error, match="disk full"):
        box.record(active(3, start_s=2))
    assert box.counters() == {"active": 2}
    assert box.last_ts_ns == T0 + 1 * S
    with closing(sqlite3.connect(box.path)) as db:
        db.execute("DROP TRIGGER fail")
        db.commit()
    assert [p.seq for p in box.record(active(1, start_s=5))] == [3]  # no seq skipped or reused
    assert [p.seq for _, p in opened.reader(box).pending(0, 100)] == [1, 2, 3]
    box.close()
    assert opened.outbox().counters() == {"active": 3}


def test_a_failed_record_takes_its_numbers_back(tmp_path: Path):
    outbox = Outbox(tmp_path / "edge.sqlite3", "main", 100)
    outbox.record([("active", 1, 1.0)])
    with pytest.raises(OverflowError):
        outbox.record([("active", 2**70, 1.0)])  # cannot be bound as an SQLite integer
    [pulse] = outbox.record([("active", 3, 1.0)])
    assert pulse.seq == 2, "the failed attempt must not skip a seq"


def test_a_file_that_is_not_a_database_is_refused_clearly(tmp_path: Path):
    path = tmp_path / "edge.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(OutboxError, match=r"is damaged \(file is not a database\).*mv .*\.damaged"):
        Outbox(path, "main", 100)


# --- epochs: a counter continues only across a clean stop ------------------------------------------

def copy_store(source: Path, target_dir: Path, *, with_wal: bool) -> Path:
    """A copy of the store's files as a crash, a lost -wal or a restored backup would leave them."""
    target_dir.mkdir(parents=True, exist_ok=True)
    suffixes = ["", "-wal", "-shm"] if with_wal else [""]
    for suffix in suffixes:
        if source.with_name(source.name + suffix).exists():
            shutil.copy2(source.with_name(source.name + suffix), target_dir / (source.name + suffix))
    return target_dir / source.name


def test_a_clean_stop_continues_the_epoch(opened: Opened):
    box = opened.outbox()
    box.record(active(3))
    box.close()
    again = opened.outbox()
    assert again.epoch == box.epoch and again.started_epoch_because == ""
    assert again.record(active(1, start_s=3))[0].seq == 4


def test_a_start_after_a_crash_begins_a_new_epoch_and_old_rows_keep_theirs(opened: Opened, tmp_path: Path):
    box = opened.outbox()
    old = box.record(active(3))
    crashed = copy_store(box.path, tmp_path / "crashed", with_wal=True)  # the files as kill -9 leaves them
    after = opened.outbox(path=crashed)
    assert after.epoch != box.epoch and "was not clean" in after.started_epoch_because
    new = after.record(active(2, start_s=3))
    assert [p.seq for p in new] == [1, 2]
    assert [p for _, p in opened.reader(after).pending(0, 100)] == [*old, *new]


def test_a_lost_wal_after_a_crash_never_continues_the_epoch(opened: Opened, tmp_path: Path):
    first = opened.outbox()
    first.record(active(5))
    first.close()  # a clean stop: its token is in the main file after the checkpoint at close
    running = opened.outbox()
    assert running.epoch == first.epoch
    running.record(active(30, start_s=5))  # in the -wal only
    lost = copy_store(running.path, tmp_path / "lost-wal", with_wal=False)
    restarted = opened.outbox(path=lost)
    assert restarted.epoch != first.epoch, "the rolled-back counter (5) would reuse seq 6..35"
    assert restarted.record(active(1, start_s=35))[0].seq == 1


def test_a_restored_backup_of_a_cleanly_stopped_store_begins_a_new_epoch(opened: Opened, tmp_path: Path):
    box = opened.outbox()
    box.record(active(5))
    box.close()
    backup = copy_store(box.path, tmp_path / "backup", with_wal=False)
    later = opened.outbox()
    later.record(active(5, start_s=5))
    later.close()
    shutil.copy2(backup, box.path)  # the operator restores the store from the backup
    restored = opened.outbox()
    assert restored.epoch != box.epoch, "seq 6..10 were counted already"


@pytest.mark.parametrize("damage", ["deleted", "empty"])
def test_a_deleted_or_empty_store_is_a_new_counter_store(opened: Opened, damage: str):
    box = opened.outbox()
    box.record(active(5))
    box.close()
    for suffix in ("", "-wal", "-shm"):
        box.path.with_name(box.path.name + suffix).unlink(missing_ok=True)
    if damage == "empty":
        box.path.write_bytes(b"")
    fresh = opened.outbox()
    assert fresh.epoch != box.epoch and "a new counter store" in fresh.started_epoch_because


def test_rows_of_a_store_from_before_row_epochs_keep_the_epoch_they_were_counted_in(tmp_path: Path):
    path = tmp_path / FILENAME
    with closing(sqlite3.connect(path)) as db:
        db.executescript("""
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE counter (meter TEXT NOT NULL, channel TEXT NOT NULL, seq INTEGER NOT NULL,
                                  last_ts_ns INTEGER NOT NULL, PRIMARY KEY (meter, channel));
            CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, meter TEXT NOT NULL, channel TEXT NOT NULL,
                                 seq INTEGER NOT NULL, ts_ns INTEGER NOT NULL, wh REAL NOT NULL);
            INSERT INTO meta VALUES ('epoch', 'abc123');
            INSERT INTO counter VALUES ('main', 'active', 7, 1);
            INSERT INTO outbox (meter, channel, seq, ts_ns, wh) VALUES ('main', 'active', 7, 1, 1.0);
        """)
    box = Outbox(path, "main", 100)
    try:
        assert box.epoch != "abc123"  # no clean-stop token: that version could not prove one
        reader = box.reader()
        assert [(p.epoch, p.seq, p.synced) for _, p in reader.pending(0, 10)] == [("abc123", 7, None)]
        reader.close()
    finally:
        box.close()


def test_synced_is_stored_with_each_row(opened: Opened):
    box = opened.outbox()
    box.record(active(1), synced=False)
    box.record(active(1, start_s=1), synced=True)
    box.record(active(1, start_s=2))
    assert [p.synced for _, p in opened.reader(box).pending(0, 10)] == [False, True, None]


# --- when the epoch began (epoch_ns) ----------------------------------------------------------------

class SteppedClock:
    """A Pi's clocks: booted an hour behind (fake-hwclock) until NTP steps the wall clock; monotonic runs on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real_ns, self.mono_ns, self.behind_ns = T0, 5 * S, 3600 * S
        monkeypatch.setattr(time, "time_ns", lambda: self.real_ns - self.behind_ns)
        monkeypatch.setattr(time, "monotonic_ns", lambda: self.mono_ns)

    def advance(self, seconds: int) -> None:
        self.real_ns += seconds * S
        self.mono_ns += seconds * S

    def step(self) -> None:
        self.behind_ns = 0

    def reboot(self) -> None:
        self.mono_ns, self.behind_ns = 5 * S, 3600 * S


def test_an_epoch_begun_before_ntp_stepped_the_clock_states_its_start_by_the_stepped_clock(
        opened: Opened, monkeypatch: pytest.MonkeyPatch):
    clock = SteppedClock(monkeypatch)
    box = opened.outbox()
    clock.advance(20)
    assert [p.epoch_ns for p in box.record(active(1), synced=False)] == [None], "not believed yet"
    clock.step()
    clock.advance(10)
    stated = box.record(active(2, start_s=30), synced=True)
    assert [p.epoch_ns for p in stated] == [T0] * 2, "the start by the clock that now stamps the pulses"
    assert [p.epoch_ns for _, p in opened.reader(box).pending(0, 10)] == [None, T0, T0]
    box.close()
    again = opened.outbox()  # a clean restart continues the epoch and keeps its start, also while unsynced
    assert again.record(active(1, start_s=40), synced=False)[0].epoch_ns == T0


def test_an_epoch_whose_start_no_believed_clock_read_states_none_after_a_restart(
        opened: Opened, monkeypatch: pytest.MonkeyPatch):
    SteppedClock(monkeypatch)
    box = opened.outbox()
    box.record(active(1), synced=False)
    box.close()
    again = opened.outbox()
    assert again.epoch == box.epoch
    assert again.record(active(1, start_s=1), synced=True)[0].epoch_ns is None, "its start is an hour early"
    crashed = opened.outbox(path=copy_store(again.path, again.path.parent / "crashed", with_wal=True))
    assert crashed.record(active(1, start_s=2))[0].epoch_ns is not None, "a new epoch, begun by this process"


def test_a_pi_restarted_after_a_power_cut_is_not_taken_for_a_second_one(
        opened: Opened, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    clock = SteppedClock(monkeypatch)
    clock.step()
    ledger = Ledger(max_power_w=100_000.0, fixed_wh=True)
    box = opened.outbox()
    clock.advance(1000)
    for pulse in box.record(active(3, start_s=990), synced=True):  # the last at T0 + 992 s, then a power cut
        ledger.apply(pulse, now_ns=pulse.ts_ns)
    clock.advance(100)
    clock.reboot()  # an hour behind: the new epoch begins at once
    restarted = opened.outbox(path=copy_store(box.path, tmp_path / "restarted", with_wal=True))
    clock.advance(30)
    clock.step()  # NTP steps the clock before the first pulse
    clock.advance(30)
    [first] = restarted.record([("active", clock.real_ns, 1.0)], synced=True)
    assert first.epoch_ns == T0 + 1100 * S
    assert ledger.apply(first, now_ns=first.ts_ns) == 1, "a restart, not a second Pi"
