"""The MQTT writer's service logic, independent of any broker.

A transport (RabbitMQ in production, an in-process queue in ``emdc simulate``)
hands :class:`EnergyWriter` batches of deliveries. For each batch it counts the
valid pulses in the :class:`~backend.ledger.Ledger`, persists the ledger once,
publishes the changed values once, and tells the transport which deliveries to
dead-letter. Only then may the transport acknowledge the batch: a crash at any
point redelivers messages that the ledger recognises as already counted.

Example::

    writer = EnergyWriter.open(config, sink=MemorySink())
    dead = writer.handle_batch([Delivery(1, "pulse.main.active", body)])
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from backend.amounts import format_kw, format_kwh
from backend.batch import DeadLetter, Delivery, report_held_back
from backend.discovery import Discovery
from backend.ledger import NS_PER_S, ChannelState, Implausible, Ledger
from backend.power import MIN_PUBLISH_INTERVAL_S, displayed_power_w, settled
from backend.state_store import StateError, StateStore
from backend.topics import state_topic
from common.channels import CHANNELS, channel_spec
from common.config import Config
from common.message import MessageError, Pulse, decode_control, decode_routed
from common.topology import is_control

log = logging.getLogger("emdc.writer")


class Sink(Protocol):
    """Where values go: an MQTT client, or memory in a simulation. ``publish`` returns False if it sent nothing
    (MQTT not connected: everything is published again after the next connect)."""

    def publish(self, topic: str, payload: str) -> bool | None: ...


@runtime_checkable
class BrokerSink(Sink, Protocol):
    """A sink that is a broker with subscribers: it can tell what it retains on some topic filters (None:
    cannot tell right now), and hold a topic's next values back for a moment."""

    def scan_retained(self, filters: Sequence[str]) -> dict[str, str] | None: ...

    def hold(self, topic: str) -> None: ...


class EnergyWriter:
    """Counts pulses into a persisted ledger and publishes the current values."""

    def __init__(self, ledger: Ledger, store: StateStore, sink: Sink, topic_prefix: str,
                 power_timeout_s: float, clock: Callable[[], int] = time.time_ns,
                 discovery: Discovery | None = None, meters: Iterable[str] = (),
                 reactive_meters: Iterable[str] = ()) -> None:
        self.ledger = ledger
        self.store = store
        self.sink = sink
        self.topic_prefix = topic_prefix
        self.power_timeout_s = power_timeout_s
        self.clock = clock
        self.discovery = discovery
        self._meters = set(meters)
        # Meters configured with a reactive input; others get reactive sensors once a reactive pulse is counted.
        self._reactive = set(reactive_meters)
        self._announced: dict[str, tuple[str, ...]] = {}  # meter -> the channels its discovery describes
        # Channels whose start Home Assistant has seen: their total is saved, or their 0 was published.
        self._started = {key for key, _ in ledger}
        self._published: dict[str, str] = {}
        # Channels whose displayed power may still change with time alone or waits to be published:
        # the only ones refresh_power looks at, so a refresh costs nothing for meters at rest.
        self._live: set[tuple[str, str]] = {key for key, _ in ledger}
        # Channels whose latest power is held back by the once-a-second limit.
        self._held: set[tuple[str, str]] = set()
        self._power_sent_ns: dict[str, int] = {}
        # True while the latest batch could not be saved (it stays unacknowledged in the queue).
        self.save_failed = False

    @classmethod
    def open(cls, config: Config, sink: Sink, clock: Callable[[], int] = time.time_ns) -> EnergyWriter:
        """Load the persisted state (raising StateError if it is unusable) and build a writer."""
        store, ledger = load_ledger(config)
        if ledger is None:
            ledger = Ledger(config.max_power_w, config.power_smoothing_pulses, config.max_clock_ahead_s)
            # Loud on purpose: a forgotten volume or a wrong state_dir also looks like this.
            log.warning("no saved state in %s: starting from zero (right for a first start; otherwise "
                        "check state_dir and restore energy_state.json)", store.path)
        for (meter, channel), state in ledger:
            log.info("loaded %s/%s total %s %s from %s", meter, channel, format_kwh(state.total_uwh),
                     channel_spec(channel).total_unit, store.path)
        discovery = Discovery(config.discovery_prefix, config.topic_prefix, config.discovery,
                              config.ha_legacy_units)
        return cls(ledger, store, sink, config.topic_prefix, config.power_timeout_s, clock, discovery,
                   meters=[config.meter_id], reactive_meters=[config.meter_id] if config.reactive_pin != -1 else [])

    def handle_batch(self, deliveries: Sequence[Delivery]) -> list[DeadLetter]:
        """Apply a batch, persist and publish; return the deliveries to dead-letter."""
        dead: list[DeadLetter] = []
        touched: set[tuple[str, str]] = set()
        dirty = False
        saved = self.ledger.to_json()
        for delivery in deliveries:
            try:
                if is_control(delivery.routing_key):
                    touched.add(self._apply_control(delivery.body))
                    dirty = True
                    continue
                pulse = decode_routed(delivery.body, delivery.routing_key)
            except MessageError as exc:
                dead.append(DeadLetter(delivery, str(exc)))
                continue
            state = self.ledger.channel(pulse.meter, pulse.channel)
            doubted, new_epoch = state.ts_doubt, bool(state.epochs) and pulse.epoch not in state.epochs
            try:
                counted = self.ledger.apply(pulse, self.clock(), readmitted=delivery.readmitted)
            except Implausible as exc:
                dead.append(DeadLetter(delivery, str(exc)))
                state.held_back += 1  # shown by `emdc state show` until someone looks
                state.held_back_reason = str(exc)
                dirty = True
                continue
            if counted:
                touched.add((pulse.meter, pulse.channel))
                dirty = True
                report_changes(pulse, state, doubted=doubted, new_epoch=new_epoch)
        if dirty:
            try:
                self.store.save(self.ledger.to_json())
            except BaseException:
                # The batch will be redelivered; counting it again must not look like a duplicate.
                self.ledger.load_json(saved)
                self.save_failed = True
                raise
            self.save_failed = False
        self._publish(touched, force=False)
        report_held_back(dead, log)
        return dead

    def _apply_control(self, body: bytes) -> tuple[str, str]:
        command = decode_control(body)
        old = self.ledger.set_total(command.meter, command.channel, command.total_uwh, as_of_ns=command.ts_ns,
                                    command_id=command.id)
        if old is None:
            log.info("calibration %s of %s/%s was applied before; ignoring the repeat", command.id,
                     command.meter, command.channel)
        else:
            log.warning("calibrated %s/%s: total %s -> %s (meter read at %s)", command.meter, command.channel,
                        format_kwh(old), format_kwh(command.total_uwh),
                        dt.datetime.fromtimestamp(command.ts_ns / 1e9, dt.UTC).isoformat(timespec="seconds"))
        return command.meter, command.channel

    def refresh_power(self) -> None:
        """Publish the power values that changed with time alone (idle bound, timeout) or were held back.

        Only channels whose power can still change are evaluated; a value is
        published when it changes at the display precision, at most once per
        :data:`~backend.power.MIN_PUBLISH_INTERVAL_S` per channel.
        """
        self._publish(sorted(self._live), force=False, energy=False)

    def release_held_power(self) -> None:
        """Publish the power values held back by the once-a-second limit, as soon as it allows (cheap when none
        are, as between refreshes it usually is)."""
        if self._held:
            self._publish(sorted(self._held), force=False, energy=False)

    def publish_all(self) -> None:
        """Publish discovery and every value, e.g. after (re)connecting to MQTT or HA's birth message."""
        self._announced.clear()
        for meter in sorted(self._meters | {meter for (meter, _), _ in self.ledger}):
            self._announce(meter)
        self._publish((key for key, _ in self.ledger), force=True)

    def _channels(self, meter: str) -> tuple[str, ...]:
        """The channels ``meter`` has: active, and reactive if configured or ever counted."""
        reactive = meter in self._reactive or any(key == (meter, "reactive") for key, _ in self.ledger)
        return tuple(c for c in CHANNELS if c == "active" or reactive)

    def _retained(self, meter: str, energy_topics: Sequence[str]) -> dict[str, str] | None:
        """What the broker retains of ``meter``'s discovery and of ``energy_topics``; None if it cannot tell."""
        if not isinstance(self.sink, BrokerSink):
            return {}  # a sink without a memory of its own: nothing retained but what this writer publishes
        filters = self.discovery.scan_filters(meter) if self.discovery and self.discovery.style != "off" else []
        return self.sink.scan_retained([*filters, *energy_topics])

    def _announce(self, meter: str) -> None:
        """Announce ``meter`` (again, if its channels changed), and publish 0 for each channel with a total whose
        start Home Assistant has not seen, a moment before the total: Home Assistant takes the first value it
        finds as the zero point, also when it subscribes only after both were published (it sets up a sensor
        it has just discovered). Never over a retained value, nor for a calibrated channel (the reading is its
        start), nor before a channel has a total (a calibration may come first)."""
        self._meters.add(meter)
        channels = self._channels(meter)
        states = dict(self.ledger)
        unstarted = [key for key in ((meter, c) for c in channels) if key in states and key not in self._started]
        if self._announced.get(meter) == channels and not unstarted:
            return
        energy = {key: state_topic(self.topic_prefix, *key, "energy") for key in unstarted}
        retained = self._retained(meter, list(energy.values()))
        if self._announced.get(meter) != channels:
            self._announced[meter] = channels
            for topic, payload in self.discovery.handover(meter, retained or {}, channels) if self.discovery else []:
                self.sink.publish(topic, payload)
        zero = format_kwh(0)
        for key, topic in energy.items():
            if states[key].calibrated_at_ns or states[key].calibrations or (retained and retained.get(topic)):
                self._started.add(key)  # its start is a meter reading, or Home Assistant has a value already
            elif retained is not None and self.sink.publish(topic, zero) is not False:
                self._published[topic] = zero
                self._started.add(key)
                if isinstance(self.sink, BrokerSink):
                    self.sink.hold(topic)  # Home Assistant may be setting the sensor up right now

    def _publish(self, keys: Iterable[tuple[str, str]], *, force: bool, energy: bool = True) -> None:
        now = self.clock()
        for meter, channel in keys:
            self._announce(meter)
            state = self.ledger.channel(meter, channel)
            values = {}
            if energy:
                values[state_topic(self.topic_prefix, meter, channel, "energy")] = format_kwh(state.total_uwh)
            power = displayed_power_w(state, now, self.power_timeout_s)
            power_topic = state_topic(self.topic_prefix, meter, channel, "power")
            if power is not None:
                values[power_topic] = format_kw(power)
            held_back = False
            for topic, payload in values.items():
                if force or self._published.get(topic) != payload:
                    if topic == power_topic and not force and self._too_soon(topic, now):
                        held_back = True  # release_held_power publishes it once it may
                        continue
                    self.sink.publish(topic, payload)
                    self._published[topic] = payload
                    if topic == power_topic:
                        self._power_sent_ns[topic] = now
            if held_back:
                self._held.add((meter, channel))
            else:
                self._held.discard((meter, channel))
            if held_back or not settled(state, now, self.power_timeout_s):
                self._live.add((meter, channel))
            else:
                self._live.discard((meter, channel))

    def _too_soon(self, power_topic: str, now: int) -> bool:
        sent = self._power_sent_ns.get(power_topic)
        # A clock that stepped back does not hold power back for the size of the step.
        return sent is not None and 0 <= now - sent < MIN_PUBLISH_INTERVAL_S * NS_PER_S

    def current_values(self) -> dict[str, str]:
        """The last value published on each topic."""
        return dict(self._published)


def report_changes(pulse: Pulse, state: ChannelState, *, doubted: str, new_epoch: bool) -> None:
    """One log line when a channel starts a new counter epoch, or its timestamps stop or start being trusted."""
    where = f"{pulse.meter}/{pulse.channel}"
    if new_epoch:
        log.warning("%s: new counter epoch %s (the edge restarted after an unclean stop, or its counter store "
                    "was recreated or restored); counting continues from it", where, pulse.epoch)
    if state.ts_doubt and not doubted:
        log.warning("%s: counting by the counter alone, timestamps not trusted: %s; power is unknown until "
                    "they are", where, state.ts_doubt)
    elif doubted and not state.ts_doubt:
        log.info("%s: timestamps trusted again", where)


def load_ledger(config: Config) -> tuple[StateStore, Ledger | None]:
    """The configured state store and the ledger saved in it (None if nothing was saved yet).

    Raises StateError if the file exists but does not hold a valid ledger: the
    writer must then refuse to start rather than count from zero.
    """
    store = StateStore(Path(config.state_dir))
    doc = store.load()
    if doc is None:
        return store, None
    try:
        return store, Ledger.from_json(doc, config.max_power_w, config.power_smoothing_pulses,
                                       config.max_clock_ahead_s)
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"{store.path} does not hold a valid ledger ({exc!r}); refusing to start from "
                         "zero. Inspect it and its .bak copy.") from None


def saved_totals(config: Config) -> list[str]:
    """``emdc state show``: one line per saved meter and channel, with its exact total."""
    store, ledger = load_ledger(config)
    if ledger is None:
        return [f"no state saved in {store.path} yet"]
    lines = []
    for (meter, channel), st in ledger:
        lines.append(f"{meter:<12} {channel:<9} {format_kwh(st.total_uwh):>16} {channel_spec(channel).total_unit:<5} "
                     f"({len(st.epochs)} epoch(s), last seq {max((c.seq for c in st.epochs.values()), default=0)})")
        if st.ts_doubt:
            lines.append(f"    timestamps not trusted: {st.ts_doubt}")
        if st.held_back:
            lines.append(f"    {st.held_back} pulse message(s) held back so far, the last: {st.held_back_reason}; "
                         "see `emdc dead-letters list`")
    return lines


def known_meters(config: Config) -> tuple[str, ...]:
    """The configured meter and every meter with a saved total, sorted."""
    _, ledger = load_ledger(config)
    return tuple(sorted({config.meter_id, *(meter for (meter, _), _ in ledger or ())}))
