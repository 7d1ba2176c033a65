"""One aiosqlite connection that runs whole transactions per thread hop, with lock retries."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import aiosqlite

from channels_lite.core.ratelimit import RateLimitedLog
from channels_lite.drivers.base import DriverError
from channels_lite.drivers.sqlite.errors import is_busy, storage_error
from channels_lite.drivers.sqlite.files import prepare_file

__all__ = [
    "Connection",
    "FileReplaced",
    "check_file",
    "database_uri",
    "file_identity",
    "immediate",
    "snapshot",
]

logger = logging.getLogger("channels_lite.drivers.sqlite")
#: Under write contention every retry would log: one DEBUG line a second per file.
_contention = RateLimitedLog(logger, interval=1.0)
#: A lock held past the timeout fails every call on the file (sends, claims, upkeep), so the
#: library's own WARNING, written before the error reaches the caller (who may not log it),
#: is limited to one a minute per file and operation.
_gave_up = RateLimitedLog(logger, interval=60.0)

T = TypeVar("T")

#: How long SQLite's own busy handler waits before handing control back to the retry loop.
#: Kept short so that the event loop side decides the total budget and can be cancelled.
BUSY_TIMEOUT_MS = 50
_FIRST_BACKOFF = 0.001
_MAX_BACKOFF = 0.05
_THREAD_EXIT_WAIT = 2.0
#: How many times one call may find its file replaced before giving up (a path that keeps
#: being swapped under us is an operator's loop, not something to chase).
_MAX_SWITCHES = 3
#: Write transactions committed inline between two background checkpoints. The inline
#: connection never checkpoints by itself (that would fsync on the event loop); SQLite's own
#: default is to checkpoint at 1000 WAL pages, and one of our transactions writes a few.
CHECKPOINT_EVERY = 200
#: WAL frames (one page each) at which a background checkpoint insists on starting the WAL
#: over (see Connection._checkpoint_passive): about 16 MB with 4 KiB pages. Each of our write
#: transactions writes a few pages, so CHECKPOINT_EVERY of them stay well below it while the
#: WAL keeps starting over by itself.
RESTART_AT_FRAMES = 4096
_CHECKPOINTS_KEPT = 16
_CHECKPOINT_SQL = {
    "PASSIVE": "PRAGMA wal_checkpoint(PASSIVE)",
    "RESTART": "PRAGMA wal_checkpoint(RESTART)",
}
#: Seconds an inline call keeps trying while another connection holds the write lock, before
#: the worker thread takes over the waiting (in SQLite's busy handler, whose first sleep is
#: 1 ms). Each try first gives up the CPU (sched_yield), then lets the loop turn once: with
#: more busy processes than cores the lock holder is often the one preempted, and trying
#: again at once only kept it off the CPU. Measured, 3 processes draining one normal channel
#: on 2 cores (a probe script, single runs): 8 plain loop turns 2.4-2.7k msgs/s, 8 yielding
#: turns 4.0k, yielding for up to 10 ms 4.4-5.6k (2 ms 4.2-4.5k, 5 ms 5.0-5.8k, 20 ms
#: 5.0-5.5k); the bench's drain scenario went from 2.9k to 4.6-4.8k (medians).
INLINE_BUSY_WINDOW = 0.010
#: Absent on some platforms (Windows): the loop turn alone then.
_yield_cpu: Callable[[], None] = getattr(os, "sched_yield", lambda: None)

#: ``(st_dev, st_ino)`` of a database file; ``None`` when nothing is at the path.
Identity = tuple[int, int] | None
#: A stat that failed for another reason than "missing" (e.g. the directory lost its x bit):
#: unknown, so never taken as proof of a replacement.
_UNKNOWN = (-1, -1)


class FileReplaced(Exception):
    """The database path no longer names the file this connection has open.

    Someone deleted the file (``rm``) or put another one in its place (``mv``, a restore)
    while processes were using it. Raised inside the worker thread only; :class:`Connection`
    handles it by moving to the file now at the path.
    """


class _Fallback(Exception):
    """An inline call that the worker thread must make instead (see Connection.run)."""


class _Raw(sqlite3.Connection):
    """A ``sqlite3.Connection`` carrying the check of its own file's identity."""

    guard: Callable[[], None] | None = None


def file_identity(path: str) -> Identity:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        return _UNKNOWN
    return st.st_dev, st.st_ino


def check_file(raw: sqlite3.Connection) -> None:
    """Raise :class:`FileReplaced` if ``raw``'s database file is no longer at its path.

    Write transactions call it after ``BEGIN IMMEDIATE`` (see :func:`immediate`), reads after
    reading: either way, any row another process moves out of a deleted file happens after
    our check, so it sees what we wrote, and what we read was not yet moved.
    """
    guard = getattr(raw, "guard", None)
    if guard is not None:
        guard()


def _same_file(path: str, identity: Identity) -> None:
    current = file_identity(path)
    if current not in (identity, _UNKNOWN):
        raise FileReplaced(path)


async def _in_worker(conn: aiosqlite.Connection, fn: Callable[[], T]) -> T:
    """Run ``fn`` inside ``conn``'s worker thread and return its result.

    aiosqlite's public API runs one statement per hop (~150 us each). ``_execute`` is private
    but has had the same shape for years; it lets one hop carry a whole ``BEGIN IMMEDIATE ...
    COMMIT``, which is what makes pushes and claims both fast and atomic. Keep every use of it
    here so that a change in aiosqlite has one place to fix.
    """
    result: T = await conn._execute(fn)  # type: ignore[no-untyped-call]
    return result


class _GuardedCall(Generic[T]):
    """``fn``, to run once in the worker thread unless abandoned before it starts.

    Its outcome is reported through ``outcome``, a plain future of the caller's loop, not
    through the aiosqlite call's own future: that one belongs to a Task, and ``asyncio.run()``
    cancels every Task of a loop it shuts down (an ``async_to_sync`` call ending), which would
    drop a result the worker already produced: a claim's messages, a push's "stored".
    """

    def __init__(
        self, fn: Callable[[], T], loop: asyncio.AbstractEventLoop, outcome: asyncio.Future[T]
    ) -> None:
        self._fn = fn
        self._loop = loop
        self._outcome = outcome
        self._gate = threading.Lock()
        self.started = False
        self.abandoned = False

    def abandon(self) -> bool:
        """Make sure ``fn`` never starts; False if it already has (its outcome will come)."""
        with self._gate:
            if not self.started:
                self.abandoned = True
            return self.abandoned

    def __call__(self) -> None:
        with self._gate:
            if self.abandoned:
                return
            self.started = True
        try:
            result = self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller as is
            self._report(None, exc)
        else:
            self._report(result, None)

    def _report(self, result: T | None, exc: BaseException | None) -> None:
        try:
            self._loop.call_soon_threadsafe(_settle, self._outcome, result, exc)
        except RuntimeError:
            # The caller's loop closed while it waited for us, which asyncio does not do to a
            # pending task; nothing can receive this outcome any more.
            logger.exception("SQLite call finished after its event loop closed; result lost")


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _retrieve(task: asyncio.Future[Any]) -> None:
    # The transport's own outcome is not reported (see _GuardedCall); just mark it retrieved.
    if not task.cancelled():
        task.exception()


async def _in_worker_finishing(conn: aiosqlite.Connection, fn: Callable[[], T]) -> T:
    """Like :func:`_in_worker`, but never leaves ``fn``'s work behind unreported.

    Once queued, a call cannot be taken back from aiosqlite's worker. On cancellation we tell
    the worker to skip ``fn`` if it has not begun; if it has, we wait for it and return its
    result (the caller checks ``Task.cancelling()``), so that a claim never removes messages
    that nobody receives and a push never reports "not stored" for a stored message.
    """
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[T] = loop.create_future()
    call = _GuardedCall(fn, loop, outcome)
    hop = asyncio.ensure_future(_in_worker(conn, call))
    hop.add_done_callback(_retrieve)
    cancelled = False
    waiting: set[asyncio.Future[Any]] = {outcome, hop}
    while not outcome.done():
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            cancelled = True
            if call.abandon():
                raise  # fn never started and never will: nothing was done
            continue  # fn is running: wait for its outcome
        if outcome.done() or not hop.done():
            continue
        waiting = {outcome}  # the transport is done: from now on only the outcome counts
        if hop.cancelled():
            # A cancelled transport (asyncio.run cancelling every task) does not stop the
            # worker, which still runs fn; its outcome comes through ``outcome``.
            continue
        exc = hop.exception()
        if exc is not None and not call.started:
            raise exc  # never queued, e.g. the connection was closed meanwhile
        if call.abandoned:
            raise asyncio.CancelledError
        # The worker ran fn; its outcome is already on its way to ``outcome``.
    if cancelled and outcome.exception() is not None:
        # The transaction failed and rolled back, so nothing was taken: the cancellation wins.
        raise asyncio.CancelledError
    return outcome.result()


def database_uri(path: str, *, read_only: bool = False) -> str:
    """A ``file:`` URI that never lets SQLite create the file (we create it, with 0600)."""
    mode = "ro" if read_only else "rw"
    return f"file:{quote(path, safe='/')}?mode={mode}"


class Connection:
    """A SQLite connection living in its own aiosqlite thread.

    ``run(fn)`` calls ``fn(raw_sqlite3_connection)`` in that thread. The raw connection is in
    autocommit mode (``isolation_level=None``): ``fn`` manages its own transactions.

    With ``adopt``, the connection also watches its file's identity (device and inode). When
    the file at ``path`` turns out to be another one, or none (deleted, replaced), it logs an
    ERROR, opens the file now at the path (creating it, owner-only, if missing), calls
    ``adopt(old_raw, new_raw)`` to move what the old file still holds, and carries on there.
    Without this, processes that had the old file open would keep using it, unseen by every
    process started since: a silent split in two.
    """

    def __init__(
        self,
        path: str,
        *,
        timeout: float,
        pragmas: tuple[str, ...] = (),
        read_only: bool = False,
        adopt: Callable[[sqlite3.Connection, sqlite3.Connection], str] | None = None,
        on_switch: Callable[[], object] | None = None,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self._pragmas = pragmas
        self._read_only = read_only
        self._adopt = adopt
        self._on_switch = on_switch
        self._aconn: aiosqlite.Connection | None = None
        self._raw: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self._identity: Identity = None
        #: How many times this connection moved to a new file at its path.
        self.switches = 0
        self._switch_failing = False
        # The inline connection (see run()): same file, used from the event loop's thread.
        self._inline: sqlite3.Connection | None = None
        self._inline_switches = -1
        self._inline_writes = 0
        self._checkpoint: asyncio.Task[None] | None = None
        self._checkpointing = False
        #: The last background checkpoints: (mode, frames in the WAL, frames copied).
        self.checkpoints: list[tuple[str, int, int]] = []
        #: Calls that ran inline, and inline attempts handed to the worker thread (tests).
        self.inline_calls = 0
        self.inline_fallbacks = 0
        #: Loop turns inline calls waited for another connection's write lock (tests).
        self.inline_busy_turns = 0

    def _open_raw(self) -> sqlite3.Connection:
        """Connect to ``path`` (worker thread); note the identity of the file connected to."""
        for _ in range(_MAX_SWITCHES):
            before = file_identity(self.path)
            raw = sqlite3.connect(
                database_uri(self.path, read_only=self._read_only),
                uri=True,
                isolation_level=None,
                timeout=min(BUSY_TIMEOUT_MS / 1000, self.timeout),
                factory=_Raw,
            )
            try:
                for pragma in self._pragmas:
                    raw.execute(pragma).fetchall()
            except BaseException:
                raw.close()
                raise
            # The same file before and after connecting: that is the file we have open.
            if before == file_identity(self.path) or self._adopt is None:
                break
            raw.close()
        else:
            raise DriverError(
                f"SQLite database {self.path!r} keeps being replaced while channels-lite "
                "opens it; stop whatever is rewriting the file"
            )
        if self._adopt is not None:
            assert isinstance(raw, _Raw)
            raw.guard = functools.partial(_same_file, self.path, before)
        self._identity = before
        return raw

    def _connect(self) -> sqlite3.Connection:
        # Runs in the worker thread, which is how we learn which thread to join on close.
        self._thread = threading.current_thread()
        raw = self._open_raw()
        self._raw = raw
        return raw

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the current raw connection (worker thread), following the file."""
        for _ in range(_MAX_SWITCHES):
            raw = self._raw
            if raw is None:
                raise DriverError(f"the SQLite connection to {self.path!r} was closed")
            try:
                return fn(raw)
            except FileReplaced:
                self._switch(raw)
        raise DriverError(
            f"SQLite database {self.path!r} keeps being replaced while in use; stop whatever "
            "is deleting or rewriting the file"
        )

    def _switch(self, old: sqlite3.Connection) -> None:
        """Move from ``old`` (a deleted or replaced file) to the file now at the path."""
        assert self._adopt is not None
        guard = getattr(old, "guard", None)
        if isinstance(old, _Raw):
            old.guard = None  # adopt() runs transactions on the old file
        try:
            prepare_file(self.path)
            new = self._open_raw()
            try:
                summary = self._adopt(old, new)
            except BaseException:
                new.close()
                raise
        except BaseException as exc:
            if isinstance(old, _Raw):
                old.guard = guard
            if not self._switch_failing and not is_busy(exc):
                self._switch_failing = True
                logger.error(  # noqa: TRY400 - the cause is in the message; no traceback
                    "SQLite database %s was deleted or replaced while this process had it "
                    "open, and channels-lite cannot move to the file now at that path (%s). "
                    "Restore the file or its directory, or stop every process using it and "
                    "restart them",
                    self.path,
                    exc,
                )
            if isinstance(exc, DriverError):
                raise DriverError(
                    f"SQLite database {self.path!r} was deleted or replaced while in use, and "
                    f"a new one cannot be opened there: {exc}"
                ) from exc
            raise
        self._switch_failing = False
        aconn = self._aconn
        if aconn is not None:
            # aiosqlite closes its ``_connection`` on close(): make that the live one.
            aconn._connection = new
        self._raw = new
        self.switches += 1
        # Closing it is safe: SQLite sees that the file moved (SQLITE_FCNTL_HAS_MOVED) and
        # neither checkpoints it nor deletes "<path>-wal"/"-shm", which now belong to the new
        # database.
        old.close()
        logger.error(
            "SQLite database %s was deleted or replaced while this process had it open. "
            "channels-lite moved to the file now at that path and carried over what the old "
            "file still held (%s). Deleting the database of running processes does not reset "
            "channels-lite: to start afresh, stop every process first, or call flush()",
            self.path,
            summary,
        )
        if self._on_switch is not None:
            self._on_switch()

    async def open(self) -> None:
        if self._aconn is not None:
            return
        doing = "opening the database"
        deadline = asyncio.get_running_loop().time() + self.timeout
        backoff = _FIRST_BACKOFF
        attempts = 0
        while True:
            attempts += 1
            # Built from the public constructor with our own connector, so that the raw
            # sqlite3 connection and the worker thread are known without private attributes.
            aconn = aiosqlite.Connection(self._connect, 64)
            try:
                await aconn
            except sqlite3.Error as exc:
                self._join_thread()
                # The connection's first statements read the file, which another connection
                # can hold for longer than the busy handler waits: recovering the WAL after
                # the last connection closed, a TRUNCATE checkpoint, a holder of an exclusive
                # lock. As for any other statement, wait it out within the timeout.
                if not is_busy(exc):
                    raise storage_error(exc, self.path, doing) from exc
                backoff = await self._wait_out_lock(exc, doing, deadline, backoff, attempts)
                continue
            except BaseException:
                self._join_thread()
                raise
            self._aconn = aconn
            return

    def _open_inline(self) -> sqlite3.Connection | None:
        """A second connection to the file the worker's connection has open (worker thread).

        No busy wait (``timeout=0``): when another connection holds the write lock, an inline
        call fails at once and goes to the worker thread, which waits. No automatic
        checkpoint: see :data:`CHECKPOINT_EVERY`.
        """
        identity = self._identity
        raw = sqlite3.connect(
            database_uri(self.path, read_only=self._read_only),
            uri=True,
            isolation_level=None,
            timeout=0,
            factory=_Raw,
            check_same_thread=False,
        )
        try:
            for pragma in (*self._pragmas, "PRAGMA wal_autocheckpoint = 0"):
                raw.execute(pragma).fetchall()
        except BaseException:
            raw.close()
            raise
        if file_identity(self.path) != identity:
            raw.close()  # the file moved meanwhile: the worker's next call follows it first
            return None
        if self._adopt is not None:
            assert isinstance(raw, _Raw)
            raw.guard = functools.partial(_same_file, self.path, identity)
        return raw

    async def _inline_connection(self) -> sqlite3.Connection | None:
        if self._inline is not None and self._inline_switches == self.switches:
            return self._inline
        self._drop_inline()
        aconn = self._aconn
        if aconn is None:
            return None
        switches = self.switches
        try:
            raw = await _in_worker(aconn, self._open_inline)
        except (sqlite3.Error, ValueError) as exc:
            # The worker path still works (or reports the problem itself).
            logger.debug("no inline connection to %s: %s", self.path, exc)
            return None
        if raw is None or self._aconn is not aconn or self.switches != switches:
            if raw is not None:
                raw.close()
            return None
        self._inline, self._inline_switches = raw, switches
        return raw

    def data_version(self) -> int | None:
        """``PRAGMA data_version`` on the inline connection: it changes when *another*
        connection's commit becomes visible, never for this process's inline writes. None
        when there is no inline connection (yet)."""
        raw = self._inline
        if raw is None or self._inline_switches != self.switches:
            return None
        try:
            return int(raw.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            return None

    def _drop_inline(self) -> None:
        raw, self._inline = self._inline, None
        if raw is not None:
            raw.close()

    def _run_inline(self, raw: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(raw)`` on the event loop's thread; :class:`_Fallback` if the worker must."""
        before = raw.total_changes
        try:
            result = fn(raw)
        except sqlite3.Error as exc:
            # Busy: another connection writes; the caller tries again, then leaves the waiting
            # to the worker. Any other error: fn rolled back, and the worker runs it again and
            # reports it as usual.
            raise _Fallback from exc
        except FileReplaced:
            self._drop_inline()
            raise _Fallback from None
        self.inline_calls += 1
        if raw.total_changes != before:
            self._inline_writes += 1
            if self._inline_writes >= CHECKPOINT_EVERY:
                self._start_checkpoint()
        return result

    def _start_checkpoint(self) -> None:
        if self._checkpoint is not None and not self._checkpoint.done():
            return
        self._inline_writes = 0
        self._checkpoint = asyncio.get_running_loop().create_task(
            self._checkpoint_passive(), name="channels-lite sqlite checkpoint"
        )

    async def _checkpoint_passive(self) -> None:
        # PASSIVE, beside this process's inline calls: a push or a claim never waits for the
        # checkpoint's fsync (holding them back made 1% of cross-process deliveries wait a
        # few ms: p99 latency 3.6-4.2 vs 2.6-3.1 ms at 200 msg/s). It copies the frames the
        # WAL held when it began; the WAL starts over at the next write that begins once all
        # of them are copied. A write that began meanwhile (in any process) spoils that, and
        # a steady stream of writes can spoil it every time: the WAL then only grows (past
        # 64 MB in a 10-minute soak). So once it holds RESTART_AT_FRAMES, a RESTART checkpoint
        # follows, with this process's calls queued behind it in the worker thread: it waits
        # (SQLite's busy handler) for the other connections' writers and readers, then starts
        # the WAL over itself.
        frames = await self._wal_checkpoint("PASSIVE")
        if frames is not None and frames >= RESTART_AT_FRAMES:
            self._checkpointing = True
            try:
                await self._wal_checkpoint("RESTART")
            finally:
                self._checkpointing = False

    async def _wal_checkpoint(self, mode: str) -> int | None:
        """``PRAGMA wal_checkpoint(mode)`` in the worker: the frames the WAL held, or None if
        the checkpoint failed (logged at DEBUG; the next one tries again)."""
        try:
            sql = _CHECKPOINT_SQL[mode]
            row = await self.run(
                lambda raw: raw.execute(sql).fetchone(), doing="checkpointing the WAL"
            )
        except DriverError as exc:
            logger.debug("background %s checkpoint of %s failed: %s", mode, self.path, exc)
            return None
        # (busy, frames in the WAL, frames copied); -1s when the file is not in WAL mode.
        self.checkpoints.append((mode, int(row[1]), int(row[2])))
        del self.checkpoints[:-_CHECKPOINTS_KEPT]
        return int(row[1])

    async def close(self) -> None:
        checkpoint, self._checkpoint = self._checkpoint, None
        running = asyncio.get_running_loop()
        if checkpoint is not None and not checkpoint.done() and checkpoint.get_loop() is running:
            checkpoint.cancel()
            await asyncio.gather(checkpoint, return_exceptions=True)
        self._drop_inline()
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
        inline: bool = False,
    ) -> T:
        """Run ``fn(raw)`` in the worker thread, retrying while the database is locked.

        ``fn`` must be all-or-nothing (roll back on failure) because it may run several times.
        With ``finish_on_cancel``, a cancellation that arrives while ``fn`` is running (or
        about to) lets it finish and returns its result, absorbing the cancellation: the
        caller checks ``Task.cancelling()``. If ``fn`` had not started yet it never will, and
        the cancellation propagates. Between retries, cancellation always propagates.

        With ``inline``, ``fn`` is first tried right here on the event loop's thread, on a
        second connection that never waits for a lock. A short transaction on an uncontended
        file takes tens of microseconds, far less than the hop to the worker thread and back
        (which also costs the receiving side a wake-up); if another connection holds the write
        lock, or anything else fails, the worker runs ``fn`` as above. Only for short ``fn``:
        it blocks the event loop while it runs. Nothing can cancel it halfway.
        """
        if inline:
            # time.monotonic() is the default loop's clock; asyncio.get_running_loop() would
            # be a getpid() system call on Python 3.11, on the path every send and claim takes.
            give_up = time.monotonic() + INLINE_BUSY_WINDOW
            while True:
                raw = None if self._checkpointing else await self._inline_connection()
                if raw is None:
                    break
                try:
                    return self._run_inline(raw, fn)
                except _Fallback as exc:
                    if not is_busy(exc.__cause__ or exc) or time.monotonic() >= give_up:
                        self.inline_fallbacks += 1
                        break
                # Another connection holds the write lock, typically for a transaction of
                # ~0.1 ms: trying again soon usually finds it free, long before the worker's
                # first sleep would end. This loop's other tasks run meanwhile.
                self.inline_busy_turns += 1
                _yield_cpu()
                await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        backoff = _FIRST_BACKOFF
        attempts = 0
        while True:
            aconn = self._aconn
            if aconn is None or self._raw is None:
                raise DriverError(
                    f"the SQLite driver for {self.path!r} is not open; call open() first "
                    "(or it was closed)"
                )
            attempts += 1
            try:
                call = functools.partial(self._call, fn)
                if finish_on_cancel:
                    return await _in_worker_finishing(aconn, call)
                return await _in_worker(aconn, call)
            except sqlite3.Error as exc:
                if not is_busy(exc):
                    raise storage_error(exc, self.path, doing) from exc
                backoff = await self._wait_out_lock(exc, doing, deadline, backoff, attempts)
            except ValueError as exc:
                if self._aconn is not None:
                    raise
                # aiosqlite's "Connection closed": close() raced with this call.
                raise DriverError(
                    f"the SQLite connection to {self.path!r} was closed while {doing}"
                ) from exc

    async def _wait_out_lock(
        self, exc: sqlite3.Error, doing: str, deadline: float, backoff: float, attempts: int
    ) -> float:
        """After SQLITE_BUSY: sleep a jittered ``backoff`` and return the next one, or raise
        :class:`DriverError` (after one rate-limited WARNING) once ``deadline`` has passed."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            _gave_up.warning(
                ("locked", self.path, doing),
                "SQLite database %s stayed locked by another connection for more than "
                "the timeout of %g s while %s: retries exhausted after %d attempts, "
                "raising DriverError",
                self.path,
                self.timeout,
                doing,
                attempts,
            )
            raise DriverError(
                f"SQLite database {self.path!r} stayed locked by another connection "
                f"for more than the timeout of {self.timeout:g} s while {doing} "
                f"({attempts} attempts). Another process is holding a long write "
                "transaction: find it, or raise CONFIG['timeout']."
            ) from exc
        # Jitter keeps competing processes from retrying in lockstep.
        delay = min(backoff * (0.5 + random.random()), remaining)
        _contention.debug(
            ("locked", self.path),
            "%s is locked while %s; retrying in %.1f ms",
            self.path,
            doing,
            delay * 1e3,
        )
        await asyncio.sleep(delay)
        return min(backoff * 2, _MAX_BACKOFF)


@contextlib.contextmanager
def immediate(raw: sqlite3.Connection) -> Iterator[None]:
    """A write transaction: take the write lock up front, commit, or roll back on any error.

    ``BEGIN IMMEDIATE`` (not a deferred transaction that upgrades later) is what makes a
    count-then-insert exact across processes, and it fails fast with SQLITE_BUSY instead of
    deadlocking when two readers both try to upgrade.
    """
    raw.execute("BEGIN IMMEDIATE")
    try:
        check_file(raw)
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
