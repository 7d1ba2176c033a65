"""The claim loop's peek path: this process's own messages handed on before they are removed.

The SQLite driver :class:`~channels_lite.drivers.base.Peeks`; another layer on the same file
plays the other process. What must hold: each message delivered once, removed from storage
soon after (at once when it only reached a buffer), never peeked for a normal channel, and a
failed removal never turns into a second delivery.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Collection, Hashable
from pathlib import Path
from typing import Any

import pytest

from channels_lite import ChannelLayer
from channels_lite.core import receiver
from channels_lite.core.held import Held
from channels_lite.core.naming import routing_key
from channels_lite.drivers.base import Claimed, ClaimRequest, DriverError
from channels_lite.drivers.sqlite import SQLiteDriver
from support import GUARD, until


@pytest.fixture
async def two_processes(tmp_path: Path) -> AsyncIterator[Callable[..., tuple[ChannelLayer, ...]]]:
    """``two_processes(**config)``: this process's layer and another one on the same file
    (playing another process), closed after the test."""
    made: list[ChannelLayer] = []

    def make(**config: Any) -> tuple[ChannelLayer, ...]:
        path = str(tmp_path / "db.sqlite3")
        pair = tuple(ChannelLayer(driver="sqlite", path=path, **config) for _ in range(2))
        made.extend(pair)
        return pair

    yield make
    for layer in reversed(made):
        await layer.close()


async def _round_trip(layer: ChannelLayer, other: ChannelLayer, channel: str, n: object) -> None:
    """``other`` sends to ``channel`` while a receiver of ``layer`` waits there."""
    waiting = asyncio.ensure_future(layer.receive(channel))
    await until(lambda: layer._claimer is not None, "a claim loop")
    await other.send(channel, {"n": n})
    assert await asyncio.wait_for(waiting, GUARD) == {"n": n}


async def _start_peeking(layer: ChannelLayer, other: ChannelLayer, channel: str) -> None:
    """The claim loop peeks once its last rounds handed every message straight to a waiting
    receiver: make those rounds happen."""
    for _ in range(receiver._DIRECT_BEFORE_PEEK):
        await _round_trip(layer, other, channel, "warm-up")
    await until(lambda: len(layer._held) == 0, "warm-up over")


async def _stored(layer: ChannelLayer, key: str) -> list[Claimed]:
    """What storage holds for ``key``, read by a fresh connection (a peek changes nothing)."""
    primary = layer._primary
    assert isinstance(primary, SQLiteDriver)
    probe = primary.sibling()
    await probe.open()
    try:
        return [
            message for _, message in await probe.peek([ClaimRequest(key, 1000)], time.time(), ())
        ]
    finally:
        await probe.close()


async def test_own_messages_are_peeked_delivered_once_and_removed(
    two_processes: Callable[..., tuple[ChannelLayer, ...]], sqlite_calls: dict[str, list[int]]
) -> None:
    layer, other = two_processes()
    channel = await layer.new_channel()
    for n in range(20):
        await _round_trip(layer, other, channel, n)
    await until(lambda: len(layer._held) == 0, "every delivered message removed")
    assert await _stored(layer, routing_key(channel)) == []
    # The first rounds claim (nothing says yet that messages come one at a time).
    direct = receiver._DIRECT_BEFORE_PEEK
    assert sum(sqlite_calls["claim"]) == direct
    assert sum(sqlite_calls["peek"]) == 20 - direct, "each other message came through a peek, once"
    assert sum(sqlite_calls["remove"]) >= 20 - direct
    # Nothing left to deliver a second time.
    late = asyncio.ensure_future(layer.receive(channel))
    await other.send(channel, {"n": "last"})
    assert await asyncio.wait_for(late, GUARD) == {"n": "last"}


async def test_normal_channels_are_claimed_never_peeked(
    two_processes: Callable[..., tuple[ChannelLayer, ...]], sqlite_calls: dict[str, list[int]]
) -> None:
    """Any process may claim a normal channel: a peek there could deliver a message twice."""
    layer, other = two_processes()
    waiting = asyncio.ensure_future(layer.receive("jobs"))
    await until(lambda: sqlite_calls["claim"] != [], "a first claim")
    await other.send("jobs", {"n": 1})
    assert await asyncio.wait_for(waiting, GUARD) == {"n": 1}
    assert sqlite_calls["peek"] == []


async def test_buffered_messages_are_removed_before_anyone_runs(
    two_processes: Callable[..., tuple[ChannelLayer, ...]], sqlite_calls: dict[str, list[int]]
) -> None:
    """A peek that hands messages to a buffer (nobody waits on that channel) removes them in
    the same round, as a claim would have: they stop counting against the channel's
    capacity before any sender can try again."""
    cap = receiver.PEEK_MIN_CAPACITY  # the smallest capacity whose messages are peeked
    layer, other = two_processes(capacity=cap)
    quiet, live = await layer.new_channel(), await layer.new_channel()
    await _start_peeking(layer, other, live)
    peeks_before = len(sqlite_calls["peek"])
    for n in range(cap):
        await other.send(quiet, {"n": n})
    await other.send(live, {"live": 1})
    assert await asyncio.wait_for(layer.receive(live), GUARD) == {"live": 1}
    assert sqlite_calls["peek"][peeks_before:][:1] == [cap + 1]
    assert await _stored(layer, routing_key(quiet)) == [], "the buffered ones still stored"
    for n in range(cap, 2 * cap):
        await other.send(quiet, {"n": n})  # room again: no ChannelFull
    got = [await asyncio.wait_for(layer.receive(quiet), GUARD) for _ in range(2 * cap)]
    assert got == [{"n": n} for n in range(2 * cap)]


async def test_a_failed_removal_is_retried_and_never_delivers_twice(
    two_processes: Callable[..., tuple[ChannelLayer, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = SQLiteDriver.remove
    failures = [2]

    async def flaky(self: SQLiteDriver, receipts: Collection[Hashable]) -> None:
        if failures[0]:
            failures[0] -= 1
            raise DriverError("storage is having a moment")
        await original(self, receipts)

    monkeypatch.setattr(SQLiteDriver, "remove", flaky)
    monkeypatch.setattr(receiver, "_RETRY_FIRST", 0.01)
    layer, other = two_processes()
    channel = await layer.new_channel()
    await _start_peeking(layer, other, channel)
    await _round_trip(layer, other, channel, 1)
    # While the removal keeps failing the message stays stored, and held: the next
    # receive waits for a new message instead of getting this one again.
    nxt = asyncio.ensure_future(layer.receive(channel))
    await other.send(channel, {"n": 2})
    assert await asyncio.wait_for(nxt, GUARD) == {"n": 2}
    await until(lambda: failures[0] == 0 and len(layer._held) == 0, "removal retried")
    assert await _stored(layer, routing_key(channel)) == []


async def _one_held(
    two_processes: Callable[..., tuple[ChannelLayer, ...]], monkeypatch: pytest.MonkeyPatch
) -> ChannelLayer:
    """A layer that peeked one message and handed it on, its removal an hour away."""
    monkeypatch.setattr(receiver, "REMOVE_AFTER", 3600.0)
    layer, other = two_processes()
    channel = await layer.new_channel()
    await _start_peeking(layer, other, channel)
    await _round_trip(layer, other, channel, 1)
    assert len(layer._held) == 1
    return layer


async def test_close_removes_what_is_still_held(
    two_processes: Callable[..., tuple[ChannelLayer, ...]],
    monkeypatch: pytest.MonkeyPatch,
    sqlite_calls: dict[str, list[int]],
) -> None:
    """A removal not yet due when the layer closes runs in close()."""
    layer = await _one_held(two_processes, monkeypatch)
    assert sqlite_calls["remove"] == []
    await layer.close()
    assert sqlite_calls["remove"] == [1]
    assert len(layer._held) == 0


async def test_flush_forgets_held_receipts(
    two_processes: Callable[..., tuple[ChannelLayer, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = await _one_held(two_processes, monkeypatch)
    await layer.flush()
    assert len(layer._held) == 0


def _message(n: int) -> Claimed:
    return Claimed(f"c!{n}", "c!", b"%d" % n, 1.0)


def test_held_takes_each_receipt_once() -> None:
    """Two peeks that saw the same message (two claim loops of one layer, on two event
    loops) deliver it once."""
    held = Held()
    receipts, generation = held.snapshot()
    assert receipts == frozenset()
    first = held.take([("r1", _message(1)), ("r2", _message(2))], generation)
    again = held.take([("r2", _message(2)), ("r3", _message(3))], generation)
    assert first == [_message(1), _message(2)]
    assert again == [_message(3)]
    assert held.pending() == ("r1", "r2", "r3")
    assert held.snapshot()[0] == frozenset({"r1", "r2", "r3"})


def test_held_refuses_a_peek_that_read_before_a_removal() -> None:
    """A peek that read storage before a removal committed may have seen a message that is
    gone now, whose receipt is no longer held: its whole result is refused."""
    held = Held()
    _, before = held.snapshot()
    assert held.take([("r1", _message(1))], before) == [_message(1)]
    _, during = held.snapshot()
    held.removed(("r1",))
    assert len(held) == 0
    assert held.take([("r1", _message(1))], during) is None
    _, after = held.snapshot()
    held.clear()
    assert held.take([("r2", _message(2))], after) is None
    assert held.take([("r2", _message(2))], held.snapshot()[1]) == [_message(2)]


async def test_roomy_channels_keep_the_removal_off_the_path(
    two_processes: Callable[..., tuple[ChannelLayer, ...]],
    sqlite_calls: dict[str, list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ping-pong between two processes with the default capacity: messages are removed after
    they were handed on (not in the claim loop's round), each delivered once. (At capacity 1
    they are removed in the round: the conformance suite's
    ``test_capacity_one_ping_pong_between_instances``.)"""
    layer, other = two_processes()
    mine, theirs = await layer.new_channel(), await other.new_channel()
    removals_in_round: list[int] = []
    original = receiver.ClaimLoop._remove_held

    async def spy(self: receiver.ClaimLoop) -> None:
        if asyncio.current_task() is self.task:
            removals_in_round.append(len(self._held))
        await original(self)

    monkeypatch.setattr(receiver.ClaimLoop, "_remove_held", spy)
    echoing = None
    try:

        async def echo() -> None:
            while True:
                await layer.send(theirs, await layer.receive(mine))

        echoing = asyncio.ensure_future(echo())
        for n in range(30):
            await other.send(mine, {"n": n})
            assert await asyncio.wait_for(other.receive(theirs), GUARD) == {"n": n}
        assert sum(sqlite_calls["peek"]) >= 20
        assert removals_in_round == []
    finally:
        if echoing is not None:
            echoing.cancel()
            await asyncio.gather(echoing, return_exceptions=True)
