"""Fixtures shared by the SQLite driver's tests: a fresh file, an open driver, a sibling."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from channels_lite.conformance._support import opened
from channels_lite.drivers.base import ClaimRequest
from channels_lite.drivers.sqlite import SQLiteDriver, ops


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "layer.sqlite3"


@pytest.fixture
async def driver(db_path: Path) -> AsyncIterator[SQLiteDriver]:
    async with opened(SQLiteDriver(path=db_path, timeout=5.0)) as instance:
        yield instance


@pytest.fixture
async def sibling(driver: SQLiteDriver) -> AsyncIterator[SQLiteDriver]:
    """Another instance on the same file, as another process would have."""
    async with opened(driver.sibling()) as instance:
        yield instance


@pytest.fixture
def prechecked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys of every read-only pre-check of an SQLite claim (``ops.has_claimable``)."""
    checked: list[str] = []
    original = ops.has_claimable

    def spy(raw: sqlite3.Connection, t: object, request: ClaimRequest, now: float) -> bool:
        checked.append(request.key)
        return original(raw, t, request, now)  # type: ignore[arg-type]

    monkeypatch.setattr(ops, "has_claimable", spy)
    return checked
