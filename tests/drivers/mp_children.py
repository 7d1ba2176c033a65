"""What the child processes of test_multiprocess.py run.

Kept apart from the test module so that a spawned child imports only asyncio, Channels and
channels-lite, not pytest (which would cost most of a second per child). Each coroutine here is
run by :func:`child_main` in a fresh interpreter (``spawn``) with its own
``ChannelLayer(driver="sqlite", path=...)`` on the shared file, and returns its report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

from channels.exceptions import ChannelFull

from channels_lite import ChannelLayer

#: Failure guard only: a normal run takes a few seconds. Generous, because CI machines run
#: several of these multi-process tests side by side (pytest-xdist) on two cores.
GUARD = 60.0

ChildFn = Callable[..., Awaitable[Any]]


@contextlib.asynccontextmanager
async def sqlite_layer(path: str, **config: Any) -> AsyncIterator[ChannelLayer]:
    layer = ChannelLayer(driver="sqlite", path=path, **config)
    try:
        yield layer
    finally:
        await layer.close()


def child_main(fn: ChildFn, results: Queue[Any], tag: str, args: tuple[Any, ...]) -> None:
    """Entry point of every child: run ``fn(*args)`` on a fresh loop and report the outcome."""
    try:
        value = asyncio.run(asyncio.wait_for(fn(*args), GUARD))
    except BaseException:
        results.put((tag, "error", traceback.format_exc()))
        raise SystemExit(1) from None
    results.put((tag, "ok", value))


async def _wait(barrier: Barrier) -> None:
    """Wait on a multiprocessing Barrier without blocking this process's event loop."""
    await asyncio.to_thread(barrier.wait, GUARD)


# -- (a) a normal channel: many writers, many readers -----------------------------------------

WORK = "work.queue"
WRITERS = 2
PER_WRITER = 300
READERS = 3
WORK_CAPACITY = WRITERS * PER_WRITER + READERS  # room for everything: no ChannelFull here


async def reader(path: str, barrier: Barrier) -> dict[str, Any]:
    """Receive until a stop sentinel.

    The core claims exactly one message per waiting receive on a normal channel (nothing idles
    in a process while another could take it), so a reader that stops after its first sentinel
    leaves the others for the other readers.
    """
    received: list[str] = []
    async with sqlite_layer(path, capacity=WORK_CAPACITY) as layer:
        await _wait(barrier)
        while True:
            message = await layer.receive(WORK)
            if message.get("stop"):
                return {"pid": os.getpid(), "ids": received}
            received.append(message["id"])


async def writer(path: str, barrier: Barrier, number: int) -> int:
    async with sqlite_layer(path, capacity=WORK_CAPACITY) as layer:
        await _wait(barrier)
        for seq in range(PER_WRITER):
            await layer.send(WORK, {"id": f"w{number}-{seq:04d}", "pad": b"\x00" * 64})
    return PER_WRITER


async def send_all(path: str, channel: str, messages: list[dict[str, Any]]) -> None:
    async with sqlite_layer(path, capacity=WORK_CAPACITY) as layer:
        for message in messages:
            await layer.send(channel, message)


# -- (b) process-specific channels -------------------------------------------------------------

SPECIFIC_COUNT = 20


async def specific_owner(path: str, names: Queue[Any]) -> dict[str, Any]:
    """Make a channel, publish its name, receive SPECIFIC_COUNT messages, answer the sender."""
    async with sqlite_layer(path) as layer:
        channel = await layer.new_channel("owner")
        names.put(channel)
        seqs: list[int] = []
        reply_to = None
        for _ in range(SPECIFIC_COUNT):
            message = await layer.receive(channel)
            seqs.append(message["seq"])
            reply_to = message["reply_to"]
            assert message["pid"] != os.getpid()
        assert reply_to is not None
        await layer.send(reply_to, {"type": "pong", "pid": os.getpid()})
        return {"pid": os.getpid(), "channel": channel, "seqs": seqs}


async def specific_sender(path: str, target: str) -> dict[str, Any]:
    async with sqlite_layer(path) as layer:
        own = await layer.new_channel("sender")
        for seq in range(SPECIFIC_COUNT):
            await layer.send(target, {"seq": seq, "reply_to": own, "pid": os.getpid()})
        reply = await layer.receive(own)
        return {"pid": os.getpid(), "reply": reply}


# -- (c) groups ----------------------------------------------------------------------------------

GROUP = "room"


async def group_member(path: str, barrier: Barrier) -> dict[str, Any]:
    async with sqlite_layer(path) as layer:
        channel = await layer.new_channel("member")
        await layer.group_add(GROUP, channel)
        await _wait(barrier)  # every member is in the group before anyone sends
        got = [await layer.receive(channel) for _ in range(2)]
        return {"pid": os.getpid(), "channel": channel, "got": got}


async def group_sender(path: str, barrier: Barrier) -> int:
    async with sqlite_layer(path) as layer:
        await _wait(barrier)
        for n in (1, 2):
            await layer.group_send(GROUP, {"type": "room.message", "n": n, "pid": os.getpid()})
    return os.getpid()


# -- (d) capacity ------------------------------------------------------------------------------

FULL = "capacity.channel"
CAPACITY = 50
SENDERS = 3
ATTEMPTS = 40  # per sender: 120 attempts in all for 50 places


async def hammer(path: str, barrier: Barrier, sender: int) -> dict[str, Any]:
    """Send ATTEMPTS messages at once (concurrent tasks) as soon as every sender is ready."""
    async with sqlite_layer(path, capacity=CAPACITY) as layer:

        async def attempt(seq: int) -> str | None:
            ident = f"s{sender}-{seq:03d}"
            try:
                await layer.send(FULL, {"id": ident})
            except ChannelFull:
                return None
            return ident

        await _wait(barrier)
        outcomes = await asyncio.gather(*(attempt(seq) for seq in range(ATTEMPTS)))
    stored = [ident for ident in outcomes if ident is not None]
    return {"stored": stored, "full": len(outcomes) - len(stored)}


async def drain(path: str, count: int) -> tuple[list[str], dict[str, Any]]:
    async with sqlite_layer(path, capacity=CAPACITY) as layer:
        drained = [(await layer.receive(FULL))["id"] for _ in range(count)]
        # One reader, FIFO: had more than ``count`` been stored, they would come out before
        # this marker.
        await layer.send(FULL, {"id": "marker"})
        after = await layer.receive(FULL)
    return drained, after
