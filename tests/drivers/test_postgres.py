"""What is specific to the ``postgres`` driver: options, errors, targeted LISTEN/NOTIFY,
reconnection (a dropped connection, a server restart mid-stream), schema creation races, and
several OS processes sharing one database.

The server comes from ``CHANNELS_LITE_TEST_POSTGRES_DSN`` (``.ci/start-postgres.sh``). Without
it the tests skip locally and fail when ``CI`` is set. The restart test starts a private server
of its own (so restarting it never disturbs tests running in parallel on the shared one), with
the binaries in ``CHANNELS_LITE_TEST_POSTGRES_BIN`` (default /usr/lib/postgresql/15/bin).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from channels_lite.drivers.base import (
    ChangeNotifier,
    ClaimRequest,
    DriverConfigError,
    DriverError,
    Envelope,
    SupportsLiveness,
    SupportsStats,
)
from channels_lite.drivers.postgres import PostgresDriver
from channels_lite.drivers.postgres.inbound import DELETE_FIRST_BELOW
from channels_lite.drivers.postgres.schema import SCHEMA_VERSION

ENV = "CHANNELS_LITE_TEST_POSTGRES_DSN"
NOW = 1_700_000_000.0
LATER = NOW + 3600.0
GUARD = 20.0


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so PostgreSQL tests must run, but {reason}")
    pytest.skip(reason)


def postgres_dsn() -> str:
    dsn = os.environ.get(ENV)
    if not dsn:
        _unavailable(f"no PostgreSQL server: set {ENV} (source .ci/start-postgres.sh)")
    assert dsn is not None
    return dsn


def _psycopg() -> Any:
    import psycopg

    return psycopg


def drop_schema(dsn: str, schema: str) -> None:
    with _psycopg().connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def sql(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with _psycopg().connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
def dsn() -> str:
    return postgres_dsn()


@pytest.fixture
def schema(dsn: str) -> Iterator[str]:
    name = f"cl_drv_{uuid.uuid4().hex[:16]}"
    yield name
    drop_schema(dsn, name)


@pytest.fixture
def opts(dsn: str, schema: str) -> dict[str, Any]:
    return {"dsn": dsn, "schema": schema}


@pytest_asyncio.fixture(loop_scope="function")
async def make_driver(opts: dict[str, Any]) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    made: list[PostgresDriver] = []

    async def factory(**overrides: Any) -> PostgresDriver:
        driver = PostgresDriver(**{**opts, **overrides})
        made.append(driver)
        await driver.open()
        return driver

    try:
        yield factory
    finally:
        for driver in reversed(made):
            await driver.close()


def env(channel: str, payload: bytes, *, key: str | None = None, capacity: int = 1000) -> Envelope:
    return Envelope(channel, channel if key is None else key, payload, LATER, capacity)


async def eventually(check: Callable[[], bool], what: str, within: float = GUARD) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------ options


def test_registered_without_importing_psycopg() -> None:
    """The driver is listed on installs without the extra; choosing it says what to install."""
    code = """
import sys
sys.modules["psycopg"] = None  # as if psycopg were not installed
from channels_lite.drivers.registry import available_drivers
from channels_lite.drivers.base import DriverConfigError
cls = available_drivers()["postgres"]
try:
    cls(dsn="postgresql://x@h/db")
except DriverConfigError as exc:
    print(exc.option, "|", exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    option, _, message = out.stdout.strip().partition(" | ")
    assert option == "driver"
    assert "pip install 'channels-lite[postgres]'" in message


def test_missing_psycopg_is_a_layer_configuration_error() -> None:
    code = """
import sys
sys.modules["psycopg"] = None
from channels_lite import ChannelLayer, ConfigurationError
try:
    ChannelLayer(driver="postgres", dsn="postgresql://x@h/db")
except ConfigurationError as exc:
    print(exc.key, "|", exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    key, _, message = out.stdout.strip().partition(" | ")
    assert key == "driver"
    assert "channels-lite[postgres]" in message


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({}, "dsn"),
        ({"dsn": "postgresql://h/db", "database": "default"}, "database"),
        ({"dsn": 5}, "dsn"),
        ({"database": ""}, "database"),
        ({"dsn": "postgresql://h/db", "schema": "bad-name"}, "schema"),
        ({"dsn": "postgresql://h/db", "schema": "x" * 64}, "schema"),
        ({"dsn": "postgresql://h/db", "table_prefix": "1abc"}, "table_prefix"),
        ({"dsn": "postgresql://h/db", "table_prefix": "p" * 40}, "table_prefix"),
        ({"dsn": "postgresql://h/db", "pool_min": -1}, "pool_min"),
        ({"dsn": "postgresql://h/db", "pool_max": 0}, "pool_max"),
        ({"dsn": "postgresql://h/db", "pool_min": 5, "pool_max": 2}, "pool_max"),
        ({"dsn": "postgresql://h/db", "pool_max": True}, "pool_max"),
        ({"dsn": "postgresql://h/db", "timeout": 0}, "timeout"),
        ({"dsn": "postgresql://h/db", "timeout": float("nan")}, "timeout"),
        ({"dsn": "postgresql://h/db", "timeout": "5"}, "timeout"),
        ({"dsn": "postgresql://h/db", "poolsize": 3}, "poolsize"),
    ],
)
def test_options_validated_eagerly_naming_the_option(options: dict[str, Any], option: str) -> None:
    with pytest.raises(DriverConfigError) as info:
        PostgresDriver(**options)
    assert info.value.option == option
    assert option in str(info.value)


def test_malformed_dsn_never_echoes_the_password() -> None:
    with pytest.raises(DriverConfigError) as info:
        PostgresDriver(dsn="host=h password=hunter2-secret = =")
    assert info.value.option == "dsn"
    assert "hunter2" not in str(info.value)


def test_describe_never_shows_the_password() -> None:
    driver = PostgresDriver(dsn="postgresql://app:hunter2-secret@db.example.com:6543/chat")
    assert "hunter2" not in driver.describe()
    assert "db.example.com:6543/chat" in driver.describe()
    sibling = driver.sibling()
    assert sibling.options == driver.options


@pytest.mark.asyncio
async def test_wrong_password_names_server_not_password(dsn: str) -> None:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    params["password"] = "definitely-wrong-pw-123"
    driver = PostgresDriver(dsn=make_conninfo("", **params), timeout=2)
    with pytest.raises(DriverError) as info:
        await driver.open()
    text = str(info.value)
    assert "definitely-wrong-pw-123" not in text
    assert str(params.get("host", "")) in text
    assert "password" in text  # the hint: check the user and password
    await driver.close()


@pytest.mark.asyncio
async def test_missing_database_hint(dsn: str) -> None:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    params["dbname"] = "no_such_db_for_channels_lite"
    driver = PostgresDriver(dsn=make_conninfo("", **params), timeout=2)
    with pytest.raises(DriverError, match="no_such_db_for_channels_lite"):
        await driver.open()


@pytest.mark.asyncio
async def test_server_down_fails_within_timeout() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    driver = PostgresDriver(dsn=f"postgresql://u:pw-xyz@127.0.0.1:{port}/db", timeout=1)
    started = time.monotonic()
    with pytest.raises(DriverError) as info:
        await driver.open()
    assert time.monotonic() - started < 10
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "pw-xyz" not in str(info.value)
    assert "running" in str(info.value)  # what to do: check the server runs


def test_django_database_alias(dsn: str, schema: str) -> None:
    """``database`` reuses a Django DATABASES entry, read when the driver opens."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    entry = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": params["dbname"],
        "USER": params.get("user", ""),
        "PASSWORD": params.get("password", ""),
        "HOST": params.get("host", ""),
        "PORT": params.get("port", ""),
        # Django-only keys must not reach libpq; libpq ones must.
        "OPTIONS": {"isolation_level": 1, "application_name": "cl-django-alias-test"},
    }
    code = f"""
import asyncio, json, time
import django
from django.conf import settings
settings.configure(DATABASES={{"pg": {entry!r}, "lite": {{"ENGINE": "django.db.backends.sqlite3",
    "NAME": ":memory:"}}}})
django.setup()
from channels_lite.drivers.base import ClaimRequest, DriverError, Envelope
from channels_lite.drivers.postgres import PostgresDriver

async def main():
    out = {{}}
    driver = PostgresDriver(database="pg", schema={schema!r})
    out["before"] = driver.describe()
    await driver.open()
    out["after"] = driver.describe()
    await driver.push([Envelope("c", "c", b"hi", time.time() + 60, 10)], time.time())
    got = await driver.claim([ClaimRequest("c", 10)], time.time())
    out["payloads"] = [m.payload.decode() for m in got]
    await driver.close()
    for alias in ("nope", "lite"):
        try:
            await PostgresDriver(database=alias, schema={schema!r}).open()
        except DriverError as exc:
            out[alias] = str(exc)
    print(json.dumps(out))

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "Django database 'pg'" in out["before"]
    assert str(params["dbname"]) in out["after"]
    assert out["payloads"] == ["hi"]
    assert "'nope'" in out["nope"]
    assert "pg" in out["nope"]  # lists the aliases there are
    assert "not PostgreSQL" in out["lite"]
    if params.get("password"):
        assert str(params["password"]) not in result.stdout


# ------------------------------------------------------------------------------ schema


@pytest.mark.asyncio
async def test_concurrent_first_opens_create_tables_once(opts: dict[str, Any]) -> None:
    from channels_lite.drivers.postgres import driver as driver_module

    driver_module._PREPARED.clear()
    drivers = [PostgresDriver(**opts) for _ in range(6)]
    try:
        await asyncio.gather(*(d.open() for d in drivers))
        for d in drivers:
            assert await d.push([env("c", b"x")], NOW) == [True]
        assert len(await drivers[0].claim([ClaimRequest("c", 100)], NOW)) == 6
    finally:
        for d in drivers:
            await d.close()
    rows = sql(opts["dsn"], f'SELECT value FROM "{opts["schema"]}".channels_lite_meta')
    assert rows == [(str(SCHEMA_VERSION),)]


@pytest.mark.asyncio
async def test_connections_count_in_read_committed(opts: dict[str, Any]) -> None:
    """A server or role defaulting to a stricter isolation level would make the capacity count
    use a snapshot from before the capacity lock: the driver's connections set READ COMMITTED."""
    sep = "&" if "?" in opts["dsn"] else "?"
    strict = f"{opts['dsn']}{sep}options=-c%20default_transaction_isolation%3Dserializable"
    driver = PostgresDriver(dsn=strict, schema=opts["schema"])
    await driver.open()
    try:
        levels = await driver._pool.run(
            lambda conn: _scalar(conn, "SHOW transaction_isolation"), doing="testing"
        )
        assert levels == "read committed"
        assert await driver.push([env("c", b"x", capacity=1)], NOW) == [True]
        assert await driver.push([env("c", b"y", capacity=1)], NOW) == [False]
    finally:
        await driver.close()


async def _scalar(conn: Any, query: str) -> Any:
    cursor = await conn.execute(query)
    row = await cursor.fetchone()
    return None if row is None else row[0]


@pytest.mark.asyncio
async def test_version_1_tables_are_upgraded_in_place(opts: dict[str, Any]) -> None:
    """Tables made by channels-lite 0.5.0 (schema 1, no push function) keep their messages
    and get the function when a newer process opens them."""
    from channels_lite.drivers.postgres import driver as driver_module

    first = PostgresDriver(**opts)
    await first.open()
    await first.push([env("c", b"kept")], NOW)
    await first.close()
    quoted = f'"{opts["schema"]}"'
    sql(opts["dsn"], f"DROP FUNCTION {quoted}.channels_lite_push_one")
    sql(opts["dsn"], f"UPDATE {quoted}.channels_lite_meta SET value = '1'")
    driver_module._PREPARED.clear()
    second = PostgresDriver(**opts)
    await second.open()
    try:
        assert await second.push([env("c", b"new", capacity=2)], NOW) == [True]
        assert await second.push([env("c", b"full", capacity=2)], NOW) == [False]
        got = await second.claim([ClaimRequest("c", 10)], NOW)
        assert [m.payload for m in got] == [b"kept", b"new"]
    finally:
        await second.close()
    assert sql(opts["dsn"], f"SELECT value FROM {quoted}.channels_lite_meta") == [
        (str(SCHEMA_VERSION),)
    ]


@pytest.mark.asyncio
async def test_newer_schema_refused(opts: dict[str, Any]) -> None:
    from channels_lite.drivers.postgres import driver as driver_module

    first = PostgresDriver(**opts)
    await first.open()
    await first.close()
    sql(
        opts["dsn"],
        f"UPDATE \"{opts['schema']}\".channels_lite_meta SET value = '99' "
        "WHERE name = 'schema_version'",
    )
    driver_module._PREPARED.clear()
    with pytest.raises(DriverError, match="schema version 99"):
        await PostgresDriver(**opts).open()


@pytest.mark.asyncio
async def test_prefixes_share_a_schema_without_mixing(make_driver: Any) -> None:
    one = await make_driver(table_prefix="one_")
    two = await make_driver(table_prefix="two_")
    await one.push([env("c", b"1")], NOW)
    assert await two.claim([ClaimRequest("c", 10)], NOW) == []
    assert [m.payload for m in await one.claim([ClaimRequest("c", 10)], NOW)] == [b"1"]


# ------------------------------------------------------------------------------ push, claim


@pytest.mark.asyncio
async def test_capacity_changing_inside_one_batch(make_driver: Any) -> None:
    """Envelopes of one channel with different capacities in one batch: same answer as one
    push at a time."""
    driver = await make_driver()
    caps = [5, 5, 2, 5, 1, 5, 3, 5]
    batch = [env("c", f"{i}".encode(), capacity=cap) for i, cap in enumerate(caps)]
    flags = await driver.push(batch, NOW)
    expected: list[bool] = []
    held = 0
    for cap in caps:
        expected.append(held < cap)
        held += held < cap
    assert flags == expected
    stored = await driver.claim([ClaimRequest("c", 100)], NOW)
    assert [m.payload for m in stored] == [f"{i}".encode() for i, ok in enumerate(flags) if ok]


@pytest.mark.asyncio
async def test_several_requests_with_exclusions_in_one_claim(make_driver: Any) -> None:
    """The many-request statement applies each request's own limit and exclusions."""
    driver = await make_driver()
    for i in range(6):
        await driver.push(
            [
                env(f"x.a!{'pq'[i % 2]}", f"a{i}".encode(), key="a!"),
                env(f"x.b!{'pq'[i % 2]}", f"b{i}".encode(), key="b!"),
                env("plain", f"n{i}".encode()),
            ],
            NOW,
        )
    got = await driver.claim(
        [
            ClaimRequest("a!", 2, frozenset({"x.a!p"})),
            ClaimRequest("b!", 10, frozenset({"x.b!q"})),
            ClaimRequest("plain", 1),
        ],
        NOW,
    )
    by_key: dict[str, list[bytes]] = {}
    for message in got:
        by_key.setdefault(message.key, []).append(message.payload)
    assert by_key == {"a!": [b"a1", b"a3"], "b!": [b"b0", b"b2", b"b4"], "plain": [b"n0"]}


@pytest.mark.asyncio
async def test_group_fan_out_is_one_round_trip(make_driver: Any) -> None:
    """A 1000-envelope push (a group_send) is one statement (locks, count, insert, notify):
    one network round trip, one transaction."""
    import psycopg

    driver = await make_driver()
    conn = await driver._pool.getconn(asyncio.get_running_loop().time() + 5, "test")
    batch = [env(f"member.{i}", b"x", key=f"proc{i % 7}!") for i in range(1000)]
    with tempfile.TemporaryFile("w+") as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            flags = await driver._ops.run_push(conn, batch, NOW, "test")
        finally:
            conn.pgconn.untrace()
            driver._pool.putconn(conn)
        trace.seek(0)
        sent = [line.split("\t")[2].strip() for line in trace if line.startswith("F\t")]
    assert flags == [True] * 1000
    assert sent.count("Execute") == 1
    assert sent.count("Sync") == 1
    # Nothing is read back before the Sync is sent: a Flush would mean a round trip.
    assert "Flush" not in sent[: sent.index("Sync")]


@pytest.mark.asyncio
async def test_claim_cancelled_mid_flight_never_loses(make_driver: Any) -> None:
    """Cancelling claims at many points: every message is returned exactly once, either by
    the cancelled call (which then returns instead of raising) or by a later one."""
    driver = await make_driver()
    total = 300
    for start in range(0, total, 100):
        await driver.push([env("c", f"{i}".encode()) for i in range(start, start + 100)], NOW)
    got: list[bytes] = []
    for attempt in range(200):
        task = asyncio.ensure_future(driver.claim([ClaimRequest("c", 3)], NOW))
        for _ in range(attempt % 7):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled():
            got.extend(m.payload for m in task.result())
    got.extend(m.payload for m in await driver.claim([ClaimRequest("c", 1000)], NOW))
    assert len(got) == len(set(got)) == total


async def _claim_cancelled_while_blocked(driver: PostgresDriver, *, server_cancels: bool) -> Any:
    """Cancel a claim whose DELETE waits on a table lock held elsewhere.

    With ``server_cancels`` the server's cancel request stops the statement; without, the
    "cancel request" releases the lock instead, so the statement completes (and commits) just
    as the caller is cancelled: the deterministic version of the race.
    """
    psycopg = _psycopg()
    blocker = await psycopg.AsyncConnection.connect(driver.dsn)
    try:
        await blocker.execute(
            f'LOCK TABLE "{driver.schema}".channels_lite_messages IN ACCESS EXCLUSIVE MODE'
        )
        conn = driver._pool._idle[-1][0]
        if not server_cancels:

            async def release_instead(timeout: float = 30.0) -> None:
                await blocker.commit()

            conn.cancel_safe = release_instead
        task = asyncio.ensure_future(driver.claim([ClaimRequest("c", 10)], NOW))
        await asyncio.sleep(0.3)
        assert not task.done(), "the claim should be waiting on the lock"
        task.cancel()
        await asyncio.wait({task}, timeout=GUARD)
        return task
    finally:
        with contextlib.suppress(Exception):
            del conn.cancel_safe
        await blocker.close()


@pytest.mark.asyncio
async def test_claim_cancelled_before_completing_removes_nothing(make_driver: Any) -> None:
    driver = await make_driver(pool_min=1, pool_max=1)
    await driver.push([env("c", b"1"), env("c", b"2")], NOW)
    task = await _claim_cancelled_while_blocked(driver, server_cancels=True)
    assert task.cancelled()
    got = await driver.claim([ClaimRequest("c", 10)], NOW)
    assert [m.payload for m in got] == [b"1", b"2"]


@pytest.mark.asyncio
async def test_claim_completing_as_it_is_cancelled_returns_its_messages(make_driver: Any) -> None:
    driver = await make_driver(pool_min=1, pool_max=1)
    await driver.push([env("c", b"1"), env("c", b"2")], NOW)
    task = await _claim_cancelled_while_blocked(driver, server_cancels=False)
    assert not task.cancelled(), "the claim removed messages: it must return them"
    assert [m.payload for m in task.result()] == [b"1", b"2"]
    assert await driver.claim([ClaimRequest("c", 10)], NOW) == []
    # The connection is still good for the next operation.
    assert await driver.push([env("c", b"3")], NOW) == [True]


@pytest.mark.asyncio
async def test_close_from_another_loop_after_its_loop_closed(opts: dict[str, Any]) -> None:
    """close() from another loop, once the driver's own loop is gone, still closes its sockets
    (the core does this for loops it could not hook)."""
    app = f"cl-close-{uuid.uuid4().hex[:8]}"
    dsn = f"{opts['dsn']}{'&' if '?' in opts['dsn'] else '?'}application_name={app}"
    driver = PostgresDriver(dsn=dsn, schema=opts["schema"], pool_min=2)
    listened = threading.Event()

    def in_thread() -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(driver.open())
            driver.add_change_listener(listened.set)
            loop.run_until_complete(asyncio.wait_for(asyncio.to_thread(listened.wait), GUARD))
        finally:
            loop.close()  # without closing the driver

    await asyncio.to_thread(in_thread)

    def count() -> int:
        rows = sql(
            opts["dsn"], "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", app
        )
        return int(rows[0][0])

    assert count() == 3  # two pooled, one listening
    await driver.close()
    await driver.close()
    await eventually(lambda: count() == 0, "the backends to go away")


# ------------------------------------------------------------------------------ notifications


@pytest.mark.asyncio
async def test_targeted_notify_wakes_only_the_listening_instance(make_driver: Any) -> None:
    from channels_lite.drivers.postgres.wakeups import key_channel

    a, b, sender = await make_driver(), await make_driver(), await make_driver()
    assert isinstance(a, ChangeNotifier)
    calls = {"a": 0, "b": 0}
    a.add_change_listener(lambda: calls.__setitem__("a", calls["a"] + 1))
    b.add_change_listener(lambda: calls.__setitem__("b", calls["b"] + 1))
    # Each instance learns its key from its own claims, as the core's claim loop does.
    await a.claim([ClaimRequest("proc-a!", 10)], NOW)
    await b.claim([ClaimRequest("proc-b!", 10)], NOW)
    namespace = a._ops.tables.namespace
    await eventually(
        lambda: (
            key_channel(namespace, "proc-a!") in a._listener.channels
            and key_channel(namespace, "proc-b!") in b._listener.channels
        ),
        "both instances to LISTEN on their key",
    )
    await eventually(lambda: calls["a"] and calls["b"], "the catch-up call after LISTEN")
    await asyncio.sleep(0.2)
    calls.update(a=0, b=0)

    await sender.push([env("specific.proc-a!x", b"1", key="proc-a!")], NOW)
    await eventually(lambda: calls["a"] > 0, "a's wake-up")
    await asyncio.sleep(0.3)
    assert calls["b"] == 0, "an instance that does not claim proc-a! was woken"

    # A group_send batch touching both keys wakes both, once each at most per read.
    calls.update(a=0, b=0)
    await sender.push(
        [
            env("specific.proc-a!y", b"2", key="proc-a!"),
            env("specific.proc-b!y", b"3", key="proc-b!"),
        ],
        NOW,
    )
    await eventually(lambda: calls["a"] > 0 and calls["b"] > 0, "both wake-ups")

    # Normal channels: any process may read them, so every listening instance hears them.
    calls.update(a=0, b=0)
    await sender.push([env("jobs", b"4")], NOW)
    await eventually(lambda: calls["a"] > 0 and calls["b"] > 0, "the shared wake-up")


@pytest.mark.asyncio
async def test_keys_not_claimed_any_more_are_unlistened(
    make_driver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from channels_lite.drivers.postgres import wakeups

    monkeypatch.setattr(wakeups, "PING_INTERVAL", 0.1)
    monkeypatch.setattr(wakeups, "KEY_IDLE", 0.3)
    driver = await make_driver()
    calls: list[int] = []
    driver.add_change_listener(lambda: calls.append(1))
    await driver.claim([ClaimRequest("gone!", 10)], NOW)
    channel = wakeups.key_channel(driver._ops.tables.namespace, "gone!")
    await eventually(lambda: channel in driver._listener.channels, "the LISTEN")
    calls.clear()
    await eventually(lambda: channel not in driver._listener.channels, "the UNLISTEN")
    # The core may still believe that key empty: dropping it calls the listeners once.
    assert calls
    assert wakeups.shared_channel(driver._ops.tables.namespace) in driver._listener.channels


@pytest.mark.asyncio
async def test_refused_push_notifies_nobody(make_driver: Any) -> None:
    a, sender = await make_driver(), await make_driver()
    calls: list[int] = []
    a.add_change_listener(lambda: calls.append(1))
    await a.claim([ClaimRequest("k!", 10)], NOW)
    await sender.push([env("x.k!1", b"1", key="k!", capacity=1)], NOW)
    await eventually(lambda: bool(calls), "the first wake-up")
    await asyncio.sleep(0.2)
    calls.clear()
    assert await sender.push([env("x.k!1", b"2", key="k!", capacity=1)], NOW) == [False]
    await asyncio.sleep(0.3)
    assert calls == []


@pytest.mark.asyncio
async def test_own_pushes_do_not_wake_own_listener(make_driver: Any) -> None:
    """An instance's NOTIFYs carry its token and its own listener skips them (the core hears
    of its own pushes directly); another instance's push still wakes it."""
    a, sender = await make_driver(), await make_driver()
    calls: list[int] = []
    a.add_change_listener(lambda: calls.append(1))
    await a.claim([ClaimRequest("k!", 10)], NOW)
    await eventually(lambda: bool(calls), "the catch-up call after LISTEN")
    await asyncio.sleep(0.2)
    calls.clear()
    before = a._listener.notifications
    await a.push([env("x.k!1", b"own", key="k!")], NOW)
    await a.push([env("jobs", b"own normal")], NOW)
    await sender.push([env("x.k!2", b"other", key="k!")], NOW)
    await eventually(lambda: bool(calls), "the other instance's wake-up")
    # Notifications arrive in commit order: a's own two came first and were skipped.
    assert a._listener.notifications == before + 1


@pytest.mark.asyncio
async def test_listener_reconnects_after_its_connection_is_killed(make_driver: Any) -> None:
    a, sender = await make_driver(), await make_driver()
    calls: list[int] = []
    a.add_change_listener(lambda: calls.append(1))
    await a.claim([ClaimRequest("k!", 10)], NOW)
    await eventually(lambda: a._listener._conn is not None and bool(calls), "the LISTEN")
    pid = a._listener._conn.info.backend_pid
    # Committed while nobody listens: the reconnect must call the listeners once anyway.
    sql(a.dsn, "SELECT pg_terminate_backend(%s)", pid)
    await sender.push([env("x.k!1", b"during", key="k!")], NOW)
    calls.clear()
    await eventually(lambda: a._listener.connects >= 2, "the reconnect")
    await eventually(lambda: bool(calls), "the call after reconnecting")
    assert a._listener._conn.info.backend_pid != pid
    calls.clear()
    await sender.push([env("x.k!1", b"after", key="k!")], NOW)
    await eventually(lambda: bool(calls), "a wake-up on the new connection")
    got = await a.claim([ClaimRequest("k!", 10)], NOW)
    assert [m.payload for m in got] == [b"during", b"after"]


# ------------------------------------------------- messages handed on from notifications


@pytest.fixture
def long_trust(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trust that outlasts a slow test: tests that count what was handed on from notifications
    must not see a key go back to the table after TRUST_TTL on a loaded machine."""
    from channels_lite.drivers.postgres import inbound

    monkeypatch.setattr(inbound, "TRUST_TTL", 3600.0)


async def _trusting(driver: Any, key: str) -> None:
    """Claim ``key`` until the driver serves it from notifications (see .inbound): LISTEN in
    place, then a drained claim of a key known to be a process key."""
    calls: list[int] = []
    driver.add_change_listener(lambda: calls.append(1))
    await driver.claim([ClaimRequest(key, 10)], NOW)
    await eventually(lambda: bool(calls), "the catch-up call after LISTEN")
    driver._inbound._process_keys.add(key)  # as after its first process-specific row
    await driver.claim([ClaimRequest(key, 10)], NOW)
    assert driver._inbound.trusts(key)


def _count_claims(driver: Any) -> list[int]:
    """Record every claim ``driver`` sends to the table (one entry each) from now on."""
    claims: list[int] = []
    run_claim = driver._ops.run_claim

    async def counting(*args: Any) -> Any:
        claims.append(1)
        return await run_claim(*args)

    driver._ops.run_claim = counting
    return claims


async def _claim_until(driver: Any, key: str, count: int, limit: int = 10) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + GUARD
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {got} of {count} arrived"
        got.extend(m.payload for m in await driver.claim([ClaimRequest(key, limit)], NOW))
        await asyncio.sleep(0.005)
    return got


def _stored(driver: Any) -> int:
    return int(sql(driver.dsn, f"SELECT count(*) FROM {driver._ops.tables.messages}")[0][0])


@pytest.mark.asyncio
async def test_sends_are_handed_on_from_their_notification_once_and_in_order(
    make_driver: Any, long_trust: None
) -> None:
    """A process-specific send carries its message in the NOTIFY: the claiming instance hands
    it on without a claim round trip, exactly once, in order, and deletes the row afterwards."""
    a, sender = await make_driver(), await make_driver()
    await _trusting(a, "k!")
    claims = _count_claims(a)
    for i in range(20):
        await sender.push([env(f"x.k!{i % 3}", f"{i}".encode(), key="k!")], NOW)
    got = await _claim_until(a, "k!", 20, limit=3)
    assert sorted(got, key=int) == [f"{i}".encode() for i in range(20)]
    for c in range(3):  # in order within each channel
        mine = [int(p) for p in got if int(p) % 3 == c]
        assert mine == sorted(mine)
    assert claims == [] and a._inbound.handed_on == 20
    # Both: the rows go at the DELETE's commit, the record of them once its reply is read.
    await eventually(
        lambda: _stored(a) == 0 and a._inbound.delivered.pending == 0,
        "the handed-on rows to be deleted",
    )
    # Nothing comes back, from the table or from late notifications.
    a._inbound.break_chain("k!")
    assert await a.claim([ClaimRequest("k!", 100)], NOW) == []


@pytest.mark.asyncio
async def test_per_message_statements_are_prepared_on_first_use(make_driver: Any) -> None:
    """psycopg prepares a statement after five runs by default: the first messages of every
    connection would wait for the server to parse and plan it. A send, a claim and a
    deletion are prepared the first time a connection runs them."""
    driver = await make_driver(pool_max=1)
    await driver.push([env("x.k!c", b"one", key="k!")], NOW)
    assert [m.payload for m in await driver.claim([ClaimRequest("k!", 10)], NOW)] == [b"one"]
    await driver._pool.run(lambda conn: driver._ops.run_delete(conn, [0]), doing="deleting nothing")

    async def prepared(conn: Any) -> list[str]:
        cursor = await conn.execute("SELECT statement FROM pg_prepared_statements")
        return [row[0] for row in await cursor.fetchall()]

    statements = await driver._pool.run(prepared, doing="reading prepared statements")
    tables = driver._ops.tables
    assert any(tables.push_one in text for text in statements), statements
    assert any("SKIP LOCKED" in text for text in statements), statements
    assert any(f"DELETE FROM {tables.messages} WHERE id = ANY" in text for text in statements)


@pytest.mark.asyncio
async def test_claim_ready_hands_on_what_notifications_brought_without_a_claim(
    make_driver: Any, long_trust: None
) -> None:
    """ClaimsReady: what notifications brought for a trusted key, at once and without I/O,
    exactly once across claim_ready and claim; nothing for a key not trusted, and nothing of
    a channel whose rows must be deleted before handing on (claim does that)."""
    a, sender = await make_driver(), await make_driver()
    await _trusting(a, "k!")
    claims = _count_claims(a)
    for i in range(3):
        await sender.push([env("x.k!c", f"{i}".encode(), key="k!")], NOW)
    await sender.push([env("x.u!c", b"untrusted", key="u!")], NOW)
    requests = [ClaimRequest("k!", 10), ClaimRequest("u!", 10)]
    got: list[bytes] = []

    def ready() -> bool:
        got.extend(m.payload for m in a.claim_ready(requests, NOW))
        return len(got) >= 3

    await eventually(ready, "three messages from their notifications")
    assert got == [b"0", b"1", b"2"] and claims == []
    assert a.claim_ready(requests, NOW) == []
    await sender.push([env("x.k!s", b"small", key="k!", capacity=DELETE_FIRST_BELOW - 1)], NOW)
    await eventually(lambda: bool(a._inbound._held.get("k!")), "the small channel's note")
    assert a.claim_ready(requests, NOW) == []
    assert claims == []
    # claim hands the small one on (deleting its row first); the untrusted key is claimed
    # from the table; nothing handed on at once comes back.
    got = [m.payload for m in await a.claim(requests, NOW)]
    assert sorted(got) == [b"small", b"untrusted"] and claims == [1]
    await eventually(lambda: _stored(a) == 0, "the handed-on rows to be deleted")
    a._inbound.break_chain("k!")
    assert await a.claim(requests, NOW) == []


@pytest.mark.asyncio
async def test_close_deletes_the_rows_handed_on_whose_deletion_was_still_due(
    make_driver: Any, long_trust: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of messages handed on from notifications are deleted by a timer a moment later;
    closing the driver before it fired deletes them there and then."""
    from channels_lite.drivers.postgres import driver as driver_module

    monkeypatch.setattr(driver_module, "DELETE_DELAY", 3600.0)
    a, sender = await make_driver(), await make_driver()
    await _trusting(a, "k!")
    await sender.push([env("x.k!c", b"one", key="k!")], NOW)
    assert await _claim_until(a, "k!", 1) == [b"one"]
    assert a._inbound.handed_on == 1 and _stored(sender) == 1
    await a.close()
    assert _stored(sender) == 0


@pytest.mark.asyncio
async def test_a_claim_answered_after_the_background_delete_drops_the_handed_on_row(
    make_driver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trust re-check claim locks a row just handed on before its background DELETE does:
    the DELETE waits, finds nothing, and its answer may be read before the claim's. Forced
    here by running the background deletion between the claim's statement and the reading
    of its rows. The claim's copy of the row must not be delivered a second time."""
    a, sender = await make_driver(), await make_driver()
    # Rows handed on are deleted only when this test says so.
    monkeypatch.setattr(a, "_schedule_deletes", lambda: None)
    await _trusting(a, "k!")
    await sender.push([env("x.k!1", b"first", key="k!")], NOW)
    got = await _claim_until(a, "k!", 1)
    assert got == [b"first"] and a._inbound.handed_on == 1
    assert _stored(a) == 1 and a._inbound.delivered.pending == 1
    await sender.push([env("x.k!1", b"second", key="k!")], NOW)
    await eventually(lambda: a._listener.notifications >= 2, "the second notification")
    run_claim = a._ops.run_claim

    async def delete_in_between(*args: Any) -> Any:
        rows = await run_claim(*args)
        await a._delete_handed_on()
        return rows

    a._ops.run_claim = delete_in_between
    a._inbound.break_chain("k!")  # as when trust lapses
    assert [m.payload for m in await a.claim([ClaimRequest("k!", 10)], NOW)] == [b"second"]
    assert _stored(a) == 0 and a._inbound.delivered.pending == 0
    # The second message's notification, read by now, is stale too.
    assert await a.claim([ClaimRequest("k!", 10)], NOW) == []


@pytest.mark.asyncio
async def test_answered_pings_keep_a_key_served_from_notifications(
    make_driver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While keys are trusted the listener pings every TRUST_TTL / 2 and each answer renews
    their trust: a message arriving long after the drained claim is still handed on from its
    notification, with no claim round trip in its way."""
    from channels_lite.drivers.postgres import inbound

    monkeypatch.setattr(inbound, "TRUST_TTL", 0.4)
    a, sender = await make_driver(), await make_driver()
    await _trusting(a, "k!")
    claims = _count_claims(a)
    start, pings = time.monotonic(), a._listener.pings
    # Three times the trust's lifetime, measured in answered pings.
    await eventually(lambda: a._listener.pings >= pings + 6, "six pings")
    assert time.monotonic() - start > inbound.TRUST_TTL
    await sender.push([env("x.k!1", b"late", key="k!")], NOW)
    assert await _claim_until(a, "k!", 1) == [b"late"]
    assert claims == [] and a._inbound.handed_on == 1


@pytest.mark.asyncio
async def test_a_notification_without_the_message_sends_the_key_back_to_the_table(
    make_driver: Any,
) -> None:
    """A batch push (group_send) and a payload too large for a NOTIFY announce without the
    message: the key is claimed from the table again, and order still holds."""
    from channels_lite.drivers.postgres.schema import NOTE_PAYLOAD_MAX

    a, sender = await make_driver(), await make_driver()
    await _trusting(a, "k!")
    big = b"B" * (NOTE_PAYLOAD_MAX + 1)
    await sender.push([env("x.k!1", b"1", key="k!")], NOW)
    await sender.push([env("x.k!1", b"2", key="k!"), env("x.k!1", b"3", key="k!")], NOW)
    await sender.push([env("x.k!1", big, key="k!")], NOW)
    await sender.push([env("x.k!1", b"5", key="k!")], NOW)
    await eventually(lambda: a._listener.notifications >= 4, "the four notifications")
    got = await _claim_until(a, "k!", 5, limit=100)
    assert got == [b"1", b"2", b"3", big, b"5"]
    a._inbound.break_chain("k!")
    assert await a.claim([ClaimRequest("k!", 100)], NOW) == []


@pytest.mark.asyncio
async def test_own_push_to_a_trusted_key_is_claimed_from_the_table(make_driver: Any) -> None:
    """An instance never hears its own NOTIFYs: its own push to a key it serves from
    notifications must send that key back to the table, or the message would wait."""
    a = await make_driver()
    await _trusting(a, "k!")
    await a.push([env("x.k!1", b"own", key="k!")], NOW)
    assert not a._inbound.trusts("k!")
    assert [m.payload for m in await a.claim([ClaimRequest("k!", 10)], NOW)] == [b"own"]


@pytest.mark.asyncio
async def test_messages_held_from_notifications_expire_and_respect_exclude(
    make_driver: Any, long_trust: None
) -> None:
    a, sender = await make_driver(), await make_driver()
    await _trusting(a, "k!")
    soon = Envelope("x.k!old", "k!", b"expires", NOW + 1.0, 1000)
    await sender.push([soon], NOW)
    await sender.push([env("x.k!full", b"f1", key="k!")], NOW)
    await sender.push([env("x.k!ok", b"ok", key="k!")], NOW)
    await sender.push([env("x.k!full", b"f2", key="k!")], NOW)
    await eventually(lambda: a._listener.notifications >= 4, "the notifications")
    request = ClaimRequest("k!", 10, exclude=frozenset({"x.k!full"}))
    got = await a.claim([request], NOW + 2.0)
    assert [m.payload for m in got] == [b"ok"]
    assert [m.payload for m in await a.claim([ClaimRequest("k!", 10)], NOW + 2.0)] == [
        b"f1",
        b"f2",
    ]
    assert a._inbound.handed_on == 3


@pytest.mark.asyncio
async def test_flush_elsewhere_drops_what_notifications_brought(
    make_driver: Any, long_trust: None
) -> None:
    a, sender = await make_driver(), await make_driver()
    await _trusting(a, "k!")
    await sender.push([env("x.k!1", b"before flush", key="k!")], NOW)
    await eventually(lambda: a._listener.notifications >= 1, "the notification")
    await sender.flush()
    await eventually(lambda: not a._inbound.trusts("k!"), "the flush notification")
    assert await a.claim([ClaimRequest("k!", 10)], NOW) == []


@pytest.mark.asyncio
async def test_two_instances_of_one_process_never_hand_on_one_message_twice(
    make_driver: Any,
) -> None:
    """The claim loop moves between event loops (driver instances) of one process: what one
    instance handed on, the other, hearing the same notifications, must not hand on again."""
    a, b, sender = await make_driver(), await make_driver(), await make_driver()
    assert a._inbound.delivered is b._inbound.delivered
    await _trusting(a, "k!")
    await _trusting(b, "k!")
    for i in range(10):
        await sender.push([env("x.k!1", f"{i}".encode(), key="k!")], NOW)
    await eventually(
        lambda: a._listener.notifications >= 10 and b._listener.notifications >= 10,
        "both instances to hear all ten",
    )
    got = [m.payload for m in await a.claim([ClaimRequest("k!", 4)], NOW)]
    got += [m.payload for m in await b.claim([ClaimRequest("k!", 100)], NOW)]
    got += [m.payload for m in await a.claim([ClaimRequest("k!", 100)], NOW)]
    assert got == [f"{i}".encode() for i in range(10)]
    # And from the table: what is still there (deletion pending) is recognised and dropped.
    for driver in (a, b):
        driver._inbound.break_chain("k!")
        assert await driver.claim([ClaimRequest("k!", 100)], NOW) == []


@pytest.mark.asyncio
async def test_a_replaced_listener_trusts_nothing_it_did_not_hear(make_driver: Any) -> None:
    """The core removes its change listener (its claim loop moved to another event loop) and
    adds one again later: what was sent in between was never heard, so no key stays trusted."""
    a, sender = await make_driver(), await make_driver()
    await _trusting(a, "k!")
    callbacks = list(a._listeners._callbacks)
    for callback in callbacks:
        a.remove_change_listener(callback)
    await eventually(lambda: a._listener is None, "the listener to stop")
    await sender.push([env("x.k!1", b"unheard", key="k!")], NOW)
    calls: list[int] = []
    a.add_change_listener(lambda: calls.append(1))
    await eventually(lambda: bool(calls), "the new listener's catch-up call")
    assert not a._inbound.trusts("k!")
    assert [m.payload for m in await a.claim([ClaimRequest("k!", 10)], NOW)] == [b"unheard"]


@pytest.mark.asyncio
async def test_listener_reconnect_breaks_every_chain(make_driver: Any) -> None:
    a, sender = await make_driver(), await make_driver()
    await _trusting(a, "k!")
    pid = a._listener._conn.info.backend_pid
    sql(a.dsn, "SELECT pg_terminate_backend(%s)", pid)
    await eventually(lambda: not a._inbound.trusts("k!"), "the lost connection")
    await sender.push([env("x.k!1", b"during", key="k!")], NOW)
    await eventually(lambda: a._listener.connects >= 2, "the reconnect")
    got = await _claim_until(a, "k!", 1)
    assert got == [b"during"]


@pytest.mark.asyncio
async def test_pooled_connection_killed_is_replaced_transparently(make_driver: Any) -> None:
    """A pooled connection the server dropped (idle) is noticed and replaced before use."""
    driver = await make_driver(pool_min=1, pool_max=1)
    await driver.push([env("c", b"1")], NOW)
    conn = driver._pool._idle[-1][0]
    sql(driver.dsn, "SELECT pg_terminate_backend(%s)", conn.info.backend_pid)
    await asyncio.sleep(0.1)
    assert await driver.push([env("c", b"2")], NOW) == [True]
    got = await driver.claim([ClaimRequest("c", 10)], NOW)
    assert [m.payload for m in got] == [b"1", b"2"]
    assert driver._pool.reconnects >= 1


@pytest.mark.asyncio
async def test_stats_and_liveness(make_driver: Any) -> None:
    driver = await make_driver()
    assert isinstance(driver, SupportsStats)
    assert isinstance(driver, SupportsLiveness)
    await driver.heartbeat("p!", NOW + 10, NOW)
    await driver.push([env("c", b"x")] * 3, NOW)
    stats = await driver.stats(NOW, 5)
    assert stats.messages == 3
    assert stats.processes == 1
    assert stats.storage_bytes and stats.storage_bytes > 0
    assert stats.extra["schema_version"] == SCHEMA_VERSION
    assert "password" not in json.dumps(dict(stats.extra), default=str)


# ------------------------------------------------------------------------------ OS processes

_RECEIVER = """
import asyncio, json, sys
from channels_lite import ChannelLayer

async def main(dsn, schema):
    layer = ChannelLayer(driver="postgres", dsn=dsn, schema=schema)
    got = []
    print("ready", flush=True)
    while True:
        message = await asyncio.wait_for(layer.receive("work"), 60)
        if message.get("stop"):
            break
        got.append(message["n"])
    await layer.close()
    print(json.dumps(got), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

_SENDER = """
import asyncio, json, sys
from channels.exceptions import ChannelFull
from channels_lite import ChannelLayer

async def main(dsn, schema, tag):
    layer = ChannelLayer(driver="postgres", dsn=dsn, schema=schema, capacity=50)
    accepted = 0
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    for n in range(40):
        try:
            await layer.send("race", {"tag": tag, "n": n})
            accepted += 1
        except ChannelFull:
            pass
    await layer.close()
    print(json.dumps(accepted), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
"""


async def _spawn(code: str, *args: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), GUARD * 3)
    if line.strip() != b"ready":
        stderr = await proc.stderr.read() if proc.stderr else b""
        raise AssertionError(f"child did not start: {line!r} {stderr.decode()[-2000:]}")
    return proc


async def _result(proc: asyncio.subprocess.Process) -> Any:
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), GUARD * 3)
        if not line:
            raise AssertionError(f"child failed: {(await proc.stderr.read()).decode()[-3000:]}")
        return json.loads(line)
    finally:
        with contextlib.suppress(ProcessLookupError):
            if proc.returncode is None:
                await asyncio.wait_for(proc.wait(), GUARD)


@pytest.mark.asyncio
async def test_three_processes_drain_a_normal_channel_exactly_once(opts: dict[str, Any]) -> None:
    from channels_lite import ChannelLayer

    children = [await _spawn(_RECEIVER, opts["dsn"], opts["schema"]) for _ in range(3)]
    sender = ChannelLayer(driver="postgres", capacity=5000, **opts)
    try:
        total = 600
        for n in range(total):
            await sender.send("work", {"n": n})
        for _ in children:
            await sender.send("work", {"stop": True})
        results = [await _result(child) for child in children]
    finally:
        await sender.close()
        for child in children:
            if child.returncode is None:
                child.kill()
    everything = [n for result in results for n in result]
    assert sorted(everything) == list(range(total)), "lost or duplicated messages"
    assert all(result == sorted(result) for result in results), "FIFO per receiver"
    assert sum(1 for result in results if result) >= 2, "only one process received anything"


@pytest.mark.asyncio
async def test_capacity_exact_with_three_sender_processes(opts: dict[str, Any]) -> None:
    children = [await _spawn(_SENDER, opts["dsn"], opts["schema"], f"p{i}") for i in range(3)]
    try:
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            await child.stdin.drain()
        accepted = [await _result(child) for child in children]
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
    assert sum(accepted) == 50
    driver = PostgresDriver(**opts)
    await driver.open()
    try:
        stored = await driver.claim([ClaimRequest("race", 1000)], time.time())
    finally:
        await driver.close()
    assert len(stored) == 50


# ------------------------------------------------------------------------------ restart


@dataclass
class PrivateServer:
    """A throwaway PostgreSQL cluster for one test, so restarting it disturbs nobody."""

    bin: str
    directory: str
    port: int
    runner: list[str]

    @property
    def dsn(self) -> str:
        return f"postgresql://cltest@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.runner, f"{self.bin}/pg_ctl", "-D", f"{self.directory}/data", *args],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=120,
        )

    def restart(self) -> None:
        # -l again: without it the new postmaster would keep pg_ctl's output pipe open.
        self.ctl("-l", f"{self.directory}/server.log", "-m", "fast", "-w", "restart")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def private_server(dsn: str) -> Iterator[PrivateServer]:
    binaries = os.environ.get("CHANNELS_LITE_TEST_POSTGRES_BIN", "/usr/lib/postgresql/15/bin")
    if not os.path.exists(f"{binaries}/initdb"):
        _unavailable(f"no PostgreSQL binaries in {binaries} to start a private server")
    runner: list[str] = []
    owner = None
    if os.geteuid() == 0:
        candidates = [os.environ.get("CHANNELS_LITE_TEST_POSTGRES_OWNER"), "postgres", "cltest"]
        for name in candidates:
            if not name:
                continue
            try:
                pwd.getpwnam(name)
            except KeyError:
                continue
            owner = name
            break
        if owner is None or shutil.which("runuser") is None:
            _unavailable("running as root without a 'postgres' or 'cltest' user to own a server")
        runner = ["runuser", "-u", str(owner), "--"]
    directory = tempfile.mkdtemp(prefix="cl-pg-private-")
    if owner is not None:
        shutil.chown(directory, user=owner)
    server = PrivateServer(binaries, directory, _free_port(), runner)
    try:
        subprocess.run(
            [
                *runner,
                f"{binaries}/initdb",
                "-D",
                f"{directory}/data",
                "-U",
                "cltest",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                # No fsync of the new cluster: a throwaway server, and the fsyncs of a whole
                # data directory stall the other tests' disk writes on a small machine.
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        server.ctl(
            "-l",
            f"{directory}/server.log",
            "-w",
            "-o",
            f"-c listen_addresses=127.0.0.1 -p {server.port} -k {directory} -c fsync=off",
            "start",
        )
        yield server
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            server.ctl("-m", "immediate", "-w", "stop")
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("kind", ["normal", "specific"])
@pytest.mark.asyncio
async def test_server_restart_mid_stream_loses_nothing(
    private_server: PrivateServer, kind: str
) -> None:
    """``pg_ctl restart`` while one process sends and another receives: every message whose
    send succeeded arrives exactly once, in order; the sends and receives made while the
    server is down wait for it instead of failing. On a process-specific channel the
    messages mostly travel in their notifications (see .inbound), whose LISTEN connection
    the restart breaks."""
    from channels_lite import ChannelLayer

    options = {"driver": "postgres", "dsn": private_server.dsn, "capacity": 100_000}
    sender = ChannelLayer(**options)
    receiver = ChannelLayer(**options)
    stream = "stream" if kind == "normal" else await receiver.new_channel()
    total = 300
    confirmed: list[int] = []
    uncertain: list[int] = []
    received: list[int] = []
    restarted = asyncio.Event()
    restarting: list[asyncio.Task[None]] = []

    async def produce() -> None:
        for n in range(total):
            if n == total // 3:
                restarting.append(asyncio.ensure_future(restart()))
            try:
                await sender.send(stream, {"n": n})
                confirmed.append(n)
            except DriverError:
                # Only a push whose connection died mid-commit may end up here: unknown
                # outcome, so it may or may not arrive (never twice).
                uncertain.append(n)
            await asyncio.sleep(0.003)
        await restarted.wait()
        await sender.send(stream, {"n": -1})

    async def restart() -> None:
        await asyncio.to_thread(private_server.restart)
        restarted.set()

    async def consume() -> None:
        while True:
            message = await asyncio.wait_for(receiver.receive(stream), GUARD)
            if message["n"] == -1:
                return
            received.append(message["n"])

    handed_on = 0
    try:
        await asyncio.wait_for(asyncio.gather(produce(), consume()), GUARD * 3)
        handed_on = (await receiver._driver())._inbound.handed_on
    finally:
        await sender.close()
        await receiver.close()
    assert restarted.is_set()
    assert (handed_on > 0) == (kind == "specific")
    assert min(received) < total // 3 < max(received), "the restart was not mid-stream"
    assert len(received) == len(set(received)), "a message arrived twice"
    assert set(confirmed) <= set(received), f"lost: {sorted(set(confirmed) - set(received))}"
    assert set(received) <= set(confirmed) | set(uncertain)
    assert received == sorted(received), "FIFO broken across the restart"
    assert len(uncertain) <= 2


@pytest.mark.asyncio
async def test_a_sibling_without_listener_drops_rows_already_handed_on(
    make_driver: Any, long_trust: None
) -> None:
    """One instance handed messages on from notifications (their rows not deleted yet); a
    sibling instance of the same process that claims without a listener must drop those rows,
    and what it claims must not be handed on again by the first."""
    a, b, sender = await make_driver(), await make_driver(), await make_driver()
    await _trusting(a, "k!")
    for i in range(4):
        await sender.push([env("x.k!1", f"{i}".encode(), key="k!")], NOW)
    await eventually(lambda: a._listener.notifications >= 4, "the notifications")
    first = [m.payload for m in await a.claim([ClaimRequest("k!", 2)], NOW)]
    assert first == [b"0", b"1"] and a._inbound.delivered.pending == 2
    # b has no change listener: it claims from the table, where rows 0 and 1 still are.
    assert b._listener is None
    rest = [m.payload for m in await b.claim([ClaimRequest("k!", 100)], NOW)]
    assert rest == [b"2", b"3"]
    # a still holds 2 and 3 from their notifications: they were delivered by b.
    assert await a.claim([ClaimRequest("k!", 100)], NOW) == []
