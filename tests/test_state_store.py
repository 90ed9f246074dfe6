"""backend.state_store.StateStore: atomic saves, a .bak copy, and never silently starting from zero."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from backend.state_store import STATE_FORMAT, StateError, StateStore

OLD = {"meters": {"main": {"active": {"total_uwh": 1_000_000}}}}
NEW = {"meters": {"main": {"active": {"total_uwh": 2_000_000}}}}


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "state")


def saved_state(path: Path) -> object:
    return json.loads(path.read_bytes())["state"]


def test_first_start_loads_none(store: StateStore):
    assert store.load() is None


def test_save_creates_the_directory_and_roundtrips(store: StateStore):
    store.save(OLD)
    assert store.path == store.directory / "energy_state.json"
    assert store.load() == OLD


def test_saved_file_has_the_format_marker(store: StateStore):
    store.save(OLD)
    assert json.loads(store.path.read_bytes()) == {"format": STATE_FORMAT, "state": OLD}


def test_latest_save_wins(store: StateStore):
    for total in range(5):
        store.save({"meters": {}, "n": total})
    assert store.load() == {"meters": {}, "n": 4}


def test_first_save_makes_no_backup(store: StateStore):
    store.save(OLD)
    assert not store.backup.exists()


def test_backup_holds_the_previous_state(store: StateStore):
    store.save(OLD)
    store.save(NEW)
    assert store.backup.name == "energy_state.json.bak"
    assert saved_state(store.backup) == OLD
    assert store.load() == NEW


def test_no_temporary_files_are_left_behind(store: StateStore):
    store.save(OLD)
    store.save(NEW)
    store.save(OLD)
    assert sorted(p.name for p in store.directory.iterdir()) == ["energy_state.json", "energy_state.json.bak"]


def test_a_new_store_object_reads_what_another_saved(store: StateStore):
    store.save(NEW)
    assert StateStore(store.directory).load() == NEW


# --- corrupt or missing files ---------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    b"",
    b'{"format": 1, "state": {"meters": {"main"',  # truncated
    b"\x00" * 64,  # a block of zeros after a power cut
    b"\xff\xfe garbage",
    b"[1, 2, 3]",
    b'"a string"',
    b'{"state": {}}',
    b'{"format": 2, "state": {}}',
    b'{"format": 1}',
], ids=["empty", "truncated", "zeros", "binary", "list", "string", "no-format", "future-format", "no-state"])
def test_corrupt_file_is_an_error_mentioning_the_backup(store: StateStore, content: bytes):
    store.save(OLD)
    store.save(NEW)
    store.path.write_bytes(content)
    with pytest.raises(StateError) as info:
        store.load()
    message = str(info.value)
    assert "corrupt" in message
    assert str(store.path) in message
    assert str(store.backup) in message
    assert "refusing to start from zero" in message


def test_corrupt_file_without_backup_is_still_an_error(store: StateStore):
    store.save(OLD)
    store.path.write_bytes(b"{not json")
    with pytest.raises(StateError, match="corrupt") as info:
        store.load()
    assert ".bak" not in str(info.value)


def test_missing_file_with_backup_present_is_an_error(store: StateStore):
    store.save(OLD)
    store.save(NEW)
    store.path.unlink()
    with pytest.raises(StateError, match="is missing but") as info:
        store.load()
    assert f"cp {store.backup} {store.path}" in str(info.value)


def test_corrupt_file_is_not_overwritten_by_loading(store: StateStore):
    store.save(OLD)
    store.path.write_bytes(b"garbage")
    with pytest.raises(StateError):
        store.load()
    assert store.path.read_bytes() == b"garbage"


# --- crashes during a save ------------------------------------------------------------------------

def test_stray_temporary_file_from_a_crash_is_ignored(store: StateStore):
    store.save(OLD)
    (store.directory / "energy_state.json.tmp").write_bytes(b'{"format": 1, "state": {"meters": {"ha')
    assert store.load() == OLD


def test_stray_temporary_file_on_first_start_still_means_no_state(store: StateStore):
    store.directory.mkdir(parents=True)
    (store.directory / "energy_state.json.tmp").write_bytes(b"partial")
    assert store.load() is None


def test_save_after_a_crash_replaces_the_stray_temporary_file(store: StateStore):
    store.save(OLD)
    (store.directory / "energy_state.json.tmp").write_bytes(b"x" * 100_000)
    store.save(NEW)
    assert store.load() == NEW
    assert not (store.directory / "energy_state.json.tmp").exists()


def test_crash_before_the_rename_keeps_the_old_state(store: StateStore, monkeypatch):
    store.save(OLD)
    real_replace = os.replace

    def crash_on_final_rename(src, dst):
        if Path(dst) == store.path:
            raise OSError("simulated power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_final_rename)
    with pytest.raises(OSError, match="simulated power cut"):
        store.save(NEW)
    monkeypatch.undo()
    assert store.load() == OLD
    assert StateStore(store.directory).load() == OLD
    store.save(NEW)  # and the next save succeeds
    assert store.load() == NEW


@pytest.mark.parametrize("call", ["fsync", "link"], ids=["writing the temporary file", "updating the backup"])
def test_a_crash_while_saving_keeps_the_old_state(store: StateStore, monkeypatch, call: str):
    store.save(OLD)

    def failing(*_args: object) -> None:
        raise OSError("simulated I/O error")

    monkeypatch.setattr(os, call, failing)
    with pytest.raises(OSError):
        store.save(NEW)
    monkeypatch.undo()
    assert store.load() == OLD


def test_save_survives_a_stale_backup_link_file(store: StateStore):
    store.save(OLD)
    (store.directory / "energy_state.json.bak.tmp").write_bytes(b"stale")
    store.save(NEW)
    assert store.load() == NEW
    assert saved_state(store.backup) == OLD


# --- unreadable files -----------------------------------------------------------------------------

def test_unreadable_file_is_a_state_error(store: StateStore, monkeypatch):
    store.save(OLD)
    real_read_bytes = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == store.path:
            raise PermissionError(13, "Permission denied")
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(StateError, match=r"cannot read .*Permission denied"):
        store.load()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_file_without_read_permission_is_a_state_error(store: StateStore):
    store.save(OLD)
    store.path.chmod(0)
    try:
        with pytest.raises(StateError, match="cannot read"):
            store.load()
    finally:
        store.path.chmod(0o600)


def test_state_path_that_is_a_directory_is_a_state_error(store: StateStore):
    store.path.mkdir(parents=True)
    with pytest.raises(StateError, match="cannot read"):
        store.load()

