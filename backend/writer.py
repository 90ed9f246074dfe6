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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from backend.amounts import GasEnergy, format_kwh, format_rate, format_total
from backend.backfill import Booked
from backend.batch import DeadLetter, Delivery, decode_pulse, report_held_back
from backend.discovery import Discovery
from backend.edge_watch import EdgeWatch
from backend.ledger import NS_PER_S, Changed, ChannelState, Implausible, Interleaved, Ledger, rate_limits, wh_to_uwh
from backend.power import MIN_PUBLISH_INTERVAL_S, displayed_power_w, settled
from backend.state_store import LedgerStore, StateError, open_store
from backend.topics import ENERGY_KWH, QUANTITIES, availability_topic, state_topic, writer_health_topic
from backend.writer_health import WriterHealth
from common.channels import CHANNELS, channel_spec
from common.config import Config
from common.message import ForgetMeter, MessageError, Pulse, SetPulseEnergy, decode_control
from common.topology import is_control, is_status

log = logging.getLogger("emdc.writer")
# Unknown meters reported with a log line of their own; a flood of new ids beyond this is not listed each.
UNKNOWN_REPORTED = 64


class Refused(ValueError):
    """A control command the writer does not apply; the text says why (it goes to the dead-letter queue)."""


class Admission:
    """Which meters the writer counts: configured ones, those it already counts, and up to ``cap`` more.

    A pulse of any other meter is refused with the fix, without touching the
    ledger, so that a stray or hostile meter id creates neither a total nor a
    Home Assistant device. Each refused meter is logged once, and the memory
    of which were logged is bounded. Example::

        >>> ledger = Ledger(100_000)
        >>> gate = Admission(("main",), cap=0)
        >>> gate.check(ledger, "main", now_ns=1), gate.check(ledger, "garage", now_ns=1)[:30]
        ('', "meter 'garage' is not one this")
    """

    def __init__(self, configured: Iterable[str], cap: int) -> None:
        self.configured = tuple(configured)
        self.cap = cap
        self._reported: set[str] = set()
        self._beyond: int | None = None  # meters admitted beyond the configured ones, counted once when needed

    def recount(self) -> None:
        """A meter was forgotten: count the admitted ones again when next needed."""
        self._beyond = None

    def check(self, ledger: Ledger, meter: str, now_ns: int) -> str:
        """Why a pulse of ``meter`` is refused ("" if it may be counted; admitting it if it may)."""
        if ledger.is_known(meter):
            return ""
        if meter in self.configured:
            ledger.admit(meter, now_ns)
            return ""
        if self.cap and self._beyond is None:
            self._beyond = sum(1 for m in ledger.meters() if m not in self.configured)
        if self._beyond is not None and self._beyond < self.cap:
            ledger.admit(meter, now_ns)
            self._beyond += 1
            log.warning("admitted new meter %s automatically (%d of admit_new_meters=%d)", meter, self._beyond,
                        self.cap)
            return ""
        reason = (f"meter {meter!r} is not one this writer counts ({', '.join(self.configured)}); if it is yours, add "
                  "it to the meters setting (EMDC_METERS) and restart the writer, then readmit")
        if meter not in self._reported and len(self._reported) < UNKNOWN_REPORTED:
            self._reported.add(meter)
            log.warning("%s (logged once per meter)", reason)
            if len(self._reported) == UNKNOWN_REPORTED:
                log.warning("%d unknown meters seen; further ones are dead-lettered without a line each",
                            UNKNOWN_REPORTED)
        return reason


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

    def __init__(self, ledger: Ledger, store: LedgerStore, sink: Sink, topic_prefix: str,
                 power_timeout_s: float, clock: Callable[[], int] = time.time_ns,
                 discovery: Discovery | None = None, meters: Iterable[str] = (),
                 channels: Mapping[str, Iterable[str]] | None = None, admit_new_meters: int = 0,
                 gas_energy: GasEnergy | None = None, edge_timeout_s: float = 90.0, health_topic: str = "") -> None:
        self.ledger = ledger
        self.store = store
        self.sink = sink
        self.topic_prefix = topic_prefix
        self.power_timeout_s = power_timeout_s
        self.clock = clock
        self.discovery = discovery
        # Told what a batch counted once it is saved (the Home Assistant statistics correction).
        self.on_saved: Callable[[list[Booked]], None] | None = None
        self._meters = set(meters)
        # Channels configured per meter beyond active; a meter's others get sensors once one of their pulses is seen.
        self._configured = {meter: set(names) for meter, names in (channels or {}).items()}
        # How gas volume becomes energy (kWh), if a calorific value is set.
        self.gas_energy = gas_energy
        # meter -> the channels its discovery describes, and whether it includes its edge's diagnostics
        self._announced: dict[str, tuple[tuple[str, ...], bool]] = {}
        self.edges = EdgeWatch(topic_prefix, edge_timeout_s, sink.publish, self._cursor)
        self.health = WriterHealth(health_topic or writer_health_topic(topic_prefix), sink.publish)
        # Channels whose start Home Assistant has seen: their total is saved, or their 0 was published.
        self._started = {key for key, _ in ledger}
        self.admission = Admission(sorted(self._meters), admit_new_meters)
        # Configured meters (and those of older state files) admitted at start, and any other change not saved yet.
        ledger.begin()
        for meter in sorted(self._meters | set(ledger.meters())):
            if ledger.admitted_ns(meter) is None:
                ledger.admit(meter, clock())
        self._unsaved = ledger.changed()
        ledger.commit()
        self._interleaved: set[tuple[str, str]] = set()
        # Forgotten meters whose Home Assistant device could not be removed yet (MQTT out of reach).
        self._withdrawing: set[str] = set()
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
            ledger = Ledger(config.max_power_w, config.power_smoothing_pulses, config.max_clock_ahead_s,
                            fixed_wh=True, max_rates=rate_limits(config))
            # Loud on purpose: a forgotten volume or a wrong state_dir also looks like this.
            log.warning("no saved state in %s: starting from zero (right for a first start; otherwise "
                        "check state_dir and restore the state dir's backup)", store.path)
        for (meter, channel), state in ledger:
            log.info("loaded %s/%s total %s %s from %s", meter, channel, format_total(channel, state.total_uwh),
                     channel_spec(channel).total_unit, store.path)
        ledger.pulse_energy = configured_pulse_energy(config)
        for (meter, channel), wh in ledger.pulse_energy.items():
            saved = ledger.get(meter, channel)
            if saved is not None and saved.wh_fixed and wh_to_uwh(saved.wh) != wh_to_uwh(wh):
                log.warning("%s/%s: the configuration says %g per pulse, the saved state %g; the saved one counts "
                            "(if the meter's constant changed, run `emdc state set-pulse-energy`)", meter, channel,
                            wh, saved.wh)
        gas_energy = (GasEnergy(config.gas_calorific_kwh_m3, config.gas_correction_factor)
                      if config.gas_calorific_kwh_m3 else None)
        health_topic = writer_health_topic(config.topic_prefix, config.partition_label())
        discovery = Discovery(config.discovery_prefix, config.topic_prefix, config.discovery,
                              config.ha_legacy_units, gas_energy=gas_energy is not None,
                              availability=availability_topic(config.topic_prefix, config.partition_label()),
                              health=health_topic)
        return cls(ledger, store, sink, config.topic_prefix, config.power_timeout_s, clock, discovery,
                   meters=config.counted_meters(), admit_new_meters=config.admit_new_meters,
                   channels={config.meter_id: configured_channels(config)}, gas_energy=gas_energy,
                   edge_timeout_s=config.edge_timeout(), health_topic=health_topic)

    def handle_batch(self, deliveries: Sequence[Delivery]) -> list[DeadLetter]:
        """Apply a batch, persist and publish; return the deliveries to dead-letter."""
        dead: list[DeadLetter] = []
        touched: set[tuple[str, str]] = set()
        dirty = bool(self._unsaved)
        self.ledger.begin()  # remembers only the channels and meters this batch touches
        reporting: set[str] = set()  # meters whose edge sent its first status
        booked: list[Booked] = []
        for delivery in deliveries:
            try:
                if is_status(delivery.routing_key):  # never touches the ledger
                    reporting.add(self.edges.take(delivery, self.clock(), self._meters | set(self.ledger.meters())))
                    continue
                if is_control(delivery.routing_key):
                    touched.update(self._apply_control(delivery.body))
                    # A forgotten meter must not be published again (which would bring it back).
                    touched = {key for key in touched if self.ledger.is_known(key[0])}
                    dirty = True
                    continue
                pulse = decode_pulse(delivery)
            except (MessageError, Refused) as exc:
                dead.append(DeadLetter(delivery, str(exc)))
                continue
            known = self.ledger.is_known(pulse.meter)
            now = self.clock()  # once per pulse: admission, liveness and the ledger see the same instant
            refusal = self.admission.check(self.ledger, pulse.meter, now)
            if refusal:
                dead.append(DeadLetter(delivery, refusal))
                continue
            dirty = dirty or not known
            self.edges.heard_pulse(pulse.meter, now)
            state = self.ledger.channel(pulse.meter, pulse.channel)
            doubted, new_epoch = state.ts_doubt, bool(state.epochs) and pulse.epoch not in state.epochs
            before_uwh = state.total_uwh
            try:
                counted = self.ledger.apply(pulse, now, readmitted=delivery.readmitted)
            except Implausible as exc:
                if isinstance(exc, Interleaved) and (pulse.meter, pulse.channel) not in self._interleaved:
                    self._interleaved.add((pulse.meter, pulse.channel))
                    log.error("%s; held back (logged once per channel)", exc)
                dead.append(DeadLetter(delivery, str(exc)))
                state.held_back += 1  # shown by `emdc state show` until someone looks
                state.held_back_reason = str(exc)
                dirty = True
                continue
            if counted:
                touched.add((pulse.meter, pulse.channel))
                dirty = True
                report_changes(pulse, state, doubted=doubted, new_epoch=new_epoch)
                if self.on_saved is not None:
                    booked.append(Booked(pulse.meter, pulse.channel, pulse.ts_ns, now, counted,
                                         state.total_uwh - before_uwh, not state.ts_doubt))
        changed = self._unsaved | self.ledger.changed()
        if dirty or changed:
            try:
                self.store.save(self.ledger, changed)
            except BaseException:
                # The batch will be redelivered; counting it again must not look like a duplicate.
                self.ledger.rollback()
                self.admission.recount()  # the meters it admitted are not admitted any more
                self.save_failed = True
                raise
            self.save_failed = False
            self._unsaved = Changed()
        self.ledger.commit()
        self.edges.publish(self.clock())  # the edge topic first: the rates' new availability includes it
        for meter in sorted(reporting - {""}):
            self._announce(meter)
        if booked and self.on_saved is not None:
            self.on_saved(booked)
        self._publish(touched, force=False)
        report_held_back(dead, log)
        if dead:
            self.health.dead_lettered(len(dead), self.clock())
        return dead

    def link_changed(self, connected: bool) -> None:
        """The consumer's RabbitMQ link came up or went down (for the writer's health in Home Assistant)."""
        self.health.link(connected, self.clock())

    def reload(self) -> None:
        """Take the saved state as it is now: a shared state that another writer counted on while this one stood
        by. What was published is published again from it (:meth:`publish_all`)."""
        doc = self.store.load()
        self.ledger.load_json(doc or {"meters": {}})
        self._unsaved = Changed()
        self.admission.recount()
        self._started = {key for key, _ in self.ledger}
        self._live = set(self._started)
        self._held.clear()
        self._announced.clear()

    def _apply_control(self, body: bytes) -> list[tuple[str, str]]:
        """Apply a control command; return the channels whose values changed. Raises :class:`Refused`."""
        command = decode_control(body)
        if isinstance(command, ForgetMeter):
            self._forget(command)
            return []
        if isinstance(command, SetPulseEnergy):
            if not self.ledger.is_known(command.meter):
                raise Refused(f"meter {command.meter!r} is not one this writer counts: nothing to set the energy "
                              "per pulse of")
            old_wh = self.ledger.set_pulse_energy(command.meter, command.channel, command.wh, command_id=command.id)
            if old_wh is None:
                log.info("command %s was applied before; ignoring the repeat", command.id)
            else:
                log.warning("%s/%s: energy per pulse %g -> %g %s; readmit the pulses held back for it", command.meter,
                            command.channel, old_wh, command.wh, channel_spec(command.channel).pulse_unit)
            return []
        if self.ledger.admit(command.meter, self.clock()):
            log.warning("admitted meter %s by calibration", command.meter)
        old = self.ledger.set_total(command.meter, command.channel, command.total_uwh, as_of_ns=command.ts_ns,
                                    command_id=command.id)
        if old is None:
            log.info("calibration %s of %s/%s was applied before; ignoring the repeat", command.id,
                     command.meter, command.channel)
        else:
            log.warning("calibrated %s/%s: total %s -> %s (meter read at %s)", command.meter, command.channel,
                        format_total(command.channel, old), format_total(command.channel, command.total_uwh),
                        dt.datetime.fromtimestamp(command.ts_ns / 1e9, dt.UTC).isoformat(timespec="seconds"))
        return [(command.meter, command.channel)]

    def _forget(self, command: ForgetMeter) -> None:
        """Drop a meter that is not configured: its totals, and its Home Assistant device and values."""
        meter = command.meter
        if meter in self.admission.configured:
            raise Refused(f"meter {meter!r} is in the meters setting: remove it there and restart the writer "
                          "before forgetting it")
        if not self.ledger.is_known(meter):
            log.info("forget %s: not a meter this writer counts; nothing to do", meter)
            return
        channels = self.ledger.forget(meter)
        self.admission.recount()
        log.warning("forgot meter %s (channels: %s) and removed its Home Assistant device", meter,
                    ", ".join(channels) or "none")
        self._withdraw(meter)

    def _withdraw(self, meter: str) -> None:
        """Clear what was published for ``meter``: its retained values and its discovery."""
        self._meters.discard(meter)
        self._announced.pop(meter, None)
        self.edges.forget(meter)
        for channel in CHANNELS:
            for key in (self._started, self._live, self._held):
                key.discard((meter, channel))
            # The gas total in kWh has a topic of its own; for other channels it names their total.
            for topic in dict.fromkeys(state_topic(self.topic_prefix, meter, channel, q)
                                       for q in (*QUANTITIES, ENERGY_KWH)):
                if self._published.pop(topic, None) is not None:
                    self.sink.publish(topic, "")  # an empty retained message clears the value
        if not self.discovery:
            return
        if isinstance(self.sink, BrokerSink):
            retained = self.sink.scan_retained(self.discovery.scan_filters(meter))
        else:  # a sink without a memory of its own holds what this writer announced
            retained = dict(self.discovery.messages(meter, edge=True))
        sent = [self.sink.publish(topic, payload) for topic, payload in
                self.discovery.removal_messages([meter], retained or {})]
        if retained is None or False in sent:
            self._withdrawing.add(meter)  # MQTT is out of reach: publish_all tries again after reconnecting
        else:
            self._withdrawing.discard(meter)

    def refresh_power(self) -> None:
        """Publish the power values that changed with time alone (idle bound, timeout) or were held back.

        Only channels whose power can still change are evaluated; a value is
        published when it changes at the display precision, at most once per
        :data:`~backend.power.MIN_PUBLISH_INTERVAL_S` per channel.
        """
        self._publish(sorted(self._live), force=False, energy=False)
        now = self.clock()
        self.edges.publish(now)
        self.health.publish(now)  # the dead letters of the last hour fall with time alone

    def release_held_power(self) -> None:
        """Publish the power values held back by the once-a-second limit, as soon as it allows (cheap when none
        are, as between refreshes it usually is)."""
        if self._held:
            self._publish(sorted(self._held), force=False, energy=False)
        self.edges.publish(self.clock())

    def publish_all(self) -> None:
        """Publish discovery and every value, e.g. after (re)connecting to MQTT or HA's birth message."""
        for meter in sorted(self._withdrawing):
            self._withdraw(meter)
        self._announced.clear()
        self.edges.publish_all()
        self.health.publish(self.clock(), force=True)
        for meter in sorted(self._meters | {meter for (meter, _), _ in self.ledger}):
            self._announce(meter)
        self._publish((key for key, _ in self.ledger), force=True)

    def _cursor(self, meter: str, channel: str, epoch: str) -> int:
        """The writer's count of ``epoch`` of a channel (0 if it has none): what an edge's status is compared to."""
        state = self.ledger.get(meter, channel)
        cursor = state.epochs.get(epoch) if state else None
        return cursor.seq if cursor else 0

    def _channels(self, meter: str) -> tuple[str, ...]:
        """The channels ``meter`` has: active, those configured, and those it has a state of (seen)."""
        configured = self._configured.get(meter, set())
        return tuple(c for c in CHANNELS if c == "active" or c in configured or self.ledger.get(meter, c) is not None)

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
        channels = (self._channels(meter), self.edges.reports(meter))
        states = {(meter, c): state for c in channels[0] if (state := self.ledger.get(meter, c)) is not None}
        unstarted = [key for key in states if key not in self._started]
        if self._announced.get(meter) == channels and not unstarted:
            return
        energy = {key: list(self._totals(*key, states[key])) for key in unstarted}
        retained = self._retained(meter, [topic for topics in energy.values() for topic in topics])
        if not channels[1] and retained and self.discovery and self.discovery.announced_edge(meter, retained):
            # Announced with its edge before this writer started: judged from now, not first after its next status.
            self.edges.adopt(meter, self.clock())
            channels = (channels[0], True)
        if self._announced.get(meter) != channels:
            self._announced[meter] = channels
            for topic, payload in (self.discovery.handover(meter, retained or {}, *channels) if self.discovery
                                   else []):
                self.sink.publish(topic, payload)
        for key, topics in energy.items():
            if states[key].calibrated_at_ns:
                self._started.add(key)  # its start is a meter reading
                continue
            if retained is None:
                continue
            # Home Assistant has a value already where the broker retains one.
            fresh = [topic for topic in topics if not retained.get(topic)]
            zero = format_total(key[1], 0)
            if False in [self.sink.publish(topic, zero) for topic in fresh]:
                continue
            self._started.add(key)
            for topic in fresh:
                self._published[topic] = zero
                if isinstance(self.sink, BrokerSink):
                    self.sink.hold(topic)  # Home Assistant may be setting the sensor up right now

    def _totals(self, meter: str, channel: str, state: ChannelState) -> dict[str, str]:
        """The topics and payloads of a channel's total: in its unit, and for gas with a calorific value in kWh."""
        totals = {state_topic(self.topic_prefix, meter, channel, "energy"): format_total(channel, state.total_uwh)}
        if channel == "gas" and self.gas_energy:
            totals[state_topic(self.topic_prefix, meter, channel, ENERGY_KWH)] = format_kwh(
                self.gas_energy.uwh(state.total_uwh))
        return totals

    def _publish(self, keys: Iterable[tuple[str, str]], *, force: bool, energy: bool = True) -> None:
        now = self.clock()
        for meter, channel in keys:
            self._announce(meter)
            state = self.ledger.channel(meter, channel)
            values = self._totals(meter, channel, state) if energy else {}
            power = displayed_power_w(state, now, self.power_timeout_s)
            power_topic = state_topic(self.topic_prefix, meter, channel, "power")
            if power is not None:
                values[power_topic] = format_rate(channel, power)
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


def load_ledger(config: Config) -> tuple[LedgerStore, Ledger | None]:
    """The configured state store and the ledger saved in it (None if nothing was saved yet).

    Raises StateError if the file exists but does not hold a valid ledger: the
    writer must then refuse to start rather than count from zero.
    """
    store = open_store(config)
    doc = store.load()
    if doc is None:
        return store, None
    try:
        return store, Ledger.from_json(doc, config.max_power_w, config.power_smoothing_pulses,
                                       config.max_clock_ahead_s, fixed_wh=True, max_rates=rate_limits(config))
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"{store.path} does not hold a valid ledger ({exc!r}); refusing to start from "
                         "zero. Inspect it, or restore a backup of the state dir.") from None


def saved_totals(config: Config) -> list[str]:
    """``emdc state show``: one line per saved meter and channel, with its exact total in the channel's unit."""
    store, ledger = load_ledger(config)
    if ledger is None:
        return [f"no state saved in {store.path} yet"]
    lines = []
    for (meter, channel), st in ledger:
        spec = channel_spec(channel)
        lines.append(f"{meter:<12} {channel:<9} {format_total(channel, st.total_uwh):>16} {spec.total_unit:<5} "
                     f"({len(st.epochs)} epoch(s), last seq {max((c.seq for c in st.epochs.values()), default=0)}"
                     + (f", {st.wh:g} {spec.pulse_unit} per pulse)" if st.wh_fixed else ")"))
        if st.ts_doubt:
            lines.append(f"    timestamps not trusted: {st.ts_doubt}")
        if st.held_back:
            lines.append(f"    {st.held_back} pulse message(s) held back so far, the last: {st.held_back_reason}; "
                         "see `emdc dead-letters list`")
    return lines


def configured_pulse_energy(config: Config) -> dict[tuple[str, str], float]:
    """The energy per pulse of ``meter_id``'s channels, where the writer's configuration states it (``[[inputs]]``
    or ``wh_per_pulse``): then a channel's first pulse cannot set another.

    >>> from common.config import load_config
    >>> configured_pulse_energy(load_config(env={"EMDC_WH_PER_PULSE": "0.1"}))
    {('main', 'active'): 0.1}
    >>> configured_pulse_energy(load_config(env={}))
    {}
    """
    if not (config.configured_inputs or config.is_set("wh_per_pulse")):
        return {}
    return {(config.meter_id, one.channel): one.per_pulse for one in config.inputs()}


def configured_channels(config: Config) -> set[str]:
    """The channels the writer announces for ``meter_id`` before their first pulse: the ``channels`` setting,
    and reactive if ``reactive_pin`` is set.

    >>> from common.config import load_config
    >>> sorted(configured_channels(load_config(env={"EMDC_CHANNELS": "export,gas", "EMDC_REACTIVE_PIN": "27"})))
    ['export', 'gas', 'reactive']
    """
    return set(config.announced_channels()) | ({"reactive"} if config.reactive_pin != -1 else set())


def known_meters(config: Config) -> tuple[str, ...]:
    """The configured meters and every meter the saved state knows, sorted."""
    _, ledger = load_ledger(config)
    return tuple(sorted({*config.counted_meters(), *(ledger.meters() if ledger else ())}))
