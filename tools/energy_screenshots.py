"""Two Energy dashboard screenshots of one outage: as Home Assistant books it, and with EMDC's correction.

A real Home Assistant Core (the image of tests/ha_core.py, with its frontend)
and two meters with a writer each on the test brokers: both get the same
backlog, stamped over the previous hours (a Pi that was offline), and a few
pulses now. One writer has no ``ha_url``; the other corrects the statistics.
Once Home Assistant has compiled the hour the backlog arrived in (the Energy
dashboard shows only compiled hours), each meter in turn is the dashboard's
grid consumption and headless Chromium takes the picture through its
DevTools protocol. It waits for the next hour boundary: up to an hour. As
root (the chroot), with the brokers of the tests running::

    python -m tools.energy_screenshots --out docs/images
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

from common.message import Pulse
from tests.ha_core import HomeAssistant, image
from tests.support import (
    MQTT_HOST,
    MQTT_PORT,
    EmdcProcess,
    Names,
    free_port,
    publish,
    run_emdc,
    wait_until,
    writer_env,
)

HOUR = 3600
S = 1_000_000_000
WH = 10.0  # energy per pulse
# kWh used in each hour before the current one, oldest first: the outage's backlog.
BACKLOG_KWH = (0.4, 0.3, 0.8, 1.2, 0.6, 0.5)
NOW_PULSES = 20
ONBOARDED = {"version": 4, "minor_version": 1, "key": "onboarding",
             "data": {"done": ["user", "core_config", "analytics", "integration"]}}


def backlog(meter: str, hour: int) -> list[Pulse]:
    """The pulses of :data:`BACKLOG_KWH` spread over their hours, then :data:`NOW_PULSES` in the last minutes."""
    stamps: list[int] = []
    for i, kwh in enumerate(BACKLOG_KWH):
        start = hour - (len(BACKLOG_KWH) - i) * HOUR
        count = round(kwh * 1000 / WH)
        stamps += [start * S + (2 * n + 1) * HOUR * S // (2 * count) for n in range(count)]
    now = time.time_ns()
    stamps += [now - (NOW_PULSES - n) * 5 * S for n in range(NOW_PULSES)]
    return [Pulse(meter, "active", "5b07", seq, ts, WH) for seq, ts in enumerate(stamps, 1)]


class Browser:
    """Headless Chromium driven over its DevTools protocol (one page)."""

    def __init__(self, width: int = 1280, height: int = 860) -> None:
        self.port = free_port()
        self.profile = Path(tempfile.mkdtemp(prefix="emdc-chromium-"))
        self.process = subprocess.Popen(
            [shutil.which("chromium") or "chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
             f"--remote-debugging-port={self.port}", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pages = wait_until(self._pages, 30, "Chromium's DevTools")
        self.socket = connect(pages[0]["webSocketDebuggerUrl"], max_size=None).__enter__()
        self._id = 0

    def _pages(self) -> list[dict[str, Any]] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as answer:
                pages = [p for p in json.loads(answer.read()) if p["type"] == "page"]
        except OSError:
            return None
        return pages or None

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.socket.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.socket.recv(60))
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply["result"]
                return result

    def evaluate(self, expression: str) -> Any:
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(30)
        shutil.rmtree(self.profile, ignore_errors=True)


def log_in(browser: Browser, ha: HomeAssistant) -> None:
    """The owner's long-lived token as the frontend's session, as if the owner had logged in."""
    browser.send("Page.navigate", url=f"{ha.url}/")
    time.sleep(3)
    tokens = {"access_token": ha.token, "token_type": "Bearer", "expires_in": 1800, "hassUrl": ha.url,
              "clientId": f"{ha.url}/", "expires": int(time.time() * 1000) + 10 * 365 * 86_400_000,
              "refresh_token": ""}
    browser.evaluate(f"localStorage.setItem('hassTokens', {json.dumps(json.dumps(tokens))})")


def entity_id(ha: HomeAssistant, unique_id: str) -> str | None:
    return next((e["entity_id"] for e in ha.ws("config/entity_registry/list") if e["unique_id"] == unique_id), None)


def show(browser: Browser, ha: HomeAssistant, entity: str, path: Path) -> None:
    """The Energy dashboard of today with ``entity`` as the grid consumption, saved to ``path``."""
    ha.ws("energy/save_prefs", energy_sources=[{"type": "grid", "stat_energy_from": entity,
                                                "cost_adjustment_day": 0}], device_consumption=[])
    browser.send("Page.navigate", url=f"{ha.url}/energy")
    time.sleep(15)  # the dashboard fetches and draws its charts
    browser.screenshot(path)
    print(f"saved {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="emdc-screenshots-"))
    ha = HomeAssistant(image(), work / "ha", extra="frontend:\n")
    ha.start()  # creates the owner; the frontend also wants the other onboarding steps done
    ha.stop()
    (work / "ha" / ".storage" / "onboarding").write_text(json.dumps(ONBOARDED))
    ha.start()
    writers: list[EmdcProcess] = []
    made: list[tuple[Names, dict[str, str]]] = []
    browser = None
    try:
        ha.connect_mqtt(MQTT_HOST, MQTT_PORT)
        assert ha.token is not None
        token = work / "ha.token"
        token.write_text(ha.token)
        entities = {}
        hour = time.time_ns() // S // HOUR * HOUR
        for name, extra in (("plain", {}), ("corrected", {"EMDC_HA_URL": ha.url, "EMDC_HA_TOKEN_FILE": token})):
            names = Names(work / name)
            meter = f"{name}{names.queue.removeprefix('test_')[:4]}"
            env = writer_env(names, EMDC_DISCOVERY="device", EMDC_DISCOVERY_PREFIX="homeassistant",
                             EMDC_METER_ID=meter, EMDC_HA_BIRTH_DELAY_S="0.2", **extra)
            writers.append(EmdcProcess(["writer"], env, work / f"writer-{name}.log"))
            entities[name] = wait_until(partial(entity_id, ha, f"emdc_{meter}_active_energy"), 60,
                                        f"Home Assistant to have meter {meter}")
            publish(names.exchange, backlog(meter, hour))
            made.append((names, env))
        wait_until(lambda: "statistics of" in writers[1].log(), 6 * 60, "the correction", interval=5)
        browser = Browser()
        log_in(browser, ha)
        browser.send("Page.navigate", url=f"{ha.url}/energy")
        time.sleep(5)
        if not browser.evaluate("location.pathname").startswith("/energy"):  # better now than after the hour
            raise RuntimeError(f"the frontend did not take the session: {browser.evaluate('location.href')}")
        compiled = hour + HOUR + 30
        print(f"waiting for Home Assistant to compile the hour of the backlog (until {time.ctime(compiled)})",
              flush=True)
        time.sleep(max(0.0, compiled - time.time()))
        show(browser, ha, entities["plain"], args.out / "energy-outage-as-booked.png")
        show(browser, ha, entities["corrected"], args.out / "energy-outage-corrected.png")
    finally:
        if browser is not None:
            browser.close()
        for writer in writers:
            writer.stop()
        for names, env in made:  # the meters' discovery and values off the shared Mosquitto
            run_emdc(["ha", "remove"], env)
            names.remove()
        ha.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
