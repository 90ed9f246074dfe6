"""Composition root of ``emdc writer``: RabbitMQ in, ledger and state database, MQTT out."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from backend.amqp_consumer import BatchConsumer, TakeoverRefused
from backend.backfill_runner import FILE_NAME, Backfill, CorrectionStore
from backend.heartbeat import WRITER, Heartbeat
from backend.mqtt_publisher import MqttPublisher
from backend.state_store import exclusive_state_dir
from backend.takeover import claim
from backend.writer import EnergyWriter
from common.config import Config
from common.topology import STATUS_BINDINGS, WRITER_BINDINGS, meter_bindings

log = logging.getLogger("emdc.writer")
# How often a writer that could not ask MQTT whose totals it holds asks again (it counts meanwhile).
CLAIM_RETRY_S = 5.0


def run_writer(config: Config, stop: threading.Event, *, take_over: bool = False) -> None:
    """Run until ``stop`` is set; raises StateError if the saved state is unusable or in use by another writer.

    The writer connects to MQTT only once it holds its queue's lease: a
    standby that stopped would otherwise say ``offline`` for the active one.
    ``take_over`` overrides the check that Home Assistant's totals came from
    this writer's state (:mod:`backend.takeover`).
    """
    with exclusive_state_dir(Path(config.state_dir)):
        mqtt = MqttPublisher(config)
        unchecked = threading.Event()  # whose totals Home Assistant holds could not be asked yet
        writer = EnergyWriter.open(config, sink=GatedSink(mqtt, closed=unchecked.is_set))
        backfill = start_backfill(config, writer, stop)
        if config.discovery != "off":
            mqtt.subscribe(config.ha_status_topic, mqtt.on_home_assistant_birth)
        identity = writer.store.identity()
        started = threading.Event()
        forced = [take_over]  # --take-over counts for one takeover
        next_check = [0.0]

        def check_claim() -> bool:
            """True once this writer may publish; False while MQTT cannot be asked (counting goes on)."""
            refusal = claim(config, identity, forced=forced[0])
            if refusal is None:
                unchecked.set()
                next_check[0] = time.monotonic() + CLAIM_RETRY_S
                return False
            if refusal:
                raise TakeoverRefused(refusal)
            unchecked.clear()
            forced[0] = False
            return True

        def on_active() -> None:
            if writer.store.acquire():  # a shared state: fence the previous writer, count on from its state
                writer.reload()
            check_claim()
            if not started.is_set():
                log.info("active: counting %s into state %s in %s", config.writer_queue(), identity,
                         writer.store.path)
                mqtt.start()
                started.set()
            else:  # active again after losing the lease: another writer may have published meanwhile
                mqtt.publish(mqtt.availability, "online")
                mqtt.request_republish()

        def on_pass() -> None:
            # Values are held back until whose totals Home Assistant holds could be checked, then all sent.
            if unchecked.is_set() and time.monotonic() >= next_check[0] and check_claim():
                mqtt.request_republish()

        consumer = BatchConsumer(config, config.writer_queue(), writer_bindings(config), writer.handle_batch,
                                 heartbeat=Heartbeat.of(config, WRITER),
                                 on_idle=idle_handler(writer, mqtt, config.power_refresh_s, on_pass=on_pass),
                                 trouble=mqtt.trouble, on_active=on_active, on_link=writer.link_changed,
                                 status_bindings=writer_bindings(config, STATUS_BINDINGS))

        def on_availability(payload: bytes) -> None:
            # The last will of a writer that lost its lease (and then died) must not hide the active one.
            if payload == b"offline" and consumer.active.is_set():
                log.info("%s said offline while this writer is active: online again", mqtt.availability)
                mqtt.publish(mqtt.availability, "online")

        mqtt.subscribe(mqtt.availability, on_availability)
        try:
            consumer.run(stop)
        finally:
            if backfill is not None:
                backfill.wake()
            if started.is_set():
                mqtt.stop()
            writer.store.close()
            if writer.save_failed:
                log.warning("writer stopped; the last batch could not be saved to %s and stays in the queue, "
                            "to be counted at the next start", writer.store.path)
            else:
                log.info("writer stopped; state saved in %s", writer.store.path)


def writer_bindings(config: Config, bindings: tuple[str, ...] = WRITER_BINDINGS) -> tuple[str, ...]:
    """What the writer's queue (or its status queue, with :data:`~common.topology.STATUS_BINDINGS`) is bound
    to: everything, or with partitions its own meters' messages alone.

    >>> from common.config import load_config
    >>> writer_bindings(load_config(env={"EMDC_METERS": "main,garage", "EMDC_PARTITIONS": "2"}))[:2]
    ('pulse.main.#', 'control.main.#')
    """
    if config.partitions == 1:
        return bindings
    return meter_bindings(bindings, config.counted_meters())


def start_backfill(config: Config, writer: EnergyWriter, stop: threading.Event) -> Backfill | None:
    """With ``ha_url`` set, a thread correcting Home Assistant's hourly statistics, fed by the writer's saved
    batches (:mod:`backend.backfill_runner`); it ends with ``stop``."""
    if not config.ha_url:
        return None
    backfill = Backfill(CorrectionStore(Path(config.state_dir) / FILE_NAME), config.ha_url, config.ha_token)
    writer.on_saved = backfill.record
    threading.Thread(target=backfill.run, args=(stop,), name="ha-backfill", daemon=True).start()
    log.info("correcting Home Assistant's hourly statistics at %s after backlogs (pending in %s)", config.ha_url,
             backfill.store.path)
    return backfill


class GatedSink:
    """The writer's MQTT publisher, sending nothing while ``closed()`` (the writer then re-publishes everything
    once it opens): a writer taking over must not publish before it knows the totals are its state's."""

    def __init__(self, mqtt: MqttPublisher, closed: Callable[[], bool]) -> None:
        self.mqtt = mqtt
        self.closed = closed

    def publish(self, topic: str, payload: str) -> bool | None:
        return False if self.closed() else self.mqtt.publish(topic, payload)

    def scan_retained(self, filters: Sequence[str]) -> dict[str, str] | None:
        return None if self.closed() else self.mqtt.scan_retained(filters)

    def hold(self, topic: str) -> None:
        self.mqtt.hold(topic)


# How early a wake-up may come and still count as a refresh's turn: callers that wake once a second
# (the consumer's idle pass) come a few milliseconds early or late.
WAKE_JITTER_S = 0.02


def idle_handler(writer: EnergyWriter, mqtt: MqttPublisher | None, refresh_s: float,
                 monotonic: Callable[[], float] = time.monotonic,
                 on_pass: Callable[[], None] = lambda: None) -> Callable[[], None]:
    """What the writer does between batches: re-publish after an MQTT reconnect, let idle power follow the load.

    The power is refreshed every ``refresh_s`` (1 s by default); a caller that
    wakes about that often refreshes at every wake-up, even one that comes a
    few milliseconds early, and after a stall it resumes without catching up.
    """
    last_refresh = monotonic()

    def on_idle() -> None:
        nonlocal last_refresh
        on_pass()
        if mqtt is not None and mqtt.take_republish():
            writer.publish_all()
            return
        now = monotonic()
        if now - last_refresh >= refresh_s - WAKE_JITTER_S:
            last_refresh = now
            writer.refresh_power()
        else:
            writer.release_held_power()

    return on_idle
