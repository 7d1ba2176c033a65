"""Fixtures shared by the whole suite."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Hashable, Sequence
from types import ModuleType

import pytest

from channels_lite.core.cadence import Wakeup
from channels_lite.drivers.base import Claimed, ClaimRequest, Driver, Envelope
from channels_lite.drivers.sqlite import SQLiteDriver


@pytest.fixture
def count_pushes(monkeypatch: pytest.MonkeyPatch) -> Callable[[type[Driver]], list[int]]:
    """``count_pushes(DriverClass)``: from now on, every ``push`` of that class appends its
    batch size to the returned list (the push itself runs as usual)."""

    def install(driver_cls: type[Driver]) -> list[int]:
        sizes: list[int] = []
        original = driver_cls.push

        async def counting(self: Driver, envelopes: Sequence[Envelope], now: float) -> list[bool]:
            sizes.append(len(envelopes))
            return await original(self, envelopes, now)

        monkeypatch.setattr(driver_cls, "push", counting)
        return sizes

    return install


@pytest.fixture
def sqlite_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """From now on, the SQLite driver records how many messages each ``peek`` and ``claim``
    returned (under those names, and both in call order under ``"rounds"``) and how many
    receipts each ``remove`` was given. The calls themselves run as usual."""
    seen: dict[str, list[int]] = {"peek": [], "claim": [], "rounds": [], "remove": []}
    peek, claim, remove = SQLiteDriver.peek, SQLiteDriver.claim, SQLiteDriver.remove

    async def spy_peek(
        self: SQLiteDriver,
        requests: Sequence[ClaimRequest],
        now: float,
        held: Collection[Hashable],
    ) -> list[tuple[Hashable, Claimed]]:
        got = await peek(self, requests, now, held)
        seen["peek"].append(len(got))
        seen["rounds"].append(len(got))
        return got

    async def spy_claim(
        self: SQLiteDriver, requests: Sequence[ClaimRequest], now: float
    ) -> list[Claimed]:
        got = await claim(self, requests, now)
        seen["claim"].append(len(got))
        seen["rounds"].append(len(got))
        return got

    async def spy_remove(self: SQLiteDriver, receipts: Collection[Hashable]) -> None:
        seen["remove"].append(len(receipts))
        await remove(self, receipts)

    monkeypatch.setattr(SQLiteDriver, "peek", spy_peek)
    monkeypatch.setattr(SQLiteDriver, "claim", spy_claim)
    monkeypatch.setattr(SQLiteDriver, "remove", spy_remove)
    return seen


#: Hang guard of ManualTimers.next_wait: never reached by a passing test.
_TIMERS_GUARD = 10.0


class ManualTimers:
    """The timed waits of the :class:`~channels_lite.core.cadence.Wakeup` objects one module
    makes (the claim loop's, the upkeep's), with timers that go off only when the test calls
    :meth:`fire`. A hint (``set()``) still ends a wait at once, as with the real class, so a
    wait that ends while no timer was fired was ended by a hint. Waits without a timeout are
    the real ones."""

    def __init__(self) -> None:
        #: Every timed wait asked for, in order (also those a pending hint ended at once).
        self.timeouts: list[float] = []
        #: For every timed wait that ended: True when a hint ended it, False when fired.
        self.hinted: list[bool] = []
        #: How many timers :meth:`fire` set off.
        self.fired = 0
        self._entered: asyncio.Queue[float] = asyncio.Queue()
        self._armed: list[asyncio.Future[None]] = []

    async def next_wait(self) -> float:
        """The timeout of the next timed wait that sleeps (in order), once it sleeps."""
        return await asyncio.wait_for(self._entered.get(), _TIMERS_GUARD)

    def fire(self) -> None:
        """Set off the timer of every wait sleeping now, as if its timeout had passed."""
        for timer in self._armed:
            if not timer.done():
                timer.set_result(None)
                self.fired += 1

    def wakeup_class(self) -> type[Wakeup]:
        timers = self

        class TimedWakeup(Wakeup):
            async def wait(self, timeout: float | None) -> bool:
                if timeout is None:
                    return await super().wait(None)
                timers.timeouts.append(timeout)
                if self.consume():
                    timers.hinted.append(True)
                    return True
                # Wakeup.set() ends the sleep by resolving ``_sleeper``; the test's fire()
                # resolves the same future in place of the real timer.
                sleeper = self.loop.create_future()
                self._sleeper = sleeper
                timers._armed.append(sleeper)
                timers._entered.put_nowait(timeout)
                try:
                    await sleeper
                finally:
                    self._sleeper = None
                    timers._armed.remove(sleeper)
                hinted = self.consume()
                timers.hinted.append(hinted)
                return hinted

        return TimedWakeup


@pytest.fixture
def manual_timers(monkeypatch: pytest.MonkeyPatch) -> Callable[[ModuleType], ManualTimers]:
    """``manual_timers(module)``: from now on, the ``Wakeup`` objects ``module`` creates (e.g.
    ``channels_lite.core.receiver``, ``channels_lite.core.upkeep``) wait on timers the test
    sets off (see :class:`ManualTimers`)."""

    def install(module: ModuleType) -> ManualTimers:
        timers = ManualTimers()
        monkeypatch.setattr(module, "Wakeup", timers.wakeup_class())
        return timers

    return install
