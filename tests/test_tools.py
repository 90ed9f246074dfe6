"""The scripts in tools/ must not rot: run each the way its docstring says."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT


def test_demo_week_fills_a_database_for_the_report(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "tools.demo_week", "--state-dir", str(tmp_path), "--start",
                             "2026-11-16", "--tz", "Europe/Berlin"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(0 refused)" in result.stdout and "Mon 2026-11-16 to Mon 2026-11-23" in result.stdout
    with sqlite3.connect(tmp_path / "pulses.sqlite3") as db:
        stored = db.execute("SELECT count(*) FROM pulses").fetchone()[0]
    assert f"stored {stored} pulses" in result.stdout and stored > 10_000
