"""Group commit: concurrent sends on one loop share storage transactions, rules intact."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from channels.exceptions import ChannelFull

from channels_lite import ChannelLayer
from channels_lite.core import batching
from channels_lite.drivers.base import Driver, Envelope
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


@pytest.mark.parametrize("quiet", [True, False], ids=["after-a-quiet-spell", "right-after-a-push"])
async def test_loop_turn_before_a_push_only_when_others_may_join(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quiet: bool
) -> None:
    """A send right after another push lets the loop turn first (senders ready in that turn
    join it); a send after a quiet spell pushes at once (it is almost surely alone, and the
    turn would only add to its latency)."""
    order: list[str] = []
    original = SQLiteDriver.push

    async def spy(self: SQLiteDriver, envelopes: Sequence[Envelope], now: float) -> list[bool]:
        order.append("push")
        return await original(self, envelopes, now)

    layer = ChannelLayer(driver="sqlite", path=str(tmp_path / "db.sqlite3"))
    try:
        await layer.send("warm-up", {})  # the driver is open: no await before the push below
        monkeypatch.setattr(SQLiteDriver, "push", spy)
        loop = asyncio.get_running_loop()
        batcher = layer._drivers.state(loop).batcher(layer._clock)
        batcher._last_end = float("-inf") if quiet else time.monotonic() + batching.QUIET
        loop.call_soon(order.append, "loop turn")
        await layer.send("jobs", {"n": 1})
        assert order[0] == ("push" if quiet else "loop turn")
        assert (await layer.receive("jobs"))["n"] == 1
    finally:
        await layer.close()
