"""Lifecycle: many event loops (``async_to_sync`` from the main thread and from threads, as sync
views and Celery tasks do), and nothing left behind: no thread, file descriptor or task after
``close()`` or after a loop closes; ``flush()`` while receivers wait in several loops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync

from channels_lite import ChannelLayer

GUARD = 30.0


def fds() -> set[str]:
    """This process's open file descriptors (Linux), by number."""
    return set(os.listdir("/proc/self/fd"))


def described(numbers: set[str]) -> dict[str, str]:
    """What each descriptor points at (a file, socket:[...], anon_inode:[eventpoll]...)."""
    out = {}
    for number in sorted(numbers, key=int):
        try:
            out[number] = os.readlink(f"/proc/self/fd/{number}")
        except OSError:
            out[number] = "(closed meanwhile)"
    return out


def threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def settles(check: Callable[[], bool], within: float = 5.0) -> bool:
    """``check`` becomes true soon: thread pools and loop shutdowns finish asynchronously."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="counts descriptors in /proc/self/fd"
)


@pytest.fixture
def baseline() -> Iterator[tuple[set[threading.Thread], set[str]]]:
    """Threads and descriptors before the test; the test must end with no more than these."""
    before = (threads(), fds())
    yield before


def assert_back_to(baseline: tuple[set[threading.Thread], set[str]], what: str) -> None:
    before_threads, before_fds = baseline
    assert settles(lambda: threads() <= before_threads), (
        f"threads left {what}: {sorted(t.name for t in threads() - before_threads)}"
    )
    assert settles(lambda: fds() <= before_fds), (
        f"descriptors left {what}: {described(fds() - before_fds)}"
    )


@linux_only
def test_many_loops_from_threads_no_loss_no_leak(
    tmp_path: Path, baseline: tuple[set[threading.Thread], set[str]]
) -> None:
    """Every ``async_to_sync`` call runs its own event loop, which closes when the call
    returns, often while the claim loop that served it is in the middle of a claim. Four
    threads and the main thread do it at once: every message arrives, exactly, and nothing
    leaks."""
    layer = ChannelLayer(driver="sqlite", path=tmp_path / "loops.sqlite3")
    send = async_to_sync(layer.send)
    receive = async_to_sync(layer.receive)

    def conversation(name: str, rounds: int) -> list[Any]:
        got = []
        for n in range(rounds):
            send(f"lc.{name}", {"n": n, "from": name})
            got.append(receive(f"lc.{name}"))
        return got

    assert conversation("main", 15) == [{"n": n, "from": "main"} for n in range(15)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(conversation, name, 15) for name in "abcd"}
        for name, future in futures.items():
            assert future.result(timeout=GUARD * 2) == [
                {"n": n, "from": name} for n in range(15)
            ], name
    state = layer.local_state()
    assert state["buffered_channels"] == 0
    assert state["waiting_channels"] == 0
    assert state["loops"] <= 1  # loops that closed gave their driver back
    assert_back_to(baseline, "after the loops closed")
    async_to_sync(layer.close)()
    assert_back_to(baseline, "after close()")


@linux_only
def test_close_leaves_no_task_thread_or_descriptor(
    tmp_path: Path, baseline: tuple[set[threading.Thread], set[str]]
) -> None:
    """A layer used for everything (process-specific channels with their lease renewals,
    groups, cancelled receives, a receiver on a second loop in a thread), then closed: only
    the caller's own task is left, and every worker thread and descriptor is gone."""

    async def scenario() -> set[asyncio.Task[Any]]:
        layer = ChannelLayer(driver="sqlite", path=tmp_path / "close.sqlite3", purge_interval=0.2)
        mine = await layer.new_channel()
        await layer.group_add("lc.room", mine)
        await layer.group_send("lc.room", {"n": 1})
        assert await asyncio.wait_for(layer.receive(mine), GUARD) == {"n": 1}
        for _ in range(5):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(layer.receive("lc.nobody"), 0.01)

        def elsewhere() -> Any:
            return asyncio.run(asyncio.wait_for(layer.receive("lc.other-loop"), GUARD))

        other = asyncio.ensure_future(asyncio.to_thread(elsewhere))
        await asyncio.sleep(0.1)
        await layer.send("lc.other-loop", {"n": 2})
        assert await other == {"n": 2}
        await asyncio.sleep(0.3)  # a purge round and a lease renewal run meanwhile
        await layer.close()
        return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]

    assert asyncio.run(scenario()) == set()
    assert_back_to(baseline, "after close() and the loop closing")


@linux_only
def test_loop_closing_without_close_releases_its_driver(
    tmp_path: Path, baseline: tuple[set[threading.Thread], set[str]]
) -> None:
    """Nobody calls ``close()`` (a Celery task's ``async_to_sync`` call ends): the loop's own
    driver and worker thread go with the loop."""
    layer = ChannelLayer(driver="sqlite", path=tmp_path / "noclose.sqlite3")

    async def use(n: int) -> Any:
        await layer.send("lc.c", {"n": n})
        return await layer.receive("lc.c")

    for n in range(10):
        assert asyncio.run(use(n)) == {"n": n}
        assert layer.local_state()["loops"] == 0
    assert_back_to(baseline, "after the loops closed")


async def test_flush_while_receivers_wait_in_several_loops(tmp_path: Path) -> None:
    """Receivers wait on this loop (a normal and a process-specific channel) and on a thread's
    loop; another thread flushes through ``async_to_sync``. Nothing from before the flush is
    delivered after it; every receiver gets what is sent afterwards."""
    path = tmp_path / "flush.sqlite3"
    layer = ChannelLayer(driver="sqlite", path=path)
    other_process = ChannelLayer(driver="sqlite", path=path)
    try:
        mine = await layer.new_channel()
        await other_process.send("lc.old", {"n": "before-flush"})
        await other_process.send(mine, {"n": "buffered-before-flush"})
        await other_process.send(mine, {"n": "buffered-before-flush-2"})
        assert await asyncio.wait_for(layer.receive(mine), GUARD) == {"n": "buffered-before-flush"}
        here_normal = asyncio.create_task(layer.receive("lc.normal"))
        started = threading.Event()

        def thread_receiver() -> Any:
            async def wait() -> Any:
                started.set()
                return await layer.receive("lc.thread")

            return asyncio.run(asyncio.wait_for(wait(), GUARD))

        in_thread = asyncio.ensure_future(asyncio.to_thread(thread_receiver))
        await asyncio.to_thread(started.wait, GUARD)
        await asyncio.sleep(0.1)
        await asyncio.to_thread(async_to_sync(other_process.flush))
        await asyncio.to_thread(async_to_sync(layer.flush))
        here_specific = asyncio.create_task(layer.receive(mine))
        await asyncio.sleep(0.05)
        assert not here_normal.done() and not here_specific.done() and not in_thread.done()
        await other_process.send("lc.normal", {"n": "after"})
        await other_process.send(mine, {"n": "after"})
        await other_process.send("lc.thread", {"n": "after"})
        await other_process.send("lc.old", {"n": "after"})
        assert await asyncio.wait_for(here_normal, GUARD) == {"n": "after"}
        assert await asyncio.wait_for(here_specific, GUARD) == {"n": "after"}
        assert await asyncio.wait_for(in_thread, GUARD) == {"n": "after"}
        assert await asyncio.wait_for(layer.receive("lc.old"), GUARD) == {"n": "after"}
    finally:
        await layer.close()
        await other_process.close()


async def test_receive_pending_across_close_then_reuse(tmp_path: Path) -> None:
    """``close()`` while a receive waits, then the layer is used again (its docstring says it
    can be): a new receive gets new messages."""
    path = tmp_path / "reuse.sqlite3"
    layer = ChannelLayer(driver="sqlite", path=path)
    sender = ChannelLayer(driver="sqlite", path=path)
    try:
        pending = asyncio.create_task(layer.receive("lc.w"))
        await asyncio.sleep(0.05)
        await layer.close()
        await asyncio.sleep(1.5)  # the waiting receiver's liveness check fires meanwhile
        pending.cancel()
        await sender.send("lc.w", {"n": "after-close"})
        assert await asyncio.wait_for(layer.receive("lc.w"), 2) == {"n": "after-close"}
    finally:
        await layer.close()
        await sender.close()
