"""Helpers shared by the in-process and cross-process scenarios."""

from __future__ import annotations

import asyncio
from typing import Any

WARM = {"type": "bench.warm"}


async def cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def warm_receive(layer: Any, channel: str, pause: float = 0.05) -> int:
    """Receive one warm-up message on ``channel``; returns how many warm-ups were sent.

    The receive starts first and a warm-up is re-sent until it lands: channels_redis pubsub
    drops what is published before its subscription (made inside ``receive``) is in place.
    Later receivers must skip the spare ``bench.warm`` messages a queueing layer keeps.
    """
    task = asyncio.create_task(layer.receive(channel))
    sent = 0
    try:
        while not task.done():
            await layer.send(channel, WARM)
            sent += 1
            await asyncio.wait({task}, timeout=pause)
            pause = min(pause * 2, 1.0)  # few spares for a slow (polling) layer
        task.result()
    finally:
        await cancel([task])
    return sent
