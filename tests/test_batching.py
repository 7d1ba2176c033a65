"""Group commit: concurrent sends on one loop share storage transactions, rules intact."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from channels.exceptions import ChannelFull

from channels_lite import ChannelLayer
from channels_lite.drivers.base import Driver
from channels_lite.drivers.sqlite import SQLiteDriver


async def test_concurrent_sends_share_transactions(
    tmp_path: Path, count_pushes: Callable[[type[Driver]], list[int]]
) -> None:
    batches = count_pushes(SQLiteDriver)
    layer = ChannelLayer(driver="sqlite", path=str(tmp_path / "db.sqlite3"), capacity=20)
    try:
        results = await asyncio.gather(
            *(layer.send("jobs", {"n": n}) for n in range(50)), return_exceptions=True
        )
        stored = [n for n, result in enumerate(results) if result is None]
        full = [r for r in results if isinstance(r, ChannelFull)]
        assert len(stored) == 20 and len(full) == 30  # capacity exact within batches
        assert sum(batches) == 50
        assert len(batches) < 50, batches  # fewer transactions than sends
        received = [(await layer.receive("jobs"))["n"] for _ in stored]
        assert received == stored  # arrival order is storage order
    finally:
        await layer.close()


async def test_cancelled_queued_send_is_not_stored(tmp_path: Path) -> None:
    layer = ChannelLayer(driver="sqlite", path=str(tmp_path / "db.sqlite3"))
    try:
        await layer.send("warm-up", {})  # the driver is open: no await before the push below
        first = asyncio.create_task(layer.send("jobs", {"n": 0}))
        await asyncio.sleep(0)  # one step: it becomes the leader, its push is in flight
        queued = asyncio.create_task(layer.send("jobs", {"n": 1}))
        await asyncio.sleep(0)  # one step: it is queued behind the leader
        queued.cancel()
        await first
        with pytest.raises(asyncio.CancelledError):
            await queued
        await layer.send("jobs", {"n": 2})
        assert (await layer.receive("jobs"))["n"] == 0
        assert (await layer.receive("jobs"))["n"] == 2
    finally:
        await layer.close()
