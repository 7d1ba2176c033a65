"""Scenarios inside one process and one event loop: each builds a fresh layer and closes it.

Every scenario returns a dict of metrics; ``rate`` is the headline number where there is one.
Times are ``time.perf_counter()``; untimed warm-up traffic opens connections and starts
background loops first, so the timed part measures steady state.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from bench.common import cancel, warm_receive
from bench.layers import build_layer, close_layer
from bench.sizes import Sizes
from bench.stats import percentile

logger = logging.getLogger("bench.inproc")

WARMUP = 20
#: How long to keep listening after the last expected message, to catch duplicates.
DUPLICATE_GRACE = 0.2
#: Give up waiting when nothing new arrived for this long (messages were lost).
STALL = 5.0

Scenario = Callable[[str, dict[str, Any], Sizes], Awaitable[dict[str, float]]]


@contextlib.asynccontextmanager
async def _layer(key: str, config: dict[str, Any]) -> AsyncIterator[Any]:
    layer = build_layer(key, config)
    try:
        yield layer
    finally:
        await close_layer(key, layer)


class _Progress:
    """Counts arrivals; ``wait`` returns when ``target`` arrived or nothing arrived for STALL."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.last = time.perf_counter()
        self._event = asyncio.Event()

    def hit(self, n: int = 1) -> None:
        self.count += n
        self.last = time.perf_counter()
        if self.count >= self.target:
            self._event.set()

    def reset(self, target: int) -> None:
        self.target, self.count = target, 0
        self._event.clear()

    async def wait(self) -> bool:
        while not self._event.is_set():
            seen = self.count
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), STALL)
            if not self._event.is_set() and self.count == seen:
                return False
        return True


async def pingpong(key: str, config: dict[str, Any], sizes: Sizes) -> dict[str, float]:
    """Round trips between two process-specific channels of one layer, one at a time."""
    async with _layer(key, config) as layer:
        ping, pong = await layer.new_channel(), await layer.new_channel()

        async def echo() -> None:
            while True:
                message = await layer.receive(ping)
                await layer.send(pong, message)

        task = asyncio.create_task(echo())
        try:
            for i in range(WARMUP):
                await layer.send(ping, {"type": "bench.ping", "i": i})
                await layer.receive(pong)
            start = time.perf_counter()
            for i in range(sizes.pingpong):
                await layer.send(ping, {"type": "bench.ping", "i": i})
                await layer.receive(pong)
            elapsed = time.perf_counter() - start
        finally:
            await cancel([task])
    return {"rate": sizes.pingpong / elapsed}


async def specific_throughput(key: str, config: dict[str, Any], sizes: Sizes) -> dict[str, float]:
    """One task sends N messages round-robin over C process-specific channels, one receiver each."""
    n, c = sizes.ps_messages, sizes.ps_channels
    async with _layer(key, config) as layer:
        channels = [await layer.new_channel() for _ in range(c)]
        for ch in channels:  # warm-up: every channel once
            await layer.send(ch, {"type": "bench.warm"})
            await layer.receive(ch)
        expected = [n // c + (1 if i < n % c else 0) for i in range(c)]
        done = _Progress(n)

        async def drain(ch: str, count: int) -> None:
            for _ in range(count):
                await layer.receive(ch)
                done.hit()

        tasks = [
            asyncio.create_task(drain(ch, k)) for ch, k in zip(channels, expected, strict=True)
        ]
        await asyncio.sleep(0)
        start = time.perf_counter()
        try:
            for i in range(n):
                await layer.send(channels[i % c], {"type": "bench.msg", "i": i})
            complete = await done.wait()
        finally:
            await cancel(tasks)
        if not done.count:
            raise RuntimeError(f"none of {n} messages arrived")
        elapsed = done.last - start
    return {"rate": done.count / elapsed, "lost": n - done.count if not complete else 0}


async def normal_receivers(key: str, config: dict[str, Any], sizes: Sizes) -> dict[str, float]:
    """One normal channel, R concurrent receivers in this process: exactly once?"""
    n = sizes.normal_messages
    channel = "bench.normal"
    async with _layer(key, config) as layer:
        await warm_receive(layer, channel)  # (for pubsub, this also subscribes)
        seen: set[int] = set()
        received = 0
        done = _Progress(n)

        async def receiver() -> None:
            nonlocal received
            while True:
                message = await layer.receive(channel)
                if message["type"] == "bench.warm":
                    continue
                received += 1
                if message["i"] not in seen:
                    seen.add(message["i"])
                    done.hit()

        tasks = [asyncio.create_task(receiver()) for _ in range(sizes.normal_receivers)]
        await asyncio.sleep(0.05)
        start = time.perf_counter()
        try:
            for i in range(n):
                await layer.send(channel, {"type": "bench.msg", "i": i})
            await done.wait()
            end = done.last
            await asyncio.sleep(DUPLICATE_GRACE)
        finally:
            await cancel(tasks)
    if not seen:
        raise RuntimeError(f"none of {n} messages arrived")
    return {
        "rate": len(seen) / (end - start),
        "duplicates": received - len(seen),
        "lost": n - len(seen),
    }


async def group_fanout(key: str, config: dict[str, Any], sizes: Sizes) -> dict[str, float]:
    """S group_sends to a group of M process-specific members; delay send -> receipt."""
    members, sends = sizes.group_members, sizes.group_sends
    group = "bench-group"
    async with _layer(key, config) as layer:
        channels = [await layer.new_channel() for _ in range(members)]
        for ch in channels:
            await layer.group_add(group, ch)
        delays: list[float] = []
        done = _Progress(members)

        async def member(ch: str) -> None:
            while True:
                message = await layer.receive(ch)
                now = time.perf_counter()
                if message["type"] == "bench.group":
                    delays.append(now - message["t"])
                done.hit()

        tasks = [asyncio.create_task(member(ch)) for ch in channels]
        try:
            await layer.group_send(group, {"type": "bench.warm", "t": 0.0})
            if not await done.wait():
                raise RuntimeError(f"warm-up group_send reached {done.count} of {members}")
            done.reset(members * sends)
            start = time.perf_counter()
            for s in range(sends):
                await layer.group_send(
                    group, {"type": "bench.group", "s": s, "t": time.perf_counter()}
                )
            complete = await done.wait()
        finally:
            await cancel(tasks)
    if not delays:
        raise RuntimeError(f"none of {sends} group messages arrived")
    return {
        "rate": done.count / (done.last - start),
        "p50_ms": percentile(delays, 50) * 1e3,
        "p99_ms": percentile(delays, 99) * 1e3,
        "lost": 0 if complete else members * sends - done.count,
    }


#: Pause before timing a growth point (see _settle).
SETTLE = 0.5


async def _settle() -> None:
    """Before timing a growth point, for every layer alike: a full collection, and a pause.

    Creating thousands of receiver tasks promotes them all; the timed pass would otherwise pay
    the full collection this set-up triggers (20-45 ms at 10,000 receivers, i.e. 10-20 us on
    each of 2,000 messages), which measures the harness's heap. The pause lets a layer finish
    what its first use started (opening storage, a first housekeeping round in a worker
    thread); a pass of 2,000 messages takes 30-100 ms, short enough for either to dominate it.
    """
    gc.collect()
    await asyncio.sleep(SETTLE)


async def growth_channels(key: str, config: dict[str, Any], sizes: Sizes, count: int) -> float:
    """Microseconds per message (send + receive) with ``count`` channels, each with a receiver."""
    m = sizes.growth_messages
    async with _layer(key, config) as layer:
        channels = [await layer.new_channel() for _ in range(count)]
        done = _Progress(1)

        async def receiver(ch: str) -> None:
            while True:
                await layer.receive(ch)
                done.hit()

        tasks = [asyncio.create_task(receiver(ch)) for ch in channels]
        try:
            await layer.send(channels[0], {"type": "bench.warm"})
            if not await done.wait():
                raise RuntimeError("warm-up message never arrived")
            done.reset(m)
            await _settle()
            start = time.perf_counter()
            for i in range(m):
                await layer.send(channels[i % count], {"type": "bench.msg", "i": i})
            if not await done.wait():
                raise RuntimeError(f"lost {m - done.count} of {m} messages")
            elapsed = done.last - start
        finally:
            await cancel(tasks)
    return elapsed / m * 1e6


async def growth_members(key: str, config: dict[str, Any], sizes: Sizes, count: int) -> float:
    """Microseconds per delivered message for group_send to ``count`` members."""
    sends = max(2, -(-sizes.growth_deliveries // count))
    group = "bench-growth"
    async with _layer(key, config) as layer:
        channels = [await layer.new_channel() for _ in range(count)]
        for ch in channels:
            await layer.group_add(group, ch)
        done = _Progress(count)

        async def receiver(ch: str) -> None:
            while True:
                await layer.receive(ch)
                done.hit()

        tasks = [asyncio.create_task(receiver(ch)) for ch in channels]
        try:
            await layer.group_send(group, {"type": "bench.warm"})
            if not await done.wait():
                raise RuntimeError("warm-up group_send never arrived")
            done.reset(sends * count)
            await _settle()
            start = time.perf_counter()
            for s in range(sends):
                await layer.group_send(group, {"type": "bench.group", "s": s})
            if not await done.wait():
                raise RuntimeError(f"lost {sends * count - done.count} of {sends * count}")
            elapsed = done.last - start
        finally:
            await cancel(tasks)
    return elapsed / (sends * count) * 1e6
