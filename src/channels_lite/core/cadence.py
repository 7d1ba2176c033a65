"""When to look at storage: at once on a hint, backing off when idle, never without a net.

Hints come from local sends, from new receivers, and from the driver's change notifications
(other processes). The safety-net poll doubles from ``floor`` up to ``ceiling`` while nothing
arrives and drops back to ``floor`` after any message: busy channels never wait on a timer, and
an idle process costs a handful of wake-ups a second at most.
"""

from __future__ import annotations

import asyncio


class Backoff:
    def __init__(self, floor: float, ceiling: float) -> None:
        self.floor = min(floor, ceiling)
        self.ceiling = ceiling
        self.current = self.floor

    def reset(self) -> None:
        self.current = self.floor

    def next(self) -> float:
        delay = self.current
        self.current = min(self.current * 2, self.ceiling)
        return delay


class Wakeup:
    """A level-triggered hint, owned by one loop; :meth:`set_threadsafe` works from any thread.

    Cheaper than ``asyncio.Event`` + ``wait_for`` (no task per wait), and a hint that arrives
    while nobody sleeps is kept for the next :meth:`wait`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending = False
        self._sleeper: asyncio.Future[None] | None = None

    def set(self) -> None:
        """Call on the owning loop."""
        self._pending = True
        sleeper = self._sleeper
        if sleeper is not None and not sleeper.done():
            sleeper.set_result(None)

    def set_threadsafe(self, running: asyncio.AbstractEventLoop | None = None) -> None:
        """``running``: the caller's running loop when it has it at hand (looking it up is a
        getpid() system call on Python 3.11); looked up otherwise."""
        if running is None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
        if running is self.loop:
            self.set()
            return
        try:
            self.loop.call_soon_threadsafe(self.set)
        except RuntimeError:
            # The owning loop is closed; whoever claims next starts a new claim loop.
            return

    def consume(self) -> bool:
        """Return whether a hint is pending, and clear it."""
        pending, self._pending = self._pending, False
        return pending

    async def wait(self, timeout: float | None) -> bool:
        """Sleep until a hint or ``timeout``; return whether a hint came."""
        if self._pending:
            self._pending = False
            return True
        sleeper = self.loop.create_future()
        self._sleeper = sleeper
        handle = None
        if timeout is not None:
            handle = self.loop.call_later(timeout, _resolve, sleeper)
        try:
            await sleeper
        finally:
            self._sleeper = None
            if handle is not None:
                handle.cancel()
        hinted = self._pending
        self._pending = False
        return hinted


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
