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

A counter epoch continues only across a *clean* stop, proven by a token that
:meth:`Outbox.close` writes both into the database and into a file beside it.
Any other start (a power cut, kill -9, a lost ``-wal`` file, a restored
backup, a deleted or recreated store) begins a new epoch with counters at
zero, so no genuine new pulse can reuse a ``seq`` the writer has already
counted. Each outbox row carries its own epoch, so rows of the previous
epoch still go out correctly after the change.

Example::

    outbox = Outbox(Path("state/edge.sqlite3"), meter="main", max_rows=1_000_000)
    [pulse] = outbox.record([("active", 1_764_000_000_000_000_000, 1.0)], synced=True)
    queue = outbox.reader()          # in the publisher thread
    rows = queue.pending(after_id=0, limit=100)
    queue.confirm([row_id for row_id, _ in rows])
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

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
                                   wh REAL NOT NULL, epoch TEXT, synced INTEGER);
"""
# Columns added since the first version; rows stored before have the epoch of that time.
_ADDED_COLUMNS = {"epoch": "TEXT", "synced": "INTEGER"}


class OutboxError(RuntimeError):
    """The counter store cannot be opened; the edge must not start counting from zero."""


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
    except sqlite3.DatabaseError as exc:
        raise OutboxError(f"{path} is not a usable SQLite database ({exc}); it holds the pulse counter, "
                          "so restore it from a backup rather than deleting it") from None
    return conn


class Outbox:
    """Counter and outbox owner; :meth:`record` must be called from one thread only."""

    def __init__(self, path: Path, meter: str, max_rows: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.meter = meter
        self.max_rows = max_rows
        self.clean_stop_path = path.with_name(path.name + CLEAN_STOP_SUFFIX)
        self._conn = _connect(path, "FULL")
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self.epoch, self.started_epoch_because = self._open_epoch()
        # Neither the main file nor the token file may prove a clean stop from now on, even if the -wal
        # is lost later: a restart after this session's end must begin a new epoch unless it is clean too.
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.clean_stop_path.unlink(missing_ok=True)
        self._seq = dict(self._conn.execute("SELECT channel, seq FROM counter WHERE meter=?", (meter,)).fetchall())
        self.last_ts_ns: int = self._conn.execute("SELECT coalesce(max(last_ts_ns), 0) FROM counter").fetchone()[0]
        self._dropping = False
        self._closed = False

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

    def record(self, pulses: Sequence[tuple[str, int, float]], synced: bool | None = None) -> list[Pulse]:
        """Number and store ``(channel, ts_ns, wh)`` pulses durably; return them as messages.

        ``synced`` is whether the clock that stamped them was synchronised (None: unknown).
        """
        if not pulses:
            return []
        numbered = []
        for channel, ts_ns, wh in pulses:
            self._seq[channel] = self._seq.get(channel, 0) + 1
            numbered.append(Pulse(self.meter, channel, self.epoch, self._seq[channel], ts_ns, wh, synced))
        try:
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany(
                    "INSERT INTO outbox (meter, channel, seq, ts_ns, wh, epoch, synced) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(p.meter, p.channel, p.seq, p.ts_ns, p.wh, p.epoch, p.synced) for p in numbered])
                last = {p.channel: p for p in numbered}
                self._conn.executemany(
                    "INSERT INTO counter VALUES (?, ?, ?, ?) ON CONFLICT (meter, channel) "
                    "DO UPDATE SET seq=excluded.seq, last_ts_ns=excluded.last_ts_ns",
                    [(self.meter, channel, p.seq, p.ts_ns) for channel, p in last.items()])
                dropped = self._trim()
        except BaseException:
            # Nothing was stored: take the numbers back so no seq is skipped or reused.
            for p in numbered:
                self._seq[p.channel] -= 1
            raise
        self._log_trim(dropped)
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
        """A separate connection for the publisher thread."""
        return OutboxReader(self.path)

    def close(self) -> None:
        """Close after a clean stop: the epoch continues at the next start (and only then)."""
        if self._closed:
            return
        self._closed = True
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


def _write_durably(path: Path, text: str) -> None:
    with path.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


class OutboxReader:
    """The publisher's view of the outbox: read pending rows, delete confirmed ones, keep status."""

    def __init__(self, path: Path) -> None:
        self._conn = _connect(path, "NORMAL")
        self.epoch: str = self._conn.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0]

    def pending(self, after_id: int, limit: int) -> list[tuple[int, Pulse]]:
        rows = self._conn.execute(
            "SELECT id, meter, channel, seq, ts_ns, wh, epoch, synced FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit)).fetchall()
        return [(row_id, Pulse(meter, channel, epoch, seq, ts_ns, wh, None if synced is None else bool(synced)))
                for row_id, meter, channel, seq, ts_ns, wh, epoch, synced in rows]

    def confirm(self, row_ids: Iterable[int]) -> None:
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in row_ids])

    def depth(self) -> int:
        count: int = self._conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
        return count

    def set_status(self, **values: str) -> None:
        with self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(values.items()))

    def status(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT key, value FROM meta").fetchall())

    def counters(self) -> dict[tuple[str, str], int]:
        return {(m, c): s for m, c, s in self._conn.execute("SELECT meter, channel, seq FROM counter")}

    def close(self) -> None:
        self._conn.close()
