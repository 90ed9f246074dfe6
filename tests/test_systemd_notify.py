"""edge.systemd_notify against a real AF_UNIX datagram socket, as systemd provides it."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.systemd_notify import READY, WATCHDOG, notify, watchdog_interval


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket playing systemd's part, and its NOTIFY_SOCKET value."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        yield sock, str(path)


def test_notify_sends_one_datagram_to_a_path_socket(receiver, monkeypatch):
    sock, address = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert notify(READY) is True
    assert sock.recv(4096) == b"READY=1"
    assert notify(f"{WATCHDOG}\nSTATUS=42 pulses") is True
    assert sock.recv(4096) == b"WATCHDOG=1\nSTATUS=42 pulses"


def test_notify_supports_the_abstract_namespace():
    name = f"emdc-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert notify("READY=1", env={"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"READY=1"


def test_notify_is_a_no_op_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify(READY) is False
    assert notify(READY, env={"NOTIFY_SOCKET": ""}) is False


def test_notify_reports_an_unreachable_socket_without_raising(tmp_path, caplog):
    assert notify(READY, env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert "sd_notify" in caplog.text
    assert notify(READY, env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_notify_does_not_leak_file_descriptors(receiver):
    sock, address = receiver
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        assert notify(WATCHDOG, env={"NOTIFY_SOCKET": address})
        sock.recv(4096)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env, expected):
    assert watchdog_interval(env=env) == expected


def test_watchdog_interval_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 2.0
