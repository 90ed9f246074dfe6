"""A simulated household week in the pulse database, for the documentation's report and chart.

Pulses of a week-long load profile (base load, a fridge, mornings and
evenings, cooking, washing and dishwashing on some days) go through the
db-writer's own batch handler as encoded messages (decode, ledger checks,
one transaction per batch), so the database holds what ``emdc db-writer``
would have stored. Two incidents make the report's flags visible:

* the edge is switched off on Wednesday 01:30-06:15: no pulses, no counts;
* its outbox overflows during a broker outage on Saturday 10:00-11:30: those
  pulses' messages are lost, but the counter keeps them (a ``seq`` jump).

Deterministic (fixed seed and epoch). Example::

    python -m tools.demo_week --state-dir demo --start 2026-11-16 --tz Europe/Berlin
    EMDC_STATE_DIR=demo emdc report --from 2026-11-16 --to 2026-11-23 --tz Europe/Berlin
"""

from __future__ import annotations

import argparse
import random
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from backend.batch import Delivery
from backend.database import SQLITE_FILE, PulseStore
from backend.db_writer import DbWriter
from common.message import Pulse, encode
from edge.simulator import LoadProfile

EPOCH = "de3005eed0000001"
HOUR = 3600.0


def week_profile(seed: int = 7) -> LoadProfile:
    """Seven days of household load, seconds from Monday 00:00 local time."""
    rng = random.Random(seed)
    events: list[tuple[float, float, float]] = []  # (time, delta W, delta var)

    def run(start: float, length: float, watts: float, var: float = 0.0) -> None:
        events.extend([(start, watts, var), (start + length, -watts, -var)])

    for day in range(7):
        t0, weekend = day * 24 * HOUR, day >= 5
        for start in range(0, 24 * 3600, 2400):  # fridge: about 12 minutes of every 40
            run(t0 + start + rng.uniform(0, 600), rng.uniform(600, 840), 110, 80)
        wake = (8.0 if weekend else 6.5) * HOUR + rng.uniform(-900, 900)
        run(t0 + wake, 1.5 * HOUR, 160, 10)  # lights, radio
        run(t0 + wake + rng.uniform(300, 900), 180, 2000)  # kettle
        run(t0 + wake + rng.uniform(900, 1800), 120, 1200)  # coffee
        if weekend:
            run(t0 + 10 * HOUR, 6 * HOUR, rng.uniform(250, 450), 60)  # people at home
            run(t0 + 12 * HOUR + rng.uniform(0, 1800), 2700, 2200, 20)  # oven at lunch
        evening = 17.5 * HOUR + rng.uniform(-1800, 1800)
        run(t0 + evening, 23 * HOUR - evening + rng.uniform(0, 1800), 180, 20)  # lights
        run(t0 + 19.5 * HOUR + rng.uniform(0, 1800), 2.5 * HOUR, 110, 15)  # television
        run(t0 + 18.5 * HOUR + rng.uniform(0, 1200), rng.uniform(1800, 2700), rng.uniform(1500, 2500), 30)
        if day in (0, 3, 5):  # washing machine: heating, then the motor
            start = t0 + (19 if day != 5 else 11) * HOUR
            run(start, 900, 2000, 40)
            run(start + 900, 3600, 300, 250)
        if day in (1, 3, 6):  # dishwasher
            start = t0 + 21 * HOUR + rng.uniform(0, 1800)
            run(start, 1200, 1800, 30)
            run(start + 1200, 5400, 150, 60)
    active, reactive, steps = 120.0, 40.0, [(0.0, 120.0, 40.0)]
    for t, dw, dvar in sorted(events):
        active, reactive = active + dw, reactive + dvar
        steps.append((t, round(active, 3), round(reactive, 3)))
    return LoadProfile(tuple(steps))


def week_pulses(start: datetime, *, meter: str = "main", wh: float = 1.0, seed: int = 7) -> list[Pulse]:
    """The messages the edge would have delivered, incidents included, ordered by time."""
    profile = week_profile(seed)
    offline = (2 * 24 + 1.5) * HOUR, (2 * 24 + 6.25) * HOUR  # Wednesday 01:30-06:15
    lost = (5 * 24 + 10) * HOUR, (5 * 24 + 11.5) * HOUR  # Saturday 10:00-11:30
    base_ns = round(start.timestamp()) * 1_000_000_000
    out = []
    for channel in ("active", "reactive"):
        seq = 0
        for t in profile.pulse_times(channel, wh):
            if t >= 7 * 24 * HOUR:
                break
            if offline[0] <= t < offline[1]:
                continue  # switched off: the edge never saw these
            seq += 1
            if lost[0] <= t < lost[1]:
                continue  # counted, but the outbox dropped the message
            out.append(Pulse(meter, channel, EPOCH, seq, base_ns + round(t * 1e9), wh))
    return sorted(out, key=lambda p: p.ts_ns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=Path("demo"), help="SQLite database directory")
    parser.add_argument("--db-url", help="database URL instead (e.g. mysql+pymysql://...)")
    parser.add_argument("--start", default="2026-11-16", help="Monday the week begins (local midnight)")
    parser.add_argument("--tz", default="Europe/Berlin")
    args = parser.parse_args()
    start = datetime.fromisoformat(args.start).replace(tzinfo=ZoneInfo(args.tz))
    url = args.db_url or f"sqlite:///{(args.state_dir / SQLITE_FILE).resolve()}"
    store = PulseStore.open(url)
    writer = DbWriter(store, max_power_w=100_000)
    pulses = week_pulses(start)
    dead = 0
    for i in range(0, len(pulses), 500):
        batch = pulses[i:i + 500]
        dead += len(writer.handle_batch([Delivery(n, p.routing_key, encode(p)) for n, p in enumerate(batch, 1)]))
    store.close()
    end = start + timedelta(days=7)
    print(f"stored {len(pulses)} pulses ({dead} refused) of {start:%a %Y-%m-%d} to {end:%a %Y-%m-%d} "
          f"({args.tz}) in {store.describe()}")


if __name__ == "__main__":
    main()
