"""``emdc db-writer``: every pulse from its own queue into the database, exactly once.

:class:`DbWriter` is transport-agnostic, like :class:`~backend.writer.EnergyWriter`:
a transport (:class:`~backend.amqp_consumer.BatchConsumer` in production) hands it
a batch of pulses of any channel kind (:mod:`common.channels`), it decodes
each pulse with the shared message code, lets the shared
:class:`~backend.ledger.Ledger` refuse what the MQTT writer would refuse
(implausible counter jumps, pulses faster than the power limit, another
energy per pulse than the channel's stored pulses, reused counters), stores
the rest in one transaction and returns the dead letters. Only then is the
batch acknowledged; after a crash the redelivered pulses hit the unique key
and change nothing.

It does not see the commands that change a channel's energy per pulse (they
go to the MQTT writer): a pulse held back for another energy per pulse is
stored once a person readmits it, and that energy is then the channel's.
Meters count as admitted when the db-writer starts, so a channel without
stored pulses is judged from then (or, by the edge's word, from its epoch's
start).

Example::

    store = PulseStore.open("sqlite:///state/pulses.sqlite3")
    writer = DbWriter(store, max_power_w=100_000)
    dead = writer.handle_batch([Delivery(1, "pulse.main.active", body)])
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from sqlalchemy.exc import OperationalError

from backend.amqp_consumer import BatchConsumer
from backend.batch import DeadLetter, Delivery, decode_pulse, report_held_back
from backend.database import PulseStore, database_url
from backend.heartbeat import DB_WRITER, Heartbeat
from backend.ledger import Cursor, Implausible, Ledger, OtherPulseEnergy, rate_limits
from common.config import Config
from common.message import MessageError, Pulse
from common.topology import DB_WRITER_BINDINGS

log = logging.getLogger("emdc.db_writer")


class StoreUnavailable(OSError):
    """The database refused a batch for a reason that may pass (down, locked, full).

    An OSError, so the consumer treats it like a lost connection: one log line,
    reconnect with backoff, and the unacknowledged batch is delivered again.
    """


class DbWriter:
    """Stores batches of pulse deliveries; returns the ones to dead-letter."""

    def __init__(self, store: PulseStore, max_power_w: float, clock: Callable[[], int] = time.time_ns, *,
                 max_rates: Mapping[str, float] | None = None) -> None:
        self.store = store
        self.max_power_w = max_power_w
        self.max_rates = max_rates
        self.clock = clock
        self.started_ns = clock()
        self._forget()

    def _forget(self) -> None:
        """Drop what the ledger knows; it is seeded again from the database as pulses arrive."""
        self.ledger = Ledger(self.max_power_w, max_rates=self.max_rates, fixed_wh=True)
        self._resumed: set[tuple[str, ...]] = set()

    def handle_batch(self, deliveries: Sequence[Delivery]) -> list[DeadLetter]:
        """Decode, check and store a batch in one transaction; raise StoreUnavailable to have it redelivered."""
        dead: list[DeadLetter] = []
        keep: list[Pulse] = []
        try:
            for delivery in deliveries:
                try:
                    pulse = decode_pulse(delivery)
                    self._resume(pulse)
                    # Its count is irrelevant here (0 for a duplicate, which the unique
                    # key absorbs); what matters is that the ledger accepts the pulse.
                    self._apply(pulse, self.clock(), readmitted=delivery.readmitted)
                    keep.append(pulse)
                except (MessageError, Implausible) as exc:
                    dead.append(DeadLetter(delivery, str(exc)))
            self.store.insert(keep)
        except BaseException as exc:
            # The ledger is now ahead of the database. The batch will be redelivered:
            # judge it again exactly as the first time, against what is stored.
            self._forget()
            if isinstance(exc, OperationalError):
                raise StoreUnavailable(f"database {self.store.describe()}: {str(exc.orig)[:200]}") from exc
            raise
        report_held_back(dead, log)
        return dead

    def _apply(self, pulse: Pulse, now_ns: int, *, readmitted: bool) -> None:
        try:
            self.ledger.apply(pulse, now_ns, readmitted=readmitted)
        except OtherPulseEnergy:
            if not readmitted:
                raise
            # A person readmitted it after the meter's constant changed (the command reached the MQTT writer).
            self.ledger.set_pulse_energy(pulse.meter, pulse.channel, pulse.wh)
            self.ledger.apply(pulse, now_ns, readmitted=True)

    def _resume(self, pulse: Pulse) -> None:
        """Seed the ledger from the database the first time a channel or epoch shows up."""
        channel_key = (pulse.meter, pulse.channel)
        epoch_key = (*channel_key, pulse.epoch)
        if epoch_key in self._resumed:
            return
        state = self.ledger.channel(pulse.meter, pulse.channel)
        if channel_key not in self._resumed:
            self.ledger.admit(pulse.meter, self.started_ns)
            state.last_ts_ns = self.store.last_ts(pulse.meter, pulse.channel)
            wh = self.store.pulse_energy(pulse.meter, pulse.channel)
            if wh is not None:
                state.wh, state.wh_fixed = wh, True
            self._resumed.add(channel_key)
        latest = self.store.latest(pulse.meter, pulse.channel, pulse.epoch)
        if latest is not None:
            seq, ts_ns, latest_ns = latest
            state.epochs[pulse.epoch] = Cursor(seq, ts_ns, latest_ns=latest_ns)
        self._resumed.add(epoch_key)


def run_db_writer(config: Config, stop: threading.Event) -> None:
    """Run until ``stop`` is set; raises SchemaError or OperationalError if the database is unusable at start."""
    store = PulseStore.open(database_url(config))
    log.info("storing pulses from %s in %s", config.db_queue, store.describe())
    writer = DbWriter(store, config.max_power_w, max_rates=rate_limits(config))
    consumer = BatchConsumer(config, config.db_queue, DB_WRITER_BINDINGS, writer.handle_batch,
                             heartbeat=Heartbeat.of(config, DB_WRITER), name="emdc-db-writer")
    try:
        consumer.run(stop)
    finally:
        store.close()
        log.info("db-writer stopped")

