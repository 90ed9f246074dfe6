"""Crash-safe persistence of the writer's ledger in ``energy_state.json``.

Every save writes a temporary file, fsyncs it, hard-links the current file to
``energy_state.json.bak`` and renames the new one into place, then fsyncs the
directory: a power cut at any instant leaves either the old or the new state.
A file that cannot be read is never replaced by an empty state.

Example::

    store = StateStore(Path("state"))
    doc = store.load()          # None on first start
    store.save({"meters": {}})
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STATE_FORMAT = 1
LOCK_FILENAME = "writer.lock"
ID_FILENAME = "state_id"


class StateError(RuntimeError):
    """The state file exists but cannot be trusted; the writer must not start."""


@contextlib.contextmanager
def exclusive_state_dir(directory: Path) -> Iterator[None]:
    """Hold the state dir for this process, or raise :class:`StateError` if another writer has it.

    Two writers on the same files would race each other's temporary files and
    overwrite each other's totals. The claim is an ``flock`` on ``writer.lock``,
    which the kernel releases when the process ends, however it ends.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / LOCK_FILENAME).open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise StateError(f"{directory} is in use by another writer ({holder}); one writer per state dir: "
                             "stop the other one, or give this one its own state_dir") from None
        fh.truncate(0)
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        yield


class StateStore:
    """Loads and atomically saves a JSON document in ``<directory>/energy_state.json``."""

    FILENAME = "energy_state.json"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / self.FILENAME
        self.backup = self.path.with_name(self.FILENAME + ".bak")
        self._tmp = self.path.with_name(self.FILENAME + ".tmp")

    def load(self) -> dict[str, Any] | None:
        """The saved document, None if there has never been one, else raise :class:`StateError`."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            if self.backup.exists():
                raise StateError(f"{self.path} is missing but {self.backup} exists; refusing to start from "
                                 f"zero. Restore it with: cp {self.backup} {self.path}") from None
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            doc = json.loads(raw)
            if doc.get("format") != STATE_FORMAT:
                raise ValueError(f"unknown format {doc.get('format')!r}")
            state: dict[str, Any] = doc["state"]
            return state
        except (ValueError, AttributeError, KeyError, TypeError, RecursionError) as exc:
            hint = f" The previous good copy is {self.backup}." if self.backup.exists() else ""
            raise StateError(f"{self.path} is corrupt ({exc}); refusing to start from zero.{hint} "
                             "Inspect both, then copy the right one into place.") from None

    def identity(self) -> str:
        """This state dir's identity, created (durably) on first use: it tells one writer's state from another's.

        A copy of the whole dir (a restored backup, a moved server) keeps it.
        """
        path = self.directory / ID_FILENAME
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            pass
        identity = uuid.uuid4().hex[:12]
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            fh.write(identity + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return identity

    def save(self, state: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"format": STATE_FORMAT, "state": state}, separators=(",", ":")).encode()
        with open(self._tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if self.path.exists():
            link = self.backup.with_suffix(".bak.tmp")
            link.unlink(missing_ok=True)
            os.link(self.path, link)
            os.replace(link, self.backup)
        os.replace(self._tmp, self.path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
