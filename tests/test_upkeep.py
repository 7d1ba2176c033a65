"""The layer purges expired data by itself, every ``purge_interval`` (core/upkeep.py).

Time is the layer's ``clock`` (a ManualClock) and the upkeep's timers are the test's (the
``manual_timers`` fixture): a round runs only when the test fires the timer it sleeps on, so the
schedule is read off exactly and nothing depends on how fast the machine is.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

from channels_lite import ChannelLayer
from channels_lite.conformance import ManualClock
from channels_lite.core import upkeep
from channels_lite.drivers.sqlite import SQLiteDriver

if TYPE_CHECKING:
    from conftest import ManualTimers

#: Whole seconds, exactly representable: ``start + interval - start`` is the interval exactly.
START = 1_000_000.0


def _stored(path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """The channels of the messages and the (group, channel) memberships in the file."""
    conn = sqlite3.connect(path)
    try:
        messages = [row[0] for row in conn.execute("SELECT channel FROM channels_lite_messages")]
        groups = [
            (row[0], row[1])
            for row in conn.execute("SELECT group_name, channel FROM channels_lite_groups")
        ]
    finally:
        conn.close()
    return sorted(messages), sorted(groups)


@pytest.fixture
def purges(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, int]]:
    """``(now, rows removed)`` of every purge the SQLite driver runs, in order."""
    calls: list[tuple[float, int]] = []
    original = SQLiteDriver.purge

    async def spy(self: SQLiteDriver, now: float) -> int:
        removed = await original(self, now)
        calls.append((now, removed))
        return removed

    monkeypatch.setattr(SQLiteDriver, "purge", spy)
    return calls


async def test_layer_purges_expired_rows_every_purge_interval_by_itself(
    tmp_path: Path,
    manual_timers: Callable[[ModuleType], ManualTimers],
    purges: list[tuple[float, int]],
) -> None:
    """No purge call anywhere: the layer's upkeep purges at its first use and then every
    ``purge_interval`` (default 30 s), removing expired messages and memberships from the
    SQLite file and nothing else."""
    timers = manual_timers(upkeep)
    path = tmp_path / "db.sqlite3"
    clock = ManualClock(START)
    # No purge_interval: the default applies.
    layer = ChannelLayer(driver="sqlite", path=str(path), clock=clock, expiry=10, group_expiry=20)
    try:
        await layer.send("short", {"n": 1})  # expires at START + 10
        await layer.group_add("g", "member")  # expires at START + 20
        # The first use started the upkeep: one purge at once (nothing expired), then it
        # sleeps for the whole interval.
        assert await timers.next_wait() == 30.0
        assert purges == [(START, 0)]

        clock.advance(25)
        await layer.send("later", {"n": 2})  # expires at START + 35
        # Both rows have expired, yet they stay until the interval is over: a round before
        # that does not purge, and sleeps for the rest of the interval.
        assert _stored(path) == (["later", "short"], [("g", "member")])
        timers.fire()
        assert await timers.next_wait() == 5.0
        assert purges == [(START, 0)]
        assert _stored(path) == (["later", "short"], [("g", "member")])

        clock.advance(6)
        timers.fire()
        assert await timers.next_wait() == 30.0
        assert purges == [(START, 0), (START + 31, 2)]
        assert _stored(path) == (["later"], [])
        assert timers.hinted == [False, False]
    finally:
        await layer.close()


async def test_purge_interval_sets_the_schedule(
    tmp_path: Path,
    manual_timers: Callable[[ModuleType], ManualTimers],
    purges: list[tuple[float, int]],
) -> None:
    """``purge_interval`` from CONFIG is the time between purges."""
    timers = manual_timers(upkeep)
    path = tmp_path / "db.sqlite3"
    clock = ManualClock(START)
    layer = ChannelLayer(driver="sqlite", path=str(path), clock=clock, expiry=1, purge_interval=4)
    try:
        await layer.send("c", {"n": 1})  # expires at START + 1
        assert await timers.next_wait() == 4.0
        clock.advance(4)
        timers.fire()
        assert await timers.next_wait() == 4.0
        assert purges == [(START, 0), (START + 4, 1)]
        assert _stored(path) == ([], [])
    finally:
        await layer.close()
