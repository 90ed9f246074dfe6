"""A real Home Assistant Core for the tests, in a Debian chroot, driven through its REST and websocket APIs.

Home Assistant Core needs a newer Python than the host's, so it runs in a
debootstrapped Debian ``forky`` (Python 3.14) with Home Assistant from PyPI in
a venv. The image is built once into :data:`CACHE`, outside the checkout,
keyed by :data:`HA_VERSION` (atomically: into a temporary directory, then
renamed) and reused. A plain chroot shares the host's network, so Home
Assistant reaches Mosquitto on 127.0.0.1; it runs in a private mount namespace
where its own configuration directory is bound to ``/config``, so the image
stays pristine and runs never see each other's configuration.

Home Assistant must not reach the internet: the requirements of every
integration it sets up are installed into the image, it starts with
``--skip-pip``, the chroot resolves no names, the configuration has no
``default_config`` and onboarding stops after creating the owner (the later
steps set up integrations that fetch). The owner and a long-lived access token
are created through the onboarding API on the first start.

Example::

    ha = HomeAssistant(image(), tmp / "ha")
    ha.start()
    ha.connect_mqtt("127.0.0.1", 1883)
    ha.ws("config/device_registry/list")
    ha.stop()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from websockets.sync.client import connect

from tests.support import cached_directory, free_port, wait_until

T = TypeVar("T")
HA_VERSION = "2026.11.0"
CACHE = Path(os.environ.get("EMDC_HA_CACHE", "/var/cache/emdc-ha"))
SUITE = "forky"
MIRROR = "http://deb.debian.org/debian"
# A C++ compiler and Python's headers: some of Home Assistant's default integrations' requirements (voice
# activity detection of assist_pipeline) have no wheels for Python 3.14. libturbojpeg: camera's snapshots.
PACKAGES = ("python3", "python3-venv", "python3-dev", "g++", "ca-certificates", "libturbojpeg0")
VENV = "/opt/ha"
INSIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What configuration.yaml sets up besides Home Assistant's default integrations; MQTT comes as a config entry.
DOMAINS = ("http", "api", "websocket_api", "config", "onboarding", "recorder", "history", "energy", "sensor", "mqtt",
           "frontend")  # the frontend only for tools/energy_screenshots.py (configured with ``extra``)
CONFIGURATION = """\
homeassistant:
  name: EMDC test
  latitude: 52.37
  longitude: 4.89
  elevation: 0
  unit_system: metric
  time_zone: UTC
  currency: EUR
  country: NL
  language: en
http:
  server_host: 127.0.0.1
  server_port: {port}
api:
websocket_api:
config:
onboarding:
history:
energy:
sensor:
recorder:
  commit_interval: 1
"""
# Run in the image's venv: the requirements of DOMAINS, of the default integrations and of everything they
# depend on (after_dependencies too: their modules are imported), one a line; as Home Assistant would install
# them on demand, which --skip-pip forbids.
REQUIREMENTS = """
import json, sys
from pathlib import Path
import homeassistant
from homeassistant import bootstrap
components = Path(homeassistant.__file__).parent / "components"
todo = {*bootstrap.DEFAULT_INTEGRATIONS, *bootstrap.CORE_INTEGRATIONS, *sys.argv[1:]}
seen, requirements = set(), set()
while todo:
    domain = todo.pop()
    if domain in seen or not (components / domain / "manifest.json").exists():
        continue
    seen.add(domain)
    manifest = json.loads((components / domain / "manifest.json").read_text())
    requirements.update(manifest.get("requirements", ()))
    todo.update(manifest.get("dependencies", ()), manifest.get("after_dependencies", ()))
print("\\n".join(sorted(requirements)))
"""
OWNER = {"name": "Owner", "username": "owner", "password": "emdc-test-owner", "language": "en"}


def missing_tools() -> list[str]:
    """The host tools this needs that are not installed (apt-get install debootstrap)."""
    return [tool for tool in ("debootstrap", "unshare", "chroot") if shutil.which(tool) is None]


def chroot_command(root: Path, *command: str, config: Path | None = None, tmpfs: bool = True,
                   env: Mapping[str, str] | None = None) -> list[str]:
    """``command`` run as root in ``root``, in a private mount namespace with /proc, /dev, a fresh /tmp (unless
    not ``tmpfs``) and ``config`` at /config, with a clean environment; ``exec`` all the way, so the process is
    ``command`` itself."""
    mounts = ['mount -t proc proc "$0/proc"', 'mount --rbind /dev "$0/dev"']
    if tmpfs:
        mounts.append('mount -t tmpfs tmpfs "$0/tmp"')
    if config is not None:
        mounts.append(f'mount --bind {_quote(config)} "$0/config"')
    variables = [f"{k}={v}" for k, v in {"PATH": INSIDE_PATH, "LANG": "C.UTF-8", "HOME": "/root",
                                         **(env or {})}.items()]
    script = " && ".join([*mounts, 'exec chroot "$0" "$@"'])
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(root),
            "/usr/bin/env", "-i", *variables, *command]


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"


def _run(root: Path, *command: str, **kwargs: Any) -> None:
    result = subprocess.run(chroot_command(root, *command, tmpfs=False, **kwargs), capture_output=True, text=True,
                            timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed in the Home Assistant image:\n"
                           f"{result.stdout[-3000:]}{result.stderr[-3000:]}")


def image() -> Path:
    """The cached root file system with Home Assistant, built if absent (3-4 minutes, about 2 GB)."""
    key = hashlib.sha256(" ".join((SUITE, MIRROR, HA_VERSION, *PACKAGES, *DOMAINS, REQUIREMENTS)).encode())
    return cached_directory(CACHE, f"{SUITE}-ha{HA_VERSION}-{key.hexdigest()[:10]}", _build)


def _build(root: Path) -> None:
    # An older debootstrap has no script for forky; sid's fits every suite since.
    script = Path("/usr/share/debootstrap/scripts") / SUITE
    result = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root),
                             MIRROR, *([] if script.exists() else ["/usr/share/debootstrap/scripts/sid"])],
                            capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"debootstrap {SUITE} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    # pip inside reaches PyPI as the host does: through the host's resolver and certificate authorities.
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", root / "tmp/host-ca.crt")
    pip = {"PIP_CERT": "/tmp/host-ca.crt", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"}
    _run(root, "python3", "-m", "venv", VENV)
    _run(root, f"{VENV}/bin/pip", "install", "--quiet", f"homeassistant=={HA_VERSION}", env=pip)
    _run(root, "sh", "-c", f'{VENV}/bin/python -c "$0" "$@" > /tmp/requirements.txt', REQUIREMENTS, *DOMAINS)
    constraints = f"{VENV}/lib/python3.14/site-packages/homeassistant/package_constraints.txt"
    _run(root, f"{VENV}/bin/pip", "install", "--quiet", "-r", "/tmp/requirements.txt", "-c", constraints, env=pip)
    # From now on the chroot resolves no names: Home Assistant stays off the internet.
    (root / "etc/resolv.conf").write_text("")
    for leftover in (root / "tmp").iterdir():
        leftover.unlink()
    (root / "config").mkdir()


class HomeAssistantError(AssertionError):
    """Home Assistant answered an API call with an error."""


class HomeAssistant:
    """One Home Assistant instance with its configuration directory: start, stop, and its APIs as the owner.

    ``extra`` is added to its configuration.yaml (``"frontend:\\n"`` for a browser).
    """

    def __init__(self, root: Path, config: Path, extra: str = "") -> None:
        self.root = root
        self.config = config
        config.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (config / "configuration.yaml").write_text(CONFIGURATION.format(port=self.port) + extra)
        self.url = f"http://127.0.0.1:{self.port}"
        self.token: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.config / "home-assistant.log"

    def log(self, since: int = 0) -> str:
        """Home Assistant's log from byte ``since`` on (see :meth:`log_size`)."""
        with contextlib.suppress(FileNotFoundError), self.log_path.open("rb") as log:
            log.seek(since)
            return log.read().decode(errors="replace")
        return ""

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def start(self) -> None:
        """Start Home Assistant and return once it runs; on the first start, create the owner and the token."""
        command = chroot_command(self.root, f"{VENV}/bin/hass", "--config", "/config", "--skip-pip",
                                 config=self.config, env={"PYTHONDONTWRITEBYTECODE": "1"})
        with (self.config / "stdout.log").open("ab") as out:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        wait_until(self._http_up, 180, "Home Assistant's HTTP server")
        if self.token is None:
            self.token = self._onboard()
        wait_until(self._running, 180, "Home Assistant to run")
        # The http: section of configuration.yaml is only a trial until a user confirms it in the UI: Home
        # Assistant reverts it and exits to be restarted (code 100) five minutes later otherwise.
        if self.ws("http/config")["active_config_type"] == "pending":
            self.ws("http/config/promote")

    def _running(self) -> bool:
        try:
            return bool(self.rest("GET", "/api/config")["state"] == "RUNNING")
        except (HomeAssistantError, OSError):  # e.g. the REST API not set up yet
            return False

    def _check_alive(self) -> None:
        """Raise with Home Assistant's exit code and the end of its logs if its process has ended."""
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            stdout = self.config / "stdout.log"
            raise RuntimeError(f"Home Assistant exited (code {code}):\n{self.log()[-3000:]}"
                               f"{stdout.read_text(errors='replace')[-3000:] if stdout.exists() else ''}")

    def _refused(self, call: Callable[[], T]) -> T:
        """``call``, retried while Home Assistant refuses connections but runs (it restarts in place, by exec,
        closing its port for a moment); with its logs if it has exited."""
        deadline = time.monotonic() + 120
        while True:
            try:
                return call()
            except ConnectionRefusedError:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def _http_up(self) -> bool:
        self._check_alive()
        try:
            with urllib.request.urlopen(f"{self.url}/api/onboarding", timeout=5):
                return True
        except urllib.error.HTTPError:
            return True  # it answers: an onboarded Home Assistant has no onboarding API
        except OSError:
            return False

    def stop(self) -> int:
        """Stop Home Assistant (SIGTERM to its process, then SIGKILL) and return its exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def _onboard(self) -> str:
        """The onboarding's first step (the owner), then a long-lived access token for the owner."""
        client = f"{self.url}/"
        code = self.rest("POST", "/api/onboarding/users", {**OWNER, "client_id": client}, token="")["auth_code"]
        tokens = self._request("POST", "/auth/token", urllib.parse.urlencode(
            {"grant_type": "authorization_code", "code": code, "client_id": client}).encode(),
            {"Content-Type": "application/x-www-form-urlencoded"})
        token: str = self.ws("auth/long_lived_access_token", client_name="emdc tests", lifespan=30,
                             token=tokens["access_token"])
        return token

    def _request(self, method: str, path: str, data: bytes | None, headers: dict[str, str]) -> Any:
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers, method=method)

        def call() -> Any:
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return json.loads(response.read() or b"null")
            except urllib.error.URLError as error:
                if isinstance(error.reason, ConnectionRefusedError):
                    raise error.reason from None
                raise

        try:
            return self._refused(call)
        except urllib.error.HTTPError as error:
            raise HomeAssistantError(f"{method} {path}: {error.code} {error.read().decode(errors='replace')}"
                                     ) from None

    def rest(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        """A REST call as the owner (``token=""``: unauthenticated); the decoded JSON answer."""
        headers = {"Content-Type": "application/json"}
        if (token := self.token if token is None else token):
            headers["Authorization"] = f"Bearer {token}"
        return self._request(method, path, None if body is None else json.dumps(body).encode(), headers)

    def ws(self, command: str, token: str | None = None, **fields: Any) -> Any:
        """One websocket command as the owner on a connection of its own; its result."""
        reply = self._refused(lambda: self._ws_call(command, token, fields))
        if not reply.get("success"):
            raise HomeAssistantError(f"{command}: {reply.get('error')}")
        return reply["result"]

    def _ws_call(self, command: str, token: str | None, fields: dict[str, Any]) -> Any:
        with connect(f"ws://127.0.0.1:{self.port}/api/websocket", open_timeout=30, max_size=None) as socket:
            assert json.loads(socket.recv(30))["type"] == "auth_required"
            socket.send(json.dumps({"type": "auth", "access_token": token or self.token}))
            reply = json.loads(socket.recv(30))
            if reply["type"] != "auth_ok":
                raise HomeAssistantError(f"websocket authentication: {reply}")
            socket.send(json.dumps({"id": 1, "type": command, **fields}))
            return json.loads(socket.recv(120))

    def connect_mqtt(self, host: str, port: int) -> dict[str, Any]:
        """Add the MQTT integration through its config flow, as a user does in the UI; the loaded entry."""
        flow = self.rest("POST", "/api/config/config_entries/flow", {"handler": "mqtt"})
        assert flow["step_id"] == "broker", flow
        result = self.rest("POST", f"/api/config/config_entries/flow/{flow['flow_id']}", {
            "broker": host, "port": port, "protocol": "5",
            "other_settings": {"set_client_cert": False, "set_ca_cert": "off", "transport": "tcp"}})
        assert result["type"] == "create_entry" and result["result"]["state"] == "loaded", result
        entry: dict[str, Any] = result["result"]
        return entry


@contextlib.contextmanager
def running(config: Path, mqtt_host: str, mqtt_port: int) -> Iterator[HomeAssistant]:
    """A Home Assistant in ``config`` (the cached image) with its MQTT integration on the given broker, stopped
    at the end."""
    instance = HomeAssistant(image(), config)
    instance.start()
    try:
        instance.connect_mqtt(mqtt_host, mqtt_port)
        yield instance
    finally:
        instance.stop()
