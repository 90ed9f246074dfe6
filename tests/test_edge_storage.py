"""The edge's counter store under real storage faults: a full disk, a read-only file system, a damaged store.

Each test runs the real ``emdc edge run`` (tests/metered_edge.py pulses its
mock pin in real time at 10 pulses/s and writes how many pulses it produced to
``meter.count``) and a real ``emdc writer`` on the test brokers, breaks the
storage for real (a tmpfs filled to the last page, an ext2 image the kernel
turns read-only, garbage written into the store) and checks the writer's
total against the meter's count, pulse for pulse, and what the log says.

Needs root (mount, losetup), as CI has.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge.outbox import FILENAME
from tests.support import EmdcProcess, MeteredEdge, Names, saved_total_uwh, start_writer, wait_until, writer_env

METER_RATE = 10  # pulses/s
PAGE = 4096


def pulse_for(edge: MeteredEdge, seconds: float) -> int:
    """Run the meter for ``seconds``; return what it produced so far."""
    edge.meter_on()
    time.sleep(seconds)
    return edge.meter_off()


@pytest.fixture
def edge(names: Names, tmp_path: Path) -> Iterator[MeteredEdge]:
    pi = MeteredEdge(names, tmp_path / "meter", rate=METER_RATE)
    yield pi
    pi.end()


@pytest.fixture
def writer(names: Names, spawn: Callable[..., EmdcProcess]) -> EmdcProcess:
    return start_writer(spawn, names, writer_env(names))


def wait_total(names: Names, pulses: int, timeout: float = 30) -> None:
    wait_until(lambda: saved_total_uwh(names.writer_dir) == pulses * 10**6, timeout,
               f"the writer's total to reach {pulses} pulses (it is {saved_total_uwh(names.writer_dir)} µWh)")


def problems(log: str) -> list[str]:
    """The WARNING and ERROR lines of an edge log."""
    return [line for line in log.splitlines() if re.search(r" (WARNING|ERROR) ", line)]


@contextlib.contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=True)


@contextlib.contextmanager
def ext2_image(directory: Path, image: Path) -> Iterator[Path]:
    """An ext2 file system on a loop device, mounted ``errors=remount-ro``: the kernel turns it read-only on an error.

    ext2, having no journal, is turned read-only without aborting one, as an
    SD card's file system is after an I/O error. The image is made on first use
    and mounted as it is after that (a reboot).
    """
    if not image.exists():
        subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
        subprocess.run(["mkfs.ext2", "-q", "-F", str(image)], check=True)
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True,
                          text=True).stdout.strip()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-o", "errors=remount-ro", loop, str(directory)], check=True)
        try:
            yield Path(loop)
        finally:
            subprocess.run(["umount", "--lazy", str(directory)], check=True)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to its last page; return the filler file to free it again."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (b"\0" * 2**20, b"\0" * PAGE, b"\0"):
            with contextlib.suppress(OSError):
                while os.write(fd, chunk):
                    pass
    finally:
        os.close(fd)
    return filler


# -- a full or read-only disk while counting ------------------------------------------------------------------


def test_a_full_disk_for_a_while_loses_no_pulse(names: Names, writer: EmdcProcess, edge: MeteredEdge) -> None:
    with tmpfs(names.edge_dir, "8m"):
        edge.start()  # the store is created on the tmpfs, its -wal emptied: every commit now needs new space
        edge.meter_on()
        wait_until(lambda: saved_total_uwh(names.writer_dir), 10, "the first pulses at the writer")
        before = len(edge.log())
        filler = fill(names.edge_dir)
        time.sleep(8)
        held = edge.produced()
        assert edge.proc.poll() is None, edge.log()
        assert saved_total_uwh(names.writer_dir) < (held - 20) * 10**6, "the disk was not full"
        filler.unlink()
        wait_until(lambda: "outbox writable again" in edge.log(), 10, "the held pulses to be written")
        wait_total(names, edge.meter_off())
        assert edge.stop() == 0, edge.log()
        episode = edge.log()[before:]
    assert "Traceback" not in episode, episode
    assert re.search(r"cannot write the outbox .* \(database or disk is full\): holding pulses in memory", episode)
    assert len(problems(episode)) <= 2, episode  # the recorder's line, and the publisher's for its deletes
    assert not [line for line in problems(episode) if " ERROR " in line], episode


def test_a_file_system_turned_read_only_stops_in_time_and_says_what_is_lost(
        names: Names, writer: EmdcProcess, edge: MeteredEdge, tmp_path: Path) -> None:
    # A mounted file system cannot be remounted read-only while files are open for writing (EBUSY), so
    # the kernel does it, as it does to an SD card after an I/O error. The edge then counts in memory; it
    # cannot get the disk back without a restart, so the stop must come in time and name what is lost.
    with ext2_image(names.edge_dir, tmp_path / "sd.img") as loop:
        edge.start()
        edge.meter_on()
        wait_until(lambda: saved_total_uwh(names.writer_dir), 10, "the first pulses at the writer")
        (Path("/sys/fs/ext4") / loop.name / "trigger_fs_error").write_text("test: read-only\n")
        time.sleep(3)
        assert edge.proc.poll() is None, edge.log()
        produced = edge.meter_off()
        started = time.monotonic()
        assert edge.stop(timeout=20) == 0, edge.log()
        assert time.monotonic() - started < 12
        log = edge.log()
    assert "Traceback" not in log, log
    assert re.search(r"cannot write the outbox .*: holding pulses in memory until the disk takes them", log), log
    [lost_line] = [line for line in problems(log) if " ERROR " in line]
    lost = int(re.search(r"(\d+) pulses counted in memory could not be written to the outbox", lost_line)[1])
    assert 0 < lost < produced

    with ext2_image(names.edge_dir, tmp_path / "sd.img"):  # after a reboot: writable again
        edge.start()
        wait_total(names, produced - lost)  # what the disk took before it turned read-only, no more, no less
        assert edge.stop() == 0, edge.log()


# -- a damaged store -------------------------------------------------------------------------------------


def root_page(store: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(store)) as db:
        page: int = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    return page


def write_garbage(store: Path, page: int, pages: int = 1) -> None:
    with store.open("r+b") as fh:
        fh.seek((page - 1) * PAGE)
        fh.write(os.urandom(pages * PAGE))


DAMAGE: dict[str, Callable[[Path], None]] = {
    "garbage header": lambda store: write_garbage(store, 1),
    "truncated": lambda store: os.truncate(store, store.stat().st_size // 2),
    # A page that opening the store does not read (the first insert does): only quick_check finds it.
    "garbage page": lambda store: write_garbage(store, root_page(store, "sqlite_sequence")),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_store_is_refused_in_one_line_until_moved_aside(names: Names, writer: EmdcProcess,
                                                                  edge: MeteredEdge, damage: str) -> None:
    edge.start()
    wait_total(names, pulse_for(edge, 1.5))  # everything counted: only what the writer has is in the store
    assert edge.stop() == 0, edge.log()
    DAMAGE[damage](edge.store)

    output = edge.refused()
    assert f"the counter store {edge.store} is damaged" in output, output
    move = re.search(r"\((mv [^)]*)\)", output)
    assert move, output
    subprocess.run(move[1], shell=True, check=True)  # what the line says to do, as it says it

    edge.start()
    assert "new counter epoch" in edge.log()
    wait_total(names, pulse_for(edge, 1.5))
    assert edge.stop() == 0, edge.log()


@pytest.mark.parametrize("loss", ["0 bytes", "-wal deleted after kill -9"])
def test_a_lost_store_or_wal_starts_a_new_epoch_and_counts_on_exactly(names: Names, writer: EmdcProcess,
                                                                      edge: MeteredEdge, loss: str) -> None:
    edge.start()
    wait_total(names, pulse_for(edge, 1.5))
    if loss == "0 bytes":
        assert edge.stop() == 0, edge.log()
        os.truncate(edge.store, 0)
    else:
        edge.stop(signal.SIGKILL)
        edge.store.with_name(FILENAME + "-wal").unlink()
    edge.start()
    assert "new counter epoch" in edge.log(), edge.log()
    wait_total(names, pulse_for(edge, 1.5))
    assert edge.stop() == 0, edge.log()
    assert "Traceback" not in edge.log(), edge.log()


def test_a_store_damaged_while_running_ends_the_watchdog_pings_and_the_process(
        names: Names, writer: EmdcProcess, edge: MeteredEdge, tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        sock.settimeout(0.1)

        def received() -> list[str]:
            messages = []
            with contextlib.suppress(TimeoutError):
                while True:
                    messages.append(sock.recv(256).decode())
            return messages

        edge.start(NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="2000000")  # a ping a second
        edge.meter_on()
        wait_until(lambda: "WATCHDOG=1" in received(), 10, "a watchdog ping")
        wait_until(lambda: saved_total_uwh(names.writer_dir), 10, "the first pulses at the writer")
        with contextlib.closing(sqlite3.connect(edge.store, isolation_level=None)) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the main file, where the garbage goes
            pages = edge.store.stat().st_size // PAGE
        write_garbage(edge.store, 2, pages - 1)
        damaged_at = time.monotonic()
        assert edge.proc.wait(20) == 1, edge.log()
        assert time.monotonic() - damaged_at < 15
        assert "STOPPING=1" in received()
    log = edge.log()
    assert "Traceback" not in log, log
    [exit_line] = [line for line in problems(log) if "is damaged" in line]
    assert " ERROR " in exit_line and "exiting so that the service is restarted" in exit_line, log
    # Besides it, only the start's new epoch and the count of pulses lost with the store.
    others = [line for line in problems(log) if line != exit_line and "new counter epoch" not in line]
    assert len(others) <= 1 and all("could not be written to the outbox" in line for line in others), log
    edge.meter_off()
    assert "is damaged" in edge.refused()


def test_an_unwritable_state_directory_is_named_as_the_reason(names: Names, edge: MeteredEdge) -> None:
    names.edge_dir.mkdir()
    os.chown(names.edge_dir, 65534, -1)  # nobody's, mode 755: root without CAP_DAC_OVERRIDE may not write
    no_override = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                   "--inh-caps=-dac_override,-dac_read_search"]
    output = edge.refused(*no_override)
    assert output == f"Error: state_dir {names.edge_dir} is not writable by this user (uid 0)", output
