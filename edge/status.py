"""``emdc edge status``: what the edge has counted, what is still waiting to be sent, and the Pi's health
(what its status messages tell the writer)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from common import __version__
from common.inputs import Input
from edge.clock_sync import describe_sync, kernel_clock_synced
from edge.outbox import FILENAME, OutboxReader
from edge.status_report import cpu_temperature


def _when(ns: str | None) -> str:
    if not ns:
        return "never"
    return dt.datetime.fromtimestamp(int(ns) / 1e9, dt.UTC).isoformat(timespec="seconds")


def _celsius(value: float | None) -> str:
    return "not reported by the kernel" if value is None else f"{value} °C"


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
                  f"clock: {describe_sync(kernel_clock_synced())}",
                  f"software: emdc {__version__}", f"CPU temperature: {_celsius(cpu_temperature())}"]
        return lines
    finally:
        reader.close()
