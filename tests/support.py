"""Helpers shared by the core's tests: waiting for background work, a driver without
optional capabilities, and running the conformance command."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from channels_lite.drivers.base import Claimed, ClaimRequest, Driver, DriverFeatures, Envelope
from channels_lite.drivers.memory import MemoryDriver

#: Seconds a test waits for something that should happen at once before it fails.
GUARD = 10.0


def run_conformance(*argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m channels_lite conformance *argv`` in a child process, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "channels_lite", "conformance", *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition``: only for background work that has no event to wait on."""
    deadline = time.monotonic() + GUARD
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.001)


class PlainMemoryDriver(Driver):
    """The memory driver without its optional capabilities: a driver the core has to poll (no
    ``ChangeNotifier``), and one without ``SupportsStats``. Only the ``Driver`` methods are
    passed through."""

    name: ClassVar[str] = "test-plain-memory"
    features: ClassVar[DriverFeatures] = DriverFeatures(cross_process=False, persistent=False)
    option_docs: ClassVar[dict[str, str]] = dict(MemoryDriver.option_docs)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._inner = MemoryDriver(**options)

    async def open(self) -> None:
        await self._inner.open()

    async def close(self) -> None:
        await self._inner.close()

    async def push(self, envelopes: Sequence[Envelope], now: float) -> list[bool]:
        return await self._inner.push(envelopes, now)

    async def claim(self, requests: Sequence[ClaimRequest], now: float) -> list[Claimed]:
        return await self._inner.claim(requests, now)

    async def group_add(self, group: str, channel: str, key: str, expires_at: float) -> None:
        await self._inner.group_add(group, channel, key, expires_at)

    async def group_discard(self, group: str, channel: str) -> None:
        await self._inner.group_discard(group, channel)

    async def group_channels(self, group: str, now: float) -> list[str]:
        return await self._inner.group_channels(group, now)

    async def purge(self, now: float) -> int:
        return await self._inner.purge(now)

    async def flush(self) -> None:
        await self._inner.flush()
