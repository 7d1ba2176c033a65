"""The tables, created and versioned by the driver itself, under an advisory lock."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from channels_lite.drivers.base import DriverError

__all__ = ["SCHEMA_VERSION", "Tables", "prepare", "read_version"]

logger = logging.getLogger("channels_lite.drivers.postgres")

#: Largest payload (bytes) a push carries in its NOTIFY: base64 makes it 4/3 as long, and the
#: whole notification must stay under PostgreSQL's 8000-byte limit.
NOTE_PAYLOAD_MAX = 5600

#: Bump when the tables change, and add the step from the previous version to ``_UPGRADES``.
SCHEMA_VERSION = 2

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
    def push_one(self) -> str:
        return self._table("push_one")

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
            *self.push_one_ddl(),
        )

    def push_one_ddl(self) -> tuple[str, ...]:
        """Version 2: a push of one envelope (every ``send``) as one function call.

        The same decision as the batch push, as one statement: a plain SQL statement cannot
        take the capacity lock and then count with a snapshot taken after the lock was
        granted, and the two-statement pipeline it replaces cost 1.1 against 0.75 ms a push at
        200 pushes/s (psycopg's pipeline bookkeeping, measured here). Inside a VOLATILE
        PL/pgSQL function each statement takes a fresh snapshot (READ COMMITTED), so the
        count runs after the lock and sees every push that held it before.

        Returns whether the message was stored; only then does it notify. A process-specific
        message (``p_key <> p_channel``) small enough for a NOTIFY (8000 bytes) travels in it,
        so that its process can hand it on without a claim round trip (see :mod:`.inbound`):
        ``token id base64(payload)`` followed by ``p_tail`` (`` expires_at capacity channel``,
        built by the caller so that the float keeps every digit). Otherwise the notification is the
        bare ``p_token``.
        """
        return (
            f"CREATE OR REPLACE FUNCTION {self.push_one}("
            "p_lock_key integer, p_stripe integer, p_channel text, p_key text, "
            "p_payload bytea, p_expires double precision, p_now double precision, "
            "p_capacity bigint, p_wake text, p_token text, p_tail text) "
            "RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$ "
            "DECLARE v_id bigint; v_note text := p_token; BEGIN "
            "PERFORM pg_advisory_xact_lock(p_lock_key, p_stripe); "
            "IF (SELECT count(*) FROM ("
            f"SELECT 1 FROM {self.messages} "
            "WHERE channel = p_channel AND expires_at > p_now LIMIT p_capacity) AS live"
            ") >= p_capacity THEN RETURN false; END IF; "
            f"INSERT INTO {self.messages} (channel, key, payload, expires_at) "
            "VALUES (p_channel, p_key, p_payload, p_expires) RETURNING id INTO v_id; "
            f"IF p_key <> p_channel AND octet_length(p_payload) <= {NOTE_PAYLOAD_MAX} THEN "
            "v_note := p_token || ' ' || v_id || ' ' || encode(p_payload, 'base64') || p_tail; "
            "IF octet_length(v_note) >= 8000 THEN v_note := p_token; END IF; "
            "END IF; "
            "PERFORM pg_notify(p_wake, v_note); "
            "RETURN true; END $$",
        )


#: ``_UPGRADES[n](tables)`` turns a version ``n`` schema into version ``n + 1``.
_UPGRADES: dict[int, Callable[[Tables], tuple[str, ...]]] = {
    1: Tables.push_one_ddl,
}


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
                for statement in _UPGRADES[step](tables):
                    await conn.execute(statement)
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
