"""Composition root of ``emdc writer``: RabbitMQ in, ledger and state file, MQTT out."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from backend.amqp_consumer import BatchConsumer, TakeoverRefused
from backend.heartbeat import WRITER, Heartbeat
from backend.mqtt_publisher import MqttPublisher
from backend.state_store import exclusive_state_dir
from backend.takeover import claim
from backend.writer import EnergyWriter
from common.config import Config
from common.topology import WRITER_BINDINGS

log = logging.getLogger("emdc.writer")


def run_writer(config: Config, stop: threading.Event, *, take_over: bool = False) -> None:
    """Run until ``stop`` is set; raises StateError if the saved state is unusable or in use by another writer.

    The writer connects to MQTT only once it holds its queue's lease: a
    standby that stopped would otherwise say ``offline`` for the active one.
    ``take_over`` overrides the check that Home Assistant's totals came from
    this writer's state (:mod:`backend.takeover`).
    """
    with exclusive_state_dir(Path(config.state_dir)):
        mqtt = MqttPublisher(config)
        writer = EnergyWriter.open(config, sink=mqtt)
        if config.discovery != "off":
            mqtt.subscribe(config.ha_status_topic, mqtt.on_home_assistant_birth)
        identity = writer.store.identity()
        started = threading.Event()

        def on_active() -> None:
            refusal = claim(config, identity, forced=take_over)
            if refusal:
                raise TakeoverRefused(refusal)
            if not started.is_set():
                log.info("active: counting %s into state %s in %s", config.queue, identity, writer.store.path)
                mqtt.start()
                started.set()

        consumer = BatchConsumer(config, config.queue, WRITER_BINDINGS, writer.handle_batch,
                                 heartbeat=Heartbeat.of(config, WRITER),
                                 on_idle=idle_handler(writer, mqtt, config.power_refresh_s), trouble=mqtt.trouble,
                                 on_active=on_active)

        def on_availability(payload: bytes) -> None:
            # The last will of a writer that lost its lease (and then died) must not hide the active one.
            if payload == b"offline" and consumer.active.is_set():
                log.info("%s said offline while this writer is active: online again", mqtt.availability)
                mqtt.publish(mqtt.availability, "online")

        mqtt.subscribe(mqtt.availability, on_availability)
        try:
            consumer.run(stop)
        finally:
            if started.is_set():
                mqtt.stop()
            if writer.save_failed:
                log.warning("writer stopped; the last batch could not be saved to %s and stays in the queue, "
                            "to be counted at the next start", writer.store.path)
            else:
                log.info("writer stopped; state saved in %s", writer.store.path)


# How early a wake-up may come and still count as a refresh's turn: callers that wake once a second
# (the consumer's idle pass) come a few milliseconds early or late.
WAKE_JITTER_S = 0.02


def idle_handler(writer: EnergyWriter, mqtt: MqttPublisher | None, refresh_s: float,
                 monotonic: Callable[[], float] = time.monotonic) -> Callable[[], None]:
    """What the writer does between batches: re-publish after an MQTT reconnect, let idle power follow the load.

    The power is refreshed every ``refresh_s`` (1 s by default); a caller that
    wakes about that often refreshes at every wake-up, even one that comes a
    few milliseconds early, and after a stall it resumes without catching up.
    """
    last_refresh = monotonic()

    def on_idle() -> None:
        nonlocal last_refresh
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
