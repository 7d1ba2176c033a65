"""Turning sqlite3 and OS failures into DriverError messages that say what to do next."""

from __future__ import annotations

import logging
import sqlite3

from channels_lite.core.ratelimit import RateLimitedLog
from channels_lite.drivers.base import DriverError

__all__ = ["is_busy", "storage_error"]

# Python >= 3.11 exposes these as sqlite3 constants; the literals keep the intent readable.
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26

logger = logging.getLogger("channels_lite.drivers.sqlite")
#: The error also goes to the caller, who may not log it; a broken file fails every call
#: (sends, claims, upkeep), so one ERROR a minute per file, kind of failure and operation.
_logged = RateLimitedLog(logger, interval=60.0)


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    # Extended codes (e.g. SQLITE_BUSY_SNAPSHOT) carry the primary code in the low byte.
    return code & 0xFF if isinstance(code, int) else None


def is_busy(exc: BaseException) -> bool:
    """Is this the transient "another connection holds the lock" failure worth retrying?"""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = _primary_code(exc)
    if code is not None:
        return code in (_SQLITE_BUSY, _SQLITE_LOCKED)
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def storage_error(exc: sqlite3.Error, path: str, doing: str) -> DriverError:
    """A DriverError naming the database and the most likely remedy for ``exc``."""
    code = _primary_code(exc)
    if code == _SQLITE_NOTADB:
        hint = (
            "the file is not a SQLite database; point CONFIG['path'] at another file, or move "
            "this one away if it is not needed (channels-lite then creates a new one)"
        )
    elif code == _SQLITE_CORRUPT:
        hint = (
            "the database file is corrupt; stop every process using it, move it and its -wal "
            "and -shm files away (channels-lite then creates a new one; messages still queued "
            "in it are lost, `sqlite3 FILE .recover` may save some), and check the disk"
        )
    elif code == _SQLITE_READONLY:
        hint = (
            "the database is read-only for this process; make the file and its directory "
            "writable by this user, or set CONFIG['path'] to a writable location"
        )
    elif code == _SQLITE_CANTOPEN:
        hint = (
            "SQLite cannot open the file or create its -wal/-shm files; check that the "
            "directory exists and is writable by this user, or set CONFIG['path']"
        )
    elif code == _SQLITE_FULL:
        hint = "the disk (or the filesystem quota) is full; free some space"
    elif code == _SQLITE_IOERR:
        hint = "the operating system reported an I/O error; check the disk and the filesystem"
    else:
        hint = "see the cause below"
    message = f"SQLite failed while {doing} on {path!r}: {exc}; {hint}"
    _logged.error((path, code, doing), "channels-lite: %s", message)
    return DriverError(message)
