"""One aiosqlite connection that runs whole transactions per thread hop, with lock retries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar
from urllib.parse import quote

import aiosqlite

from channels_lite.drivers.base import DriverError
from channels_lite.drivers.sqlite.errors import is_busy, storage_error

__all__ = ["Connection", "database_uri", "immediate", "snapshot"]

logger = logging.getLogger("channels_lite.drivers.sqlite")

T = TypeVar("T")

#: How long SQLite's own busy handler waits before handing control back to the retry loop.
#: Kept short so that the event loop side decides the total budget and can be cancelled.
BUSY_TIMEOUT_MS = 50
_FIRST_BACKOFF = 0.001
_MAX_BACKOFF = 0.05
_THREAD_EXIT_WAIT = 2.0


async def _in_worker(conn: aiosqlite.Connection, fn: Callable[[], T]) -> T:
    """Run ``fn`` inside ``conn``'s worker thread and return its result.

    aiosqlite's public API runs one statement per hop (~150 us each). ``_execute`` is private
    but has had the same shape for years; it lets one hop carry a whole ``BEGIN IMMEDIATE ...
    COMMIT``, which is what makes pushes and claims both fast and atomic. Keep every use of it
    here so that a change in aiosqlite has one place to fix.
    """
    result: T = await conn._execute(fn)  # type: ignore[no-untyped-call]
    return result


class _Abandoned:
    """What a hop returns when its caller was cancelled before the worker reached it."""


_ABANDONED = _Abandoned()


async def _in_worker_finishing(conn: aiosqlite.Connection, fn: Callable[[], T]) -> T:
    """Like :func:`_in_worker`, but never leaves ``fn``'s work behind unreported.

    Once queued, a call cannot be taken back from aiosqlite's worker. On cancellation we tell
    the worker to skip ``fn`` if it has not begun; if it has, we wait for it and return its
    result, so that a claim never removes messages that nobody receives.
    """
    abandon = threading.Event()

    def guarded() -> T | _Abandoned:
        # Event gives the ordering guarantee between this check and abandon.set().
        if abandon.is_set():
            return _ABANDONED
        return fn()

    hop: asyncio.Future[T | _Abandoned] = asyncio.ensure_future(_in_worker(conn, guarded))
    cancelled = False
    while not hop.done():
        try:
            await asyncio.wait({hop})
        except asyncio.CancelledError:
            cancelled = True
            abandon.set()
    if cancelled and hop.exception() is not None:
        # The transaction failed and rolled back, so nothing was taken: the cancellation wins.
        raise asyncio.CancelledError
    result = hop.result()
    if isinstance(result, _Abandoned):
        raise asyncio.CancelledError  # the worker skipped fn: nothing was taken
    return result


def database_uri(path: str, *, read_only: bool = False) -> str:
    """A ``file:`` URI that never lets SQLite create the file (we create it, with 0600)."""
    mode = "ro" if read_only else "rw"
    return f"file:{quote(path, safe='/')}?mode={mode}"


class Connection:
    """A SQLite connection living in its own aiosqlite thread.

    ``run(fn)`` calls ``fn(raw_sqlite3_connection)`` in that thread. The raw connection is in
    autocommit mode (``isolation_level=None``): ``fn`` manages its own transactions.
    """

    def __init__(
        self,
        path: str,
        *,
        timeout: float,
        pragmas: tuple[str, ...] = (),
        read_only: bool = False,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self._pragmas = pragmas
        self._read_only = read_only
        self._aconn: aiosqlite.Connection | None = None
        self._raw: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None

    def _connect(self) -> sqlite3.Connection:
        # Runs in the worker thread, which is how we learn which thread to join on close.
        self._thread = threading.current_thread()
        raw = sqlite3.connect(
            database_uri(self.path, read_only=self._read_only),
            uri=True,
            isolation_level=None,
            timeout=min(BUSY_TIMEOUT_MS / 1000, self.timeout),
        )
        try:
            for pragma in self._pragmas:
                raw.execute(pragma).fetchall()
        except BaseException:
            raw.close()
            raise
        self._raw = raw
        return raw

    async def open(self) -> None:
        if self._aconn is not None:
            return
        # Built from the public constructor with our own connector, so that the raw
        # sqlite3 connection and the worker thread are known without private attributes.
        aconn = aiosqlite.Connection(self._connect, 64)
        try:
            await aconn
        except sqlite3.Error as exc:
            self._join_thread()
            raise storage_error(exc, self.path, "opening the database") from exc
        except BaseException:
            self._join_thread()
            raise
        self._aconn = aconn

    async def close(self) -> None:
        aconn, self._aconn = self._aconn, None
        self._raw = None
        if aconn is None:
            return
        try:
            await aconn.close()
        except sqlite3.Error as exc:
            logger.warning("closing SQLite connection to %s failed: %s", self.path, exc)
        finally:
            self._join_thread()

    def _join_thread(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None or thread is threading.current_thread():
            return
        # aiosqlite resolves its stop future just before the worker returns, so this join
        # takes microseconds; the bound only guards against a wedged thread.
        thread.join(_THREAD_EXIT_WAIT)
        if thread.is_alive():
            logger.warning("aiosqlite worker thread for %s did not stop", self.path)

    async def run(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        doing: str,
        finish_on_cancel: bool = False,
    ) -> T:
        """Run ``fn(raw)`` in the worker thread, retrying while the database is locked.

        ``fn`` must be all-or-nothing (roll back on failure) because it may run several times.
        With ``finish_on_cancel``, a cancellation that arrives while ``fn`` is running (or
        about to) lets it finish and returns its result, absorbing the cancellation: the
        caller checks ``Task.cancelling()``. If ``fn`` had not started yet it never will, and
        the cancellation propagates. Between retries, cancellation always propagates.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        backoff = _FIRST_BACKOFF
        attempts = 0
        while True:
            aconn, raw = self._aconn, self._raw
            if aconn is None or raw is None:
                raise DriverError(
                    f"the SQLite driver for {self.path!r} is not open; call open() first "
                    "(or it was closed)"
                )
            attempts += 1
            try:
                if finish_on_cancel:
                    return await _in_worker_finishing(aconn, _bind(fn, raw))
                return await _in_worker(aconn, _bind(fn, raw))
            except sqlite3.Error as exc:
                if not is_busy(exc):
                    raise storage_error(exc, self.path, doing) from exc
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise DriverError(
                        f"SQLite database {self.path!r} stayed locked by another connection "
                        f"for more than the timeout of {self.timeout:g} s while {doing} "
                        f"({attempts} attempts). Another process is holding a long write "
                        "transaction: find it, or raise CONFIG['timeout']."
                    ) from exc
                # Jitter keeps competing processes from retrying in lockstep.
                delay = min(backoff * (0.5 + random.random()), remaining)
                logger.debug(
                    "%s is locked while %s; retrying in %.1f ms", self.path, doing, delay * 1e3
                )
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            except ValueError as exc:
                if self._aconn is not None:
                    raise
                # aiosqlite's "Connection closed": close() raced with this call.
                raise DriverError(
                    f"the SQLite connection to {self.path!r} was closed while {doing}"
                ) from exc


def _bind(fn: Callable[[sqlite3.Connection], T], raw: sqlite3.Connection) -> Callable[[], T]:
    def call() -> T:
        return fn(raw)

    return call


@contextlib.contextmanager
def immediate(raw: sqlite3.Connection) -> Iterator[None]:
    """A write transaction: take the write lock up front, commit, or roll back on any error.

    ``BEGIN IMMEDIATE`` (not a deferred transaction that upgrades later) is what makes a
    count-then-insert exact across processes, and it fails fast with SQLITE_BUSY instead of
    deadlocking when two readers both try to upgrade.
    """
    raw.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if raw.in_transaction:
            raw.execute("ROLLBACK")
        raise
    try:
        raw.execute("COMMIT")
    except BaseException:
        if raw.in_transaction:
            raw.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def snapshot(raw: sqlite3.Connection) -> Iterator[None]:
    """A read transaction, so that several SELECTs see one consistent state."""
    raw.execute("BEGIN")
    try:
        yield
    finally:
        if raw.in_transaction:
            raw.execute("COMMIT")
