"""Housekeeping: purge expired data, sweep local buffers, keep this process's lease alive.

One upkeep task per layer, on whichever loop last used the layer (restarted like the claim loop
when its loop stops). Correctness never depends on it: every read already ignores expired data;
this only bounds storage and memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..drivers.base import Driver, DriverError, SupportsLiveness
from .cadence import Wakeup
from .inbox import Inbox
from .ratelimit import RateLimitedLog

logger = logging.getLogger("channels_lite.core.upkeep")
#: A broken storage fails every round: one traceback per kind of failure every 5 minutes.
_failures = RateLimitedLog(logger, interval=300.0)


async def renew_lease(
    liveness: SupportsLiveness,
    key: str,
    now: float,
    process_timeout: float,
    *,
    stalled: float = 0.0,
) -> None:
    """Take or renew ``key``'s lease until ``now + process_timeout``, and reap the processes
    whose lease lapsed a whole ``process_timeout`` (plus ``stalled``) before ``now``.

    ``stalled``: how much later than planned this renewal comes after the previous one.
    """
    # Reap only leases that lapsed that long ago: after the database stalls (a lock held by a
    # stopped process, a suspended machine), every live process gets that long to renew before
    # anyone counts it dead. A stall longer than that delayed this process's own renewals as
    # much as everyone else's (their leases lapsed because nobody could renew): the reaping
    # horizon moves back by as much, and a dead process is reaped one round later instead.
    dead = await liveness.heartbeat(key, now + process_timeout, now - process_timeout - stalled)
    if dead:
        logger.info("channels-lite: reaped %d dead process(es): %s", len(dead), dead)


class Upkeep:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        driver: Driver,
        inbox: Inbox,
        clock: Callable[[], float],
        purge_interval: float,
        process_timeout: float,
        process_key: Callable[[], str | None],
        is_current: Callable[[Upkeep], bool],
    ) -> None:
        self.loop = loop
        self.driver = driver
        self.inbox = inbox
        self.clock = clock
        self.purge_interval = purge_interval
        self.process_timeout = process_timeout
        self._process_key = process_key
        self._is_current = is_current
        self._stopping = False
        self._wakeup = Wakeup(loop)
        self.task: asyncio.Task[None] = loop.create_task(self._run(), name="channels-lite upkeep")

    def alive(self) -> bool:
        return not self.task.done() and not self._stopping and self.loop.is_running()

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set_threadsafe()

    def wake(self) -> None:
        """Run a round now (a process just made its first channel: take a lease at once)."""
        self._wakeup.set_threadsafe()

    async def _run(self) -> None:
        liveness = self.driver if isinstance(self.driver, SupportsLiveness) else None
        # Renew the lease well inside the timeout so one slow round cannot expire it.
        beat_every = self.process_timeout / 4
        next_purge = next_beat = 0.0
        # When the last renewal that went through started (its ``now`` set the lease's end).
        last_beat: float | None = None
        while not self._stopping and self._is_current(self):
            now = self.clock()
            key = self._process_key() if liveness is not None else None
            if liveness is not None and key is not None and now >= next_beat:
                # Set before the call: a broken database must not turn this into a busy loop.
                next_beat = now + beat_every
                late = 0.0 if last_beat is None else max(0.0, now - last_beat - beat_every)
                try:
                    await renew_lease(liveness, key, now, self.process_timeout, stalled=late)
                    last_beat = now
                except DriverError:
                    _failures.exception(
                        "heartbeat", "channels-lite: renewing the process lease failed"
                    )
            if now >= next_purge:
                next_purge = now + self.purge_interval
                try:
                    removed = await self.driver.purge(now)
                except DriverError:
                    _failures.exception("purge", "channels-lite: purging expired data failed")
                else:
                    swept = self.inbox.sweep(now)
                    if removed or swept:
                        logger.debug("purged %d expired row(s), %d buffered", removed, swept)
            deadline = next_purge if key is None else min(next_purge, next_beat)
            await self._wakeup.wait(max(deadline - self.clock(), 0.05))
