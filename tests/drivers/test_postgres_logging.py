"""What the postgres driver logs when it gives up, and its rate limits.

The give-up on a lock needs a server (``CHANNELS_LITE_TEST_POSTGRES_DSN``, from
``.ci/start-postgres.sh``; skipped locally without one, a failure when ``CI`` is set). A server
that refuses connections and a malformed notification need none.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from channels_lite.core.ratelimit import RateLimitedLog
from channels_lite.drivers.base import DriverError
from channels_lite.drivers.postgres import inbound, pool
from channels_lite.drivers.postgres.options import dsn_target

ENV = "CHANNELS_LITE_TEST_POSTGRES_DSN"
LOGGER = "channels_lite.drivers.postgres"


def postgres_dsn() -> str:
    dsn = os.environ.get(ENV)
    if not dsn:
        reason = f"no PostgreSQL server: set {ENV} (source .ci/start-postgres.sh)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so PostgreSQL tests must run, but {reason}")
        pytest.skip(reason)
    return dsn


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


@pytest.fixture
def fresh_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Limiters of their own: a line another test wrote a moment ago (same server, same
    operation) must not hold this test's line back."""
    monkeypatch.setattr(pool, "_gave_up", RateLimitedLog(pool.logger, interval=60.0))
    monkeypatch.setattr(inbound, "_malformed", RateLimitedLog(inbound.logger, interval=60.0))


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A local port that refuses connections: bound (so nobody else takes it), not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.usefixtures("fresh_limits")
def test_malformed_notifications_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    for _ in range(50):
        assert inbound.parse_note("k!", "tok x !!! 1.0 100 ch") is None
    assert warnings(caplog) == ["channels-lite: ignoring a malformed message notification for 'k!'"]


@pytest.mark.usefixtures("fresh_limits")
async def test_server_unreachable_past_the_timeout_is_logged_once(
    refused_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    target = dsn_target(f"postgresql://clc@127.0.0.1:{refused_port}/clc", 0.3)
    for _ in range(2):
        connections = pool.Pool(target, min_size=1, max_size=2, timeout=0.3, name="test")
        with pytest.raises(DriverError) as info:
            await connections.open()  # connects, retrying while refused, until the timeout
        assert f"127.0.0.1:{refused_port}" in str(info.value)
        assert len(warnings(caplog)) == 1  # written before the error; the second is held back
    [line] = warnings(caplog)
    assert f"PostgreSQL at clc@127.0.0.1:{refused_port}/clc" in line
    assert "retries exhausted while connecting" in line
    assert "attempt(s) to connect" in line


@pytest.mark.usefixtures("fresh_limits")
async def test_lock_held_past_the_timeout_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A transient server error (a row lock another session holds: SQLSTATE 55P03) that lasts
    the whole timeout: one WARNING naming the server, the operation and the retries, then the
    DriverError."""
    dsn = postgres_dsn()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    table = f"clc_lock_{uuid.uuid4().hex[:12]}"
    target = dsn_target(dsn, 0.3)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as setup:
        await setup.execute(f"CREATE TABLE {table} (id int)")
        await setup.execute(f"INSERT INTO {table} VALUES (1)")
    connections = pool.Pool(target, min_size=1, max_size=2, timeout=0.3, name="test")
    await connections.open()

    async def lock_row(conn: Any) -> None:
        await conn.execute(f"SELECT id FROM {table} FOR UPDATE NOWAIT")

    try:
        async with await psycopg.AsyncConnection.connect(dsn) as holder:
            await holder.execute(f"SELECT id FROM {table} FOR UPDATE")  # held until rollback
            for _ in range(2):
                with pytest.raises(DriverError) as info:
                    await connections.run(lock_row, doing="locking a test row")
                assert "55P03" in str(info.value)
                assert len(warnings(caplog)) == 1
            await holder.rollback()
        await connections.run(lock_row, doing="locking a test row")  # free again
    finally:
        await connections.close()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as cleanup:
            await cleanup.execute(f"DROP TABLE IF EXISTS {table}")
    [line] = warnings(caplog)
    assert f"PostgreSQL at {target.where()}" in line
    assert "retries exhausted while locking a test row" in line
    assert "transient SQLSTATE 55P03 for the whole timeout of 0.3 s" in line
