"""One writer per state dir: a second `emdc writer` on the same files refuses to start, in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from backend.state_store import StateError, exclusive_state_dir
from tests.support import ROOT, run_emdc, wait_until


def test_a_second_writer_on_the_same_state_dir_refuses_to_start(tmp_path: Path) -> None:
    with exclusive_state_dir(tmp_path):
        result = run_emdc(["writer"], {"EMDC_STATE_DIR": str(tmp_path), "PATH": os.environ["PATH"]}, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"Error: {tmp_path} is in use by another writer (pid {os.getpid()}); one writer per state dir: "
                     "stop the other one, or give this one its own state_dir"]


def test_the_claim_ends_with_its_process_however_it_ends(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import sys, pathlib, time\n"
                               "from backend.state_store import exclusive_state_dir\n"
                               "with exclusive_state_dir(pathlib.Path(sys.argv[1])):\n"
                               "    print('held', flush=True); time.sleep(60)\n", str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    with pytest.raises(StateError, match=f"in use by another writer \\(pid {holder.pid}\\)"), \
            exclusive_state_dir(tmp_path):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    wait_until(lambda: _claimable(tmp_path), 5, "the kernel to release the lock")


def _claimable(directory: Path) -> bool:
    try:
        with exclusive_state_dir(directory):
            return True
    except StateError:
        return False
