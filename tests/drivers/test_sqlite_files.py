"""The SQLite database file: permissions, and clear errors for paths that cannot work."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from channels_lite.drivers.base import DriverError, Envelope
from channels_lite.drivers.sqlite import SQLiteDriver

NOW = 1_700_000_000.0
NOBODY = 65534

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def open_error(path: Path) -> str:
    """Open a driver on ``path``, expecting DriverError; return its message."""
    threads = set(threading.enumerate())
    instance = SQLiteDriver(path=path, timeout=0.5)
    with pytest.raises(DriverError) as info:
        await instance.open()
    await instance.close()
    # A failed open must not leave the aiosqlite worker behind.
    assert set(threading.enumerate()) == threads
    return str(info.value)


@posix_only
async def test_new_database_and_wal_files_are_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "private.sqlite3"
    old_umask = os.umask(0)  # the most permissive umask: 0600 must come from the driver
    try:
        instance = SQLiteDriver(path=path)
        await instance.open()
    finally:
        os.umask(old_umask)
    try:
        await instance.push(
            [Envelope(channel="c", key="c", payload=b"secret", expires_at=NOW + 60, capacity=5)],
            NOW,
        )
        for name in ("private.sqlite3", "private.sqlite3-wal", "private.sqlite3-shm"):
            assert mode(tmp_path / name) == 0o600, name
    finally:
        await instance.close()


@posix_only
async def test_existing_file_permissions_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    sqlite3.connect(path).close()
    path.chmod(0o640)
    instance = SQLiteDriver(path=path)
    await instance.open()
    await instance.close()
    assert mode(path) == 0o640


async def test_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "db.sqlite3"
    message = await open_error(path)
    assert str(path) in message
    assert f"directory {str(path.parent)!r} does not exist" in message
    assert "CONFIG['path']" in message
    assert not (tmp_path / "no").exists()


async def test_path_is_a_directory(tmp_path: Path) -> None:
    message = await open_error(tmp_path)
    assert str(tmp_path) in message
    assert "is a directory" in message
    assert "channels-lite.sqlite3" in message


async def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    content = b"these are not the pages you are looking for\n" * 200
    path.write_bytes(content)
    message = await open_error(path)
    assert str(path) in message
    assert "not a SQLite database" in message
    assert path.read_bytes() == content


# ----------------------------------------------------------------------- read-only locations
#
# Root ignores permission bits, so as root each check runs in a forked child that drops to
# "nobody"; as any other user it runs in place.


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory "nobody" can reach (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="channels-lite-perm-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        path.chmod(0o755)
        shutil.rmtree(path)


def _open_outcome(path: Path) -> str:
    async def attempt() -> str:
        instance = SQLiteDriver(path=path, timeout=0.5)
        try:
            await instance.open()
        except DriverError as exc:
            return f"DriverError: {exc}"
        finally:
            await instance.close()
        return "opened"

    return asyncio.run(attempt())


def as_unprivileged(fn: Callable[[], str]) -> str:
    if os.geteuid() != 0:
        return fn()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_fd)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = fn()
        except BaseException as exc:
            result = f"child failed: {type(exc).__name__}: {exc}"
        os.write(write_fd, result.encode())
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def _make_database(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()


@posix_only
def test_read_only_file(shared_dir: Path) -> None:
    path = shared_dir / "ro.sqlite3"
    _make_database(path)
    path.chmod(0o444)
    outcome = as_unprivileged(lambda: _open_outcome(path))
    assert outcome.startswith("DriverError: "), outcome
    assert str(path) in outcome
    assert "not writable" in outcome
    assert mode(path) == 0o444


@posix_only
def test_read_only_directory(shared_dir: Path) -> None:
    path = shared_dir / "db.sqlite3"
    _make_database(path)
    path.chmod(0o666)
    shared_dir.chmod(0o555)
    outcome = as_unprivileged(lambda: _open_outcome(path))
    assert outcome.startswith("DriverError: "), outcome
    assert f"directory {str(shared_dir)!r}" in outcome
    assert "-wal" in outcome
    assert "not writable" in outcome


@posix_only
def test_cannot_create_in_read_only_directory(shared_dir: Path) -> None:
    path = shared_dir / "new.sqlite3"
    shared_dir.chmod(0o555)
    outcome = as_unprivileged(lambda: _open_outcome(path))
    assert outcome.startswith("DriverError: "), outcome
    assert "cannot create" in outcome
    assert str(path) in outcome
    assert not path.exists()
