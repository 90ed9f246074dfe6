"""The edge's status message and what the writer makes of it: strict decoding, liveness, diagnostics, discovery."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backend.batch import Delivery
from backend.discovery import DIAGNOSTICS, Discovery
from backend.edge_watch import EdgeLiveness
from backend.memory_transport import MemorySink
from backend.writer import EnergyWriter
from common.channels import CHANNELS
from common.config import load_config
from common.message import (
    MAX_BODY_BYTES,
    ChannelStatus,
    MessageError,
    Status,
    decode_status,
    decode_status_routed,
    encode_status,
)
from edge.status_report import StatusSchedule, cpu_temperature
from tests.support import T0, S, deliveries, pulse

counters = st.builds(ChannelStatus, st.from_regex(r"[0-9a-f]{1,64}", fullmatch=True),
                     st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1))
statuses = st.builds(
    Status, st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True), st.integers(0, 2**63 - 1),
    st.integers(0, 2**63 - 1), st.from_regex(r"[A-Za-z0-9.+_-]{1,40}", fullmatch=True), st.sampled_from(["up", "down"]),
    st.integers(0, 2**63 - 1), st.dictionaries(st.sampled_from(CHANNELS), counters),
    st.none() | st.booleans(), st.none() | st.integers(0, 2**63 - 1), st.none() | st.integers(0, 2**63 - 1),
    st.none() | st.floats(-100, 200))


@given(statuses)
def test_status_roundtrips_within_the_body_limit(status: Status) -> None:
    body = encode_status(status)
    assert len(body) <= MAX_BODY_BYTES
    assert decode_status_routed(body, f"status.{status.meter}") == status


def doc(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"v": 1, "type": "status", "meter": "main", "ts_ns": 1, "uptime_s": 2, "version": "0.1.0",
                            "link": "up", "outbox": 0, "channels": {"active": {"epoch": "ab", "seq": 1, "rejected": 0}}}
    return {key: value for key, value in (base | changes).items() if value is not ...}


@pytest.mark.parametrize(("changes", "problem"), [
    ({"type": "pulse"}, "type must be 'status'"),
    ({"v": 2}, "unsupported schema version"),
    ({"outbox": ...}, "missing field(s) outbox"),
    ({"extra": 1}, "unknown field(s) extra"),
    ({"outbox": -1}, "outbox must be an integer"),
    ({"uptime_s": True}, "uptime_s must be an integer"),
    ({"link": "sideways"}, "link must be one of up, down"),
    ({"version": "x" * 41}, "version must be 1-40 characters"),
    ({"cpu_c": 1000}, "cpu_c must be a number from -100 to 200"),
    ({"synced": "yes"}, "synced must be true or false"),
    ({"channels": {"heat": {"epoch": "ab", "seq": 1, "rejected": 0}}}, "channel must be one of"),
    ({"channels": {"active": {"epoch": "ab", "seq": 1}}}, "must hold exactly epoch, seq and rejected"),
    ({"channels": {"active": {"epoch": "AB", "seq": 1, "rejected": 0}}}, "epoch must be 1-64 lowercase hex"),
    ({"channels": [1]}, "channels must be an object"),
])
def test_a_bad_status_is_refused_with_what_is_wrong(changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(MessageError, match=None) as refused:
        decode_status(json.dumps(doc(**changes)).encode())
    assert problem in str(refused.value)


def test_a_status_under_another_meters_key_is_refused() -> None:
    with pytest.raises(MessageError, match="does not match the body's meter"):
        decode_status_routed(json.dumps(doc()).encode(), "status.garage")


@given(st.lists(st.tuples(st.integers(0, 10_000), st.booleans()), max_size=40), st.integers(1, 500))
def test_liveness_says_offline_exactly_after_the_timeout_of_silence_and_only_for_edges_with_a_status(
        events: list[tuple[int, bool]], timeout_s: int) -> None:
    live = EdgeLiveness(timeout_s)
    heard: int | None = None  # last time heard, once a status came
    now = 0
    for step, status in events:
        now += step
        for _meter, online, silent_s, _first in live.changes(now * S):
            assert heard is not None and online == (now - heard <= timeout_s) and silent_s == now - heard
        live.heard("main", now * S, status=status)
        if status or heard is not None:
            heard = now
    assert live.judged("main") == (heard is not None)
    live.changes(now * S + timeout_s * S)
    assert live.online("main") is (None if heard is None else True)
    live.changes(now * S + timeout_s * S + 1)
    assert live.online("main") is (None if heard is None else False)


def test_the_schedule_sends_at_its_interval_and_at_once_on_a_change_of_clock_or_link() -> None:
    schedule = StatusSchedule(30)
    schedule.sent(0, synced=True)
    assert not schedule.due(29.9, synced=True)
    assert schedule.due(1, synced=None)
    schedule.link_up()
    assert schedule.due(1, synced=True)


def test_cpu_temperature_is_read_in_millidegrees_and_left_out_when_odd(tmp_path: Path) -> None:
    path = tmp_path / "temp"
    path.write_text("48312\n")
    assert cpu_temperature(path) == 48.3
    path.write_text("garbage")
    assert cpu_temperature(path) is None
    path.write_text("900000")
    assert cpu_temperature(path) is None


def status_delivery(tag: int, seq: int, *, meter: str = "main", user_id: str = "", outbox: int = 0) -> Delivery:
    status = Status(meter, T0, 10, "0.1.0", "up", outbox, {"active": ChannelStatus("e1", seq, 3)}, synced=True)
    return Delivery(tag, f"status.{meter}", encode_status(status), user_id=user_id)


def writer_at(tmp_path: Path, now: list[int], **env: str) -> tuple[EnergyWriter, MemorySink]:
    config = load_config(env={"EMDC_STATE_DIR": str(tmp_path), "EMDC_DISCOVERY": "device",
                              "EMDC_EDGE_TIMEOUT_S": "90", **env})
    sink = MemorySink()
    return EnergyWriter.open(config, sink=sink, clock=lambda: now[0]), sink


def test_a_status_never_changes_a_total_and_shows_the_pulses_pending(tmp_path: Path) -> None:
    now = [T0 + 10 * S]
    writer, sink = writer_at(tmp_path, now)
    assert writer.handle_batch(deliveries(pulse(1, 0), pulse(2, 1), pulse(3, 2))) == []
    assert writer.handle_batch([status_delivery(1, 9, outbox=6)]) == []
    assert writer.ledger.channel("main", "active").total_uwh == 3_000_000
    assert json.loads(sink.retained["home/energy/edge_status"]) | {"version": ""} == {
        "pending": 6, "outbox": 6, "rejected": 3, "synced": "ON", "version": "", "cpu_c": None, "last_pulse": None}
    assert sink.retained["home/energy/edge"] == "online"
    config = json.loads(sink.retained["homeassistant/device/emdc_main/config"])
    assert set(config["components"]) >= {d.component for d in DIAGNOSTICS}


def test_a_status_from_another_pis_account_or_an_unknown_meter_is_held_back(tmp_path: Path) -> None:
    writer, sink = writer_at(tmp_path, [T0])
    dead = writer.handle_batch([status_delivery(1, 1, user_id="emdc-edge-garage"),
                                status_delivery(2, 1, meter="garage", user_id="emdc-edge-garage"),
                                Delivery(3, "status.main", b"{}")])
    assert [(d.delivery.tag, d.reason.split(",")[0]) for d in dead] == [
        (1, "published by emdc-edge-garage"), (2, "status of meter 'garage'"), (3, "unsupported schema version v=None "
                                                                               "(expected 1)")]
    assert "home/energy/edge" not in sink.retained and not writer.ledger.is_known("garage")


def test_the_writer_logs_each_change_of_an_edge_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    now = [T0]
    writer, sink = writer_at(tmp_path, now)
    writer.handle_batch([status_delivery(1, 0)])
    caplog.set_level(logging.INFO, "emdc.writer")
    for seconds in (60, 90, 91, 120):
        now[0] = T0 + seconds * S
        writer.refresh_power()
    assert sink.retained["home/energy/edge"] == "offline"
    writer.handle_batch(deliveries(pulse(1, 121)))  # a pulse is a sign of life too
    lines = [r.getMessage() for r in caplog.records if "edge" in r.getMessage()]
    assert lines[0].startswith("meter main: edge offline (nothing for 91 s)") and lines[1:] == ["meter main: edge back"]
    assert sink.retained["home/energy/edge"] == "online"


@pytest.mark.parametrize("style", ["device", "entity"])
def test_with_an_edge_the_rates_need_it_online_and_the_totals_only_the_writer(style: str) -> None:
    messages = Discovery("ha", "home/energy", style).messages("garage", ("active",), edge=True)
    if style == "device":
        components = json.loads(messages[0][1])["components"]
        assert "availability_topic" not in json.loads(messages[0][1])
    else:
        components = {topic.split("/")[3]: json.loads(payload) for topic, payload in messages}
        assert "ha/binary_sensor/emdc_garage/edge_connectivity/config" in dict(messages)
    writer, edge = {"topic": "home/energy/status"}, {"topic": "home/energy/garage/edge"}
    assert components["active_power"]["availability"] == [writer, edge]
    assert components["active_energy"]["availability"] == [writer]
    assert components["edge_connectivity"]["state_topic"] == "home/energy/garage/edge"
    assert components["edge_cpu_temperature"]["device_class"] == "temperature"
    assert all(components[d.component]["entity_category"] == "diagnostic" for d in DIAGNOSTICS)
    # The writer's MQTT link reads the writer's availability and has none of its own: off, not unavailable, when
    # the writer is gone. Its RabbitMQ link and dead letters need the writer, as every other entity.
    link = components.pop("writer_mqtt")
    assert link["state_topic"] == "home/energy/status" and "availability" not in link
    assert components["writer_rabbitmq"]["state_topic"] == "home/energy/writer_health"
    assert all(c["availability_mode"] == "all" for c in components.values())


class RetainingSink(MemorySink):
    """A broker that retains what is published and tells it on a scan, as Mosquitto does."""

    def scan_retained(self, filters: Sequence[str]) -> dict[str, str]:
        return {topic: payload for topic, payload in self.retained.items()
                if any(mqtt.topic_matches_sub(f, topic) for f in filters)}

    def hold(self, topic: str) -> None:
        pass


def test_a_restarted_writer_judges_an_edge_announced_before_even_if_it_stays_silent(tmp_path: Path) -> None:
    now, sink = [T0], RetainingSink()
    config = load_config(env={"EMDC_STATE_DIR": str(tmp_path), "EMDC_DISCOVERY": "device", "EMDC_EDGE_TIMEOUT_S": "90"})
    first = EnergyWriter.open(config, sink=sink, clock=lambda: now[0])
    first.handle_batch([*deliveries(pulse(1, 0)), status_delivery(2, 1)])
    first.store.close()
    assert sink.retained["home/energy/edge"] == "online"

    now[0] += 600 * S  # the Pi died while no writer ran
    second = EnergyWriter.open(config, sink=sink, clock=lambda: now[0])
    second.publish_all()
    config_doc = json.loads(sink.retained["homeassistant/device/emdc_main/config"])
    assert "edge_connectivity" in config_doc["components"]  # its entities stay
    now[0] += 91 * S
    second.refresh_power()
    assert sink.retained["home/energy/edge"] == "offline"
