"""A normal-channel message claimed for a receiver that is cancelled goes back to storage."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from channels_lite import ChannelLayer
from channels_lite.drivers.sqlite import SQLiteDriver


@pytest.mark.parametrize("close_reader", [True, False])
async def test_cancelled_receiver_returns_claimed_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, close_reader: bool
) -> None:
    path = str(tmp_path / "db.sqlite3")
    sender = ChannelLayer(driver="sqlite", path=path)
    await sender.send("jobs", {"n": 1})

    reader = ChannelLayer(driver="sqlite", path=path)
    task = asyncio.create_task(reader.receive("jobs"))
    original = SQLiteDriver.claim

    async def claim_then_cancel(self: SQLiteDriver, requests: Any, now: float) -> Any:
        claimed = await original(self, requests, now)
        if claimed:
            task.cancel()  # the consumer is cancelled just as its message leaves storage
        return claimed

    monkeypatch.setattr(SQLiteDriver, "claim", claim_then_cancel)
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.setattr(SQLiteDriver, "claim", original)
    # Not kept in this process, where it could idle while another process's reader waits.
    assert reader.local_state()["buffered_channels"] == 0
    if close_reader:
        await reader.close()

    other = ChannelLayer(driver="sqlite", path=path)
    try:
        assert await asyncio.wait_for(other.receive("jobs"), 5) == {"n": 1}
        # Exactly once: nothing else is left for anyone.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.receive("jobs"), 0.2)
    finally:
        await other.close()
        await sender.close()
        await reader.close()
