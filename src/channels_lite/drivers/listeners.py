"""Bookkeeping shared by drivers that implement :class:`~.base.ChangeNotifier`.

The core adds and removes listeners from synchronous code, so a driver's watcher (inotify,
LISTEN connection, pub/sub task) is stopped in the background; ``close()`` then awaits those
stops with :meth:`ChangeListeners.settle`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any


class ChangeListeners:
    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._callbacks: list[Callable[[], None]] = []
        self._stopping: set[asyncio.Task[None]] = set()

    def __bool__(self) -> bool:
        return bool(self._callbacks)

    def add(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def remove(self, callback: Callable[[], None]) -> bool:
        """Forget ``callback``; ``True`` when that left no listener (stop the watcher)."""
        try:
            self._callbacks.remove(callback)
        except ValueError:
            return False
        return not self._callbacks

    def notify(self) -> None:
        """Call every listener; one failing listener does not keep the others uninformed."""
        for callback in tuple(self._callbacks):
            try:
                callback()
            except Exception:
                self._logger.exception("change listener %r failed", callback)

    def stop_in_background(
        self, loop: asyncio.AbstractEventLoop, stop: Coroutine[Any, Any, None]
    ) -> None:
        task = loop.create_task(stop)
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def settle(self) -> None:
        """Wait for every background stop (called by the driver's ``close()``)."""
        while self._stopping:
            await asyncio.wait(set(self._stopping))

    def forget_stops(self) -> None:
        """Drop background stops whose loop is gone (closing from another loop)."""
        self._stopping.clear()
