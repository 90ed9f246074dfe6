"""``emdc edge status``: what the edge has counted and what is still waiting to be sent."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from common.inputs import Input
from edge.clock_sync import describe_sync, kernel_clock_synced
from edge.outbox import FILENAME, OutboxReader


def _when(ns: str | None) -> str:
    if not ns:
        return "never"
    return dt.datetime.fromtimestamp(int(ns) / 1e9, dt.UTC).isoformat(timespec="seconds")


def edge_status_lines(state_dir: Path, inputs: Sequence[Input]) -> list[str]:
    """The lines of ``emdc edge status``: the inputs configured, then what the counter store holds."""
    path = state_dir / FILENAME
    if not path.exists():
        raise FileNotFoundError(f"no edge state at {path} (has the edge run with this state dir?)")
    reader = OutboxReader(path)
    try:
        status = reader.status()
        lines = [f"input {one.describe()}" for one in inputs]
        lines += [f"counter store: {path} (epoch {reader.epoch})"]
        lines += [f"counter {meter}/{channel}: {seq} pulses" for (meter, channel), seq in
                  sorted(reader.counters().items())]
        lines += [f"outbox: {reader.depth()} pulses waiting for the broker",
                  f"last broker confirm: {_when(status.get('last_confirm_ns'))}",
                  f"link: {status.get('link_state', 'unknown (never started)')}",
                  f"clock: {describe_sync(kernel_clock_synced())}"]
        return lines
    finally:
        reader.close()
