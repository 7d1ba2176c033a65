"""Group commit: concurrent sends on one event loop share one storage transaction.

A lone sender pushes straight through (no added latency). Senders that arrive while a push is
in flight queue up, and the next push carries all of them, in arrival order, so one writer's
messages keep their order and a burst of N sends costs a handful of transactions, not N.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..drivers.base import Driver, Envelope


class PushBatcher:
    def __init__(self, driver: Driver, clock: Callable[[], float]) -> None:
        self.driver = driver
        self.clock = clock
        self._busy = False
        self._queue: list[tuple[Envelope, asyncio.Future[bool]]] = []
        self._max = max(1, driver.features.max_batch)

    async def push(self, envelope: Envelope) -> bool:
        """Store one envelope; ``False`` when its channel is full."""
        if self._busy:
            future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            entry = (envelope, future)
            self._queue.append(entry)
            try:
                return await future
            except asyncio.CancelledError:
                if entry in self._queue:
                    # Not taken yet: it will never be stored.
                    self._queue.remove(entry)
                raise
        self._busy = True
        try:
            (stored,) = await self.driver.push([envelope], self.clock())
        finally:
            self._hand_over()
        return stored

    def _hand_over(self) -> None:
        if self._queue:
            asyncio.get_running_loop().create_task(self._drain())
        else:
            self._busy = False

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[: self._max], self._queue[self._max :]
                try:
                    flags = await self.driver.push([env for env, _ in batch], self.clock())
                except BaseException as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for (_, future), stored in zip(batch, flags, strict=True):
                    if not future.done():
                        future.set_result(stored)
        finally:
            self._busy = False
