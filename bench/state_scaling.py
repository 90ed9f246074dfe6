"""The writer's cost per batch against the number of meters in its state: it must follow the batch, not the fleet.

In-process, on the real :class:`~backend.writer.EnergyWriter` and its SQLite
state store on this disk (fsync included), with discovery on and an in-memory
sink: for a state of 1, 1,000, 10,000 (and 100,000) meters, the median time
of a one-pulse batch of one meter, and the rate at which a backlog of that
meter's pulses drains in batches of ``batch_size``. Reported as ratios to the
one-meter state, so the figures compare across machines.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from backend.batch import Delivery
from backend.ledger import NS_PER_S, Ledger
from backend.memory_transport import MemorySink
from backend.state_store import StateStore
from backend.writer import EnergyWriter
from common.config import load_config
from common.message import Pulse, encode

T0_NS = 1_800_000_000 * NS_PER_S
METER = "main"
BATCH = 500  # the writer's default batch_size


class _Clock:
    """The writer's clock, kept just after the latest pulse, so that every pulse is timely and plausible."""

    def __init__(self) -> None:
        self.now = T0_NS

    def __call__(self) -> int:
        return self.now


def _state_of(meters: int) -> dict[str, Any]:
    """The saved form of a ledger with ``meters`` meters, each having counted one pulse (``main`` among them)."""
    ledger = Ledger(100_000, fixed_wh=True)
    ledger.admit(METER, T0_NS - 3600 * NS_PER_S)
    ledger.apply(Pulse(METER, "active", "e1", 1, T0_NS, 1.0), T0_NS)
    doc = ledger.to_json()
    channel = doc["meters"][METER]["active"]
    for i in range(1, meters):
        name = f"m{i:06d}"
        doc["meters"][name] = {"active": channel}
        doc["admitted"][name] = T0_NS - 3600 * NS_PER_S
    return doc


def _writer(directory: Path, meters: int, batch_size: int) -> tuple[EnergyWriter, _Clock]:
    seeded = StateStore(directory)
    seeded.replace(_state_of(meters))
    seeded.close()  # every size starts with an empty write-ahead log, as after a restart
    clock = _Clock()
    config = load_config(env={"EMDC_STATE_DIR": str(directory), "EMDC_METERS": METER,
                              "EMDC_BATCH_SIZE": str(batch_size)})
    writer = EnergyWriter.open(config, sink=MemorySink(), clock=clock)
    writer.publish_all()
    return writer, clock


def _batch(seqs: range, clock: _Clock) -> list[Delivery]:
    """Consecutive pulses of ``main``, one second apart, 1 Wh each (3.6 kW); the clock follows the last."""
    pulses = [Pulse(METER, "active", "e1", seq, T0_NS + seq * NS_PER_S, 1.0) for seq in seqs]
    clock.now = pulses[-1].ts_ns + NS_PER_S // 10
    return [Delivery(i, p.routing_key, encode(p)) for i, p in enumerate(pulses, 1)]


def measure_state_size(work: Path, meters: int, batches: int, drain: int) -> dict[str, Any]:
    """One state size: the median one-pulse batch (ms) and the drain rate of ``drain`` pulses (per s)."""
    writer, clock = _writer(work / f"state_scaling_{meters}", meters, batch_size=BATCH)
    seq = 1
    times = []
    for _ in range(batches):
        seq += 1
        batch = _batch(range(seq, seq + 1), clock)
        start = time.perf_counter()
        if writer.handle_batch(batch):
            raise RuntimeError(f"state scaling: a pulse was held back with {meters} meters")
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    for first in range(seq + 1, seq + 1 + drain, BATCH):
        writer.handle_batch(_batch(range(first, min(first + BATCH, seq + 1 + drain)), clock))
    elapsed = time.perf_counter() - start
    expected = (seq + drain) * 1_000_000
    if writer.ledger.channel(METER, "active").total_uwh != expected:
        raise RuntimeError(f"state scaling: inexact total with {meters} meters")
    writer.store.close()
    return {"meters": meters, "batch_ms": round(statistics.median(times) * 1000, 3),
            "drain_per_s": round(drain / elapsed)}


def measure_state_scaling(work: Path, sizes: tuple[int, ...], batches: int, drain: int) -> dict[str, Any]:
    """Every state size, with each one's per-batch cost and drain rate as a ratio to the smallest state's."""
    measure_state_size(work / "warm-up", sizes[0], batches, drain)  # imports and caches warm, not timed
    runs = [measure_state_size(work, meters, batches, drain) for meters in sizes]
    base = runs[0]
    for run in runs:
        run["batch_ratio"] = round(run["batch_ms"] / base["batch_ms"], 2)
        run["drain_ratio"] = round(run["drain_per_s"] / base["drain_per_s"], 2)
    return {"batches": batches, "drain_pulses": drain, "sizes": runs}
