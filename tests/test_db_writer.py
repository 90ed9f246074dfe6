"""The database writer and its store, on SQLite and on the real MariaDB: every pulse stored exactly once.

Store-level tests call :class:`DbWriter` directly; the rest run ``emdc db-writer``
against the real RabbitMQ, including kill -9 while it drains a backlog. Every
MariaDB test gets a database of its own, dropped afterwards.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pytest
import sqlalchemy as sa

from backend.batch import Delivery
from backend.database import DatabaseError, PulseStore, SchemaError, create_engine, schema_version
from backend.db_writer import DbWriter, StoreUnavailable
from backend.report import slots_from_pulses
from common.message import Pulse, encode
from common.topology import DB_WRITER_BINDINGS, ERROR_HEADER, dead_letter_queue
from tests.support import (
    ROOT,
    T0,
    Names,
    S,
    amqp_parameters,
    consumers,
    declare_queue,
    deliveries,
    port_open,
    publish,
    pulse,
    pulses,
    queue_depth,
    run_emdc,
    wait_until,
)

MARIADB_URL = os.environ.get("EMDC_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/")


def writer_clock() -> int:
    """The writer's clock for hand-made pulses (stamped from T0): an hour after them, so their times are trusted."""
    return T0 + 3600 * S


def ticking_clock() -> Callable[[], int]:
    """A writer's clock from an hour after the hand-made pulses, a second later at each reading: what vouches
    for pulses whose times cannot be trusted (the writer receives them no faster than the power limit allows)."""
    readings = itertools.count(T0 + 3600 * S, S)
    return lambda: next(readings)


@pytest.fixture(scope="session")
def mariadb() -> sa.Engine:
    """A server connection that may create databases; a MariaDB that is down fails the session, as brokers do."""
    url = sa.make_url(MARIADB_URL)
    if not port_open(url.host or "127.0.0.1", url.port or 3306):
        pytest.fail(f"MariaDB not reachable at {url.host}:{url.port or 3306}; start it (see .ci/run)")
    return sa.create_engine(url)


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.brokers)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a MariaDB database of this test's own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'pulses.sqlite3'}"
        return
    server = request.getfixturevalue("mariadb")
    name = f"emdc_test_{uuid.uuid4().hex[:10]}"
    with server.begin() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        yield sa.make_url(MARIADB_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with server.begin() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))


@pytest.fixture
def store(db_url: str) -> Iterator[PulseStore]:
    s = PulseStore.open(db_url)
    yield s
    s.close()


def rows(url: str) -> list[tuple[str, str, str, int, int, float]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("pulses"):
                return []  # the db-writer has not created its schema yet
            return [tuple(r) for r in conn.execute(sa.text(
                "SELECT meter, channel, epoch, seq, ts_ns, wh FROM pulses ORDER BY meter, channel, epoch, seq"))]
    finally:
        engine.dispose()


def wait_for_rows(url: str, count: int, timeout: float = 30) -> None:
    # Not the queue depth: it counts only ready messages, not a batch the writer holds or is committing.
    wait_until(lambda: len(rows(url)) >= count, timeout, f"{count} rows", interval=0.2)


# -- the store and the batch handler -------------------------------------------

def test_schema_is_created_once_versioned_and_required_by_readers(db_url: str) -> None:
    with pytest.raises(SchemaError, match="has emdc db-writer run"):
        PulseStore.open(db_url, create=False)
    PulseStore.open(db_url).close()
    PulseStore.open(db_url).close()  # a second start finds and keeps the schema
    PulseStore.open(db_url, create=False).close()
    engine = create_engine(db_url)
    with engine.begin() as conn:
        assert conn.execute(sa.select(schema_version.c.version)).scalars().all() == [1]
        conn.execute(schema_version.update().values(version=99))
    engine.dispose()
    with pytest.raises(SchemaError, match=r"schema version 99.*upgrade emdc"):
        PulseStore.open(db_url)


def test_each_pulse_is_stored_once_however_often_it_arrives(store: PulseStore, db_url: str) -> None:
    writer = DbWriter(store, max_power_w=100_000, clock=writer_clock)
    batch = [pulse(1), pulse(2), pulse(2), pulse(3), pulse(1, meter="Main"), pulse(1, channel="reactive")]
    assert writer.handle_batch(deliveries(*batch)) == []
    assert writer.handle_batch(deliveries(*batch)) == []  # a redelivered batch
    # A restarted writer (fresh ledger) seeing them once more.
    assert DbWriter(store, max_power_w=100_000, clock=writer_clock).handle_batch(deliveries(*batch[:3])) == []
    assert rows(db_url) == [
        ("Main", "active", "e1", 1, T0 + S, 1.0),  # meter ids are case-sensitive, also on MariaDB
        ("main", "active", "e1", 1, T0 + S, 1.0),
        ("main", "active", "e1", 2, T0 + 2 * S, 1.0),
        ("main", "active", "e1", 3, T0 + 3 * S, 1.0),
        ("main", "reactive", "e1", 1, T0 + S, 1.0),
    ]


def test_malformed_and_implausible_pulses_are_dead_lettered_with_the_reason(store: PulseStore,
                                                                           db_url: str) -> None:
    writer = DbWriter(store, max_power_w=10_000, clock=ticking_clock())
    huge = encode(pulse(1)).replace(b'"seq":1', b'"seq":' + str(2**70).encode())
    batch = deliveries(b"not json", pulse(1), huge, pulse(2, 10),
                       pulse(10_000, 11),  # 9998 Wh in a second: 36 MW
                       pulse(3, 5))
    dead = writer.handle_batch(batch)
    assert [(d.delivery.tag, d.reason.split(":")[0]) for d in dead][:2] == [
        (1, "body is not JSON"), (3, "seq must be an integer from 1 to 2^63-1, got 1180591620717411303424")]
    assert [(d.delivery.tag, d.reason) for d in dead][2:] == [
        (5, "counter: a jump of 9998 pulses in 1.000 s implies 35992.8 kW, above the 10 kW limit")]
    # Time running backwards: counted all the same, its timestamp kept for the record.
    assert [r[3] for r in rows(db_url)] == [1, 2, 3]


def test_a_body_naming_another_meter_than_its_routing_key_is_not_stored(store: PulseStore, db_url: str) -> None:
    [dead] = DbWriter(store, max_power_w=10_000, clock=writer_clock).handle_batch(
        [Delivery(1, "pulse.garage.active", encode(pulse(1)))])
    assert "does not match the body's meter and channel (pulse.main.active)" in dead.reason
    assert rows(db_url) == []


def test_a_restarted_writer_judges_new_pulses_against_the_stored_ones(store: PulseStore, db_url: str) -> None:
    DbWriter(store, max_power_w=10_000, clock=writer_clock).handle_batch(deliveries(pulse(1), pulse(2)))
    restarted = DbWriter(store, max_power_w=10_000, clock=writer_clock)
    dead = restarted.handle_batch(deliveries(pulse(500, 2.5), pulse(3, 3600)))
    assert [d.delivery.tag for d in dead] == [1], "a jump of 498 Wh in 0.5 s after the stored seq 2"
    assert [r[3] for r in rows(db_url)] == [1, 2, 3]


def test_hostile_messages_are_dead_lettered_and_the_genuine_meter_is_stored_exactly(store: PulseStore,
                                                                                   db_url: str) -> None:
    """What a hostile edge account sends must not reach the database: a first message at seq 2^63-1 of 1 kWh
    pulses, another energy per pulse (also after a restart, from the stored pulses), a wild seq of a tiny
    energy, a new epoch of 1 kWh pulses, a flood of one-pulse messages."""
    writer = DbWriter(store, max_power_w=100_000, clock=writer_clock)
    assert writer.handle_batch(deliveries(pulse(1), pulse(2), pulse(3))) == []
    hostile = [Pulse("main", "reactive", "e9", 2**63 - 1, T0 + 5 * S, 1000.0), pulse(4, 3.5, wh=1000.0),
               pulse(2**62, 3.6, wh=1e-300), pulse(116, 3.7, epoch="e2", wh=1000.0)]
    dead = writer.handle_batch(deliveries(*hostile, pulse(4)))
    assert [d.delivery.tag for d in dead] == [1, 2, 3, 4]
    assert "on a channel with no history" in dead[0].reason and "kW limit" in dead[0].reason
    assert "wh 1000 differs from the channel's 1 per pulse" in dead[1].reason
    restarted = DbWriter(store, max_power_w=100_000, clock=writer_clock)
    [again] = restarted.handle_batch(deliveries(pulse(5, 5, wh=1000.0)))
    assert "wh 1000 differs from the channel's 1 per pulse" in again.reason, "the stored pulses fix it"
    flood = [pulse(seq, 5 + (seq - 5) * 1e-6) for seq in range(5, 10_005)]  # 10 kWh in 10 ms
    dead = restarted.handle_batch(deliveries(*flood))
    stored = [r[3] for r in rows(db_url) if r[1] == "active"]
    assert len(stored) == 4 + 10_000 - len(dead) and len(stored) <= 4 + 1 + 100_000 * 2 / 3600 + 1
    assert "faster than the 100 kW limit" in dead[0].reason
    assert {r[5] for r in rows(db_url)} == {1.0} and {r[1] for r in rows(db_url)} == {"active"}


def test_a_readmitted_pulse_of_another_energy_per_pulse_becomes_the_channels(store: PulseStore,
                                                                            db_url: str) -> None:
    """The command changing a meter's constant reaches the MQTT writer only: here a person's readmission
    decides, and the new energy per pulse then holds."""
    writer = DbWriter(store, max_power_w=100_000, clock=writer_clock)
    assert writer.handle_batch(deliveries(pulse(1), pulse(2))) == []
    [dead] = writer.handle_batch(deliveries(pulse(3, wh=0.5)))
    assert writer.handle_batch([Delivery(1, dead.delivery.routing_key, dead.delivery.body, readmitted=True)]) == []
    [old] = writer.handle_batch(deliveries(pulse(4)))
    assert "wh 1 differs from the channel's 0.5 per pulse" in old.reason
    assert writer.handle_batch(deliveries(pulse(4, wh=0.5))) == []
    assert [(r[3], r[5]) for r in rows(db_url)] == [(1, 1.0), (2, 1.0), (3, 0.5), (4, 0.5)]


@pytest.mark.parametrize(("url", "error"), [
    ("postgresql://emdc:s3cret@h/emdc", "unsupported database 'postgresql' in postgresql://emdc:***@h/emdc"),
    ("mysql://emdc:s3cret@h/emdc", "needs a driver that is not installed"),
    ("s3cret", "the database URL is not a URL like"),
])
def test_an_unusable_database_url_is_refused_without_showing_the_password(url: str, error: str) -> None:
    with pytest.raises(DatabaseError, match=re.escape(error)) as caught:
        PulseStore.open(url)
    assert "s3cret" not in str(caught.value)


def test_an_unreachable_database_keeps_the_batch_for_redelivery_and_its_password_out_of_logs() -> None:
    url = "mysql+pymysql://emdc:s3cret@127.0.0.1:1/emdc"  # nothing listens on port 1
    writer = DbWriter(PulseStore(create_engine(url), url), max_power_w=10_000, clock=writer_clock)
    with pytest.raises(StoreUnavailable) as caught:
        writer.handle_batch(deliveries(pulse(1)))
    assert isinstance(caught.value, OSError), "the consumer reconnects with backoff on OSError"
    assert "s3cret" not in str(caught.value) and "emdc:***@127.0.0.1:1/emdc" in str(caught.value)


def test_a_batch_that_failed_to_commit_is_stored_when_redelivered(store: PulseStore, db_url: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    writer = DbWriter(store, max_power_w=10_000, clock=writer_clock)
    writer.handle_batch(deliveries(pulse(1)))
    real_insert = store.insert

    def disk_full(batch: list[Pulse]) -> None:
        raise sa.exc.OperationalError("INSERT", {}, Exception("database or disk is full"))

    monkeypatch.setattr(store, "insert", disk_full)
    batch = deliveries(pulse(2), pulse(3), pulse(400, 3.5))  # the last one is implausible
    with pytest.raises(StoreUnavailable, match="database or disk is full"):
        writer.handle_batch(batch)
    monkeypatch.setattr(store, "insert", real_insert)
    assert [d.delivery.tag for d in writer.handle_batch(batch)] == [3], "judged as the first time"
    assert [r[3] for r in rows(db_url)] == [1, 2, 3]


def test_the_slot_query_matches_the_in_memory_aggregation(store: PulseStore) -> None:
    rng = random.Random(3)
    data = [pulse(seq, seq * 7.3) for seq in range(1, 800) if rng.random() > 0.05]  # ~5 % lost
    data += [pulse(seq, 1000 + seq * 40, channel="reactive", epoch="e2", wh=0.5) for seq in range(3, 60)]
    store.insert(data)
    got = list(store.slots("main", T0, T0 + 10**6 * S))
    assert got == slots_from_pulses(data)
    assert {s.channel for s in got} == {"active", "reactive"} and len(got) == 10
    part = list(store.slots("main", T0 + 900 * S, T0 + 2000 * S))
    assert part == slots_from_pulses(p for p in data if T0 + 900 * S <= p.ts_ns < T0 + 2000 * S)
    assert store.predecessor("main", "reactive", "e2", 3) is None
    first_missing = next(s for s in range(1, 800) if s not in {p.seq for p in data if p.channel == "active"})
    assert store.predecessor("main", "active", "e1", first_missing + 1)[0] == first_missing - 1


# -- `emdc db-writer` on the real broker -----------------------------------------

def db_env(names: Names, db_url: str, **extra: object) -> dict[str, str]:
    # EMDC_DB_QUEUE=names.queue: the names fixture deletes it and its dead-letter queue afterwards.
    return names.writer_env(EMDC_DB_QUEUE=names.queue, EMDC_DB_URL=db_url, **extra)


def dead_letters(queue: str) -> list[tuple[str, bytes]]:
    with pika.BlockingConnection(amqp_parameters()) as connection:
        channel = connection.channel()
        out = []
        while (got := channel.basic_get(dead_letter_queue(queue), auto_ack=True))[0] is not None:
            out.append((got[1].headers[ERROR_HEADER], got[2]))
        return out


def test_db_writer_stores_redelivered_pulses_once_and_dead_letters_malformed_ones(names: Names, db_url: str,
                                                                                  spawn) -> None:
    env = db_env(names, db_url)
    assert run_emdc(["db-writer", "--check"], env, check=False).returncode != 0, "no heartbeat yet: unhealthy"
    declare_queue(names, DB_WRITER_BINDINGS)
    batch = pulses(300)
    publish(names.exchange, [*batch, ("pulse.main.active", b'{"v": 1}'), *batch[:150], *batch,
                             ("control.main", b'{"v": 1, "type": "set_total"}')])  # control.# is not bound here
    wait_until(lambda: queue_depth(names.queue) == 751, 10, "the messages to be queued")
    writer = spawn(["db-writer"], env, "db-writer")
    wait_for_rows(db_url, 300)
    wait_until(lambda: queue_depth(dead_letter_queue(names.queue)) == 1, 30, "the malformed one dead-lettered")
    wait_until(lambda: queue_depth(names.queue) == 0, 30, "the duplicates to be consumed")

    assert [r[3] for r in rows(db_url)] == list(range(1, 301))
    assert dead_letters(names.queue) == [("missing field(s): channel, epoch, meter, seq, ts_ns, wh", b'{"v": 1}')]
    assert run_emdc(["db-writer", "--check"], env).stdout.startswith("healthy")
    assert (names.writer_dir / "db-writer.heartbeat").exists()
    assert not (names.writer_dir / "writer.heartbeat").exists(), "must not vouch for the MQTT writer"
    assert writer.stop() == 0, writer.log()
    assert "db-writer stopped" in writer.log()
    if "mysql" in db_url:
        assert "mysql+pymysql://root@127.0.0.1:3306/emdc_test_" in writer.log()
    else:
        assert "pulses.sqlite3" in writer.log()


@pytest.mark.slow  # fault injection, like tests/test_reliability.py
def test_kill_9_while_draining_a_backlog_leaves_every_pulse_exactly_once(names: Names, db_url: str,
                                                                        spawn) -> None:
    count = 6000
    declare_queue(names, DB_WRITER_BINDINGS)
    publish(names.exchange, pulses(count))
    wait_until(lambda: queue_depth(names.queue) == count, 30, "the backlog to be queued")

    rng = random.Random(11)
    env = db_env(names, db_url, EMDC_BATCH_SIZE=100)
    for kills in range(3):
        before = queue_depth(names.queue)
        assert before > 0, f"the backlog drained after only {kills} kills; make it larger"
        writer = spawn(["db-writer"], env, "db-writer")
        wait_until(lambda b=before: queue_depth(names.queue) < b, 30, "the db-writer to start draining",
                   interval=0.01)
        time.sleep(rng.uniform(0, 0.1))
        writer.kill9()
    stored_before_restart = len(rows(db_url))
    assert 0 < stored_before_restart < count

    writer = spawn(["db-writer"], env, "db-writer")
    wait_for_rows(db_url, count, 60)
    wait_until(lambda: queue_depth(names.queue) == 0, 30, "the redelivered duplicates to be consumed")
    assert writer.stop() == 0, writer.log()
    stored = rows(db_url)
    assert [r[3] for r in stored] == list(range(1, count + 1)), "every seq exactly once"
    assert queue_depth(dead_letter_queue(names.queue)) == 0


@pytest.mark.slow  # fault injection, like tests/test_reliability.py
def test_a_failing_database_keeps_pulses_queued_with_one_log_line_until_it_recovers(names: Names, tmp_path: Path,
                                                                                     spawn) -> None:
    url = f"sqlite:///{tmp_path / 'pulses.sqlite3'}"
    env = db_env(names, url)
    writer = spawn(["db-writer"], env, "db-writer")
    wait_until(lambda: consumers(names.queue) == 1, 30, "the db-writer to consume")
    engine = create_engine(url)
    with engine.begin() as conn:  # the database breaks under the running writer
        conn.execute(sa.text("ALTER TABLE pulses RENAME TO pulses_away"))
    publish(names.exchange, pulses(100))
    wait_until(lambda: "no such table" in writer.log(), 10, "the failure to be logged")
    time.sleep(3)  # retries at 0.5, 1 and 2 s: the backoff of a lost connection
    assert writer.log().count("no such table") == 1, writer.log()
    # Nothing acknowledged while nothing is stored (a retry may hold them for a moment).
    wait_until(lambda: queue_depth(names.queue) == 100, 10, "all 100 messages back in the queue")
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE pulses_away RENAME TO pulses"))
    engine.dispose()
    wait_for_rows(url, 100, 30)
    assert writer.stop() == 0
    assert [r[3] for r in rows(url)] == list(range(1, 101))
    assert queue_depth(names.queue) == 0 and dead_letters(names.queue) == []


def test_db_writer_refuses_to_start_on_an_unreachable_database_without_showing_the_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMDC_")}
    env.update(EMDC_STATE_DIR=str(tmp_path), EMDC_DB_URL="mysql+pymysql://emdc:s3cret@127.0.0.1:1/emdc",
               PYTHONPATH=str(ROOT))
    result = run_emdc(["db-writer"], env, timeout=60, check=False)
    assert result.returncode != 0
    assert "cannot use the database" in result.stderr and "Can't connect" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout


def test_a_restarted_writer_takes_a_resend_across_a_clock_step_back_for_a_duplicate(store: PulseStore,
                                                                                    db_url: str) -> None:
    # seq 1 at t = 100 s, then the edge's clock steps back an hour: seq 2 is stamped before seq 1.
    first, stepped = pulse(1, 100), pulse(2, 100 - 3600)
    DbWriter(store, max_power_w=10_000, clock=ticking_clock()).handle_batch(deliveries(first, stepped))
    restarted = DbWriter(store, max_power_w=10_000, clock=writer_clock)
    # The edge resends seq 1 (a lost confirm): later than the highest seq's time, but a duplicate all the same.
    assert restarted.handle_batch(deliveries(first)) == []
    assert [r[3] for r in rows(db_url)] == [1, 2]
