"""Late pulses' energy in the hours it was used, in a real Home Assistant Core: what its Energy dashboard reads.

One Home Assistant for the module (tests/ha_core.py). Meters, each with
a writer of its own, get a backlog stamped over the previous three hours
and one pulse now; both are counted now. Home Assistant books it all in the
current hour; once its recorder has compiled the jump (every 5 minutes), the
writer that reaches Home Assistant moves the energy back, and is killed
right after planning and restarted; the other writer has a wrong ha_url
port during the backlog and the right one after a restart. A third meter's
sensor has hourly rows (of nothing) through the outage, as a sensor Home
Assistant knew before. Every meter's past hours then hold their energy, the
current hour only its own pulse, the hours before the outage what they held,
and a redelivered backlog and another restart change nothing.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backend.amounts import format_kwh
from backend.backfill_runner import FILE_NAME
from common.message import Pulse
from tests.ha_core import HomeAssistant, missing_tools, running
from tests.support import (
    MQTT_HOST,
    MQTT_PORT,
    EmdcProcess,
    Names,
    free_port,
    publish,
    queue_depth,
    run_emdc,
    start_writer,
    wait_until,
    writer_env,
)

pytestmark = [pytest.mark.brokers, pytest.mark.ha_core]

HOUR = 3600
S = 1_000_000_000
# Pulses of 1 Wh in each of the three hours before the current one, oldest first; then one now.
BACKLOG = (2, 3, 4)


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory, brokers: None) -> Iterator[HomeAssistant]:
    if os.geteuid() != 0 or missing_tools():
        pytest.fail("Home Assistant runs in a chroot: needs root and debootstrap (see .ci/run)")
    with running(tmp_path_factory.mktemp("home-assistant"), MQTT_HOST, MQTT_PORT) as instance:
        yield instance


class LateMeter:
    """One meter whose Pi was away for three hours: its writer, its backlog, its statistics in Home Assistant."""

    def __init__(self, ha: HomeAssistant, directory: Path, spawn: Callable[..., EmdcProcess]) -> None:
        self.ha = ha
        self.names = Names(directory)
        self.spawn = spawn
        self.id = f"t{self.names.queue.removeprefix('test_')}"
        self.token_file = directory / "ha.token"
        directory.mkdir(parents=True, exist_ok=True)
        assert ha.token is not None
        self.token_file.write_text(ha.token + "\n")
        self.writers: list[EmdcProcess] = []
        self.pulses: list[Pulse] = []

    def start_writer(self, ha_url: str) -> EmdcProcess:
        env = writer_env(self.names, EMDC_DISCOVERY="device", EMDC_DISCOVERY_PREFIX="homeassistant",
                         EMDC_METER_ID=self.id, EMDC_HA_BIRTH_DELAY_S="0.2", EMDC_HA_URL=ha_url,
                         EMDC_HA_TOKEN_FILE=self.token_file)
        writer = start_writer(self.spawn, self.names, env)
        self.writers.append(writer)
        return writer

    def backlog(self, hour: int) -> None:
        """The pulses of :data:`BACKLOG` in the hours before ``hour``, and one pulse now; published at once."""
        stamps = [(hour - (len(BACKLOG) - i) * HOUR + 600 + n * 60) * S
                  for i, count in enumerate(BACKLOG) for n in range(count)]
        stamps.append(time.time_ns() - S)
        self.pulses = [Pulse(self.id, "active", "ab", seq, ts, 1.0) for seq, ts in enumerate(stamps, 1)]
        publish(self.names.exchange, self.pulses)

    def history(self, hours: range) -> None:
        """Hourly statistics rows of 0 kWh for ``hours`` (starts): as if Home Assistant had known the sensor
        since then, through the outage."""
        entity = self.entity_id()
        self.ha.ws("recorder/import_statistics", metadata={
            "has_sum": True, "mean_type": 0, "name": None, "source": "recorder", "statistic_id": entity,
            "unit_class": "energy", "unit_of_measurement": "kWh"},
            stats=[{"start": _iso(start), "state": 0.0, "sum": 0.0} for start in hours])

    def entity_id(self) -> str | None:
        return next((e["entity_id"] for e in self.ha.ws("config/entity_registry/list")
                     if e["platform"] == "mqtt" and e["unique_id"] == f"emdc_{self.id}_active_energy"), None)

    def state(self) -> str:
        entity = self.entity_id()
        return "" if entity is None else str(self.ha.rest("GET", f"/api/states/{entity}")["state"])

    def hours(self, since: int, until: int) -> dict[int, float]:
        """The energy (kWh) of each hour from ``since`` to ``until``, as the Energy dashboard reads it: the change
        of the compiled hourly rows, and for the hour not compiled yet, of its 5-minute rows so far."""
        entity = self.entity_id()
        found = self.ha.ws("recorder/statistics_during_period", start_time=_iso(since), statistic_ids=[entity],
                           period="hour", types=["change", "sum"]).get(entity, [])
        changes = {round(row["start"] / 1000): row["change"] for row in found}
        last_sum = found[-1]["sum"] if found else 0.0
        after = max(changes, default=since - HOUR) + HOUR
        short = self.ha.ws("recorder/statistics_during_period", start_time=_iso(after), statistic_ids=[entity],
                           period="5minute", types=["sum"]).get(entity, [])
        for row in short:
            changes[round(row["start"] / 1000) // HOUR * HOUR] = row["sum"] - last_sum
        return {start: change for start, change in changes.items() if start <= until}

    def pending(self) -> tuple[int, int]:
        """Moves and plans the writer still keeps for Home Assistant."""
        with sqlite3.connect(self.names.writer_dir / FILE_NAME) as db:
            return (db.execute("SELECT COUNT(*) FROM moves").fetchone()[0],
                    db.execute("SELECT COUNT(*) FROM plans").fetchone()[0])

    def remove(self) -> None:
        for writer in self.writers:
            if writer.proc.poll() is None:
                writer.stop()
        run_emdc(["ha", "remove"], writer_env(self.names, EMDC_DISCOVERY="device", EMDC_METER_ID=self.id,
                                              EMDC_DISCOVERY_PREFIX="homeassistant"))
        self.names.remove()


def _iso(start_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(start_s))


def expected(hour: int) -> dict[int, Any]:
    """Each past hour its pulses, the current one its single pulse (kWh)."""
    past = {hour - (len(BACKLOG) - i) * HOUR: pytest.approx(count / 1000, abs=1e-9)
            for i, count in enumerate(BACKLOG)}
    return {**past, hour: pytest.approx(0.001, abs=1e-9)}


@pytest.fixture
def meters(ha: HomeAssistant, tmp_path: Path, spawn: Callable[..., EmdcProcess]) -> Iterator[list[LateMeter]]:
    made = [LateMeter(ha, tmp_path / name, spawn) for name in ("reachable", "unreachable", "known")]
    yield made
    for meter in made:
        meter.remove()


def test_a_backlog_lands_in_the_hours_its_pulses_happened_in(ha: HomeAssistant, meters: list[LateMeter]) -> None:
    reachable, unreachable, known = meters
    wrong_url = f"http://127.0.0.1:{free_port()}"
    writer = reachable.start_writer(ha.url)
    away = unreachable.start_writer(wrong_url)
    known.start_writer(ha.url)
    for meter in meters:
        wait_until(meter.entity_id, 30, f"Home Assistant to have the energy sensor of meter {meter.id}")
    hour = time.time_ns() // S // HOUR * HOUR
    known.history(range(hour - 5 * HOUR, hour, HOUR))
    for meter in meters:
        meter.backlog(hour)
    total = format_kwh((sum(BACKLOG) + 1) * 1_000_000)
    for meter in meters:
        wait_until(lambda m=meter: m.state() == total, 30, f"Home Assistant to show meter {meter.id}'s backlog")
    wait_until(lambda: "is out of reach" in away.log(), 60, "the writer to find Home Assistant out of reach")
    assert away.stop() == 0
    assert unreachable.pending() == (len(BACKLOG), 0), "the late energy kept for later, by hour"

    # Home Assistant compiles the jump at the next 5-minute mark; the writer plans, and dies before it is done.
    wait_until(lambda: "to the hours they happened in" in writer.log(), 7 * 60, "a correction planned", interval=0.2)
    writer.kill9()
    writer = reachable.start_writer(ha.url)
    away = unreachable.start_writer(ha.url)
    for meter, process in ((reachable, writer), (unreachable, away), (known, known.writers[0])):
        wait_until(lambda p=process: "statistics of" in p.log() and "corrected" in p.log(), 60,
                   f"the statistics of meter {meter.id} corrected")
        assert meter.pending() == (0, 0)
        assert meter.hours(hour - 3 * HOUR, until=hour) == expected(hour), meter.id
    # No row before the outage for new sensors; the hours before it stay as they were for the other.
    for meter in (reachable, unreachable):
        assert meter.hours(hour - 6 * HOUR, until=hour - 4 * HOUR) == {}
    assert known.hours(hour - 6 * HOUR, until=hour - 4 * HOUR) == {hour - 5 * HOUR: 0, hour - 4 * HOUR: 0}

    # The backlog again (duplicates) and a restart: nothing moves any more.
    before = reachable.hours(hour - 3 * HOUR, until=hour)
    publish(reachable.names.exchange, reachable.pulses)
    wait_until(lambda: queue_depth(reachable.names.queue) == 0, 30, "the duplicates consumed")
    assert writer.stop() == 0
    writer = reachable.start_writer(ha.url)
    wait_until(lambda: "correcting Home Assistant's hourly statistics" in writer.log(), 30, "the writer running")
    assert reachable.pending() == (0, 0)
    assert reachable.hours(hour - 3 * HOUR, until=hour) == before
    assert "to the hours they happened in" not in writer.log()
