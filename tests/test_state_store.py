"""backend.state_store.StateStore: saves only what a batch changed, all or nothing, migrates the JSON file of
older versions, and never silently starts from zero."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from backend.batch import Delivery
from backend.ledger import Changed, Ledger
from backend.memory_transport import MemorySink
from backend.state_store import STATE_FORMAT, StateError, StateStore
from backend.writer import EnergyWriter
from common.config import load_config
from common.message import ControlCommand, ForgetMeter, SetTotal, encode, encode_control
from tests.support import T0, S, pulse


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "state")


def counted(*meters: str, seq: int = 3) -> Ledger:
    """A ledger that counted ``seq`` pulses of each of ``meters``."""
    ledger = Ledger(100_000, fixed_wh=True)
    for meter in meters:
        ledger.admit(meter, T0)
        ledger.apply(pulse(seq, seq, meter=meter), T0 + 10 * S)
    return ledger


def save_all(store: StateStore, ledger: Ledger) -> None:
    store.save(ledger, Changed(frozenset(key for key, _ in ledger), frozenset(ledger.meters())))


def test_first_start_loads_none_and_creates_nothing(store: StateStore) -> None:
    assert store.load() is None
    assert not store.directory.exists() or not any(store.directory.iterdir())


def test_a_saved_ledger_loads_back_equal(store: StateStore) -> None:
    ledger = counted("main", "garage")
    save_all(store, ledger)
    assert store.path == store.directory / "energy_state.sqlite3"
    assert StateStore(store.directory).load() == ledger.to_json()


def test_only_the_changed_rows_are_written(store: StateStore) -> None:
    ledger = counted("main", "garage")
    save_all(store, ledger)
    ledger.begin()
    ledger.apply(pulse(4, 4, meter="main"), T0 + 10 * S)
    ledger.apply(pulse(4, 4, meter="garage"), T0 + 10 * S)
    store.save(ledger, Changed(frozenset({("main", "active")})))  # garage's change is not named
    saved = StateStore(store.directory).load()
    assert saved is not None
    assert saved["meters"]["main"]["active"]["total_uwh"] == 4_000_000
    assert saved["meters"]["garage"]["active"]["total_uwh"] == 3_000_000


def test_a_batch_that_touches_one_meter_names_only_it(store: StateStore) -> None:
    ledger = counted(*(f"m{i}" for i in range(50)))
    ledger.begin()
    ledger.apply(pulse(3, 3, meter="m7"), T0 + 10 * S)  # a duplicate changes nothing
    ledger.apply(pulse(4, 4, meter="m8"), T0 + 10 * S)
    ledger.admit("new", T0 + 10 * S)
    assert ledger.changed() == Changed(frozenset({("m8", "active")}), frozenset({"new"}))


def test_a_batch_that_neither_committed_nor_rolled_back_is_undone_when_the_next_begins() -> None:
    ledger = counted("main")
    before = ledger.to_json()
    ledger.begin()
    ledger.apply(pulse(9, 9, meter="main"), T0 + 10 * S)
    ledger.admit("garage", T0)  # ... and the batch raised here: it will be redelivered
    ledger.begin()
    assert ledger.to_json() == before and ledger.changed() == Changed()


def test_a_forgotten_meter_is_deleted(store: StateStore) -> None:
    ledger = counted("main", "garage")
    save_all(store, ledger)
    ledger.begin()
    ledger.forget("garage")
    store.save(ledger, ledger.changed())
    saved = store.load()
    assert saved is not None and list(saved["meters"]) == ["main"] and list(saved["admitted"]) == ["main"]


def test_a_save_that_fails_midway_leaves_the_previous_state(store: StateStore, monkeypatch) -> None:
    ledger = counted("main", "garage")
    save_all(store, ledger)
    before = store.load()
    ledger.apply(pulse(9, 9, meter="main"), T0 + 10 * S)
    ledger.apply(pulse(9, 9, meter="garage"), T0 + 10 * S)
    real_write = StateStore._write

    def write_then_fail(*args: object) -> None:
        real_write(*args)  # type: ignore[arg-type]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StateStore, "_write", staticmethod(write_then_fail))
    with pytest.raises(OSError):
        save_all(store, ledger)
    monkeypatch.undo()
    assert StateStore(store.directory).load() == before
    save_all(store, ledger)  # and the next save succeeds
    assert StateStore(store.directory).load() == ledger.to_json()


# --- damaged or missing databases -----------------------------------------------------------------

def _garbage(path: Path) -> None:
    path.write_bytes(b"\xff\xfe garbage" * 100)


def _zeros(path: Path) -> None:
    path.write_bytes(b"\x00" * 8192)


def _torn_pages(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        page = conn.execute("PRAGMA page_size").fetchone()[0]
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        for offset in range(page, size, page):
            fh.seek(offset + 16)
            fh.write(b"\xa5" * (page - 32))


def _future_format(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("UPDATE meta SET value = '99' WHERE key = 'format'").rowcount == 1


def _not_json(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("UPDATE channels SET state = '{\"total_uwh\": 1' WHERE meter = 'm7'").rowcount == 1


@pytest.mark.parametrize("damage", [_garbage, _zeros, _torn_pages, _future_format, _not_json],
                         ids=["garbage", "zeros", "torn-pages", "future-format", "row-not-json"])
def test_a_damaged_database_is_refused_in_one_line_and_kept(store: StateStore, damage) -> None:
    save_all(store, counted(*(f"m{i}" for i in range(300))))
    store.close()
    damage(store.path)
    kept = store.path.read_bytes()
    with pytest.raises(StateError) as info:
        StateStore(store.directory).load()
    message = str(info.value)
    assert "\n" not in message
    assert f"{store.path} is damaged" in message and "refusing to start from zero" in message
    assert store.path.read_bytes() == kept, "a damaged database is never overwritten"


@pytest.mark.parametrize("command", [["writer"], ["state", "show"]])
def test_a_damaged_database_is_refused_by_the_commands_in_one_line(tmp_path: Path, command: list[str]) -> None:
    from tests.support import run_emdc

    store = StateStore(tmp_path)
    save_all(store, counted("main"))
    store.close()
    _garbage(store.path)
    result = run_emdc(command, {"EMDC_STATE_DIR": str(tmp_path), "PATH": os.environ["PATH"]}, check=False)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: {store.path} is damaged (") and "Traceback" not in result.stderr


def test_a_lost_database_after_a_migration_is_refused(store: StateStore) -> None:
    write_legacy(store, counted("main").to_json())
    store.load()
    store.close()
    store.path.unlink()
    with pytest.raises(StateError, match=r"is missing but .*energy_state\.json\.migrated exists"):
        StateStore(store.directory).load()


def test_missing_json_file_with_its_backup_present_is_an_error(store: StateStore) -> None:
    store.directory.mkdir(parents=True)
    (store.directory / "energy_state.json.bak").write_text("{}")
    with pytest.raises(StateError, match=r"is missing but .*energy_state\.json\.bak exists"):
        store.load()


def test_state_path_that_is_a_directory_is_a_state_error(store: StateStore) -> None:
    store.path.mkdir(parents=True)
    with pytest.raises(StateError, match="cannot use"):
        store.load()


# --- migrating the JSON file of older versions ----------------------------------------------------

def write_legacy(store: StateStore, state: dict[str, object]) -> None:
    """An ``energy_state.json`` as the versions before the database wrote it."""
    store.directory.mkdir(parents=True, exist_ok=True)
    store.legacy.write_text(json.dumps({"format": STATE_FORMAT, "state": state}, separators=(",", ":")))


def test_an_older_json_state_is_migrated_once_with_one_line_and_kept(store: StateStore, caplog) -> None:
    ledger = counted("main", "garage", seq=7)
    ledger.set_total("garage", "reactive", 5_000_000, as_of_ns=T0, command_id="c1")
    write_legacy(store, ledger.to_json())
    original = store.legacy.read_bytes()
    with caplog.at_level(logging.INFO, logger="emdc.writer"):
        assert store.load() == ledger.to_json()
        assert StateStore(store.directory).load() == ledger.to_json()
    [line] = [r.getMessage() for r in caplog.records]
    assert line == (f"migrated {store.legacy} (3 channel(s)) into {store.path}; the old file is kept as "
                    f"{store.migrated} and no longer read")
    assert not store.legacy.exists() and store.migrated.read_bytes() == original


def test_a_writer_on_a_migrated_state_has_the_same_totals(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    write_legacy(store, counted("main", seq=42).to_json())
    config = load_config(env={"EMDC_STATE_DIR": str(tmp_path), "EMDC_DISCOVERY": "off"})
    writer = EnergyWriter.open(config, sink=MemorySink(), clock=lambda: T0 + 50 * S)
    assert writer.ledger.channel("main", "active").total_uwh == 42_000_000
    assert writer.ledger.to_json()["meters"] == counted("main", seq=42).to_json()["meters"]


def test_a_migration_interrupted_before_setting_the_file_aside_finishes_at_the_next_start(
        store: StateStore, monkeypatch) -> None:
    write_legacy(store, counted("main").to_json())

    def power_cut(*_args: object) -> None:
        raise OSError("simulated power cut")

    monkeypatch.setattr(os, "replace", power_cut)
    with pytest.raises(StateError):
        store.load()
    monkeypatch.undo()
    assert StateStore(store.directory).load() == counted("main").to_json()
    assert store.migrated.exists() and not store.legacy.exists()


@pytest.mark.parametrize("content", [
    b"",
    b'{"format": 1, "state": {"meters": {"main"',  # truncated
    b"\x00" * 64,  # a block of zeros after a power cut
    b"[1, 2, 3]",
    b'{"format": 2, "state": {}}',
    b'{"format": 1, "state": {"meters": {"main": {"active": {"total_uwh": -1}}}}}',
], ids=["empty", "truncated", "zeros", "list", "future-format", "invalid-ledger"])
def test_a_corrupt_json_state_is_refused_and_neither_migrated_nor_moved(store: StateStore, content: bytes) -> None:
    store.directory.mkdir(parents=True)
    store.legacy.write_bytes(content)
    with pytest.raises(StateError) as info:
        store.load()
    message = str(info.value)
    assert f"{store.legacy} is corrupt" in message and "refusing to start from zero" in message
    assert store.legacy.read_bytes() == content and not store.migrated.exists()
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT count(*) FROM meta").fetchone() == (0,), "nothing was migrated"


def test_a_json_state_put_back_beside_the_database_is_refused_not_guessed(store: StateStore) -> None:
    write_legacy(store, counted("main").to_json())
    store.load()
    store.close()
    write_legacy(store, counted("main", seq=9).to_json())  # an old backup restored the old way
    with pytest.raises(StateError, match="hold a state; refusing to guess which one counts"):
        StateStore(store.directory).load()
    assert store.legacy.exists()


# --- what is saved is what was counted, whatever saves fail ---------------------------------------

class FlakyStore(StateStore):
    """Fails the saves it is told to, after writing part of the transaction (a full disk, an I/O error)."""

    fail = False

    def _write(self, *args: object) -> None:  # type: ignore[override]
        super()._write(*args)  # type: ignore[arg-type]
        if self.fail:
            raise OSError(5, "Input/output error")


METERS = ("main", "m1", "m2")
ITEM = st.one_of(
    st.tuples(st.just("pulse"), st.sampled_from(METERS), st.sampled_from(("active", "reactive")),
              st.integers(min_value=1, max_value=40)),
    st.tuples(st.just("set_total"), st.sampled_from(METERS), st.sampled_from(("active", "reactive")),
              st.integers(min_value=0, max_value=9)),
    st.tuples(st.just("forget"), st.sampled_from(("m1", "m2")), st.just(""), st.just(0)),
)


def as_delivery(tag: int, item: tuple[str, str, str, int], clock_s: int) -> Delivery:
    kind, meter, channel, n = item
    if kind == "pulse":
        counted_pulse = pulse(n, n, meter=meter, channel=channel)
        return Delivery(tag, counted_pulse.routing_key, encode(counted_pulse))
    if kind == "set_total":
        command_id = f"c{n}{METERS.index(meter)}{'ab'[channel == 'reactive']}"  # repeats are ignored by id
        command: ControlCommand = SetTotal(meter, channel, Decimal(n), T0 + clock_s * S, command_id)
    else:
        command = ForgetMeter(meter, f"f{clock_s}")
    return Delivery(tag, command.routing_key, encode_control(command))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.lists(ITEM, min_size=1, max_size=8), st.booleans()), min_size=1, max_size=8))
@example([([("pulse", "m1", "active", 1)], True), ([("pulse", "m2", "active", 1)], False)])
def test_after_any_batches_and_failed_saves_the_saved_state_is_the_counted_one(
        tmp_path_factory: pytest.TempPathFactory, batches: list[tuple[list[tuple[str, str, str, int]], bool]]) -> None:
    clock_s = [3600]

    def clock() -> int:
        return T0 + clock_s[0] * S

    env = {"EMDC_DISCOVERY": "off", "EMDC_METERS": "main", "EMDC_ADMIT_NEW_METERS": "1"}
    writers = []
    for name in ("flaky", "reference"):
        directory = tmp_path_factory.mktemp(name)
        writer = EnergyWriter.open(load_config(env={**env, "EMDC_STATE_DIR": str(directory)}), sink=MemorySink(),
                                   clock=clock)
        writer.store = FlakyStore(directory)
        writers.append(writer)
    flaky, reference = writers
    for items, fails in batches:
        clock_s[0] += 1
        batch = [as_delivery(tag, item, clock_s[0]) for tag, item in enumerate(items, 1)]
        flaky.store.fail = fails  # type: ignore[attr-defined]
        try:
            flaky.handle_batch(batch)
        except OSError:
            assert fails
        else:
            reference.handle_batch(batch)  # the reference counts only the batches that were saved
            assert StateStore(flaky.store.directory).load() == flaky.ledger.to_json()
        assert flaky.ledger.to_json() == reference.ledger.to_json()
    flaky.store.fail = False  # type: ignore[attr-defined]
    for writer in writers:
        writer.handle_batch([])  # saves what was admitted at start, if no batch was saved yet
    assert StateStore(flaky.store.directory).load() == flaky.ledger.to_json() == reference.ledger.to_json()


def test_a_backup_taken_while_saving_holds_the_saved_state_and_restores_as_the_state(tmp_path: Path) -> None:
    from tests.support import run_emdc

    store = StateStore(tmp_path / "live")
    ledger = counted("main", "garage")
    save_all(store, ledger)  # the connection stays open, with the changes in the -wal file
    env = {"EMDC_STATE_DIR": str(store.directory), "PATH": os.environ["PATH"]}
    result = run_emdc(["state", "backup", str(tmp_path / "copy.sqlite3")], env)
    assert result.stdout.strip() == f"backed up 2 channel(s) from {store.path} to {tmp_path / 'copy.sqlite3'}"
    (tmp_path / "restored").mkdir()
    (tmp_path / "copy.sqlite3").rename(tmp_path / "restored" / StateStore.FILENAME)
    assert StateStore(tmp_path / "restored").load() == ledger.to_json()
    again = run_emdc(["state", "backup", str(tmp_path / "restored" / StateStore.FILENAME)], env, check=False)
    assert again.returncode == 1 and "exists; give the backup a new name" in again.stderr
