"""PostgresDriver: the same layer across machines, on a PostgreSQL server users already run.

Why psycopg 3 (async) rather than asyncpg:

- Django's own PostgreSQL backend uses psycopg 3, so the extra usually adds nothing new to an
  install, and a Django ``DATABASES`` entry (including its ``OPTIONS``: sslmode, service,
  passfile...) maps onto libpq's connection parameters one to one.
- libpq underneath means every connection string, ``PG*`` environment variable, ``.pgpass``
  and ``pg_service.conf`` users already rely on just works; asyncpg reimplements the protocol
  and supports a subset of those.
- Pipeline mode lets a push batch whose capacities differ send its statements as one
  implicit transaction in a single network round trip.
- asyncpg's speed advantage is in decoding large result sets, which a channel layer does not
  have: its statements move a few rows of bytes each.

Connections come from a small pool of the driver's own (see :mod:`.pool` for why not
psycopg_pool: its background workers can hang the shutdown of the short-lived event loops that
``async_to_sync`` creates).

What lives where: :mod:`.options` (option checks, DSN or Django alias), :mod:`.schema` (tables
and their version), :mod:`.ops` (the statements), :mod:`.pool` (connections, retries,
cancellation), :mod:`.wakeups` (LISTEN/NOTIFY), :mod:`.inbound` (messages handed on straight
from their notification). This module imports only :mod:`.options`
(which does not import psycopg) until the driver is constructed, so that installs without the
``postgres`` extra can still register and list the driver.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from channels_lite.drivers.base import (
    Claimed,
    ClaimRequest,
    Driver,
    DriverConfigError,
    DriverError,
    DriverFeatures,
    Envelope,
    StorageStats,
)
from channels_lite.drivers.listeners import ChangeListeners
from channels_lite.drivers.postgres.options import (
    LONGEST_SUFFIX,
    Target,
    check_database,
    check_dsn,
    check_identifier,
    check_pool_sizes,
    check_timeout,
    dsn_target,
    require_psycopg,
)

if TYPE_CHECKING:
    from channels_lite.drivers.postgres.inbound import Inbound
    from channels_lite.drivers.postgres.ops import Statements
    from channels_lite.drivers.postgres.pool import Pool
    from channels_lite.drivers.postgres.wakeups import Listener

__all__ = ["PostgresDriver"]

logger = logging.getLogger("channels_lite.drivers.postgres")

#: Tables already created or checked by this process: siblings (one per event loop, some of
#: them short-lived async_to_sync loops) skip the extra connection and round trips.
_PREPARED: set[tuple[str, str]] = set()

#: Seconds between handing messages on from their notifications and deleting their rows.
DELETE_DELAY = 0.002


def _not_listening(key: str) -> None:
    """What a driver instance without a listener says of every key's LISTEN."""
    return None


class PostgresDriver(Driver):
    """Messages and groups in PostgreSQL tables; wake-ups by targeted LISTEN/NOTIFY."""

    name: ClassVar[str] = "postgres"
    features: ClassVar[DriverFeatures] = DriverFeatures(
        cross_process=True, persistent=True, max_batch=1000
    )
    option_docs: ClassVar[Mapping[str, str]] = {
        "dsn": "libpq connection string or URI, e.g. 'postgresql://user:pw@host:5432/db' "
        "(or give 'database')",
        "database": "alias of a Django DATABASES entry whose HOST, PORT, NAME, USER, PASSWORD "
        "and OPTIONS are reused (read when the layer first connects)",
        "schema": "schema of the tables, created if missing (default 'public')",
        "table_prefix": "prefix of the table names (default 'channels_lite_')",
        "pool_min": "connections each event loop's pool keeps open (default 1)",
        "pool_max": "most connections per event loop's pool (default 10)",
        "timeout": "seconds to wait for a connection or a restarting server, and to retry "
        "transient errors, before raising (default 10.0)",
    }

    def __init__(
        self,
        *,
        dsn: str | None = None,
        database: str | None = None,
        schema: str = "public",
        table_prefix: str = "channels_lite_",
        pool_min: int = 1,
        pool_max: int = 10,
        timeout: float = 10.0,
        **options: Any,
    ) -> None:
        # Unknown options first (the base class), then psycopg, then each value.
        Driver.__init__(self, **options)
        require_psycopg()
        if dsn is not None and database is not None:
            raise DriverConfigError(
                "database",
                "give either 'dsn' or 'database' (a Django DATABASES alias), not both",
            )
        if dsn is None and database is None:
            raise DriverConfigError(
                "dsn",
                "the postgres driver needs 'dsn' (e.g. 'postgresql://user:password@host:5432/"
                "dbname') or 'database' (a Django DATABASES alias, e.g. 'default')",
            )
        checked: dict[str, Any] = {}
        if dsn is not None:
            checked["dsn"] = check_dsn(dsn)
        if database is not None:
            checked["database"] = check_database(database)
        checked["schema"] = check_identifier("schema", schema)
        checked["table_prefix"] = check_identifier(
            "table_prefix", table_prefix, room=len(LONGEST_SUFFIX)
        )
        checked["pool_min"], checked["pool_max"] = check_pool_sizes(pool_min, pool_max)
        checked["timeout"] = check_timeout(timeout)
        super().__init__(**checked)
        self.dsn: str | None = checked.get("dsn")
        self.database: str | None = checked.get("database")
        self.schema: str = checked["schema"]
        self.table_prefix: str = checked["table_prefix"]
        self.pool_min: int = checked["pool_min"]
        self.pool_max: int = checked["pool_max"]
        self.timeout: float = checked["timeout"]
        # A DSN is parsed now (no I/O), so describe() and errors can name the server at once;
        # a Django alias is read when the driver opens, once settings are surely configured.
        self.target: Target | None = (
            dsn_target(self.dsn, self.timeout) if self.dsn is not None else None
        )
        self._pool: Pool | None = None
        self._ops: Statements | None = None
        self._open_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners = ChangeListeners(logger)
        self._listener: Listener | None = None
        self._inbound: Inbound | None = None
        self._deleting: asyncio.Task[None] | None = None
        self._delete_timer: asyncio.TimerHandle | None = None
        # Sent with this instance's NOTIFYs, so that its own listener skips them: the core
        # hears of its own pushes directly, and a wake-up for them only costs a claim.
        self._token = secrets.token_hex(8)

    def describe(self) -> str:
        where = (
            self.target.where()
            if self.target is not None
            else f"Django database {self.database!r}"
            if self.database is not None
            else "(not connected yet)"
        )
        return f"postgres at {where}, tables {self.schema}.{self.table_prefix}*"

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        async with self._open_lock:
            if self._pool is not None:
                return
            import psycopg

            from channels_lite.drivers.postgres import schema
            from channels_lite.drivers.postgres.errors import storage_error
            from channels_lite.drivers.postgres.inbound import Inbound, delivered_for
            from channels_lite.drivers.postgres.ops import Statements
            from channels_lite.drivers.postgres.options import django_target
            from channels_lite.drivers.postgres.pool import Pool, connect

            if self.target is not None:
                target = self.target
            else:
                assert self.database is not None
                target = django_target(self.database, self.timeout)
            tables = schema.Tables(self.schema, self.table_prefix)
            prepared_key = (target.conninfo, tables.namespace)
            if prepared_key not in _PREPARED:
                conn = await connect(target, "connecting")
                try:
                    version = await schema.prepare(conn, tables, target.where())
                except psycopg.Error as exc:
                    raise storage_error(exc, target, "preparing the tables") from exc
                finally:
                    await conn.close()
                _PREPARED.add(prepared_key)
                logger.debug(
                    "tables %s* ready at %s (schema %d)", tables.namespace, target.where(), version
                )
            pool = Pool(
                target,
                min_size=self.pool_min,
                max_size=self.pool_max,
                timeout=self.timeout,
                name=f"channels-lite {target.where()}",
            )
            await pool.open()
            self.target = target
            self._ops = Statements(tables)
            self._inbound = Inbound(delivered_for(target.conninfo, tables.namespace))
            self._loop = asyncio.get_running_loop()
            self._pool = pool
            if self._listeners:
                self._start_listener()

    async def close(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - close() is a coroutine
            running = None
        if running is loop:
            await self._close_here()
        elif loop.is_closed() or not loop.is_running():
            # The core cleans up after a loop it could not hook: nothing bound to that loop
            # can be awaited any more. Close the sockets themselves.
            self._close_now()
        else:
            future = asyncio.run_coroutine_threadsafe(self._close_here(), loop)
            await asyncio.wrap_future(future)

    async def _close_here(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.stop()
        await self._listeners.settle()
        timer, self._delete_timer = self._delete_timer, None
        if timer is not None:
            timer.cancel()
        deleting, self._deleting = self._deleting, None
        if deleting is not None:
            await asyncio.wait({deleting})
        await self._delete_handed_on()
        pool, self._pool = self._pool, None
        self._loop = None
        if pool is not None:
            await pool.close()
            logger.debug("closed the pool to %s", pool.target.where())

    def _close_now(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close_now()
        self._listeners.forget_stops()
        # Its loop is gone. The rows stay recorded as taken: a claim that meets one drops it.
        self._delete_timer = None
        pool, self._pool = self._pool, None
        self._loop = None
        if pool is not None:
            pool.close_now()

    def _running(self) -> tuple[Pool, Statements]:
        if self._pool is None or self._ops is None:
            raise DriverError(
                f"the postgres driver ({self.describe()}) is not open; call open() first"
            )
        return self._pool, self._ops

    # -- the contract ------------------------------------------------------------------------

    async def push(self, envelopes: Sequence[Envelope], now: float) -> list[bool]:
        if not envelopes:
            return []
        pool, ops = self._running()
        batch = tuple(envelopes)
        inbound = self._inbound
        assert inbound is not None  # made by open(), like the pool
        # Our own listener skips our own notifications: a key we hand on from notifications
        # must be claimed from the table again to see this push.
        for env in batch:
            if env.key != env.channel:
                inbound.own_push(env.key)
        # Not replayable after a lost connection: the commit may have happened.
        return await pool.run(
            lambda conn: ops.run_push(conn, batch, now, self._token),
            doing="storing messages",
            replayable=False,
        )

    async def claim(self, requests: Sequence[ClaimRequest], now: float) -> list[Claimed]:
        wanted = [request for request in requests if request.limit > 0]
        if not wanted:
            return []
        pool, ops = self._running()
        inbound = self._inbound
        assert inbound is not None  # made by open(), like the pool
        listener = self._listener
        served: list[Claimed] = []
        rest = wanted
        if listener is not None:
            listener.watch(request.key for request in wanted)
            # Trusted keys are served from their notifications (see .inbound), the rest
            # claimed. Without a listener nothing is trusted, but the claim still goes through
            # the process-wide record: a sibling instance may have handed some rows on.
            rest = []
            for request in wanted:
                got = inbound.serve(request, now)
                if got is None:
                    rest.append(request)
                else:
                    served.extend(got)
            if served:
                if inbound.delete_first:
                    inbound.delete_first = False
                    try:
                        await self._delete_handed_on()
                    except asyncio.CancelledError:
                        # The messages are handed on already: return them (the core
                        # re-raises the cancellation); the rows go in the background.
                        self._schedule_deletes()
                        return served
                else:
                    self._schedule_deletes()
            if not rest:
                return served
        listening = listener.listening if listener is not None else _not_listening
        ticket = inbound.ticket([r.key for r in rest], listening)
        try:
            rows = await pool.run(
                lambda conn: ops.run_claim(conn, rest, now), doing="claiming messages"
            )
        except asyncio.CancelledError:
            if not served:
                raise
            # Nothing was claimed from the table, but the served messages are handed on
            # already: return them (the core re-raises the pending cancellation).
            return served
        except DriverError:
            if not served:
                raise
            logger.warning(
                "channels-lite: claiming from %s failed after %d message(s) were handed on "
                "from notifications; returning those",
                self.describe(),
                len(served),
                exc_info=True,
            )
            return served
        return served + inbound.claimed(ticket, rest, rows, listening)

    # -- ClaimsReady -------------------------------------------------------------------------

    def claim_ready(self, requests: Sequence[ClaimRequest], now: float) -> list[Claimed]:
        """What notifications brought for trusted keys (see :mod:`.inbound`), without I/O.

        Messages of channels below ``DELETE_FIRST_BELOW`` stay held for :meth:`claim`, which
        deletes their rows before handing them on.
        """
        inbound = self._inbound
        if inbound is None or self._listener is None or self._pool is None:
            return []
        out: list[Claimed] = []
        for request in requests:
            if request.limit > 0:
                got = inbound.serve(request, now, at_once=True)
                if got:
                    out.extend(got)
        if out:
            self._schedule_deletes()
        return out

    def _schedule_deletes(self) -> None:
        # A timer, not a task that sleeps: a new task's first step would run before the
        # receivers just served, on the path of the message it deletes. Meanwhile, deletions
        # gather into one batch (a deletion in flight picks new ones up when it is done).
        loop = self._loop
        if (
            loop is None
            or self._delete_timer is not None
            or (self._deleting is not None and not self._deleting.done())
        ):
            return
        self._delete_timer = loop.call_later(DELETE_DELAY, self._start_deletes)

    def _start_deletes(self) -> None:
        self._delete_timer = None
        if self._loop is not None:
            self._deleting = self._loop.create_task(
                self._delete_handed_on(), name="channels-lite deletes of handed-on rows"
            )

    async def _delete_handed_on(self) -> None:
        """Delete the rows of messages handed on from notifications, in batches."""
        inbound = self._inbound
        while inbound is not None and inbound.doomed and self._pool is not None:
            ids = inbound.take_doomed()
            pool, ops = self._running()
            try:
                await pool.run(
                    functools.partial(ops.run_delete, ids=ids), doing="deleting claimed rows"
                )
            except DriverError:
                # They stay recorded as taken: a claim meeting them drops them, and they go
                # with the process's key when it is released or reaped.
                logger.warning(
                    "channels-lite: could not delete %d message row(s) already handed on; "
                    "claims will skip them",
                    len(ids),
                    exc_info=True,
                )
                return
            inbound.delivered.deleted(ids)

    async def group_add(self, group: str, channel: str, key: str, expires_at: float) -> None:
        pool, ops = self._running()
        await pool.run(
            lambda conn: ops.run_group_add(conn, group, channel, key, expires_at),
            doing="adding a group member",
        )

    async def group_discard(self, group: str, channel: str) -> None:
        pool, ops = self._running()
        await pool.run(
            lambda conn: ops.run_group_discard(conn, group, channel),
            doing="removing a group member",
        )

    async def group_channels(self, group: str, now: float) -> list[str]:
        pool, ops = self._running()
        return await pool.run(
            lambda conn: ops.run_group_channels(conn, group, now),
            doing="reading group members",
        )

    async def purge(self, now: float) -> int:
        pool, ops = self._running()
        return await pool.run(lambda conn: ops.run_purge(conn, now), doing="purging expired rows")

    async def flush(self) -> None:
        pool, ops = self._running()
        if self._inbound is not None:
            self._inbound.reset()
        await pool.run(ops.run_flush, doing="flushing")

    # -- SupportsLiveness --------------------------------------------------------------------

    async def heartbeat(self, process_key: str, expires_at: float, now: float) -> list[str]:
        pool, ops = self._running()
        return await pool.run(
            lambda conn: ops.run_heartbeat(conn, process_key, expires_at, now),
            doing="renewing the process lease",
        )

    async def release(self, process_key: str) -> None:
        pool, ops = self._running()
        await pool.run(
            lambda conn: ops.run_release(conn, process_key),
            doing="releasing the process lease",
        )

    # -- SupportsStats -----------------------------------------------------------------------

    async def stats(self, now: float, top: int) -> StorageStats:
        pool, ops = self._running()
        snapshot = await pool.run(lambda conn: ops.run_stats(conn, now, top), doing="reading stats")
        extra = dict(snapshot.extra)
        extra["host"] = pool.target.where()
        extra["reconnects"] = pool.reconnects
        if self._listener is not None:
            extra["listening_channels"] = len(self._listener.channels)
        if self._inbound is not None:
            extra["handed_on_from_notifications"] = self._inbound.handed_on
            extra["handed_on_rows_pending_delete"] = self._inbound.delivered.pending
        return StorageStats(
            messages=snapshot.messages,
            expired_messages=snapshot.expired_messages,
            channels=snapshot.channels,
            groups=snapshot.groups,
            processes=snapshot.processes,
            storage_bytes=snapshot.storage_bytes,
            extra=extra,
        )

    # -- ChangeNotifier ----------------------------------------------------------------------

    def add_change_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.add(callback)
        if self._pool is not None and self._listener is None:
            self._start_listener()

    def remove_change_listener(self, callback: Callable[[], None]) -> None:
        if self._listeners.remove(callback) and self._listener is not None:
            listener, self._listener = self._listener, None
            loop = self._loop or asyncio.get_running_loop()
            self._listeners.stop_in_background(loop, listener.stop())

    def _start_listener(self) -> None:
        from channels_lite.drivers.postgres.wakeups import Listener

        if self._loop is None or self.target is None or self._ops is None:
            return
        listener = Listener(
            self.target,
            self._ops.tables.namespace,
            self._listeners.notify,
            timeout=self.timeout,
            own_token=self._token,
            inbound=self._inbound,
        )
        self._listener = listener
        listener.start(self._loop)
