"""``emdc simulate``: a simulated meter, the edge and the writer in one process.

This is the one place where the two sides are composed; nothing else imports
both. The command itself is declared in :mod:`emdc.cli`.

Each side uses the real broker when one is configured (``EMDC_AMQP_URL``,
``EMDC_MQTT_HOST``) and an embedded in-process stand-in otherwise; the edge,
counting, power and state code is the production code either way.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from backend.heartbeat import WRITER, Heartbeat
from backend.memory_transport import MemoryQueue, MemorySink
from backend.mqtt_publisher import MqttPublisher
from backend.service import idle_handler
from backend.writer import EnergyWriter
from common.config import Config
from common.topology import STATUS_BINDINGS, WRITER_BINDINGS
from edge.simulator import EdgeSimulation, SimulationPlan, SimulationResult

log = logging.getLogger("emdc.simulate")

DEFAULT_STATE_DIR = "./state/simulate"


def simulation_settings(config: Config) -> Config:
    """``config`` with the simulation's own state dir unless one was given: a simulation never touches a real one."""
    return config if config.is_set("state_dir") else dataclasses.replace(config, state_dir=DEFAULT_STATE_DIR)


def run_simulation(config: Config, plan: SimulationPlan,
                   stop: threading.Event) -> tuple[dict[str, str], SimulationResult]:
    """Simulate ``plan`` end to end; return the final value of every MQTT topic, and what the edge sent."""
    config = simulation_settings(config)
    real_amqp, real_mqtt = config.is_set("amqp_url"), config.is_set("mqtt_host")
    log.info("transport: %s; values: %s; state in %s",
             "RabbitMQ (EMDC_AMQP_URL)" if real_amqp else "embedded in-process queue (no broker configured)",
             f"MQTT {config.mqtt_host}:{config.mqtt_port}" if real_mqtt else "embedded (no MQTT configured)",
             config.state_dir)
    memory_queue = None if real_amqp else MemoryQueue(config.batch_size)
    publisher_factory = None
    if memory_queue is not None:
        from edge.memory_publisher import MemoryPublisher

        def publisher_factory(open_reader: Any) -> MemoryPublisher:
            return MemoryPublisher(open_reader, memory_queue.put)

    simulation = EdgeSimulation(config, plan, publisher_factory=publisher_factory)
    mqtt = MqttPublisher(config, client_name="emdc-simulate") if real_mqtt else None
    # The writer judges idle power against the simulation's clock, not the wall clock.
    writer = EnergyWriter.open(config, sink=mqtt or MemorySink(), clock=simulation.now_ns)
    if mqtt:
        mqtt.start()
    on_idle = idle_handler(writer, mqtt, config.power_refresh_s)
    consume: Callable[[threading.Event], None]
    if memory_queue is None:
        from backend.amqp_consumer import BatchConsumer

        consume = BatchConsumer(config, config.queue, WRITER_BINDINGS, writer.handle_batch,
                                heartbeat=Heartbeat.of(config, WRITER), on_idle=on_idle,
                                status_bindings=STATUS_BINDINGS).run
    else:
        def consume(event: threading.Event) -> None:
            memory_queue.run(event, writer.handle_batch, on_idle)

    writer_stop = threading.Event()
    thread = threading.Thread(target=consume, args=(writer_stop,), name="emdc-writer", daemon=True)
    thread.start()

    def progress(t: float, pulses: int) -> None:
        of = f" of {plan.duration_s / 60:.0f} min" if plan.duration_s else ""
        power = writer.current_values().get(f"{config.topic_prefix}/active_power", "-")
        log.info("simulated %5.1f min%s: %d active pulses, power %s kW", t / 60, of, pulses, power)

    try:
        try:
            result = simulation.run(stop, progress)
            _wait_counted(writer, config.meter_id, result.epoch, result.counters, stop)
        finally:
            writer_stop.set()
            thread.join(timeout=30)
        if mqtt is not None:
            _wait_published(writer, mqtt, stop)
    finally:
        if mqtt:
            mqtt.stop()
    return writer.current_values(), result


def _wait_published(writer: EnergyWriter, mqtt: MqttPublisher, stop: threading.Event,
                    timeout_s: float = 15.0) -> None:
    """Fail unless the values reach the MQTT broker: a simulation that printed them is no proof they arrived.

    Once connected, the final values are published once more (the writer's thread has stopped, and a
    re-publication it was asked for after a late connect may not have run), then the broker must return the
    echoes sent after them: a broker whose ACL drops the topics accepts the publishes all the same.
    """
    deadline = time.monotonic() + timeout_s
    while mqtt.trouble() and not stop.is_set():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{mqtt.trouble()}: the simulated values never reached it")
        stop.wait(0.1)
    if stop.is_set():
        return
    writer.publish_all()
    why = mqtt.delivered()
    if why:
        raise TimeoutError(f"{why}: the simulated values never reached it")


def _wait_counted(writer: EnergyWriter, meter: str, epoch: str, counters: dict[str, int],
                  stop: threading.Event, timeout_s: float = 60.0) -> None:
    """Wait until the writer has counted every pulse the edge had confirmed."""
    deadline = time.monotonic() + timeout_s
    for channel, seq in counters.items():
        while not stop.is_set():
            cursor = writer.ledger.channel(meter, channel).epochs.get(epoch)
            if cursor is not None and cursor.seq >= seq:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the writer did not count {meter}/{channel} up to seq {seq} in {timeout_s:.0f} s; "
                                   "see the dead-lettering lines in the log above")
            time.sleep(0.02)
