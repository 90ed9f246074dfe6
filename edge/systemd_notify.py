"""Minimal sd_notify(3): tell systemd we are ready and alive, without libsystemd.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace) to services with ``Type=notify`` and ``WATCHDOG_USEC`` when
``WatchdogSec=`` is set. A notification is one datagram of ``KEY=VALUE`` lines.
Outside systemd (tests, a shell) every call is a harmless no-op.

Example::

    from edge import systemd_notify

    systemd_notify.notify("READY=1")            # after pins and outbox are set up
    interval = systemd_notify.watchdog_interval()
    if interval is not None:                     # ping twice per interval
        ...  # every interval / 2 s, while the worker threads are alive:
        systemd_notify.notify("WATCHDOG=1")
    systemd_notify.notify("STOPPING=1")
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

READY = "READY=1"
WATCHDOG = "WATCHDOG=1"
STOPPING = "STOPPING=1"


def notify(message: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd.

    Returns ``True`` if the datagram was sent, ``False`` when not running under
    systemd (no ``NOTIFY_SOCKET``) or the socket cannot be reached; a failure is
    logged, never raised, so a notification can't take the service down.

    >>> notify("READY=1", env={})
    False
    """
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        # Abstract namespace: the name starts with a NUL byte instead of "@".
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        # e.g. "vsock:..." (systemd 254+ in VMs): not needed on a Pi.
        log.warning("unsupported NOTIFY_SOCKET %r", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify %r failed: %s", message, exc)
        return False
    return True


def watchdog_interval(*, env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds (``WatchdogSec=``), or ``None`` if not enabled for us.

    ``WATCHDOG_PID``, when set, names the process that must ping; any other
    process (a child that inherited the environment) gets ``None``. Ping with
    ``notify("WATCHDOG=1")`` at half this interval.

    >>> watchdog_interval(env={"WATCHDOG_USEC": "30000000"})
    30.0
    """
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return usec / 1_000_000
