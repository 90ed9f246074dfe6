"""RabbitMQ nodes of the tests' own: the machine's RabbitMQ started again under its own node name, ports and data
directory, and stopped (or killed) by its PID; three of them clustered.

Example::

    node = PrivateRabbitMQ(tmp / "node")
    node.start()                     # RabbitMQ's defaults; or start(definitions) as the deployment boots
    node.url()                       # amqp://guest:guest@127.0.0.1:<its port>/%2F
    node.stop()

    cluster = RabbitCluster(tmp / "cluster")
    cluster.start()                  # three nodes, joined
    cluster.nodes[1].kill9()
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pika

from tests.support import free_port, wait_until
from tests.test_deploy import COMPOSE, need


@dataclasses.dataclass
class PrivateRabbitMQ:
    """A RabbitMQ node of its own, booted with ``conf``; stopped by its PID."""

    root: Path
    secrets: Path | None = None
    port: int = dataclasses.field(default_factory=free_port)
    http_port: int = dataclasses.field(default_factory=free_port)
    dist_port: int = dataclasses.field(default_factory=free_port)
    node: str = dataclasses.field(default_factory=lambda: f"emdc-test-{uuid.uuid4().hex[:8]}@localhost")
    # Where the Erlang cookie is: nodes with the same home may form a cluster.
    home: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def bin_dir(self) -> Path:
        return Path(os.path.realpath(need("rabbitmq-server"))).parent

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": os.environ["PATH"], "HOME": str(self.home or self.root / "home"),
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
                "RABBITMQ_MNESIA_BASE": str(self.root / "data"), "RABBITMQ_LOG_BASE": str(self.root / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
                "RABBITMQ_DIST_PORT": str(self.dist_port), "ERL_EPMD_ADDRESS": "127.0.0.1"}

    def start(self, definitions: Path | None = None) -> None:
        """Boot on this node's own ports: with the deployment's 20-emdc.conf, loading ``definitions``, or (None)
        with RabbitMQ's defaults and its guest account."""
        for sub in ("home", "data", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "rabbitmq-env.conf").write_text("")
        (self.root / "enabled_plugins").write_text("[rabbitmq_management].\n")
        conf = ""
        if definitions is not None:
            conf = (COMPOSE / "rabbitmq/20-emdc.conf").read_text()
            conf = re.sub(r"^load_definitions = .*$", f"load_definitions = {definitions}", conf, flags=re.M)
        (self.root / "rabbitmq.conf").write_text(
            f"{conf}\nlisteners.tcp.default = 127.0.0.1:{self.port}\n"
            f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.http_port}\n")
        log = (self.root / "log" / "server.out").open("ab")
        self.proc = subprocess.Popen([self.bin_dir / "rabbitmq-server"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, (self.root / "log/server.out").read_text()
            for port in (self.port, self.http_port):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    return False
            return True
        wait_until(up, 120, "the private RabbitMQ to start")

    def kill9(self) -> None:
        """Kill the node at once, as a power cut would: the script and the Erlang VM it runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([self.bin_dir / "rabbitmqctl", "-n", self.node, "stop"], env=self.env,
                           capture_output=True, timeout=60)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the script and the Erlang VM it runs
            self.proc.wait(timeout=30)

    def ctl(self, *args: str) -> str:
        result = subprocess.run([self.bin_dir / "rabbitmqctl", "-n", self.node, "-q", *args], env=self.env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"rabbitmqctl {' '.join(args)}: {result.stderr}"
        return result.stdout

    def password(self, user: str) -> str:
        assert self.secrets is not None, "a node booted with definitions has passwords"
        meter = user.removeprefix("emdc-edge-")
        path = self.secrets / "edges" / meter if meter != user else self.secrets / user
        return path.read_text().strip()

    def url(self, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/%2F"

    def connect(self, user: str, password: str | None = None) -> pika.BlockingConnection:
        credentials = pika.PlainCredentials(user, self.password(user) if password is None else password)
        return pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", self.port, "/", credentials,
                                                                 connection_attempts=1, socket_timeout=10,
                                                                 blocked_connection_timeout=30))

    def api(self, method: str, path: str, user: str = "emdc-admin") -> tuple[int, Any]:
        """The management HTTP API, as the docs' curl commands use it."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/api/{path}", method=method)
        token = base64.b64encode(f"{user}:{self.password(user)}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                return response.status, json.loads(body) if body else None
        except urllib.error.HTTPError as exc:
            return exc.code, None

    def queue(self, name: str) -> dict[str, Any]:
        status, info = self.api("GET", f"queues/%2F/{urllib.parse.quote(name, safe='')}")
        assert status == 200, f"queue {name}: HTTP {status}"
        return info


class RabbitCluster:
    """Three private nodes sharing an Erlang cookie, the second and third joined to the first."""

    def __init__(self, root: Path, size: int = 3) -> None:
        home = root / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex)
        cookie.chmod(0o400)
        self.nodes = [PrivateRabbitMQ(root / f"node{i}", home=home) for i in range(1, size + 1)]

    def start(self) -> None:
        first, *others = self.nodes
        first.start()
        for node in others:
            node.start()
            node.ctl("stop_app")
            node.ctl("join_cluster", first.node)
            node.ctl("start_app")
        wait_until(lambda: all(n.node in first.ctl("cluster_status") for n in self.nodes), 60,
                   "every node to be in the cluster")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
