"""Faults: each one gets a clear error naming the path and what to do, never a hang, and never
silent loss of a message that ``send`` accepted.

| fault | test |
|---|---|
| ``kill -9`` of a sender, of a receiver, mid-stream; restart | test_kill_sender_and_receiver_* |
| ``kill -9`` of every process, restart | test_kill_every_process_* |
| another process holds the write lock, shorter / longer than ``timeout`` | test_write_lock_* |
| the directory (or the file) becomes read-only while processes run | test_read_only_* |
| the disk is full (``PRAGMA max_page_count``) | test_disk_full_* |
| a non-SQLite, corrupt or truncated file at the path | test_unusable_file_* |
| the file is deleted while processes run | test_file_deleted_* |
| the directory is deleted while processes run | test_directory_removed_* |

docs/reliability.md has the same table with what happens in each case.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import rel_workers as workers  # noqa: E402
from rel_ledger import Ledger, check, read_ledgers  # noqa: E402
from rel_parent import NOBODY, Children, as_unprivileged, write_lock_held  # noqa: E402

from channels_lite import ChannelLayer  # noqa: E402
from channels_lite.conformance._support import opened  # noqa: E402
from channels_lite.core.ratelimit import RateLimitedLog  # noqa: E402
from channels_lite.drivers.base import DriverError, Envelope  # noqa: E402
from channels_lite.drivers.sqlite import SQLiteDriver  # noqa: E402

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX semantics")
GUARD = 30.0
WORK = "fault.work"


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "faults.sqlite3")


@pytest.fixture
async def make_layer(db: str) -> AsyncIterator[Callable[..., ChannelLayer]]:
    layers: list[ChannelLayer] = []

    def make(**config: Any) -> ChannelLayer:
        config.setdefault("path", db)
        layer = ChannelLayer(driver="sqlite", **config)
        layers.append(layer)
        return layer

    yield make
    for layer in layers:
        with contextlib.suppress(DriverError):
            await layer.close()


@pytest.fixture
def claim_errors_unthrottled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim loop logs a storage outage once a minute per process; a test needs its line."""
    from channels_lite.core import receiver

    if hasattr(receiver, "_failures"):
        monkeypatch.setattr(receiver, "_failures", RateLimitedLog(receiver.logger, interval=0.0))


async def drain(layer: ChannelLayer, channel: str, idle: float = 0.3) -> list[dict[str, Any]]:
    got = []
    while True:
        try:
            got.append(await asyncio.wait_for(layer.receive(channel), idle))
        except TimeoutError:
            return got


def _ledger_drain(db: str, tmp_path: Path, channel: str) -> None:
    """The parent takes whatever is left on ``channel`` and records it in its own ledger."""

    async def run() -> None:
        ledger = Ledger(str(tmp_path), "parent")
        layer = ChannelLayer(driver="sqlite", path=db)
        try:
            for message in await drain(layer, channel):
                ledger.write("recv", id=message["id"], ch=channel, s=message["s"], q=message["q"])
        finally:
            await layer.close()
            ledger.close()

    asyncio.run(run())


# ===================================================================== kill -9 and restart


def test_kill_sender_and_receiver_mid_stream_then_restart(
    children: Children, db: str, tmp_path: Path
) -> None:
    """Only the message a killed receiver had claimed may be lost; the killed sender's
    accepted messages all arrive; the restarted ones carry on; nothing arrives twice."""
    ledgers = str(tmp_path)
    for tag in ("r0", "r1"):
        children.start(tag, workers.plain_receiver, db, ledgers, WORK, 0.5)
    children.expect("ready", ["r0", "r1"])
    children.start("s0", workers.paced_sender, db, ledgers, WORK, 2000, 0.002)
    children.wait_progress("s0", 100)
    children.kill("s0")
    children.start("s1", workers.paced_sender, db, ledgers, WORK, 300, 0.002)
    children.wait_progress("s1", 50)
    children.wait_progress("r0", children.progress.get("r0", 0) + 10)
    children.kill("r0")
    children.start("r2", workers.plain_receiver, db, ledgers, WORK, 0.5)
    children.expect("ready", ["r2"])
    children.finish(["s1"])
    children.broadcast("drain", ["r1", "r2"])
    children.finish(["r1", "r2"])
    _ledger_drain(db, tmp_path, WORK)

    verdict = check(
        read_ledgers(tmp_path),
        killed={"s0", "r0"},
        strict_fifo_channels={WORK},  # receivers never cancel: each one reads in order
        claim_allowance_per_kill=1,
    )
    assert not verdict.problems, verdict.problems
    assert verdict.sent >= 200
    assert verdict.ambiguous <= 1  # the send s0 was inside when killed
    assert verdict.lost_claimed_by_dead <= 1  # the receive r0 was inside when killed
    assert verdict.delivered >= verdict.sent - 1


def test_kill_every_process_then_restart_keeps_committed(
    children: Children, db: str, tmp_path: Path
) -> None:
    """Committed messages and memberships survive ``kill -9`` of every process."""
    ledgers = str(tmp_path)

    async def audit_member() -> None:
        layer = ChannelLayer(driver="sqlite", path=db)
        await layer.group_add("fault.room", "fault.audit")
        await layer.close()

    asyncio.run(audit_member())
    children.start("m0", workers.group_member, db, ["fault.room"], 30.0, 1)
    member = children.expect("members", ["m0"])["m0"]
    children.start("r0", workers.plain_receiver, db, ledgers, WORK, 1.0)
    children.expect("ready", ["r0"])
    children.start("s0", workers.paced_sender, db, ledgers, WORK, 5000, 0.002)
    children.wait_progress("r0", 80)
    for tag in ("s0", "r0", "m0"):
        children.kill(tag)

    async def after_restart() -> dict[str, Any]:
        layer = ChannelLayer(driver="sqlite", path=db)
        try:
            members = await (await layer._driver()).group_channels("fault.room", time.time())
            await layer.group_send("fault.room", {"type": "after.restart"})
            audit = await asyncio.wait_for(layer.receive("fault.audit"), GUARD)
        finally:
            await layer.close()
        return {"members": members, "audit": audit}

    after = asyncio.run(after_restart())
    assert sorted(after["members"]) == sorted([*member["channels"], "fault.audit"])
    assert after["audit"] == {"type": "after.restart"}
    children.start("r1", workers.plain_receiver, db, ledgers, WORK, 1.0)
    children.send("r1", "drain")
    children.finish(["r1"])

    verdict = check(
        read_ledgers(tmp_path),
        killed={"s0", "r0", "m0"},
        strict_fifo_channels={WORK},
        claim_allowance_per_kill=1,
    )
    assert not verdict.problems, verdict.problems
    assert verdict.sent >= 80
    assert verdict.lost_claimed_by_dead <= 1
    assert verdict.ambiguous <= 1


# =========================================================================== write locks


async def test_write_lock_shorter_than_timeout_is_transparent(
    make_layer: Callable[..., ChannelLayer], db: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holding the write lock for less than ``timeout``: every call waits for
    it and succeeds; nothing is logged above INFO."""
    caplog.set_level(logging.WARNING)
    layer = make_layer(timeout=5.0)
    other = make_layer(timeout=5.0)
    member = await other.new_channel()
    await layer.send(WORK, {"n": 0})
    waiting = asyncio.create_task(other.receive("fault.idle"))
    loop = asyncio.get_running_loop()
    with write_lock_held(db, 0.6):
        started = loop.time()
        await layer.send(WORK, {"n": 1})
        assert loop.time() - started >= 0.3  # it did wait for the other writer
        await layer.group_add("fault.room", member)
        await layer.group_send("fault.room", {"n": "g"})
        assert [m["n"] for m in await drain(other, WORK)] == [0, 1]
    assert await asyncio.wait_for(other.receive(member), GUARD) == {"n": "g"}
    await layer.send("fault.idle", {"n": "late"})
    assert await asyncio.wait_for(waiting, GUARD) == {"n": "late"}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.usefixtures("claim_errors_unthrottled")
async def test_write_lock_longer_than_timeout_clear_error_nothing_lost(
    make_layer: Callable[..., ChannelLayer], db: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Longer than ``timeout``: ``send``/``group_send``/``group_add`` raise a DriverError naming
    the file, the timeout and the remedy, after ``timeout`` (no hang); what they were storing is
    not stored at all; what was stored before is delivered once the lock clears; a receive
    that waits through it is served afterwards, and the claim failures are logged."""
    caplog.set_level(logging.ERROR)
    layer = make_layer(timeout=0.5)
    other = make_layer(timeout=0.5)  # another process: its channel is reached through storage
    member = await other.new_channel()
    await layer.group_add("fault.room", member)
    await layer.send(WORK, {"n": "before-1"})
    await layer.send(WORK, {"n": "before-2"})
    loop = asyncio.get_running_loop()
    with write_lock_held(db, 2.5) as holder:
        waiting = asyncio.create_task(layer.receive(WORK))
        for attempt in (
            lambda: layer.send(WORK, {"n": "during"}),
            lambda: layer.group_send("fault.room", {"n": "during"}),
            lambda: layer.group_add("fault.room", "fault.other"),
        ):
            started = loop.time()
            with pytest.raises(DriverError) as info:
                await attempt()
            assert 0.4 <= loop.time() - started < 2.0
            message = str(info.value)
            assert db in message
            assert "0.5 s" in message
            assert "CONFIG['timeout']" in message
            assert "database is locked" not in message
        assert not waiting.done()
        await asyncio.to_thread(holder.wait, GUARD)
    assert await asyncio.wait_for(waiting, GUARD) == {"n": "before-1"}
    assert await drain(layer, WORK) == [{"n": "before-2"}]  # "during" was never stored
    await layer.group_send("fault.room", {"n": "after"})
    assert await asyncio.wait_for(other.receive(member), GUARD) == {"n": "after"}
    errors = [r.getMessage() for r in caplog.records if r.name.startswith("channels_lite")]
    assert any("claiming messages failed" in e for e in errors), errors
    failures = [r for r in caplog.records if r.name == "channels_lite.core.receiver"]
    assert any(db in str(r.exc_info[1]) for r in failures if r.exc_info), failures


async def test_write_lock_longer_than_timeout_logs_that_retries_are_exhausted(
    db: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the driver gives up on a lock held past its timeout, it logs one WARNING naming
    the file, what it was doing and that its retries are exhausted, before the caller gets the
    DriverError (a caller may not log it); more failures within the minute add no line."""
    from channels_lite.drivers.sqlite import connection

    # A limiter of its own: a line another test wrote a moment ago must not hold this one back.
    monkeypatch.setattr(connection, "_gave_up", RateLimitedLog(connection.logger, interval=60.0))
    caplog.set_level(logging.WARNING, logger="channels_lite")

    def gave_up() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "channels_lite.drivers.sqlite" and r.levelno == logging.WARNING
        ]

    message = [Envelope(WORK, WORK, b"m", time.time() + 60, 100)]
    async with opened(SQLiteDriver(path=db, timeout=0.3)) as driver:
        with write_lock_held(db, 2.5) as holder:
            with pytest.raises(DriverError):
                await driver.push(message, time.time())
            assert len(gave_up()) == 1  # already written when the error arrived
            with pytest.raises(DriverError):
                await driver.push(message, time.time())
            assert len(gave_up()) == 1  # rate-limited
            await asyncio.to_thread(holder.wait, GUARD)
        assert await driver.push(message, time.time()) == [True]
    [line] = gave_up()
    assert db in line
    assert "storing messages" in line
    assert "retries exhausted" in line
    assert "0.3 s" in line
    attempts = re.search(r"after (\d+) attempts", line)
    assert attempts is not None and int(attempts.group(1)) > 1, line


# ============================================================================ read-only


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory owned by the unprivileged user the permission checks run as."""
    path = Path(tempfile.mkdtemp(prefix="channels-lite-ro-"))
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        path.chmod(0o755)
        shutil.rmtree(path)


def _read_only_scenario(directory: Path, what: str) -> str:
    """Runs as the unprivileged user; returns a JSON report."""
    path = str(directory / "db.sqlite3")

    async def scenario() -> dict[str, Any]:
        report: dict[str, Any] = {}
        running = ChannelLayer(driver="sqlite", path=path, timeout=0.5)
        await running.send(WORK, {"n": 1})
        report["mode_db"] = oct(stat.S_IMODE(os.stat(path).st_mode))
        report["mode_wal"] = oct(stat.S_IMODE(os.stat(path + "-wal").st_mode))
        if what == "directory":
            directory.chmod(0o555)
        else:
            os.chmod(path, 0o444)
        try:
            # A process that has the file open keeps working: its descriptors stay writable.
            await running.send(WORK, {"n": 2})
            report["running"] = [m["n"] for m in await drain(running, WORK)]
            await running.send(WORK, {"n": 3})
            # A process starting now cannot open it: a clear error, at once.
            starting = ChannelLayer(driver="sqlite", path=path, timeout=0.5)
            begun = time.monotonic()
            try:
                await starting.send(WORK, {"n": "never"})
                report["starting"] = "sent"
            except DriverError as exc:
                report["starting"] = str(exc)
            report["starting_seconds"] = time.monotonic() - begun
            await starting.close()
            await running.close()
        finally:
            directory.chmod(0o755)
            os.chmod(path, 0o600)
        # Writable again: everything accepted is there.
        later = ChannelLayer(driver="sqlite", path=path)
        report["after"] = [m["n"] for m in await drain(later, WORK)]
        await later.close()
        return report

    return json.dumps(asyncio.run(scenario()))


@posix_only
@pytest.mark.parametrize("what", ["directory", "file"])
def test_read_only_while_running(nobody_dir: Path, what: str) -> None:
    """The directory (or the file) turns read-only while a process runs: the running process
    carries on; a process starting then gets a clear DriverError naming what to fix; once it
    is writable again nothing accepted is missing."""
    outcome = as_unprivileged(lambda: _read_only_scenario(nobody_dir, what))
    assert not outcome.startswith("child failed"), outcome
    report = json.loads(outcome)
    assert report["mode_db"] == report["mode_wal"] == "0o600"
    assert report["running"] == [1, 2]
    error = report["starting"]
    assert error != "sent"
    assert str(nobody_dir / "db.sqlite3") in error
    assert "not writable" in error
    if what == "directory":
        assert f"directory {str(nobody_dir)!r}" in error
        assert "-wal" in error
    assert report["starting_seconds"] < 5
    assert report["after"] == [3]


# ============================================================================ disk full


async def _limit_pages(layer: ChannelLayer, extra: int) -> None:
    """``max_page_count`` is per connection: set it on both of the layer's connections (the
    worker thread's, and the inline one pushes and claims use first)."""
    driver = await layer._driver()
    conn = driver._conn  # type: ignore[attr-defined]

    def limit(raw: sqlite3.Connection) -> None:
        pages = raw.execute("PRAGMA page_count").fetchone()[0]
        raw.execute(f"PRAGMA max_page_count = {pages + extra}").fetchall()

    await conn.run(limit, doing="limiting pages")
    await conn.run(limit, doing="limiting pages", inline=True)
    assert conn.inline_calls > 0


async def test_disk_full_clear_error_accepted_messages_intact(
    make_layer: Callable[..., ChannelLayer], db: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk fills up: ``send`` raises a DriverError saying so and naming the file; every
    message accepted before is delivered; a group_send that did not fit stored nothing; once
    consumers drain, sends work again."""
    layer = make_layer(capacity=100_000)
    other = make_layer()  # another process: its channel is reached through storage
    member = await other.new_channel()
    await layer.group_add("fault.room", member)
    await layer.group_add("fault.room", "fault.plain-member")
    await _limit_pages(layer, 6)
    accepted = 0
    with pytest.raises(DriverError) as info:
        for n in range(10_000):
            await layer.send(WORK, {"n": n, "pad": "x" * 2000})
            accepted += 1
    message = str(info.value)
    assert db in message
    assert "full" in message
    assert "free some space" in message
    _assert_logged(caplog, db, "free some space")
    assert accepted > 0
    with pytest.raises(DriverError):
        await layer.group_send("fault.room", {"big": "y" * 50_000})
    assert [m["n"] for m in await drain(layer, WORK)] == list(range(accepted))
    # Space freed by the consumers is reused.
    await layer.send(WORK, {"n": "again", "pad": "x" * 2000})
    await layer.group_send("fault.room", {"n": "after"})
    assert await asyncio.wait_for(layer.receive(WORK), GUARD) == {"n": "again", "pad": "x" * 2000}
    assert await asyncio.wait_for(other.receive(member), GUARD) == {"n": "after"}
    assert await drain(layer, "fault.plain-member") == [{"n": "after"}]


async def test_group_send_that_fails_delivers_to_no_member(
    make_layer: Callable[..., ChannelLayer],
) -> None:
    """A group_send that raises was not accepted: no member, local or not, may get it (a
    caller that retries would otherwise deliver it twice to some)."""
    layer = make_layer(capacity=100_000)
    local = await layer.new_channel()
    await layer.group_add("fault.room", local)
    await layer.group_add("fault.room", "fault.plain-member")
    await _limit_pages(layer, 2)
    with pytest.raises(DriverError):
        await layer.group_send("fault.room", {"big": "y" * 200_000})
    await layer.send(local, {"n": "sentinel"})
    assert await asyncio.wait_for(layer.receive(local), GUARD) == {"n": "sentinel"}


# ================================================================= unusable file at the path


def _not_sqlite(path: Path) -> None:
    path.write_bytes(b"# my notes, not a database\n" * 200)


def _corrupt_pages(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    with path.open("r+b") as f:
        f.seek(4096 * 2)
        f.write(bytes(range(256)) * 16 * 8)  # pages 3-10: b-tree pages now garbage


def _truncated(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    with path.open("r+b") as f:
        f.truncate(1000)


@pytest.mark.parametrize(
    ("damage", "hint"),
    [
        (_not_sqlite, "not a SQLite database"),
        (_corrupt_pages, "corrupt"),
        (_truncated, "corrupt"),
    ],
    ids=["not-sqlite", "corrupt-pages", "truncated"],
)
async def test_unusable_file_clear_error(
    make_layer: Callable[..., ChannelLayer],
    db: str,
    damage: Callable[[Path], None],
    hint: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Garbage, corrupt pages, a truncated file: every call raises a DriverError naming the
    file and the remedy, within the timeout, and the driver logs it (an ERROR naming them
    too); the file is left as it was (it may be evidence); a waiting receive is never handed
    garbage."""
    if damage is not _not_sqlite:
        seed = make_layer()
        for n in range(60):
            await seed.send(WORK, {"n": n, "pad": "x" * 3000})
        await seed.close()
    damage(Path(db))
    before = Path(db).read_bytes()
    layer = make_layer(timeout=0.5)
    loop = asyncio.get_running_loop()
    for attempt in (
        lambda: layer.send(WORK, {"n": "x"}),
        lambda: layer.group_send("fault.room", {"n": "x"}),
        lambda: asyncio.wait_for(layer.receive(WORK), 2.0),
    ):
        started = loop.time()
        try:
            await attempt()
        except DriverError as exc:
            message = str(exc)
            assert db in message
            assert hint in message
            assert "CONFIG['path']" in message or "move" in message
        except TimeoutError:
            # A receive whose claims fail keeps waiting (the claim loop logs and retries).
            pass
        else:
            pytest.fail("a call on an unusable database succeeded")
        assert loop.time() - started < 5.0
    assert Path(db).read_bytes() == before
    _assert_logged(caplog, db, hint)


def _assert_logged(caplog: pytest.LogCaptureFixture, db: str, hint: str) -> None:
    """The driver logged the error itself: a caller may swallow the exception."""
    logged = [
        r.getMessage()
        for r in caplog.records
        if r.name == "channels_lite.drivers.sqlite" and r.levelno == logging.ERROR
    ]
    assert any(db in text and hint in text for text in logged), logged


# ================================================================= file deleted while running


@posix_only
@pytest.mark.parametrize("which", ["all-files", "db-only"])
def test_file_deleted_while_processes_run(
    children: Children, db: str, tmp_path: Path, which: str
) -> None:
    """``rm`` of the database while a process uses it: the process notices (on its next use of
    the database; a waiting receiver's claims count), logs an ERROR naming the path and what to
    do, moves what the deleted file still held into the new file at the path (created 0600),
    and carries on; processes started after the deletion see its messages and memberships.
    Its exit does not disturb the new file."""
    children.start("holder", workers.ghost_holder, db)
    holder_channel = children.expect("ready", ["holder"])["holder"]
    os.unlink(db)
    if which == "all-files":
        os.unlink(db + "-wal")
        os.unlink(db + "-shm")

    async def new_process() -> list[Any]:
        layer = ChannelLayer(driver="sqlite", path=db)
        try:
            await layer.send("deleted.work", {"n": "after-1"})
            await asyncio.sleep(0.5)
            children.send("holder", "poke")  # in case no wake-up reached it
            moved = await asyncio.to_thread(children.expect, "moved", ["holder"])
            await layer.group_send("deleted.room", {"n": "to-the-holder"})
            got = await asyncio.to_thread(children.expect, "got", ["holder"])
            work = await drain(layer, "deleted.work")
            return [moved["holder"], got["holder"], work]
        finally:
            await layer.close()

    log, got, work = asyncio.run(new_process())
    errors = [line for line in log if "deleted or replaced" in line]
    assert errors, log
    assert errors[0].startswith("ERROR")
    assert db in errors[0]
    assert "stop every process first" in errors[0]
    assert "1 membership(s)" in errors[0]
    assert got == {"n": "to-the-holder"}
    ns = [m["n"] for m in work]
    assert sorted(ns) == ["after-1", "after-from-holder", "before-1", "before-2"]
    assert ns.index("before-1") < ns.index("before-2")  # one sender: its order is kept
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600

    children.send("holder", "stop")
    children.finish(["holder"])

    async def afterwards() -> list[Any]:
        layer = ChannelLayer(driver="sqlite", path=db)
        try:
            await layer.send("deleted.work", {"n": "still-works"})
            return await drain(layer, "deleted.work")
        finally:
            await layer.close()

    # The holder exited: its old connection must not have removed the live file's -wal.
    assert asyncio.run(afterwards()) == [{"n": "still-works"}]
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT count(*) FROM channels_lite_messages").fetchone() == (0,)
    finally:
        conn.close()
    assert holder_channel.startswith("ghost.")


@posix_only
async def test_directory_removed_while_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The directory goes away: calls raise a DriverError saying the file was deleted and the
    directory is missing, with one ERROR logged; when the directory is back, the layer creates a
    new file there and carries on."""
    caplog.set_level(logging.ERROR, logger="channels_lite.drivers.sqlite")
    directory = tmp_path / "data"
    directory.mkdir()
    path = str(directory / "db.sqlite3")
    layer = ChannelLayer(driver="sqlite", path=path, timeout=0.5)
    try:
        await layer.send(WORK, {"n": 1})
        shutil.rmtree(directory)
        for _ in range(3):
            with pytest.raises(DriverError) as info:
                await layer.send(WORK, {"n": 2})
            message = str(info.value)
            assert path in message
            assert "deleted or replaced" in message
            assert "does not exist" in message
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, errors
        assert path in errors[0]
        directory.mkdir()
        await layer.send(WORK, {"n": 3})
        # The deleted file's unread message came along.
        assert [m["n"] for m in await drain(layer, WORK)] == [1, 3]
    finally:
        await layer.close()


@posix_only
async def test_closing_a_connection_to_a_deleted_file_spares_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process closes its layer right after its database was deleted, before using it
    again. The last connection to a WAL database normally checkpoints it and deletes
    ``-wal``/``-shm`` by name, and those names now belong to the new database another process
    created: SQLite must see that the file moved and leave them alone."""
    purged = asyncio.Event()
    original = SQLiteDriver.purge

    async def purge(self: SQLiteDriver, now: float) -> int:
        removed = await original(self, now)
        purged.set()
        return removed

    monkeypatch.setattr(SQLiteDriver, "purge", purge)
    path = str(tmp_path / "db.sqlite3")
    old = ChannelLayer(driver="sqlite", path=path)
    await old.send(WORK, {"n": "in-the-deleted-file"})
    # Its upkeep's first round (a purge, right after the first use) is over: nothing of the
    # old layer uses the file again before close(). Had it run after the deletion, it would
    # rightly have carried the message over to the new file.
    await asyncio.wait_for(purged.wait(), GUARD)
    for suffix in ("", "-wal", "-shm"):
        os.unlink(path + suffix)
    new = ChannelLayer(driver="sqlite", path=path)
    try:
        await new.send(WORK, {"n": "in-the-new-file"})
        wal = os.stat(path + "-wal").st_ino
        await old.close()
        assert os.stat(path + "-wal").st_ino == wal  # not deleted by the old connection
        assert await drain(new, WORK) == [{"n": "in-the-new-file"}]
    finally:
        await new.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


_OPEN_AND_CLOSE = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
conn.execute("SELECT count(*) FROM channels_lite_messages").fetchall()
conn.close()
"""


@posix_only
async def test_opening_another_loop_keeps_this_process_locks(tmp_path: Path) -> None:
    """Every event loop that uses the layer opens its own driver. If opening one closed any
    descriptor of the database file, the kernel would drop every POSIX lock this process holds
    on it (the locks of its other SQLite connections included); another process closing its
    last connection would then think itself the last user and delete the -wal under us,
    losing what we commit next ("disk I/O error")."""
    path = str(tmp_path / "db.sqlite3")
    layer = ChannelLayer(driver="sqlite", path=path)
    try:
        await layer.send(WORK, {"n": 1})
        # A second event loop (as async_to_sync makes) opens a second driver in this process.
        await asyncio.to_thread(asyncio.run, layer.send(WORK, {"n": 2}))
        # Another process opens the database and closes its only connection.
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _OPEN_AND_CLOSE, path)
        assert await proc.wait() == 0
        assert os.path.exists(path + "-wal")
        await layer.send(WORK, {"n": 3})
    finally:
        await layer.close()
    reader = ChannelLayer(driver="sqlite", path=path)
    try:
        assert [m["n"] for m in await drain(reader, WORK)] == [1, 2, 3]
    finally:
        await reader.close()
