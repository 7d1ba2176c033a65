"""The claim loop's trust in "nothing stored for this key" (its ``clean`` set), and the
same-process fast path for normal channels that relies on it.

A change notification can come before the commit it announces is visible (SQLite writes the
WAL, then publishes the commit in its index; a loaded machine can deschedule the writer in
between). These tests stage that with the memory driver: its claims hide a pushed message until
the test reveals it, with no further notification.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from channels_lite import ChannelLayer
from channels_lite.core.naming import routing_key
from channels_lite.core.receiver import ClaimLoop
from channels_lite.drivers.base import Claimed, ClaimRequest, Driver, Envelope
from channels_lite.drivers.memory import MemoryDriver
from channels_lite.drivers.sqlite import SQLiteDriver
from support import GUARD, until

_stores = itertools.count()


@pytest.fixture
def hidden(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Keys whose messages claims do not see yet (a commit not visible to readers)."""
    keys: set[str] = set()
    original = MemoryDriver.claim

    async def claim(
        self: MemoryDriver, requests: Sequence[ClaimRequest], now: float
    ) -> list[Claimed]:
        return await original(self, [r for r in requests if r.key not in keys], now)

    monkeypatch.setattr(MemoryDriver, "claim", claim)
    return keys


async def _waiting_with_hidden_push(
    layer: ChannelLayer, hidden: set[str], message: dict[str, int]
) -> tuple[str, asyncio.Future[dict[str, object]], ClaimLoop, Driver]:
    """A receiver waits on a new process-specific channel of ``layer``; another connection to
    the same storage (another process) pushes ``message`` there, hidden from claims for now.
    Returns the channel, the receiver, the claim loop and that other connection (open). The
    claim loop's generation is 0 until it hears of the push (nothing else notifies here)."""
    channel = await layer.new_channel()
    key = routing_key(channel)
    receiver = asyncio.ensure_future(layer.receive(channel))
    await until(lambda: layer._claimer is not None, "a claim loop started")
    claimer = layer._claimer
    assert claimer is not None
    other = claimer.driver.sibling()
    await other.open()
    hidden.add(key)
    assert claimer._generation == 0
    envelope = Envelope(channel, key, layer._codec.encode(message), time.time() + 60, 100)
    assert await other.push([envelope], time.time()) == [True]
    return channel, receiver, claimer, other


async def test_late_visible_message_reaches_a_receiver_after_the_loop_parked(
    hidden: set[str],
) -> None:
    """Notified, but the claims find nothing for a while; the receiver leaves, the claim loop
    parks with the key taken for empty; the message becomes visible; a new receiver must
    still get it (before: it waited for the next send to that process, forever here)."""
    layer = ChannelLayer(driver="memory", store=f"claim-loop-{next(_stores)}")
    try:
        channel, first, claimer, other = await _waiting_with_hidden_push(layer, hidden, {"n": 1})
        key = routing_key(channel)
        await until(
            lambda: claimer._generation > 0 and key in claimer.clean,
            "the key taken for empty after the notification",
        )
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await until(lambda: claimer.parked, "the claim loop parked")
        hidden.discard(key)  # the commit is visible now; nobody is notified again
        assert await asyncio.wait_for(layer.receive(channel), GUARD) == {"n": 1}
        await other.close()
    finally:
        await layer.close()


async def test_key_not_taken_for_empty_right_after_a_notification(hidden: set[str]) -> None:
    """After a notification, the claim loop keeps looking (growing intervals, 62 ms in all)
    before it trusts that the key is empty, so a commit that becomes visible within that
    window reaches the waiting receiver without any further notification or poll."""
    layer = ChannelLayer(driver="memory", store=f"claim-loop-{next(_stores)}", poll_interval=60)
    try:
        channel, receiver, claimer, other = await _waiting_with_hidden_push(layer, hidden, {"n": 2})
        key = routing_key(channel)
        await asyncio.sleep(0.01)  # the first re-checks find nothing
        assert key not in claimer.clean
        hidden.discard(key)
        assert await asyncio.wait_for(receiver, GUARD) == {"n": 2}
        await other.close()
    finally:
        await layer.close()


async def test_normal_channel_send_goes_straight_to_a_waiting_local_receiver(
    tmp_path: Path, count_pushes: Callable[[type[Driver]], list[int]]
) -> None:
    """Storage holds nothing for the channel and a receiver of this process waits on it: the
    message is handed over without a storage round trip."""
    pushes = count_pushes(SQLiteDriver)
    layer = ChannelLayer(driver="sqlite", path=str(tmp_path / "db.sqlite3"))
    try:
        receiver = asyncio.ensure_future(layer.receive("jobs"))
        await until(lambda: layer._claimer is not None, "a claim loop started")
        claimer = layer._claimer
        assert claimer is not None
        await until(lambda: "jobs" in claimer.clean, "storage known empty for 'jobs'")
        await layer.send("jobs", {"n": 1})
        assert await asyncio.wait_for(receiver, GUARD) == {"n": 1}
        assert pushes == []
    finally:
        await layer.close()


@pytest.mark.parametrize("known_empty", [True, False], ids=["known-empty", "just-stored"])
async def test_normal_channel_burst_reaches_local_receivers_that_come_back(
    count_pushes: Callable[[type[Driver]], list[int]], known_empty: bool
) -> None:
    """A writer sending faster than one loop turn: each of its sends finds every receiver
    busy with the message before, yet they are back for more after one turn, so the burst
    goes to them without storage, each message once, in order per receiver. Also when the
    burst starts with the channel not known empty (this process just stored there): one loop
    turn lets the claim loop look, and the writer must not stay on the storage path (it did:
    it checked before the claim loop had run, every time)."""
    # The memory driver: a SQLite file can announce writes of this process's own worker
    # connection (upkeep), which rightly make the claim loop distrust "empty" for a moment.
    pushes = count_pushes(MemoryDriver)
    layer = ChannelLayer(driver="memory")
    got: list[list[int]] = [[], [], []]

    async def receive_forever(into: list[int]) -> None:
        while True:
            into.append((await layer.receive("jobs"))["n"])

    receivers = [asyncio.ensure_future(receive_forever(into)) for into in got]
    try:
        await until(lambda: layer._claimer is not None, "a claim loop started")
        claimer = layer._claimer
        assert claimer is not None
        await until(lambda: "jobs" in claimer.clean, "storage known empty for 'jobs'")
        if not known_empty:
            claimer.stored({"jobs"})
        for n in range(300):
            await layer.send("jobs", {"n": n})
        await until(lambda: sum(map(len, got)) == 300, "every message received")
        assert sorted(n for into in got for n in into) == list(range(300))
        assert all(into == sorted(into) for into in got)
        # Just stored: the first send finds the claim loop asleep (nothing woke it), stores
        # and wakes it; from the second on, the burst bypasses storage.
        assert pushes == ([] if known_empty else [1])
    finally:
        for task in receivers:
            task.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)
        await layer.close()


async def test_normal_channel_fast_path_never_overtakes_a_stored_message(
    tmp_path: Path,
) -> None:
    """A message already stored for the channel is received before one sent later by the same
    writer, whether that one went through storage or straight to the receiver."""
    layer = ChannelLayer(driver="sqlite", path=str(tmp_path / "db.sqlite3"))
    try:
        for round_ in range(20):
            await layer.send("jobs", {"n": (round_, 1)})  # nobody waits: stored
            receiver = asyncio.ensure_future(layer.receive("jobs"))
            await asyncio.sleep(0)  # the receiver waits now
            await layer.send("jobs", {"n": (round_, 2)})
            assert await asyncio.wait_for(receiver, GUARD) == {"n": [round_, 1]}
            second = await asyncio.wait_for(layer.receive("jobs"), GUARD)
            assert second == {"n": [round_, 2]}
    finally:
        await layer.close()


async def test_a_draining_claim_loop_defers_notifications_and_lets_them_through_to_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claims that keep finding messages defer change notifications (the next round claims
    anyway); before the loop waits it lets them through, so a commit by another process
    afterwards still wakes it. The safety-net poll is an hour here: only the notification
    can deliver the last message in time."""
    from channels_lite.core import receiver

    calls: list[bool] = []
    original = SQLiteDriver.defer_changes

    def spy(self: SQLiteDriver, defer: bool) -> None:
        calls.append(defer)
        original(self, defer)

    monkeypatch.setattr(SQLiteDriver, "defer_changes", spy)
    path = str(tmp_path / "db.sqlite3")
    layer = ChannelLayer(driver="sqlite", path=path, poll_interval=3600)
    other = ChannelLayer(driver="sqlite", path=path)
    try:
        burst = 2 * receiver._DEFER_AFTER
        for n in range(burst):
            await other.send("jobs", {"n": n})
        assert [await layer.receive("jobs") for _ in range(burst)] == [
            {"n": n} for n in range(burst)
        ]
        assert True in calls, "the claim loop never deferred while draining"
        waiting = asyncio.ensure_future(layer.receive("jobs"))
        claimer = layer._claimer
        assert claimer is not None
        await until(lambda: calls[-1] is False, "notifications let through before waiting")
        assert not waiting.done()
        await other.send("jobs", {"n": burst})
        assert await asyncio.wait_for(waiting, GUARD) == {"n": burst}
    finally:
        await other.close()
        await layer.close()


def _logging_round(
    method: Callable[..., Awaitable[list[Any]]], log: list[str]
) -> Callable[..., Awaitable[list[Any]]]:
    async def logged(*args: Any) -> list[Any]:
        log.append("start")
        got = await method(*args)
        log.append(f"end {len(got)}")
        return got

    return logged


def _rounds_without_news(log: list[str]) -> int:
    """Rounds that started after the last one that found a message with no notification
    since the round before them started (a round consumes the hints pending at its start)."""
    found = max(i for i, event in enumerate(log) if event == "end 1")
    start = max(i for i in range(found) if log[i] == "start")
    unexplained, news = 0, False
    for event in log[start + 1 :]:
        if event == "news":
            news = True
        elif event == "start":
            unexplained += not news
            news = False
    return unexplained


async def test_a_claim_that_drained_every_key_is_not_repeated_at_once(
    tmp_path: Path, sqlite_calls: dict[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that found messages, but fewer than asked for every key, leaves nothing
    behind: the loop waits for news (a notification, a local push, a receiver coming back, a
    recheck) instead of claiming again right away, ahead of the receivers it just handed
    messages."""
    # Rounds for a process-specific channel may peek (the SQLite driver Peeks) or claim:
    # both count, in call order.
    claims = sqlite_calls["rounds"]
    # A change notification is news: on a loaded machine a later file event of the same
    # commit can arrive while the round that finds the message runs, and the loop rightly
    # looks again at once. So the rounds' starts and the notifications go in one log.
    log: list[str] = []
    on_change = ClaimLoop._on_change

    def noting(self: ClaimLoop) -> None:
        log.append("news")
        on_change(self)

    monkeypatch.setattr(ClaimLoop, "_on_change", noting)
    for name in ("peek", "claim"):
        monkeypatch.setattr(SQLiteDriver, name, _logging_round(getattr(SQLiteDriver, name), log))
    path = str(tmp_path / "db.sqlite3")
    layer = ChannelLayer(driver="sqlite", path=path, poll_interval=3600)
    other = ChannelLayer(driver="sqlite", path=path)
    try:
        channel = await layer.new_channel()
        # Another consumer of this process keeps waiting throughout, as in any server.
        idle = asyncio.ensure_future(layer.receive(await layer.new_channel()))
        waiting = asyncio.ensure_future(layer.receive(channel))
        # The rounds that ran by the time the receiver's task finished (its done callbacks run
        # in the loop turn right after it).
        when_received: list[list[str]] = []
        waiting.add_done_callback(lambda _: when_received.append(list(log)))
        await until(lambda: bool(claims), "the first claim (nothing there yet)")
        await other.send(channel, {"n": 1})
        assert await asyncio.wait_for(waiting, GUARD) == {"n": 1}
        assert _rounds_without_news(when_received[0]) == 0, (
            f"an empty claim ran before the receiver got its message: {when_received[0]}"
        )
        after = len(claims)
        # A receiver coming back wakes it (the key is not known to be empty).
        again = asyncio.ensure_future(layer.receive(channel))
        await until(lambda: len(claims) > after, "a claim for the receiver that came back")
        await other.send(channel, {"n": 2})
        assert await asyncio.wait_for(again, GUARD) == {"n": 2}
        idle.cancel()
        await asyncio.gather(idle, return_exceptions=True)
    finally:
        await other.close()
        await layer.close()
