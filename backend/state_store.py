"""Crash-safe persistence of the writer's ledger in ``energy_state.sqlite3``.

One row per (meter, channel) and one per meter (its admission), in an SQLite
database in WAL mode. A batch saves only the rows it changed, in one
transaction, before the batch is acknowledged: the cost of a save follows
the batch, not the number of meters in the state.

Why it survives a power cut: a transaction is committed by appending its
pages to the write-ahead log and fsyncing it (``synchronous=FULL``); a
crash at any instant leaves either the whole transaction or none of it
(SQLite ignores a torn tail of the log). ``synchronous=NORMAL``, enough
for the edge's outbox deletes, is not enough here: in WAL mode it does not
sync at commit, so a power cut could undo batches that were already
acknowledged, whose messages the broker has then deleted: those pulses
would be lost from the totals for good. FULL costs one fsync per batch,
fewer than the two (file and directory) of the JSON file it replaces.

The channel rows hold the ledger's own JSON form of a channel
(:meth:`~backend.ledger.ChannelState.to_json`), so the ledger stays the one
home of what a channel's state is. A database that cannot be read, or fails
SQLite's ``quick_check``, is never replaced by an empty state.

An ``energy_state.json`` of an older version is migrated on the first start
(in one transaction) and then renamed ``energy_state.json.migrated``, so that
neither a person nor an older version takes it for the live state.

Example::

    store = StateStore(Path("state"))
    doc = store.load()          # None on first start; else the ledger's JSON form
    ledger.begin(); ...; store.save(ledger, ledger.changed()); ledger.commit()
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from backend.ledger import Changed, Ledger

if TYPE_CHECKING:
    from common.config import Config

log = logging.getLogger("emdc.writer")

STATE_FORMAT = 1
LOCK_FILENAME = "writer.lock"
ID_FILENAME = "state_id"
LEGACY_FILENAME = "energy_state.json"
MIGRATED_SUFFIX = ".migrated"
# SQLite's result codes for a damaged file (any other error is a passing or permission problem).
_CORRUPT, _NOT_A_DATABASE = 11, 26

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS channels (meter TEXT NOT NULL, channel TEXT NOT NULL, state TEXT NOT NULL,
                                     PRIMARY KEY (meter, channel)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meters (meter TEXT PRIMARY KEY, admitted_ns INTEGER) WITHOUT ROWID
"""


class StateError(RuntimeError):
    """The saved state exists but cannot be trusted; the writer must not start."""


@contextlib.contextmanager
def exclusive_state_dir(directory: Path) -> Iterator[None]:
    """Hold the state dir for this process, or raise :class:`StateError` if another writer has it.

    Two writers on the same files would overwrite each other's totals. The
    claim is an ``flock`` on ``writer.lock``, which the kernel releases when
    the process ends, however it ends.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / LOCK_FILENAME).open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise StateError(f"{directory} is in use by another writer ({holder}); one writer per state dir: "
                             "stop the other one, or give this one its own state_dir") from None
        fh.truncate(0)
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        yield


class LedgerStore(Protocol):
    """Where the writer's ledger is saved: :class:`StateStore` (this server) or, for an active/standby pair,
    :class:`~backend.shared_state.SharedStateStore` (a shared database). Example::

        store = open_store(config)
        if store.acquire():         # becoming active on a shared state: count on from what is saved now
            ledger.load_json(store.load() or {"meters": {}})
        ledger.begin(); ...; store.save(ledger, ledger.changed()); ledger.commit()
    """

    path: Any  # where the state is, for log lines

    def load(self) -> dict[str, Any] | None: ...

    def save(self, ledger: Ledger, changed: Changed) -> None: ...

    def acquire(self) -> bool: ...

    def identity(self) -> str: ...

    def close(self) -> None: ...


def open_store(config: Config) -> LedgerStore:
    """The store the configuration names: the shared database of ``state_url``, else the state dir's SQLite.

    A shared state that is still empty starts as a copy of this server's
    state and identity (one log line), so that the first writer moved to it
    counts on from its own totals, and Home Assistant's totals stay theirs.
    """
    local = StateStore(Path(config.state_dir))
    if not config.state_url:
        return local
    from backend.shared_state import SharedStateStore

    shared = SharedStateStore.open(config.state_url)
    if shared.load() is None and (doc := local.load()) is not None:
        shared.replace(doc)
        log.warning("copied the state in %s into the shared state %s; the local copy is kept and no longer used",
                    local.path, shared.path)
    shared.identity(default=local.identity())
    return shared


class StateStore:
    """Loads the ledger's JSON form from ``<directory>/energy_state.sqlite3`` and saves changed rows into it."""

    FILENAME = "energy_state.sqlite3"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / self.FILENAME
        self.legacy = self.directory / LEGACY_FILENAME
        self.migrated = self.legacy.with_name(LEGACY_FILENAME + MIGRATED_SUFFIX)
        self._conn: sqlite3.Connection | None = None

    def load(self) -> dict[str, Any] | None:
        """The saved state (:meth:`Ledger.to_json` form), None if there has never been one, else raise
        :class:`StateError`. An older version's ``energy_state.json`` is migrated first."""
        if not self.path.exists():
            self._refuse_a_lost_database()
            if not self.legacy.exists():
                return None
        try:
            conn = self._connection()
            problem = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            if problem != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {' '.join(problem.split())}")
            if self._format(conn) is None:
                self._migrate(conn)
            elif self.legacy.exists():
                self._finish_migration(conn)
            return self._read(conn)
        except sqlite3.DatabaseError as exc:
            self.close()
            if getattr(exc, "sqlite_errorcode", _CORRUPT) & 0xFF in (_CORRUPT, _NOT_A_DATABASE):
                raise self._damaged(str(exc)) from None
            raise StateError(f"cannot use {self.path} ({exc}); the writer needs to read and write it and the "
                             "files beside it") from None
        except OSError as exc:
            self.close()
            raise StateError(f"cannot read {self.path}: {exc.strerror}") from None

    def save(self, ledger: Ledger, changed: Changed) -> None:
        """Write the rows of the ``changed`` channels and meters as ``ledger`` now has them, in one durable
        transaction (all or nothing)."""
        channels = []
        gone = []
        for meter, channel in changed.channels:
            state = ledger.get(meter, channel)
            if state is None:
                gone.append((meter, channel))
            else:
                channels.append((meter, channel, json.dumps(state.to_json(), separators=(",", ":"))))
        meters = [(m, ledger.admitted_ns(m)) for m in changed.meters if ledger.is_known(m)]
        forgotten = [(m,) for m in changed.meters if not ledger.is_known(m)]
        conn = self._connection()
        with _transaction(conn):
            self._write(conn, channels, meters)
            conn.executemany("DELETE FROM channels WHERE meter = ? AND channel = ?", gone)
            conn.executemany("DELETE FROM meters WHERE meter = ?", forgotten)

    def replace(self, doc: dict[str, Any]) -> None:
        """Replace the whole saved state by ``doc`` (:meth:`Ledger.to_json` form), in one transaction."""
        conn = self._connection()
        with _transaction(conn):
            conn.execute("DELETE FROM channels")
            conn.execute("DELETE FROM meters")
            self._write_document(conn, doc)

    def acquire(self) -> bool:
        """Nothing to take: only the writer holding the state dir's lock saves here, and its ledger is the
        state (False: no need to reload it)."""
        return False

    def identity(self) -> str:
        """This state dir's identity, created (durably) on first use: it tells one writer's state from another's.

        A copy of the whole dir (a restored backup, a moved server) keeps it.
        """
        path = self.directory / ID_FILENAME
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            pass
        identity = uuid.uuid4().hex[:12]
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            fh.write(identity + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return identity

    def backup(self, target: Path) -> int:
        """Copy the saved state into the database file ``target``, consistent even while a writer saves (SQLite's
        online backup, which a plain copy of the file and its ``-wal`` is not); return its channels' count."""
        if self.load() is None:
            raise StateError(f"no state saved in {self.path} yet: nothing to back up")
        if target.exists():
            raise StateError(f"{target} exists; give the backup a new name")
        with contextlib.closing(sqlite3.connect(target)) as copy:
            self._connection().backup(copy)
            count: int = copy.execute("SELECT count(*) FROM channels").fetchone()[0]
        return count

    def close(self) -> None:
        """Fold the write-ahead log into the database file (a copy of that one file is then complete) and close."""
        if self._conn is None:
            return
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()
        self._conn = None

    # -- inside -----------------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")  # durable at commit: see the module's docstring
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _refuse_a_lost_database(self) -> None:
        """Raise if the database is gone but traces of a saved state are left: never start from zero then."""
        for trace, restore in ((self.migrated, "copy back a backup of it"),
                               (self.legacy.with_name(LEGACY_FILENAME + ".bak"),
                                f"restore it with: cp {self.legacy}.bak {self.legacy}")):
            if trace.exists() and not self.legacy.exists():
                raise StateError(f"{self.path} is missing but {trace} exists; refusing to start from zero. "
                                 f"Find the database ({restore}) or move {trace} aside to start from zero")

    @staticmethod
    def _format(conn: sqlite3.Connection) -> int | None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        if row is None:
            return None
        if row[0] != str(STATE_FORMAT):
            raise sqlite3.DatabaseError(f"unknown format {row[0]!r}")
        return STATE_FORMAT

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Move an older version's ``energy_state.json`` (if any) into the database and set it aside."""
        doc = self._read_legacy() if self.legacy.exists() else {"meters": {}}
        with _transaction(conn):
            if self._format(conn) is not None:  # another process migrated meanwhile
                return
            self._write_document(conn, doc)
            if self.legacy.exists():
                conn.execute("INSERT INTO meta (key, value) VALUES ('migrated', ?)", (self._fingerprint(),))
        if self.legacy.exists():
            self._set_aside_legacy(sum(len(channels) for channels in doc["meters"].values()))

    def _finish_migration(self, conn: sqlite3.Connection) -> None:
        """Set aside the JSON file a migration was interrupted before setting aside; refuse any other one."""
        row = conn.execute("SELECT value FROM meta WHERE key = 'migrated'").fetchone()
        if row is None or row[0] != self._fingerprint():
            raise StateError(f"both {self.path} and {self.legacy} hold a state; refusing to guess which one counts. "
                             f"Move the one that is not the state aside (to migrate the JSON file again, move "
                             f"{self.path} aside)")
        self._set_aside_legacy(0)

    def _fingerprint(self) -> str:
        return hashlib.sha256(self.legacy.read_bytes()).hexdigest()

    def _set_aside_legacy(self, channels: int) -> None:
        with contextlib.suppress(FileNotFoundError):  # another process set it aside meanwhile
            os.replace(self.legacy, self.migrated)
            log.warning("migrated %s (%d channel(s)) into %s; the old file is kept as %s and no longer read",
                        self.legacy, channels, self.path, self.migrated)

    def _read_legacy(self) -> dict[str, Any]:
        """The state in an older version's JSON file, or raise :class:`StateError` naming what is wrong."""
        try:
            raw = self.legacy.read_bytes()
        except OSError as exc:
            raise StateError(f"cannot read {self.legacy}: {exc.strerror}") from None
        try:
            doc = json.loads(raw)
            if doc.get("format") != STATE_FORMAT:
                raise ValueError(f"unknown format {doc.get('format')!r}")
            state: dict[str, Any] = doc["state"]
            Ledger.from_json(state, max_power_w=1)  # the same checks as loading it, before anything is written
            return state
        except (ValueError, AttributeError, KeyError, TypeError, RecursionError) as exc:
            backup = self.legacy.with_name(LEGACY_FILENAME + ".bak")
            hint = f" The previous good copy is {backup}." if backup.exists() else ""
            raise StateError(f"{self.legacy} is corrupt ({exc}); refusing to start from zero.{hint} "
                             "Inspect both, then copy the right one into place.") from None

    def _write_document(self, conn: sqlite3.Connection, doc: dict[str, Any]) -> None:
        try:
            channels = [(meter, channel, json.dumps(state, separators=(",", ":")))
                        for meter, by_channel in doc["meters"].items() for channel, state in by_channel.items()]
            meters = list(doc.get("admitted", {}).items())
            self._write(conn, channels, meters)
        except (AttributeError, TypeError, ValueError, sqlite3.InterfaceError) as exc:
            raise StateError(f"{self.legacy} does not hold a valid ledger ({exc}); refusing to start from zero. "
                             "Inspect it and its .bak copy.") from None

    @staticmethod
    def _write(conn: sqlite3.Connection, channels: list[tuple[str, str, str]],
               meters: list[tuple[str, int | None]]) -> None:
        conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('format', ?)", (str(STATE_FORMAT),))
        conn.executemany("INSERT OR REPLACE INTO channels (meter, channel, state) VALUES (?, ?, ?)", channels)
        conn.executemany("INSERT OR REPLACE INTO meters (meter, admitted_ns) VALUES (?, ?)", meters)

    def _read(self, conn: sqlite3.Connection) -> dict[str, Any] | None:
        meters: dict[str, dict[str, Any]] = {}
        for meter, channel, state in conn.execute("SELECT meter, channel, state FROM channels"):
            try:
                meters.setdefault(meter, {})[channel] = json.loads(state)
            except (ValueError, TypeError) as exc:
                raise sqlite3.DatabaseError(f"the row of {meter}/{channel} is not JSON ({exc})") from None
        admitted = dict(conn.execute("SELECT meter, admitted_ns FROM meters"))
        if not meters and not admitted:
            return None
        return {"meters": meters, "admitted": admitted}

    def _damaged(self, why: str) -> StateError:
        wal = self.path.with_name(self.FILENAME + "-wal")
        keep = f"cp {self.path}{f' {wal}' if wal.exists() else ''} <somewhere safe>"
        return StateError(f"{self.path} is damaged ({why}); refusing to start from zero. Keep it for inspection "
                          f"({keep}), then restore a backup of the state dir")


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
