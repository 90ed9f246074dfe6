"""What a process may do where it runs: tests/test_systemd_service.py runs it inside and outside the edge's unit.

Standard library only (it runs under the service's own Python). Prints one line,
``sandbox-probe {json}``, mapping each attempt to ``"ok"`` or the error's name::

    python tests/sandbox_probe.py --write /srv/x --open /dev/net/tun --connect 192.0.2.2:5672
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
from collections.abc import Callable
from pathlib import Path

STATUS_FIELDS = ("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")


def attempt(action: Callable[[], object]) -> str:
    try:
        action()
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def write(directory: str) -> None:
    probe = Path(directory) / "sandbox-probe"
    probe.write_text("probe\n")
    probe.unlink()


def connect(address: str) -> None:
    host, _, port = address.rpartition(":")
    socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="append", default=[], help="a directory to create a file in")
    parser.add_argument("--open", action="append", default=[], help="a device to open for reading")
    parser.add_argument("--connect", action="append", default=[], help="host:port to connect to over TCP")
    args = parser.parse_args()
    results: dict[str, str] = {}
    for directory in args.write:
        results[f"write {directory}"] = attempt(lambda d=directory: write(d))
    for device in args.open:
        results[f"open {device}"] = attempt(lambda d=device: Path(d).open("rb").close())
    for address in args.connect:
        results[f"connect {address}"] = attempt(lambda a=address: connect(a))
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            results[key] = value.strip()
    print("sandbox-probe", json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
