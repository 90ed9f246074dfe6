"""Home Assistant's websocket API, as far as correcting statistics needs it: a thin adapter, no decisions.

One connection per pass, authenticated with a long-lived access token; each
method is one or two commands. Errors are :class:`HomeAssistantUnreachable`
(no connection, refused token, timeout) or :class:`HomeAssistantRefused` (a
command answered with an error), never the token. Example::

    with HomeAssistantClient("http://homeassistant.local:8123", token) as ha:
        ha.statistic_id("emdc_main_active_energy")
"""

from __future__ import annotations

import contextlib
import json
import types
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from websockets.exceptions import WebSocketException
from websockets.sync.client import ClientConnection, connect

from backend.backfill import HOUR_S, Row

TIMEOUT_S = 30.0


class HomeAssistantUnreachable(OSError):
    """Home Assistant cannot be reached or does not accept the token; the text says which."""


class HomeAssistantRefused(RuntimeError):
    """Home Assistant answered a command with an error."""


def websocket_url(url: str) -> str:
    """The websocket API's address for Home Assistant's ``url``.

    >>> websocket_url("https://ha.example:8123/"), websocket_url("http://127.0.0.1:8123")
    ('wss://ha.example:8123/api/websocket', 'ws://127.0.0.1:8123/api/websocket')
    """
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="wss" if parts.scheme == "https" else "ws",
                                     path=parts.path.rstrip("/") + "/api/websocket"))


def _iso(start_s: int) -> str:
    return datetime.fromtimestamp(start_s, UTC).isoformat()


class HomeAssistantClient:
    """A websocket session with Home Assistant as the token's user (an administrator: importing statistics
    requires one). One connection per ``with`` block::

        with HomeAssistantClient(url, token) as ha:
            hours, recent = ha.view("sensor.emdc_main_meter_active_energy", since_s)
    """

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self._token = token
        self._socket: ClientConnection | None = None
        self._stack = contextlib.ExitStack()
        self._id = 0

    def __enter__(self) -> HomeAssistantClient:
        try:
            self._socket = self._stack.enter_context(
                connect(websocket_url(self.url), open_timeout=TIMEOUT_S, max_size=None))
            self._expect("auth_required")
            self._socket.send(json.dumps({"type": "auth", "access_token": self._token}))
            if self._receive().get("type") != "auth_ok":
                raise HomeAssistantUnreachable("Home Assistant refused the access token (ha_token)")
        except (OSError, TimeoutError, WebSocketException) as exc:
            self.close()
            raise HomeAssistantUnreachable(f"{type(exc).__name__}: {exc}") from None
        except HomeAssistantUnreachable:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: types.TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._socket = None
        self._stack.close()

    def _receive(self) -> dict[str, Any]:
        assert self._socket is not None
        reply: dict[str, Any] = json.loads(self._socket.recv(TIMEOUT_S))
        return reply

    def _expect(self, kind: str) -> None:
        if (reply := self._receive()).get("type") != kind:
            raise HomeAssistantUnreachable(f"expected {kind} from Home Assistant, got {reply.get('type')}")

    def command(self, kind: str, **fields: Any) -> Any:
        """Run one command; its result."""
        if self._socket is None:
            raise HomeAssistantUnreachable("not connected")
        self._id += 1
        try:
            self._socket.send(json.dumps({"id": self._id, "type": kind, **fields}))
            while (reply := self._receive()).get("id") != self._id:
                continue
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise HomeAssistantUnreachable(f"{kind}: {type(exc).__name__}: {exc}") from None
        if not reply.get("success"):
            raise HomeAssistantRefused(f"{kind}: {reply.get('error')}")
        return reply["result"]

    def statistic_id(self, unique_id: str) -> str | None:
        """The entity id of the MQTT entity with ``unique_id`` (None: Home Assistant has no such entity)."""
        for entry in self.command("config/entity_registry/list"):
            if entry.get("platform") == "mqtt" and entry.get("unique_id") == unique_id:
                return str(entry["entity_id"])
        return None

    def metadata(self, statistic_id: str) -> dict[str, Any] | None:
        """The statistic's metadata as ``recorder/import_statistics`` takes it (None: no statistics yet)."""
        found = self.command("recorder/get_statistics_metadata", statistic_ids=[statistic_id])
        if not found:
            return None
        meta = found[0]
        return {"has_sum": meta["has_sum"], "mean_type": meta["mean_type"], "name": meta["name"],
                "source": meta["source"], "statistic_id": statistic_id, "unit_class": meta["unit_class"],
                "unit_of_measurement": meta["statistics_unit_of_measurement"]}

    def rows(self, statistic_id: str, since_s: int, period: str = "hour") -> list[Row]:
        """The statistic's rows with a sum from ``since_s`` on (``period`` "hour" or "5minute")."""
        found = self.command("recorder/statistics_during_period", start_time=_iso(since_s),
                             statistic_ids=[statistic_id], period=period, types=["sum", "state", "last_reset"])
        return [Row(round(r["start"] / 1000), float(r["sum"]), r.get("state"),
                    None if r.get("last_reset") is None else r["last_reset"] / 1000)
                for r in found.get(statistic_id, []) if r.get("sum") is not None]

    def view(self, statistic_id: str, since_s: int) -> tuple[dict[int, Row], dict[int, float]]:
        """The compiled hourly rows from ``since_s`` on, and for each later hour the sum its 5-minute rows
        reached so far (what :meth:`~backend.backfill.CorrectionPlanner.plan` takes)."""
        hours = {row.start_s: row for row in self.rows(statistic_id, since_s)}
        after = max(hours, default=since_s - HOUR_S) + HOUR_S
        recent: dict[int, float] = {}
        for row in self.rows(statistic_id, after, period="5minute"):
            recent[row.start_s // HOUR_S * HOUR_S] = row.sum  # oldest first: the last one of each hour stays
        return hours, recent

    def import_rows(self, metadata: Mapping[str, Any], rows: Sequence[Row]) -> None:
        """Write ``rows`` (absolute: the same rows again change nothing). Home Assistant queues the import."""
        stats = []
        for row in rows:
            stat: dict[str, Any] = {"start": _iso(row.start_s), "sum": row.sum}
            if row.state is not None:
                stat["state"] = row.state
            if row.last_reset_s is not None:
                stat["last_reset"] = datetime.fromtimestamp(row.last_reset_s, UTC).isoformat()
            stats.append(stat)
        self.command("recorder/import_statistics", metadata=dict(metadata), stats=stats)
