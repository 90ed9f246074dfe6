"""The edge's durable pulse counter and outbox, in one SQLite database (WAL mode).

Recording a batch of pulses increments the per-channel counter and appends
the numbered pulses to the outbox in one transaction, committed with
``synchronous=FULL`` before anything touches the network: after a crash or a
power cut the counter never goes back, so a ``seq`` is never reused. The
publisher deletes rows once the broker confirmed them; those deletes commit
with ``synchronous=NORMAL``, because losing one only causes a harmless resend.

SD-card wear: one fsync per recorded batch. The recorder commits at most once
per ``commit_interval_ms`` (:class:`~edge.commit_pacer.CommitPacer`), so high
pulse rates and bursts share writes.

When the outbox holds ``max_rows``, the oldest rows are dropped: their timing
detail is lost, but the counter stays exact, so the next delivered ``seq``
still tells the backend how many pulses happened.

Storage faults are sorted for the callers. A full, read-only or failing disk
and a locked store are passing (:class:`StoreError` with ``damaged`` false):
the recorder holds pulses in memory and the publisher retries. A damaged store
(SQLite says malformed or not a database) cannot be trusted with the counter:
it is refused at start (``PRAGMA quick_check``) and, when found while running,
marked in :class:`StoreHealth` so that the service stops feeding the systemd
watchdog and the restart refuses it with instructions.

A counter epoch continues only across a *clean* stop, proven by a token that
:meth:`Outbox.close` writes both into the database and into a file beside it.
Any other start (a power cut, kill -9, a lost ``-wal`` file, a restored
backup, a deleted or recreated store) begins a new epoch with counters at
zero, so no genuine new pulse can reuse a ``seq`` the writer has already
counted. Each outbox row carries its own epoch, and when that epoch began
(``epoch_ns``, by the Pi's clock once it may be believed: :class:`EpochStart`),
so rows of the previous epoch still go out correctly after the change, and a
writer that has never seen the channel can judge a first ``seq`` against the
time the counter has run.

Example::

    outbox = Outbox(Path("state/edge.sqlite3"), meter="main", max_rows=1_000_000)
    [pulse] = outbox.record([("active", 1_764_000_000_000_000_000, 1.0)], synced=True)
    queue = outbox.reader()          # in the publisher thread
    rows = queue.pending(after_id=0, limit=100)
    queue.confirm([row_id for row_id, _ in rows])
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from common.message import Pulse

log = logging.getLogger("emdc.outbox")

FILENAME = "edge.sqlite3"
CLEAN_STOP_SUFFIX = ".clean"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counter (meter TEXT NOT NULL, channel TEXT NOT NULL, seq INTEGER NOT NULL,
                                    last_ts_ns INTEGER NOT NULL, PRIMARY KEY (meter, channel));
CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, meter TEXT NOT NULL,
                                   channel TEXT NOT NULL, seq INTEGER NOT NULL, ts_ns INTEGER NOT NULL,
                                   wh REAL NOT NULL, epoch TEXT, synced INTEGER, epoch_ns INTEGER);
"""
# Columns added since the first version; rows stored before have the epoch of that time.
_ADDED_COLUMNS = {"epoch": "TEXT", "synced": "INTEGER", "epoch_ns": "INTEGER"}


# Primary result codes (the low byte of an extended one) of a store that works again once the disk does.
_PASSING = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_READONLY,
                      sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL,
                      sqlite3.SQLITE_PERM})
# ... and of a store whose content is broken: it must not be counted on.
_DAMAGED = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


class OutboxError(RuntimeError):
    """The counter store cannot be opened; the edge must not start counting from zero."""


class StoreError(OutboxError):
    """A read or write of the counter store failed; ``damaged`` tells a broken store from a passing fault.

    ``reason`` is SQLite's own short text ("database or disk is full"), for
    one log line. Example::

        try:
            outbox.record(pulses)
        except StoreError as exc:
            ...  # exc.damaged: stop and let the restart refuse the store; else: hold and retry
    """

    def __init__(self, reason: str, *, damaged: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.damaged = damaged

    @classmethod
    def of(cls, exc: sqlite3.Error) -> StoreError | None:
        """The storage fault ``exc`` reports, or None if it is not one (a bug: let it surface).

        >>> StoreError.of(sqlite3.OperationalError("database or disk is full")) is None  # no result code
        True
        """
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None:
            return None
        if code & 0xFF in _DAMAGED:
            return cls(str(exc), damaged=True)
        if code & 0xFF in _PASSING:
            return cls(str(exc), damaged=False)
        return None


class StoreHealth:
    """Whether any connection to the store found it damaged; the recorder's and the publisher's share one.

    The service reads :attr:`damaged` for the watchdog: a damaged store must
    end the process, so that systemd restarts it and the start-up check refuses
    the store, rather than leave a process that counts nothing but looks alive.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.damaged = ""  # SQLite's reason, once a connection found the store damaged

    def raise_for(self, exc: sqlite3.Error) -> None:
        """Raise the :class:`StoreError` that ``exc`` reports (noting damage); return if it reports none."""
        error = StoreError.of(exc)
        if error is None:
            return
        if error.damaged and not self.damaged:
            self.damaged = error.reason
        raise error from exc


class DamagedStoreError(OutboxError):
    """The store is damaged: one line for an operator, saying what is wrong and how to start counting again.

    The text is made when shown, after the refusing connection has closed, so
    that it names a ``-wal`` file to move along only if one is really left.
    """

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(path, why)
        self.path = path
        self.why = why

    def __str__(self) -> str:
        path = self.path
        wal = path.with_name(path.name + "-wal")
        move = f"mv {path} {path}.damaged"
        if wal.exists():
            move += f" && mv {wal} {path}.damaged-wal"
        return (f"the counter store {path} is damaged ({self.why}); the edge will not count on it. Move it aside "
                f"to keep it for inspection ({move}) and start the edge again: it begins a new counter store, and "
                "the writer counts on from the new epoch without counting anything twice; pulses that were only "
                "in the damaged store's unsent outbox are lost")


def _why_not_created(path: Path) -> str:
    """The operating system's reason why no file can be created beside ``path`` ("" if one can)."""
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            return ""
    except OSError as exc:
        return f"{exc.strerror} on the directory {path.parent}"


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    existed = path.exists()
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    except sqlite3.Error as exc:
        raise _open_error(path, exc, existed) from None
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
    except sqlite3.Error as exc:
        conn.close()
        raise _open_error(path, exc, existed) from None
    return conn


def _open_error(path: Path, exc: sqlite3.Error, existed: bool) -> OutboxError:
    """Why the store at ``path`` cannot be used, worded for the operator who must act on it."""
    fault = StoreError.of(exc)
    if fault is not None and fault.damaged:
        return DamagedStoreError(path, fault.reason)
    why = "" if existed else _why_not_created(path)
    if why:
        return OutboxError(f"cannot create the counter store {path}: {why} (the edge's user needs write access)")
    return OutboxError(f"cannot use the counter store {path} ({exc}); the edge needs to read and write it and "
                       "the files beside it")


@dataclass(frozen=True)
class EpochStart:
    """When the counter epoch began (``epoch_ns``), stated only as read by a clock that may be believed.

    A Pi without a real-time clock boots with the time it saved last
    (fake-hwclock: up to an hour behind) and, after a power cut, begins its new
    epoch before NTP steps the clock. A start noted then is early by that hour,
    and a writer would take the restarted Pi for a second one that ran beside
    its own last epoch. So the start is read again the first time pulses are
    stamped by a clock not known to be unsynchronised, from the monotonic clock
    that no step moves: the wall clock then, less the monotonic time since the
    epoch began. Until then, and for an epoch begun by an earlier process whose
    start was never read so, none is stated.

    ``began_mono_ns`` is the monotonic time at which this process began the
    epoch (None: an earlier process did); ``checked`` says that ``ns`` was read
    by a clock not known to be unsynchronised.

        >>> start = EpochStart(ns=1_000, began_mono_ns=50, checked=False)  # begun 1 h behind
        >>> start.stated(synced=False, wall_ns=1_100, mono_ns=150)[0] is None
        True
        >>> stated, start = start.stated(synced=True, wall_ns=3_600_200, mono_ns=250)  # NTP stepped the clock
        >>> stated, start.checked
        (3600000, True)
        >>> EpochStart(ns=1_000, began_mono_ns=None, checked=False).stated(synced=True, wall_ns=9, mono_ns=9)[0]
    """

    ns: int | None
    began_mono_ns: int | None
    checked: bool

    def stated(self, *, synced: bool | None, wall_ns: int, mono_ns: int) -> tuple[int | None, EpochStart]:
        """The ``epoch_ns`` for pulses stamped now with a clock ``synced`` or not, and the start from then on."""
        if self.checked or synced is False:
            return (self.ns if self.checked else None), self
        if self.began_mono_ns is None:
            return None, self
        ns = wall_ns - (mono_ns - self.began_mono_ns)
        return ns, EpochStart(ns, self.began_mono_ns, True)


class Outbox:
    """Counter and outbox owner; :meth:`record` must be called from one thread only."""

    def __init__(self, path: Path, meter: str, max_rows: int) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"cannot create the state directory {path.parent} ({exc.strerror})") from None
        self.path = path
        self.meter = meter
        self.max_rows = max_rows
        self.clean_stop_path = path.with_name(path.name + CLEAN_STOP_SUFFIX)
        self.health = StoreHealth(path)
        self._conn = _connect(path, "FULL")
        try:
            self._open()
        except BaseException:
            self._conn.close()
            raise
        self._dropping = False
        self._closed = False

    def _open(self) -> None:
        """Check the store, then open this session's epoch; a damaged store is refused with what to do."""
        conn = self._conn
        try:
            # Reads every page: for a full outbox of 1,000,000 pulses (53 MB) 0.15 s on a PC from the page
            # cache and 1 s from a cold one, seconds on a Pi Zero; nothing to speak of for the usual
            # near-empty outbox. A damaged page found later would
            # stop the service while it counts, so better refuse the store now, with instructions.
            problem = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            if problem != "ok":
                raise DamagedStoreError(self.path, f"quick_check: {' '.join(problem.split())}")
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                self.epoch, self.started_epoch_because = self._open_epoch()
                meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('epoch_ns', 'epoch_ns_checked')")
                            .fetchall())
                # No time for an epoch begun by a version that did not note it; unchecked for one that did not
                # read it again once the clock could be believed.
                self.epoch_start = EpochStart(int(meta["epoch_ns"]) if "epoch_ns" in meta else None,
                                              None if self.started_epoch_because == "" else time.monotonic_ns(),
                                              meta.get("epoch_ns_checked") == "1")
            # Neither the main file nor the token file may prove a clean stop from now on, even if the -wal
            # is lost later: a restart after this session's end must begin a new epoch unless it is clean too.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._seq = dict(conn.execute("SELECT channel, seq FROM counter WHERE meter=?", (self.meter,)).fetchall())
            self.last_ts_ns: int = conn.execute("SELECT coalesce(max(last_ts_ns), 0) FROM counter").fetchone()[0]
        except sqlite3.Error as exc:
            raise _open_error(self.path, exc, existed=True) from None
        try:
            self.clean_stop_path.unlink(missing_ok=True)
        except OSError as exc:
            raise OutboxError(f"cannot remove {self.clean_stop_path} ({exc.strerror}); it would let the next start "
                              "continue this epoch after a crash") from None

    def _open_epoch(self) -> tuple[str, str]:
        """The epoch to count in, and why a new one was started ("" if the last stop was clean)."""
        for statement in filter(str.strip, _SCHEMA.split(";")):
            self._conn.execute(statement)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(outbox)")}
        for name, kind in _ADDED_COLUMNS.items():
            if name not in columns:
                self._conn.execute(f"ALTER TABLE outbox ADD COLUMN {name} {kind}")
        meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        old = meta.get("epoch")
        if old is not None:
            self._conn.execute("UPDATE outbox SET epoch = ? WHERE epoch IS NULL", (old,))
        token = meta.get("clean_stop")
        self._conn.execute("DELETE FROM meta WHERE key = 'clean_stop'")
        if old is not None and token is not None and token == self._read_clean_stop_file():
            return old, ""
        if old is None:
            why = "a new counter store (right on a first start; otherwise the store was deleted or lost)"
        else:
            why = (f"the last stop of epoch {old} was not clean (power cut, crash, kill -9) or the store was "
                   "restored or copied")
        epoch = secrets.token_hex(8)
        self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (epoch,))
        self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('epoch_ns', ?)", (str(time.time_ns()),))
        self._conn.execute("DELETE FROM meta WHERE key = 'epoch_ns_checked'")
        self._conn.execute("DELETE FROM counter")
        return epoch, why

    def _read_clean_stop_file(self) -> str | None:
        try:
            return self.clean_stop_path.read_text().strip()
        except OSError:
            return None

    def counters(self) -> dict[str, int]:
        """Pulses counted so far per channel of this meter."""
        return dict(self._seq)

    def record(self, pulses: Sequence[tuple[str, int, float]], synced: bool | None = None,
               skipped: Mapping[str, int] | None = None) -> list[Pulse]:
        """Number and store ``(channel, ts_ns, wh)`` pulses durably; return them as messages.

        ``synced`` is whether the clock that stamped them was synchronised (None: unknown).
        ``skipped`` counts, per channel, pulses that happened before these but
        whose timing is gone (the recorder's in-memory hold overflowed): the
        counter advances past them first, so the next ``seq`` carries them to
        the writer. Raises :class:`StoreError` for a storage fault; nothing is
        stored or numbered then.
        """
        if not pulses and not skipped:
            return []
        if skipped:
            for channel, count in skipped.items():
                self._seq[channel] = self._seq.get(channel, 0) + count
        epoch_ns, start = self.epoch_start.stated(synced=synced, wall_ns=time.time_ns(), mono_ns=time.monotonic_ns())
        numbered = []
        for channel, ts_ns, wh in pulses:
            self._seq[channel] = self._seq.get(channel, 0) + 1
            numbered.append(Pulse(self.meter, channel, self.epoch, self._seq[channel], ts_ns, wh, synced, epoch_ns))
        try:
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                if start != self.epoch_start:
                    self._conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                           [("epoch_ns", str(start.ns)), ("epoch_ns_checked", "1")])
                self._conn.executemany(
                    "INSERT INTO outbox (meter, channel, seq, ts_ns, wh, epoch, synced, epoch_ns) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(p.meter, p.channel, p.seq, p.ts_ns, p.wh, p.epoch, p.synced, p.epoch_ns) for p in numbered])
                last = {p.channel: p for p in numbered}
                self._conn.executemany(
                    "INSERT INTO counter VALUES (?, ?, ?, ?) ON CONFLICT (meter, channel) "
                    "DO UPDATE SET seq=excluded.seq, last_ts_ns=excluded.last_ts_ns",
                    [(self.meter, channel, p.seq, p.ts_ns) for channel, p in last.items()])
                if skipped:  # channels whose skipped pulses no pulse of this batch carries
                    self._conn.executemany(
                        "INSERT INTO counter VALUES (?, ?, ?, 0) "
                        "ON CONFLICT (meter, channel) DO UPDATE SET seq=excluded.seq",
                        [(self.meter, channel, self._seq[channel]) for channel in skipped if channel not in last])
                dropped = self._trim()
        except BaseException as exc:
            # Nothing was stored: take the numbers back so no seq is skipped or reused.
            for p in numbered:
                self._seq[p.channel] -= 1
            if skipped:
                for channel, count in skipped.items():
                    self._seq[channel] -= count
            if isinstance(exc, sqlite3.Error):
                self.health.raise_for(exc)
            raise
        self.epoch_start = start
        self._log_trim(dropped)
        if numbered:
            self.last_ts_ns = max(self.last_ts_ns, *(p.ts_ns for p in numbered))
        return numbered

    def _trim(self) -> int:
        newest = self._conn.execute("SELECT max(id) FROM outbox").fetchone()[0] or 0
        return self._conn.execute("DELETE FROM outbox WHERE id <= ?", (newest - self.max_rows,)).rowcount

    def _log_trim(self, dropped: int) -> None:
        if dropped and not self._dropping:
            log.warning("outbox is full (%d pulses): dropping the oldest timing detail; the counter stays "
                        "exact, so no energy is lost", self.max_rows)
        elif not dropped and self._dropping:
            log.info("outbox below its cap again")
        self._dropping = bool(dropped)

    def reader(self) -> OutboxReader:
        """A separate connection for the publisher thread, reporting damage to this outbox's :attr:`health`."""
        return OutboxReader(self.path, self.health)

    def close(self) -> None:
        """Close after a clean stop: the epoch continues at the next start (and only then)."""
        if self._closed:
            return
        self._closed = True
        if self.health.damaged:  # nothing to continue: the next start refuses the store
            self._conn.close()
            return
        token = secrets.token_hex(8)
        try:
            with self._conn:
                self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('clean_stop', ?)", (token,))
            _write_durably(self.clean_stop_path, token)
        except (OSError, sqlite3.Error) as exc:
            log.warning("could not mark the stop of epoch %s as clean (%s): the next start begins a new epoch",
                        self.epoch, exc)
        finally:
            self._conn.close()


def last_recorded_ns(path: Path) -> int:
    """The timestamp of the newest pulse ever recorded in the store at ``path`` (0 if none), read-only."""
    if not path.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            newest: int | None = conn.execute("SELECT max(last_ts_ns) FROM counter").fetchone()[0]
    except sqlite3.Error:  # no counter table yet, or damaged: the edge service will say which
        return 0
    return newest or 0


def _write_durably(path: Path, text: str) -> None:
    with path.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


P = ParamSpec("P")
R = TypeVar("R")


def _reporting_faults(method: Callable[Concatenate[OutboxReader, P], R]) -> Callable[Concatenate[OutboxReader, P], R]:
    """Turn a storage fault of a reader's query into :class:`StoreError`, noting damage in its ``health``."""
    @functools.wraps(method)
    def reporting(self: OutboxReader, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            self.health.raise_for(exc)
            raise
    return reporting


class OutboxReader:
    """The publisher's view of the outbox: read pending rows, delete confirmed ones, keep status.

    Every method raises :class:`StoreError` for a storage fault, after noting
    damage in ``health``.
    """

    def __init__(self, path: Path, health: StoreHealth | None = None) -> None:
        self.health = health or StoreHealth(path)
        self._conn = _connect(path, "NORMAL")
        try:
            self.epoch: str = self._conn.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0]
        except sqlite3.Error as exc:
            self._conn.close()
            raise _open_error(path, exc, existed=True) from None

    def pending(self, after_id: int, limit: int) -> list[tuple[int, Pulse]]:
        # Read once per publisher wake-up, so once per pulse at low rates: guarded inline, without the
        # decorator's extra call.
        try:
            rows = self._conn.execute(
                "SELECT id, meter, channel, seq, ts_ns, wh, epoch, synced, epoch_ns FROM outbox WHERE id > ? "
                "ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
        except sqlite3.Error as exc:
            self.health.raise_for(exc)
            raise
        return [(row_id, Pulse(meter, channel, epoch, seq, ts_ns, wh, None if synced is None else bool(synced),
                               epoch_ns))
                for row_id, meter, channel, seq, ts_ns, wh, epoch, synced, epoch_ns in rows]

    @_reporting_faults
    def confirm(self, row_ids: Iterable[int]) -> None:
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in row_ids])

    @_reporting_faults
    def depth(self) -> int:
        count: int = self._conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
        return count

    @_reporting_faults
    def set_status(self, /, **values: str) -> None:
        with self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(values.items()))

    @_reporting_faults
    def status(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT key, value FROM meta").fetchall())

    @_reporting_faults
    def counters(self) -> dict[tuple[str, str], int]:
        return {(m, c): s for m, c, s in self._conn.execute("SELECT meter, channel, seq FROM counter")}

    def close(self) -> None:
        self._conn.close()
