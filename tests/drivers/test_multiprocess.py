"""The SQLite driver shared by several OS processes, each with its own layer and event loop.

Every child is started with the ``spawn`` context (a fresh interpreter, as uvicorn and gunicorn
workers are), builds its own ``ChannelLayer(driver="sqlite", path=...)`` on one shared file and
runs asyncio (the child side lives in mp_children.py). Children report through a
multiprocessing queue and line up on a Barrier so that the interesting part runs concurrently.
Timeouts exist only as a guard against hangs.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import sys
import time
from collections import Counter
from collections.abc import Iterator
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import pytest

# Children unpickle their target as ``mp_children.<name>``: make that importable whatever
# pytest's import mode (spawn hands sys.path on to the children).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import mp_children as kids  # noqa: E402

GUARD = kids.GUARD
CTX = multiprocessing.get_context("spawn")


class Children:
    """Starts children, collects their reports, and never leaves one running."""

    def __init__(self) -> None:
        self.results: Queue[Any] = CTX.Queue()
        self.processes: list[SpawnProcess] = []

    def start(self, tag: str, fn: kids.ChildFn, *args: Any) -> SpawnProcess:
        process = CTX.Process(
            target=kids.child_main, args=(fn, self.results, tag, args), name=tag, daemon=True
        )
        process.start()
        self.processes.append(process)
        return process

    def collect(self, tags: set[str]) -> dict[str, Any]:
        """Wait for one report from each of ``tags``; fail on the first error or after GUARD."""
        got: dict[str, Any] = {}
        remaining = set(tags)
        deadline = time.monotonic() + GUARD
        dead_since: dict[str, float] = {}
        while remaining:
            try:
                tag, status, value = self.results.get(timeout=0.25)
            except queue.Empty:
                now = time.monotonic()
                for process in self.processes:
                    if process.name in remaining and process.exitcode is not None:
                        # A child reports before it exits; allow its report time to arrive.
                        since = dead_since.setdefault(process.name, now)
                        if now - since > 2.0:
                            pytest.fail(
                                f"child {process.name} exited with {process.exitcode} "
                                "without reporting"
                            )
                if now > deadline:
                    alive = [p.name for p in self.processes if p.is_alive()]
                    pytest.fail(f"no report from {sorted(remaining)} in {GUARD}s (alive: {alive})")
                continue
            if status == "error":
                pytest.fail(f"child {tag} failed:\n{value}")
            assert tag in remaining, f"unexpected or repeated report from {tag}"
            remaining.discard(tag)
            got[tag] = value
        return got

    def join(self) -> None:
        for process in self.processes:
            process.join(GUARD)
            assert not process.is_alive(), f"{process.name} did not exit"
            assert process.exitcode == 0, f"{process.name} exited with {process.exitcode}"

    def stop_all(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
            process.join(5)
        self.results.close()
        self.results.join_thread()


@pytest.fixture
def children() -> Iterator[Children]:
    running = Children()
    try:
        yield running
    finally:
        running.stop_all()


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "shared.sqlite3")


def test_normal_channel_each_message_exactly_once(children: Children, db: str) -> None:
    """3 reader processes drain one channel while 2 writer processes fill it."""
    barrier = CTX.Barrier(kids.READERS + kids.WRITERS)
    readers = {f"reader{r}" for r in range(kids.READERS)}
    writers = {f"writer{w}" for w in range(kids.WRITERS)}
    for tag in sorted(readers):
        children.start(tag, kids.reader, db, barrier)
    for w, tag in enumerate(sorted(writers)):
        children.start(tag, kids.writer, db, barrier, w)

    sent = children.collect(writers)
    assert sum(sent.values()) == kids.WRITERS * kids.PER_WRITER
    # Every writer is done: one stop sentinel per reader, queued behind every message. Each
    # reader takes exactly one (it stops after it), so every reader ends.
    asyncio.run(kids.send_all(db, kids.WORK, [{"stop": True}] * kids.READERS))
    reports = children.collect(readers)
    children.join()

    counts = Counter(i for report in reports.values() for i in report["ids"])
    expected = {f"w{w}-{seq:04d}" for w in range(kids.WRITERS) for seq in range(kids.PER_WRITER)}
    duplicates = sorted(i for i, n in counts.items() if n > 1)
    assert duplicates == [], f"{len(duplicates)} message(s) delivered twice: {duplicates[:10]}"
    missing = sorted(expected - set(counts))
    assert missing == [], f"{len(missing)} message(s) lost: {missing[:10]}"
    assert set(counts) == expected
    assert len({report["pid"] for report in reports.values()}) == kids.READERS

    # A claim takes the oldest message first, so what one reader gets from one writer comes
    # in that writer's order.
    for tag, report in reports.items():
        for w in range(kids.WRITERS):
            mine = [i for i in report["ids"] if i.startswith(f"w{w}-")]
            assert mine == sorted(mine), f"{tag} got writer {w}'s messages out of order"


def test_process_specific_channels_cross_processes(children: Children, db: str) -> None:
    """A's new_channel() name travels to B; B sends to it and A receives, in order."""
    names: Queue[Any] = CTX.Queue()
    try:
        owner = children.start("owner", kids.specific_owner, db, names)
        try:
            channel = names.get(timeout=GUARD)
        except queue.Empty:
            pytest.fail(f"the owner process made no channel within {GUARD}s")
        assert channel.startswith("owner.")
        assert "!" in channel
        sender = children.start("sender", kids.specific_sender, db, channel)

        reports = children.collect({"owner", "sender"})
        children.join()
    finally:
        names.close()
        names.join_thread()

    assert reports["owner"]["pid"] == owner.pid
    assert reports["owner"]["channel"] == channel
    assert reports["owner"]["seqs"] == list(range(kids.SPECIFIC_COUNT)), "not FIFO"
    assert reports["sender"]["pid"] == sender.pid
    assert reports["sender"]["reply"] == {"type": "pong", "pid": owner.pid}


def test_group_send_reaches_members_in_other_processes(children: Children, db: str) -> None:
    """A and B each add their own channel to a group; C group_sends; both receive."""
    barrier = CTX.Barrier(3)
    children.start("member_a", kids.group_member, db, barrier)
    children.start("member_b", kids.group_member, db, barrier)
    children.start("sender", kids.group_sender, db, barrier)

    reports = children.collect({"member_a", "member_b", "sender"})
    children.join()

    sender_pid = reports["sender"]
    expected = [{"type": "room.message", "n": n, "pid": sender_pid} for n in (1, 2)]
    a, b = reports["member_a"], reports["member_b"]
    assert len({a["pid"], b["pid"], sender_pid}) == 3
    assert a["channel"] != b["channel"]
    assert a["got"] == expected
    assert b["got"] == expected


def test_capacity_exact_across_processes(children: Children, db: str) -> None:
    """3 processes send 120 messages at once to a channel of capacity 50: exactly 50 stored."""
    barrier = CTX.Barrier(kids.SENDERS)
    hammers = {f"hammer{s}" for s in range(kids.SENDERS)}
    for s, tag in enumerate(sorted(hammers)):
        children.start(tag, kids.hammer, db, barrier, s)
    reports = children.collect(hammers)
    children.join()

    stored = [ident for report in reports.values() for ident in report["stored"]]
    full = sum(report["full"] for report in reports.values())
    assert len(stored) == kids.CAPACITY, f"{len(stored)} sends stored for capacity 50"
    assert full == kids.SENDERS * kids.ATTEMPTS - kids.CAPACITY
    assert len(set(stored)) == kids.CAPACITY

    drained, after = asyncio.run(asyncio.wait_for(kids.drain(db, kids.CAPACITY), GUARD))
    assert sorted(drained) == sorted(stored)
    assert after == {"id": "marker"}
