"""The pulse database of ``emdc db-writer`` and ``emdc report`` (SQLAlchemy Core).

One row per pulse in table ``pulses``, keyed by (meter, channel, epoch, seq),
so storing a redelivered pulse again changes nothing. SQLite (a file in the
state directory, WAL mode) needs no server; MariaDB/MySQL is for production.
Table ``schema_version`` holds the version of this layout: :meth:`PulseStore.open`
creates the schema on first start and applies :data:`MIGRATIONS` later.

Columns: ``ts_ns`` is the pulse's time in UTC nanoseconds (exact; in SQL,
``FROM_UNIXTIME(ts_ns DIV 1000000000)`` on MariaDB or
``datetime(ts_ns / 1e9, 'unixepoch')`` on SQLite show it), ``wh`` its quantity
in the channel's pulse unit (Wh for active and export, varh for reactive, m³
for gas, L for water).

Example::

    store = PulseStore.open("sqlite:///state/pulses.sqlite3")
    store.insert([Pulse("main", "active", "ab12", 1, 1_764_000_000_000_000_000, 1.0)])
    store.close()
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import Connection, Engine

from backend.ledger import wh_to_uwh
from backend.report import SLOT_NS, Slot
from common.channels import CHANNELS
from common.config import Config, redact_url
from common.message import Pulse

log = logging.getLogger("emdc.database")

SCHEMA_VERSION = 1
SQLITE_FILE = "pulses.sqlite3"
SUPPORTED = ("sqlite", "mysql", "mariadb")
# Migrations: MIGRATIONS[n] upgrades a version-n database to n + 1 (none yet).
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}


class DatabaseError(RuntimeError):
    """The database cannot be used: a bad URL, a missing driver, a missing or unknown schema."""


class SchemaError(DatabaseError):
    """The database holds no EMDC schema, or one this version of emdc does not know."""


def ascii_key(length: int) -> sa.types.TypeEngine[str]:
    """A text key column of ``length`` ASCII characters, compared byte for byte on every database."""
    # MariaDB compares text case-insensitively by default: meters "Main" and
    # "main" would collide in the unique key. Ids are ASCII, so compare bytes.
    return sa.String(length).with_variant(mysql.VARCHAR(length, charset="ascii", collation="ascii_bin"),
                                          "mysql", "mariadb")


metadata = sa.MetaData()

pulses = sa.Table(
    "pulses", metadata,
    sa.Column("meter", ascii_key(64), primary_key=True),
    sa.Column("channel", ascii_key(8), primary_key=True),
    sa.Column("epoch", ascii_key(64), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("ts_ns", sa.BigInteger, nullable=False),
    sa.Column("wh", sa.Double, nullable=False),
    # Reports read time ranges per meter and channel.
    sa.Index("ix_pulses_meter_channel_ts", "meter", "channel", "ts_ns"),
    mysql_engine="InnoDB",
)

schema_version = sa.Table(
    "schema_version", metadata,
    sa.Column("version", sa.Integer, nullable=False),
    mysql_engine="InnoDB",
)


def database_url(config: Config) -> str:
    """``config.db_url``, or the SQLite file in the state directory when it is empty."""
    if config.db_url:
        return config.db_url
    return f"sqlite:///{Path(config.state_dir).resolve() / SQLITE_FILE}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (emdc report) never block the writer
    # FULL: a committed batch survives a power cut, since it is acknowledged right after.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _parse_url(url: str) -> sa.URL:
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        # Neither the text nor the parser's message: what cannot be parsed cannot be redacted.
        raise DatabaseError("the database URL is not a URL like sqlite:///path or "
                            "mysql+pymysql://user:password@host/emdc") from None
    if parsed.get_backend_name() not in SUPPORTED:
        raise DatabaseError(f"unsupported database {parsed.get_backend_name()!r} in {redact_url(url)}: "
                            "use SQLite or MariaDB/MySQL")
    return parsed


def create_engine(url: str) -> Engine:
    """An engine for ``url`` (SQLite: WAL, directory created; MySQL: reconnects after a server restart)."""
    parsed = _parse_url(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(parsed, connect_args={"timeout": 30})
            sa.event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return sa.create_engine(parsed, pool_pre_ping=True, pool_recycle=3600)
    except (sa.exc.NoSuchModuleError, ImportError) as exc:
        raise DatabaseError(f"{redact_url(url)} needs a driver that is not installed ({exc}); for MariaDB "
                            "use mysql+pymysql://... with pip install 'emdc[db]'") from None


class PulseStore:
    """Stores pulses idempotently and answers the report's questions."""

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url
        self._insert = self._insert_statement()

    @classmethod
    def open(cls, url: str, *, create: bool = True) -> PulseStore:
        """Connect, and create or migrate the schema (with ``create=False``: require it to exist).

        Raises :class:`DatabaseError` for a bad URL, a missing driver, a missing or newer schema, and
        ``sqlalchemy.exc.OperationalError`` if the database is unreachable.
        """
        parsed = _parse_url(url)
        if not create and parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
            # Connecting would create an empty file where the user expected data.
            raise SchemaError(f"{parsed.database} does not exist (has emdc db-writer run?)")
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                _prepare_schema(conn, create=create, url=url)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, url)

    def close(self) -> None:
        self.engine.dispose()

    def describe(self) -> str:
        """The URL without its password, for log lines and messages."""
        return redact_url(self.url)

    def _insert_statement(self) -> sa.Insert:
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            return sqlite.insert(pulses).on_conflict_do_nothing()
        if dialect in {"mysql", "mariadb"}:
            stmt = mysql.insert(pulses)
            # A no-op update on a duplicate key: unlike INSERT IGNORE, every other
            # error (a bad value, a full disk) still fails the transaction.
            return stmt.on_duplicate_key_update(seq=stmt.inserted.seq)
        raise DatabaseError(f"unsupported database {dialect!r}: use SQLite or MariaDB/MySQL")

    def insert(self, batch: Sequence[Pulse]) -> None:
        """Store ``batch`` in one transaction; pulses already stored are left as they are."""
        if not batch:
            return
        rows = [{"meter": p.meter, "channel": p.channel, "epoch": p.epoch, "seq": p.seq, "ts_ns": p.ts_ns,
                 "wh": p.wh} for p in batch]
        with self.engine.begin() as conn:
            conn.execute(self._insert, rows)

    # -- what the db-writer's ledger needs to resume --------------------------

    def latest(self, meter: str, channel: str, epoch: str) -> tuple[int, int, int] | None:
        """(seq, ts_ns) of the highest stored seq of a series and the latest ts_ns stored in it, or None.

        The two times differ after the edge's clock stepped back: a resend of an
        earlier pulse may then carry a time after the highest seq's.
        """
        where = (pulses.c.meter == meter, pulses.c.channel == channel, pulses.c.epoch == epoch)
        highest = self._one(sa.select(pulses.c.seq, pulses.c.ts_ns).where(*where)
                            .order_by(pulses.c.seq.desc()).limit(1))
        if highest is None:
            return None
        with self.engine.connect() as conn:
            latest_ns: int = conn.execute(sa.select(sa.func.max(pulses.c.ts_ns)).where(*where)).scalar_one()
        return (*highest, int(latest_ns))

    def last_ts(self, meter: str, channel: str) -> int | None:
        """Time of the newest stored pulse of (meter, channel), or None."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(pulses.c.ts_ns))
                                .where(pulses.c.meter == meter, pulses.c.channel == channel)).scalar()

    def pulse_energy(self, meter: str, channel: str) -> float | None:
        """The energy per pulse of the newest stored pulse of (meter, channel), or None."""
        with self.engine.connect() as conn:
            wh = conn.execute(sa.select(pulses.c.wh).where(pulses.c.meter == meter, pulses.c.channel == channel)
                              .order_by(pulses.c.ts_ns.desc()).limit(1)).scalar()
        return None if wh is None else float(wh)

    # -- what reports need ------------------------------------------------------

    def slots(self, meter: str, start_ns: int, end_ns: int) -> Iterator[Slot]:
        """Pulses of ``meter`` in [start_ns, end_ns) grouped per channel, epoch and 15-minute UTC slot."""
        ts = pulses.c.ts_ns
        # A literal, not a bound parameter: the GROUP BY must repeat the select's exact expression.
        slot = (ts - ts % sa.literal_column(str(SLOT_NS))).label("slot")
        for channel in CHANNELS:  # one range scan of the (meter, channel, ts_ns) index each
            query = (sa.select(pulses.c.epoch, slot, sa.func.count(), sa.func.sum(pulses.c.wh),
                               sa.func.min(pulses.c.seq), sa.func.max(pulses.c.seq), sa.func.min(ts),
                               sa.func.max(ts))
                     .where(pulses.c.meter == meter, pulses.c.channel == channel, ts >= start_ns, ts < end_ns)
                     .group_by(pulses.c.epoch, slot).order_by(pulses.c.epoch, slot))
            with self.engine.connect() as conn:
                for epoch, start, count, wh, first_seq, last_seq, first_ts, last_ts in conn.execute(query):
                    yield Slot(channel, epoch, int(start), int(count), wh_to_uwh(float(wh)), int(first_seq),
                               int(last_seq), int(first_ts), int(last_ts))

    def predecessor(self, meter: str, channel: str, epoch: str, seq: int) -> tuple[int, int] | None:
        """(seq, ts_ns) of the stored pulse just below ``seq`` in its series, or None."""
        return self._one(sa.select(pulses.c.seq, pulses.c.ts_ns)
                         .where(pulses.c.meter == meter, pulses.c.channel == channel, pulses.c.epoch == epoch,
                                pulses.c.seq < seq)
                         .order_by(pulses.c.seq.desc()).limit(1))

    def neighbour_ts(self, meter: str, start_ns: int, end_ns: int) -> tuple[int | None, int | None]:
        """Times of the newest pulse before ``start_ns`` and the oldest at or after ``end_ns`` (any channel)."""
        before: list[int | None] = []
        after: list[int | None] = []
        with self.engine.connect() as conn:
            for channel in CHANNELS:
                where = (pulses.c.meter == meter, pulses.c.channel == channel)
                before.append(conn.execute(sa.select(sa.func.max(pulses.c.ts_ns))
                                           .where(*where, pulses.c.ts_ns < start_ns)).scalar())
                after.append(conn.execute(sa.select(sa.func.min(pulses.c.ts_ns))
                                          .where(*where, pulses.c.ts_ns >= end_ns)).scalar())
        return (max((t for t in before if t is not None), default=None),
                min((t for t in after if t is not None), default=None))

    def _one(self, query: sa.Select[Any]) -> tuple[int, int] | None:
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else (int(row[0]), int(row[1]))


def _prepare_schema(conn: Connection, *, create: bool, url: str) -> None:
    inspector = sa.inspect(conn)
    if not inspector.has_table("schema_version"):
        if inspector.has_table("pulses"):
            raise SchemaError(f"{redact_url(url)} has a pulses table but no schema_version: not an EMDC schema")
        if not create:
            raise SchemaError(f"{redact_url(url)} holds no EMDC pulses yet (has emdc db-writer run?)")
        metadata.create_all(conn)
        conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
        log.info("created the pulse database schema (version %d) in %s", SCHEMA_VERSION, redact_url(url))
        return
    version = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
    if version is None or version > SCHEMA_VERSION:
        raise SchemaError(f"{redact_url(url)} has schema version {version}, this emdc knows up to "
                          f"{SCHEMA_VERSION}: upgrade emdc")
    while version < SCHEMA_VERSION:
        if not create:
            raise SchemaError(f"{redact_url(url)} has schema version {version}; start emdc db-writer to "
                              f"migrate it to {SCHEMA_VERSION}")
        MIGRATIONS[version](conn)
        version += 1
        conn.execute(schema_version.update().values(version=version))
        log.info("migrated %s to schema version %d", redact_url(url), version)
