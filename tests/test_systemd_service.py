"""The Pi's unit and installer under a real systemd: a minimal Debian booted with systemd-nspawn.

One container for the module (see tests/nspawn.py): install-edge.sh installs
the checkout into it (from wheels downloaded here, so pip inside needs no
index), ``emdc edge run`` runs on gpiozero's mock pins against the host's
RabbitMQ, and the tests check what systemd does with it: readiness, the
watchdog, restarts, the sandbox (read-only file system, no capabilities, the
device and IP filters really enforced), configuration errors that stop the
service instead of restarting it, and an uninstall that leaves nothing.

The broker is reached through a proxy on one of the host's non-loopback
addresses, as a Pi reaches its server: the IP allow-list then has to let pika's
own loopback connection through, which is what the example drop-in says. Once
the broker is named instead: its DNS server, on the example's address, is then
reachable only through the example's DNS line.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import socket
import struct
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.nspawn import Container, image, missing_tools
from tests.support import ROOT, TcpProxy, wait_until

pytestmark = pytest.mark.brokers

UNIT = "emdc-edge.service"
DROP_IN_DIR = f"/etc/systemd/system/{UNIT}.d"
INSTALL = "/src/deploy/edge/install-edge.sh"
ALLOW_LIST_EXAMPLE = ROOT / "deploy/edge/ip-allow-list.example.conf"
EXAMPLE_BROKER, EXAMPLE_DNS = "198.51.100.10", "198.51.100.53"
BROKER_NAME, DNS_ADDRESS = "broker.emdc.test", (f"{EXAMPLE_DNS}/32", "dev", "lo")  # not in IPAddressAllow=localhost
MOCK_PINS = "[Service]\nEnvironment=GPIOZERO_PIN_FACTORY=mock\n"
PROBE_DIR, PROBE_DEVICE = "/srv/emdc-probe", "/dev/emdc-probe"
# What a minimal system holds besides files: compared before the install and after PURGE=1.
SNAPSHOT = ("find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /tmp -o -path /var/tmp"
            " -o -path /var/log -o -path /var/cache -o -path /var/lib/systemd \\) -prune -o -print | sort;"
            " sha256sum /etc/passwd /etc/group /etc/shadow /etc/gshadow")


class AddressProxy(TcpProxy):
    """A :class:`TcpProxy` listening on ``host`` (a non-loopback address of this machine) instead of 127.0.0.1."""

    def __init__(self, host: str, target_port: int) -> None:
        super().__init__(target_port)
        self.host = host

    def start(self) -> AddressProxy:
        listener = socket.create_server((self.host, 0), family=address_family(self.host), backlog=16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self


def address_family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_addresses() -> list[str]:
    """This machine's global (non-loopback) addresses; the container shares them."""
    out = subprocess.run(["ip", "-j", "addr", "show", "scope", "global"], capture_output=True, text=True,
                         check=True).stdout
    return [a["local"] for link in json.loads(out) for a in link.get("addr_info", []) if "local" in a]


def edge_requirements() -> list[str]:
    """What pip needs to build and install ``emdc[edge]``, from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [*project["build-system"]["requires"], *project["project"]["dependencies"],
            *project["project"]["optional-dependencies"]["edge"]]


@pytest.fixture(scope="module")
def network(brokers: None) -> Iterator[dict[str, Any]]:
    """The broker behind a proxy on one host address, and a listener on another that the allow-list leaves out."""
    addresses = host_addresses()
    ipv4 = [a for a in addresses if ":" not in a]
    others = [a for a in addresses if a not in ipv4[:1]]
    if not ipv4 or not others:
        pytest.fail(f"the IP filter checks need two non-loopback addresses on this machine, found {addresses}")
    proxy = AddressProxy(ipv4[0], 5672).start()
    denied = socket.create_server((others[0], 0), family=address_family(others[0]), backlog=16)
    yield {"proxy": proxy, "broker": endpoint(proxy.host, proxy.port),
           "denied": endpoint(others[0], denied.getsockname()[1])}
    proxy.stop()
    denied.close()


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, network: dict[str, Any]) -> Iterator[Container]:
    missing = missing_tools()
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: apt-get install systemd-container debootstrap (see .ci/run)")
    wheels = tmp_path_factory.mktemp("wheels")
    download = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                               "--dest", str(wheels), *edge_requirements()], capture_output=True, text=True,
                              timeout=600)
    assert download.returncode == 0, download.stderr
    log = tmp_path_factory.mktemp("nspawn") / "boot.log"
    with Container.boot(image(), binds={ROOT: "/src", wheels: "/wheels"}, log=log) as container:
        yield container


@pytest.fixture(scope="module")
def installed(box: Container) -> dict[str, Any]:
    """The system before the install, and the first install's result."""
    before = {"snapshot": box.run("sh", "-c", SNAPSHOT).stdout,
              "gpio group": box.run("getent", "group", "gpio", check=False).returncode == 0,
              "udevadm": box.run("sh", "-c", "command -v udevadm", check=False).returncode == 0}
    return {"before": before, "install": install(box)}


def install(box: Container, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """install-edge.sh inside, pip taking the wheels downloaded on the host."""
    return box.run("bash", INSTALL, *(args or ("install",)), check=False, timeout=600,
                   env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/wheels", **env})


def allow_list(network: dict[str, Any], *, dns: bool = False) -> str:
    """The example drop-in with this machine's broker address; its DNS server's line only if ``dns``."""
    text = ALLOW_LIST_EXAMPLE.read_text()
    assert f"IPAddressAllow={EXAMPLE_BROKER}\n" in text and f"IPAddressAllow={EXAMPLE_DNS}\n" in text
    text = text.replace(f"IPAddressAllow={EXAMPLE_BROKER}\n", f"IPAddressAllow={network['proxy'].host}\n")
    return text if dns else text.replace(f"IPAddressAllow={EXAMPLE_DNS}\n", "")


class NameServer:
    """A DNS server for one name (``A`` record) on the example's DNS address, added to this machine's loopback.

    Enough of RFC 1035 for glibc's resolver: one question per query over UDP,
    NXDOMAIN for any other name, no answer for other record types. ``queries``
    counts what reached it.
    """

    def __init__(self, name: str, address: str) -> None:
        self.name, self.address, self.queries = name, address, 0
        subprocess.run(["ip", "addr", "replace", *DNS_ADDRESS], check=True)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind((EXAMPLE_DNS, 53))
        self._socket.settimeout(0.1)  # a closed socket does not wake a thread blocked on it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, client = self._socket.recvfrom(512)
            except TimeoutError:
                continue
            self.queries += 1
            with contextlib.suppress(OSError):
                self._socket.sendto(self.answer(query), client)

    def answer(self, query: bytes) -> bytes:
        labels, at = [], 12  # the question follows the 12-byte header: labels, the root's 0, type and class
        while query[at]:
            labels.append(query[at + 1:at + 1 + query[at]].decode("ascii", "replace").lower())
            at += 1 + query[at]
        (query_id,), (qtype,) = struct.unpack("!H", query[:2]), struct.unpack("!H", query[at + 1:at + 3])
        found = ".".join(labels) == self.name
        answers = 1 if found and qtype == 1 else 0
        header = struct.pack("!HHHHHH", query_id, 0x8180 if found else 0x8183, 1, answers, 0, 0)  # 3: NXDOMAIN
        record = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(self.address) if answers else b""
        return header + query[12:at + 5] + record

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()
        subprocess.run(["ip", "addr", "del", *DNS_ADDRESS], capture_output=True, check=False)


def configure(box: Container, network: dict[str, Any], broker: str | None = None, **drop_ins: str) -> None:
    """The broker's URL (``broker``: host:port, else the proxy's address) in the secret file, and exactly these
    drop-ins (name -> text) for the unit."""
    box.write("/etc/emdc/amqp_url", f"amqp://guest:guest@{broker or network['broker']}/%2F\n")
    box.run("rm", "-rf", DROP_IN_DIR)
    for name, text in drop_ins.items():
        box.write(f"{DROP_IN_DIR}/{name}.conf", text)
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "reset-failed", UNIT, check=False)


def running_edge(box: Container, network: dict[str, Any], **extra_drop_ins: str) -> dict[str, str]:
    """Restart the edge on mock pins behind the example allow-list; its properties once it is ready."""
    configure(box, network, **{"10-mock-pins": MOCK_PINS, "20-ip-allow-list": allow_list(network), **extra_drop_ins})
    box.run("systemctl", "restart", UNIT)
    return edge_state(box)


def edge_state(box: Container) -> dict[str, str]:
    return box.service(UNIT, "ActiveState", "SubState", "Result", "MainPID", "NRestarts", "ExecMainStatus",
                       "InvocationID")


def program_lines(box: Container, invocation: str) -> list[str]:
    """What the unit's own processes wrote (not systemd's lines about it) during one invocation."""
    out = box.run("journalctl", "--no-pager", "--output=cat", f"_SYSTEMD_INVOCATION_ID={invocation}").stdout
    return out.splitlines()


def unit_messages(box: Container, since: float) -> str:
    return box.run("journalctl", "--no-pager", "--output=cat", f"--unit={UNIT}", f"--since=@{since:.0f}").stdout


def probe(box: Container, network: dict[str, Any], *, as_user: str | None = None) -> str:
    """The probe's command line (for ExecStartPost=), or its result when run by ``as_user`` outside the unit."""
    args = ["/opt/emdc/venv/bin/python", "/src/tests/sandbox_probe.py", "--write", "/var/lib/emdc",
            "--write", PROBE_DIR, "--open", PROBE_DEVICE, "--connect", network["broker"],
            "--connect", network["denied"]]
    if as_user is None:
        return shlex.join(args)
    return box.run("runuser", "-u", as_user, "--", *args).stdout


def probe_results(text: str) -> dict[str, str]:
    line = next(line for line in text.splitlines() if line.startswith("sandbox-probe "))
    return json.loads(line.removeprefix("sandbox-probe "))


def send(box: Container, signal: str, pid: str) -> None:
    box.run("sh", "-c", f'kill -{signal} "$1"', "send", pid)  # the shell's kill: minbase has no procps


def process_status(box: Container, pid: str) -> dict[str, str]:
    lines = box.run("cat", f"/proc/{pid}/status").stdout.splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def test_installer_completes_in_one_run_on_a_minimal_system(box, installed):
    before, result = installed["before"], installed["install"]
    assert not before["gpio group"] and not before["udevadm"], "the image should have neither, like a minimal system"
    assert result.returncode == 0, result.stdout + result.stderr
    assert "install-edge: done" in result.stdout
    assert box.run("getent", "group", "gpio", check=False).returncode == 0
    assert "gpio" in box.run("id", "-nG", "emdc").stdout.split()
    assert box.run("systemctl", "is-enabled", UNIT, check=False).stdout.strip() == "enabled"
    # Not started while the RabbitMQ URL is missing.
    assert edge_state(box)["ActiveState"] == "inactive"

    accounts = box.run("cat", "/etc/passwd", "/etc/group").stdout
    again = install(box)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "creating" not in again.stdout, again.stdout
    assert box.run("cat", "/etc/passwd", "/etc/group").stdout == accounts


def test_edge_is_ready_and_publishing_through_the_example_allow_list(box, installed, network):
    connections = network["proxy"].connections
    state = running_edge(box, network)
    # Type=notify: `systemctl restart` returned and the unit is active only once READY=1 came.
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    wait_until(lambda: any("publishing to exchange" in line for line in program_lines(box, state["InvocationID"])),
               60, "the edge to reach RabbitMQ through the allow-list")
    assert network["proxy"].connections > connections, "the edge should reach the broker at its non-loopback address"
    assert edge_state(box)["MainPID"] == state["MainPID"], "the edge restarted instead of publishing"


@pytest.fixture
def name_server(network: dict[str, Any]) -> Iterator[NameServer]:
    server = NameServer(BROKER_NAME, network["proxy"].host)
    yield server
    server.close()


@pytest.mark.parametrize("dns", [True, False], ids=["dns-allowed", "dns-left-out"])
def test_a_broker_by_name_needs_the_example_allow_lists_dns_line(box, installed, network, name_server, dns):
    box.run("sh", "-c", f"umount /etc/resolv.conf 2>/dev/null; rm -f /etc/resolv.conf; "
                        f"echo 'nameserver {EXAMPLE_DNS}' > /etc/resolv.conf")
    broker = f"{BROKER_NAME}:{network['proxy'].port}"
    configure(box, network, broker, **{"10-mock-pins": MOCK_PINS, "20-ip-allow-list": allow_list(network, dns=dns)})
    box.run("systemctl", "restart", UNIT)
    invocation = edge_state(box)["InvocationID"]
    if dns:
        wait_until(lambda: any("publishing to exchange" in line for line in program_lines(box, invocation)), 60,
                   f"the edge to reach RabbitMQ at {broker} through the example's DNS line")
        assert name_server.queries > 0
    else:
        line = wait_until(lambda: next((line for line in program_lines(box, invocation) if "cannot reach" in line),
                                       None), 60, "the edge to say that it cannot reach RabbitMQ")
        assert BROKER_NAME in line and "name resolution" in line, line
        assert name_server.queries == 0, "the allow-list should drop the query"
        assert not any("publishing to exchange" in line for line in program_lines(box, invocation))


def test_sandbox_is_enforced(box, installed, network):
    box.run("install", "-d", "-o", "emdc", "-g", "emdc", PROBE_DIR)
    box.run("mknod", "-m", "0666", PROBE_DEVICE, "c", "10", "200")  # /dev/net/tun: harmless to open
    try:
        state = running_edge(box, network, **{"30-probe": f"[Service]\nExecStartPost={probe(box, network)}\n"})
        inside = probe_results("\n".join(program_lines(box, state["InvocationID"])))
        outside = probe_results(probe(box, network, as_user="emdc"))
        main = process_status(box, state["MainPID"])
    finally:
        box.run("rm", "-rf", PROBE_DIR, PROBE_DEVICE)

    # The same user outside the unit may do all of it: what fails inside, the unit forbids.
    assert {k: v for k, v in outside.items() if not k.startswith(("Cap", "NoNew", "Seccomp"))} == {
        "write /var/lib/emdc": "ok", f"write {PROBE_DIR}": "ok", f"open {PROBE_DEVICE}": "ok",
        f"connect {network['broker']}": "ok", f"connect {network['denied']}": "ok"}, outside
    assert inside["write /var/lib/emdc"] == "ok", inside
    assert inside[f"write {PROBE_DIR}"] == "EROFS", inside  # ProtectSystem=strict
    assert inside[f"open {PROBE_DEVICE}"] == "EPERM", inside  # DevicePolicy=closed
    assert inside[f"connect {network['broker']}"] == "ok", inside  # IPAddressAllow=<broker>
    assert inside[f"connect {network['denied']}"] != "ok", inside  # IPAddressDeny=any
    for status in (inside, main):
        assert {k: int(status[k], 16) for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")} == dict.fromkeys(
            ("CapEff", "CapPrm", "CapBnd", "CapAmb"), 0), status
        assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2"), status


def test_watchdog_restarts_a_hung_edge(box, installed, network):
    state = running_edge(box, network)
    # The edge feeds the watchdog (systemd records each WATCHDOG=1), so it is the hang that gets it killed.
    fed = box.service(UNIT, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
    wait_until(lambda: box.service(UNIT, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"] != fed, 60,
               "the edge to feed the watchdog")
    since = time.time() - 1
    send(box, "STOP", state["MainPID"])
    restarted = wait_until(lambda: (s := edge_state(box))["MainPID"] not in {"0", state["MainPID"]}
                           and s["ActiveState"] == "active" and s, 120, "the watchdog to restart the edge")
    assert int(restarted["NRestarts"]) == int(state["NRestarts"]) + 1
    assert "Watchdog timeout" in unit_messages(box, since)


def test_killed_edge_is_restarted(box, installed, network):
    state = running_edge(box, network)
    since = time.time() - 1
    send(box, "KILL", state["MainPID"])
    restarted = wait_until(lambda: (s := edge_state(box))["MainPID"] not in {"0", state["MainPID"]}
                           and s["ActiveState"] == "active" and s, 60, "systemd to restart the killed edge")
    assert int(restarted["NRestarts"]) == int(state["NRestarts"]) + 1
    assert "status=9/KILL" in unit_messages(box, since)


@pytest.mark.parametrize(("drop_ins", "named"), [
    ({}, "lgpio"),  # the unit's GPIOZERO_PIN_FACTORY=lgpio, and no lgpio on this (non-Pi) machine
    ({"10-mock-pins": MOCK_PINS, "30-bad-setting": "[Service]\nEnvironment=EMDC_MIN_PULSE_MS=soon\n"},
     "EMDC_MIN_PULSE_MS"),
], ids=["lgpio-missing", "bad-setting"])
def test_configuration_error_is_one_line_and_stops_the_service(box, installed, network, drop_ins, named):
    configure(box, network, **drop_ins)
    started = box.run("systemctl", "restart", UNIT, check=False)
    assert started.returncode != 0
    state = edge_state(box)
    # "failed", not "auto-restart": systemd schedules no restart for exit status 78.
    assert (state["ActiveState"], state["SubState"], state["Result"]) == ("failed", "failed", "exit-code"), state
    assert (state["ExecMainStatus"], state["NRestarts"]) == ("78", "0"), state
    lines = wait_until(lambda: program_lines(box, state["InvocationID"]), 30, "the edge's message in the journal")
    assert len(lines) == 1 and "Traceback" not in lines[0] and named in lines[0], lines


def test_uninstall_keeps_local_state_and_purge_leaves_nothing(box, installed, network):
    running_edge(box, network)  # a used system: state, a running service, local drop-ins
    kept = install(box, "uninstall")
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert box.service(UNIT, "LoadState")["LoadState"] == "not-found"
    for path in ("/etc/emdc/emdc.toml", "/var/lib/emdc/edge.sqlite3", DROP_IN_DIR):
        assert box.run("test", "-e", path, check=False).returncode == 0, f"{path} should be kept"
    assert box.run("getent", "passwd", "emdc", check=False).returncode == 0

    purged = install(box, "uninstall", PURGE="1")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    before = set(installed["before"]["snapshot"].splitlines())
    after = set(box.run("sh", "-c", SNAPSHOT).stdout.splitlines())
    assert (sorted(after - before), sorted(before - after)) == ([], []), "(left behind, removed)"
    assert box.run("getent", "group", "gpio", check=False).returncode != 0
    assert box.service(UNIT, "LoadState")["LoadState"] == "not-found"
