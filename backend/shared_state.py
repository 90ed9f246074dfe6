"""The writer's state in a database shared by an active/standby pair on two servers (setting ``state_url``).

The same rows as :mod:`backend.state_store` (a channel's state in the
ledger's JSON form, a meter's admission), in tables ``writer_channels``,
``writer_meters`` and ``writer_meta`` of a MariaDB/MySQL or PostgreSQL
database, through SQLAlchemy Core. Only one writer counts a queue at a time
(the queue's lease), but a writer that lost the lease without noticing (a
network partition, a long pause) could still be saving a batch over the state
the new active writer continues. Fencing stops it:

* a writer that becomes active takes the next **generation**: it increments
  the row ``generation`` in ``writer_meta``, in a transaction of its own;
* every save reads that row *for update* in the save's own transaction and
  writes nothing if it is no longer this writer's generation: it raises
  :class:`Fenced`, and the writer stops saving and publishing (one log line)
  and stands by, to take over again, with a new generation and the state
  reloaded, when the lease comes back to it.

Saves are durable when the database's commit is: keep MariaDB's
``innodb_flush_log_at_trx_commit=1`` and PostgreSQL's ``synchronous_commit=on``
(the defaults). The state's identity (:mod:`backend.takeover`) is kept in the
database too, so both writers of the pair have the same one.

Example::

    store = SharedStateStore.open("mysql+pymysql://emdc:pw@db/emdc")
    store.acquire()                     # becoming active: fences the previous holder
    doc = store.load()
    store.save(ledger, ledger.changed())
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from backend.amqp_consumer import TakeoverRefused
from backend.database import ascii_key
from backend.ledger import Changed, Ledger
from backend.state_store import STATE_FORMAT, StateError
from common.config import redact_url

log = logging.getLogger("emdc.writer")

SUPPORTED = ("mysql", "mariadb", "postgresql")
T = TypeVar("T")


class Fenced(TakeoverRefused):
    """Another writer took the shared state over (a newer generation): this one must not save or publish.

    Raised from a save, it ends the consumer's session like a refused
    takeover: one log line, the batch stays queued, and the writer stands by.
    """


metadata = sa.MetaData()
channels = sa.Table(
    "writer_channels", metadata,
    sa.Column("meter", ascii_key(64), primary_key=True),
    sa.Column("channel", ascii_key(16), primary_key=True),
    sa.Column("state", sa.Text, nullable=False),
    mysql_engine="InnoDB",
)
meters = sa.Table(
    "writer_meters", metadata,
    sa.Column("meter", ascii_key(64), primary_key=True),
    sa.Column("admitted_ns", sa.BigInteger, nullable=True),
    mysql_engine="InnoDB",
)
meta = sa.Table(
    "writer_meta", metadata,
    sa.Column("key", ascii_key(32), primary_key=True),
    sa.Column("value", sa.String(64), nullable=False),
    mysql_engine="InnoDB",
)


class SharedStateStore:
    """Loads and saves the writer's state in a shared database, fenced by a generation taken when active."""

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.path = redact_url(url)  # what log lines show where the state is
        self.generation: int | None = None  # this writer's, once acquired

    @classmethod
    def open(cls, url: str) -> SharedStateStore:
        """Connect to ``url`` and create the tables if they are missing; raise :class:`StateError` if unusable."""
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError:
            raise StateError("state_url is not a URL like mysql+pymysql://user:password@host/emdc or "
                             "postgresql+psycopg://user:password@host/emdc") from None
        if parsed.get_backend_name() not in SUPPORTED:
            raise StateError(f"unsupported database {parsed.get_backend_name()!r} in state_url {redact_url(url)}: "
                             "use MariaDB/MySQL or PostgreSQL (empty: SQLite in the state dir)")
        try:
            engine = sa.create_engine(parsed, pool_pre_ping=True, pool_recycle=3600)
        except (sa.exc.NoSuchModuleError, ImportError) as exc:
            raise StateError(f"state_url {redact_url(url)} needs a driver that is not installed ({exc})") from None
        store = cls(engine, url)
        store._run(lambda conn: metadata.create_all(conn))
        return store

    def acquire(self) -> bool:
        """Take the next generation (this writer becomes the one that saves); True: reload the state, since
        another writer may have changed it meanwhile."""

        def take(conn: Connection) -> int:
            current = self._generation(conn)
            if current is None:
                conn.execute(meta.insert().values(key="generation", value="1"))
                return 1
            conn.execute(meta.update().where(meta.c.key == "generation").values(value=str(current + 1)))
            return current + 1

        self.generation = self._run(take, passing=True)
        log.info("took generation %d of the shared state in %s", self.generation, self.path)
        return True

    def load(self) -> dict[str, Any] | None:
        """The saved state (:meth:`Ledger.to_json` form), None if there is none yet."""

        def read(conn: Connection) -> dict[str, Any] | None:
            row = conn.execute(sa.select(meta.c.value).where(meta.c.key == "format")).first()
            if row is not None and row[0] != str(STATE_FORMAT):
                raise StateError(f"the shared state in {self.path} has the unknown format {row[0]!r}; refusing "
                                 "to start from zero")
            by_meter: dict[str, dict[str, Any]] = {}
            for meter, channel, state in conn.execute(sa.select(channels.c.meter, channels.c.channel,
                                                                channels.c.state)):
                try:
                    by_meter.setdefault(meter, {})[channel] = json.loads(state)
                except ValueError as exc:
                    raise StateError(f"the shared state in {self.path} is damaged: the row of {meter}/{channel} is "
                                     f"not JSON ({exc}); refusing to start from zero") from None
            admitted = {m: ns for m, ns in conn.execute(sa.select(meters.c.meter, meters.c.admitted_ns))}
            if not by_meter and not admitted:
                return None
            return {"meters": by_meter, "admitted": admitted}

        return self._run(read)

    def save(self, ledger: Ledger, changed: Changed) -> None:
        """Write the ``changed`` rows as ``ledger`` has them, in one transaction that first checks that this
        writer's generation is still the current one (else :class:`Fenced`, and nothing is written)."""
        keys = sorted(changed.channels)
        rows = [{"meter": m, "channel": c, "state": json.dumps(state.to_json(), separators=(",", ":"))}
                for m, c in keys if (state := ledger.get(m, c)) is not None]
        admitted = [{"meter": m, "admitted_ns": ledger.admitted_ns(m)} for m in sorted(changed.meters)
                    if ledger.is_known(m)]

        def write(conn: Connection) -> None:
            current = self._generation(conn, lock=True)
            if self.generation is None or current != self.generation:
                raise Fenced(f"the shared state in {self.path} was taken over by another writer (generation "
                             f"{current}, this writer's {self.generation}): this writer stopped saving and "
                             "publishing, and stands by")
            for m, c in keys:
                conn.execute(channels.delete().where(channels.c.meter == m, channels.c.channel == c))
            for m in sorted(changed.meters):
                conn.execute(meters.delete().where(meters.c.meter == m))
            if rows:
                conn.execute(channels.insert(), rows)
            if admitted:
                conn.execute(meters.insert(), admitted)
            self._mark_format(conn)

        self._run(write, passing=True)

    def replace(self, doc: dict[str, Any]) -> None:
        """Replace the whole shared state by ``doc`` (:meth:`Ledger.to_json` form): the first start on it."""

        def write(conn: Connection) -> None:
            conn.execute(channels.delete())
            conn.execute(meters.delete())
            rows = [{"meter": m, "channel": c, "state": json.dumps(s, separators=(",", ":"))}
                    for m, by_channel in doc["meters"].items() for c, s in by_channel.items()]
            if rows:
                conn.execute(channels.insert(), rows)
            admitted = [{"meter": m, "admitted_ns": ns} for m, ns in doc.get("admitted", {}).items()]
            if admitted:
                conn.execute(meters.insert(), admitted)
            self._mark_format(conn)

        self._run(write)

    def identity(self, default: str = "") -> str:
        """The shared state's identity, created on first use (``default``, else a new one): both writers of a
        pair have it, so Home Assistant's totals count as theirs."""

        def get_or_create(conn: Connection) -> str:
            row = conn.execute(sa.select(meta.c.value).where(meta.c.key == "state_id")).first()
            if row is not None:
                return str(row[0])
            identity = default or uuid.uuid4().hex[:12]
            conn.execute(meta.insert().values(key="state_id", value=identity))
            return identity

        try:
            return self._run(get_or_create)
        except StateError:  # the other writer created it at the same moment
            return self._run(get_or_create)

    def close(self) -> None:
        self.engine.dispose()

    # -- inside -----------------------------------------------------------------------------------------

    @staticmethod
    def _generation(conn: Connection, *, lock: bool = False) -> int | None:
        query = sa.select(meta.c.value).where(meta.c.key == "generation")
        row = conn.execute(query.with_for_update() if lock else query).first()
        return None if row is None else int(row[0])

    @staticmethod
    def _mark_format(conn: Connection) -> None:
        if conn.execute(sa.select(meta.c.value).where(meta.c.key == "format")).first() is None:
            conn.execute(meta.insert().values(key="format", value=str(STATE_FORMAT)))

    def _run(self, work: Callable[[Connection], T], *, passing: bool = False) -> T:
        """``work`` in one transaction. A database that cannot be reached or refuses is a :class:`StateError`
        (at start: the writer does not start), or with ``passing`` an OSError (the batch stays queued and is
        retried)."""
        try:
            with self.engine.begin() as conn:
                return work(conn)
        except sa.exc.SQLAlchemyError as exc:
            why = f"the shared state in {self.path} cannot be used ({str(getattr(exc, 'orig', exc))[:200]})"
            if passing and not isinstance(exc, sa.exc.IntegrityError):
                raise OSError(why) from None
            raise StateError(why) from None
