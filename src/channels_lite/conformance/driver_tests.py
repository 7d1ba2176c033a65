"""Tier 1: the driver contract of :mod:`channels_lite.drivers.base`, tested directly.

Every test passes ``now`` explicitly (drivers never read a clock), so expiry is tested at exact
boundaries without sleeping. "SPEC n" in a docstring names the item of the project's SPEC.md
that the contract point exists for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import pytest

from channels_lite.drivers.base import (
    ChangeNotifier,
    Claimed,
    ClaimRequest,
    ClaimsReady,
    DefersChanges,
    Driver,
    DriverConfigError,
    DriverFeatures,
    Envelope,
    Peeks,
    StorageStats,
    SupportsLiveness,
    SupportsStats,
)

from ._support import (
    GUARD,
    LATER,
    NOW,
    ConformanceFixtures,
    claim,
    drain,
    envelope,
    iter_chunks,
    json_options,
    run_in_threads,
    start_child,
)

__all__ = ["DriverTests"]

T = TypeVar("T")


def _payloads(items: list[Claimed]) -> list[bytes]:
    return [item.payload for item in items]


def _liveness(driver: Driver) -> SupportsLiveness:
    if not isinstance(driver, SupportsLiveness):
        pytest.skip(
            f"driver {driver.name!r} does not implement the optional SupportsLiveness protocol "
            "(heartbeat/release): dead processes' data only goes at expiry"
        )
    return driver


def _stats(driver: Driver) -> SupportsStats:
    if not isinstance(driver, SupportsStats):
        pytest.skip(
            f"driver {driver.name!r} does not implement the optional SupportsStats protocol"
        )
    return driver


def _peeks(driver: Driver) -> Peeks:
    if not isinstance(driver, Peeks):
        pytest.skip(
            f"driver {driver.name!r} does not implement the optional Peeks protocol (the "
            "core then claims its own process's messages like any others)"
        )
    return driver


async def _peek(
    driver: Peeks,
    key: str,
    *,
    now: float = NOW,
    limit: int = 10_000,
    exclude: frozenset[str] = frozenset(),
    held: frozenset[Hashable] = frozenset(),
) -> list[tuple[Hashable, Claimed]]:
    """One peek for one key."""
    return await driver.peek([ClaimRequest(key=key, limit=limit, exclude=exclude)], now, held)


def _notifier(driver: Driver) -> ChangeNotifier:
    if not isinstance(driver, ChangeNotifier):
        pytest.skip(
            f"driver {driver.name!r} does not implement the optional ChangeNotifier protocol "
            "(the core falls back to polling)"
        )
    return driver


class DriverTests(ConformanceFixtures):
    """The storage contract, driver instance by driver instance. Subclass and override
    ``driver_options``; see :class:`channels_lite.conformance.ConformanceTests`."""

    # ------------------------------------------------------------------ identity and lifecycle

    def test_driver_registered_under_its_name(
        self, driver_class: type[Driver], driver_name: str
    ) -> None:
        """The registry resolves the configured name to a Driver subclass (SPEC 26)."""
        from channels_lite.drivers.registry import available_drivers

        assert issubclass(driver_class, Driver)
        assert isinstance(driver_class.name, str)
        assert driver_class.name
        if ":" not in driver_name:
            assert driver_class.name == driver_name
            assert available_drivers()[driver_name] is driver_class

    def test_driver_features_declared(self, features: DriverFeatures) -> None:
        """Declared features are honest types the suite can skip on."""
        assert isinstance(features, DriverFeatures)
        assert isinstance(features.cross_process, bool)
        assert isinstance(features.persistent, bool)
        assert isinstance(features.max_batch, int)
        assert features.max_batch >= 1

    def test_driver_option_docs_cover_given_options(
        self, driver_class: type[Driver], driver_kwargs: dict[str, Any]
    ) -> None:
        """Every option the test passes is documented in ``option_docs`` (SPEC 26)."""
        for option in driver_kwargs:
            assert option in driver_class.option_docs, option
            assert isinstance(driver_class.option_docs[option], str)

    def test_driver_unknown_option_refused_naming_it(
        self, driver_class: type[Driver], driver_kwargs: dict[str, Any]
    ) -> None:
        """An unknown driver option raises DriverConfigError naming it (SPEC 26)."""
        with pytest.raises(DriverConfigError) as info:
            driver_class(**driver_kwargs, no_such_option_xyz=1)
        assert info.value.option == "no_such_option_xyz"
        assert "no_such_option_xyz" in str(info.value)

    @pytest.mark.asyncio
    async def test_driver_describe_is_text(self, driver: Driver) -> None:
        """``describe()`` gives a non-empty human string for logs."""
        text = driver.describe()
        assert isinstance(text, str)
        assert text.strip()

    @pytest.mark.asyncio
    async def test_driver_open_is_idempotent(self, driver: Driver) -> None:
        """A second ``open()`` on an open instance does nothing harmful (SPEC 24)."""
        await driver.push([envelope("c", b"before")], NOW)
        await driver.open()
        await driver.open()
        assert await driver.push([envelope("c", b"after")], NOW) == [True]
        assert _payloads(await claim(driver, "c")) == [b"before", b"after"]

    @pytest.mark.asyncio
    async def test_driver_close_is_idempotent_and_safe_unopened(
        self, driver_class: type[Driver], driver_kwargs: dict[str, Any], driver: Driver
    ) -> None:
        """``close()`` twice, or on a never-opened instance, is fine (SPEC 24)."""
        never_opened = driver_class(**driver_kwargs)
        await never_opened.close()
        await never_opened.close()
        other = driver.sibling()
        await other.open()
        await other.close()
        await other.close()
        # The shared storage is still usable from the first instance.
        assert await driver.push([envelope("c", b"x")], NOW) == [True]
        assert _payloads(await claim(driver, "c")) == [b"x"]

    @pytest.mark.asyncio
    async def test_driver_close_keeps_data(self, driver: Driver) -> None:
        """Closing an instance keeps what it stored: another instance still claims it."""
        other = driver.sibling()
        await other.open()
        assert await other.push([envelope("kept", b"1"), envelope("kept", b"2")], NOW) == [
            True,
            True,
        ]
        await other.close()
        assert _payloads(await claim(driver, "kept")) == [b"1", b"2"]

    @pytest.mark.asyncio
    async def test_driver_sibling_shares_storage(self, driver: Driver) -> None:
        """``sibling()`` is a new, unopened instance of the same class on the same storage
        (SPEC 10, 23)."""
        other = driver.sibling()
        try:
            assert other is not driver
            assert type(other) is type(driver)
            await other.open()
            await driver.push([envelope("shared", b"from-first")], NOW)
            await other.push([envelope("shared", b"from-second")], NOW)
            assert _payloads(await claim(other, "shared")) == [b"from-first", b"from-second"]
            assert await claim(driver, "shared") == []
        finally:
            await other.close()

    @pytest.mark.asyncio
    async def test_driver_persistent_storage_survives_reopen(
        self, driver_class: type[Driver], driver_kwargs: dict[str, Any], features: DriverFeatures
    ) -> None:
        """A driver declaring ``persistent`` keeps data across close and a fresh instance."""
        if not features.persistent:
            pytest.skip("driver does not declare features.persistent")
        first = driver_class(**driver_kwargs)
        await first.open()
        await first.push([envelope("durable", b"still here")], NOW)
        await first.group_add("g", "durable", "durable", LATER)
        await first.close()
        second = driver_class(**driver_kwargs)
        await second.open()
        try:
            assert _payloads(await claim(second, "durable")) == [b"still here"]
            assert await second.group_channels("g", NOW) == ["durable"]
        finally:
            await second.close()

    # ----------------------------------------------------------------------- push and claim

    @pytest.mark.asyncio
    async def test_driver_empty_batches(self, driver: Driver) -> None:
        """Empty push and claim batches are valid and return empty lists."""
        assert await driver.push([], NOW) == []
        assert await driver.claim([], NOW) == []
        assert await claim(driver, "nothing-here") == []

    @pytest.mark.parametrize(
        "payload",
        [
            b"",
            b"\x00",
            bytes(range(256)),
            b"\xff\xfe\x00\x00" * 64,
            "héllo wörld".encode(),
            b"\x00" * 100_000,
        ],
        ids=["empty", "nul", "all-bytes", "bom-like", "utf8", "100k-nul"],
    )
    @pytest.mark.asyncio
    async def test_driver_payload_round_trip_byte_exact(
        self, driver: Driver, payload: bytes
    ) -> None:
        """Payloads come back byte for byte, as ``bytes`` (SPEC 5, 6)."""
        assert await driver.push([envelope("bytes", payload)], NOW) == [True]
        (got,) = await claim(driver, "bytes")
        assert type(got.payload) is bytes
        assert got.payload == payload

    @pytest.mark.asyncio
    async def test_driver_large_payload_round_trip(self, driver: Driver) -> None:
        """A 1.5 MB random payload survives exactly (SPEC 6)."""
        payload = os.urandom(1_500_000)
        assert await driver.push([envelope("big", payload)], NOW) == [True]
        (got,) = await claim(driver, "big")
        assert len(got.payload) == len(payload)
        assert got.payload == payload

    @pytest.mark.asyncio
    async def test_driver_claimed_fields_preserved(self, driver: Driver) -> None:
        """Claimed carries channel, key, payload and the exact float ``expires_at``."""
        expires = NOW + 12.345678
        await driver.push(
            [envelope("specific.proc!abc", b"p", key="proc!", expires_at=expires)], NOW
        )
        (got,) = await claim(driver, "proc!")
        assert isinstance(got, Claimed)
        assert got.channel == "specific.proc!abc"
        assert got.key == "proc!"
        assert got.payload == b"p"
        assert got.expires_at == pytest.approx(expires, abs=1e-6)

    @pytest.mark.asyncio
    async def test_driver_push_returns_one_bool_per_envelope(self, driver: Driver) -> None:
        """``push`` answers one ``bool`` per envelope, in order."""
        flags = await driver.push([envelope(f"c{i % 3}", b"x") for i in range(7)], NOW)
        assert len(flags) == 7
        assert all(type(flag) is bool for flag in flags)
        assert flags == [True] * 7

    @pytest.mark.asyncio
    async def test_driver_fifo_single_pushes(self, driver: Driver) -> None:
        """One writer, one reader: strict FIFO per channel (SPEC 11)."""
        sent = [f"m{i}".encode() for i in range(60)]
        for payload in sent:
            await driver.push([envelope("fifo", payload)], NOW)
        assert _payloads(await claim(driver, "fifo")) == sent

    @pytest.mark.asyncio
    async def test_driver_fifo_batched_pushes(
        self, driver: Driver, features: DriverFeatures
    ) -> None:
        """Order holds inside and across batches (SPEC 11)."""
        sent = [f"m{i}".encode() for i in range(90)]
        size = max(1, min(features.max_batch, 25))
        for chunk in iter_chunks(sent, size):
            await driver.push([envelope("fifo", p) for p in chunk], NOW)
        assert _payloads(await claim(driver, "fifo")) == sent

    @pytest.mark.asyncio
    async def test_driver_fifo_per_key_across_channels(self, driver: Driver) -> None:
        """Channels sharing a key come back in push order across the key (SPEC 11, 13)."""
        channels = ["specific.proc!a", "specific.proc!b", "other.proc!c"]
        pushed: list[tuple[str, bytes]] = []
        for i in range(30):
            channel = channels[(i * 7) % 3]
            payload = f"{channel}:{i}".encode()
            pushed.append((channel, payload))
            await driver.push([envelope(channel, payload, key="proc!")], NOW)
        got = await claim(driver, "proc!")
        assert [(g.channel, g.payload) for g in got] == pushed
        assert {g.key for g in got} == {"proc!"}

    @pytest.mark.asyncio
    async def test_driver_fifo_across_partial_claims(self, driver: Driver) -> None:
        """Claiming a few at a time still walks the channel oldest first (SPEC 11)."""
        sent = [f"m{i}".encode() for i in range(20)]
        await driver.push([envelope("fifo", p) for p in sent], NOW)
        seen: list[bytes] = []
        for _ in range(10):
            chunk = await claim(driver, "fifo", limit=3)
            assert len(chunk) <= 3
            seen.extend(_payloads(chunk))
        assert seen == sent

    @pytest.mark.asyncio
    async def test_driver_fifo_between_siblings(self, driver: Driver, sibling: Driver) -> None:
        """Pushes by one instance are claimed in order by another (SPEC 11)."""
        sent = [f"m{i}".encode() for i in range(40)]
        for payload in sent:
            await driver.push([envelope("x", payload)], NOW)
        assert _payloads(await drain(sibling, "x", limit=7)) == sent

    # ---------------------------------------------------------------------------- capacity

    @pytest.mark.asyncio
    async def test_driver_capacity_exact_single_pushes(self, driver: Driver) -> None:
        """A channel takes exactly ``capacity`` messages, then refuses (SPEC 9, 15)."""
        flags = [
            (await driver.push([envelope("cap", f"{i}".encode(), capacity=3)], NOW))[0]
            for i in range(6)
        ]
        assert flags == [True, True, True, False, False, False]
        assert _payloads(await claim(driver, "cap")) == [b"0", b"1", b"2"]

    @pytest.mark.asyncio
    async def test_driver_capacity_exact_within_one_batch(self, driver: Driver) -> None:
        """Envelopes of one batch see each other in the count (SPEC 15)."""
        batch = [envelope("cap", f"{i}".encode(), capacity=3) for i in range(5)]
        assert await driver.push(batch, NOW) == [True, True, True, False, False]
        assert _payloads(await claim(driver, "cap")) == [b"0", b"1", b"2"]

    @pytest.mark.asyncio
    async def test_driver_capacity_interleaved_batch(self, driver: Driver) -> None:
        """Counts are per channel inside a mixed batch (SPEC 15, 16)."""
        batch = [envelope("ab"[i % 2], f"{i}".encode(), capacity=2) for i in range(7)]
        assert await driver.push(batch, NOW) == [True, True, True, True, False, False, False]
        assert _payloads(await claim(driver, "a")) == [b"0", b"2"]
        assert _payloads(await claim(driver, "b")) == [b"1", b"3"]

    @pytest.mark.asyncio
    async def test_driver_capacity_per_channel_not_per_key(self, driver: Driver) -> None:
        """Two channels under one key each get the full capacity (SPEC 17)."""
        batch = [
            envelope(f"specific.proc!{name}", f"{name}{i}".encode(), key="proc!", capacity=2)
            for name in ("a", "b")
            for i in range(3)
        ]
        assert await driver.push(batch, NOW) == [True, True, False, True, True, False]
        got = await claim(driver, "proc!")
        assert Counter(g.channel for g in got) == {"specific.proc!a": 2, "specific.proc!b": 2}

    @pytest.mark.asyncio
    async def test_driver_capacity_taken_from_each_envelope(self, driver: Driver) -> None:
        """The limit is the envelope's own ``capacity`` at the time of the push (SPEC 14)."""
        assert await driver.push([envelope("c", b"x", capacity=10)] * 3, NOW) == [True] * 3
        assert await driver.push([envelope("c", b"y", capacity=3)], NOW) == [False]
        assert await driver.push([envelope("c", b"z", capacity=4)], NOW) == [True]
        assert await driver.push([envelope("c", b"w", capacity=1)], NOW) == [False]
        assert _payloads(await claim(driver, "c")) == [b"x", b"x", b"x", b"z"]

    @pytest.mark.asyncio
    async def test_driver_capacity_one(self, driver: Driver) -> None:
        """Capacity 1 holds exactly one message (SPEC 15)."""
        assert await driver.push([envelope("one", b"a", capacity=1)], NOW) == [True]
        assert await driver.push([envelope("one", b"b", capacity=1)], NOW) == [False]
        assert _payloads(await claim(driver, "one")) == [b"a"]
        assert await driver.push([envelope("one", b"c", capacity=1)], NOW) == [True]

    @pytest.mark.asyncio
    async def test_driver_refused_envelope_stores_nothing(self, driver: Driver) -> None:
        """``False`` means nothing was stored for that envelope (SPEC 9)."""
        await driver.push([envelope("c", b"keep", capacity=1)], NOW)
        assert await driver.push([envelope("c", b"refused", capacity=1)], NOW) == [False]
        assert _payloads(await claim(driver, "c")) == [b"keep"]
        assert await claim(driver, "c") == []

    @pytest.mark.asyncio
    async def test_driver_capacity_freed_by_claim(self, driver: Driver) -> None:
        """Claiming makes room again (SPEC 15)."""
        assert await driver.push([envelope("c", b"1", capacity=2)] * 2, NOW) == [True, True]
        assert await driver.push([envelope("c", b"2", capacity=2)], NOW) == [False]
        assert len(await claim(driver, "c", limit=1)) == 1
        assert await driver.push([envelope("c", b"3", capacity=2)], NOW) == [True]
        assert await driver.push([envelope("c", b"4", capacity=2)], NOW) == [False]

    @pytest.mark.asyncio
    async def test_driver_capacity_ignores_expired_messages(self, driver: Driver) -> None:
        """Expired messages are not counted against capacity, purged or not (SPEC 15, 18)."""
        old = [envelope("c", b"old", capacity=2, expires_at=NOW + 5)] * 2
        assert await driver.push(old, NOW) == [True, True]
        assert await driver.push([envelope("c", b"x", capacity=2)], NOW + 4) == [False]
        fresh = [envelope("c", b"new", capacity=2, expires_at=NOW + 100)] * 3
        assert await driver.push(fresh, NOW + 5) == [True, True, False]
        assert _payloads(await claim(driver, "c", now=NOW + 5)) == [b"new", b"new"]

    @pytest.mark.asyncio
    async def test_driver_capacity_concurrent_siblings(
        self, driver: Driver, sibling: Driver
    ) -> None:
        """Concurrent pushes from two instances never exceed capacity (SPEC 15)."""
        instances = itertools.cycle([driver, sibling])
        results = await asyncio.gather(
            *(
                inst.push([envelope("race", f"{i}".encode(), capacity=17)], NOW)
                for i, inst in zip(range(60), instances, strict=False)
            )
        )
        flags = [flag for result in results for flag in result]
        assert flags.count(True) == 17
        assert flags.count(False) == 43
        stored = await drain(driver, "race")
        assert len(stored) == 17
        accepted = {f"{i}".encode() for i, flag in enumerate(flags) if flag}
        assert set(_payloads(stored)) == accepted

    @pytest.mark.asyncio
    async def test_driver_capacity_concurrent_batches(
        self, driver: Driver, sibling: Driver
    ) -> None:
        """Concurrent batches from two instances never exceed capacity (SPEC 15, 16)."""

        async def batch(inst: Driver, tag: str) -> list[bool]:
            return await inst.push(
                [envelope("race", f"{tag}{i}".encode(), capacity=25) for i in range(10)], NOW
            )

        results = await asyncio.gather(
            *(batch(inst, f"{n}-") for n, inst in zip(range(8), itertools.cycle([driver, sibling])))
        )
        assert sum(flag for result in results for flag in result) == 25
        assert len(await drain(sibling, "race")) == 25

    @pytest.mark.asyncio
    async def test_driver_capacity_concurrent_threads(self, driver: Driver) -> None:
        """Siblings on four event loops in four threads never exceed capacity (SPEC 15, 23)."""

        def worker(index: int, barrier: threading.Barrier) -> list[bool]:
            with asyncio.Runner() as runner:
                inst = driver.sibling()
                runner.run(inst.open())
                try:
                    barrier.wait()
                    flags: list[bool] = []
                    for i in range(25):
                        env = envelope("race", f"{index}-{i}".encode(), capacity=30)
                        flags.extend(runner.run(inst.push([env], NOW)))
                    return flags
                finally:
                    runner.run(inst.close())

        results = await asyncio.to_thread(run_in_threads, 4, worker)
        assert sum(flag for flags in results for flag in flags) == 30
        assert len(await drain(driver, "race")) == 30

    @pytest.mark.asyncio
    async def test_driver_max_batch_push(self, driver: Driver, features: DriverFeatures) -> None:
        """A batch of ``features.max_batch`` envelopes (capped at 2000) is stored whole
        (SPEC 16: group_send is one batch)."""
        size = min(features.max_batch, 2000)
        batch = [envelope(f"member{i}", f"{i}".encode(), capacity=5) for i in range(size)]
        flags = await driver.push(batch, NOW)
        assert flags == [True] * size
        for i in (0, size // 2, size - 1):
            assert _payloads(await claim(driver, f"member{i}")) == [f"{i}".encode()]

    # -------------------------------------------------------------------------------- claim

    @pytest.mark.asyncio
    async def test_driver_competing_claims_never_duplicate(
        self, driver: Driver, sibling: Driver
    ) -> None:
        """Many concurrent claims from two instances: each message exactly once (SPEC 10)."""
        sent = [f"m{i}".encode() for i in range(300)]
        for chunk in iter_chunks(sent, 100):
            await driver.push([envelope("work", p) for p in chunk], NOW)
        got: list[bytes] = []
        instances = [driver, sibling]
        for _ in range(40):
            results = await asyncio.gather(
                *(claim(instances[i % 2], "work", limit=3) for i in range(40))
            )
            batch = [item for result in results for item in result]
            got.extend(_payloads(batch))
            if not batch:
                break
        assert len(got) == len(sent)
        assert len(set(got)) == len(got), "a message was claimed twice"
        assert set(got) == set(sent)

    @pytest.mark.asyncio
    async def test_driver_competing_claims_while_pushing(
        self, driver: Driver, sibling: Driver
    ) -> None:
        """Claims racing pushes never return a message twice nor lose one (SPEC 10)."""
        sent = [f"m{i}".encode() for i in range(200)]
        got: list[bytes] = []
        done = asyncio.Event()

        async def producer() -> None:
            for payload in sent:
                await sibling.push([envelope("work", payload)], NOW)
            done.set()

        async def consumer(inst: Driver) -> None:
            while True:
                finished = done.is_set()
                items = await claim(inst, "work", limit=4)
                got.extend(_payloads(items))
                if finished and not items:
                    return
                if not items:
                    await asyncio.sleep(0)

        await asyncio.wait_for(
            asyncio.gather(producer(), consumer(driver), consumer(sibling), consumer(driver)),
            GUARD * 3,
        )
        assert sorted(got) == sorted(sent)
        assert len(set(got)) == len(got)

    @pytest.mark.asyncio
    async def test_driver_competing_claims_threads(self, driver: Driver) -> None:
        """Siblings in four threads, each on its own loop, claim disjoint sets (SPEC 10, 23)."""
        sent = [f"m{i}".encode() for i in range(400)]
        for chunk in iter_chunks(sent, 100):
            await driver.push([envelope("work", p) for p in chunk], NOW)

        def worker(index: int, barrier: threading.Barrier) -> list[bytes]:
            with asyncio.Runner() as runner:
                inst = driver.sibling()
                runner.run(inst.open())
                try:
                    barrier.wait()
                    return _payloads(runner.run(drain(inst, "work", limit=5)))
                finally:
                    runner.run(inst.close())

        results = await asyncio.to_thread(run_in_threads, 4, worker)
        got = [payload for result in results for payload in result]
        assert len(got) == 400
        assert set(got) == set(sent)
        for result in results:
            assert result == sorted(result, key=lambda p: int(p[1:])), "FIFO per claimer"

    @pytest.mark.asyncio
    async def test_driver_claim_survives_loop_teardown(self, driver: Driver) -> None:
        """A claim in flight when its event loop is torn down (``asyncio.run`` and so
        ``async_to_sync`` cancel *every* task of the loop, a driver's helper tasks included)
        either returns its messages or leaves them in storage: never removes them unseen
        (SPEC 12). The teardown is started after 0, 1, 2, ... loop iterations, to cross every
        point of the claim's flight."""
        rounds = 48
        for n in range(rounds):
            await driver.push([envelope(f"t{n}", f"m{n}".encode())], NOW)

        def tear_down_mid_claim(n: int) -> list[bytes] | None:
            got = _torn_down_mid_call(driver, n, lambda inst: claim(inst, f"t{n}"))
            return None if got is None else _payloads(got)

        for n in range(rounds):
            taken = await asyncio.to_thread(tear_down_mid_claim, n)
            left = _payloads(await drain(driver, f"t{n}"))
            if taken is None:
                assert left == [f"m{n}".encode()], f"round {n}: cancelled claim lost its message"
            else:
                assert taken + left == [f"m{n}".encode()], f"round {n}: {taken=} {left=}"

    @pytest.mark.asyncio
    async def test_driver_push_survives_loop_teardown(self, driver: Driver) -> None:
        """A push in flight when its event loop is torn down either returns its flags (stored)
        or raises ``CancelledError`` having stored nothing, so the core can retry it without
        storing a message twice (SPEC 12)."""
        rounds = 48

        def tear_down_mid_push(n: int) -> list[bool] | None:
            return _torn_down_mid_call(
                driver, n, lambda inst: inst.push([envelope(f"p{n}", f"m{n}".encode())], NOW)
            )

        for n in range(rounds):
            flags = await asyncio.to_thread(tear_down_mid_push, n)
            left = _payloads(await drain(driver, f"p{n}"))
            if flags is None:
                assert left == [], f"round {n}: push raised CancelledError but stored"
            else:
                assert flags == [True]
                assert left == [f"m{n}".encode()], f"round {n}: push said stored, found {left}"

    @pytest.mark.parametrize("limit", [1, 2, 7, 50])
    @pytest.mark.asyncio
    async def test_driver_claim_limit(self, driver: Driver, limit: int) -> None:
        """At most ``limit`` messages, the oldest ones (SPEC 11)."""
        sent = [f"{i:02d}".encode() for i in range(20)]
        await driver.push([envelope("c", p) for p in sent], NOW)
        first = await claim(driver, "c", limit=limit)
        assert _payloads(first) == sent[:limit]
        rest = await claim(driver, "c")
        assert _payloads(rest) == sent[limit:]

    @pytest.mark.asyncio
    async def test_driver_claim_several_requests(self, driver: Driver) -> None:
        """One claim call serves several keys, each with its own limit."""
        await driver.push([envelope("a", f"a{i}".encode()) for i in range(5)], NOW)
        await driver.push([envelope("b", f"b{i}".encode()) for i in range(5)], NOW)
        got = await driver.claim(
            [ClaimRequest(key="a", limit=2), ClaimRequest(key="b", limit=3)], NOW
        )
        by_key: dict[str, list[bytes]] = {}
        for item in got:
            by_key.setdefault(item.key, []).append(item.payload)
        assert by_key == {"a": [b"a0", b"a1"], "b": [b"b0", b"b1", b"b2"]}
        assert len(await claim(driver, "a")) == 3
        assert len(await claim(driver, "b")) == 2

    @pytest.mark.asyncio
    async def test_driver_claim_exclude(self, driver: Driver) -> None:
        """Excluded channels stay in storage untouched, in order (SPEC 13)."""
        for i in range(6):
            channel = "specific.proc!" + "ab"[i % 2]
            await driver.push([envelope(channel, f"{i}".encode(), key="proc!")], NOW)
        first = await claim(driver, "proc!", exclude=frozenset({"specific.proc!a"}))
        assert [(g.channel, g.payload) for g in first] == [
            ("specific.proc!b", b"1"),
            ("specific.proc!b", b"3"),
            ("specific.proc!b", b"5"),
        ]
        rest = await claim(driver, "proc!")
        assert [(g.channel, g.payload) for g in rest] == [
            ("specific.proc!a", b"0"),
            ("specific.proc!a", b"2"),
            ("specific.proc!a", b"4"),
        ]

    @pytest.mark.parametrize("limit", [1, 2])
    @pytest.mark.asyncio
    async def test_driver_claim_exclude_with_limit(self, driver: Driver, limit: int) -> None:
        """The limit counts only returned messages; excluded ones are skipped, not counted."""
        for i in range(10):
            channel = "p.k!full" if i < 8 else "p.k!free"
            await driver.push([envelope(channel, f"{i}".encode(), key="k!")], NOW)
        got = await claim(driver, "k!", limit=limit, exclude=frozenset({"p.k!full"}))
        assert _payloads(got) == [b"8", b"9"][:limit]

    @pytest.mark.asyncio
    async def test_driver_claim_one_at_a_time(self, driver: Driver) -> None:
        """A lone receiver claims one message per call (drivers may take a faster path for
        ``limit=1``): oldest first, each once, expired ones skipped."""
        await driver.push([envelope("c", b"old")], NOW)
        await driver.push([envelope("c", b"expires", expires_at=NOW + 5)], NOW)
        await driver.push([envelope("c", f"{i}".encode()) for i in range(5)], NOW)
        got = [_payloads(await claim(driver, "c", now=NOW + 10, limit=1)) for _ in range(7)]
        assert got == [[b"old"], [b"0"], [b"1"], [b"2"], [b"3"], [b"4"], []]

    @pytest.mark.asyncio
    async def test_driver_claim_exclude_everything(self, driver: Driver) -> None:
        """Excluding every channel of a key returns nothing and keeps everything."""
        await driver.push(
            [envelope("p.k!a", b"1", key="k!"), envelope("p.k!b", b"2", key="k!")], NOW
        )
        assert await claim(driver, "k!", exclude=frozenset({"p.k!a", "p.k!b"})) == []
        assert len(await claim(driver, "k!")) == 2

    @pytest.mark.asyncio
    async def test_driver_keys_compared_for_equality_only(self, driver: Driver) -> None:
        """Keys are opaque: no prefix, pattern or case matching between them (SPEC 1)."""
        keys = ["k", "k2", "k!", "K", "k_", "k%", "k.x", "kk"]
        for key in keys:
            await driver.push([envelope(key, key.encode())], NOW)
        for key in keys:
            assert _payloads(await claim(driver, key)) == [key.encode()], key

    @pytest.mark.asyncio
    async def test_driver_claim_empty_never_blocks(self, driver: Driver) -> None:
        """Claiming an empty key returns ``[]`` at once."""
        assert await asyncio.wait_for(claim(driver, "empty"), GUARD) == []

    # ------------------------------------------------------------------------------- expiry

    @pytest.mark.asyncio
    async def test_driver_expired_at_boundary_not_returned(self, driver: Driver) -> None:
        """``expires_at <= now`` is expired: never returned (SPEC 18)."""
        await driver.push([envelope("c", b"x", expires_at=NOW + 10)], NOW)
        assert await claim(driver, "c", now=NOW + 10) == []
        assert await claim(driver, "c", now=NOW + 11) == []

    @pytest.mark.asyncio
    async def test_driver_unexpired_just_before_boundary_returned(self, driver: Driver) -> None:
        """A message is delivered until its last instant (SPEC 18)."""
        await driver.push([envelope("c", b"x", expires_at=NOW + 10)], NOW)
        assert _payloads(await claim(driver, "c", now=NOW + 9.999)) == [b"x"]

    @pytest.mark.asyncio
    async def test_driver_expired_skipped_in_order(self, driver: Driver) -> None:
        """Expired messages among live ones are skipped; order of the rest holds (SPEC 18)."""
        await driver.push(
            [
                envelope("c", b"a", expires_at=NOW + 5),
                envelope("c", b"b", expires_at=NOW + 100),
                envelope("c", b"c", expires_at=NOW + 5),
                envelope("c", b"d", expires_at=NOW + 100),
            ],
            NOW,
        )
        assert _payloads(await claim(driver, "c", now=NOW + 50, limit=10)) == [b"b", b"d"]

    @pytest.mark.asyncio
    async def test_driver_expired_do_not_consume_limit(self, driver: Driver) -> None:
        """A limit is filled with live messages even if expired ones come first (SPEC 18)."""
        await driver.push([envelope("c", b"old", expires_at=NOW + 1)] * 5, NOW)
        await driver.push([envelope("c", b"new", expires_at=NOW + 100)] * 3, NOW)
        assert _payloads(await claim(driver, "c", now=NOW + 2, limit=2)) == [b"new", b"new"]

    @pytest.mark.asyncio
    async def test_driver_expired_not_returned_to_sibling(
        self, driver: Driver, sibling: Driver
    ) -> None:
        """Expiry holds for every instance (SPEC 18)."""
        await driver.push([envelope("c", b"x", expires_at=NOW + 1)], NOW)
        assert await claim(sibling, "c", now=NOW + 1) == []

    # ------------------------------------------------------------------------------- groups

    @pytest.mark.asyncio
    async def test_driver_group_add_and_list(self, driver: Driver) -> None:
        """Members are listed once each (SPEC 21)."""
        for channel in ("c1", "c2", "specific.p!x"):
            await driver.group_add("g", channel, channel.split(".")[-1], LATER)
        members = await driver.group_channels("g", NOW)
        assert isinstance(members, list)
        assert sorted(members) == ["c1", "c2", "specific.p!x"]
        assert all(isinstance(m, str) for m in members)

    @pytest.mark.asyncio
    async def test_driver_group_unknown_is_empty(self, driver: Driver) -> None:
        """An unknown group has no members (SPEC 21)."""
        assert await driver.group_channels("nobody-here", NOW) == []

    @pytest.mark.asyncio
    async def test_driver_group_add_idempotent(self, driver: Driver) -> None:
        """Adding twice leaves one membership (SPEC 19)."""
        for _ in range(3):
            await driver.group_add("g", "c", "c", LATER)
        assert await driver.group_channels("g", NOW) == ["c"]

    @pytest.mark.asyncio
    async def test_driver_group_add_refreshes_expiry(self, driver: Driver) -> None:
        """A later ``group_add`` extends the membership (SPEC 19)."""
        await driver.group_add("g", "c", "c", NOW + 10)
        await driver.group_add("g", "c", "c", NOW + 20)
        assert await driver.group_channels("g", NOW + 15) == ["c"]
        assert await driver.group_channels("g", NOW + 19.99) == ["c"]
        assert await driver.group_channels("g", NOW + 20) == []

    @pytest.mark.asyncio
    async def test_driver_group_membership_expiry_boundary(self, driver: Driver) -> None:
        """A membership with ``expires_at <= now`` is gone (SPEC 19)."""
        await driver.group_add("g", "old", "old", NOW + 10)
        await driver.group_add("g", "new", "new", NOW + 100)
        assert sorted(await driver.group_channels("g", NOW + 9.99)) == ["new", "old"]
        assert await driver.group_channels("g", NOW + 10) == ["new"]

    @pytest.mark.asyncio
    async def test_driver_group_readd_after_expiry(self, driver: Driver) -> None:
        """An expired member can join again (SPEC 19)."""
        await driver.group_add("g", "c", "c", NOW + 10)
        assert await driver.group_channels("g", NOW + 20) == []
        await driver.group_add("g", "c", "c", NOW + 40)
        assert await driver.group_channels("g", NOW + 30) == ["c"]

    @pytest.mark.asyncio
    async def test_driver_group_discard(self, driver: Driver) -> None:
        """Discard removes one member; unknown members and groups are no-ops (SPEC 19)."""
        await driver.group_add("g", "a", "a", LATER)
        await driver.group_add("g", "b", "b", LATER)
        await driver.group_discard("g", "a")
        assert await driver.group_channels("g", NOW) == ["b"]
        await driver.group_discard("g", "a")
        await driver.group_discard("g", "never-added")
        await driver.group_discard("no-such-group", "b")
        assert await driver.group_channels("g", NOW) == ["b"]
        await driver.group_discard("g", "b")
        assert await driver.group_channels("g", NOW) == []

    @pytest.mark.asyncio
    async def test_driver_group_discard_then_add(self, driver: Driver) -> None:
        """A discarded member can be added back (SPEC 19)."""
        await driver.group_add("g", "c", "c", LATER)
        await driver.group_discard("g", "c")
        await driver.group_add("g", "c", "c", LATER)
        assert await driver.group_channels("g", NOW) == ["c"]

    @pytest.mark.asyncio
    async def test_driver_groups_are_independent(self, driver: Driver) -> None:
        """Group names are compared exactly; one channel may be in many groups (SPEC 21)."""
        await driver.group_add("g", "c", "c", LATER)
        await driver.group_add("G", "d", "d", LATER)
        await driver.group_add("g2", "c", "c", LATER)
        await driver.group_add("g_", "e", "e", LATER)
        assert await driver.group_channels("g", NOW) == ["c"]
        assert await driver.group_channels("G", NOW) == ["d"]
        assert await driver.group_channels("g2", NOW) == ["c"]
        assert await driver.group_channels("g_", NOW) == ["e"]
        await driver.group_discard("g", "c")
        assert await driver.group_channels("g2", NOW) == ["c"]

    @pytest.mark.asyncio
    async def test_driver_group_many_members(self, driver: Driver) -> None:
        """A large group lists every member exactly once (SPEC 21)."""
        names = [f"member.{i}" for i in range(300)]
        for name in names:
            await driver.group_add("big", name, name, LATER)
        members = await driver.group_channels("big", NOW)
        assert len(members) == 300
        assert set(members) == set(names)

    @pytest.mark.asyncio
    async def test_driver_group_visible_to_sibling(self, driver: Driver, sibling: Driver) -> None:
        """Memberships are shared storage (SPEC 21)."""
        await driver.group_add("g", "c", "c", LATER)
        assert await sibling.group_channels("g", NOW) == ["c"]
        await sibling.group_discard("g", "c")
        assert await driver.group_channels("g", NOW) == []

    @pytest.mark.asyncio
    async def test_driver_group_concurrent_adds(self, driver: Driver, sibling: Driver) -> None:
        """Concurrent adds of the same member from two instances leave one membership."""
        await asyncio.gather(
            *(
                inst.group_add("g", f"c{i % 5}", f"c{i % 5}", LATER)
                for i, inst in zip(range(40), itertools.cycle([driver, sibling]))
            )
        )
        members = await driver.group_channels("g", NOW)
        assert sorted(members) == [f"c{i}" for i in range(5)]

    # ------------------------------------------------------------------------- purge, flush

    @pytest.mark.asyncio
    async def test_driver_purge_removes_only_expired(self, driver: Driver) -> None:
        """Purge drops expired rows, counts them, and keeps live ones (SPEC 18, 19)."""
        await driver.push(
            [envelope("c", b"old", expires_at=NOW + 5)] * 3
            + [envelope("c", b"live", expires_at=NOW + 100)] * 2,
            NOW,
        )
        await driver.group_add("g", "gone1", "gone1", NOW + 5)
        await driver.group_add("g", "gone2", "gone2", NOW + 5)
        await driver.group_add("g", "stays", "stays", NOW + 100)
        removed = await driver.purge(NOW + 10)
        assert isinstance(removed, int)
        assert removed >= 5
        assert await driver.purge(NOW + 10) == 0
        assert _payloads(await claim(driver, "c", now=NOW + 10)) == [b"live", b"live"]
        assert await driver.group_channels("g", NOW + 10) == ["stays"]

    @pytest.mark.asyncio
    async def test_driver_purge_with_nothing_expired(self, driver: Driver) -> None:
        """Purge of live data removes nothing (SPEC 18)."""
        assert await driver.purge(NOW) == 0
        await driver.push([envelope("c", b"x")], NOW)
        await driver.group_add("g", "c", "c", LATER)
        assert await driver.purge(NOW) == 0
        assert _payloads(await claim(driver, "c")) == [b"x"]
        assert await driver.group_channels("g", NOW) == ["c"]

    @pytest.mark.asyncio
    async def test_driver_flush_empties_everything(self, driver: Driver, sibling: Driver) -> None:
        """Flush deletes messages and memberships, for every instance (SPEC 22)."""
        await driver.push([envelope("a", b"1"), envelope("p.k!x", b"2", key="k!")], NOW)
        await sibling.push([envelope("b", b"3")], NOW)
        await driver.group_add("g", "a", "a", LATER)
        await sibling.group_add("h", "b", "b", LATER)
        await driver.flush()
        for inst in (driver, sibling):
            assert await claim(inst, "a") == []
            assert await claim(inst, "b") == []
            assert await claim(inst, "k!") == []
            assert await inst.group_channels("g", NOW) == []
            assert await inst.group_channels("h", NOW) == []

    @pytest.mark.asyncio
    async def test_driver_usable_after_flush(self, driver: Driver) -> None:
        """Storage works normally after a flush, capacity counts restart (SPEC 22)."""
        await driver.push([envelope("c", b"x", capacity=1)], NOW)
        await driver.flush()
        await driver.flush()
        assert await driver.push([envelope("c", b"y", capacity=1)], NOW) == [True]
        await driver.group_add("g", "c", "c", LATER)
        assert _payloads(await claim(driver, "c")) == [b"y"]
        assert await driver.group_channels("g", NOW) == ["c"]

    # ---------------------------------------------------------------- optional: peeks

    @pytest.mark.asyncio
    async def test_driver_peek_leaves_messages_stored(
        self, driver: Driver, sibling: Driver
    ) -> None:
        """peek returns messages oldest first, each with a hashable receipt, and changes
        nothing: peeking again returns the same, and a claim (here by a sibling) still gets
        them all."""
        peeks = _peeks(driver)
        await driver.push([envelope("p.k!1", b"%d" % n, key="k!") for n in range(3)], NOW)
        first = await _peek(peeks, "k!")
        assert [m.payload for _, m in first] == [b"0", b"1", b"2"]
        assert all(m.key == "k!" and m.channel == "p.k!1" for _, m in first)
        assert len({hash(receipt) for receipt, _ in first}) == 3
        second = await _peek(peeks, "k!")
        assert [receipt for receipt, _ in second] == [receipt for receipt, _ in first]
        assert _payloads(await claim(sibling, "k!")) == [b"0", b"1", b"2"]
        assert await _peek(peeks, "k!") == []

    @pytest.mark.asyncio
    async def test_driver_peek_skips_held_honours_limit_and_exclude(self, driver: Driver) -> None:
        """Held receipts are skipped and do not count against the limit; excluded channels
        are skipped; other keys are never returned."""
        peeks = _peeks(driver)
        await driver.push(
            [envelope(f"p.k!{n % 2}", b"%d" % n, key="k!") for n in range(6)]
            + [envelope("p.other!0", b"other", key="other!")],
            NOW,
        )
        head = await _peek(peeks, "k!", limit=2)
        assert [m.payload for _, m in head] == [b"0", b"1"]
        held = frozenset(receipt for receipt, _ in head)
        nxt = await _peek(peeks, "k!", limit=2, held=held)
        assert [m.payload for _, m in nxt] == [b"2", b"3"]
        only_even = await _peek(peeks, "k!", held=held, exclude=frozenset({"p.k!1"}))
        assert [m.payload for _, m in only_even] == [b"2", b"4"]
        assert await peeks.peek([ClaimRequest(key="k!", limit=0)], NOW, frozenset()) == []

    @pytest.mark.asyncio
    async def test_driver_peek_never_returns_expired(self, driver: Driver) -> None:
        """Expiry as for claim: ``expires_at <= now`` is never returned."""
        peeks = _peeks(driver)
        await driver.push(
            [
                envelope("p.k!1", b"old", key="k!", expires_at=NOW + 1),
                envelope("p.k!1", b"new", key="k!", expires_at=NOW + 2),
            ],
            NOW,
        )
        assert [m.payload for _, m in await _peek(peeks, "k!", now=NOW + 1)] == [b"new"]
        assert await _peek(peeks, "k!", now=NOW + 2) == []

    @pytest.mark.asyncio
    async def test_driver_remove_deletes_exactly_the_peeked(
        self, driver: Driver, sibling: Driver
    ) -> None:
        """remove deletes the messages of its receipts and nothing else; removing again,
        or from a sibling, is harmless."""
        peeks = _peeks(driver)
        await driver.push([envelope("p.k!1", b"%d" % n, key="k!") for n in range(4)], NOW)
        head = await _peek(peeks, "k!", limit=2)
        receipts = [receipt for receipt, _ in head]
        await peeks.remove(receipts)
        await peeks.remove(receipts)
        await _peeks(sibling).remove(receipts)
        assert [m.payload for _, m in await _peek(peeks, "k!")] == [b"2", b"3"]
        assert _payloads(await claim(driver, "k!")) == [b"2", b"3"]
        await peeks.remove([])

    @pytest.mark.asyncio
    async def test_driver_remove_spares_a_message_stored_later(self, driver: Driver) -> None:
        """A receipt whose message went another way (claimed, flushed) never removes a message
        stored afterwards, even one on the same channel with the same expiry, stored at the
        same ``now`` into emptied storage (where a row id may be handed out again)."""
        peeks = _peeks(driver)
        await driver.push([envelope("p.k!1", b"first", key="k!")], NOW)
        ((receipt, _),) = await _peek(peeks, "k!")
        await driver.flush()
        await driver.push([envelope("p.k!1", b"second", key="k!")], NOW)
        await peeks.remove([receipt])
        assert _payloads(await claim(driver, "k!")) == [b"second"]
        await driver.push([envelope("p.k!1", b"third", key="k!")], NOW)
        await peeks.remove([receipt])
        assert _payloads(await claim(driver, "k!")) == [b"third"]

    @pytest.mark.asyncio
    async def test_driver_peeked_messages_count_until_removed(self, driver: Driver) -> None:
        """A peeked message still occupies its channel's capacity; removing frees it."""
        peeks = _peeks(driver)
        full = [envelope("p.k!1", b"%d" % n, key="k!", capacity=2) for n in range(2)]
        assert await driver.push(full, NOW) == [True, True]
        peeked = await _peek(peeks, "k!")
        assert await driver.push([envelope("p.k!1", b"x", key="k!", capacity=2)], NOW) == [False]
        await peeks.remove([receipt for receipt, _ in peeked])
        assert await driver.push([envelope("p.k!1", b"y", key="k!", capacity=2)], NOW) == [True]
        assert _payloads(await claim(driver, "k!")) == [b"y"]

    # ---------------------------------------------------------------- optional: liveness

    async def _seed_processes(self, driver: Driver) -> None:
        """Messages and memberships for processes a!, b! and a plain channel."""
        await driver.push(
            [
                envelope("x.a!1", b"a-msg", key="a!"),
                envelope("x.b!1", b"b-msg", key="b!"),
                envelope("plain", b"plain-msg"),
            ],
            NOW,
        )
        await driver.group_add("g", "x.a!1", "a!", LATER)
        await driver.group_add("g", "x.b!1", "b!", LATER)
        await driver.group_add("g", "plain", "plain", LATER)

    @pytest.mark.asyncio
    async def test_driver_liveness_reaps_dead_process(self, driver: Driver) -> None:
        """An expired lease takes its messages and memberships with it (SPEC 20)."""
        live = _liveness(driver)
        await self._seed_processes(driver)
        assert await live.heartbeat("a!", NOW + 100, NOW) == []
        assert await live.heartbeat("b!", NOW + 5, NOW) == []
        reaped = await live.heartbeat("a!", NOW + 100, NOW + 10)
        assert reaped == ["b!"]
        assert await claim(driver, "b!", now=NOW + 10) == []
        assert _payloads(await claim(driver, "a!", now=NOW + 10)) == [b"a-msg"]
        assert _payloads(await claim(driver, "plain", now=NOW + 10)) == [b"plain-msg"]
        assert sorted(await driver.group_channels("g", NOW + 10)) == ["plain", "x.a!1"]
        # Reaped once only.
        assert await live.heartbeat("a!", NOW + 100, NOW + 11) == []

    @pytest.mark.asyncio
    async def test_driver_liveness_boundary_and_current_leases(self, driver: Driver) -> None:
        """A lease is dead at ``expires_at <= now``; a current one is never reaped (SPEC 20)."""
        live = _liveness(driver)
        await self._seed_processes(driver)
        await live.heartbeat("b!", NOW + 50, NOW)
        assert await live.heartbeat("a!", NOW + 100, NOW + 49.99) == []
        assert sorted(await driver.group_channels("g", NOW + 49.99)) == [
            "plain",
            "x.a!1",
            "x.b!1",
        ]
        assert await live.heartbeat("a!", NOW + 100, NOW + 50) == ["b!"]
        assert sorted(await driver.group_channels("g", NOW + 50)) == ["plain", "x.a!1"]

    @pytest.mark.asyncio
    async def test_driver_liveness_never_reaps_self_or_unleased(self, driver: Driver) -> None:
        """The caller's own key and keys without a lease are never reaped (SPEC 20)."""
        live = _liveness(driver)
        await self._seed_processes(driver)
        await live.heartbeat("a!", NOW + 5, NOW)
        # a!'s own lease ran out before it renewed: renewing must not reap itself.
        assert await live.heartbeat("a!", NOW + 100, NOW + 10) == []
        assert _payloads(await claim(driver, "a!", now=NOW + 10)) == [b"a-msg"]
        assert _payloads(await claim(driver, "b!", now=NOW + 10)) == [b"b-msg"]
        assert _payloads(await claim(driver, "plain", now=NOW + 10)) == [b"plain-msg"]

    @pytest.mark.asyncio
    async def test_driver_liveness_across_siblings(self, driver: Driver, sibling: Driver) -> None:
        """Leases are shared storage: one instance reaps another's dead process (SPEC 20)."""
        first, second = _liveness(driver), _liveness(sibling)
        await self._seed_processes(driver)
        await second.heartbeat("b!", NOW + 5, NOW)
        assert await first.heartbeat("a!", NOW + 100, NOW + 6) == ["b!"]
        assert await claim(sibling, "b!", now=NOW + 6) == []

    @pytest.mark.asyncio
    async def test_driver_liveness_release(self, driver: Driver) -> None:
        """``release`` drops the key's lease, messages and memberships only (SPEC 20, 24)."""
        live = _liveness(driver)
        await self._seed_processes(driver)
        await live.heartbeat("a!", NOW + 100, NOW)
        await live.heartbeat("b!", NOW + 100, NOW)
        await live.release("b!")
        await live.release("never-seen!")
        assert await claim(driver, "b!") == []
        assert _payloads(await claim(driver, "a!")) == [b"a-msg"]
        assert sorted(await driver.group_channels("g", NOW)) == ["plain", "x.a!1"]
        # Released, not expired: nothing left to reap later.
        assert await live.heartbeat("a!", NOW + 1000, NOW + 500) == []

    @pytest.mark.asyncio
    async def test_driver_liveness_flush_clears_leases(self, driver: Driver) -> None:
        """Flush also deletes liveness records (SPEC 22)."""
        live = _liveness(driver)
        await live.heartbeat("b!", NOW + 5, NOW)
        await driver.flush()
        assert await live.heartbeat("a!", NOW + 100, NOW + 10) == []

    # ------------------------------------------------------------------- optional: stats

    @pytest.mark.asyncio
    async def test_driver_stats_counts(self, driver: Driver) -> None:
        """Stats count unexpired messages per channel, expired ones apart, and groups."""
        stats = _stats(driver)
        empty = await stats.stats(NOW, 10)
        assert isinstance(empty, StorageStats)
        assert (empty.messages, empty.expired_messages) == (0, 0)
        assert dict(empty.channels) == {}
        assert dict(empty.groups) == {}
        await driver.push([envelope("a", b"1")] * 3 + [envelope("b", b"2")] * 2, NOW)
        await driver.push([envelope("c", b"3", expires_at=NOW + 1)], NOW)
        await driver.group_add("g", "a", "a", LATER)
        await driver.group_add("g", "b", "b", LATER)
        await driver.group_add("h", "a", "a", NOW + 1)
        snapshot = await stats.stats(NOW + 2, 10)
        assert snapshot.messages == 5
        assert snapshot.expired_messages == 1
        assert dict(snapshot.channels) == {"a": 3, "b": 2}
        # A group whose members all expired may be listed with 0 or left out.
        assert {g: n for g, n in snapshot.groups.items() if n} == {"g": 2}
        assert isinstance(snapshot.processes, int)
        assert snapshot.processes >= 0
        assert snapshot.storage_bytes is None or snapshot.storage_bytes >= 0

    @pytest.mark.asyncio
    async def test_driver_stats_top_limits_listing(self, driver: Driver) -> None:
        """``top`` bounds the per-channel listing, keeping the deepest channels."""
        stats = _stats(driver)
        await driver.push([envelope("deep", b"x")] * 5 + [envelope("shallow", b"y")], NOW)
        await driver.push([envelope("mid", b"z")] * 3, NOW)
        snapshot = await stats.stats(NOW, 1)
        assert dict(snapshot.channels) == {"deep": 5}
        assert snapshot.messages == 9

    @pytest.mark.asyncio
    async def test_driver_stats_processes_counts_leases(self, driver: Driver) -> None:
        """With liveness too, ``processes`` counts live leases."""
        stats = _stats(driver)
        live = _liveness(driver)
        await live.heartbeat("a!", NOW + 100, NOW)
        await live.heartbeat("b!", NOW + 100, NOW)
        assert (await stats.stats(NOW, 10)).processes == 2

    # ---------------------------------------------------------------- optional: notifier

    @pytest.mark.asyncio
    async def test_driver_notifier_fires_on_sibling_push(
        self, driver: Driver, sibling: Driver
    ) -> None:
        """A listener is called on the instance's own loop after another instance commits
        (SPEC 13, 23: wake-ups instead of slow polling)."""
        notifier = _notifier(driver)
        loop = asyncio.get_running_loop()
        fired = asyncio.Event()
        where: list[tuple[asyncio.AbstractEventLoop | None, int]] = []

        def callback() -> None:
            try:
                running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            where.append((running, threading.get_ident()))
            if running is loop:
                fired.set()
            else:
                loop.call_soon_threadsafe(fired.set)

        notifier.add_change_listener(callback)
        try:
            await sibling.push([envelope("wake", b"x")], NOW)
            await asyncio.wait_for(fired.wait(), GUARD)
        finally:
            notifier.remove_change_listener(callback)
        assert where
        assert all(running is loop for running, _ in where), "callback ran off the loop"
        assert all(ident == threading.get_ident() for _, ident in where)

    @pytest.mark.asyncio
    async def test_driver_notifier_remove_listener(self, driver: Driver, sibling: Driver) -> None:
        """A removed listener is no longer called."""
        notifier = _notifier(driver)
        kept = asyncio.Event()
        removed_calls: list[int] = []

        def removed() -> None:
            removed_calls.append(1)

        notifier.add_change_listener(removed)
        notifier.remove_change_listener(removed)
        notifier.add_change_listener(kept.set)
        try:
            await sibling.push([envelope("wake", b"x")], NOW)
            await asyncio.wait_for(kept.wait(), GUARD)
            await asyncio.sleep(0)
        finally:
            notifier.remove_change_listener(kept.set)
        assert removed_calls == []

    @pytest.mark.asyncio
    async def test_driver_deferred_notifications_are_not_lost(
        self, driver: Driver, sibling: Driver
    ) -> None:
        """A change committed while notifications are deferred is still notified once they
        are let through (DefersChanges: deferred, never dropped); deferring is idempotent."""
        notifier = _notifier(driver)
        if not isinstance(driver, DefersChanges):
            pytest.skip(
                f"driver {driver.name!r} does not implement the optional DefersChanges "
                "protocol (the core then hears of every change)"
            )
        fired = asyncio.Event()
        notifier.add_change_listener(fired.set)
        try:
            driver.defer_changes(True)
            driver.defer_changes(True)
            await sibling.push([envelope("wake", b"x")], NOW)
            for _ in range(5):
                await asyncio.sleep(0)
            # Deferring is permission, not obligation: a call while deferred counts too.
            driver.defer_changes(False)
            driver.defer_changes(False)
            await asyncio.wait_for(fired.wait(), GUARD)
        finally:
            driver.defer_changes(False)
            notifier.remove_change_listener(fired.set)

    @pytest.mark.asyncio
    async def test_driver_claim_ready_and_claim_give_each_message_once_in_order(
        self, driver: Driver, sibling: Driver
    ) -> None:
        """ClaimsReady, used as the core does (claim_ready right after each notification, a
        claim now and then): every message exactly once, in push order per channel, within
        the limit, never one of an excluded channel; claim_ready is a plain call."""
        notifier = _notifier(driver)
        if not isinstance(driver, ClaimsReady):
            pytest.skip(
                f"driver {driver.name!r} does not implement the optional ClaimsReady protocol "
                "(the core claims after every notification)"
            )
        key = "ready!"
        requests = [ClaimRequest(key=key, limit=2)]
        fired = asyncio.Event()
        notifier.add_change_listener(fired.set)
        got: list[Claimed] = []

        async def pushed(*batch: Envelope) -> None:
            fired.clear()
            await sibling.push(list(batch), NOW)
            await asyncio.wait_for(fired.wait(), GUARD)

        try:
            got += await driver.claim(requests, NOW)
            for i in range(40):
                await pushed(envelope(f"ready!{i % 2}", f"{i}".encode(), key=key))
                ready = driver.claim_ready(requests, NOW)
                assert isinstance(ready, list) and len(ready) <= 2
                got += ready
                # Claims often at first (a driver may take a drained claim as its cue to
                # hand messages on from notifications), then now and then.
                if i < 5 or i % 7 == 0:
                    got += await driver.claim(requests, NOW)
            await pushed(
                envelope("ready!skip", b"skip", key=key),
                envelope("ready!0", b"40", key=key),
            )
            skip = [ClaimRequest(key=key, limit=2, exclude=frozenset({"ready!skip"}))]
            # Notifications may be spurious (ChangeNotifier): one that came before a message
            # leaves it to a later call. Look again until the last message is in, at each
            # notification or every 50 ms.
            deadline = asyncio.get_running_loop().time() + GUARD
            while not any(m.payload == b"40" for m in got):
                assert asyncio.get_running_loop().time() < deadline, "message 40 never came"
                fired.clear()
                got += driver.claim_ready(skip, NOW)
                got += await driver.claim(skip, NOW)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fired.wait(), 0.05)
        finally:
            notifier.remove_change_listener(fired.set)
        assert all(m.channel != "ready!skip" for m in got)
        for c in range(2):
            mine = [int(m.payload) for m in got if m.channel == f"ready!{c}"]
            assert mine == list(range(c, 41, 2)), f"channel ready!{c}: {mine}"
        assert _payloads(await claim(driver, key, limit=10)) == [b"skip"]

    # ---------------------------------------------------------------- cross-process

    def _child_options(
        self, features: DriverFeatures, driver_name: str, driver_kwargs: dict[str, Any]
    ) -> str:
        if not features.cross_process:
            pytest.skip("driver does not declare features.cross_process")
        encoded = json_options(driver_kwargs)
        if encoded is None:
            pytest.skip("driver options are not JSON-serializable; cannot hand them to a child")
        return encoded

    @pytest.mark.asyncio
    async def test_driver_cross_process_claims_never_duplicate(
        self,
        driver: Driver,
        features: DriverFeatures,
        driver_name: str,
        driver_kwargs: dict[str, Any],
    ) -> None:
        """Two OS processes claiming one channel: each message exactly once (SPEC 10)."""
        options = self._child_options(features, driver_name, driver_kwargs)
        sent = [f"m{i}".encode() for i in range(600)]
        for chunk in iter_chunks(sent, 200):
            await driver.push([envelope("work", p) for p in chunk], NOW)
        command = {"op": "claim", "key": "work", "limit": 3, "now": NOW}
        children = await asyncio.gather(
            *(start_child(driver_name, options, command) for _ in range(2))
        )
        try:
            for child in children:
                await child.send_line("go")
            mine = _payloads(await drain(driver, "work", limit=3))
            theirs = [[bytes.fromhex(h) for h in await child.result()] for child in children]
        finally:
            for child in children:
                await child.finish()
        everything = mine + [p for result in theirs for p in result]
        assert len(everything) == len(sent), (len(mine), [len(t) for t in theirs])
        assert set(everything) == set(sent)
        for result in [mine, *theirs]:
            assert result == sorted(result, key=lambda p: int(p[1:])), "FIFO per claimer"

    @pytest.mark.asyncio
    async def test_driver_cross_process_capacity_exact(
        self,
        driver: Driver,
        features: DriverFeatures,
        driver_name: str,
        driver_kwargs: dict[str, Any],
    ) -> None:
        """Pushes from three OS processes never exceed capacity (SPEC 15)."""
        options = self._child_options(features, driver_name, driver_kwargs)
        command = {
            "op": "push",
            "channel": "race",
            "count": 60,
            "capacity": 50,
            "now": NOW,
            "expires_at": LATER,
        }
        children = await asyncio.gather(
            *(start_child(driver_name, options, {**command, "tag": f"child{n}"}) for n in range(2))
        )
        try:
            for child in children:
                await child.send_line("go")
            mine: list[bool] = []
            for i in range(60):
                env = envelope("race", f"parent-{i}".encode(), capacity=50)
                mine.extend(await driver.push([env], NOW))
            theirs: list[list[bool]] = [await child.result() for child in children]
        finally:
            for child in children:
                await child.finish()
        accepted = sum(mine) + sum(sum(flags) for flags in theirs)
        assert accepted == 50
        assert len(await drain(driver, "race")) == 50


def _torn_down_mid_call(
    driver: Driver,
    spins: int,
    call: Callable[[Driver], Awaitable[T]],
) -> T | None:
    """On a fresh event loop in this thread: start ``call`` on a new sibling, let the loop
    turn ``spins`` times, then tear the loop down as ``asyncio.run`` does (cancel every task,
    wait for them). Returns what the call returned, or None if it ended cancelled."""
    loop = asyncio.new_event_loop()
    try:
        inst = driver.sibling()
        loop.run_until_complete(inst.open())

        async def start() -> asyncio.Task[T]:
            task = asyncio.ensure_future(call(inst))
            for _ in range(spins):
                await asyncio.sleep(0)
            return task

        task = loop.run_until_complete(start())
        pending = asyncio.all_tasks(loop)
        for each in pending:
            each.cancel()

        async def settle() -> None:
            await asyncio.gather(*pending, return_exceptions=True)

        loop.run_until_complete(settle())
        loop.run_until_complete(inst.close())
        if task.cancelled():
            return None
        return task.result()
    finally:
        loop.close()
