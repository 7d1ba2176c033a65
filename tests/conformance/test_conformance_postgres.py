"""The conformance suite against the ``postgres`` driver, on a real PostgreSQL server.

The server comes from ``CHANNELS_LITE_TEST_POSTGRES_DSN`` (``.ci/start-postgres.sh`` starts
one and exports it). Without it the tests skip locally, and fail when ``CI`` is set: in CI the
PostgreSQL driver must really be tested. Each test gets its own schema, dropped afterwards, so
parallel xdist workers never share tables.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from channels_lite.conformance import ConformanceTests

ENV = "CHANNELS_LITE_TEST_POSTGRES_DSN"


def postgres_dsn() -> str:
    dsn = os.environ.get(ENV)
    if dsn:
        return dsn
    if os.environ.get("CI"):
        pytest.fail(
            f"CI is set but {ENV} is not: the PostgreSQL driver must be tested in CI. "
            "Source .ci/start-postgres.sh before running the tests."
        )
    pytest.skip(f"no PostgreSQL server: set {ENV} (source .ci/start-postgres.sh to start one)")


def drop_schema(dsn: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


class TestPostgresDriver(ConformanceTests):
    @pytest.fixture
    def driver_options(self) -> Iterator[dict[str, Any]]:
        dsn = postgres_dsn()
        schema = f"cl_test_{uuid.uuid4().hex[:16]}"
        yield {"driver": "postgres", "dsn": dsn, "schema": schema, "pool_max": 4}
        drop_schema(dsn, schema)
