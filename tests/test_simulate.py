"""`emdc simulate` end to end in one process, no broker: repeated runs on one state never overlap in time."""

from __future__ import annotations

import os
import time
from pathlib import Path

from backend.writer import load_ledger
from common.config import load_config
from tests.support import run_emdc


def test_repeated_simulations_on_one_state_count_on_with_trusted_times(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "EMDC_STATE_DIR": str(tmp_path)}
    outputs = [run_emdc(["simulate", "--power", "3600", "--count", "100", "--speed", "max"], env)
               for _ in range(3)]
    assert [o.stdout.splitlines()[0] for o in outputs] == [f"home/energy/active_energy = {n / 10:g}"
                                                            for n in (1, 2, 3)]
    assert all("WARNING" not in o.stderr for o in outputs[1:]), outputs[1].stderr
    _, ledger = load_ledger(load_config(env={"EMDC_STATE_DIR": str(tmp_path)}))
    assert ledger is not None
    state = ledger.channel("main", "active")
    assert state.ts_doubt == "" and state.held_back == 0
    # Three 100 s runs end after each other, the last one at most a few minutes ahead of now.
    assert state.last_ts_ns is not None and state.last_ts_ns < time.time_ns() + 300 * 10**9
