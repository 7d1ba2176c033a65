"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from channels_lite.drivers.base import Driver, Envelope


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
