"""One driver instance per event loop, closed with its loop.

Channels shares one layer between the server's loop and every loop ``async_to_sync`` makes.
Driver connections are loop-bound, so each loop gets its own sibling instance. ``loop.close`` is
wrapped so the instance is closed while the loop can still run it; loops that cannot be wrapped
(uvloop's) are found closed later and cleaned from whichever loop comes next.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable

from ..drivers.base import Driver, DriverError
from .batching import PushBatcher

logger = logging.getLogger("channels_lite.core.loops")


class LoopState:
    def __init__(self, loop: asyncio.AbstractEventLoop, driver: Driver) -> None:
        self.loop = loop
        self.driver = driver
        self.opened = False
        self._opening: asyncio.Lock | None = None
        self._batcher: PushBatcher | None = None

    def batcher(self, clock: Callable[[], float]) -> PushBatcher:
        if self._batcher is None:
            self._batcher = PushBatcher(self.driver, clock)
        return self._batcher

    async def ready(self) -> Driver:
        if self.opened:
            return self.driver
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if not self.opened:
                await self.driver.open()
                self.opened = True
        return self.driver


class LoopDrivers:
    """Maps each event loop to its :class:`LoopState`."""

    def __init__(
        self,
        primary: Driver,
        on_loop_close: Callable[[asyncio.AbstractEventLoop], Awaitable[None]],
    ) -> None:
        self._primary = primary
        self._states: dict[asyncio.AbstractEventLoop, LoopState] = {}
        self._lock = threading.Lock()
        self._on_loop_close = on_loop_close
        self._primary_taken = False

    def state(self, loop: asyncio.AbstractEventLoop) -> LoopState:
        state = self._states.get(loop)
        if state is not None:
            return state
        with self._lock:
            state = self._states.get(loop)
            if state is None:
                # The instance built (and validated) at construction serves the first loop.
                driver = self._primary if not self._primary_taken else self._primary.sibling()
                self._primary_taken = True
                state = LoopState(loop, driver)
                self._states[loop] = state
                self._hook(loop)
        return state

    async def driver(self, loop: asyncio.AbstractEventLoop) -> Driver:
        """The ready driver of ``loop``, the running loop."""
        if len(self._states) > 1:
            await self.reap_closed()
        return await self.state(loop).ready()

    def _hook(self, loop: asyncio.AbstractEventLoop) -> None:
        original = loop.close
        owner = weakref.ref(self)

        def close() -> None:
            drivers = owner()
            if drivers is not None and not loop.is_closed() and not loop.is_running():
                try:
                    loop.run_until_complete(drivers.close_loop(loop))
                except (DriverError, OSError, RuntimeError):
                    logger.exception("channels-lite: closing the driver of a closing loop failed")
            original()

        try:
            loop.close = close  # type: ignore[method-assign]
        except AttributeError:
            logger.debug("loop %r cannot be hooked; it is cleaned up after it closes", loop)

    async def close_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        await self._on_loop_close(loop)
        with self._lock:
            state = self._states.pop(loop, None)
        if state is not None:
            await state.driver.close()

    async def reap_closed(self) -> None:
        with self._lock:
            dead = [loop for loop in self._states if loop.is_closed()]
        for loop in dead:
            await self.close_loop(loop)

    def states(self) -> list[LoopState]:
        with self._lock:
            return list(self._states.values())

    async def close_all(self) -> None:
        """Close every loop's driver: the current loop's directly, others on their own loop."""
        current = asyncio.get_running_loop()
        for state in self.states():
            loop = state.loop
            if loop is current or loop.is_closed() or not loop.is_running():
                await self.close_loop(loop)
            else:
                future = asyncio.run_coroutine_threadsafe(self.close_loop(loop), loop)
                await asyncio.wrap_future(future)
