"""`emdc edge run` as systemd sees it: READY after set-up, watchdog pings while alive, clean stop."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from tests.support import Names, wait_until


def test_edge_run_notifies_systemd_and_feeds_the_watchdog(names: Names, spawn, tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(0.2)
    received: list[str] = []

    def drain() -> list[str]:
        try:
            while True:
                received.append(sock.recv(256).decode())
        except TimeoutError:
            return received

    env = names.edge_env(GPIOZERO_PIN_FACTORY="mock", NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="1000000")
    edge = spawn(["edge", "run"], env, "edge")
    wait_until(lambda: "READY=1" in drain(), 30, "READY=1")
    wait_until(lambda: drain().count("WATCHDOG=1") >= 3, 10, "three watchdog pings")
    assert (names.edge_dir / "edge.sqlite3").exists(), "READY is sent only once the outbox is open"

    assert edge.stop(signal.SIGTERM) == 0, edge.log()
    assert "STOPPING=1" in drain()
    assert "edge stopped" in edge.log()
    sock.close()


def test_edge_run_opens_every_configured_input_with_its_type(names: Names, spawn, tmp_path: Path) -> None:
    config = tmp_path / "emdc.toml"
    config.write_text('[[inputs]]\npin = 17\nchannel = "active"\ntype = "s0"\n\n'
                      '[[inputs]]\npin = 27\nchannel = "export"\ntype = "s0"\n\n'
                      '[[inputs]]\npin = 22\nchannel = "gas"\ntype = "reed"\n\n'
                      '[[inputs]]\npin = 4\nchannel = "water"\ntype = "led"\n')
    edge = spawn(["edge", "run"], names.edge_env(GPIOZERO_PIN_FACTORY="mock", EMDC_CONFIG=config), "edge")
    wait_until(lambda: "counter store" in edge.log(), 30, "the edge to open its inputs")
    opened = edge.log()
    for line in ("GPIO17: active, s0, 1 Wh per pulse", "GPIO27: export, s0, 1 Wh per pulse",
                 "GPIO22: gas, reed, 0.01 m³ per pulse, pulses >= 80 ms, bounce 20 ms",
                 "GPIO4: water, led, 1 L per pulse, pulses >= 2 ms"):
        assert line in opened
    assert edge.stop(signal.SIGTERM) == 0, edge.log()
