"""Fixtures shared by the SQLite driver's tests: a fresh file, an open driver, a sibling."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from channels_lite.drivers.sqlite import SQLiteDriver


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "layer.sqlite3"


@pytest.fixture
async def driver(db_path: Path) -> AsyncIterator[SQLiteDriver]:
    instance = SQLiteDriver(path=db_path, timeout=5.0)
    await instance.open()
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture
async def sibling(driver: SQLiteDriver) -> AsyncIterator[SQLiteDriver]:
    """Another instance on the same file, as another process would have."""
    instance = driver.sibling()
    await instance.open()
    try:
        yield instance
    finally:
        await instance.close()
