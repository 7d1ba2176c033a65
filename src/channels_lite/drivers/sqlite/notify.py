"""Wake-up hints: notice commits by other connections to the database file.

On Linux, inotify on the database's directory tells us within a fraction of a millisecond that
the file or its ``-wal`` was written. Elsewhere (or when inotify is unavailable, e.g. the
per-user instance limit is reached) a read-only connection polls ``PRAGMA data_version``.
Both only *hint*: spurious calls are harmless and the core keeps a safety-net poll.
"""

from __future__ import annotations

import abc
import asyncio
import ctypes
import errno
import functools
import logging
import os
import sqlite3
import struct
import sys
from collections.abc import Callable

from channels_lite.core.ratelimit import RateLimitedLog
from channels_lite.drivers.base import DriverError
from channels_lite.drivers.sqlite.connection import Connection

__all__ = ["DataVersionPoller", "InotifyWatcher", "VisibleChanges", "Watcher", "start_watcher"]

logger = logging.getLogger("channels_lite.drivers.sqlite")
#: The data_version poll fails every second while the file is unreadable: one line a minute.
_warnings = RateLimitedLog(logger, interval=60.0)

_IN_MODIFY = 0x00000002
_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_Q_OVERFLOW = 0x00004000
_IN_IGNORED = 0x00008000
_IN_NONBLOCK = 0o0004000
_IN_CLOEXEC = 0o2000000
_WATCH_MASK = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE
_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
_READ_SIZE = 64 * 1024

#: Poll period of the fallback. data_version is a cheap read of the WAL index.
POLL_INTERVAL = 0.005
#: VisibleChanges: further looks at data_version after a file event that did not change it
#: (62 ms in all; see that class).
_LOOK_AGAIN = (0.001, 0.002, 0.004, 0.008, 0.016, 0.031)


class Watcher(abc.ABC):
    """Something that calls ``on_change`` on the loop when the database may have changed."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop watching and release the file descriptor, task or connection."""

    def defer(self, deferred: bool) -> None:  # noqa: B027 - optional; the default is right
        """Hold ``on_change`` back while ``deferred``; pass on what came once it is not.

        See :class:`~channels_lite.drivers.base.DefersChanges`. The default keeps calling
        (the data_version poller: its check every 5 ms is cheap).
        """


@functools.cache
def _inotify() -> tuple[Callable[[int], int], Callable[[int, bytes, int], int]]:
    """libc's inotify_init1 and inotify_add_watch, typed (AttributeError if absent)."""
    # CDLL(None) is the already-loaded C library; find_library would spawn ldconfig.
    libc = ctypes.CDLL(None, use_errno=True)
    init1 = libc.inotify_init1
    init1.argtypes = [ctypes.c_int]
    init1.restype = ctypes.c_int
    add_watch = libc.inotify_add_watch
    add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    add_watch.restype = ctypes.c_int
    return init1, add_watch


def _check(result: int, doing: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify {doing}: {os.strerror(err)}")
    return result


class InotifyWatcher(Watcher):
    def __init__(
        self, loop: asyncio.AbstractEventLoop, path: str, on_change: Callable[[], None]
    ) -> None:
        # SQLite resolves symlinks and keeps its -wal next to the real file: watch there.
        directory, base = os.path.split(os.path.realpath(path))
        # Commits land in the -wal file; checkpoints and non-WAL journaling write the file
        # itself. The -shm file is written through mmap, which inotify never reports.
        self._names = {os.fsencode(base), os.fsencode(f"{base}-wal")}
        self._on_change = on_change
        self._loop = loop
        init1, add_watch = _inotify()
        fd = _check(init1(_IN_NONBLOCK | _IN_CLOEXEC), "inotify_init1")
        try:
            # The directory, not the files: the -wal file comes and goes with connections.
            _check(add_watch(fd, os.fsencode(directory), _WATCH_MASK), f"watching {directory!r}")
            loop.add_reader(fd, self._readable)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self._deferred = False

    def defer(self, deferred: bool) -> None:
        # Not reading is enough: the kernel keeps queueing events (or one overflow event)
        # for the watch, and the reader finds them at once when it is back.
        fd = self._fd
        if fd is None or deferred == self._deferred or self._loop.is_closed():
            return
        self._deferred = deferred
        if deferred:
            self._loop.remove_reader(fd)
        else:
            self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        fd = self._fd
        if fd is None:
            return
        relevant = False
        # Drain everything pending so that a burst of commits costs one wake-up; a read that
        # did not fill the buffer took all there was (a later event makes the fd readable
        # again), which spares a system call that would only say EAGAIN.
        while True:
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                logger.warning("reading inotify events failed: %s; stopping wake-ups", exc)
                self._close_fd()
                return
            relevant = self._scan(data) or relevant
            if len(data) < _READ_SIZE:
                break
        if relevant:
            self._on_change()

    def _scan(self, data: bytes) -> bool:
        relevant = False
        offset = 0
        while offset + _EVENT_HEADER.size <= len(data):
            _, mask, _, length = _EVENT_HEADER.unpack_from(data, offset)
            offset += _EVENT_HEADER.size
            name = data[offset : offset + length].rstrip(b"\0")
            offset += length
            if mask & _IN_Q_OVERFLOW:
                relevant = True  # events were lost: assume the worst
            elif mask & _IN_IGNORED:
                logger.warning("the database directory stopped being watched (removed?)")
            elif name in self._names:
                relevant = True
        return relevant

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if not self._loop.is_closed() and not self._deferred:
            self._loop.remove_reader(fd)
        os.close(fd)

    async def stop(self) -> None:
        self._close_fd()


class VisibleChanges:
    """Passes inotify's "the file was written" on only once another connection's commit is
    visible, read from ``PRAGMA data_version`` of the connection this process writes with.

    Every write to the -wal file raises an event, this process's own commits included, and a
    wake-up for those is worse than useless: it makes the claim loop distrust every key it
    knows to be empty, and claim again, for a commit whose keys it already knows (the core
    hears of its own pushes directly). data_version tells the two apart: it changes for other
    connections' commits only. A commit can be written a moment before it is visible (the WAL
    first, then the index), so an event that changes nothing is looked at again a few times
    (62 ms in all) before it is taken for this process's own write. A reading of None (no
    inline connection yet) passes everything on.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        read_version: Callable[[], int | None],
        on_change: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._read = read_version
        self._on_change = on_change
        self._seen = read_version()
        self._timer: asyncio.TimerHandle | None = None
        self._left: tuple[float, ...] = ()
        #: Events passed on, and events taken for this process's own writes (tests).
        self.passed = 0
        self.suppressed = 0

    def __call__(self) -> None:
        if self._passed_on():
            return
        # (Re)start the looks for this event. A look still pending from an earlier event can
        # be far off (its sequence had grown to 4, 8, ... ms): a commit by another process
        # whose event came just before its visibility would wait for it. Measured at 200
        # msg/s across processes: 1% of deliveries took 3.5-4.5 ms that way (p99 3.35 ms).
        timer = self._timer
        if timer is not None and timer.when() > self._loop.time() + _LOOK_AGAIN[0]:
            timer.cancel()
            timer = self._timer = None
        self._left = _LOOK_AGAIN
        if timer is None:
            self._look_later()

    def _passed_on(self) -> bool:
        version = self._read()
        if version is not None and version == self._seen:
            return False
        self._seen = version
        self.stop()
        self.passed += 1
        self._on_change()
        return True

    def _look_later(self) -> None:
        delay, self._left = self._left[0], self._left[1:]
        self._timer = self._loop.call_later(delay, self._look)

    def _look(self) -> None:
        self._timer = None
        if self._passed_on():
            return
        if self._left:
            self._look_later()
        else:
            self.suppressed += 1

    def stop(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self._left = ()


class DataVersionPoller(Watcher):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        path: str,
        timeout: float,
        on_change: Callable[[], None],
    ) -> None:
        self._conn = Connection(path, timeout=timeout, read_only=True)
        self._on_change = on_change
        #: Set once the first reading is taken: commits after this are noticed.
        self.ready = asyncio.Event()
        self._task = loop.create_task(
            self._poll(), name=f"channels-lite data_version poll of {path}"
        )

    async def _poll(self) -> None:
        def data_version(raw: sqlite3.Connection) -> int:
            return int(raw.execute("PRAGMA data_version").fetchone()[0])

        try:
            await self._conn.open()
            last = await self._conn.run(data_version, doing="polling for changes")
            self.ready.set()
            while True:
                await asyncio.sleep(POLL_INTERVAL)
                try:
                    current = await self._conn.run(data_version, doing="polling for changes")
                except DriverError as exc:
                    # Wake-ups are only an optimisation; keep trying, slower.
                    _warnings.warning("poll", "%s; retrying in 1 s", exc)
                    await asyncio.sleep(1.0)
                    continue
                if current != last:
                    last = current
                    self._on_change()
        except DriverError as exc:
            logger.warning("change polling could not start: %s", exc)
        finally:
            await self._conn.close()

    async def stop(self) -> None:
        self._task.cancel()
        # wait() rather than awaiting the task: our own caller's cancellation must still
        # propagate, while the task's expected CancelledError must not.
        await asyncio.wait({self._task})


def start_watcher(
    loop: asyncio.AbstractEventLoop,
    path: str,
    timeout: float,
    on_change: Callable[[], None],
    *,
    on_file_event: Callable[[], None] | None = None,
) -> Watcher:
    """The fastest watcher available here: inotify on Linux, else data_version polling.

    ``on_file_event``, if given, receives inotify's raw events instead of ``on_change`` (see
    :class:`VisibleChanges`); the poller reports only real changes and calls ``on_change``.
    """
    if sys.platform.startswith("linux"):
        try:
            return InotifyWatcher(loop, path, on_file_event or on_change)
        except (OSError, AttributeError) as exc:
            # AttributeError: a C library without inotify symbols.
            if getattr(exc, "errno", None) in (errno.EMFILE, errno.ENOSPC):
                logger.warning(
                    "inotify limit reached (%s); polling %s for changes instead. Raise "
                    "fs.inotify.max_user_instances / max_user_watches to restore instant "
                    "wake-ups",
                    exc,
                    path,
                )
            else:
                logger.debug("inotify unavailable (%s); polling data_version instead", exc)
    return DataVersionPoller(loop, path, timeout, on_change)
