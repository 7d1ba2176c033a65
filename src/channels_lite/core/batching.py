"""Group commit: concurrent sends on one event loop share one storage transaction.

The first sender lets the loop turn once before it pushes, so that the senders ready to run in
that same turn join its transaction; a lone sender pays one loop iteration (microseconds, where
a transaction costs tens of them). Senders that arrive while a push is in flight queue up, and
the next push carries all of them, in arrival order, so one writer's messages keep their order
and a burst of N sends costs a handful of transactions, not N. The turn matters most for drivers
that push without suspending (SQLite's inline path): without it nobody could ever join.
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
            await asyncio.sleep(0)
            room = self._max - 1
            joined, self._queue = self._queue[:room], self._queue[room:]
            try:
                flags = await self.driver.push(
                    [envelope, *(env for env, _ in joined)], self.clock()
                )
            except asyncio.CancelledError:
                # Nothing was stored (Driver.push): the others go first in the next push.
                self._queue[:0] = joined
                raise
            except BaseException as exc:
                for _, future in joined:
                    if not future.done():
                        future.set_exception(exc)
                raise
            for (_, future), stored in zip(joined, flags[1:], strict=True):
                if not future.done():
                    future.set_result(stored)
        finally:
            self._hand_over()
        return flags[0]

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
