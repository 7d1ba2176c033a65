"""The database file: checked and created before SQLite sees it."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets

from channels_lite.drivers.base import DriverError

__all__ = ["DEFAULT_FILENAME", "default_path", "prepare_file"]

logger = logging.getLogger("channels_lite.drivers.sqlite")

#: Files SQLite keeps next to a database. Left behind by a deleted database, they must not
#: meet a new file at the same path: SQLite would share the old ``-shm`` index (and replay
#: an old ``-journal``) with it, and report the new database as malformed or corrupt it.
_COMPANIONS = ("-wal", "-shm", "-journal")

DEFAULT_FILENAME = "channels-lite.sqlite3"


def default_path() -> str:
    """Where the database lives when CONFIG names no ``path``."""
    return os.path.join(os.getcwd(), DEFAULT_FILENAME)


def prepare_file(path: str) -> None:
    """Make sure ``path`` is a file we can read and write, creating it owner-only if missing.

    SQLite would create a missing file with the process umask (often world-readable), and its
    ``-wal``/``-shm`` files copy the database file's permissions; creating the file ourselves
    with 0600 keeps every message private to the owner. Existing files are never chmod-ed.
    """
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise DriverError(
            f"cannot open SQLite database {path!r}: directory {directory!r} does not exist; "
            "create it, or set CONFIG['path'] to a file in an existing directory"
        )
    if os.path.isdir(path):
        suggestion = os.path.join(path, DEFAULT_FILENAME)
        raise DriverError(
            f"SQLite database path {path!r} is a directory; set CONFIG['path'] to a file, "
            f"e.g. {suggestion!r}"
        )
    if os.path.exists(path):
        # Never open (and so never close) a descriptor of an existing database: closing any
        # descriptor of a file drops every POSIX lock this process holds on it, including the
        # locks of SQLite connections in other threads, and then another process may take the
        # database for unused and checkpoint and delete its -wal under them.
        if not os.access(path, os.R_OK | os.W_OK):
            raise DriverError(
                f"SQLite database {path!r} is not writable by this user; make it writable "
                "(e.g. chmod u+rw), run as its owner, or set CONFIG['path']"
            )
    else:
        _remove_orphaned_companions(path)
        _create_private(path, directory)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise DriverError(
            f"directory {directory!r} of SQLite database {path!r} is not writable by this user; "
            f"SQLite must create {os.path.basename(path)}-wal and -shm next to the database. "
            "Make the directory writable, or set CONFIG['path']"
        )


def _create_private(path: str, directory: str) -> None:
    """Create ``path`` empty and owner-only, without ever opening ``path`` itself.

    The file is made under a temporary name and hard-linked into place, so that no descriptor
    of the database is ever closed by this process (see prepare_file) and a concurrent creator
    is never overwritten (``link`` fails if the name exists). Filesystems without hard links
    fall back to an exclusive create.
    """
    # Unique per call: two event loops of one process may create the database at once.
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.new")
    try:
        fd = os.open(
            temporary,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
            0o600,
        )
        os.close(fd)
    except PermissionError as exc:
        raise DriverError(
            f"cannot create SQLite database {path!r}: directory {directory!r} is not writable "
            "by this user; make it writable, or set CONFIG['path']"
        ) from exc
    except OSError as exc:
        raise DriverError(
            f"cannot create SQLite database {path!r}: {exc.strerror}; check the path, or set "
            "CONFIG['path']"
        ) from exc
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass  # another process or thread created it first: use theirs
    except OSError:
        # No hard links here (some network or FUSE filesystems): create in place, exclusively.
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        except FileExistsError:
            pass
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _remove_orphaned_companions(path: str) -> None:
    """Remove ``-wal``/``-shm``/``-journal`` files whose database file is gone.

    A database file never disappears by SQLite's doing; companions without it were left by
    someone deleting the database (often while processes still had it open; they keep their
    own descriptors, so unlinking the names takes nothing from them).
    """
    for suffix in _COMPANIONS:
        stale = path + suffix
        # Checked again right before each unlink: another process may have just created
        # the database, and then these names are its own.
        if os.path.exists(path) or not os.path.lexists(stale):
            continue
        try:
            os.unlink(stale)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DriverError(
                f"SQLite database {path!r} is missing but {stale!r}, left by a deleted "
                f"database, is still there and cannot be removed ({exc.strerror}); remove it "
                "by hand, it must not be used with a new database file"
            ) from exc
        logger.warning(
            "removed %s: its database file %s was deleted, and SQLite must not use it with "
            "the new database created at that path",
            stale,
            path,
        )
