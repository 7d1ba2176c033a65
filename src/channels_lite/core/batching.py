"""Group commit: concurrent sends on one event loop share one storage transaction.

The first sender lets the loop turn once before it pushes, so that the senders ready to run in
that same turn join its transaction; a lone sender pays one loop iteration (microseconds, where
a transaction costs tens of them). Except after a quiet spell: a send that comes more than
:data:`QUIET` after the last push ended is most likely alone (a message now and then, where
latency is what counts), and pushes at once; if others do follow in that turn, they join the
next push. Senders that arrive while a push is in flight queue up, and
the next push carries all of them, in arrival order, so one writer's messages keep their order
and a burst of N sends costs a handful of transactions, not N. The turn matters most for drivers
that push without suspending (SQLite's inline path): without it nobody could ever join.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ..drivers.base import Driver, Envelope

#: Seconds without a push after which a sender skips the loop turn. A turn costs little on a
#: busy process but 30-50 us on one that just woke up (its first system calls are slow):
#: measured across processes at 200 msg/s, p50 0.87-0.89 ms without the turn, 0.90-0.99 ms
#: with it (three pairs of runs, this machine).
QUIET = 0.001


class PushBatcher:
    def __init__(self, driver: Driver, clock: Callable[[], float]) -> None:
        self.driver = driver
        self.clock = clock
        self._busy = False
        # time.monotonic() when the last push ended (vDSO: no system call).
        self._last_end = 0.0
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
            if time.monotonic() - self._last_end < QUIET:
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
        self._last_end = time.monotonic()
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
            self._last_end = time.monotonic()
            self._busy = False
