"""``emdc doctor``'s shared part: the result of a check, the checks both sides need, and the loop that runs them.

Each check is a small function returning a :class:`Check` (or None when it
does not apply, e.g. a permission check after the broker was unreachable).
The configuration, the state dir and the RabbitMQ login are checked here;
each side adds its own checks (``edge/doctor.py``, ``backend/doctor.py``), and
``emdc/cli.py`` composes them and prints one line per check. Example::

    >>> print(bad("clock", "the kernel says the clock is NOT synchronised", "enable NTP").line())
    ✗ clock: the kernel says the clock is NOT synchronised. Fix: enable NTP
    >>> print(good("configuration", "loaded from defaults and the environment").line())
    ✓ configuration: loaded from defaults and the environment
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.command import ConfigurationError, state_dir
from common.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    import pika.adapters.blocking_connection

log = logging.getLogger("emdc.doctor")


@dataclass(frozen=True)
class Check:
    """What one check looked at, what it found, and, when it failed, how to fix it: one line of ``emdc doctor``."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = "✓" if self.ok else "✗"
        fix = f". Fix: {self.fix}" if self.fix and not self.ok else ""
        return f"{mark} {self.name}: {self.detail}{fix}"


def good(name: str, detail: str) -> Check:
    return Check(name, True, detail)


def bad(name: str, detail: str, fix: str = "") -> Check:
    return Check(name, False, detail, fix)


CheckFunction = Callable[[], Check | None]


def results(checks: Iterable[CheckFunction]) -> Iterator[Check]:
    """Run ``checks`` in order; one that raises is a failed check, not a traceback (which DEBUG logs)."""
    for check in checks:
        try:
            result = check()
        except Exception as exc:  # a check's own bug must not hide the other checks' answers
            log.debug("check %s failed", getattr(check, "__name__", check), exc_info=True)
            name = getattr(check, "__name__", "check").replace("_", " ")
            result = bad(name, f"the check itself failed ({type(exc).__name__}: {exc})",
                         "run `emdc --log-level debug doctor` for the details")
        if result is not None:
            yield result


def configuration(config_path: str | None, overrides: Mapping[str, Any]) -> tuple[Config | None, list[Check]]:
    """Load the settings as every command does; a refusal, and every warning, is a failed check."""
    try:
        cfg = load_config(config_path, overrides=overrides)
    except ConfigError as exc:
        return None, [bad("configuration", str(exc), "correct that setting (docs: Configuration)")]
    path = config_path or os.environ.get("EMDC_CONFIG")
    where = f"{path}, the environment and flags" if path else "defaults, the environment and flags (no file)"
    checks = [good("configuration", f"loaded from {where}; meter {cfg.meter_id}")]
    checks += [bad("configuration", warning, "correct or unset the variable") for warning in cfg.warnings]
    return cfg, checks


def state_directory(config: Config) -> Check:
    """The state dir as a service checks it at start (created if missing)."""
    try:
        path = state_dir(config)
    except ConfigurationError as exc:
        return bad("state_dir", exc.message, "use a directory this user may write (run doctor as the service's "
                                             "user), or change state_dir")
    return good("state_dir", f"{path.resolve()} is a writable directory")


class RabbitMQ:
    """One connection for all the RabbitMQ checks; :meth:`login` opens it, the sides' checks take channels.

    Example::

        with RabbitMQ(config) as rabbit:
            print(rabbit.login().line())
            if rabbit.connection is not None:
                channel = rabbit.connection.channel()
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.connection: pika.adapters.blocking_connection.BlockingConnection | None = None

    def __enter__(self) -> RabbitMQ:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.connection is not None and self.connection.is_open:
            try:
                self.connection.close()
            except Exception:  # the broker may be gone by now; nothing to clean up then
                log.debug("closing the doctor's RabbitMQ connection failed", exc_info=True)

    def login(self) -> Check:
        """Connect and log in with ``amqp_url``; the failure names refused, DNS, TLS, authentication or vhost."""
        import pika
        import pika.exceptions

        from common.amqp import connection_parameters, describe, diagnose

        try:
            self.connection = pika.BlockingConnection(connection_parameters(self.config, "emdc-doctor"))
        except (pika.exceptions.AMQPError, OSError) as exc:  # OSError: the host name does not resolve
            what, fix = diagnose(self.config, exc)
            return bad("RabbitMQ", f"{what} ({describe(self.config)})", fix)
        return good("RabbitMQ", f"logged in at {describe(self.config)}")
