"""Fixtures and helpers shared by the two tiers of the conformance suite."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import pytest
import pytest_asyncio
from asgiref.sync import async_to_sync

from channels_lite.core import config
from channels_lite.drivers.base import (
    Claimed,
    ClaimRequest,
    Driver,
    DriverFeatures,
    Envelope,
)

__all__ = [
    "ABSENT",
    "GUARD",
    "NOW",
    "ConformanceFixtures",
    "ConstructionError",
    "ExplodingDriver",
    "claim",
    "drain",
    "envelope",
    "opened",
    "run_in_new_loop",
]

P = ParamSpec("P")
T = TypeVar("T")
D = TypeVar("D", bound=Driver)

#: A fixed "now" for driver-level tests: drivers never read a clock, so any value works.
NOW = 1_700_000_000.0
#: Far enough in the future that nothing expires unless a test says so.
LATER = NOW + 3600.0
#: Hang guard for waits that must succeed: never reached by a passing test.
GUARD = 10.0
#: How long a test waits to conclude that nothing arrives (kept short: prefer sentinels).
ABSENT = 0.1

#: CONFIG keys the core owns; the driver tier strips them from ``driver_options``.
CORE_KEYS = frozenset(config.CORE_KEYS)


@contextlib.asynccontextmanager
async def opened(instance: D) -> AsyncIterator[D]:
    """``instance`` opened for the block, closed after it (fixtures yield from this)."""
    await instance.open()
    try:
        yield instance
    finally:
        await instance.close()


def envelope(
    channel: str,
    payload: bytes,
    *,
    key: str | None = None,
    expires_at: float = LATER,
    capacity: int = 10_000,
) -> Envelope:
    """An :class:`Envelope` with test-friendly defaults (its own key, far expiry, roomy)."""
    return Envelope(
        channel=channel,
        key=channel if key is None else key,
        payload=payload,
        expires_at=expires_at,
        capacity=capacity,
    )


async def claim(
    driver: Driver,
    key: str,
    *,
    now: float = NOW,
    limit: int = 10_000,
    exclude: frozenset[str] = frozenset(),
) -> list[Claimed]:
    """One claim call for one key."""
    return await driver.claim([ClaimRequest(key=key, limit=limit, exclude=exclude)], now)


async def drain(driver: Driver, key: str, *, now: float = NOW, limit: int = 100) -> list[Claimed]:
    """Claim until the key is empty; returns everything, in order."""
    out: list[Claimed] = []
    # Bounded: a driver that hands messages out twice must fail here, not spin for minutes.
    for _ in range(2_000):
        got = await claim(driver, key, now=now, limit=limit)
        if not got:
            return out
        out.extend(got)
    raise AssertionError(f"claim({key!r}) never ran dry")


def run_in_new_loop(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call ``fn`` the way sync Django code does: ``async_to_sync`` from a thread with no loop.

    Must itself run in a worker thread (``await asyncio.to_thread(run_in_new_loop, ...)``): the
    wrapper is created here, where no loop runs, so asgiref starts a brand new event loop for the
    call and closes it afterwards, exactly as in a sync view or a management command.
    """
    return async_to_sync(fn)(*args, **kwargs)


def run_in_threads(count: int, target: Callable[[int, threading.Barrier], T]) -> list[T]:
    """Run ``target(index, barrier)`` in ``count`` threads at once; return results in order.

    Exceptions in a thread are re-raised here. ``barrier`` lets the threads start their real
    work together, to maximise contention.
    """
    barrier = threading.Barrier(count, timeout=GUARD)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def runner(index: int) -> None:
        try:
            results[index] = target(index, barrier)
        except BaseException as exc:  # re-raised in the caller  # noqa: BLE001
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=runner, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GUARD * 3)
    if any(thread.is_alive() for thread in threads):
        raise AssertionError("a worker thread did not finish (hang)")
    if errors:
        raise errors[0]
    return results


class ConstructionError(Exception):
    """Raised by :class:`ExplodingDriver`'s constructor; the layer must let it through."""


class ExplodingDriver(Driver):
    """A driver whose constructor always fails (SPEC 25: errors propagate unchanged)."""

    name = "conformance-exploding"
    features = DriverFeatures(cross_process=False, persistent=False)

    def __init__(self, **options: Any) -> None:
        raise ConstructionError("the driver constructor failed on purpose")

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def push(self, envelopes: Sequence[Envelope], now: float) -> list[bool]:
        raise NotImplementedError

    async def claim(self, requests: Sequence[ClaimRequest], now: float) -> list[Claimed]:
        raise NotImplementedError

    async def group_add(self, group: str, channel: str, key: str, expires_at: float) -> None:
        raise NotImplementedError

    async def group_discard(self, group: str, channel: str) -> None:
        raise NotImplementedError

    async def group_channels(self, group: str, now: float) -> list[str]:
        raise NotImplementedError

    async def purge(self, now: float) -> int:
        raise NotImplementedError

    async def flush(self) -> None:
        raise NotImplementedError


def resolve_driver_class(name: str) -> type[Driver]:
    from channels_lite.drivers.registry import get_driver_class

    return get_driver_class(name)


def json_options(options: Mapping[str, Any]) -> str | None:
    """The options as JSON for a child process, or ``None`` when they cannot travel."""
    try:
        return json.dumps(dict(options))
    except (TypeError, ValueError):
        return None


async def start_child(name: str, options_json: str, command: Mapping[str, Any]) -> Child:
    """Start ``python -m channels_lite.conformance._child`` and wait until it is ready."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "channels_lite.conformance._child",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    child = Child(proc)
    request = {"driver": name, "options": json.loads(options_json), **command}
    await child.send_line(json.dumps(request))
    line = await child.read_line()
    if line != "ready":
        raise AssertionError(f"child process did not start: {line!r} {await child.stderr()}")
    return child


class Child:
    """A child process speaking a line protocol: ``ready``, ``go``, one JSON result."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def send_line(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def read_line(self) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), GUARD * 2)
        return raw.decode().strip()

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        try:
            data = await asyncio.wait_for(self.proc.stderr.read(), GUARD)
        except TimeoutError:
            return "<no stderr>"
        return data.decode(errors="replace")[-4000:]

    async def result(self) -> Any:
        line = await self.read_line()
        if not line:
            raise AssertionError(f"child process failed: {await self.stderr()}")
        return json.loads(line)

    async def finish(self) -> None:
        if self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), GUARD)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class ConformanceFixtures:
    """The fixtures both tiers use. Override :meth:`driver_options`; nothing else is needed.

    ``driver_options`` returns the CONFIG a user would write, for example
    ``{"driver": "sqlite", "path": str(tmp_path / "x.sqlite3")}``. It must name storage that no
    other test shares (a fresh file, a fresh in-memory store name, a fresh database or schema),
    because the tests assume they start from empty storage. Core keys (``poll_interval``,
    ``capacity``...) may be included: the driver tier strips them, the layer tier uses them.
    """

    @pytest.fixture
    def driver_options(self) -> dict[str, Any]:
        raise NotImplementedError(
            "override the driver_options fixture in your subclass, e.g. "
            "return {'driver': 'mydriver', ...}"
        )

    @pytest.fixture
    def driver_name(self, driver_options: dict[str, Any]) -> str:
        return str(driver_options.get("driver", "sqlite"))

    @pytest.fixture
    def driver_class(self, driver_name: str) -> type[Driver]:
        return resolve_driver_class(driver_name)

    @pytest.fixture
    def driver_kwargs(self, driver_options: dict[str, Any]) -> dict[str, Any]:
        """The options the driver itself receives (CONFIG minus the core's keys)."""
        return {k: v for k, v in driver_options.items() if k not in CORE_KEYS}

    @pytest.fixture
    def features(self, driver_class: type[Driver]) -> DriverFeatures:
        return driver_class.features

    @pytest_asyncio.fixture(loop_scope="function")
    async def driver(
        self, driver_class: type[Driver], driver_kwargs: dict[str, Any]
    ) -> AsyncIterator[Driver]:
        """An opened driver instance, closed after the test."""
        async with opened(driver_class(**driver_kwargs)) as instance:
            yield instance

    @pytest_asyncio.fixture(loop_scope="function")
    async def sibling(self, driver: Driver) -> AsyncIterator[Driver]:
        """A second opened instance on the same storage (``driver.sibling()``)."""
        async with opened(driver.sibling()) as instance:
            yield instance

    @pytest_asyncio.fixture(loop_scope="function")
    async def make_layer(self, driver_options: dict[str, Any]) -> AsyncIterator[Callable[..., Any]]:
        """A factory of layers on the test's storage: ``make_layer(capacity=3, clock=clock)``.

        Every layer made is closed after the test.
        """
        from channels_lite import ChannelLayer

        made: list[Any] = []

        def factory(**overrides: Any) -> Any:
            instance = ChannelLayer(**{**driver_options, **overrides})
            made.append(instance)
            return instance

        try:
            yield factory
        finally:
            for instance in reversed(made):
                await instance.close()

    @pytest_asyncio.fixture(loop_scope="function")
    async def layer(self, make_layer: Callable[..., Any]) -> Any:
        """A ``ChannelLayer`` with ``driver_options`` (closed after the test)."""
        return make_layer()

    @pytest_asyncio.fixture(loop_scope="function")
    async def second_layer(self, make_layer: Callable[..., Any]) -> Any:
        """Another ``ChannelLayer`` on the same storage: stands for another process."""
        return make_layer()


def iter_chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
