"""When the claim loop looks at storage: at once on a local send, backing off when idle.

The claim loop's timers are the test's (the ``manual_timers`` fixture): they go off only when a
test fires them, so the back-off schedule is read off exactly, and a receive that completes
while no timer was fired was woken by a hint, never by a poll. No sleeps, no timing thresholds.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from channels_lite import ChannelLayer
from channels_lite.core import receiver
from channels_lite.core.cadence import Backoff, Wakeup
from channels_lite.drivers.base import Claimed, ClaimRequest, Envelope
from channels_lite.drivers.memory import MemoryDriver
from support import GUARD, PlainMemoryDriver

if TYPE_CHECKING:
    from conftest import ManualTimers


# ------------------------------------------------------------------------------ Backoff


def test_backoff_doubles_from_floor_to_ceiling_and_stays_there() -> None:
    backoff = Backoff(0.05, 1.0)
    assert [backoff.next() for _ in range(8)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]


def test_backoff_reset_starts_again_from_the_floor() -> None:
    backoff = Backoff(0.002, 0.1)
    assert [backoff.next() for _ in range(9)] == [
        0.002,
        0.004,
        0.008,
        0.016,
        0.032,
        0.064,
        0.1,
        0.1,
        0.1,
    ]
    backoff.reset()
    assert [backoff.next() for _ in range(3)] == [0.002, 0.004, 0.008]


def test_backoff_reset_midway() -> None:
    backoff = Backoff(0.05, 1.0)
    assert [backoff.next() for _ in range(3)] == [0.05, 0.1, 0.2]
    backoff.reset()
    assert [backoff.next() for _ in range(2)] == [0.05, 0.1]


def test_backoff_floor_above_ceiling_is_the_ceiling() -> None:
    """``poll_interval`` below the driver's floor: every wait is ``poll_interval``."""
    backoff = Backoff(0.05, 0.01)
    assert [backoff.next() for _ in range(3)] == [0.01, 0.01, 0.01]
    backoff.reset()
    assert backoff.next() == 0.01


# ------------------------------------------------------------------------------- Wakeup


async def test_wakeup_keeps_a_hint_that_came_while_nobody_slept() -> None:
    wakeup = Wakeup(asyncio.get_running_loop())
    wakeup.set()
    assert await asyncio.wait_for(wakeup.wait(None), GUARD) is True
    assert wakeup.consume() is False  # the wait took the hint


async def test_wakeup_hint_ends_a_wait_without_timeout() -> None:
    wakeup = Wakeup(asyncio.get_running_loop())
    waiting = asyncio.ensure_future(wakeup.wait(None))
    await asyncio.sleep(0)
    assert not waiting.done()
    wakeup.set()
    assert await asyncio.wait_for(waiting, GUARD) is True


async def test_wakeup_from_another_thread_ends_a_wait() -> None:
    wakeup = Wakeup(asyncio.get_running_loop())
    waiting = asyncio.ensure_future(wakeup.wait(None))
    await asyncio.sleep(0)
    await asyncio.to_thread(wakeup.set_threadsafe)
    assert await asyncio.wait_for(waiting, GUARD) is True


async def test_wakeup_timeout_reports_no_hint() -> None:
    wakeup = Wakeup(asyncio.get_running_loop())
    assert await asyncio.wait_for(wakeup.wait(0), GUARD) is False


# ------------------------------------------------------------------- claim loop cadence


@pytest.fixture
def timers(manual_timers: Callable[[ModuleType], ManualTimers]) -> ManualTimers:
    """The claim loop's timers, fired by the test only."""
    return manual_timers(receiver)


@pytest.fixture
def claims(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many messages each claim of the memory driver returned, in call order."""
    counts: list[int] = []
    original = MemoryDriver.claim

    async def spy(
        self: MemoryDriver, requests: Sequence[ClaimRequest], now: float
    ) -> list[Claimed]:
        got = await original(self, requests, now)
        counts.append(len(got))
        return got

    monkeypatch.setattr(MemoryDriver, "claim", spy)
    return counts


class PolledMemoryDriver(PlainMemoryDriver):
    """The memory driver without change notifications (a ``ChangeNotifier`` it is not): a
    driver the core has to poll, so no key is ever trusted to be empty and every normal-channel
    send goes through storage."""

    name: ClassVar[str] = "test-polled-memory"


def _polled_layer() -> ChannelLayer:
    store = f"test-cadence-{uuid.uuid4().hex}"
    return ChannelLayer(driver=f"{__name__}:PolledMemoryDriver", store=store)


async def _idle_schedule(timers: ManualTimers, rounds: int) -> list[float]:
    """Let the claim loop time out ``rounds`` times in a row; return the timeouts it chose."""
    schedule = []
    for _ in range(rounds):
        schedule.append(await timers.next_wait())
        timers.fire()
    return schedule


async def _stop(layer: ChannelLayer, tasks: list[asyncio.Future[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await layer.close()


@pytest.mark.parametrize(
    ("poll_interval", "expected"),
    [
        # README: with change notifications the safety-net poll backs off from 50 ms to
        # poll_interval, which defaults to 1 s.
        (None, [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]),
        (0.3, [0.05, 0.1, 0.2, 0.3, 0.3]),
    ],
)
async def test_idle_claim_loop_backs_off_and_a_message_resets_it(
    timers: ManualTimers,
    claims: list[int],
    poll_interval: float | None,
    expected: list[float],
) -> None:
    """While receivers wait and nothing comes, each safety-net poll waits twice as long as the
    last, up to ``poll_interval``; a message found drops it back to the floor."""
    config: dict[str, Any] = {"driver": "memory"}
    if poll_interval is not None:
        config["poll_interval"] = poll_interval
    layer = ChannelLayer(**config)
    idle = asyncio.ensure_future(layer.receive("idle"))
    jobs = asyncio.ensure_future(layer.receive("jobs"))
    try:
        schedule = await _idle_schedule(timers, len(expected) - 1)
        schedule.append(await timers.next_wait())
        assert schedule == expected
        # Every wait ended by its timer (no hint), and no claim found anything.
        assert timers.hinted == [False] * (len(expected) - 1)
        assert claims == [0] * len(expected)
        # Another writer stores a message without any notification (through the claim loop's
        # own driver instance, which does not notify itself): only the next poll finds it.
        claimer = layer._claimer
        assert claimer is not None
        payload = layer._codec.encode({"n": 1})
        stored = await claimer.driver.push(
            [Envelope("jobs", "jobs", payload, time.time() + 60, 100)], time.time()
        )
        assert stored == [True]
        timers.fire()
        assert await asyncio.wait_for(jobs, GUARD) == {"n": 1}
        assert claims[len(expected)] == 1  # the poll after the last timer found it
        # Idle again: the back-off starts over from the floor.
        assert await _idle_schedule(timers, 3) == expected[:3]
    finally:
        await _stop(layer, [idle, jobs])


async def test_idle_polled_driver_backs_off_to_its_ceiling_from_below_it(
    timers: ManualTimers, claims: list[int]
) -> None:
    """Without change notifications the poll is the only news of other processes' messages:
    it starts far below the 100 ms ceiling (README: 0.1 s without notifications) and doubles."""
    layer = _polled_layer()
    idle = asyncio.ensure_future(layer.receive("idle"))
    try:
        schedule = await _idle_schedule(timers, 10)
        floor = schedule[0]
        assert floor < 0.1
        assert schedule == [min(floor * 2**n, 0.1) for n in range(10)]
        assert schedule[-2:] == [0.1, 0.1]
    finally:
        await _stop(layer, [idle])


@pytest.mark.parametrize("kind", ["normal", "group", "process-specific"])
async def test_local_send_wakes_a_waiting_receive_without_any_timer(
    timers: ManualTimers, claims: list[int], kind: str
) -> None:
    """A send from this process reaches a receiver of this process that waits, while the claim
    loop sleeps on its poll timer, without that timer going off: the send itself wakes the
    claim loop (normal channels: through storage, since a polled driver's keys are never
    known empty) or hands the message over (own process-specific channels)."""
    layer = _polled_layer()
    channel = await layer.new_channel() if kind == "process-specific" else "jobs"
    if kind == "group":
        await layer.group_add("g", channel)
    waiting = asyncio.ensure_future(layer.receive(channel))
    try:
        # The claim loop looked (nothing there) and sleeps on its safety-net poll.
        await timers.next_wait()
        assert claims == [0]
        assert not waiting.done()
        if kind == "group":
            await layer.group_send("g", {"n": 1})
        else:
            await layer.send(channel, {"n": 1})
        assert await asyncio.wait_for(waiting, GUARD) == {"n": 1}
        assert timers.fired == 0
        if kind == "process-specific":
            # Handed straight to the receiver: storage was not involved.
            assert claims == [0]
        else:
            # The send woke the claim loop (a hint, not its timer) and one claim took it.
            assert timers.hinted == [True]
            assert claims == [0, 1]
    finally:
        await _stop(layer, [waiting])
