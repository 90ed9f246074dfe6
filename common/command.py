"""What every ``emdc`` command shares, whichever side owns it: settings, flags, logging and signals.

Each side declares its own commands (``edge/cli.py``, ``backend/cli.py``);
they all read the effective configuration through the :class:`CommandContext`
the root group (``emdc/cli.py``) puts in click's context. Example::

    @click.command()
    @setting_flags("state_dir")
    @click.pass_obj
    def show(obj: CommandContext, **overrides: Any) -> None:
        click.echo(obj.config(overrides).state_dir)
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from common.config import Config, ConfigError, env_name, load_config

log = logging.getLogger("emdc")

F = TypeVar("F", bound=Callable[..., Any])

# Settings that may also be given as flags. Secrets are deliberately absent:
# command lines are visible to every user of the machine (ps, /proc).
FLAG_SETTINGS: dict[str, tuple[str, type, str]] = {
    "state_dir": ("--state-dir", str, "Directory for state files."),
    "meter_id": ("--meter", str, "Meter id."),
    "queue": ("--queue", str, "RabbitMQ queue to consume."),
    "topic_prefix": ("--topic-prefix", str, "MQTT topic prefix."),
    "mqtt_host": ("--mqtt-host", str, "Mosquitto host."),
    "mqtt_port": ("--mqtt-port", int, "Mosquitto port."),
}


def setting_flags(*names: str) -> Callable[[F], F]:
    """Add ``--flag`` options for settings; their values arrive as keyword ``overrides``."""

    def decorate(command: F) -> F:
        for name in reversed(names):
            flag, kind, help_text = FLAG_SETTINGS[name]
            command = click.option(flag, name, type=kind, default=None,
                                   help=f"{help_text} [env {env_name(name)}]")(command)
        return command

    return decorate


class ConfigurationError(click.ClickException):
    """A start-up failure that a restart cannot cure (a bad setting, missing GPIO): one line, exit status 78.

    78 is EX_CONFIG of sysexits.h; the Pi's systemd unit lists it in
    ``RestartPreventExitStatus=``, so a mistake stops the service with its
    message instead of restarting it every few seconds forever.
    """

    exit_code = 78

    def show(self, file: Any = None) -> None:
        """The one line; before it, at DEBUG only, the traceback of what led to it (for a bug report). The
        chain ends where a message was made safe: an error raised ``from None`` hides the one it replaced."""
        cause = self.__cause__ or self.__context__
        if cause is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("what led to the error below:", exc_info=(type(cause), cause, cause.__traceback__))
        super().show(file)


class CommandContext:
    """The root group's options, and the configuration built from them for a command."""

    def __init__(self, config_path: str | None, log_level: str | None) -> None:
        self.config_path = config_path
        self.log_level = log_level

    def config(self, overrides: dict[str, Any]) -> Config:
        """The effective settings with the command's flags on top; sets up logging. A bad setting is a usage error."""
        if self.log_level:
            overrides = {**overrides, "log_level": self.log_level}
        try:
            cfg = load_config(self.config_path, overrides=overrides)
        except ConfigError as exc:
            # No configuration, no log level from it: --log-level or EMDC_LOG_LEVEL asks for the traceback.
            if (self.log_level or os.environ.get(env_name("log_level"), "")).upper() == "DEBUG":
                configure_logging("DEBUG")
            raise ConfigurationError(f"configuration: {exc}") from None
        configure_logging(cfg.log_level)
        for warning in cfg.warnings:
            log.warning("%s", warning)
        return cfg


# Libraries whose own log lines are shown only at DEBUG: pika logs every failed attempt at ERROR, with
# tracebacks, and paho-mqtt would log every reconnect if a logger were enabled; our own lines say what changed.
THIRD_PARTY_LOGGERS = ("pika", "paho")


def configure_logging(level: str) -> None:
    """Log lines to stderr at ``level``; the :data:`THIRD_PARTY_LOGGERS` only at DEBUG."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    quiet = level.upper() != "DEBUG"
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL if quiet else logging.NOTSET)


def state_dir(config: Config) -> Path:
    """The configured state dir, created if need be; a :class:`ConfigurationError` naming why it is unusable.

    Checked once at a service's start, so that a wrong path is one line
    instead of a traceback from whichever component touches it first.
    """
    path = Path(config.state_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        hint = ": a part of the path is a file" if isinstance(exc, NotADirectoryError | FileExistsError) else ""
        raise ConfigurationError(f"state_dir {path} cannot be created ({exc.strerror}{hint})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigurationError(f"state_dir {path} is not writable by this user (uid {os.getuid()})")
    return path


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so services finish the work in hand and exit 0."""
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        log.info("received %s: finishing the work in hand", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
