"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Sequence

import pytest

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
