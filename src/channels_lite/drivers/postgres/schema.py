"""The tables, created and versioned by the driver itself, under an advisory lock."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any

import psycopg

from channels_lite.drivers.base import DriverError

__all__ = ["SCHEMA_VERSION", "Tables", "prepare", "read_version"]

logger = logging.getLogger("channels_lite.drivers.postgres")

#: Bump when the tables change, and add the step from the previous version to ``_UPGRADES``.
SCHEMA_VERSION = 1

#: ``_UPGRADES[n]`` turns a version ``n`` schema into version ``n + 1`` (statements formatted
#: with the :class:`Tables` attributes, e.g. ``ALTER TABLE {messages} ...``).
_UPGRADES: dict[int, tuple[str, ...]] = {}

#: Second advisory-lock key of the lock that serialises schema creation and upgrades
#: (capacity stripes use 0 .. N-1 under the same first key, see :attr:`Tables.lock_key`).
PREPARE_LOCK = -1


def _int32(value: int) -> int:
    """An unsigned 32-bit hash as the signed int4 that pg_advisory_xact_lock takes."""
    return value - (1 << 32) if value >= (1 << 31) else value


def _quote(name: str) -> str:
    # Names are validated as [A-Za-z_][A-Za-z0-9_]* (options.check_identifier): quoting keeps
    # their case exactly as configured and can never be broken out of.
    return f'"{name}"'


@dataclass(frozen=True, slots=True)
class Tables:
    """Qualified, quoted table names for one ``schema`` and ``table_prefix``."""

    schema: str
    prefix: str

    def _table(self, name: str) -> str:
        return f"{_quote(self.schema)}.{_quote(self.prefix + name)}"

    @property
    def meta(self) -> str:
        return self._table("meta")

    @property
    def messages(self) -> str:
        return self._table("messages")

    @property
    def groups(self) -> str:
        return self._table("groups")

    @property
    def processes(self) -> str:
        return self._table("processes")

    @property
    def live_counts(self) -> str:
        return self._table("live_counts")

    @property
    def namespace(self) -> str:
        """Identifies this set of tables in a database (lock keys, notification channels)."""
        return f"{self.schema}.{self.prefix}"

    @property
    def lock_key(self) -> int:
        """First key of this namespace's two-key advisory locks (``pg_advisory_xact_lock(int,
        int)``, a key space apart from the one-bigint locks applications usually take)."""
        return _int32(zlib.crc32(b"channels-lite:" + self.namespace.encode()))

    def ddl(self) -> tuple[str, ...]:
        p = self.prefix
        return (
            f"CREATE TABLE IF NOT EXISTS {self.meta} (name text PRIMARY KEY, value text NOT NULL)",
            # Identity ids order messages (FIFO): a later push commits with a larger id, and a
            # per-channel capacity lock serialises pushes to one channel.
            # A queue table churns: vacuum it after a fixed number of dead rows rather than a
            # fraction of its size, so that claims never wade through dead index entries.
            f"CREATE TABLE IF NOT EXISTS {self.messages} ("
            "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
            "channel text NOT NULL, key text NOT NULL, payload bytea NOT NULL, "
            "expires_at double precision NOT NULL) "
            "WITH (autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 1000, "
            "autovacuum_vacuum_insert_scale_factor = 0.0, "
            "autovacuum_vacuum_insert_threshold = 1000)",
            # Claims walk one key in id order; capacity counts walk one channel's live rows.
            f"CREATE INDEX IF NOT EXISTS {_quote(p + 'messages_key_id')} "
            f"ON {self.messages} (key, id)",
            f"CREATE INDEX IF NOT EXISTS {_quote(p + 'messages_channel_expires')} "
            f"ON {self.messages} (channel, expires_at)",
            f"CREATE TABLE IF NOT EXISTS {self.groups} ("
            "group_name text NOT NULL, channel text NOT NULL, key text NOT NULL, "
            "expires_at double precision NOT NULL, PRIMARY KEY (group_name, channel))",
            # Reaping a dead process deletes its memberships by key.
            f"CREATE INDEX IF NOT EXISTS {_quote(p + 'groups_key')} ON {self.groups} (key)",
            f"CREATE TABLE IF NOT EXISTS {self.processes} ("
            "key text PRIMARY KEY, expires_at double precision NOT NULL)",
            # Live messages per channel (up to p_most each), for a push's capacity check.
            # VOLATILE is the point: a volatile function takes a fresh snapshot for its query
            # (and PostgreSQL never inlines it into the caller), so when a push calls it after
            # taking the capacity locks in the same statement, it sees every push that held
            # those locks before, although the calling statement's snapshot is older.
            f"CREATE OR REPLACE FUNCTION {self.live_counts}("
            "p_channels text[], p_most bigint[], p_now double precision, p_locks bigint) "
            "RETURNS TABLE (channel text, n bigint) LANGUAGE sql VOLATILE AS $$ "
            "SELECT c.name, (SELECT count(*) FROM ("
            f"SELECT 1 FROM {self.messages} AS m "
            "WHERE m.channel = c.name AND m.expires_at > p_now LIMIT c.most) AS live) "
            "FROM unnest(p_channels, p_most) AS c(name, most) $$",
        )


async def _scalar(conn: psycopg.AsyncConnection[Any], query: str, *params: object) -> Any:
    cursor = await conn.execute(query, params)
    row = await cursor.fetchone()
    return None if row is None else row[0]


async def read_version(conn: psycopg.AsyncConnection[Any], tables: Tables) -> int | None:
    """The stored schema version, or None where this driver never created its tables."""
    if await _scalar(conn, "SELECT to_regclass(%s)", tables.meta) is None:
        return None
    value = await _scalar(conn, f"SELECT value FROM {tables.meta} WHERE name = 'schema_version'")
    return None if value is None else int(value)


def _refuse_newer(version: int, tables: Tables, where: str) -> None:
    if version > SCHEMA_VERSION:
        raise DriverError(
            f"PostgreSQL at {where}: the channels-lite tables in {tables.namespace}* have "
            f"schema version {version}, but this channels-lite only knows versions up to "
            f"{SCHEMA_VERSION}: upgrade channels-lite in this process, or set another "
            "CONFIG['schema'] or CONFIG['table_prefix']"
        )


async def prepare(conn: psycopg.AsyncConnection[Any], tables: Tables, where: str) -> int:
    """Create or upgrade the tables; return the schema version now in place.

    ``conn`` is in autocommit mode. The common case (tables current) is two reads and no lock.
    Otherwise one transaction takes an advisory lock first, so that processes opening at the
    same moment take turns instead of racing ``CREATE TABLE IF NOT EXISTS`` (which is not safe
    against concurrent creation of the same table).
    """
    version = await read_version(conn, tables)
    if version == SCHEMA_VERSION:
        return version
    if version is not None:
        _refuse_newer(version, tables, where)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (tables.lock_key, PREPARE_LOCK))
        version = await read_version(conn, tables)
        if version is None:
            # Only when missing: CREATE SCHEMA IF NOT EXISTS still needs the CREATE privilege
            # on the database, which users of an existing schema often lack.
            if (
                await _scalar(conn, "SELECT 1 FROM pg_namespace WHERE nspname = %s", tables.schema)
                is None
            ):
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(tables.schema)}")
            for statement in tables.ddl():
                await conn.execute(statement)
            logger.info(
                "created channels-lite tables %s* (schema %d) at %s",
                tables.namespace,
                SCHEMA_VERSION,
                where,
            )
        elif version != SCHEMA_VERSION:
            _refuse_newer(version, tables, where)
            for step in range(version, SCHEMA_VERSION):
                for statement in _UPGRADES[step]:
                    await conn.execute(
                        statement.format(
                            meta=tables.meta,
                            messages=tables.messages,
                            groups=tables.groups,
                            processes=tables.processes,
                        )
                    )
                logger.info(
                    "upgraded %s* at %s from schema %d to %d",
                    tables.namespace,
                    where,
                    step,
                    step + 1,
                )
        await conn.execute(
            f"INSERT INTO {tables.meta} (name, value) VALUES ('schema_version', %s) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (str(SCHEMA_VERSION),),
        )
    return SCHEMA_VERSION
