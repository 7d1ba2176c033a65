"""A psycopg_pool.AsyncConnectionPool with the driver's policies around each operation.

- Dead idle connections (the server restarted, or dropped them) are noticed before use, at
  the cost of one ``select()`` on the socket: an idle connection has nothing to read unless the
  server said goodbye. They are handed back (the pool replaces them) without the pool's own
  check-and-backoff, so the first call after a restart does not fail, nor wait a second.
- Transient server errors (deadlock, lock or serialization failure, "shutting down") are
  retried within the timeout; they always roll back first. A connection lost mid-operation is
  retried once on a fresh connection when the operation may run twice (everything but push,
  whose commit may have happened before the connection died).
- Operations run in their own task, so that cancelling the caller never interrupts a statement
  half-way: psycopg would otherwise send a cancel request and leave the outcome to chance. If
  the caller is cancelled before the statement was sent, nothing runs and the cancellation
  propagates; after, the operation finishes. ``absorb_cancel`` (claims) then *returns* the
  result, so the core can hand the claimed messages on before re-raising the cancellation;
  otherwise the cancellation is raised once the operation is done.
"""

from __future__ import annotations

import asyncio
import logging
import random
import select
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from channels_lite.drivers.base import DriverError
from channels_lite.drivers.postgres.errors import (
    connection_lost,
    retryable_server_error,
    storage_error,
)
from channels_lite.drivers.postgres.options import Target

__all__ = ["Pool", "connect"]

logger = logging.getLogger("channels_lite.drivers.postgres")

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]

_FIRST_BACKOFF = 0.002
_MAX_BACKOFF = 0.1


async def connect(target: Target, doing: str) -> Conn:
    """One connection outside the pool (schema setup, diagnosing a pool timeout)."""
    try:
        return await psycopg.AsyncConnection.connect(target.conninfo, autocommit=True)
    except psycopg.Error as exc:
        raise storage_error(exc, target, doing) from exc


def _has_pending_input(conn: Conn) -> bool:
    """Did the server send something to this idle connection (FATAL, EOF)?"""
    if conn.closed or conn.broken:
        return True
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.OperationalError):
        return True
    return bool(readable)


class _Progress:
    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started = False


class Pool:
    def __init__(
        self, target: Target, *, min_size: int, max_size: int, timeout: float, name: str
    ) -> None:
        self.target = target
        self.min_size = min_size
        self.max_size = max_size
        self.timeout = timeout
        self.name = name
        self._pool: AsyncConnectionPool[Conn] | None = None
        # Every connection the pool made, so close_now() can release them without a loop.
        self._connections: weakref.WeakSet[Conn] = weakref.WeakSet()
        self.reconnects = 0

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    async def _track(self, conn: Conn) -> None:
        self._connections.add(conn)

    async def open(self) -> None:
        if self._pool is not None:
            return
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            self.target.conninfo,
            min_size=self.min_size,
            max_size=self.max_size,
            kwargs={"autocommit": True},
            configure=self._track,
            open=False,
            timeout=self.timeout,
            name=self.name,
        )
        try:
            await pool.open(wait=self.min_size > 0, timeout=self.timeout)
        except PoolTimeout:
            await pool.close(timeout=0)
            # The pool only says "timed out"; a direct attempt says why (refused, password...).
            conn = await connect(self.target, "connecting")
            await conn.close()
            raise DriverError(
                f"PostgreSQL at {self.target.where()}: the connection pool could not open "
                f"{self.min_size} connection(s) within {self.timeout:g} s although a direct "
                "connection works; raise CONFIG['timeout'] or lower CONFIG['pool_min']"
            ) from None
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=self.timeout)

    def close_now(self) -> None:
        """Release every connection without awaiting (the pool's loop is gone)."""
        self._pool = None
        for conn in list(self._connections):
            if not conn.closed:
                conn.pgconn.finish()
        self._connections = weakref.WeakSet()

    # -- running operations ----------------------------------------------------------------

    async def run(
        self,
        op: Callable[[Conn], Awaitable[T]],
        *,
        doing: str,
        replayable: bool = True,
        absorb_cancel: bool = False,
    ) -> T:
        """Run ``op(connection)`` with retries; see the module docstring for cancellation."""
        if self._pool is None:
            raise DriverError(
                f"the postgres driver for {self.target.where()} is not open; call open() first "
                "(or it was closed)"
            )
        progress = _Progress()
        inner = asyncio.ensure_future(self._attempts(op, doing, replayable, progress))
        cancelled = False
        while not inner.done():
            try:
                await asyncio.wait({inner})
            except asyncio.CancelledError:
                cancelled = True
                if not progress.started:
                    # Still waiting for a connection: nothing was sent, stop here.
                    inner.cancel()
        if cancelled:
            if absorb_cancel and not inner.cancelled() and inner.exception() is None:
                return inner.result()
            if not inner.cancelled() and inner.exception() is not None:
                # Retrieve it, so asyncio does not log "exception was never retrieved".
                logger.debug("%s failed after cancellation: %s", doing, inner.exception())
            raise asyncio.CancelledError
        return inner.result()

    async def _attempts(
        self,
        op: Callable[[Conn], Awaitable[T]],
        doing: str,
        replayable: bool,
        progress: _Progress,
    ) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        backoff = _FIRST_BACKOFF
        replayed = False
        while True:
            pool, conn = await self._acquire(doing, deadline)
            try:
                progress.started = True
                result = await op(conn)
            except psycopg.Error as exc:
                lost = connection_lost(exc, conn)
                await pool.putconn(conn)
                if lost:
                    if replayable and not replayed:
                        replayed = True
                        self.reconnects += 1
                        logger.info(
                            "PostgreSQL connection to %s lost while %s (%s); retrying once",
                            self.target.where(),
                            doing,
                            " ".join(str(exc).split()),
                        )
                        continue
                    raise storage_error(exc, self.target, doing) from exc
                if retryable_server_error(exc) and loop.time() < deadline:
                    delay = min(backoff * (0.5 + random.random()), deadline - loop.time())
                    logger.debug("%s: transient %s; retrying", doing, exc.sqlstate)
                    await asyncio.sleep(max(delay, 0))
                    backoff = min(backoff * 2, _MAX_BACKOFF)
                    continue
                raise storage_error(exc, self.target, doing) from exc
            except BaseException:
                await pool.putconn(conn)
                raise
            await pool.putconn(conn)
            return result

    async def _acquire(self, doing: str, deadline: float) -> tuple[AsyncConnectionPool[Conn], Conn]:
        pool = self._pool
        if pool is None:
            raise DriverError(
                f"the postgres driver for {self.target.where()} was closed while {doing}"
            )
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            try:
                conn = await pool.getconn(timeout=max(remaining, 0.001))
            except PoolTimeout as exc:
                raise storage_error(
                    exc, self.target, f"{doing} (waiting for a connection)"
                ) from exc
            except psycopg.Error as exc:  # PoolClosed: close() raced with this call
                raise storage_error(exc, self.target, doing) from exc
            if not _has_pending_input(conn):
                return pool, conn
            # Something arrived on an idle connection: usually the server's goodbye after a
            # restart. One round trip tells a stale connection from a stray notice.
            try:
                await conn.execute("")
            except psycopg.Error:
                self.reconnects += 1
                await pool.putconn(conn)  # broken: the pool discards and replaces it
                continue
            return pool, conn
