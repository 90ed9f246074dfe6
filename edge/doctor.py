"""``emdc doctor``'s checks for the Pi: may the account publish the meter's pulses and status, is the clock
synchronised, do the configured pins open.

The publish check sends nothing anyone could count. It publishes to the
exchange with the meter's real routing key (``pulse.<meter>.<channel>``)
inside an AMQP transaction and rolls the transaction back: RabbitMQ checks
the exchange and the account's write and topic permissions when the publish
arrives, and refuses it by closing the channel before the rollback is
answered, but a rolled-back message is never delivered to any queue. (A
probe routing key under ``pulse.`` that no queue is bound to does not exist:
the writers bind ``pulse.#``.) Whether a queue is bound is not checked; the
edge logs ``unroutable`` if none is.

The pins are opened as ``emdc edge run`` opens them and closed at once. While
the edge service runs, it holds them, so the check then reports them busy.
"""

from __future__ import annotations

import warnings
from functools import partial

from common.config import Config
from common.doctor import Check, CheckFunction, RabbitMQ, bad, good
from common.inputs import Input
from common.topology import pulse_routing_key, status_routing_key


def publish_probe(config: Config, rabbit: RabbitMQ, key: str) -> Check | None:
    """May this account publish under ``key`` (a pulse's, the status's)? A publish in a transaction that is
    rolled back."""
    import pika.exceptions

    if rabbit.connection is None:
        return None
    name = f"publish {key}"
    amqp = rabbit.connection.channel()
    try:
        amqp.tx_select()
        amqp.basic_publish(config.exchange, key, b"", mandatory=True)
        amqp.tx_rollback()
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return bad(name, f"exchange {config.exchange} does not exist ({exc.reply_text})",
                       "start the writer once (it declares the topology), or load the broker definitions")
        return bad(name, f"RabbitMQ refused it ({exc.reply_text})",
                   f"give the account write permission on exchange {config.exchange} and topic permission for "
                   f"{key} (deploy/compose/rabbitmq/definitions.template.json), or correct exchange or meter_id")
    amqp.close()
    return good(name, f"permitted on exchange {config.exchange} (probe rolled back, nothing delivered)")


def clock(config: Config) -> Check:
    """Is the clock synchronised, as the kernel says (only when ``clock_sync = kernel``)?"""
    from edge.clock_sync import kernel_clock_synced

    if config.clock_sync == "unknown":
        return good("clock", "not asked (clock_sync = unknown): the writer checks pulse times against its own clock")
    synced = kernel_clock_synced()
    if synced is False:
        return bad("clock", "the kernel says the clock is NOT synchronised, so the writer will not trust pulse times",
                   "enable NTP (`sudo timedatectl set-ntp true`) and check `timedatectl` until it says synchronized")
    if synced is None:
        return good("clock", "the kernel cannot be asked here; pulses say their times are not known to be synced")
    return good("clock", "synchronised, as the kernel says")


def pin(one: Input) -> Check:
    """Does the input's pin open with its type's pull-up? Opened as the edge does, and closed at once."""
    from gpiozero.exc import GPIOZeroError, PinFactoryFallback

    from edge.reader import PulseInput
    from edge.service import gpio_failure

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PinFactoryFallback)  # the failure below says it once
            device = PulseInput(one.pin, channel=one.channel, sink=lambda _edge: None, pull_up=one.pull_up)
    except (GPIOZeroError, ImportError, OSError) as exc:
        return bad(f"GPIO{one.pin}", gpio_failure(exc, one),
                   "if `emdc edge run` is running it holds its pins: stop it (`sudo systemctl stop emdc-edge`) "
                   "to check them" if "in use" in str(exc) or "busy" in str(exc).lower() else "")
    factory = type(device.pin_factory).__name__
    device.close()
    pull = "pull-up" if one.pull_up else "no pull-up"
    return good(f"GPIO{one.pin}", f"{one.channel} input ({one.type}) opens with {factory} ({pull})")


def checks(config: Config, rabbit: RabbitMQ) -> list[CheckFunction]:
    """The edge's checks, in the order they are shown."""
    try:
        import gpiozero  # noqa: F401  (the pins need it)
    except ImportError as exc:
        return [partial(bad, "GPIO", str(exc), "install the edge's packages: pip install 'emdc[edge]'")]
    inputs = config.inputs()
    keys = [pulse_routing_key(config.meter_id, one.channel) for one in inputs]
    keys += [status_routing_key(config.meter_id)] if config.status_interval_s else []
    return [*(partial(publish_probe, config, rabbit, key) for key in keys), partial(clock, config),
            *(partial(pin, one) for one in inputs)]
