"""SQLiteDriver: the reference driver, one SQLite file shared by every process on a host."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import re
import sqlite3
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from typing import Any, ClassVar, cast

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
from channels_lite.drivers.sqlite import ops
from channels_lite.drivers.sqlite.connection import Connection
from channels_lite.drivers.sqlite.files import default_path, prepare_file
from channels_lite.drivers.sqlite.notify import (
    DataVersionPoller,
    InotifyWatcher,
    VisibleChanges,
    Watcher,
    start_watcher,
)
from channels_lite.drivers.sqlite.schema import Tables, prepare

__all__ = ["SQLiteDriver"]

logger = logging.getLogger("channels_lite.drivers.sqlite")

#: ``DELETE ... RETURNING`` arrived in SQLite 3.35.0 (March 2021).
MIN_SQLITE_VERSION = (3, 35, 0)
_SYNCHRONOUS = ("NORMAL", "FULL", "OFF")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Bound the -wal file after a burst; without it the file keeps its peak size forever.
_JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024

#: Pushes up to this size run inline on the event loop (Connection.run): bigger ones would
#: hold the loop for more than about a millisecond, so the worker thread takes them.
_INLINE_MAX_ENVELOPES = 64
_INLINE_MAX_BYTES = 256 * 1024

#: (path, process key) pairs this process holds a lease for: a renewal that finds its own
#: lease gone tells the process it was taken for dead (see SQLiteDriver.heartbeat).
_LEASED: set[tuple[str, str]] = set()


def _check_path(value: Any) -> str:
    if value is None:
        return default_path()
    if not isinstance(value, str | os.PathLike):
        raise DriverConfigError(
            "path", f"'path' must be a str or os.PathLike, not {type(value).__name__} ({value!r})"
        )
    path = os.fspath(value)
    if not isinstance(path, str):
        raise DriverConfigError("path", f"'path' must be a text path, not bytes ({value!r})")
    if path in ("", ":memory:") or path.startswith("file:"):
        raise DriverConfigError(
            "path",
            f"'path' must be a file system path, not {value!r}; for a process-local layer "
            "use the 'memory' driver",
        )
    # Absolute once, here: siblings are re-created from the options and must share the file
    # even if the working directory changes later.
    return os.path.abspath(path)


def _check_timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DriverConfigError(
            "timeout",
            f"'timeout' must be a number of seconds, not {type(value).__name__} ({value!r})",
        )
    try:
        timeout = float(value)
    except OverflowError:  # an int beyond any float: no finite number of seconds
        timeout = math.inf
    if not math.isfinite(timeout) or timeout <= 0:
        raise DriverConfigError(
            "timeout", f"'timeout' must be a positive, finite number of seconds, not {value!r}"
        )
    return timeout


def _check_synchronous(value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in _SYNCHRONOUS:
        raise DriverConfigError(
            "synchronous",
            f"'synchronous' must be one of {', '.join(_SYNCHRONOUS)} (any case), not {value!r}",
        )
    return value.upper()


def _check_prefix(value: Any) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise DriverConfigError(
            "table_prefix",
            "'table_prefix' must be an SQL identifier (a letter or _, then letters, digits "
            f"or _), not {value!r}",
        )
    return value


#: Keys remembered as "the last claim filled its limit" (see SQLiteDriver.claim).
_MAX_LIKELY = 1024


class SQLiteDriver(Driver):
    """Messages and groups in one SQLite file (WAL mode), shared by every local process."""

    name: ClassVar[str] = "sqlite"
    features: ClassVar[DriverFeatures] = DriverFeatures(
        cross_process=True, persistent=True, max_batch=1000
    )
    option_docs: ClassVar[Mapping[str, str]] = {
        "path": "database file (str or path); default channels-lite.sqlite3 in the working "
        "directory; its directory must exist",
        "timeout": "seconds to keep retrying while another process holds the write lock "
        "(default 5.0)",
        "synchronous": "SQLite synchronous pragma: NORMAL (default), FULL or OFF",
        "table_prefix": "prefix of the table names (default 'channels_lite_')",
    }
    #: Skip the write lock when a read shows there is nothing to claim (see ops.has_claimable).
    claim_precheck: ClassVar[bool] = True

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,
        timeout: float = 5.0,
        synchronous: str = "NORMAL",
        table_prefix: str = "channels_lite_",
        **options: Any,
    ) -> None:
        checked_path = _check_path(path)
        checked_timeout = _check_timeout(timeout)
        checked_synchronous = _check_synchronous(synchronous)
        checked_prefix = _check_prefix(table_prefix)
        super().__init__(
            path=checked_path,
            timeout=checked_timeout,
            synchronous=checked_synchronous,
            table_prefix=checked_prefix,
            **options,
        )
        self.path = checked_path
        self.timeout = checked_timeout
        self.synchronous = checked_synchronous
        self.tables = Tables(checked_prefix)
        self._conn: Connection | None = None
        self._open_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners = ChangeListeners(logger)
        self._watcher: Watcher | None = None
        self._visible: VisibleChanges | None = None
        self._deferring = False
        #: Keys whose last claim filled its limit (see claim).
        self._likely: set[str] = set()
        #: Keys whose last claim after a change notification found messages, and whether a
        #: notification came since the last claim (see claim).
        self._hits: set[str] = set()
        self._changed = False

    def describe(self) -> str:
        return f"sqlite at {self.path}"

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._conn is not None:
            return
        async with self._open_lock:
            if self._conn is not None:
                return
            if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
                raise DriverError(
                    f"cannot use SQLite database {self.path!r}: the SQLite library linked into "
                    f"Python is {sqlite3.sqlite_version}, and channels-lite needs 3.35.0 or "
                    "newer (for DELETE ... RETURNING); use a newer Python build, or install "
                    "pysqlite3-binary and make it the sqlite3 module"
                )
            prepare_file(self.path)
            loop = asyncio.get_running_loop()
            conn = Connection(
                self.path,
                timeout=self.timeout,
                pragmas=(
                    f"PRAGMA synchronous = {self.synchronous}",
                    f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}",
                ),
                adopt=lambda old, new: ops.adopt(old, new, self.tables, self.path),
                on_switch=functools.partial(loop.call_soon_threadsafe, self._file_switched),
            )
            await conn.open()
            try:
                version = await conn.run(
                    lambda raw: prepare(raw, self.tables, self.path), doing="preparing tables"
                )
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
            self._loop = asyncio.get_running_loop()
            logger.debug(
                "opened %s (schema %d, SQLite %s)", self.path, version, sqlite3.sqlite_version
            )
            if self._listeners:
                self._start_watcher()

    async def close(self) -> None:
        self._stop_visible()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            await watcher.stop()
        await self._listeners.settle()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
            logger.debug("closed %s", self.path)

    def _connection(self) -> Connection:
        if self._conn is None:
            raise DriverError(f"the SQLite driver for {self.path!r} is not open; call open() first")
        return self._conn

    # -- the contract ------------------------------------------------------------------------

    async def push(self, envelopes: Sequence[Envelope], now: float) -> list[bool]:
        if not envelopes:
            return []
        batch = tuple(envelopes)
        small = len(batch) <= _INLINE_MAX_ENVELOPES and (
            sum(len(env.payload) for env in batch) <= _INLINE_MAX_BYTES
        )
        return await self._connection().run(
            lambda raw: ops.push(raw, self.tables, batch, now),
            doing="storing messages",
            finish_on_cancel=True,
            inline=small,
        )

    async def claim(self, requests: Sequence[ClaimRequest], now: float) -> list[Claimed]:
        if not requests:
            return []
        batch = tuple(requests)
        precheck = self.claim_precheck
        after_change, self._changed = self._changed, False
        # A key that another process's commit filled the last time one was announced is
        # probably the one this announcement is for (two processes talking): the read-only
        # check would only delay its message. A miss costs one empty write transaction,
        # and ends the guess.
        likely = frozenset(self._likely | self._hits) if after_change else frozenset(self._likely)
        claimed = await self._connection().run(
            lambda raw: ops.claim(raw, self.tables, batch, now, precheck=precheck, likely=likely),
            doing="claiming messages",
            finish_on_cancel=True,
            inline=True,
        )
        # A key whose claim filled its limit probably holds more: its next claim skips the
        # read-only check (with 3 processes draining one channel, that read cost more than
        # it saved: each claim, and each retry after "locked", paid for it).
        taken: dict[str, int] = {}
        for message in claimed:
            taken[message.key] = taken.get(message.key, 0) + 1
        likely_now, hits = self._likely, self._hits
        for request in batch:
            got = taken.get(request.key, 0)
            if request.limit > 0 and got >= request.limit:
                likely_now.add(request.key)
            else:
                likely_now.discard(request.key)
            if after_change:
                if got:
                    hits.add(request.key)
                else:
                    hits.discard(request.key)
        # Keys nobody claims any more pile up otherwise; a guess costs little anyway.
        if len(likely_now) > _MAX_LIKELY:
            likely_now.clear()
        if len(hits) > _MAX_LIKELY:
            hits.clear()
        return claimed

    # -- Peeks -------------------------------------------------------------------------------

    async def peek(
        self, requests: Sequence[ClaimRequest], now: float, held: Collection[Hashable]
    ) -> list[tuple[Hashable, Claimed]]:
        if not requests:
            return []
        batch = tuple(requests)
        receipts = cast("Collection[ops.Receipt]", held)
        found = await self._connection().run(
            lambda raw: ops.peek(raw, self.tables, batch, now, receipts),
            doing="reading messages",
            inline=True,
        )
        return cast("list[tuple[Hashable, Claimed]]", found)

    async def remove(self, receipts: Collection[Hashable]) -> None:
        if not receipts:
            return
        rows = tuple(cast("Collection[ops.Receipt]", receipts))
        await self._connection().run(
            lambda raw: ops.remove(raw, self.tables, rows),
            doing="removing delivered messages",
            finish_on_cancel=True,
            inline=sum(len(row[3]) for row in rows) <= _INLINE_MAX_BYTES,
        )

    async def group_add(self, group: str, channel: str, key: str, expires_at: float) -> None:
        await self._connection().run(
            lambda raw: ops.group_add(
                raw, self.tables, group, channel, key=key, expires_at=expires_at
            ),
            doing="adding a group member",
            inline=True,
        )

    async def group_discard(self, group: str, channel: str) -> None:
        await self._connection().run(
            lambda raw: ops.group_discard(raw, self.tables, group, channel),
            doing="removing a group member",
            inline=True,
        )

    async def group_channels(self, group: str, now: float) -> list[str]:
        return await self._connection().run(
            lambda raw: ops.group_channels(raw, self.tables, group, now),
            doing="reading group members",
            inline=True,
        )

    async def purge(self, now: float) -> int:
        return await self._connection().run(
            lambda raw: ops.purge(raw, self.tables, now), doing="purging expired rows"
        )

    async def flush(self) -> None:
        await self._connection().run(lambda raw: ops.flush(raw, self.tables), doing="flushing")

    # -- SupportsLiveness --------------------------------------------------------------------

    async def heartbeat(self, process_key: str, expires_at: float, now: float) -> list[str]:
        dead, previous = await self._connection().run(
            lambda raw: ops.heartbeat(raw, self.tables, process_key, expires_at, now),
            doing="renewing the process lease",
        )
        leased = (self.path, process_key)
        if leased in _LEASED and previous is None:
            logger.error(
                "channels-lite: the lease of this process (%s) in %s was gone when renewed: "
                "another process took this one for dead (no renewal for process_timeout: "
                "its event loop was blocked, or it was suspended) and removed its channels' "
                "group memberships and queued messages, or flush() ran. Consumers that "
                "joined groups must join again (reconnect); raise process_timeout if event "
                "loops here block for long",
                process_key,
                self.path,
            )
        elif previous is not None and previous <= now:
            logger.warning(
                "channels-lite: the lease of this process (%s) in %s had lapsed before it was "
                "renewed (its event loop was blocked, or storage stalled); nothing was removed "
                "yet",
                process_key,
                self.path,
            )
        _LEASED.add(leased)
        return dead

    async def release(self, process_key: str) -> None:
        await self._connection().run(
            lambda raw: ops.release(raw, self.tables, process_key),
            doing="releasing the process lease",
        )
        _LEASED.discard((self.path, process_key))

    # -- SupportsStats -----------------------------------------------------------------------

    async def stats(self, now: float, top: int) -> StorageStats:
        return await self._connection().run(
            lambda raw: ops.stats(raw, self.tables, self.path, now, top), doing="reading stats"
        )

    # -- ChangeNotifier ----------------------------------------------------------------------

    def add_change_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.add(callback)
        if self._conn is not None and self._watcher is None:
            self._start_watcher()

    def remove_change_listener(self, callback: Callable[[], None]) -> None:
        if self._listeners.remove(callback) and self._watcher is not None:
            self._stop_visible()
            watcher, self._watcher = self._watcher, None
            loop = self._loop or asyncio.get_running_loop()
            self._listeners.stop_in_background(loop, watcher.stop())

    # -- DefersChanges ----------------------------------------------------------------------

    def defer_changes(self, defer: bool) -> None:
        self._deferring = defer
        if self._watcher is not None:
            self._watcher.defer(defer)

    def _start_watcher(self) -> None:
        if self._loop is None or self._conn is None:
            return
        visible = VisibleChanges(self._loop, self._conn.data_version, self._notify)
        self._watcher = start_watcher(
            self._loop, self.path, self.timeout, self._notify, on_file_event=visible
        )
        self._visible = visible if isinstance(self._watcher, InotifyWatcher) else None
        self._watcher.defer(self._deferring)

    def _notify(self) -> None:
        self._changed = True
        self._listeners.notify()

    def _stop_visible(self) -> None:
        visible, self._visible = self._visible, None
        if visible is not None:
            visible.stop()

    def _file_switched(self) -> None:
        """The connection moved to a new file at the path: re-aim a data_version poller
        (an inotify watcher watches the directory and needs nothing)."""
        if isinstance(self._watcher, DataVersionPoller) and self._listeners:
            old, self._watcher = self._watcher, None
            self._listeners.stop_in_background(asyncio.get_running_loop(), old.stop())
            self._start_watcher()
        self._notify()  # the new file may hold messages nobody was told about
