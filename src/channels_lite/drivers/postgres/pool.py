"""Connections for one driver instance, and the policies around each operation.

A small pool of its own rather than psycopg_pool.AsyncConnectionPool: psycopg_pool grows,
replaces and trims connections in background worker tasks that catch ``CancelledError`` (to
keep their books straight). When ``asyncio.run()`` or asgiref's ``async_to_sync`` tears a loop
down while such a task is connecting, the task survives the cancellation and the loop's
shutdown waits for it forever: reproduced with two operations at once on an ``async_to_sync``
loop (the second one grows the pool). Channels creates and tears down loops all the time, so
this pool has no background task at all: connections are made by the caller that needs one,
in its own task, and idle ones beyond ``min_size`` are closed as they come back.

- Dead idle connections (the server restarted or dropped them) are noticed before use, at the
  cost of one ``select()`` on the socket: an idle connection has nothing to read unless the
  server said goodbye. They are closed and replaced at once.
- Connecting retries while the server is down or starting up (refused, "starting up",
  "shutting down"), with a short backoff, until the timeout: calls made during a server
  restart wait for it instead of failing. Bad passwords and missing databases fail at once.
- Transient server errors (deadlock, lock or serialization failure) are retried within the
  timeout; the server rolled them back first. A connection lost mid-operation is retried once
  on a fresh connection when the operation may run twice: everything but push, and push too
  when the server had answered nothing of it (see errors.NotApplied). A push that lost its
  connection after the server answered part of it may or may not have committed: that one
  is raised, never replayed, so that no message is stored twice.
- Operations run in the caller's task. Cancelling the caller mid-statement lets psycopg ask
  the server to cancel the statement and wait for the outcome: either the statement was
  stopped (rolled back) or it completed. Claims look at that outcome and return what a
  completed claim removed instead of losing it (see ``Statements.run_claim``). An earlier
  design ran each operation in a task of its own and shielded it; but ``asyncio.run()`` (and so
  ``async_to_sync``) cancels *every* task of a loop it tears down, the shielded one included,
  which is exactly when a claim's rows were lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import select
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg

from channels_lite.core.ratelimit import RateLimitedLog
from channels_lite.drivers.base import DriverError
from channels_lite.drivers.postgres.errors import (
    ConnectionWaitTimeout,
    NotApplied,
    connection_lost,
    retryable_server_error,
    storage_error,
)
from channels_lite.drivers.postgres.options import Target

__all__ = ["Pool", "connect"]

logger = logging.getLogger("channels_lite.drivers.postgres")
#: A server that stays down or locked fails every call (sends, claims, upkeep), so the
#: library's own WARNING, written before the error reaches the caller (who may not log it),
#: is limited to one a minute per server and operation.
_gave_up = RateLimitedLog(logger, interval=60.0)

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]

_FIRST_BACKOFF = 0.002
_MAX_BACKOFF = 0.1
_CONNECT_FIRST_BACKOFF = 0.05
_CONNECT_MAX_BACKOFF = 1.0
#: Idle connections beyond ``min_size`` are closed once unused for this long.
MAX_IDLE = 60.0

#: Connection failures that mean "not now" (server down, restarting, full) rather than "never".
_TRANSIENT_CONNECT = (
    "connection refused",
    "starting up",
    "shutting down",
    "not yet accepting connections",
    "recovery mode",
    "timeout expired",
    "server closed the connection",
    "no such file or directory",
    "too many clients",
    "could not receive data",
    "connection reset",
    "terminating connection",
    "could not send",
)


def _transient_connect_error(exc: psycopg.Error) -> bool:
    text = str(exc).lower()
    return any(marker in text for marker in _TRANSIENT_CONNECT)


async def _open_connection(target: Target) -> Conn:
    conn = await psycopg.AsyncConnection.connect(target.conninfo, autocommit=True)
    try:
        # Exact capacity counts after the capacity lock with a fresh snapshot, which READ
        # COMMITTED gives each statement; a server or role defaulting to REPEATABLE READ or
        # SERIALIZABLE would count with the snapshot from before the lock was granted.
        await conn.execute(
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED"
        )
    except BaseException:
        await conn.close()
        raise
    return conn


async def connect(target: Target, doing: str, *, deadline: float | None = None) -> Conn:
    """A new autocommit connection, retrying while the server is down until ``deadline``."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    backoff = _CONNECT_FIRST_BACKOFF
    attempts = 0
    while True:
        attempts += 1
        try:
            return await _open_connection(target)
        except psycopg.Error as exc:
            remaining = (deadline - loop.time()) if deadline is not None else 0.0
            transient = _transient_connect_error(exc)
            if remaining <= 0 or not transient:
                error = storage_error(exc, target, doing)
                if transient and deadline is not None:
                    _log_gave_up(
                        target,
                        doing,
                        f"the server stayed unreachable for {loop.time() - started:.1f} s, "
                        f"{attempts} attempt(s) to connect",
                        error,
                    )
                raise error from exc
            logger.debug("connecting to %s failed (%s); retrying", target.where(), exc)
            await asyncio.sleep(min(backoff * (0.5 + random.random()), remaining))
            backoff = min(backoff * 2, _CONNECT_MAX_BACKOFF)


def _log_gave_up(target: Target, doing: str, why: str, error: DriverError) -> None:
    _gave_up.warning(
        (target.where(), doing),
        "PostgreSQL at %s: retries exhausted while %s (%s); raising DriverError: %s",
        target.where(),
        doing,
        why,
        error,
    )


def _has_pending_input(conn: Conn) -> bool:
    """Did the server send something to this idle connection (FATAL, EOF)?"""
    if conn.closed or conn.broken:
        return True
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.OperationalError):
        return True
    return bool(readable)


def _close_quietly(conn: Conn) -> None:
    if not conn.closed:
        # libpq's synchronous close: no loop needed, nothing to await.
        conn.pgconn.finish()


class Pool:
    """Up to ``max_size`` autocommit connections, ``min_size`` of them kept when idle."""

    def __init__(
        self, target: Target, *, min_size: int, max_size: int, timeout: float, name: str
    ) -> None:
        self.target = target
        self.min_size = min_size
        self.max_size = max_size
        self.timeout = timeout
        self.name = name
        #: (connection, time.monotonic() it came back); used from the right (warmest).
        self._idle: collections.deque[tuple[Conn, float]] = collections.deque()
        self._busy: set[Conn] = set()
        #: Connections being made right now (counted against max_size).
        self._connecting = 0
        #: Callers waiting for a connection: a connection, or None for "a slot is free".
        self._waiters: collections.deque[asyncio.Future[Conn | None]] = collections.deque()
        self._open = False
        #: Connections replaced because they were found dead (stats, tests).
        self.reconnects = 0

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def size(self) -> int:
        return len(self._idle) + len(self._busy) + self._connecting

    async def open(self) -> None:
        if self._open:
            return
        deadline = asyncio.get_running_loop().time() + self.timeout
        made: list[Conn] = []
        try:
            for _ in range(self.min_size):
                made.append(await connect(self.target, "connecting", deadline=deadline))
        except BaseException:
            for conn in made:
                _close_quietly(conn)
            raise
        now = time.monotonic()
        self._idle.extend((conn, now) for conn in made)
        self._open = True

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        """Close every connection; callers still waiting get an error. Needs no loop."""
        self._open = False
        idle, self._idle = self._idle, collections.deque()
        for conn, _ in idle:
            _close_quietly(conn)
        for conn in list(self._busy):
            # In use by an operation that is still running (or by a loop that is gone): it
            # fails, and putconn() drops it.
            _close_quietly(conn)
        self._busy.clear()
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- getting and returning connections ---------------------------------------------------

    async def getconn(self, deadline: float, doing: str) -> Conn:
        loop = asyncio.get_running_loop()
        while True:
            if not self._open:
                raise DriverError(
                    f"the postgres driver for {self.target.where()} was closed while {doing}"
                )
            while self._idle:
                conn, _ = self._idle.pop()
                self._busy.add(conn)
                if _has_pending_input(conn) and not await self._still_alive(conn):
                    self._busy.discard(conn)
                    continue
                return conn
            if self.size < self.max_size:
                self._connecting += 1
                try:
                    conn = await connect(self.target, doing, deadline=deadline)
                except BaseException:
                    self._connecting -= 1
                    self._wake_one(None)  # the slot is free again: let a waiter try
                    raise
                self._connecting -= 1
                if not self._open:
                    _close_quietly(conn)
                    continue
                self._busy.add(conn)
                return conn
            waiter: asyncio.Future[Conn | None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    got = await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    handed = waiter.result()
                    if handed is not None:
                        self.putconn(handed)  # handed over just as we gave up: pass it on
                else:
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    raise ConnectionWaitTimeout(
                        f"all {self.max_size} connections stayed busy for {self.timeout:g} s"
                    ) from None
                raise
            if got is not None:
                self._busy.add(got)
                return got

    async def _still_alive(self, conn: Conn) -> bool:
        # Usually the server's goodbye after a restart; one round trip tells a stale
        # connection from a stray notice.
        try:
            await conn.execute("")
        except psycopg.Error:
            self.reconnects += 1
            _close_quietly(conn)
            return False
        return True

    def putconn(self, conn: Conn) -> None:
        self._busy.discard(conn)
        if conn.closed or conn.broken or not self._open:
            _close_quietly(conn)
            self._wake_one(None)
            return
        if conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            # Never expected (operations are single implicit transactions), never reused.
            _close_quietly(conn)
            self._wake_one(None)
            return
        if self._wake_one(conn):
            return
        now = time.monotonic()
        self._idle.append((conn, now))
        # Trim from the cold end: connections nobody needed for a while.
        while len(self._idle) > self.min_size and now - self._idle[0][1] > MAX_IDLE:
            old, _ = self._idle.popleft()
            _close_quietly(old)

    def _wake_one(self, conn: Conn | None) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    # -- running operations ----------------------------------------------------------------

    async def run(
        self,
        op: Callable[[Conn], Awaitable[T]],
        *,
        doing: str,
        replayable: bool = True,
    ) -> T:
        """Run ``op(connection)`` with the retries described in the module docstring."""
        if not self._open:
            raise DriverError(
                f"the postgres driver for {self.target.where()} is not open; call open() first "
                "(or it was closed)"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        backoff = _FIRST_BACKOFF
        replayed = False
        attempts = 0
        while True:
            try:
                conn = await self.getconn(deadline, doing)
            except ConnectionWaitTimeout as exc:
                error = storage_error(exc, self.target, doing)
                _log_gave_up(self.target, doing, str(exc), error)
                raise error from None
            attempts += 1
            try:
                result = await op(conn)
            except psycopg.Error as exc:
                lost = connection_lost(exc, conn)
                self.putconn(conn)
                if lost:
                    if (replayable or isinstance(exc, NotApplied)) and not replayed:
                        replayed = True
                        self.reconnects += 1
                        logger.info(
                            "PostgreSQL connection to %s lost while %s (%s); retrying once",
                            self.target.where(),
                            doing,
                            " ".join(str(exc).split()),
                        )
                        continue
                    error = storage_error(exc, self.target, doing)
                    if replayed:
                        _log_gave_up(
                            self.target,
                            doing,
                            "the connection was lost again after one retry",
                            error,
                        )
                    raise error from exc
                if retryable_server_error(exc):
                    if loop.time() < deadline:
                        delay = min(backoff * (0.5 + random.random()), deadline - loop.time())
                        logger.debug("%s: transient %s; retrying", doing, exc.sqlstate)
                        await asyncio.sleep(max(delay, 0))
                        backoff = min(backoff * 2, _MAX_BACKOFF)
                        continue
                    error = storage_error(exc, self.target, doing)
                    _log_gave_up(
                        self.target,
                        doing,
                        f"transient SQLSTATE {exc.sqlstate} for the whole timeout of "
                        f"{self.timeout:g} s, {attempts} attempt(s)",
                        error,
                    )
                    raise error from exc
                raise storage_error(exc, self.target, doing) from exc
            except BaseException:
                self.putconn(conn)
                raise
            self.putconn(conn)
            return result
