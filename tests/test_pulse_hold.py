"""edge.pulse_hold: pulses held in memory while the outbox refuses writes; bounded, with the count exact."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.pulse_hold import PulseHold

CHANNELS = ("active", "reactive")

# A run of the recorder while the disk fails: batches of pulses arrive with a clock state, and between them a
# write of up to `size` pulses is tried, which the disk takes or refuses.
steps = st.lists(st.one_of(
    st.tuples(st.just("add"), st.lists(st.sampled_from(CHANNELS), max_size=8), st.sampled_from([None, False, True])),
    st.tuples(st.just("write"), st.integers(1, 6), st.booleans()),
), max_size=60)


class Outbox:
    """What Outbox.record does with a batch: skip the counter past the skipped pulses, then number each pulse."""

    def __init__(self) -> None:
        self.seq = dict.fromkeys(CHANNELS, 0)
        self.rows: list[tuple[str, int, int, bool | None]] = []  # channel, seq, ts_ns, synced

    def record(self, pulses: list[tuple[str, int, float]], synced: bool | None, skipped: dict[str, int]) -> None:
        for channel, count in skipped.items():
            self.seq[channel] += count
        for channel, ts_ns, _wh in pulses:
            self.seq[channel] += 1
            self.rows.append((channel, self.seq[channel], ts_ns, synced))


@given(steps, st.integers(1, 10))
def test_every_pulse_is_counted_once_in_order_and_the_hold_stays_within_its_limit(steps, limit: int) -> None:
    hold = PulseHold(limit)
    outbox = Outbox()
    added = dict.fromkeys(CHANNELS, 0)
    stamped: dict[int, bool | None] = {}  # ts_ns -> the clock state it was stamped with
    ts = 0
    for step in steps:
        if step[0] == "add":
            _, channels, synced = step
            batch = []
            for channel in channels:
                ts += 1
                stamped[ts] = synced
                batch.append((channel, ts, 1.0))
                added[channel] += 1
            hold.add(batch, synced)
        else:
            _, size, disk_takes_it = step
            batch = hold.batch(size)
            assert len(batch.pulses) <= size
            if disk_takes_it:
                outbox.record(batch.pulses, batch.synced, batch.skipped)
                hold.written(batch)
        assert len(hold) <= limit
        assert hold.pending == sum(added.values()) - sum(outbox.seq.values())
    while hold.pending:  # the disk is back
        batch = hold.batch(4)
        outbox.record(batch.pulses, batch.synced, batch.skipped)
        hold.written(batch)
    assert outbox.seq == added, "the counter advanced by exactly the pulses that happened"
    for channel in CHANNELS:
        rows = [row for row in outbox.rows if row[0] == channel]
        assert [r[2] for r in rows] == sorted(r[2] for r in rows), "stored in the order they happened"
        assert [r[1] for r in rows] == sorted({r[1] for r in rows}), "no seq twice, rising"
    assert all(stamped[ts_ns] == synced for _, _, ts_ns, synced in outbox.rows), "each with its own clock state"
    assert hold.dropped == 0


def test_beyond_the_limit_the_oldest_timing_goes_and_its_count_stays() -> None:
    hold = PulseHold(limit=3)
    assert hold.add([("active", t, 1.0) for t in range(1, 6)], synced=True) == 2
    assert hold.add([("reactive", 6, 1.0)], synced=True) == 1
    assert (len(hold), hold.pending, hold.skipped, hold.dropped) == (3, 6, {"active": 3}, 3)
    assert [ts for _, ts, _ in hold.batch(limit=10).pulses] == [4, 5, 6]


def test_a_batch_holds_pulses_of_one_clock_state() -> None:
    hold = PulseHold()
    hold.add([("active", 1, 1.0), ("active", 2, 1.0)], synced=False)
    hold.add([("active", 3, 1.0)], synced=True)
    first = hold.batch(limit=10)
    assert ([ts for _, ts, _ in first.pulses], first.synced) == ([1, 2], False)
    hold.written(first)
    second = hold.batch(limit=10)
    assert ([ts for _, ts, _ in second.pulses], second.synced) == ([3], True)


def test_a_hold_keeps_at_least_one_pulse() -> None:
    with pytest.raises(ValueError, match="at least one"):
        PulseHold(limit=0)
