"""PublishWindow without a broker: unit tests, and property tests over arbitrary broker behaviour.

The state machine plays both the publisher shell (it does what the window's
answers say, as AmqpPublisher does) and a broker that confirms in any order,
with or without the multiple flag, nacks, returns messages before acking them
and drops the connection; the outbox is a dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from edge.publish_window import Confirmed, PublishWindow, Step


@dataclass(frozen=True)
class Msg:
    message_id: str


def rows(*ids: int) -> list[tuple[int, Msg]]:
    return [(i, Msg(f"m{i}")) for i in ids]


def opened(size: int) -> PublishWindow[Msg]:
    window: PublishWindow[Msg] = PublishWindow(size)
    window.open()
    return window


# -- unit tests ------------------------------------------------------------------


def test_nothing_is_sent_before_open_or_while_the_window_is_full() -> None:
    window: PublishWindow[Msg] = PublishWindow(3)
    assert window.wanted() == 0
    window.open()
    assert (window.wanted(), window.last_sent) == (3, 0)
    window.take(rows(1, 2, 3))
    assert (window.wanted(), window.in_flight, window.last_sent) == (0, 3, 3)


def test_a_confirm_asks_for_a_fetch_only_if_the_last_one_filled_the_window() -> None:
    window = opened(3)
    window.take(rows(1, 2))  # fewer than wanted: the outbox held no more
    assert window.confirm(1, multiple=False, ack=True) == Confirmed(True, Step.WAIT)
    assert window.wanted() == 2
    window.take(rows(3, 4))  # as many as wanted: more may be waiting
    assert window.confirm(2, multiple=False, ack=True) == Confirmed(True, Step.PUMP)


def test_delivery_tags_count_publishes_and_multiple_covers_only_tags_still_in_flight() -> None:
    window = opened(5)
    window.take(rows(10, 11, 12, 13))  # tags 1..4
    assert window.confirm(3, multiple=False, ack=True).acked
    assert window.confirm(2, multiple=False, ack=False) == Confirmed(False, Step.WAIT)  # tag 1 and 4 in flight
    assert window.confirm(3, multiple=True, ack=True) == Confirmed(True, Step.WAIT)  # settles tag 1 only
    assert (window.to_delete, window.in_flight, window.paused) == ([12, 10], 1, True)
    assert window.confirm(4, multiple=True, ack=True) == Confirmed(True, Step.RESEND)
    assert window.to_delete == [12, 10, 13]


def test_a_nack_pauses_until_nothing_is_in_flight_then_resend_reads_from_the_start() -> None:
    window = opened(4)
    window.take(rows(1, 2, 3))
    assert window.confirm(1, multiple=False, ack=False) == Confirmed(False, Step.WAIT)
    assert window.paused and window.wanted() == 0
    assert window.confirm(3, multiple=True, ack=True) == Confirmed(True, Step.RESEND)
    assert window.to_delete == [2, 3]
    assert not window.deletes_due  # a fetch after id 3 could not return them
    window.resend()
    assert (window.paused, window.last_sent, window.wanted(), window.deletes_due) == (False, 0, 4, True)
    window.deleted()
    assert not window.deletes_due


def test_a_returned_message_is_acked_but_stays_in_the_outbox() -> None:
    window = opened(4)
    window.take(rows(1, 2))
    window.returned("m2")
    assert window.confirm(2, multiple=True, ack=True) == Confirmed(True, Step.RESEND)
    assert (window.to_delete, window.paused) == ([1], True)
    window.resend()
    window.deleted()
    window.take(rows(2))  # tag 3: sent again, and this time routed
    assert window.confirm(3, multiple=False, ack=True) == Confirmed(True, Step.WAIT)
    assert window.to_delete == [2]


def test_a_reset_forgets_what_is_in_flight_and_keeps_what_was_confirmed() -> None:
    window = opened(4)
    window.take(rows(1, 2, 3))
    window.returned("m3")
    window.confirm(1, multiple=False, ack=False)
    window.confirm(2, multiple=False, ack=True)
    window.reset()
    assert (window.in_flight, window.paused, window.wanted(), window.to_delete) == (0, False, 0, [2])
    assert window.confirm(3, multiple=True, ack=True) == Confirmed(False, Step.WAIT)  # not of this session
    window.open()
    assert (window.last_sent, window.wanted(), window.deletes_due) == (0, 4, True)
    window.deleted()
    window.take(rows(1, 3))  # tags start again at 1; m3's old return does not count
    assert window.confirm(2, multiple=True, ack=True) == Confirmed(True, Step.WAIT)
    assert window.to_delete == [1, 3]


def test_deletes_are_due_when_a_windows_worth_is_confirmed() -> None:
    window = opened(2)
    window.take(rows(1, 2))
    window.confirm(1, multiple=False, ack=True)
    assert not window.deletes_due
    window.confirm(2, multiple=False, ack=True)
    assert window.deletes_due
    window.deleted()
    assert (window.to_delete, window.deletes_due) == ([], False)


def test_unknown_tags_change_nothing() -> None:
    window = opened(2)
    assert window.confirm(1, multiple=True, ack=False) == Confirmed(False, Step.WAIT)
    window.take(rows(1))
    assert window.confirm(7, multiple=False, ack=False) == Confirmed(False, Step.WAIT)
    assert window.confirm(1, multiple=False, ack=True) == Confirmed(True, Step.WAIT)
    assert window.confirm(1, multiple=False, ack=False) == Confirmed(False, Step.WAIT)
    assert (window.paused, window.to_delete) == (False, [1])


def test_message_ids_are_not_read_unless_a_return_is_pending() -> None:
    reads = 0

    class Counting:
        @property
        def message_id(self) -> str:
            nonlocal reads
            reads += 1
            return "x"

    window: PublishWindow[Counting] = PublishWindow(4)
    window.open()
    window.take([(1, Counting()), (2, Counting())])
    window.confirm(2, multiple=True, ack=True)
    assert reads == 0


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        PublishWindow(0)
    window = opened(2)
    with pytest.raises(ValueError, match="do not fit"):
        window.take(rows(1, 2, 3))
    window.take(rows(1))
    window.confirm(1, multiple=False, ack=False)
    window.take(rows())  # paused: an empty fetch is harmless
    with pytest.raises(ValueError, match="do not fit"):
        window.take(rows(2))
    window.reset()
    window.open()
    window.take(rows(1))
    with pytest.raises(RuntimeError, match="in flight"):
        window.resend()


# -- properties --------------------------------------------------------------------


class PublisherAndBroker(RuleBasedStateMachine):
    """The shell follows the window's answers; the broker does anything a broker may do."""

    def __init__(self) -> None:
        super().__init__()
        self.outbox: dict[int, Msg] = {}
        self.next_id = 1
        self.size = 1
        self.window: PublishWindow[Msg] = PublishWindow(1)
        self.connected = False
        self.resend_scheduled = False
        self.tag = 0  # the broker's count of publishes on this channel
        self.outstanding: dict[int, tuple[int, Msg]] = {}  # tag -> row, not yet confirmed
        self.returned_tags: set[int] = set()
        self.acked_ok: set[int] = set()  # rows the broker acked without returning them
        self.pass_last = 0  # newest id sent since the session start or the last resend
        self.disk_full = False  # the outbox refuses deletes: acked rows stay in it, and must not go out again

    # -- the shell --

    def pump(self) -> None:
        window = self.window
        if window.deletes_due:
            self.delete()
        limit = window.wanted()
        if not limit:
            return
        fetched = [(i, self.outbox[i]) for i in sorted(self.outbox) if i > window.last_sent][:limit]
        in_flight = {row_id for row_id, _ in self.outstanding.values()}
        for row_id, msg in window.take(fetched):
            assert row_id > self.pass_last, "(4) rows are sent in id order"
            assert row_id not in window.to_delete, "a confirmed row was sent again"
            assert row_id not in in_flight, "a row was sent twice at once"
            self.pass_last = row_id
            self.tag += 1
            self.outstanding[self.tag] = (row_id, msg)
            assert len(self.outstanding) <= self.size, "(3) more messages in flight than the window"

    def check_deletable(self) -> None:
        to_delete = list(self.window.to_delete)
        for row_id in to_delete:
            assert row_id in self.acked_ok, f"(1) row {row_id} to be deleted without a routed ack"
        assert len(set(to_delete)) == len(to_delete), "a row to be deleted twice"

    def delete(self) -> None:
        self.check_deletable()
        if self.disk_full:
            return
        for row_id in self.window.to_delete:
            del self.outbox[row_id]
        self.window.deleted()

    def broker_confirms(self, tag: int, multiple: bool, ack: bool) -> None:
        covered = [t for t in self.outstanding if t <= tag] if multiple else [tag]
        expect_acked = False
        for t in covered:
            row_id, _ = self.outstanding.pop(t)
            if ack and t not in self.returned_tags:
                self.acked_ok.add(row_id)
                expect_acked = True
            self.returned_tags.discard(t)
        acked, step = self.window.confirm(tag, multiple, ack)
        self.check_deletable()
        assert acked == expect_acked
        if acked and self.window.deletes_due:
            self.delete()
        if step is Step.PUMP:
            self.pump()
        elif step is Step.RESEND:
            assert not self.outstanding and self.window.paused and not self.resend_scheduled
            self.resend_scheduled = True

    def connect(self) -> None:
        self.window.open()
        self.connected = True
        self.pass_last = 0
        self.pump()

    def fire_resend(self) -> None:
        self.resend_scheduled = False
        self.window.resend()
        self.pass_last = 0
        self.pump()

    # -- rules --

    @initialize(size=st.integers(1, 4), backlog=st.integers(0, 6))
    def start(self, size: int, backlog: int) -> None:
        self.size = size
        self.window = PublishWindow(size)
        self.add_rows(backlog, wake=False)
        self.connect()

    @rule(count=st.integers(1, 4), wake=st.booleans())
    def add_rows(self, count: int, wake: bool) -> None:
        for _ in range(count):
            self.outbox[self.next_id] = Msg(f"m{self.next_id}")
            self.next_id += 1
        if wake and self.connected:  # a wake-up while disconnected is lost
            self.pump()

    @rule()
    def tick(self) -> None:
        self.pump()
        self.delete()

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data(), multiple=st.booleans(), ack=st.sampled_from([True, True, False]))
    def confirm(self, data: st.DataObject, multiple: bool, ack: bool) -> None:
        self.broker_confirms(data.draw(st.sampled_from(sorted(self.outstanding))), multiple, ack)

    @precondition(lambda self: set(self.outstanding) - self.returned_tags)
    @rule(data=st.data())
    def return_message(self, data: st.DataObject) -> None:
        tag = data.draw(st.sampled_from(sorted(set(self.outstanding) - self.returned_tags)))
        self.returned_tags.add(tag)
        self.window.returned(self.outstanding[tag][1].message_id)

    @precondition(lambda self: self.connected)
    @rule(delete_at_end=st.booleans())
    def lose_connection(self, delete_at_end: bool) -> None:
        self.window.reset()
        self.connected = False
        self.resend_scheduled = False  # the timer died with the connection's loop
        self.tag = 0
        self.outstanding.clear()
        self.returned_tags.clear()
        if delete_at_end:
            self.delete()

    @precondition(lambda self: not self.connected)
    @rule()
    def reconnect(self) -> None:
        self.connect()

    @rule(full=st.booleans())
    def disk(self, full: bool) -> None:
        self.disk_full = full

    @precondition(lambda self: self.resend_scheduled)
    @rule()
    def resend(self) -> None:
        self.fire_resend()

    @invariant()
    def only_routed_acks_are_deleted_and_the_window_counts_like_the_broker(self) -> None:
        self.check_deletable()
        assert len(self.outstanding) <= self.size, "(3) more messages in flight than the window"
        assert self.window.in_flight == len(self.outstanding), "the window lost count of what is in flight"

    def teardown(self) -> None:
        """(2) Once the broker acks everything and the disk takes deletes, one wake-up drains the outbox."""
        self.disk_full = False
        if self.connected:
            self.pump()
        else:
            self.connect()
        for _ in range(2 * len(self.outbox) + 10):
            if self.resend_scheduled:
                self.fire_resend()
            elif self.outstanding:
                self.broker_confirms(max(self.outstanding), multiple=True, ack=True)
            else:
                break
        self.delete()
        assert not self.outbox, f"(2) rows never delivered: {sorted(self.outbox)}"


PublisherAndBroker.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_publisher_and_broker = PublisherAndBroker.TestCase
