"""Drain the outbox to RabbitMQ with pipelined publisher confirms.

Runs pika's asynchronous ``SelectConnection`` in its own thread, so heartbeats
are serviced while idle and up to ``publish_window`` messages are in flight.
Rows are sent in outbox order with ``mandatory=True`` and deleted only when the
broker confirmed them: in one transaction per second (and at the end of each
session), not one per confirm, which saves about a tenth of the edge's CPU at
10 pulses/s. A kill -9 can therefore leave up to a second of delivered rows
behind, which are sent again after the restart and ignored by the writer as
duplicates. A returned (unroutable) or nacked message stays in the
outbox; once nothing is in flight the publisher pauses with capped backoff
and resends everything still in the outbox. Resends are harmless: the backend
counts by ``seq``.

The outbox may refuse writes for a while (a full or read-only disk). The
publisher then keeps the confirmed row ids and the status in memory and writes
them once the disk takes them, with a capped backoff
(:class:`~edge.store_retry.StoreRetry`); a failed read waits the same way. Rows
confirmed but not yet deleted are not sent again meanwhile. One log line marks
each change, none each attempt, so no storage fault ends the thread.

Beside the pulses, a second channel carries the edge's status
(:mod:`edge.status_report`) every ``status_interval_s`` and at once when the
link comes up or the clock's synchronisation changes: unconfirmed, transient
and with a time to live, so it never waits for nor delays a pulse.

The rules for all of this live in :class:`~edge.publish_window.PublishWindow`,
which holds no connection; AmqpPublisher only feeds it pika's callbacks and
carries out its answers (publish these rows, delete those, resend later).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec

from common.amqp import connection_parameters, describe, reason
from common.backoff import Backoff
from common.config import Config
from common.message import CONTENT_TYPE, Pulse, encode, encode_status
from common.topology import declare_exchange
from edge.outbox import OutboxReader, StoreError
from edge.publish_window import PublishWindow, Step
from edge.status_report import EdgeFacts, StatusSchedule, cpu_temperature, make_status
from edge.store_retry import StoreRetry

log = logging.getLogger("emdc.publisher")

STATUS_EVERY_S = 5.0
# A safety net only: new rows and stop requests arrive through wake(). Each tick
# wakes the thread, which costs CPU on a Pi Zero even when no pulse comes.
TICK_S = 1.0


class AmqpPublisher:
    """Publishes outbox rows until ``stop`` is set; reconnects forever.

    The edge's link to the backend: it owns the pika connection and its thread,
    so the recorder never waits for the network. Example::

        publisher = AmqpPublisher(config, outbox.reader)
        threading.Thread(target=publisher.run, args=(stop,)).start()
        publisher.wake()     # after recording new pulses
    """

    def __init__(self, config: Config, open_reader: Callable[[], OutboxReader],
                 facts: Callable[[], EdgeFacts] | None = None) -> None:
        self.config = config
        self._open_reader = open_reader
        # What the recorder side knows for a status (None: send none).
        self._facts = facts
        self._schedule = StatusSchedule(config.status_interval_s)
        self._status_channel: pika.channel.Channel | None = None
        self._backoff = Backoff()
        self._connection: pika.SelectConnection | None = None
        self._channel: pika.channel.Channel | None = None
        self._stop = threading.Event()
        self._state = ""
        # Built once: it is compared on every confirm, the per-pulse path.
        self._publishing = f"publishing to exchange {config.exchange} on {describe(config)}"
        # Each pulse names the account that sent it; the broker refuses a name that is not the connection's own.
        self._user_id = pika.URLParameters(config.amqp_url).credentials.username
        self._status_due = 0.0
        self.last_confirm_ns = 0
        self._window: PublishWindow[Pulse] = PublishWindow(config.publish_window)
        self._writes = StoreRetry()  # deletes and status writes
        self._reads = StoreRetry()
        self._unsaved: dict[str, str] = {}  # status not yet written to the outbox
        # After a nack, pulses go again on a new channel: RabbitMQ 3.10 went on refusing everything on a channel
        # whose quorum queue had changed leader, while a new channel was accepted at once.
        self._renew_channel = False
        self._renewing = False

    # -- thread entry points -------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        self._reader = self._open_reader()
        try:
            while not stop.is_set():
                self._connection = pika.SelectConnection(
                    connection_parameters(self.config, "emdc-edge"), on_open_callback=self._on_open,
                    on_open_error_callback=self._on_open_error, on_close_callback=self._on_closed)
                self._connection.ioloop.call_later(TICK_S, self._tick)
                self._connection.ioloop.start()
                self._delete_confirmed()
                if not stop.is_set():
                    stop.wait(self._backoff.next_delay())
        finally:
            try:
                self._delete_confirmed(last_chance=True)
                self._set_state("stopped")
            finally:
                self._reader.close()

    def wake(self) -> None:
        """Thread-safe: new rows are in the outbox, or ``stop`` was set."""
        connection = self._connection
        if connection is not None:
            # If the loop is closing this fails; the next session starts from the outbox anyway.
            with contextlib.suppress(Exception):
                connection.ioloop.add_callback_threadsafe(self._on_wake)

    # -- state reporting -----------------------------------------------------

    def _set_state(self, state: str, level: int = logging.INFO) -> None:
        if state != self._state:
            self._state = state
            log.log(level, "%s", state)
            self._save_status(link_state=state)

    def _save_status(self, **values: str) -> None:
        """Store status for ``emdc edge status``; what the outbox refuses now is written with the next attempt."""
        self._unsaved.update(values)
        if self._try_write(self._write_status, "cannot save the link status in the outbox"):
            self._unsaved.clear()

    def _write_status(self) -> None:
        self._reader.set_status(**self._unsaved)

    def _try_write(self, write: Callable[[], None], failure: str, last_chance: bool = False) -> bool:
        """Run ``write`` unless a failed write is still backing off (or on the ``last_chance``); False if not done.

        The first failure and the first success after failures are logged, one line each.
        """
        writes = self._writes
        if not last_chance and not writes.due(time.monotonic()):
            return False
        try:
            write()
        except StoreError as exc:
            if writes.failed(exc.reason, time.monotonic()) and not exc.damaged:  # the service reports damage
                log.warning("%s (%s); retrying", failure, exc.reason)
            return False
        if writes.succeeded():
            log.info("outbox writable again")
        return True

    def _on_wake(self) -> None:
        if self._stop.is_set():
            self._close()
        else:
            self._pump()

    def _tick(self) -> None:
        """Periodic: notice a stop request, pick up missed rows, save status."""
        self._on_wake()
        if self._stop.is_set():
            return
        self._delete_confirmed()
        self._send_status()
        if time.monotonic() >= self._status_due and self.last_confirm_ns:
            self._status_due = time.monotonic() + STATUS_EVERY_S
            self._save_status(last_confirm_ns=str(self.last_confirm_ns))
        elif self._unsaved:
            self._save_status()
        if self._connection is not None:
            self._connection.ioloop.call_later(TICK_S, self._tick)

    def _close(self) -> None:
        connection = self._connection
        if connection is None:
            return
        if connection.is_open:
            connection.close()
        elif not connection.is_closing:
            connection.ioloop.stop()

    # -- connection lifecycle ------------------------------------------------

    def _on_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)
        if self._facts is not None:
            # Opened beside the pulses' channel, which needs more round trips: the first status tells the outbox
            # as the outage left it, before the backlog is sent.
            connection.channel(on_open_callback=self._on_status_channel_open)

    def _on_open_error(self, connection: pika.SelectConnection, error: BaseException) -> None:
        self._set_state(f"cannot reach RabbitMQ at {describe(self.config)} ({reason(error)}); "
                        "spooling pulses in the outbox", logging.WARNING)
        connection.ioloop.stop()

    def _on_closed(self, connection: pika.SelectConnection, error: BaseException) -> None:
        self._window.reset()  # what was in flight is sent again from the outbox next session
        self._channel = self._status_channel = None
        if not self._stop.is_set():
            self._set_state(f"lost RabbitMQ at {describe(self.config)} ({reason(error)}); "
                            "spooling pulses in the outbox", logging.WARNING)
        connection.ioloop.stop()

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        if self.config.declare_topology:
            declare_exchange(channel, self.config.exchange, callback=lambda _frame: self._enable_confirms())
        else:
            self._enable_confirms()

    def _enable_confirms(self) -> None:
        assert self._channel is not None
        self._channel.confirm_delivery(self._on_confirm, callback=lambda _frame: self._on_ready())

    def _on_ready(self) -> None:
        self._window.open()
        self._backoff.reset()
        self._set_state(self._publishing)
        self._pump()

    # -- status --------------------------------------------------------------

    def _on_status_channel_open(self, channel: pika.channel.Channel) -> None:
        self._status_channel = channel
        channel.add_on_close_callback(self._on_status_channel_closed)
        self._schedule.link_up()
        self._send_status()

    def _on_status_channel_closed(self, _channel: pika.channel.Channel, error: BaseException) -> None:
        self._status_channel = None
        if not self._stop.is_set() and isinstance(error, pika.exceptions.ChannelClosedByBroker):
            log.warning("RabbitMQ closed the status channel (%s): pulses go on, the writer cannot tell this edge "
                        "alive while the meter is quiet; statuses are tried again at the next connection",
                        reason(error))

    def _send_status(self) -> None:
        """Publish a status if one is due and its channel is open; a status the outbox cannot describe now is
        skipped (the next replaces it)."""
        channel, facts_of = self._status_channel, self._facts
        if channel is None or facts_of is None or not channel.is_open:
            return
        facts, now = facts_of(), time.monotonic()
        if not self._schedule.due(now, facts.synced):
            return
        try:
            status = make_status(self.config.meter_id, self._reader, facts, now_ns=time.time_ns(),
                                 last_confirm_ns=self.last_confirm_ns, cpu_c=cpu_temperature())
        except StoreError:
            return
        self._schedule.sent(now, facts.synced)
        # A status older than the writer's timeout says nothing true any more: the broker drops it.
        ttl_ms = int(self.config.edge_timeout() * 1000)
        properties = pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=1, user_id=self._user_id,
                                          expiration=str(ttl_ms))
        channel.basic_publish(self.config.exchange, status.routing_key, encode_status(status), properties)

    def _on_channel_closed(self, _channel: pika.channel.Channel, error: BaseException) -> None:
        # e.g. NOT_FOUND (exchange missing) or ACCESS_REFUSED: retry the whole connection later. A channel that
        # closes with its connection is not worth a line of its own: _on_closed says what happened.
        self._window.reset()
        if self._renewing:  # closed by _resend, to go on with a new one
            self._renewing = False
            if self._connection is not None and self._connection.is_open:
                self._connection.channel(on_open_callback=self._on_channel_open)
            return
        if not self._stop.is_set() and isinstance(error, pika.exceptions.ChannelClosedByBroker):
            self._set_state(f"RabbitMQ closed the channel ({reason(error)}); retrying", logging.WARNING)
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    # -- publishing ----------------------------------------------------------

    def _pump(self) -> None:
        window = self._window
        if window.deletes_due:  # a window's worth, or the outbox is about to be read again from its start
            self._delete_confirmed()
        limit = window.wanted()
        if not limit:
            return
        reads = self._reads
        if reads.failing and not reads.due(time.monotonic()):
            return  # the tick tries again
        try:
            rows = self._reader.pending(window.last_sent, limit)
        except StoreError as exc:
            if reads.failed(exc.reason, time.monotonic()) and not exc.damaged:
                log.warning("cannot read the outbox (%s); retrying", exc.reason)
            return
        if reads.failing and reads.succeeded():
            log.info("outbox readable again")
        channel = self._channel
        assert channel is not None  # the window is open only while the channel is
        for _row_id, pulse in window.take(rows):
            properties = pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=2,
                                              message_id=pulse.message_id, user_id=self._user_id)
            channel.basic_publish(self.config.exchange, pulse.routing_key, encode(pulse), properties,
                                  mandatory=True)

    def _on_return(self, _channel: Any, method: pika.spec.Basic.Return, properties: pika.BasicProperties,
                   _body: bytes) -> None:
        self._window.returned(properties.message_id)
        self._set_state(f"unroutable: no queue bound to {method.exchange} for {method.routing_key}; "
                        "keeping pulses in the outbox and retrying", logging.WARNING)

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        window = self._window
        acked, step = window.confirm(method.delivery_tag, method.multiple, isinstance(method, pika.spec.Basic.Ack))
        if isinstance(method, pika.spec.Basic.Nack):
            self._renew_channel = True
            self._set_state("RabbitMQ refused pulses (nack); sending them again on a new channel", logging.WARNING)
        if acked:
            if window.deletes_due:  # replaying a backlog
                self._delete_confirmed()
            self.last_confirm_ns = time.time_ns()
            if not window.paused:
                self._backoff.reset()
                self._set_state(self._publishing)
        if step is Step.PUMP:  # new rows come with wake(); only a full window leaves rows behind
            self._pump()
        elif step is Step.RESEND:
            assert self._connection is not None
            self._connection.ioloop.call_later(self._backoff.next_delay(), self._resend)

    def _delete_confirmed(self, last_chance: bool = False) -> None:
        rows = self._window.to_delete
        if rows and self._try_write(lambda: self._reader.confirm(rows),
                                    "cannot delete confirmed pulses from the outbox", last_chance):
            self._window.deleted()

    def _resend(self) -> None:
        """After a return or nack: start again from the oldest row still in the outbox (after a nack, on a new
        channel)."""
        self._window.resend()
        if self._renew_channel and self._channel is not None:
            self._renew_channel = False
            self._renewing = True
            channel, self._channel = self._channel, None
            channel.close()  # _on_channel_closed opens the next; _on_ready pumps
            return
        self._pump()  # which deletes the confirmed rows first, so they are not sent again
