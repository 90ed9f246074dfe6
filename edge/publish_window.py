"""The bookkeeping behind the edge's publisher confirms, apart from pika.

:class:`PublishWindow` decides which outbox rows go out next, which delivery
tag each one gets, what a confirm, nack or basic.return means for them, when
to pause and resend, and which rows the outbox may delete. It holds no
connection, thread, clock or file, so arbitrary interleavings of confirms,
returns and reconnects can be tested without a broker
(``tests/test_publish_window.py``).
:class:`~edge.amqp_publisher.AmqpPublisher` feeds it what pika reports and
does what its answers say.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Generic, NamedTuple, Protocol, TypeVar


class Message(Protocol):
    """What the window needs of a row's payload: the id a basic.return names it by.

    :class:`common.message.Pulse` is one. Example::

        window: PublishWindow[Pulse] = PublishWindow(512)
    """

    @property
    def message_id(self) -> str: ...


M = TypeVar("M", bound=Message)


class Step(Enum):
    """What the shell does after a confirm; the window cannot act itself, having no channel or timer.

    Example::

        if step is Step.PUMP:
            pump()                             # wanted(), fetch, take(), publish
        elif step is Step.RESEND:
            call_later(backoff, resend_then_pump)
    """

    WAIT = "wait"  # nothing to do until the next confirm or new rows
    PUMP = "pump"  # room was freed and the outbox may hold rows beyond the last fetch
    RESEND = "resend"  # paused and nothing in flight: call resend() after a backoff delay


class Confirmed(NamedTuple):
    """The answer to a confirm: were rows acked (they now wait in ``to_delete``), and the next step.

    A named pair so the shell can unpack it in one line. Example::

        acked, step = window.confirm(tag, multiple, ack)
    """

    acked: bool
    step: Step


_NOTHING = Confirmed(False, Step.WAIT)


class PublishWindow(Generic[M]):
    """Up to ``size`` outbox rows in flight awaiting confirms, and the confirmed rows awaiting deletion.

    Why a class of its own: the rules interact (a return arrives before its ack,
    a multiple ack settles several rows at once, a nack pauses sending until
    everything in flight is settled, a reconnect forgets what was in flight but
    not what was confirmed) and are easier to get right and to test without a
    broker. Rows are ``(row_id, message)`` pairs in outbox (id) order; delivery
    tags count the publishes of a channel from 1, as the broker does.

    >>> from types import SimpleNamespace
    >>> def rows(*ids):
    ...     return [(i, SimpleNamespace(message_id=f"m{i}")) for i in ids]
    >>> window = PublishWindow(size=2)
    >>> window.open()                                # the channel is in confirm mode
    >>> window.wanted(), window.last_sent            # fetch up to 2 rows after id 0
    (2, 0)
    >>> batch = window.take(rows(1, 2))              # publish them in order: tags 1 and 2
    >>> window.wanted()                              # the window is full
    0
    >>> window.confirm(2, multiple=True, ack=True)   # the outbox may hold more: fetch again
    Confirmed(acked=True, step=<Step.PUMP: 'pump'>)
    >>> window.to_delete                             # delete these from the outbox, then:
    [1, 2]
    >>> window.deleted()

    A returned (unroutable) message is acked too, but stays in the outbox; once
    nothing is in flight the shell waits, calls :meth:`resend` and reads the
    outbox again from its start:

    >>> batch = window.take(rows(3))                 # tag 3
    >>> window.returned("m3")
    >>> window.confirm(3, multiple=False, ack=True)
    Confirmed(acked=False, step=<Step.RESEND: 'resend'>)
    >>> window.wanted()                              # paused
    0
    >>> window.resend()
    >>> window.wanted(), window.last_sent
    (2, 0)
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a publish window holds at least one message, not {size}")
        self.size = size
        self._to_delete: list[int] = []  # row ids the broker acked, still in the outbox
        self.reset()

    # -- session ---------------------------------------------------------------

    def open(self) -> None:
        """The channel is in confirm mode: rows may be sent."""
        self._open = True

    def reset(self) -> None:
        """The channel is gone: forget what was in flight, keep ``to_delete``; nothing is sent until :meth:`open`.

        The forgotten rows are still in the outbox, which the next session reads
        from its start.

        >>> from types import SimpleNamespace
        >>> window = PublishWindow(size=4)
        >>> window.open()
        >>> batch = window.take([(1, SimpleNamespace(message_id="a")), (2, SimpleNamespace(message_id="b"))])
        >>> window.confirm(1, multiple=False, ack=True).acked
        True
        >>> window.reset()
        >>> window.in_flight, window.to_delete, window.wanted()
        (0, [1], 0)
        >>> window.open()
        >>> window.deletes_due, window.last_sent     # delete row 1 before reading from id 0
        (True, 0)
        """
        self._open = False  # the channel is in confirm mode
        self._paused = False  # after a nack or return, until resend()
        self._tag = 0  # delivery tag of the newest publish
        self._oldest = 1  # no tag below this one is in flight
        self._more = True  # the outbox may hold rows beyond the last fetch
        self._inflight: dict[int, tuple[int, M]] = {}  # tag -> row, oldest first
        self._returned: set[str] = set()  # message ids returned, their ack still to come
        self._restart_from_zero()

    def _restart_from_zero(self) -> None:
        """The next fetch reads the outbox from its start; rows acked but not yet deleted must not go out again.

        Normally the shell deletes them before that fetch (:attr:`deletes_due`);
        if the outbox refuses the delete, :meth:`take` skips them instead.
        """
        self._last_id = 0  # outbox id of the newest row fetched since the last (re)start
        self._acked_undeleted = set(self._to_delete)

    # -- sending ---------------------------------------------------------------

    @property
    def paused(self) -> bool:
        """A nack or return stopped sending until :meth:`resend` (or :meth:`reset`)."""
        return self._paused

    @property
    def in_flight(self) -> int:
        """Messages sent and not yet confirmed in this session."""
        return len(self._inflight)

    @property
    def last_sent(self) -> int:
        """Fetch the next rows after this outbox id (0: from the start)."""
        return self._last_id

    def wanted(self) -> int:
        """How many rows to fetch after :attr:`last_sent` and pass to :meth:`take`; 0: fetch none now.

        0 while closed or paused, or when the window is full; in that case the
        confirm that frees room answers :attr:`Step.PUMP`.
        """
        return self.size - len(self._inflight) if self._open and not self._paused else 0

    def take(self, rows: Sequence[tuple[int, M]]) -> Sequence[tuple[int, M]]:
        """Count ``rows`` (fetched as :meth:`wanted` said) as in flight and return them, to be published in order.

        They get the next delivery tags, one each. Fewer rows than wanted
        means the outbox holds no more for now: new rows come with a wake-up.
        Rows the broker acked already, still in the outbox because their
        delete failed, are left out of the answer.

        >>> from types import SimpleNamespace
        >>> def rows(*ids):
        ...     return [(i, SimpleNamespace(message_id=str(i))) for i in ids]
        >>> window = PublishWindow(size=4)
        >>> window.open()
        >>> batch = window.take(rows(1, 2))
        >>> window.confirm(1, multiple=False, ack=True).acked   # row 1 acked; its delete fails (disk full)
        True
        >>> window.reset(); window.open()                       # reconnected: read from the start again
        >>> [row_id for row_id, _ in window.take(rows(1, 2, 3))]
        [2, 3]
        """
        room = self.wanted()
        if len(rows) > room:
            raise ValueError(f"{len(rows)} rows do not fit in the publish window ({room} free)")
        self._more = len(rows) == room
        if rows:
            self._last_id = rows[-1][0]
            if self._acked_undeleted:
                acked = self._acked_undeleted
                rows = [row for row in rows if row[0] not in acked]
            inflight = self._inflight
            tag = self._tag
            for row in rows:
                tag += 1
                inflight[tag] = row
            self._tag = tag
        return rows

    def returned(self, message_id: str) -> None:
        """The broker returned this message (basic.return, before its ack): keep its row, pause at the ack."""
        self._returned.add(message_id)

    def confirm(self, tag: int, multiple: bool, ack: bool) -> Confirmed:
        """A basic.ack (``ack``) or basic.nack for ``tag``, or with ``multiple`` for every tag up to it in flight.

        Acked rows not returned go to :attr:`to_delete`; nacked or returned ones
        stay in the outbox and pause sending. Tags not in flight are ignored.

        >>> from types import SimpleNamespace
        >>> window = PublishWindow(size=4)
        >>> window.open()
        >>> batch = window.take([(i, SimpleNamespace(message_id=str(i))) for i in (7, 8, 9)])  # the outbox's last
        >>> window.confirm(2, multiple=False, ack=True)   # out of order; the others are still in flight
        Confirmed(acked=True, step=<Step.WAIT: 'wait'>)
        >>> window.confirm(3, multiple=True, ack=False)   # nacks tags 1 and 3
        Confirmed(acked=False, step=<Step.RESEND: 'resend'>)
        >>> window.to_delete, window.paused
        ([8], True)
        """
        inflight = self._inflight
        settled = acked = False
        if multiple:
            last = min(tag, self._tag)
            oldest = self._oldest
            while oldest <= last:
                row = inflight.pop(oldest, None)
                oldest += 1
                if row is not None:
                    settled = True
                    acked = self._settle(row, ack) or acked
            self._oldest = oldest
        else:
            row = inflight.pop(tag, None)
            if row is not None:
                settled = True
                acked = self._settle(row, ack)
        if not settled:
            return _NOTHING
        if self._paused:
            return Confirmed(acked, Step.WAIT if inflight else Step.RESEND)
        return Confirmed(acked, Step.PUMP if self._more else Step.WAIT)

    def _settle(self, row: tuple[int, M], ack: bool) -> bool:
        returned = self._returned
        if returned:
            message_id = row[1].message_id
            if message_id in returned:
                returned.discard(message_id)
                ack = False
        if ack:
            self._to_delete.append(row[0])
        else:
            self._paused = True
        return ack

    def resend(self) -> None:
        """End the pause: the next fetch starts again from the oldest row in the outbox.

        Only once nothing is in flight (the confirm that settles the last one
        answers :attr:`Step.RESEND`); :attr:`deletes_due` then asks for the
        confirmed rows to be deleted first, so they are not sent again.
        """
        if self._inflight:
            raise RuntimeError(f"resend() with {len(self._inflight)} messages in flight; wait for Step.RESEND")
        self._paused = False
        self._restart_from_zero()
        self._more = True

    # -- deleting --------------------------------------------------------------

    @property
    def to_delete(self) -> Sequence[int]:
        """Row ids the broker acked that are still in the outbox; call :meth:`deleted` once they are gone."""
        return self._to_delete

    @property
    def deletes_due(self) -> bool:
        """Delete :attr:`to_delete` now: a window's worth is waiting, or the next fetch starts from id 0."""
        return bool(self._to_delete) and (len(self._to_delete) >= self.size or self._last_id == 0)

    def deleted(self) -> None:
        """The rows of :attr:`to_delete` were deleted from the outbox."""
        self._to_delete = []
        self._acked_undeleted = set()
