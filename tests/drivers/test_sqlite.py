"""SQLite driver specifics: options, pragmas, schema, locking, concurrency, lifecycle.

The generic driver contract is tested by the conformance suite; these tests cover what only the
SQLite driver has, against real files in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from channels_lite.drivers.base import (
    ChangeNotifier,
    ClaimRequest,
    DriverConfigError,
    DriverError,
    Envelope,
    SupportsLiveness,
    SupportsStats,
)
from channels_lite.drivers.sqlite import SQLiteDriver, default_path
from channels_lite.drivers.sqlite.schema import SCHEMA_VERSION

NOW = 1_700_000_000.0
LATER = NOW + 3600.0


def env(
    channel: str, payload: bytes, *, capacity: int = 10_000, key: str | None = None
) -> Envelope:
    return Envelope(
        channel=channel,
        key=channel if key is None else key,
        payload=payload,
        expires_at=LATER,
        capacity=capacity,
    )


def rows(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def pragma(driver: SQLiteDriver, name: str) -> object:
    """Read a pragma on the driver's own connection (per-connection settings)."""
    assert driver._conn is not None
    return await driver._conn.run(
        lambda raw: raw.execute(f"PRAGMA {name}").fetchone()[0], doing="test"
    )


# ----------------------------------------------------------------------------------- options


def test_declares_capabilities() -> None:
    instance = SQLiteDriver(path="/tmp/x.sqlite3")
    assert SQLiteDriver.name == "sqlite"
    assert SQLiteDriver.features.cross_process
    assert SQLiteDriver.features.persistent
    assert isinstance(instance, ChangeNotifier)
    assert isinstance(instance, SupportsLiveness)
    assert isinstance(instance, SupportsStats)
    assert set(SQLiteDriver.option_docs) == {"path", "timeout", "synchronous", "table_prefix"}


@pytest.mark.parametrize(
    ("options", "option", "shown"),
    [
        ({"path": 42}, "path", "42"),
        ({"path": b"/tmp/x.sqlite3"}, "path", "/tmp/x.sqlite3"),
        ({"path": ":memory:"}, "path", ":memory:"),
        ({"path": ""}, "path", "''"),
        ({"timeout": "5"}, "timeout", "'5'"),
        ({"timeout": True}, "timeout", "True"),
        ({"timeout": 0}, "timeout", "0"),
        ({"timeout": -1.5}, "timeout", "-1.5"),
        ({"timeout": float("inf")}, "timeout", "inf"),
        ({"synchronous": "SOMETIMES"}, "synchronous", "SOMETIMES"),
        ({"synchronous": 1}, "synchronous", "1"),
        ({"table_prefix": "1abc"}, "table_prefix", "1abc"),
        ({"table_prefix": "a-b"}, "table_prefix", "a-b"),
        ({"table_prefix": "x; DROP TABLE y"}, "table_prefix", "DROP TABLE"),
        ({"table_prefix": None}, "table_prefix", "None"),
        ({"no_such": 1}, "no_such", "no_such"),
    ],
)
def test_bad_options_name_the_option_and_value(
    options: dict[str, object], option: str, shown: str
) -> None:
    with pytest.raises(DriverConfigError) as info:
        SQLiteDriver(**{"path": "/tmp/x.sqlite3", **options})
    assert info.value.option == option
    assert shown in str(info.value)


def test_options_normalized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    instance = SQLiteDriver(path="rel.sqlite3", timeout=1, synchronous="full", table_prefix="_x1")
    assert instance.path == str(tmp_path / "rel.sqlite3")
    assert instance.timeout == 1.0
    assert isinstance(instance.timeout, float)
    assert instance.synchronous == "FULL"
    assert instance.describe() == f"sqlite at {tmp_path / 'rel.sqlite3'}"


def test_default_path_is_in_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_path() == str(tmp_path / "channels-lite.sqlite3")
    assert SQLiteDriver().path == str(tmp_path / "channels-lite.sqlite3")
    assert SQLiteDriver(path=None).path == str(tmp_path / "channels-lite.sqlite3")


def test_sibling_keeps_the_file_when_cwd_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    first = SQLiteDriver(path="db.sqlite3", timeout=0.5, table_prefix="p_")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    second = first.sibling()
    assert second.path == first.path == str(tmp_path / "db.sqlite3")
    assert second.timeout == 0.5
    assert second.tables == first.tables


# ------------------------------------------------------------------------- pragmas and schema


@pytest.mark.parametrize(("setting", "value"), [("normal", 1), ("FULL", 2), ("Off", 0)])
async def test_pragmas(db_path: Path, setting: str, value: int) -> None:
    instance = SQLiteDriver(path=db_path, synchronous=setting)
    await instance.open()
    try:
        assert await pragma(instance, "journal_mode") == "wal"
        assert await pragma(instance, "synchronous") == value
        # A short busy handler: the driver's own retry loop owns the total wait.
        assert 0 < int(await pragma(instance, "busy_timeout")) <= 50  # type: ignore[call-overload]
    finally:
        await instance.close()
    # WAL is a property of the file, seen by any other connection too.
    assert rows(db_path, "PRAGMA journal_mode") == [("wal",)]


async def test_schema_created_and_versioned(driver: SQLiteDriver, db_path: Path) -> None:
    assert rows(db_path, "SELECT value FROM channels_lite_meta WHERE name = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
    tables = {name for (name,) in rows(db_path, "SELECT name FROM sqlite_master")}
    assert {
        "channels_lite_meta",
        "channels_lite_messages",
        "channels_lite_groups",
        "channels_lite_processes",
        "channels_lite_messages_key_id",
        "channels_lite_messages_channel_expires",
        "channels_lite_groups_key",
    } <= tables


async def test_table_prefixes_are_independent(db_path: Path) -> None:
    first = SQLiteDriver(path=db_path, table_prefix="one_")
    second = SQLiteDriver(path=db_path, table_prefix="two_")
    await first.open()
    await second.open()
    try:
        await first.push([env("c", b"for-one")], NOW)
        assert await second.claim([ClaimRequest("c", 10)], NOW) == []
        assert [c.payload for c in await first.claim([ClaimRequest("c", 10)], NOW)] == [b"for-one"]
    finally:
        await first.close()
        await second.close()
    names = {name for (name,) in rows(db_path, "SELECT name FROM sqlite_master")}
    assert {"one_messages", "two_messages"} <= names
    assert not any(name.startswith("channels_lite_") for name in names)


async def test_newer_schema_refused(db_path: Path) -> None:
    first = SQLiteDriver(path=db_path)
    await first.open()
    await first.close()
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE channels_lite_meta SET value = '99' WHERE name = 'schema_version'")
    conn.commit()
    conn.close()
    threads = set(threading.enumerate())
    again = SQLiteDriver(path=db_path)
    with pytest.raises(DriverError) as info:
        await again.open()
    message = str(info.value)
    assert str(db_path) in message
    assert "99" in message
    assert f"up to {SCHEMA_VERSION}" in message
    assert set(threading.enumerate()) == threads
    await again.close()


async def test_reopening_never_waits_for_the_write_lock(
    driver: SQLiteDriver, db_path: Path
) -> None:
    # A long writer in another process must not stop new instances from starting.
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        late = SQLiteDriver(path=db_path, timeout=0.2)
        await late.open()
        await late.close()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def _exclusive_holder(db_path: Path) -> sqlite3.Connection:
    """A connection that keeps every other one from even reading the file (a WAL recovery
    or a TRUNCATE checkpoint does so briefly): opening needs to read it."""
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    return holder


async def test_opening_waits_out_a_file_held_longer_than_the_busy_handler(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening retries a busy file within the timeout, as every other call does (it raised
    "database is locked" after 50 ms, under load in the lifecycle tests)."""
    first = SQLiteDriver(path=db_path)
    await first.open()
    await first.close()
    caplog.set_level(logging.DEBUG, logger="channels_lite.drivers.sqlite")
    holder = _exclusive_holder(db_path)
    late = SQLiteDriver(path=db_path, timeout=30)
    opening = asyncio.ensure_future(late.open())
    try:
        deadline = time.monotonic() + 10
        while not any("while opening the database" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "opening never met the held file"
            assert not opening.done(), opening
            await asyncio.sleep(0.005)
    finally:
        holder.execute("COMMIT")
        holder.close()
    await asyncio.wait_for(opening, 10)
    assert await late.push([env("c", b"x")], NOW) == [True]
    await late.close()


async def test_opening_a_file_held_past_the_timeout_fails_clearly(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = SQLiteDriver(path=db_path)
    await first.open()
    await first.close()
    threads = set(threading.enumerate())
    holder = _exclusive_holder(db_path)
    try:
        late = SQLiteDriver(path=db_path, timeout=0.3)
        with pytest.raises(DriverError) as info:
            await late.open()
    finally:
        holder.execute("COMMIT")
        holder.close()
    message = str(info.value)
    assert str(db_path) in message and "opening the database" in message
    assert "CONFIG['timeout']" in message
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("retries exhausted" in r.getMessage() for r in warnings)
    assert set(threading.enumerate()) == threads  # every attempt's worker thread ended
    await late.open()  # the file is free now
    await late.close()


async def test_concurrent_first_opens_create_schema_once(db_path: Path) -> None:
    instances = [SQLiteDriver(path=db_path) for _ in range(4)]
    await asyncio.gather(*(i.open() for i in instances))
    try:
        await instances[0].push([env("c", b"x")], NOW)
        got = await instances[3].claim([ClaimRequest("c", 10)], NOW)
        assert [c.payload for c in got] == [b"x"]
    finally:
        await asyncio.gather(*(i.close() for i in instances))
    assert rows(db_path, "SELECT count(*) FROM channels_lite_meta") == [(1,)]


async def test_sqlite_too_old(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.34.1")
    instance = SQLiteDriver(path=db_path)
    with pytest.raises(DriverError) as info:
        await instance.open()
    assert "3.34.1" in str(info.value)
    assert "3.35.0" in str(info.value)
    assert str(db_path) in str(info.value)
    assert not db_path.exists()


async def test_storage_errors_are_wrapped(driver: SQLiteDriver, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    conn.execute("DROP TABLE channels_lite_messages")
    conn.commit()
    conn.close()
    with pytest.raises(DriverError) as info:
        await driver.push([env("c", b"x")], NOW)
    assert str(db_path) in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)


# ------------------------------------------------------------------------------------ locking


async def test_short_lock_is_retried_transparently(driver: SQLiteDriver, db_path: Path) -> None:
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    loop = asyncio.get_running_loop()
    released = loop.time() + 0.3
    loop.call_at(released, blocker.execute, "COMMIT")
    try:
        assert await driver.push([env("c", b"waited")], NOW) == [True]
        # It really waited for the other writer rather than slipping past it.
        assert loop.time() >= released
    finally:
        blocker.close()
    assert [c.payload for c in await driver.claim([ClaimRequest("c", 5)], NOW)] == [b"waited"]


async def test_claim_waits_for_lock_too(driver: SQLiteDriver, db_path: Path) -> None:
    await driver.push([env("c", b"x")], NOW)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    loop = asyncio.get_running_loop()
    loop.call_later(0.2, blocker.execute, "COMMIT")
    try:
        got = await driver.claim([ClaimRequest("c", 5)], NOW)
    finally:
        blocker.close()
    assert [c.payload for c in got] == [b"x"]


async def test_long_lock_gives_clear_error(db_path: Path) -> None:
    instance = SQLiteDriver(path=db_path, timeout=0.3)
    await instance.open()
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(DriverError) as info:
            await instance.push([env("c", b"x")], NOW)
        assert 0.25 <= time.monotonic() - started < 2.0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    message = str(info.value)
    assert str(db_path) in message
    assert "0.3 s" in message
    assert "CONFIG['timeout']" in message
    assert "database is locked" not in message
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    # All or nothing: the failed batch left no row behind, and the driver still works.
    assert rows(db_path, "SELECT count(*) FROM channels_lite_messages") == [(0,)]
    assert await instance.push([env("c", b"y")], NOW) == [True]
    await instance.close()


async def test_empty_claim_does_not_wait_for_lock(driver: SQLiteDriver, db_path: Path) -> None:
    # The read-only pre-check answers "nothing to claim" without the write lock.
    await driver.push([env("other", b"x")], NOW)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        fast = SQLiteDriver(path=db_path, timeout=0.2)
        await fast.open()
        try:
            assert await fast.claim([ClaimRequest("empty", 10)], NOW) == []
            assert await fast.claim([ClaimRequest("other", 10, frozenset({"other"}))], NOW) == []
        finally:
            await fast.close()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


async def test_claim_that_filled_its_limit_skips_the_next_precheck(
    driver: SQLiteDriver, prechecked: list[str]
) -> None:
    """A key whose claim filled its limit probably holds more: its next claim goes straight
    to the write transaction. A claim that came back short brings the read-only check back,
    and a wrong guess only costs an empty write transaction."""
    checked = prechecked
    await driver.push([env("q", b"%d" % n) for n in range(3)], NOW)
    assert [c.payload for c in await driver.claim([ClaimRequest("q", 2)], NOW)] == [b"0", b"1"]
    assert checked == ["q"]
    assert [c.payload for c in await driver.claim([ClaimRequest("q", 2)], NOW)] == [b"2"]
    assert checked == ["q"], "the claim after a full one checked first"
    assert await driver.claim([ClaimRequest("q", 2)], NOW) == []
    assert checked == ["q", "q"], "a short claim did not bring the check back"
    await driver.push([env("q", b"3")], NOW)
    assert [c.payload for c in await driver.claim([ClaimRequest("q", 1)], NOW)] == [b"3"]
    assert await driver.claim([ClaimRequest("q", 1)], NOW) == []  # the wrong guess: empty
    assert checked == ["q", "q", "q"]


# -------------------------------------------------------------------------------- concurrency


async def test_competing_claims_never_share_a_message(
    driver: SQLiteDriver, sibling: SQLiteDriver
) -> None:
    sent = [f"{i:05d}".encode() for i in range(600)]
    for start in range(0, len(sent), 200):
        await driver.push([env("work", p) for p in sent[start : start + 200]], NOW)
    got: list[bytes] = []
    while True:
        batches = await asyncio.gather(
            *(inst.claim([ClaimRequest("work", 7)], NOW) for inst in [driver, sibling] * 20)
        )
        for batch in batches:
            payloads = [c.payload for c in batch]
            assert len(payloads) <= 7
            assert payloads == sorted(payloads), "oldest first within one claim"
            got.extend(payloads)
        if not any(batches):
            break
    assert len(got) == len(sent)
    assert sorted(got) == sent


async def test_capacity_exact_under_concurrent_pushes(
    driver: SQLiteDriver, sibling: SQLiteDriver
) -> None:
    flags = await asyncio.gather(
        *(
            inst.push([env("full", f"{i}".encode(), capacity=25)], NOW)
            for i, inst in enumerate([driver, sibling] * 50)
        )
    )
    assert sum(flag for (flag,) in flags) == 25
    stats = await driver.stats(NOW, 10)
    assert stats.channels == {"full": 25}


async def test_batch_counts_its_own_envelopes(driver: SQLiteDriver) -> None:
    flags = await driver.push([env("c", b"1", capacity=2)] * 3 + [env("d", b"2", capacity=1)], NOW)
    assert flags == [True, True, False, True]


@pytest.mark.parametrize("excluded", [1, 40_000])
async def test_claim_exclude_any_size(driver: SQLiteDriver, excluded: int) -> None:
    # Far more names than SQLite allows parameters in one statement must still work.
    full = frozenset(f"p.k!{i}" for i in range(excluded))
    await driver.push([env("p.k!0", b"held", key="k!"), env("p.k!open", b"mine", key="k!")], NOW)
    got = await driver.claim([ClaimRequest("k!", 10, full)], NOW)
    assert [c.payload for c in got] == [b"mine"]
    assert await driver.claim([ClaimRequest("k!", 10, full)], NOW) == []
    assert [c.payload for c in await driver.claim([ClaimRequest("k!", 10)], NOW)] == [b"held"]


async def test_claim_returns_id_order_for_large_batches(driver: SQLiteDriver) -> None:
    # RETURNING order is unspecified; the driver sorts. Interleave keys to scatter the ids.
    await driver.push([env(f"c{i % 3}", f"{i:04d}".encode(), key="proc!") for i in range(900)], NOW)
    got = await driver.claim([ClaimRequest("proc!", 1000)], NOW)
    assert [c.payload for c in got] == [f"{i:04d}".encode() for i in range(900)]


async def test_claim_cancellation_never_loses_messages(driver: SQLiteDriver) -> None:
    sent = [f"{i:04d}".encode() for i in range(300)]
    await driver.push([env("c", p) for p in sent], NOW)
    rng = random.Random(1234)
    got: list[bytes] = []
    outcomes = {"returned": 0, "cancelled": 0}
    for _ in range(150):
        task = asyncio.create_task(driver.claim([ClaimRequest("c", 1)], NOW))
        for _ in range(rng.randrange(4)):
            await asyncio.sleep(0)
        task.cancel()
        try:
            got.extend(c.payload for c in await task)
            outcomes["returned"] += 1
        except asyncio.CancelledError:
            outcomes["cancelled"] += 1
    while batch := await driver.claim([ClaimRequest("c", 50)], NOW):
        got.extend(c.payload for c in batch)
    assert sorted(got) == sent
    assert len(got) == len(sent)
    assert outcomes["returned"] + outcomes["cancelled"] == 150


async def test_claim_cancelled_mid_transaction_returns_what_it_took(
    driver: SQLiteDriver, db_path: Path
) -> None:
    await driver.push([env("c", b"taken")], NOW)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    loop = asyncio.get_running_loop()
    conn = driver._conn
    assert conn is not None
    in_worker = threading.Event()
    await conn.run(  # the worker's connection belongs to the worker thread
        lambda raw: raw.set_trace_callback(
            lambda sql: in_worker.set() if sql == "BEGIN IMMEDIATE" else None
        ),
        doing="tracing",
    )
    task = asyncio.create_task(driver.claim([ClaimRequest("c", 5)], NOW))
    try:
        # Inline tries give up on the lock after INLINE_BUSY_WINDOW; then the worker thread
        # runs the claim, waiting for the lock inside its transaction. The cancel arrives
        # there; the lock then frees and the claim completes: its messages must come back,
        # not vanish.
        async with asyncio.timeout(10):
            while not in_worker.is_set():
                await asyncio.sleep(0.001)
        assert conn.inline_fallbacks == 1
        task.cancel()
        loop.call_later(0.01, blocker.execute, "COMMIT")
        got = await task
    finally:
        blocker.close()
    assert [c.payload for c in got] == [b"taken"]


async def test_claim_cancelled_while_locked_out_takes_nothing(
    driver: SQLiteDriver, db_path: Path
) -> None:
    await driver.push([env("c", b"stays")], NOW)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    task = asyncio.create_task(driver.claim([ClaimRequest("c", 5)], NOW))
    asyncio.get_running_loop().call_later(0.15, task.cancel)
    try:
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert [c.payload for c in await driver.claim([ClaimRequest("c", 5)], NOW)] == [b"stays"]


# ---------------------------------------------------------------------------------- lifecycle


async def test_close_is_idempotent_and_leaves_no_thread(db_path: Path) -> None:
    before = set(threading.enumerate())
    never_opened = SQLiteDriver(path=db_path)
    await never_opened.close()
    instance = SQLiteDriver(path=db_path)
    await instance.open()
    await instance.open()
    assert len(set(threading.enumerate()) - before) == 1
    await instance.push([env("c", b"x")], NOW)
    await instance.close()
    await instance.close()
    assert set(threading.enumerate()) == before


async def test_calls_after_close_raise_driver_error(db_path: Path) -> None:
    instance = SQLiteDriver(path=db_path)
    with pytest.raises(DriverError, match="not open"):
        await instance.push([env("c", b"x")], NOW)
    await instance.open()
    await instance.close()
    with pytest.raises(DriverError, match="not open"):
        await instance.claim([ClaimRequest("c", 1)], NOW)


async def test_reopen_after_close_keeps_data(db_path: Path) -> None:
    instance = SQLiteDriver(path=db_path)
    await instance.open()
    await instance.push([env("c", b"kept")], NOW)
    await instance.close()
    await instance.open()
    try:
        assert [c.payload for c in await instance.claim([ClaimRequest("c", 5)], NOW)] == [b"kept"]
    finally:
        await instance.close()


# ----------------------------------------------------------------- groups, purge, stats, liveness


async def test_group_add_sets_the_new_expiry(driver: SQLiteDriver) -> None:
    await driver.group_add("g", "c", "c", NOW + 10)
    await driver.group_add("g", "c", "c", NOW + 100)
    assert await driver.group_channels("g", NOW + 50) == ["c"]
    await driver.group_discard("g", "c")
    await driver.group_discard("g", "c")
    assert await driver.group_channels("g", NOW) == []


async def test_purge_keeps_leases_for_reaping(driver: SQLiteDriver, db_path: Path) -> None:
    await driver.push([env("x.b!1", b"dead", key="b!")], NOW)
    await driver.group_add("g", "x.b!1", "b!", LATER)
    await driver.heartbeat("b!", NOW + 5, NOW)
    # Purging after b!'s lease ran out must not forget b!: its rows have not expired yet.
    assert await driver.purge(NOW + 10) == 0
    assert await driver.heartbeat("a!", NOW + 100, NOW + 10) == ["b!"]
    assert rows(db_path, "SELECT count(*) FROM channels_lite_messages") == [(0,)]
    assert rows(db_path, "SELECT count(*) FROM channels_lite_groups") == [(0,)]
    assert rows(db_path, "SELECT key FROM channels_lite_processes") == [("a!",)]


async def test_liveness_reaps_rows_of_dead_keys_only(driver: SQLiteDriver, db_path: Path) -> None:
    await driver.push(
        [env("x.a!1", b"a", key="a!"), env("x.b!1", b"b", key="b!"), env("plain", b"p")], NOW
    )
    for channel, key in [("x.a!1", "a!"), ("x.b!1", "b!"), ("plain", "plain")]:
        await driver.group_add("g", channel, key, LATER)
    await driver.heartbeat("b!", NOW + 5, NOW)
    assert await driver.heartbeat("a!", NOW + 100, NOW + 6) == ["b!"]
    assert sorted(rows(db_path, "SELECT key FROM channels_lite_messages")) == [("a!",), ("plain",)]
    assert sorted(rows(db_path, "SELECT key FROM channels_lite_groups")) == [("a!",), ("plain",)]
    await driver.release("a!")
    assert rows(db_path, "SELECT key FROM channels_lite_messages") == [("plain",)]
    assert rows(db_path, "SELECT count(*) FROM channels_lite_processes") == [(0,)]


async def test_stats(driver: SQLiteDriver, db_path: Path) -> None:
    await driver.push([env("a", b"1")] * 3 + [env("b", b"2")], NOW)
    await driver.push(
        [Envelope(channel="c", key="c", payload=b"old", expires_at=NOW + 1, capacity=10)], NOW
    )
    await driver.group_add("g", "a", "a", LATER)
    await driver.group_add("h", "b", "b", NOW + 1)
    await driver.heartbeat("p!", LATER, NOW)
    snapshot = await driver.stats(NOW + 2, 1)
    assert snapshot.messages == 4
    assert snapshot.expired_messages == 1
    assert snapshot.channels == {"a": 3}
    assert snapshot.groups == {"g": 1}
    assert snapshot.processes == 1
    assert snapshot.storage_bytes is not None
    assert snapshot.storage_bytes >= db_path.stat().st_size > 0
    assert snapshot.extra["path"] == str(db_path)
    assert snapshot.extra["schema_version"] == SCHEMA_VERSION
    assert snapshot.extra["journal_mode"] == "wal"
    assert snapshot.extra["expired_memberships"] == 1
    none_listed = await driver.stats(NOW, 0)
    assert none_listed.channels == {}
    assert none_listed.groups == {}


async def test_flush_empties_all_tables_and_keeps_schema(
    driver: SQLiteDriver, db_path: Path
) -> None:
    await driver.push([env("c", b"x")], NOW)
    await driver.group_add("g", "c", "c", LATER)
    await driver.heartbeat("p!", LATER, NOW)
    await driver.flush()
    for table in ("messages", "groups", "processes"):
        assert rows(db_path, f"SELECT count(*) FROM channels_lite_{table}") == [(0,)]
    assert rows(db_path, "SELECT count(*) FROM channels_lite_meta") == [(1,)]


async def test_payload_is_bytes_exactly(driver: SQLiteDriver) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB holding every byte value, NULs included
    await driver.push([env("big", payload)], NOW)
    (got,) = await driver.claim([ClaimRequest("big", 1)], NOW)
    assert type(got.payload) is bytes
    assert got.payload == payload
