"""A minimal Debian booted with systemd-nspawn: the Pi's unit and installer under a real systemd.

The image (``debootstrap --variant=minbase`` plus systemd and Python) is built
once into :data:`CACHE`, outside the checkout, and reused; each boot runs on a
throw-away overlay (``--volatile=overlay``) so the image stays pristine. The
container shares the host's network (so it reaches the host's RabbitMQ on
127.0.0.1), gets a cgroup v2 hierarchy and may load BPF programs: systemd
inside then really enforces ``DevicePolicy=`` and ``IPAddressDeny=``.
Commands run inside through ``nsenter``.

Example::

    with Container.boot(image(), binds={REPO: "/src"}, log=tmp / "boot.log") as box:
        box.run("systemctl", "is-system-running")
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from tests.support import cached_directory, wait_until

CACHE = Path(os.environ.get("EMDC_NSPAWN_CACHE", "/var/cache/emdc-nspawn"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# Raspberry Pi OS Lite's relevant part: systemd and Python; no udev, no gpio group.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv")
INSIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def missing_tools() -> list[str]:
    """The host tools this needs that are not installed (apt-get install systemd-container debootstrap)."""
    return [tool for tool in ("systemd-nspawn", "debootstrap", "nsenter") if shutil.which(tool) is None]


def image() -> Path:
    """The cached root file system, built (atomically: into a temporary directory, then renamed) if absent."""
    key = hashlib.sha256(" ".join((SUITE, MIRROR, *PACKAGES)).encode()).hexdigest()[:10]
    return cached_directory(CACHE, f"{SUITE}-{key}", _debootstrap)


def _debootstrap(root: Path) -> None:
    result = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root),
                             MIRROR], capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"debootstrap {SUITE} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")


class Container:
    """A booted container: :meth:`run` a command inside, :meth:`service` a unit's properties."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process = process
        self.log = log
        self.leader = wait_until(self._leader, 60, "the container's init process")
        self._state = ""
        try:
            wait_until(self._booted, 240, "the container's boot to finish (state running or degraded)")
        except TimeoutError as exc:
            jobs = self.run("systemctl", "list-jobs", "--no-pager", check=False, timeout=30)
            raise TimeoutError(f"{exc}; the state was {self._state!r}, the jobs:\n{jobs.stdout}{jobs.stderr}") from None

    @classmethod
    @contextlib.contextmanager
    def boot(cls, root: Path, binds: Mapping[Path, str], log: Path) -> Iterator[Container]:
        """Boot ``root`` (read-only, on a temporary overlay) with ``binds`` (host path -> path inside, read-only)."""
        command = ["systemd-nspawn", "--quiet", f"--directory={root}", "--volatile=overlay", "--boot",
                   f"--machine=emdc-{uuid.uuid4().hex[:8]}", "--register=no", "--keep-unit",
                   "--system-call-filter=bpf", "--console=passive",
                   *(f"--bind-ro={host}:{inside}" for host, inside in binds.items())]
        # cgroup v2 inside although the host (a hybrid hierarchy) mounts v1 controllers.
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        with log.open("ab") as out:
            process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield cls(process, log)
        finally:
            process.terminate()  # nspawn asks the container's systemd to power off
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def _leader(self) -> int | None:
        if self.process.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        # nspawn's first child may be a helper that forks the container's init and exits: the leader is the
        # child running systemd (the image's init), else every nsenter would name a process that is gone.
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        with contextlib.suppress(OSError):
            for pid in children.read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
        return None

    def _booted(self) -> bool:
        # Until systemd inside has its socket, systemctl says "offline".
        self._state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=120).stdout.strip()
        return self._state in {"running", "degraded"}

    def run(self, *command: str, check: bool = True, timeout: float = 120, env: Mapping[str, str] | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside as root, in all the container's namespaces, with a clean environment."""
        variables = [f"{k}={v}" for k, v in {"PATH": INSIDE_PATH, "LANG": "C.UTF-8", **(env or {})}.items()]
        result = subprocess.run(["nsenter", f"--target={self.leader}", "--all", "--root", "--wd", "--",
                                 "env", "-i", *variables, *command],
                                input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {result.returncode} in the container:\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def write(self, path: str, text: str) -> None:
        """Create or replace the file ``path`` inside (parent directories created)."""
        self.run("sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "write", path, stdin=text)

    def service(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show``: the unit's ``properties`` as strings."""
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
