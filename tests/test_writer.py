"""EnergyWriter with an in-memory sink and an injectable clock: what gets published, and when."""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.batch import Delivery
from backend.memory_transport import MemorySink
from backend.writer import EnergyWriter
from common.config import load_config
from common.message import SetTotal, encode, encode_set_total
from tests.support import T0, S, deliveries, pulse, saved_total_uwh


class FakeClock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class RecordingSink(MemorySink):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str]] = []

    def publish(self, topic: str, payload: str) -> None:
        super().publish(topic, payload)
        self.log.append((topic, payload))


def make_writer(tmp_path: Path, clock: FakeClock, **settings_: str) -> tuple[EnergyWriter, RecordingSink]:
    env = {"EMDC_STATE_DIR": str(tmp_path), "EMDC_DISCOVERY": "off", **settings_}
    sink = RecordingSink()
    return EnergyWriter.open(load_config(env=env), sink=sink, clock=clock), sink


def test_a_batch_is_counted_persisted_and_published_once(tmp_path: Path) -> None:
    clock = FakeClock(T0 + 3 * S)
    writer, sink = make_writer(tmp_path, clock)
    dead = writer.handle_batch(deliveries(pulse(1, 0), pulse(2, 1), pulse(3, 2)))
    assert dead == []
    # A fresh channel's 0 first: Home Assistant takes the first value it sees as the zero point.
    assert sink.log == [("home/energy/active_energy", "0"), ("home/energy/active_energy", "0.003"),
                        ("home/energy/active_power", "3.600")]
    assert saved_total_uwh(tmp_path) == 3_000_000


def test_malformed_and_implausible_messages_are_returned_as_dead_letters(tmp_path: Path) -> None:
    writer, sink = make_writer(tmp_path, FakeClock())
    batch = [Delivery(1, "pulse.main.active", b"{"), *deliveries(pulse(1, 0)),
             Delivery(3, "pulse.main.active", encode(pulse(5000, 1)))]
    dead = writer.handle_batch(batch)
    assert [d.delivery.tag for d in dead] == [1, 3]
    assert "not JSON" in dead[0].reason and "kW limit" in dead[1].reason
    assert sink.retained["home/energy/active_energy"] == "0.001"


def test_nothing_is_published_at_start_until_asked(tmp_path: Path) -> None:
    writer, _ = make_writer(tmp_path, FakeClock())
    writer.handle_batch(deliveries(pulse(1, 0)))
    again, sink = make_writer(tmp_path, FakeClock())
    assert sink.log == []
    again.publish_all()
    assert sink.retained["home/energy/active_energy"] == "0.001"


def test_idle_power_decays_as_an_upper_bound_then_drops_to_zero(tmp_path: Path) -> None:
    clock = FakeClock(T0 + S)
    writer, sink = make_writer(tmp_path, clock, EMDC_POWER_TIMEOUT_S="300")
    writer.handle_batch(deliveries(pulse(1, 0), pulse(2, 1)))  # 1 Wh per second = 3.6 kW
    assert sink.retained["home/energy/active_power"] == "3.600"

    clock.now = T0 + S + S // 2  # idle 0.5 s: the bound (7.2 kW) is above the measurement
    writer.refresh_power()
    assert sink.retained["home/energy/active_power"] == "3.600"

    clock.now = T0 + 37 * S  # idle 36 s: no more than 1 Wh in 36 s = 100 W, and the load fell: 30 % of it
    writer.refresh_power()
    assert sink.retained["home/energy/active_power"] == "0.030"

    clock.now = T0 + 301 * S
    writer.refresh_power()
    assert sink.retained["home/energy/active_power"] == "0.000"
    published = [float(v) for t, v in sink.log if t.endswith("active_power")]
    assert published == sorted(published, reverse=True), "an idle channel's power only goes down"


def test_refresh_publishes_only_changes(tmp_path: Path) -> None:
    clock = FakeClock(T0 + S)
    writer, sink = make_writer(tmp_path, clock)
    writer.handle_batch(deliveries(pulse(1, 0), pulse(2, 1)))
    before = len(sink.log)
    writer.refresh_power()
    writer.refresh_power()
    assert len(sink.log) == before


def test_after_a_backlog_only_the_present_power_is_published(tmp_path: Path) -> None:
    clock = FakeClock(T0 + 3600 * S)  # the pulses below are an hour old
    writer, sink = make_writer(tmp_path, clock)
    writer.handle_batch(deliveries(*(pulse(i, i) for i in range(1, 100))))
    assert [v for t, v in sink.log if t.endswith("active_power")] == ["0.000"]


def test_calibration_sets_the_total_in_order_and_logs_old_and_new(tmp_path: Path, caplog) -> None:
    writer, sink = make_writer(tmp_path, FakeClock())
    command = SetTotal("main", "active", Decimal("12345.678"), T0, "c1")
    batch = [*deliveries(pulse(1, 0)), Delivery(2, command.routing_key, encode_set_total(command)),
             Delivery(3, "pulse.main.active", encode(pulse(2, 1)))]
    with caplog.at_level(logging.WARNING):
        assert writer.handle_batch(batch) == []
    assert sink.retained["home/energy/active_energy"] == "12345.679"
    assert "calibrated main/active: total 0.001 -> 12345.678" in caplog.text
    # Redelivered after a crash before the ack: the calibration must not reset the total again.
    assert writer.handle_batch(batch) == []
    assert sink.retained["home/energy/active_energy"] == "12345.679"


def test_bad_control_message_is_dead_lettered(tmp_path: Path) -> None:
    writer, _ = make_writer(tmp_path, FakeClock())
    dead = writer.handle_batch([Delivery(1, "control.main", b'{"v": 1, "type": "reset"}')])
    assert len(dead) == 1 and "unknown control message type" in dead[0].reason


def test_two_meters_get_their_own_topics_and_devices(tmp_path: Path) -> None:
    writer, sink = make_writer(tmp_path, FakeClock(T0 + S), EMDC_DISCOVERY="device", EMDC_METERS="main,garage")
    writer.handle_batch(deliveries(pulse(1, 0), pulse(1, 0, meter="garage", epoch="e2")))
    assert sink.retained["home/energy/active_energy"] == "0.001"
    assert sink.retained["home/energy/garage/active_energy"] == "0.001"
    assert "homeassistant/device/emdc_main/config" in sink.retained
    garage = json.loads(sink.retained["homeassistant/device/emdc_garage/config"])
    assert garage["components"]["active_energy"]["state_topic"] == "home/energy/garage/active_energy"


def test_discovery_is_announced_once_and_again_on_publish_all(tmp_path: Path) -> None:
    writer, sink = make_writer(tmp_path, FakeClock(T0 + 2 * S), EMDC_DISCOVERY="device")
    writer.handle_batch(deliveries(pulse(1, 0)))
    writer.handle_batch(deliveries(pulse(2, 1)))
    topic = "homeassistant/device/emdc_main/config"
    assert [t for t, _ in sink.log].count(topic) == 1
    writer.publish_all()
    assert [t for t, _ in sink.log].count(topic) == 2
    # Discovery goes out before the values it describes.
    assert [t for t, _ in sink.log].index(topic) < [t for t, _ in sink.log].index("home/energy/active_energy")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=20), min_size=1,
                max_size=10))
def test_published_energy_never_goes_down(tmp_path_factory: pytest.TempPathFactory, batches: list[list[int]]) -> None:
    clock = FakeClock()
    writer, sink = make_writer(tmp_path_factory.mktemp("w"), clock)
    clock.now += 3600 * S  # the meter was admitted an hour before: 60 pulses are plausible
    for batch in batches:  # arbitrary seqs, duplicates and reorderings included
        writer.handle_batch(deliveries(*(pulse(seq, seq) for seq in batch)))
    energies = [Decimal(v) for t, v in sink.log if t.endswith("active_energy")]
    assert energies == sorted(energies)
    assert energies[-1] == Decimal(max(max(b) for b in batches)) / 1000


def test_a_failed_save_rolls_the_ledger_back_so_the_redelivery_counts(tmp_path: Path, monkeypatch) -> None:
    writer, sink = make_writer(tmp_path, FakeClock())
    batch = deliveries(pulse(1, 0), pulse(2, 1))

    def disk_full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.store, "save", disk_full)
    with pytest.raises(OSError):
        writer.handle_batch(batch)
    assert sink.log == [], "nothing is published for a batch that was not saved"
    assert writer.save_failed, "a stop now must not claim the state was saved"
    monkeypatch.undo()
    writer.handle_batch(batch)  # the broker redelivers the unacknowledged batch
    assert not writer.save_failed
    assert saved_total_uwh(tmp_path) == 2_000_000


@pytest.mark.parametrize("routing_key", ["pulse.garage.active", "pulse.main.reactive", "pulse.main", "control.main"])
def test_a_body_naming_another_meter_or_channel_than_its_routing_key_is_held_back(tmp_path: Path,
                                                                                 routing_key: str) -> None:
    # Broker permissions are written on routing keys: the body must not name something else.
    writer, sink = make_writer(tmp_path, FakeClock(T0 + S))
    [dead] = writer.handle_batch([Delivery(1, routing_key, encode(pulse(1, 0)))])
    if routing_key.startswith("control."):
        assert "control message" in dead.reason
    else:
        assert f"routing key '{routing_key}' does not match the body's meter and channel" in dead.reason
    assert writer.ledger.channel("main", "active").total_uwh == 0 and sink.log == []


def test_a_pulse_from_another_pis_account_is_held_back(tmp_path: Path) -> None:
    # RabbitMQ vouches for user_id; a Pi's account is named after its meter.
    writer, _ = make_writer(tmp_path, FakeClock(T0 + S))
    body = encode(pulse(1, 0))
    dead = writer.handle_batch([Delivery(1, "pulse.main.active", body, user_id="emdc-edge-garage"),
                                Delivery(2, "pulse.main.active", body, user_id="emdc-edge-main"),
                                Delivery(3, "pulse.main.active", body, user_id="emdc-edge")])
    assert [(d.delivery.tag, d.reason) for d in dead] == [
        (1, "published by emdc-edge-garage, the account of meter 'garage', not of meter 'main'")]
    assert writer.ledger.channel("main", "active").total_uwh == 1_000_000


def test_the_consumer_hands_the_publishing_account_to_the_handler() -> None:
    import pika

    from backend.amqp_consumer import delivery

    method = pika.spec.Basic.Deliver(delivery_tag=7, exchange="EMDC", routing_key="pulse.main.active")
    got = delivery(method, pika.BasicProperties(user_id="emdc-edge-main"), b"{}")
    assert (got.tag, got.routing_key, got.user_id, got.readmitted) == (7, "pulse.main.active", "emdc-edge-main", False)
    assert delivery(method, pika.BasicProperties(), b"{}").user_id == ""


def test_a_flood_of_bad_messages_is_one_log_line_per_batch(tmp_path: Path, caplog) -> None:
    writer, _ = make_writer(tmp_path, FakeClock())
    with caplog.at_level(logging.WARNING, logger="emdc.writer"):
        dead = writer.handle_batch([Delivery(i, "pulse.main.active", b"{") for i in range(1, 501)])
    assert len(dead) == 500
    [line] = [r.getMessage() for r in caplog.records if "held back" in r.getMessage()]
    assert line.startswith("held back 500 messages of a batch in the dead-letter queue (1 kind(s) of reason), "
                           "the first, 1 (pulse.main.active): body is not JSON")
