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

    def age_s(self) -> float | None:
        """Seconds since the last :meth:`touch`, or None if there never was one."""
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def check(self, max_age_s: float) -> str:
        """A ``healthy: ...`` line, or :class:`HeartbeatStale` naming the file and its age."""
        age = self.age_s()
        if age is None or age > max_age_s:
            raise HeartbeatStale(f"unhealthy: no heartbeat in {self.path} for "
                                 f"{'ever' if age is None else f'{age:.0f} s'}")
        return f"healthy: heartbeat {age:.1f} s ago"
