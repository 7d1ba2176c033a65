"""Dead processes: their memberships and queued messages go within a bounded time; live ones
keep theirs.

Every process that made a channel (``new_channel``) holds a lease of ``process_timeout``
seconds, renewed every ``process_timeout / 4``. Once a lease has lapsed for another
``process_timeout`` (a grace period, so that a stalled database does not make live processes
look dead), the next renewal by any other process with channels removes that process's
messages and memberships. So a process killed at time T is gone from every group by
``T + 2.25 * process_timeout`` (its last renewal was at most ``process_timeout / 4`` before T;
its lease ran ``process_timeout`` from there, then the grace of ``process_timeout``; the next
renewal elsewhere comes at most ``process_timeout / 4`` later), provided some live process has
channels. These tests use ``process_timeout=2`` s (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import rel_workers as workers  # noqa: E402
from rel_parent import Children, write_lock_held  # noqa: E402

from channels_lite import ChannelLayer  # noqa: E402

TIMEOUT = 2.0
#: The documented bound, plus room for a busy machine (event loops run late under load).
BOUND = 2.25 * TIMEOUT + 2.0
GROUPS = ["dead.room", "dead.lobby"]


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "dead.sqlite3")


@pytest.fixture
async def survivor(db: str) -> AsyncIterator[ChannelLayer]:
    """This process: alive throughout, with a channel of its own (so it renews and reaps)."""
    layer = ChannelLayer(driver="sqlite", path=db, process_timeout=TIMEOUT)
    await layer.new_channel("survivor")
    yield layer
    await layer.close()


async def expect(children: Children, kind: str, tag: str) -> Any:
    # In a thread: this event loop must keep renewing the survivor's lease meanwhile.
    return (await asyncio.to_thread(children.expect, kind, [tag]))[tag]


async def members(layer: ChannelLayer, group: str) -> list[str]:
    driver = await layer._driver()
    return sorted(await driver.group_channels(group, time.time()))


def queued_for(db: str, key: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(
            conn.execute(
                "SELECT count(*) FROM channels_lite_messages WHERE key = ?", (key,)
            ).fetchone()[0]
        )
    finally:
        conn.close()


async def test_killed_process_removed_within_bound_live_idle_process_kept(
    children: Children, survivor: ChannelLayer, db: str
) -> None:
    """``kill -9`` of a process with channels in two groups and messages waiting for them:
    within 2.25 x process_timeout its memberships and messages are gone. Another process that
    stays idle (event loop free) for longer than process_timeout keeps its membership."""
    children.start("doomed", workers.group_member, db, GROUPS, TIMEOUT, 2)
    children.start("idle", workers.group_member, db, GROUPS[:1], TIMEOUT, 1)
    doomed = await expect(children, "members", "doomed")
    idle = await expect(children, "members", "idle")
    for channel in doomed["channels"]:
        await survivor.send(channel, {"type": "never.read"})
    assert queued_for(db, doomed["key"]) == 2

    # Everyone alive and idle for 1.5 x process_timeout: nothing is reaped.
    await asyncio.sleep(1.5 * TIMEOUT)
    assert await members(survivor, GROUPS[0]) == sorted(doomed["channels"] + idle["channels"])
    assert await members(survivor, GROUPS[1]) == sorted(doomed["channels"])

    os.kill(doomed["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    while set(doomed["channels"]) & set(
        await members(survivor, GROUPS[0]) + await members(survivor, GROUPS[1])
    ):
        assert time.monotonic() - killed_at < BOUND, "the dead process was not reaped in time"
        await asyncio.sleep(0.05)
    took = time.monotonic() - killed_at
    assert queued_for(db, doomed["key"]) == 0
    assert took <= BOUND

    # The idle process was never taken for dead, and still gets group messages.
    assert await members(survivor, GROUPS[0]) == idle["channels"]
    await survivor.group_send(GROUPS[0], {"type": "still.here"})
    children.send("idle", "receive")
    assert await expect(children, "received", "idle") == {"type": "still.here"}
    children.send("idle", "stop")
    report = (await asyncio.to_thread(children.finish, ["idle"]))["idle"]
    assert not [line for line in report["log"] if "lease" in line], report["log"]


def _write_lock_free(db: str) -> bool:
    """Nobody holds ``db``'s write lock right now (a write transaction can start at once)."""
    conn = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def _leases(db: str) -> str:
    """The lease table against the clock, for a failure message."""
    conn = sqlite3.connect(db)
    try:
        now = time.time()
        rows = conn.execute("SELECT key, expires_at FROM channels_lite_processes").fetchall()
        return "leases " + ", ".join(f"{key} {expires - now:+.1f} s" for key, expires in rows)
    finally:
        conn.close()


def _upkeep_state(layer: ChannelLayer) -> str:
    upkeep = layer._upkeep
    if upkeep is None:
        return "none"
    return f"alive={upkeep.alive()} task={upkeep.task!r}"


def _stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped. /proc/PID/stat shows the main thread only, and the
    others stop one by one: a worker thread inside a system call (SQLite taking its write
    lock with fcntl) finishes it first, so a lock check as soon as the main thread stopped
    could find the lock free a moment before that thread took it. (The test's occasional hang
    had another cause, which the guard's message showed: the sleeper was stopped before its
    first lease was written; new_channel() now writes it.)"""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        if state not in ("T", "t"):
            return False
    return True


def stop_outside_a_write(pid: int, db: str) -> None:
    """SIGSTOP ``pid`` at a moment it holds no write lock. A process stopped inside its own
    write transaction (a lease renewal lasts about a millisecond, longer on a loaded machine)
    blocks every writer until it resumes: that case is
    ``test_long_stall_does_not_reap_live_processes``'s, not this test's."""
    for _ in range(100):
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 2.0
        while not _stopped(pid):
            assert time.monotonic() < deadline, "SIGSTOP did not stop the process"
            time.sleep(0.001)
        if _write_lock_free(db):
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("the process held the write lock at every one of 100 tries")


async def test_suspended_process_is_reaped_and_says_so(
    children: Children, survivor: ChannelLayer, db: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A process stopped (SIGSTOP) for longer than process_timeout is indistinguishable from a
    dead one: it is reaped. When it resumes, it logs an ERROR saying its memberships were
    removed and its consumers must join again; joining again works."""
    caplog.set_level(logging.DEBUG, logger="channels_lite")
    children.start("sleeper", workers.group_member, db, GROUPS[:1], TIMEOUT, 1)
    sleeper = await expect(children, "members", "sleeper")
    await asyncio.to_thread(stop_outside_a_write, sleeper["pid"], db)
    try:
        stopped_at = time.monotonic()
        while sleeper["channels"][0] in await members(survivor, GROUPS[0]):
            # A hang guard; see the test above. Says whether a stopped thread holds the lock.
            assert time.monotonic() - stopped_at < 10 * TIMEOUT, (
                f"not reaped in {10 * TIMEOUT:g} s; write lock free now: {_write_lock_free(db)}; "
                f"{_leases(db)}; survivor upkeep {_upkeep_state(survivor)}; survivor log "
                f"{[r.getMessage()[:200] for r in caplog.records[-15:]]}"
            )
            await asyncio.sleep(0.05)
    finally:
        os.kill(sleeper["pid"], signal.SIGCONT)
    await asyncio.sleep(TIMEOUT)  # a renewal or two after it resumed
    children.send("sleeper", "stop")
    report = (await asyncio.to_thread(children.finish, ["sleeper"]))["sleeper"]
    errors = [line for line in report["log"] if "lease of this process" in line]
    assert errors, report["log"]
    assert errors[0].startswith("ERROR")
    assert db in errors[0]
    assert "join again" in errors[0]


async def test_stalled_database_does_not_reap_live_processes(
    children: Children, survivor: ChannelLayer, db: str
) -> None:
    """Another process holds the write lock for 1.5 x process_timeout (less than the driver's
    lock timeout, so nothing fails): every lease lapses, nobody could renew, so nobody is dead;
    the grace period keeps every live process's memberships."""
    mine = await survivor.new_channel()
    await survivor.group_add(GROUPS[0], mine)
    children.start("live", workers.group_member, db, GROUPS[:1], TIMEOUT, 1)
    live = await expect(children, "members", "live")
    with write_lock_held(db, 1.5 * TIMEOUT) as holder:
        await asyncio.to_thread(holder.wait, 30)
    await asyncio.sleep(TIMEOUT)  # renewals resume; a wrong reaping would happen now
    assert await members(survivor, GROUPS[0]) == sorted([*live["channels"], mine])
    children.send("live", "stop")
    await asyncio.to_thread(children.finish, ["live"])


async def test_long_stall_does_not_reap_live_processes(children: Children, db: str) -> None:
    """As above, with the database stalled for 3.5 x process_timeout (process_timeout=1 s and
    drivers that wait up to 8 s for the lock, so that every renewal waits rather than fails)."""
    timeout = 1.0
    survivor = ChannelLayer(driver="sqlite", path=db, process_timeout=timeout, timeout=8.0)
    try:
        mine = await survivor.new_channel()
        await survivor.group_add(GROUPS[0], mine)
        children.start("live", workers.group_member, db, GROUPS[:1], timeout, 1, 8.0)
        live = await expect(children, "members", "live")
        with write_lock_held(db, 3.5 * timeout) as holder:
            await asyncio.to_thread(holder.wait, 30)
        await asyncio.sleep(2 * timeout)  # renewals resume; a wrong reaping would happen now
        assert await members(survivor, GROUPS[0]) == sorted([*live["channels"], mine])
        children.send("live", "stop")
        await asyncio.to_thread(children.finish, ["live"])
    finally:
        await survivor.close()
