"""A million pulses edge -> broker -> writer: memory and state must stay flat (``--million``)."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import psutil

from backend.state_store import StateStore
from bench.harness import UWH_PER_WH, Broker, Scratch, pulses_in, vm_kb
from edge.outbox import FILENAME as OUTBOX_FILENAME


def measure_million(work: Path, broker: Broker, count: int) -> dict[str, Any]:
    """Edge -> broker -> writer on ``count`` pulses, sampling RSS and state-file sizes once a second."""
    with Scratch(work, "million") as scratch:
        scratch.declare()
        with scratch.energy_subscriber(count) as subscriber:
            writer = scratch.start_writer(broker)
            edge = scratch.spawn(["edge", "simulate", "--power", "3600", "--count", str(count), "--speed", "max"],
                                 scratch.edge_env(), "edge")
            started = time.perf_counter()
            state = scratch.names.writer_dir / StateStore.FILENAME
            outbox = scratch.names.edge_dir / OUTBOX_FILENAME
            samples: list[dict[str, Any]] = []
            while not subscriber.arrived(0):
                if not writer.alive():
                    raise RuntimeError(f"the writer died:\n{writer.log()}")
                latest = subscriber.latest(scratch.energy_topic)
                sample = {"t_s": round(time.perf_counter() - started, 1),
                          "counted": pulses_in(latest) if latest else 0,
                          "writer_rss_mb": round(vm_kb(writer.pid, "VmRSS") / 1024, 1),
                          "state_bytes": database_bytes(state)}
                if edge.alive():
                    with contextlib.suppress(FileNotFoundError, ProcessLookupError, psutil.Error):
                        sample["edge_rss_mb"] = round(vm_kb(edge.pid, "VmRSS") / 1024, 1)
                        sample["outbox_bytes"] = sum(p.stat().st_size for p in outbox.parent.glob(outbox.name + "*"))
                samples.append(sample)
                if time.perf_counter() - started > 120 + count / 200:
                    raise TimeoutError(f"million: only {sample['counted']} pulses counted")
                subscriber.arrived(1.0)
            elapsed = subscriber.wait(0) - started
            edge_code = edge.wait(60)
            exact = scratch.saved_total_uwh() == count * UWH_PER_WH
            writer_code = writer.stop()
    return {"pulses": count, "seconds": round(elapsed, 1), "rate_per_s": round(count / elapsed),
            "exact_total": exact, "exit_codes": {"edge": edge_code, "writer": writer_code},
            "writer": flatness(samples, "writer_rss_mb", count), "edge": flatness(samples, "edge_rss_mb", count),
            "state_bytes": {"min": min((s["state_bytes"] for s in samples if s["state_bytes"]), default=0),
                            "max": max(s["state_bytes"] for s in samples)},
            "outbox_bytes_max": max((s.get("outbox_bytes", 0) for s in samples), default=0),
            "samples": samples}


def database_bytes(path: Path) -> int:
    """The size of the database at ``path`` as SQLite sees it (its pages, wherever they are: the file or the
    write-ahead log, which SQLite reuses and folds in as it goes); 0 before it exists."""
    if not path.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as conn:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            size = conn.execute("PRAGMA page_size").fetchone()[0]
    except sqlite3.Error:  # created a moment ago, not a database yet
        return 0
    return int(pages * size)


def flatness(samples: list[dict[str, Any]], key: str, count: int) -> dict[str, Any]:
    """Peak RSS over the whole run, and growth from 10 % of the pulses counted to the end (MB per 100,000)."""
    every = [s[key] for s in samples if key in s]
    points = [(s["counted"], s[key]) for s in samples if key in s and s["counted"] >= count // 10]
    if not every:
        return {"samples": 0}
    out: dict[str, Any] = {"rss_mb_first": every[0], "rss_mb_max": max(every), "samples": len(every)}
    if len(points) >= 2:
        (n0, first), (n1, last) = points[0], points[-1]
        out.update(rss_mb_at_10pct=first, rss_mb_last=last,
                   growth_mb_per_100k=round((last - first) / max(n1 - n0, 1) * 100_000, 3))
    return out
