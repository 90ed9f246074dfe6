"""A consumer's heartbeat file: the running service touches it, its age is the container health check.

Each service has its own file, so ``emdc writer --check`` and ``emdc
db-writer --check`` never vouch for each other::

    >>> import tempfile
    >>> beat = Heartbeat(Path(tempfile.mkdtemp()) / "writer.heartbeat")
    >>> beat.age_s() is None
    True
    >>> beat.touch()
    >>> beat.age_s() < 60
    True
"""

from __future__ import annotations

import time
from pathlib import Path

from common.config import Config

WRITER = "writer"
DB_WRITER = "db-writer"


class HeartbeatStale(RuntimeError):
    """The heartbeat is missing or older than allowed: the service is not consuming."""


class Heartbeat:
    """The heartbeat file at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def of(cls, config: Config, service: str) -> Heartbeat:
        """The heartbeat of ``service`` (:data:`WRITER` or :data:`DB_WRITER`) in the configured state dir."""
        return cls(Path(config.state_dir) / f"{service}.heartbeat")

    def touch(self) -> None:
        try:
            self.path.touch()
        except FileNotFoundError:  # the first beat in a new state dir
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()

    def note(self, trouble: str, since: float = 0.0) -> None:
        """Record why the service cannot do its job right now (``""``: it can again) and since when (epoch s).

        The heartbeat then still shows the process alive; :meth:`check` turns
        unhealthy once the trouble has lasted longer than the allowed age.
        """
        text = f"{since:.3f} {trouble}" if trouble else ""
        try:
            self.path.write_text(text)
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(text)

    def age_s(self) -> float | None:
        """Seconds since the last :meth:`touch`, or None if there never was one."""
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def check(self, max_age_s: float) -> str:
        """A ``healthy: ...`` line, or :class:`HeartbeatStale` naming the file, its age or the lasting trouble."""
        age = self.age_s()
        if age is None:
            raise HeartbeatStale(f"unhealthy: no heartbeat in {self.path} yet (is the service running?)")
        if age > max_age_s:
            raise HeartbeatStale(f"unhealthy: no heartbeat in {self.path} for {age:.0f} s")
        since, _, trouble = self.path.read_text().partition(" ")
        if not trouble:
            return f"healthy: heartbeat {age:.1f} s ago"
        lasting = max(time.time() - float(since), 0.0)
        if lasting > max_age_s:
            raise HeartbeatStale(f"unhealthy: {trouble.strip()}, for {lasting:.0f} s")
        return f"healthy: heartbeat {age:.1f} s ago ({trouble.strip()}, for {lasting:.0f} s)"
