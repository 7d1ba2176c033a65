"""The claim loop hands on what a change notification brought with it (``ClaimsReady``).

A driver whose notifications carry the message (the postgres driver's NOTIFY payload) lets
the core take it from inside the notification's call: the waiting receiver gets it in that
loop turn, before any claim round. Staged here with the memory driver, given a
``claim_ready`` by the ``at_hand`` fixture: messages the test puts "at hand" are what a
notification would have brought; the driver's ``claim`` serves them first too, as the postgres
driver's claim serves what notifications brought before it reads the table.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from channels_lite import ChannelLayer
from channels_lite.core.naming import routing_key
from channels_lite.core.receiver import ClaimLoop
from channels_lite.drivers.base import Claimed, ClaimRequest, ClaimsReady
from channels_lite.drivers.memory import MemoryDriver
from support import GUARD, until

_stores = itertools.count()


@dataclass
class AtHand:
    messages: dict[str, list[Claimed]] = field(default_factory=dict)
    ready_calls: int = 0
    claims: int = 0
    #: While not None, a claim blocks on it after taking what is at hand.
    gate: asyncio.Event | None = None
    fail: bool = False

    def put(self, layer: ChannelLayer, channel: str, message: dict[str, int]) -> None:
        payload = layer._codec.encode(message)
        claimed = Claimed(channel, routing_key(channel), payload, time.time() + 60)
        self.messages.setdefault(claimed.key, []).append(claimed)

    def take(self, requests: Sequence[ClaimRequest]) -> list[Claimed]:
        out: list[Claimed] = []
        for request in requests:
            queue = self.messages.get(request.key, [])
            mine = [m for m in queue if m.channel not in request.exclude][: request.limit]
            out.extend(mine)
            self.messages[request.key] = [m for m in queue if m not in mine]
        return out


@pytest.fixture
def at_hand(monkeypatch: pytest.MonkeyPatch) -> AtHand:
    state = AtHand()
    original = MemoryDriver.claim

    def claim_ready(
        self: MemoryDriver, requests: Sequence[ClaimRequest], now: float
    ) -> list[Claimed]:
        state.ready_calls += 1
        if state.fail:
            raise RuntimeError("claim_ready broke its contract")
        return state.take(requests)

    async def claim(
        self: MemoryDriver, requests: Sequence[ClaimRequest], now: float
    ) -> list[Claimed]:
        state.claims += 1
        served = state.take(requests)
        gate = state.gate
        if gate is not None:
            await gate.wait()
        return served + await original(self, requests, now)

    monkeypatch.setattr(MemoryDriver, "claim_ready", claim_ready, raising=False)
    monkeypatch.setattr(MemoryDriver, "claim", claim)
    return state


async def _idle_claim_loop(layer: ChannelLayer) -> ClaimLoop:
    """The claim loop once it waits between rounds with a receiver waiting (not parked)."""

    def idle() -> bool:
        claimer = layer._claimer
        return (
            claimer is not None
            and claimer.wakeup._sleeper is not None
            and not claimer.parked
            and not claimer._claiming
        )

    await until(idle, "the claim loop waiting between rounds")
    claimer = layer._claimer
    assert claimer is not None and isinstance(claimer.driver, ClaimsReady)
    return claimer


async def test_a_message_that_came_with_its_notification_skips_the_claim_round(
    at_hand: AtHand,
) -> None:
    layer = ChannelLayer(driver="memory", store=f"ready-{next(_stores)}", poll_interval=60)
    try:
        channel = await layer.new_channel()
        receipts: list[tuple[dict[str, object], int]] = []

        async def receive() -> None:
            message = await layer.receive(channel)
            receipts.append((message, at_hand.claims))

        receiver = asyncio.ensure_future(receive())
        claimer = await _idle_claim_loop(layer)
        claims = at_hand.claims
        at_hand.put(layer, channel, {"n": 1})
        claimer._on_change()  # what the driver calls for the notification
        await asyncio.wait_for(receiver, GUARD)
        # The receiver ran before the round the notification also woke.
        assert receipts == [({"n": 1}, claims)]
        assert at_hand.ready_calls == 1
    finally:
        await layer.close()


async def test_nothing_is_taken_at_once_while_a_claim_is_in_flight(at_hand: AtHand) -> None:
    """The claim in flight took older messages; what a notification brings meanwhile must not
    reach the receiver first."""
    layer = ChannelLayer(driver="memory", store=f"ready-{next(_stores)}", poll_interval=60)
    try:
        channel = await layer.new_channel()
        received: list[dict[str, object]] = []

        async def receive_two() -> None:
            for _ in range(2):
                received.append(await layer.receive(channel))

        receiver = asyncio.ensure_future(receive_two())
        claimer = await _idle_claim_loop(layer)
        gate = at_hand.gate = asyncio.Event()
        at_hand.put(layer, channel, {"n": 1})
        claims = at_hand.claims
        claimer.wake()
        await until(lambda: at_hand.claims > claims, "a claim in flight")
        assert claimer._claiming
        at_hand.put(layer, channel, {"n": 2})
        claimer._on_change()
        assert at_hand.ready_calls == 0
        at_hand.gate = None
        gate.set()
        await asyncio.wait_for(receiver, GUARD)
        assert received == [{"n": 1}, {"n": 2}]
    finally:
        await layer.close()


async def test_a_failing_claim_ready_is_logged_once_and_claims_carry_on(
    at_hand: AtHand, caplog: pytest.LogCaptureFixture
) -> None:
    layer = ChannelLayer(driver="memory", store=f"ready-{next(_stores)}", poll_interval=60)
    try:
        channel = await layer.new_channel()
        receiver = asyncio.ensure_future(layer.receive(channel))
        claimer = await _idle_claim_loop(layer)
        at_hand.fail = True
        at_hand.put(layer, channel, {"n": 1})
        with caplog.at_level(logging.ERROR, logger="channels_lite.core.receiver"):
            claimer._on_change()
            assert await asyncio.wait_for(receiver, GUARD) == {"n": 1}
            again = asyncio.ensure_future(layer.receive(channel))
            await _idle_claim_loop(layer)
            at_hand.put(layer, channel, {"n": 2})
            claimer._on_change()
            assert await asyncio.wait_for(again, GUARD) == {"n": 2}
        assert at_hand.ready_calls == 1
        failures = [r for r in caplog.records if "claim_ready" in r.getMessage()]
        assert len(failures) == 1 and failures[0].exc_info is not None
    finally:
        await layer.close()
