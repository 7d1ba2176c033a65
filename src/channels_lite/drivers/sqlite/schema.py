"""The tables, created and versioned by the driver itself."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from channels_lite.drivers.base import DriverError
from channels_lite.drivers.sqlite.connection import immediate

__all__ = ["SCHEMA_VERSION", "Tables", "prepare"]

logger = logging.getLogger("channels_lite.drivers.sqlite")

#: Bump when the tables change, and add the step from the previous version to ``_UPGRADES``.
SCHEMA_VERSION = 2


def _channel_sizes_ddl(p: str) -> tuple[str, ...]:
    """Version 2: stored messages per channel, kept by triggers, so that a push learns "far
    from full" from one primary-key read instead of counting a deep queue row by row.

    Triggers rather than code: every statement that adds or removes messages (claims, purge,
    reaping, flush, maintenance commands, processes still running an older channels-lite)
    keeps the count right without knowing about it. The count includes expired rows not yet
    purged, so it is an upper bound of the live count; ops.push counts exactly only when the
    bound reaches the capacity.
    """
    return (
        f"CREATE TABLE IF NOT EXISTS {p}channel_sizes ("
        "channel TEXT PRIMARY KEY, stored INTEGER NOT NULL) WITHOUT ROWID",
        f"CREATE TRIGGER IF NOT EXISTS {p}messages_size_insert AFTER INSERT ON {p}messages "
        f"BEGIN INSERT INTO {p}channel_sizes (channel, stored) VALUES (new.channel, 1) "
        "ON CONFLICT (channel) DO UPDATE SET stored = stored + 1; END",
        f"CREATE TRIGGER IF NOT EXISTS {p}messages_size_delete AFTER DELETE ON {p}messages "
        f"BEGIN UPDATE {p}channel_sizes SET stored = stored - 1 "
        "WHERE channel = old.channel; END",
    )


#: ``_UPGRADES[n](prefix)`` turns a version ``n`` database into version ``n + 1``.
_UPGRADES: dict[int, Callable[[str], tuple[str, ...]]] = {
    1: lambda p: (
        *_channel_sizes_ddl(p),
        f"INSERT INTO {p}channel_sizes (channel, stored) "
        f"SELECT channel, count(*) FROM {p}messages GROUP BY channel",
    ),
}


@dataclass(frozen=True, slots=True)
class Tables:
    """Table names under one prefix (already validated as an identifier)."""

    prefix: str

    @property
    def meta(self) -> str:
        return f"{self.prefix}meta"

    @property
    def messages(self) -> str:
        return f"{self.prefix}messages"

    @property
    def groups(self) -> str:
        return f"{self.prefix}groups"

    @property
    def processes(self) -> str:
        return f"{self.prefix}processes"

    @property
    def channel_sizes(self) -> str:
        return f"{self.prefix}channel_sizes"

    def ddl(self) -> tuple[str, ...]:
        p = self.prefix
        return (
            f"CREATE TABLE IF NOT EXISTS {self.meta} ("
            "name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
            # INTEGER PRIMARY KEY (no AUTOINCREMENT): a new row always gets max(id) + 1, so
            # ids order every message still stored, which is all FIFO needs.
            f"CREATE TABLE IF NOT EXISTS {self.messages} ("
            "id INTEGER PRIMARY KEY, channel TEXT NOT NULL, key TEXT NOT NULL, "
            "payload BLOB NOT NULL, expires_at REAL NOT NULL)",
            # Claims walk one key in id order; capacity counts walk one channel's live rows.
            f"CREATE INDEX IF NOT EXISTS {p}messages_key_id ON {self.messages} (key, id)",
            f"CREATE INDEX IF NOT EXISTS {p}messages_channel_expires "
            f"ON {self.messages} (channel, expires_at)",
            f"CREATE TABLE IF NOT EXISTS {self.groups} ("
            "group_name TEXT NOT NULL, channel TEXT NOT NULL, key TEXT NOT NULL, "
            "expires_at REAL NOT NULL, PRIMARY KEY (group_name, channel)) WITHOUT ROWID",
            # Reaping a dead process deletes its memberships by key.
            f"CREATE INDEX IF NOT EXISTS {p}groups_key ON {self.groups} (key)",
            f"CREATE TABLE IF NOT EXISTS {self.processes} ("
            "key TEXT PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID",
            *_channel_sizes_ddl(p),
        )


def read_version(raw: sqlite3.Connection, tables: Tables) -> int | None:
    """The stored schema version, or None for a database this driver never touched."""
    exists = raw.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (tables.meta,)
    ).fetchone()
    if exists is None:
        return None
    row = raw.execute(f"SELECT value FROM {tables.meta} WHERE name = 'schema_version'").fetchone()
    return None if row is None else int(row[0])


def _refuse_newer(version: int, path: str) -> None:
    if version > SCHEMA_VERSION:
        raise DriverError(
            f"SQLite database {path!r} has channels-lite schema version {version}, but this "
            f"channels-lite only knows versions up to {SCHEMA_VERSION}: upgrade channels-lite "
            "in this process, or point CONFIG['path'] at another file"
        )


def _journal_mode(raw: sqlite3.Connection, path: str) -> str:
    mode = str(raw.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    if mode != "wal":
        # WAL lets claims' read-only pre-checks and other readers run while a writer commits;
        # the setting is stored in the file, so this happens once per database.
        mode = str(raw.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
        if mode != "wal":
            logger.warning(
                "SQLite database %s could not switch to WAL (journal_mode is %s); "
                "the filesystem may not support shared memory. Expect slower writes.",
                path,
                mode,
            )
    return mode


def prepare(raw: sqlite3.Connection, tables: Tables, path: str) -> int:
    """Switch to WAL, create or upgrade the tables; return the schema version now in place."""
    _journal_mode(raw, path)
    version = read_version(raw, tables)
    if version == SCHEMA_VERSION:
        # The common case (every sibling, every restart) never takes the write lock.
        return version
    if version is not None:
        _refuse_newer(version, path)
    with immediate(raw):
        # Another process may have created or upgraded the schema since the check above.
        version = read_version(raw, tables)
        if version is None:
            for statement in tables.ddl():
                raw.execute(statement)
            logger.info("created channels-lite tables (schema %d) in %s", SCHEMA_VERSION, path)
        else:
            _refuse_newer(version, path)
            for step in range(version, SCHEMA_VERSION):
                for statement in _UPGRADES[step](tables.prefix):
                    raw.execute(statement)
                logger.info("upgraded %s from schema %d to %d", path, step, step + 1)
        raw.execute(
            f"INSERT INTO {tables.meta} (name, value) VALUES ('schema_version', ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (str(SCHEMA_VERSION),),
        )
    return SCHEMA_VERSION
