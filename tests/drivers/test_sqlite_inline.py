"""SQLite driver: short transactions run inline on the event loop, channel sizes by trigger.

The inline path (``Connection.run(..., inline=True)``) and the worker-thread path must be
indistinguishable from outside: these tests check that the inline one is really taken, that it
hands over to the worker when another connection holds the write lock or the file is full, that
the WAL still gets checkpointed although the inline connection never checkpoints itself, and
that schema 2's per-channel counts stay exact whatever removes messages.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

from channels_lite.drivers.base import ClaimRequest, Envelope
from channels_lite.drivers.sqlite import SQLiteDriver
from channels_lite.drivers.sqlite.connection import (
    CHECKPOINT_EVERY,
    INLINE_BUSY_WINDOW,
    RESTART_AT_FRAMES,
    Connection,
)
from channels_lite.drivers.sqlite.schema import SCHEMA_VERSION

NOW = 1_700_000_000.0
LATER = NOW + 3600.0


def env(
    channel: str, payload: bytes, *, capacity: int = 10_000, expires_at: float = LATER
) -> Envelope:
    return Envelope(channel, channel, payload, expires_at, capacity)


def sizes(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT channel, stored FROM channels_lite_channel_sizes"))
    finally:
        conn.close()


def live_counts(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return dict(
            conn.execute("SELECT channel, count(*) FROM channels_lite_messages GROUP BY channel")
        )
    finally:
        conn.close()


def connection(driver: SQLiteDriver) -> Connection:
    conn = driver._conn
    assert conn is not None
    return conn


async def test_push_and_claim_run_inline_when_uncontended(driver: SQLiteDriver) -> None:
    conn = connection(driver)
    assert await driver.push([env("c", b"1"), env("c", b"2")], NOW) == [True, True]
    got = await driver.claim([ClaimRequest("c", 10)], NOW)
    assert [m.payload for m in got] == [b"1", b"2"]
    await driver.group_add("g", "c", "c", LATER)
    assert await driver.group_channels("g", NOW) == ["c"]
    await driver.group_discard("g", "c")
    assert conn.inline_calls == 5
    assert conn.inline_fallbacks == 0


async def test_big_push_goes_to_the_worker(driver: SQLiteDriver) -> None:
    """A push that would hold the event loop for long (many or big payloads) is not inline."""
    conn = connection(driver)
    before = conn.inline_calls
    flags = await driver.push([env("big", b"x" * 300_000)], NOW)
    assert flags == [True]
    flags = await driver.push([env("many", b"%d" % i) for i in range(200)], NOW)
    assert flags == [True] * 200
    assert conn.inline_calls == before
    assert len(await driver.claim([ClaimRequest("many", 1000)], NOW)) == 200


async def test_locked_file_hands_the_push_to_the_worker(
    driver: SQLiteDriver, db_path: Path
) -> None:
    """Another connection holds the write lock: each inline attempt fails at once (it must never
    block the event loop), the worker waits for the lock, and the message is stored once."""
    conn = connection(driver)
    await driver.push([env("warm", b"w")], NOW)  # the inline connection is open
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        started = asyncio.get_running_loop().time()
        task = asyncio.ensure_future(driver.push([env("c", b"once")], NOW))
        # The push tries inline once per loop turn for INLINE_BUSY_WINDOW, then goes to the
        # worker; the event loop keeps running meanwhile (this loop's turns show it).
        turns = 0
        async with asyncio.timeout(5):
            while conn.inline_fallbacks == 0:
                await asyncio.sleep(0)
                turns += 1
        assert asyncio.get_running_loop().time() - started >= INLINE_BUSY_WINDOW
        assert conn.inline_busy_turns >= 2
        assert turns >= conn.inline_busy_turns - 1
        assert not task.done()
        blocker.execute("ROLLBACK")
        assert await asyncio.wait_for(task, 5) == [True]
    finally:
        blocker.close()
    assert [m.payload for m in await driver.claim([ClaimRequest("c", 10)], NOW)] == [b"once"]


async def test_wal_is_checkpointed_in_the_background(driver: SQLiteDriver, db_path: Path) -> None:
    """The inline connection has automatic checkpoints off (they would fsync on the event loop);
    the worker checkpoints every CHECKPOINT_EVERY inline writes, so the WAL stays small."""
    conn = connection(driver)
    payload = b"p" * 512
    for round_ in range(6):
        for _ in range(CHECKPOINT_EVERY):
            await driver.push([env("c", payload)], NOW)
            assert len(await driver.claim([ClaimRequest("c", 1)], NOW)) == 1
        checkpoint = conn._checkpoint
        assert checkpoint is not None, f"no checkpoint started in round {round_}"
        await checkpoint
    assert conn.inline_fallbacks == 0
    # 2 400 write transactions of several pages each would make a WAL of well over 30 MB.
    assert os.path.getsize(f"{db_path}-wal") < 8 * 1024 * 1024


async def test_channel_sizes_follow_every_removal(driver: SQLiteDriver, db_path: Path) -> None:
    """Claims, purge, reaping, flush: the per-channel count (kept by triggers) always equals
    the rows stored, and rows of emptied channels go at purge."""
    await driver.push([env("a", b"%d" % i) for i in range(5)], NOW)
    await driver.push([env("b", b"old", expires_at=NOW + 1), env("b", b"new")], NOW)
    assert sizes(db_path) == live_counts(db_path) == {"a": 5, "b": 2}
    await driver.claim([ClaimRequest("a", 2)], NOW)
    assert sizes(db_path) == live_counts(db_path) == {"a": 3, "b": 2}
    await driver.purge(NOW + 2)  # removes b's expired row
    assert sizes(db_path) == live_counts(db_path) == {"a": 3, "b": 1}
    await driver.claim([ClaimRequest("b", 5), ClaimRequest("a", 5)], NOW)
    assert live_counts(db_path) == {}
    assert sizes(db_path) == {"a": 0, "b": 0}
    await driver.purge(NOW)
    assert sizes(db_path) == {}
    await driver.push([env("c", b"1")], NOW)
    await driver.flush()
    assert sizes(db_path) == {}


async def test_capacity_exact_with_expired_rows_counted_in_size(driver: SQLiteDriver) -> None:
    """The stored count includes expired rows not yet purged: a channel full of them must
    still take new messages up to its capacity of *live* ones."""
    await driver.push([env("c", b"x", capacity=3, expires_at=NOW + 1) for _ in range(3)], NOW)
    later = NOW + 2
    flags = await driver.push([env("c", b"%d" % i, capacity=3) for i in range(5)], later)
    assert flags == [True, True, True, False, False]
    assert await driver.push([env("c", b"more", capacity=4)], later) == [True]
    assert await driver.push([env("c", b"full", capacity=4)], later) == [False]
    got = await driver.claim([ClaimRequest("c", 10)], later)
    assert [m.payload for m in got] == [b"0", b"1", b"2", b"more"]


async def test_schema_1_database_is_upgraded_with_its_counts(db_path: Path) -> None:
    """A file written by schema 1 (no channel_sizes) gets the table, the triggers and the
    counts of what it already holds, so capacity stays exact across the upgrade."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.executescript(
        """
        PRAGMA journal_mode=WAL;
        CREATE TABLE channels_lite_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        CREATE TABLE channels_lite_messages (id INTEGER PRIMARY KEY, channel TEXT NOT NULL,
            key TEXT NOT NULL, payload BLOB NOT NULL, expires_at REAL NOT NULL);
        CREATE INDEX channels_lite_messages_key_id ON channels_lite_messages (key, id);
        CREATE INDEX channels_lite_messages_channel_expires
            ON channels_lite_messages (channel, expires_at);
        CREATE TABLE channels_lite_groups (group_name TEXT NOT NULL, channel TEXT NOT NULL,
            key TEXT NOT NULL, expires_at REAL NOT NULL, PRIMARY KEY (group_name, channel))
            WITHOUT ROWID;
        CREATE INDEX channels_lite_groups_key ON channels_lite_groups (key);
        CREATE TABLE channels_lite_processes (key TEXT PRIMARY KEY, expires_at REAL NOT NULL)
            WITHOUT ROWID;
        INSERT INTO channels_lite_meta VALUES ('schema_version', '1');
        """
    )
    conn.executemany(
        "INSERT INTO channels_lite_messages (channel, key, payload, expires_at) VALUES (?,?,?,?)",
        [("c", "c", b"old%d" % i, LATER) for i in range(3)],
    )
    conn.close()
    driver = SQLiteDriver(path=db_path)
    await driver.open()
    try:
        assert sizes(db_path) == {"c": 3}
        flags = await driver.push([env("c", b"new", capacity=4) for _ in range(2)], NOW)
        assert flags == [True, False]
        got = await driver.claim([ClaimRequest("c", 10)], NOW)
        assert [m.payload for m in got] == [b"old0", b"old1", b"old2", b"new"]
        assert sizes(db_path) == {"c": 0}
    finally:
        await driver.close()
    version = sqlite3.connect(db_path).execute(
        "SELECT value FROM channels_lite_meta WHERE name = 'schema_version'"
    )
    assert version.fetchall() == [(str(SCHEMA_VERSION),)]


async def test_background_checkpoint_does_not_hold_inline_calls_back(driver: SQLiteDriver) -> None:
    """While the worker runs the periodic PASSIVE checkpoint (and its fsync), pushes and
    claims keep running inline: holding them back made 1% of deliveries wait for it."""
    conn = connection(driver)
    for _ in range(CHECKPOINT_EVERY):
        await driver.push([env("c", b"p")], NOW)
    checkpoint = conn._checkpoint
    assert checkpoint is not None
    await asyncio.sleep(0)  # the checkpoint task starts and hands its work to the worker
    assert not checkpoint.done()
    before = conn.inline_calls
    assert await driver.push([env("c", b"during")], NOW) == [True]
    assert conn.inline_calls == before + 1
    await checkpoint
    assert conn.checkpoints[-1][0] == "PASSIVE"


async def test_wal_stays_small_under_continuous_inline_writes(
    driver: SQLiteDriver, db_path: Path
) -> None:
    """Several tasks writing all the time (each yielding a loop turn between calls, as the
    layer's senders and claim loop do) leave a checkpoint running beside them no moment at
    which the whole WAL is copied, so the WAL would never start over and would grow past
    journal_size_limit (it did, in a soak). Once it holds RESTART_AT_FRAMES, a RESTART
    checkpoint, with this process's calls queued behind it, starts it over."""
    conn = connection(driver)
    payload = b"p" * 512

    async def writer(name: str) -> None:
        for _ in range(CHECKPOINT_EVERY * 3):
            await driver.push([env(name, payload)], NOW)
            await asyncio.sleep(0)
            assert len(await driver.claim([ClaimRequest(name, 1)], NOW)) == 1
            await asyncio.sleep(0)

    await asyncio.gather(*(writer(f"w{n}") for n in range(4)))
    checkpoint = conn._checkpoint
    if checkpoint is not None:
        await checkpoint
    # 4 800 write transactions of several pages each: well over 100 MB of WAL if never
    # restarted. Bounded instead by the restart threshold plus what the writers add before the
    # next background checkpoint (CHECKPOINT_EVERY writes of a few pages each).
    bound = (RESTART_AT_FRAMES + CHECKPOINT_EVERY * 16) * (4096 + 24)
    assert os.path.getsize(f"{db_path}-wal") < bound
