"""Whole transactions, run inside the connection's worker thread (one hop each).

Every function takes the raw ``sqlite3.Connection`` first and is all-or-nothing, because the
caller retries it from scratch when the database is locked.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Collection, Sequence

from channels_lite.drivers.base import Claimed, ClaimRequest, Envelope, StorageStats
from channels_lite.drivers.sqlite.connection import check_file, immediate, snapshot
from channels_lite.drivers.sqlite.schema import Tables, prepare, read_version

__all__ = [
    "adopt",
    "claim",
    "flush",
    "group_add",
    "group_channels",
    "group_discard",
    "has_claimable",
    "heartbeat",
    "peek",
    "purge",
    "push",
    "release",
    "remove",
    "stats",
]


def push(
    raw: sqlite3.Connection, t: Tables, envelopes: Sequence[Envelope], now: float
) -> list[bool]:
    size_sql = f"SELECT stored FROM {t.channel_sizes} WHERE channel = ?"
    # Counting stops at the capacity: "is it full?" needs no more.
    count_sql = (
        f"SELECT count(*) FROM (SELECT 1 FROM {t.messages} "
        "WHERE channel = ? AND expires_at > ? LIMIT ?)"
    )
    insert_sql = f"INSERT INTO {t.messages} (channel, key, payload, expires_at) VALUES (?, ?, ?, ?)"
    # Per channel, bounds of its live (unexpired) count, tracked through the batch: the write
    # lock guarantees no one else changes it until COMMIT. The stored count (expired rows
    # included) is an upper bound read by primary key; only when it reaches the capacity do
    # we count live rows, up to the capacity.
    bounds: dict[str, tuple[int, int]] = {}
    flags: list[bool] = []
    with immediate(raw):
        for env in envelopes:
            known = bounds.get(env.channel)
            if known is None:
                row = raw.execute(size_sql, (env.channel,)).fetchone()
                known = (0, 0 if row is None else int(row[0]))
            low, high = known
            if low < env.capacity <= high:
                counted = raw.execute(count_sql, (env.channel, now, env.capacity)).fetchone()[0]
                low, high = (counted, counted) if counted < env.capacity else (counted, high)
            if high < env.capacity:
                raw.execute(insert_sql, (env.channel, env.key, env.payload, env.expires_at))
                if env.expires_at > now:
                    low, high = low + 1, high + 1
                flags.append(True)
            else:
                flags.append(False)
            bounds[env.channel] = (low, high)
    return flags


#: Above this many excluded channels, pass them as one JSON array rather than one SQL
#: parameter each (SQLite caps the number of parameters of a statement).
_MAX_INLINE_EXCLUDE = 500


def _not_excluded(exclude: frozenset[str]) -> tuple[str, tuple[str, ...]]:
    if not exclude:
        return "", ()
    names = tuple(sorted(exclude))
    if len(names) > _MAX_INLINE_EXCLUDE:
        return " AND channel NOT IN (SELECT value FROM json_each(?))", (json.dumps(names),)
    return f" AND channel NOT IN ({', '.join('?' * len(names))})", names


def has_claimable(raw: sqlite3.Connection, t: Tables, request: ClaimRequest, now: float) -> bool:
    """A read outside any write transaction: is there anything for this request at all?

    The core polls claims; most polls find nothing. Answering that from a WAL read snapshot
    never waits for, or blocks, a writer in another process.
    """
    if request.limit <= 0:
        return False
    clause, names = _not_excluded(request.exclude)
    row = raw.execute(
        f"SELECT 1 FROM {t.messages} WHERE key = ? AND expires_at > ?{clause} LIMIT 1",
        (request.key, now, *names),
    ).fetchone()
    return row is not None


def claim(
    raw: sqlite3.Connection,
    t: Tables,
    requests: Sequence[ClaimRequest],
    now: float,
    *,
    precheck: bool = True,
    likely: Collection[str] = (),
) -> list[Claimed]:
    """Claim for every request in one write transaction.

    With ``precheck``, a request is first checked with a read (:func:`has_claimable`) and
    left out if it has nothing, so an empty poll never takes the write lock; except for keys
    in ``likely`` (the caller's guess that messages are waiting there, e.g. the last claim
    filled its limit), where the read would only add to the work.
    """
    wanted = [
        r
        for r in requests
        if r.limit > 0 and (not precheck or r.key in likely or has_claimable(raw, t, r, now))
    ]
    if not wanted:
        # Nothing to claim in this file: make sure it is still the file at the path.
        check_file(raw)
        return []
    claimed: list[Claimed] = []
    with immediate(raw):
        for request in wanted:
            clause, names = _not_excluded(request.exclude)
            # One row (a lone receiver, the usual case) as "id = (subquery)": measured here
            # at half the cost of "id IN (subquery)" (63 vs 135 us a claim, SQLite 3.40),
            # which collects the ids into a list before it deletes.
            match = "=" if request.limit == 1 else "IN"
            rows = raw.execute(
                f"DELETE FROM {t.messages} WHERE id {match} ("
                f"SELECT id FROM {t.messages} WHERE key = ? AND expires_at > ?{clause} "
                "ORDER BY id LIMIT ?) RETURNING id, channel, key, payload, expires_at",
                (request.key, now, *names, request.limit),
            ).fetchall()
            # SQLite does not promise any order for RETURNING rows.
            rows.sort(key=lambda row: row[0])
            claimed.extend(
                Claimed(channel=channel, key=key, payload=bytes(payload), expires_at=expires_at)
                for _, channel, key, payload, expires_at in rows
            )
    return claimed


#: What names one stored message for :func:`remove`: row id, channel, expiry and payload.
#: SQLite hands a deleted row's id to the next insert when that row had the highest id, so
#: the id alone could name a message stored after the peeked one was gone (by flush, or
#: reaping); with the rest, only an identical message (same channel, payload and expiry,
#: i.e. a clock that stood still) could be taken for it.
Receipt = tuple[int, str, float, bytes]


def peek(
    raw: sqlite3.Connection,
    t: Tables,
    requests: Sequence[ClaimRequest],
    now: float,
    held: Collection[Receipt],
) -> list[tuple[Receipt, Claimed]]:
    """Read, without removing, what :func:`claim` would take, skipping ``held`` receipts.

    Plain reads (a transaction each): no write lock, no WAL frames, which is the point (see
    :class:`~channels_lite.drivers.base.Peeks`). Each key stands alone, so nothing asks for
    one snapshot across them.
    """
    held_ids = {receipt[0] for receipt in held}
    found: list[tuple[Receipt, Claimed]] = []
    for request in requests:
        if request.limit <= 0:
            continue
        clause, names = _not_excluded(request.exclude)
        # Held rows are still stored (the oldest, usually): read past them.
        rows = raw.execute(
            f"SELECT id, channel, payload, expires_at FROM {t.messages} "
            f"WHERE key = ? AND expires_at > ?{clause} ORDER BY id LIMIT ?",
            (request.key, now, *names, request.limit + len(held_ids)),
        ).fetchall()
        taken = 0
        for row_id, channel, payload, expires_at in rows:
            data = bytes(payload)
            receipt = (row_id, channel, expires_at, data)
            if row_id in held_ids and receipt in held:
                continue
            found.append((receipt, Claimed(channel, request.key, data, expires_at)))
            taken += 1
            if taken == request.limit:
                break
    check_file(raw)
    return found


def remove(raw: sqlite3.Connection, t: Tables, receipts: Collection[Receipt]) -> None:
    with immediate(raw):
        raw.executemany(
            f"DELETE FROM {t.messages} "
            "WHERE id = ? AND channel = ? AND expires_at = ? AND payload = ?",
            receipts,
        )


def group_add(
    raw: sqlite3.Connection, t: Tables, group: str, channel: str, *, key: str, expires_at: float
) -> None:
    with immediate(raw):
        raw.execute(
            f"INSERT INTO {t.groups} (group_name, channel, key, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (group_name, channel) DO UPDATE SET "
            "key = excluded.key, expires_at = excluded.expires_at",
            (group, channel, key, expires_at),
        )


def group_discard(raw: sqlite3.Connection, t: Tables, group: str, channel: str) -> None:
    with immediate(raw):
        raw.execute(
            f"DELETE FROM {t.groups} WHERE group_name = ? AND channel = ?", (group, channel)
        )


def group_channels(raw: sqlite3.Connection, t: Tables, group: str, now: float) -> list[str]:
    # (group_name, channel) is the primary key: each channel appears once already.
    rows = raw.execute(
        f"SELECT channel FROM {t.groups} WHERE group_name = ? AND expires_at > ? ORDER BY channel",
        (group, now),
    ).fetchall()
    check_file(raw)
    return [channel for (channel,) in rows]


def purge(raw: sqlite3.Connection, t: Tables, now: float) -> int:
    # Expired leases stay: heartbeat() must still find them to reap what their process left.
    with immediate(raw):
        removed = raw.execute(f"DELETE FROM {t.messages} WHERE expires_at <= ?", (now,)).rowcount
        removed += raw.execute(f"DELETE FROM {t.groups} WHERE expires_at <= ?", (now,)).rowcount
        raw.execute(f"DELETE FROM {t.channel_sizes} WHERE stored <= 0")
    return int(removed)


def flush(raw: sqlite3.Connection, t: Tables) -> None:
    with immediate(raw):
        for table in (t.messages, t.groups, t.processes, t.channel_sizes):
            raw.execute(f"DELETE FROM {table}")


def _drop_process(raw: sqlite3.Connection, t: Tables, key: str) -> None:
    raw.execute(f"DELETE FROM {t.messages} WHERE key = ?", (key,))
    raw.execute(f"DELETE FROM {t.groups} WHERE key = ?", (key,))
    raw.execute(f"DELETE FROM {t.processes} WHERE key = ?", (key,))


def heartbeat(
    raw: sqlite3.Connection, t: Tables, process_key: str, expires_at: float, now: float
) -> tuple[list[str], float | None]:
    """Renew the lease and reap; also return the lease's previous ``expires_at`` (or None)."""
    # Copy the WAL into the database first (PASSIVE: never waits, never blocks anyone). When
    # nothing else happened since the last renewal, that leaves the WAL fully copied, and the
    # write below restarts it from its beginning instead of appending: an idle process renews
    # its lease forever without growing any file.
    raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    with immediate(raw):
        row = raw.execute(
            f"SELECT expires_at FROM {t.processes} WHERE key = ?", (process_key,)
        ).fetchone()
        raw.execute(
            f"INSERT INTO {t.processes} (key, expires_at) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at",
            (process_key, expires_at),
        )
        dead = [
            key
            for (key,) in raw.execute(
                f"SELECT key FROM {t.processes} WHERE key != ? AND expires_at <= ? ORDER BY key",
                (process_key, now),
            ).fetchall()
        ]
        for key in dead:
            _drop_process(raw, t, key)
    return dead, None if row is None else float(row[0])


def release(raw: sqlite3.Connection, t: Tables, process_key: str) -> None:
    with immediate(raw):
        _drop_process(raw, t, process_key)


def adopt(old: sqlite3.Connection, new: sqlite3.Connection, t: Tables, path: str) -> str:
    """Move every row of ``old`` (a deleted or replaced file) into ``new`` (the file now at
    ``path``); return a summary for the log.

    The write lock of the old file is held throughout, so every other process that still has
    it open either committed before (and its rows move now) or finds the file gone when it
    takes the lock (and moves itself). New ids put moved messages after what the new file
    already holds; per key, their order is kept.
    """
    prepare(new, t, path)
    old.execute("BEGIN IMMEDIATE")
    try:
        if read_version(old, t) is None:
            messages: list[tuple[object, ...]] = []
            groups: list[tuple[object, ...]] = []
            leases: list[tuple[object, ...]] = []
        else:
            messages = old.execute(
                f"SELECT channel, key, payload, expires_at FROM {t.messages} ORDER BY id"
            ).fetchall()
            groups = old.execute(
                f"SELECT group_name, channel, key, expires_at FROM {t.groups}"
            ).fetchall()
            leases = old.execute(f"SELECT key, expires_at FROM {t.processes}").fetchall()
        if messages or groups or leases:
            with immediate(new):
                new.executemany(
                    f"INSERT INTO {t.messages} (channel, key, payload, expires_at) "
                    "VALUES (?, ?, ?, ?)",
                    messages,
                )
                new.executemany(
                    f"INSERT INTO {t.groups} (group_name, channel, key, expires_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (group_name, channel) DO UPDATE SET "
                    "key = excluded.key, expires_at = max(expires_at, excluded.expires_at)",
                    groups,
                )
                new.executemany(
                    f"INSERT INTO {t.processes} (key, expires_at) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET "
                    "expires_at = max(expires_at, excluded.expires_at)",
                    leases,
                )
            # A crash between the two commits leaves the rows in both files; the next
            # process to find the old file gone would move them again (a double fault).
            for table in (t.messages, t.groups, t.processes):
                old.execute(f"DELETE FROM {table}")
        old.execute("COMMIT")
    except BaseException:
        if old.in_transaction:
            old.execute("ROLLBACK")
        raise
    return f"{len(messages)} message(s), {len(groups)} membership(s), {len(leases)} lease(s)"


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def stats(raw: sqlite3.Connection, t: Tables, path: str, now: float, top: int) -> StorageStats:
    def scalar(sql: str, *params: object) -> int:
        return int(raw.execute(sql, params).fetchone()[0])

    with snapshot(raw):
        messages = scalar(f"SELECT count(*) FROM {t.messages} WHERE expires_at > ?", now)
        expired = scalar(f"SELECT count(*) FROM {t.messages} WHERE expires_at <= ?", now)
        processes = scalar(f"SELECT count(*) FROM {t.processes} WHERE expires_at > ?", now)
        memberships = scalar(f"SELECT count(*) FROM {t.groups} WHERE expires_at > ?", now)
        expired_memberships = scalar(f"SELECT count(*) FROM {t.groups} WHERE expires_at <= ?", now)
        channels: dict[str, int] = {}
        groups: dict[str, int] = {}
        # LIMIT -1 would mean "no limit" to SQLite; top <= 0 asks for none.
        if top > 0:
            channels = dict(
                raw.execute(
                    f"SELECT channel, count(*) AS n FROM {t.messages} WHERE expires_at > ? "
                    "GROUP BY channel ORDER BY n DESC, channel LIMIT ?",
                    (now, top),
                ).fetchall()
            )
            groups = dict(
                raw.execute(
                    f"SELECT group_name, count(*) AS n FROM {t.groups} WHERE expires_at > ? "
                    "GROUP BY group_name ORDER BY n DESC, group_name LIMIT ?",
                    (now, top),
                ).fetchall()
            )
        version = read_version(raw, t)
        journal_mode = str(raw.execute("PRAGMA journal_mode").fetchone()[0])
    check_file(raw)
    return StorageStats(
        messages=messages,
        expired_messages=expired,
        channels=channels,
        groups=groups,
        processes=processes,
        storage_bytes=_file_size(path) + _file_size(f"{path}-wal"),
        extra={
            "path": path,
            "schema_version": version,
            "sqlite_version": sqlite3.sqlite_version,
            "journal_mode": journal_mode,
            "memberships": memberships,
            "expired_memberships": expired_memberships,
        },
    )
