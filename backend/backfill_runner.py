"""The writer's companion thread that corrects Home Assistant's hourly statistics after a backlog.

The writer's hot path only records, after a batch is saved, the energy of
late pulses into a small SQLite file in its state directory
(:class:`CorrectionStore`); Home Assistant is never waited on there. This
thread takes the pending moves of each channel, reads what Home Assistant has
(:class:`~backend.ha_client.HomeAssistantClient`), lets
:class:`~backend.backfill.CorrectionPlanner` decide the rows, saves that plan
and the moves it accounts for in one transaction, imports it, and forgets it
once Home Assistant reads back exactly those rows. A plan is absolute, so
applying it again after a crash or a restart changes nothing. While Home
Assistant is out of reach the moves wait in the file, and it tries again
with a growing delay. Example::

    store = CorrectionStore(Path("state/ha_backfill.sqlite3"))
    store.add([Move("main", "active", from_s=36_000, to_s=43_200, uwh=1_000_000)])
    Backfill(store, "http://homeassistant.local:8123", token).run(stop)
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from backend.backfill import HOUR_S, Booked, CorrectionPlanner, Move, Row, late_move
from backend.discovery import Discovery
from backend.ha_client import HomeAssistantClient, HomeAssistantRefused, HomeAssistantUnreachable
from common.backoff import Backoff

log = logging.getLogger("emdc.backfill")
FILE_NAME = "ha_backfill.sqlite3"
# How often pending corrections are looked at: Home Assistant compiles statistics every 5 minutes.
PASS_S = 10.0
# Micro-watt-hours (or micro-var-hours) per unit of a statistic; other units are not corrected.
UWH_PER_UNIT = {"Wh": 10**6, "kWh": 10**9, "MWh": 10**12, "varh": 10**6, "kvarh": 10**9}
# The longest pause between passes while corrections wait for Home Assistant's next compilation.
WAITING_S = 30.0
# How far back a correction looks for the row before its first hour.
LOOKBACK_S = 31 * 24 * HOUR_S


class CorrectionStore:
    """Pending moves and the plan being applied, per channel, in SQLite (WAL: a record costs no fsync).

    >>> import tempfile
    >>> store = CorrectionStore(Path(tempfile.mkdtemp()) / FILE_NAME)
    >>> store.add([Move("main", "active", 0, 3600, 5), Move("main", "active", 0, 3600, 2)])
    >>> store.moves("main", "active")
    {(0, 3600): 7}
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS moves (meter TEXT, channel TEXT, from_s INTEGER, "
                         "to_s INTEGER, uwh INTEGER, PRIMARY KEY (meter, channel, from_s, to_s))")
        self._db.execute("CREATE TABLE IF NOT EXISTS plans (meter TEXT, channel TEXT, statistic_id TEXT, "
                         "rows TEXT, PRIMARY KEY (meter, channel))")

    def close(self) -> None:
        self._db.close()

    def add(self, moves: Iterable[Move]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO moves VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET uwh = uwh + excluded.uwh",
                [(m.meter, m.channel, m.from_s, m.to_s, m.uwh) for m in moves])
            self._db.execute("COMMIT")

    def channels(self) -> list[tuple[str, str]]:
        """The channels with pending moves or a plan."""
        with self._lock:
            found = self._db.execute("SELECT meter, channel FROM moves UNION SELECT meter, channel FROM plans "
                                     "ORDER BY 1, 2").fetchall()
        return [(str(meter), str(channel)) for meter, channel in found]

    def moves(self, meter: str, channel: str) -> dict[tuple[int, int], int]:
        with self._lock:
            found = self._db.execute("SELECT from_s, to_s, uwh FROM moves WHERE meter = ? AND channel = ?",
                                     (meter, channel)).fetchall()
        return {(int(f), int(t)): int(uwh) for f, t, uwh in found}

    def plan(self, meter: str, channel: str) -> tuple[str, list[Row]] | None:
        """The plan being applied to ``meter``/``channel``: its statistic and rows."""
        with self._lock:
            found = self._db.execute("SELECT statistic_id, rows FROM plans WHERE meter = ? AND channel = ?",
                                     (meter, channel)).fetchone()
        if found is None:
            return None
        return str(found[0]), [Row(*row) for row in json.loads(found[1])]

    def save_plan(self, meter: str, channel: str, statistic_id: str, rows: Sequence[Row],
                  taken: dict[tuple[int, int], int]) -> None:
        """Keep ``rows`` to apply and take the moves they account for off the pending ones, at once."""
        doc = json.dumps([[r.start_s, r.sum, r.state, r.last_reset_s] for r in rows])
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO plans VALUES (?, ?, ?, ?)", (meter, channel, statistic_id, doc))
            for (from_s, to_s), uwh in taken.items():
                self._db.execute("UPDATE moves SET uwh = uwh - ? WHERE meter = ? AND channel = ? AND from_s = ? "
                                 "AND to_s = ?", (uwh, meter, channel, from_s, to_s))
            self._db.execute("DELETE FROM moves WHERE uwh <= 0")
            self._db.execute("COMMIT")

    def finish_plan(self, meter: str, channel: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM plans WHERE meter = ? AND channel = ?", (meter, channel))


def energy_unique_id(meter: str, channel: str) -> str:
    """The unique id of a channel's energy sensor, as discovery announces it."""
    return f"{Discovery.device_id(meter)}_{channel}_energy"


class Backfill:
    """The loop that applies the pending corrections to Home Assistant; :meth:`record` is the writer's hook.

    It runs in a thread of its own, so the writer never waits on Home
    Assistant. Example::

        backfill = Backfill(CorrectionStore(path), "http://homeassistant.local:8123", token)
        writer.on_saved = backfill.record
        threading.Thread(target=backfill.run, args=(stop,), daemon=True).start()
    """

    def __init__(self, store: CorrectionStore, url: str, token: str, pass_s: float = PASS_S) -> None:
        self.store = store
        self.url = url
        self._token = token
        self.pass_s = pass_s
        self._wake = threading.Event()
        self._trouble = ""  # why the last pass failed (logged once)
        self._reported: set[str] = set()  # lines about a channel logged once

    def record(self, booked: Sequence[Booked]) -> None:
        """Keep the moves of a saved batch's late pulses (the writer's thread: a local write, nothing more)."""
        moves = [move for b in booked if (move := late_move(b)) is not None]
        if not moves:
            return
        try:
            self.store.add(moves)
        except sqlite3.Error as exc:  # the batch is saved and counted: only its correction is lost
            log.error("cannot keep the hours of %d late pulse message(s) in %s (%s): Home Assistant keeps them in "
                      "the hour they arrived", len(moves), self.store.path, exc)
            return
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Apply corrections until ``stop`` is set."""
        backoff = Backoff(initial_s=self.pass_s, max_s=300)
        waiting = Backoff(initial_s=self.pass_s, max_s=WAITING_S, jitter=0)  # what Home Assistant cannot take yet
        while not stop.is_set():
            delay = self.pass_s
            try:
                if self.store.channels() and not self.apply_pending():
                    delay = waiting.next_delay()
                else:
                    waiting.reset()
                if self._trouble:
                    log.info("Home Assistant at %s: correcting its statistics again", self.url)
                    self._trouble = ""
                backoff.reset()
            except HomeAssistantUnreachable as exc:
                if str(exc) != self._trouble:
                    log.warning("Home Assistant at %s is out of reach (%s): the hourly statistics of late pulses "
                                "are corrected once it is back; they wait in %s", self.url, exc, self.store.path)
                self._trouble = str(exc)
                delay = backoff.next_delay()
            except Exception as exc:  # an answer it did not expect, the file: try again later, never end
                if str(exc) != self._trouble:
                    log.exception("correcting Home Assistant's statistics failed; the corrections wait in %s",
                                  self.store.path)
                self._trouble = str(exc)
                delay = backoff.next_delay()
            if self._wake.wait(delay):
                waiting.reset()  # new late energy
            self._wake.clear()

    def wake(self) -> None:
        """End the current wait (a new record, or ``stop`` set)."""
        self._wake.set()

    def apply_pending(self) -> bool:
        """One pass over every channel with work; True if any moved on. Raises HomeAssistantUnreachable."""
        progress = False
        with HomeAssistantClient(self.url, self._token) as ha:
            for meter, channel in self.store.channels():
                try:
                    progress = self._apply(ha, meter, channel) or progress
                except HomeAssistantRefused as exc:
                    log.error("%s/%s: Home Assistant refused a statistics correction (%s); it stays pending in %s",
                              meter, channel, exc, self.store.path)
        return progress

    def _apply(self, ha: HomeAssistantClient, meter: str, channel: str) -> bool:
        """Apply, check or plan the correction of one channel; True if it moved on."""
        saved = self.store.plan(meter, channel)
        if saved is not None:
            statistic_id, rows = saved
            since = min(row.start_s for row in rows)
            have = {row.start_s: row.sum for row in ha.rows(statistic_id, since)}
            if all(abs(have.get(row.start_s, float("nan")) - row.sum) <= 1e-9 * max(1.0, abs(row.sum))
                   for row in rows):
                self.store.finish_plan(meter, channel)
                log.info("%s/%s: Home Assistant's hourly statistics of %s corrected (%d hour(s) from %s)", meter,
                         channel, statistic_id, len(rows), _hour(since))
                return True
            metadata = ha.metadata(statistic_id)
            if metadata is not None:
                ha.import_rows(metadata, rows)  # the same rows again: Home Assistant reads them back next pass
            return False
        moves = self.store.moves(meter, channel)
        unique_id = energy_unique_id(meter, channel)
        entity = ha.statistic_id(unique_id)
        if entity is None:
            self._once(f"{meter}/{channel}: Home Assistant has no MQTT entity with the unique id {unique_id} (yet: "
                       f"discovery off, or the device removed?); its corrections wait in {self.store.path}")
            return False
        metadata = ha.metadata(entity)
        if metadata is None:
            return False  # Home Assistant has compiled nothing of the sensor yet
        factor = UWH_PER_UNIT.get(str(metadata["unit_of_measurement"]))
        if factor is None:
            self._once(f"{meter}/{channel}: {entity} keeps its statistics in {metadata['unit_of_measurement']}, "
                       f"which EMDC does not correct; {self.store.path} holds the moves")
            return False
        hours, recent = ha.view(entity, min(from_s for from_s, _ in moves) - LOOKBACK_S)
        plan = CorrectionPlanner(factor).plan(hours, recent, moves)
        if not plan.rows:
            return False  # Home Assistant does not show the late energy yet (not compiled, or received later)
        self.store.save_plan(meter, channel, entity, plan.rows, dict(plan.taken))
        log.info("%s/%s: moving %s Wh of late pulses in %s to the hours they happened in (%d hour(s) from %s)",
                 meter, channel, f"{sum(plan.taken.values()) / 10**6:g}", entity, len(plan.rows),
                 _hour(plan.rows[0].start_s))
        ha.import_rows(metadata, plan.rows)
        return True

    def _once(self, line: str) -> None:
        if line not in self._reported:
            self._reported.add(line)
            log.warning("%s", line)


def _hour(start_s: int) -> str:
    return datetime.fromtimestamp(start_s, UTC).strftime("%Y-%m-%d %H:00 UTC")
