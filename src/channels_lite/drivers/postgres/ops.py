"""The driver's statements, each operation one round trip on a pooled autocommit connection.

Every operation is one implicit transaction and one network round trip: one statement, or a
few sent as one pipeline before a single Sync (a push batch whose capacity for a channel
changes half-way). PostgreSQL runs the statements between two Syncs as one implicit
transaction, committed at the Sync or rolled back as a whole. The only other traffic is the
background deletion of rows already handed on from their notification (see :mod:`.inbound`).

Exact capacity: a push takes transaction-level advisory locks on its channels (striped, see
:data:`STRIPES`), then counts each channel's live messages with a snapshot taken after the locks
were granted, so it sees every push that held them before, then inserts; all in one statement.
A per-channel counter row (``UPDATE ... SET n = n + 1 WHERE n < capacity``) was the other
candidate; it was set aside because the count must only include messages unexpired at the
``now`` each caller passes: a counter would need every claim, purge and reap to decrement it
(claims would then write to, and contend on, the rows pushes lock, in an order that can
deadlock) and would still be wrong for messages that expired unclaimed. Counting live rows
under a lock needs no bookkeeping at all; the lock lasts one round trip.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
import zlib
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import psycopg

from channels_lite.drivers.base import Claimed, ClaimRequest, Envelope, StorageStats
from channels_lite.drivers.postgres.errors import NotApplied
from channels_lite.drivers.postgres.schema import Tables, read_version
from channels_lite.drivers.postgres.wakeups import FLUSH_NOTE, shared_channel, wake_channel

__all__ = ["STRIPES", "Statements", "stripe"]

logger = logging.getLogger("channels_lite.drivers.postgres")

Conn = psycopg.AsyncConnection[Any]

#: Capacity locks: each channel maps to one of this many advisory locks per namespace. A push
#: takes at most this many locks (in ascending order, so pushes never deadlock), which keeps a
#: thousand-member group_send within PostgreSQL's default lock budget for one transaction
#: (max_locks_per_transaction = 64). Two channels sharing a stripe only means their pushes
#: take turns for the few hundred microseconds a push transaction lasts.
STRIPES = 64


def stripe(channel: str) -> int:
    # crc32, not hash(): every process must map a channel to the same lock.
    return zlib.crc32(channel.encode("utf-8", "surrogatepass")) % STRIPES


class Statements:
    """SQL text for one set of tables, built once per driver instance."""

    def __init__(self, tables: Tables) -> None:
        self.tables = tables
        t = tables
        # Computed properties of Tables, used on every push.
        self.namespace = tables.namespace
        self.lock_key = tables.lock_key
        # One cursor per connection for push_one, reused: psycopg keeps a cursor's adapters
        # when it runs the same query object again. Building a cursor and its adapters cost
        # about 30 us a send on a process that has just woken up (sends far apart).
        self._push_cursors: weakref.WeakKeyDictionary[Conn, psycopg.AsyncCursor[Any]] = (
            weakref.WeakKeyDictionary()
        )
        # A push is this one statement. In order: take the batch's capacity locks (ascending
        # stripes), count each channel's live messages with a fresh snapshot taken after the
        # locks were granted (live_counts is VOLATILE, see schema.Tables.ddl; its p_locks
        # argument makes it wait for the locks), then decide every envelope in batch order:
        # room if the channel's live messages plus the live envelopes ahead of it in this
        # batch are fewer than its capacity. The envelopes of one statement share a capacity
        # per channel (see _runs), which is what makes "count the live ones ahead" exact.
        # Notifications go out at commit, one per wake-up channel of the stored envelopes.
        self.push = f"""
WITH batch AS (
    SELECT * FROM unnest(
        %(channels)s::text[], %(keys)s::text[], %(payloads)s::bytea[],
        %(expires)s::float8[], %(capacities)s::int8[], %(wakes)s::text[]
    ) WITH ORDINALITY AS b(channel, key, payload, expires_at, capacity, wake, ord)
), locks AS MATERIALIZED (
    SELECT pg_advisory_xact_lock(%(lock_key)s, s) FROM unnest(%(stripes)s::int4[]) AS s
), held AS MATERIALIZED (
    SELECT * FROM {t.live_counts}(
        %(held_channels)s::text[], %(held_most)s::int8[], %(now)s,
        (SELECT count(*) FROM locks)
    )
), ranked AS MATERIALIZED (
    SELECT b.*, h.n + count(*) FILTER (WHERE b.expires_at > %(now)s) OVER (
        PARTITION BY b.channel ORDER BY b.ord
        ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING
    ) AS ahead
    FROM batch AS b JOIN held AS h USING (channel)
), stored AS (
    INSERT INTO {t.messages} (channel, key, payload, expires_at)
    SELECT channel, key, payload, expires_at FROM ranked WHERE ahead < capacity ORDER BY ord
), woken AS (
    SELECT pg_notify(w.wake, %(token)s) FROM (
        SELECT DISTINCT wake FROM ranked WHERE ahead < capacity
    ) AS w
)
SELECT ord FROM ranked WHERE ahead < capacity
UNION ALL
SELECT -count(*) FROM woken
"""
        # One envelope (every send): the same decision in one call of a PL/pgSQL function
        # (see schema.Tables.push_one_ddl for why), true when the message was stored.
        # Positional: a dict of eleven names would be reordered on every send.
        self.push_one = f"SELECT {t.push_one}(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        # Claims: every request in one statement. SKIP LOCKED makes concurrent claimers take
        # disjoint rows instead of waiting for each other; the DELETE removes what was locked.
        self.claim = f"""
WITH req AS (
    SELECT * FROM unnest(%(keys)s::text[], %(limits)s::int8[]) AS r(key, lim)
), excluded AS (
    SELECT * FROM unnest(%(ex_keys)s::text[], %(ex_channels)s::text[]) AS e(key, channel)
), picked AS (
    SELECT p.id FROM req AS r CROSS JOIN LATERAL (
        SELECT m.id FROM {t.messages} AS m
        WHERE m.key = r.key AND m.expires_at > %(now)s
          AND NOT EXISTS (
              SELECT 1 FROM excluded AS e WHERE e.key = r.key AND e.channel = m.channel
          )
        ORDER BY m.id
        LIMIT r.lim
        FOR UPDATE SKIP LOCKED
    ) AS p
), gone AS (
    DELETE FROM {t.messages} AS m USING picked WHERE m.id = picked.id
    RETURNING m.id, m.channel, m.key, m.payload, m.expires_at
)
SELECT id, channel, key, payload, expires_at FROM gone ORDER BY id
"""
        # The same for the usual case of one request (a process's own key), simpler to plan:
        # the (key, id) index walk stops after ``limit`` rows.
        self.claim_one = f"""
WITH gone AS (
    DELETE FROM {t.messages} WHERE id IN (
        SELECT id FROM {t.messages}
        WHERE key = %(key)s AND expires_at > %(now)s AND channel <> ALL(%(exclude)s::text[])
        ORDER BY id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    )
    RETURNING id, channel, key, payload, expires_at
)
SELECT id, channel, key, payload, expires_at FROM gone ORDER BY id
"""
        # Messages already handed on from their notification (see .inbound): gone for good.
        self.delete_ids = f"DELETE FROM {t.messages} WHERE id = ANY(%(ids)s::int8[])"
        self.group_add = (
            f"INSERT INTO {t.groups} (group_name, channel, key, expires_at) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (group_name, channel) DO UPDATE SET "
            "key = excluded.key, expires_at = excluded.expires_at"
        )
        self.group_discard = f"DELETE FROM {t.groups} WHERE group_name = %s AND channel = %s"
        self.group_channels = (
            f"SELECT channel FROM {t.groups} WHERE group_name = %s AND expires_at > %s "
            "ORDER BY channel"
        )
        # Expired leases stay: heartbeat() must still find them to reap what they left.
        self.purge = f"""
WITH m AS (DELETE FROM {t.messages} WHERE expires_at <= %(now)s RETURNING 1),
     g AS (DELETE FROM {t.groups} WHERE expires_at <= %(now)s RETURNING 1)
SELECT (SELECT count(*) FROM m) + (SELECT count(*) FROM g)
"""
        # DELETE, not TRUNCATE: TRUNCATE's exclusive lock would queue behind every claim and
        # block every push, and ids must keep growing for FIFO.
        # The notification tells every listening process to forget the messages it holds
        # from notifications (see .inbound): they are flushed too.
        self.flush = f"""
WITH m AS (DELETE FROM {t.messages}), g AS (DELETE FROM {t.groups}),
     p AS (DELETE FROM {t.processes})
SELECT pg_notify(%(shared)s, %(note)s)
"""
        # One statement, one snapshot: renew our lease, take every other expired lease, and
        # what was routed under those keys. A process renewing concurrently wins: the DELETE
        # re-checks expires_at on the row version it waited for.
        self.heartbeat = f"""
WITH lease AS (
    INSERT INTO {t.processes} (key, expires_at) VALUES (%(key)s, %(expires_at)s)
    ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at
), dead AS (
    DELETE FROM {t.processes}
    WHERE key <> %(key)s AND expires_at <= %(now)s
    RETURNING key
), m AS (
    DELETE FROM {t.messages} WHERE key IN (SELECT key FROM dead)
), g AS (
    DELETE FROM {t.groups} WHERE key IN (SELECT key FROM dead)
)
SELECT key FROM dead ORDER BY key
"""
        self.release = f"""
WITH p AS (DELETE FROM {t.processes} WHERE key = %(key)s),
     m AS (DELETE FROM {t.messages} WHERE key = %(key)s),
     g AS (DELETE FROM {t.groups} WHERE key = %(key)s)
SELECT 1
"""
        self.stats_counts = f"""
SELECT
    (SELECT count(*) FROM {t.messages} WHERE expires_at > %(now)s),
    (SELECT count(*) FROM {t.messages} WHERE expires_at <= %(now)s),
    (SELECT count(*) FROM {t.processes} WHERE expires_at > %(now)s),
    (SELECT count(*) FROM {t.groups} WHERE expires_at > %(now)s),
    (SELECT count(*) FROM {t.groups} WHERE expires_at <= %(now)s),
    pg_total_relation_size('{t.messages}') + pg_total_relation_size('{t.groups}')
        + pg_total_relation_size('{t.processes}'),
    current_setting('server_version'),
    pg_notification_queue_usage()
"""
        self.stats_channels = f"""
SELECT channel, count(*) AS n FROM {t.messages} WHERE expires_at > %(now)s
GROUP BY channel ORDER BY n DESC, channel LIMIT %(top)s
"""
        self.stats_groups = f"""
SELECT group_name, count(*) AS n FROM {t.groups} WHERE expires_at > %(now)s
GROUP BY group_name ORDER BY n DESC, group_name LIMIT %(top)s
"""

    # -- push ------------------------------------------------------------------------------

    async def run_push(
        self, conn: Conn, envelopes: Sequence[Envelope], now: float, token: str
    ) -> list[bool]:
        if len(envelopes) == 1:
            return await self._run_push_one(conn, envelopes[0], now, token)
        runs = _runs(envelopes)
        # A channel's capacity changes inside the batch (rare): one statement per run, all in
        # one implicit transaction (one pipeline, one Sync), later runs seeing earlier ones.
        cursors = [conn.cursor() for _ in runs]
        with _PushOutcome(conn, cursors):
            if len(runs) == 1:
                await cursors[0].execute(self.push, self._push_params(runs[0], now, token))
            else:
                async with conn.pipeline():
                    for cursor, run in zip(cursors, runs, strict=True):
                        await cursor.execute(self.push, self._push_params(run, now, token))
        flags: list[bool] = []
        for cursor, run in zip(cursors, runs, strict=True):
            flags.extend(_flags(await cursor.fetchall(), len(run)))
        return flags

    async def _run_push_one(self, conn: Conn, env: Envelope, now: float, token: str) -> list[bool]:
        params = (
            self.lock_key,
            stripe(env.channel),
            env.channel,
            env.key,
            env.payload,
            env.expires_at,
            now,
            env.capacity,
            wake_channel(self.namespace, env.channel, env.key),
            token,
            f" {env.expires_at!r} {env.capacity} {env.channel}",
        )
        cursor = self._push_cursors.get(conn)
        if cursor is None or cursor.closed:
            cursor = self._push_cursors[conn] = conn.cursor()
        with _PushOutcome(conn, [cursor]):
            # Prepared at once, not after psycopg's five runs: the first messages of every
            # connection would otherwise wait for the statement to be parsed and planned.
            await cursor.execute(self.push_one, params, prepare=True)
        row = await cursor.fetchone()
        return [row is not None and row[0] is True]

    def _push_params(self, run: Sequence[Envelope], now: float, token: str) -> dict[str, Any]:
        namespace = self.namespace
        most: dict[str, int] = {}
        for env in run:
            most[env.channel] = max(most.get(env.channel, 0), env.capacity)
        return {
            "channels": [env.channel for env in run],
            "keys": [env.key for env in run],
            "payloads": [env.payload for env in run],
            "expires": [env.expires_at for env in run],
            "capacities": [env.capacity for env in run],
            "wakes": [wake_channel(namespace, env.channel, env.key) for env in run],
            "lock_key": self.lock_key,
            "stripes": sorted({stripe(channel) for channel in most}),
            "held_channels": list(most),
            "held_most": list(most.values()),
            "now": now,
            "token": token,
        }

    # -- claim -----------------------------------------------------------------------------

    async def run_claim(
        self, conn: Conn, requests: Sequence[ClaimRequest], now: float
    ) -> list[tuple[int, Claimed]]:
        """The claimed messages with their row ids, oldest first."""
        query: str
        params: dict[str, Any]
        if len(requests) == 1:
            (request,) = requests
            query = self.claim_one
            params = {
                "key": request.key,
                "limit": request.limit,
                "exclude": sorted(request.exclude),
                "now": now,
            }
        else:
            ex_keys: list[str] = []
            ex_channels: list[str] = []
            for request in requests:
                for channel in request.exclude:
                    ex_keys.append(request.key)
                    ex_channels.append(channel)
            query = self.claim
            params = {
                "keys": [r.key for r in requests],
                "limits": [r.limit for r in requests],
                "ex_keys": ex_keys,
                "ex_channels": ex_channels,
                "now": now,
            }
        cursor = conn.cursor()
        try:
            await cursor.execute(query, params, prepare=True)
        except asyncio.CancelledError:
            # psycopg asked the server to cancel the DELETE and waited for the outcome. If
            # the statement had already completed (and so committed: it runs on its own), its
            # rows are in the cursor: return them, keeping the cancellation pending
            # (Task.cancelling() stays > 0) for the core to re-raise once it has handed them
            # on. Otherwise nothing was removed and the cancellation goes on.
            if not _completed(cursor):
                raise
            logger.debug("a claim completed as it was cancelled; returning its messages")
        return [
            (int(row_id), Claimed(channel, key, bytes(payload), expires_at))
            for row_id, channel, key, payload, expires_at in await cursor.fetchall()
        ]

    async def run_delete(self, conn: Conn, ids: Sequence[int]) -> None:
        await conn.execute(self.delete_ids, {"ids": list(ids)}, prepare=True)

    # -- groups ----------------------------------------------------------------------------

    async def run_group_add(
        self, conn: Conn, group: str, channel: str, key: str, expires_at: float
    ) -> None:
        await conn.execute(self.group_add, (group, channel, key, expires_at))

    async def run_group_discard(self, conn: Conn, group: str, channel: str) -> None:
        await conn.execute(self.group_discard, (group, channel))

    async def run_group_channels(self, conn: Conn, group: str, now: float) -> list[str]:
        cursor = await conn.execute(self.group_channels, (group, now))
        return [str(channel) for (channel,) in await cursor.fetchall()]

    # -- housekeeping ------------------------------------------------------------------------

    async def run_purge(self, conn: Conn, now: float) -> int:
        cursor = await conn.execute(self.purge, {"now": now})
        row = await cursor.fetchone()
        return 0 if row is None else int(row[0])

    async def run_flush(self, conn: Conn) -> None:
        await conn.execute(
            self.flush, {"shared": shared_channel(self.namespace), "note": FLUSH_NOTE}
        )

    async def run_heartbeat(
        self, conn: Conn, process_key: str, expires_at: float, now: float
    ) -> list[str]:
        cursor = await conn.execute(
            self.heartbeat, {"key": process_key, "expires_at": expires_at, "now": now}
        )
        return [str(key) for (key,) in await cursor.fetchall()]

    async def run_release(self, conn: Conn, process_key: str) -> None:
        await conn.execute(self.release, {"key": process_key})

    async def run_stats(self, conn: Conn, now: float, top: int) -> StorageStats:
        cursor = await conn.execute(self.stats_counts, {"now": now})
        row = await cursor.fetchone()
        assert row is not None
        (messages, expired, processes, members, expired_members, size, server, queue) = row
        channels: dict[str, int] = {}
        groups: dict[str, int] = {}
        if top > 0:
            cursor = await conn.execute(self.stats_channels, {"now": now, "top": top})
            channels = {str(name): int(n) for name, n in await cursor.fetchall()}
            cursor = await conn.execute(self.stats_groups, {"now": now, "top": top})
            groups = {str(name): int(n) for name, n in await cursor.fetchall()}
        version = await read_version(conn, self.tables)
        return StorageStats(
            messages=int(messages),
            expired_messages=int(expired),
            channels=channels,
            groups=groups,
            processes=int(processes),
            storage_bytes=int(size),
            extra={
                "schema": self.tables.schema,
                "table_prefix": self.tables.prefix,
                "schema_version": version,
                "server_version": str(server),
                "memberships": int(members),
                "expired_memberships": int(expired_members),
                "notification_queue_usage": float(queue),
            },
        )


class _PushOutcome:
    """Around a push's statements (one implicit transaction): say what an interruption left.

    - The connection broke before any result came back (psycopg keeps a result only once the
      statement ended): :class:`NotApplied`, so the pool may run the push again.
    - Cancelled: psycopg asked the server to cancel and waited for the outcome (as in
      run_claim). Every statement has its rows only if the transaction committed; then the
      messages are stored and the caller must hear so (CancelledError would mean "nothing
      stored" and a retry would store them twice): the cancellation is absorbed, and the
      caller re-raises it once the flags are read.

    A class rather than a generator context manager: it is around every send.
    """

    __slots__ = ("_conn", "_cursors")

    def __init__(self, conn: Conn, cursors: Sequence[psycopg.AsyncCursor[Any]]) -> None:
        self._conn = conn
        self._cursors = cursors

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if isinstance(exc, psycopg.OperationalError):
            conn = self._conn
            if self._cursors[0].pgresult is None and (conn.broken or conn.closed):
                raise NotApplied(str(exc)) from exc
            return False
        if isinstance(exc, asyncio.CancelledError):
            if not all(_completed(cursor) for cursor in self._cursors):
                return False
            logger.debug("a push completed as it was cancelled; returning its flags")
            return True
        return False


def _completed(cursor: psycopg.AsyncCursor[Any]) -> bool:
    """Did the statement on ``cursor`` run to its end (and so, in autocommit, commit)?"""
    result = cursor.pgresult
    return result is not None and result.status == psycopg.pq.ExecStatus.TUPLES_OK


def _flags(rows: Sequence[tuple[Any, ...]], count: int) -> list[bool]:
    # Rows are the 1-based positions stored, and one non-positive row counting notifications.
    stored = {int(row[0]) for row in rows if row[0] > 0}
    return [index in stored for index in range(1, count + 1)]


def _runs(envelopes: Sequence[Envelope]) -> list[list[Envelope]]:
    """Split a batch where a channel's capacity changes, keeping order.

    The push statement decides every envelope of a run at once, which is exact when all the
    envelopes of one channel in that run share one capacity (the core resolves a channel's
    capacity once per call, so a batch is almost always a single run). Later runs run in the
    same transaction and see the earlier runs' rows.
    """
    runs: list[list[Envelope]] = []
    current: list[Envelope] = []
    capacity_of: dict[str, int] = {}
    for env in envelopes:
        known = capacity_of.get(env.channel)
        if known is not None and known != env.capacity:
            runs.append(current)
            current = []
            capacity_of = {}
        capacity_of[env.channel] = env.capacity
        current.append(env)
    if current:
        runs.append(current)
    return runs
