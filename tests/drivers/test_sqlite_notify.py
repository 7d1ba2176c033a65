"""Change notification of the SQLite driver: inotify on Linux, data_version polling elsewhere."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from channels_lite.drivers.base import Envelope
from channels_lite.drivers.sqlite import SQLiteDriver, notify

NOW = 1_700_000_000.0
GUARD = 5.0

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux")


def commit_elsewhere(path: Path, channel: str = "c") -> None:
    """A commit by a plain sqlite3 connection, as another process would make it."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(
            "INSERT INTO channels_lite_messages (channel, key, payload, expires_at) "
            "VALUES (?, ?, ?, ?)",
            (channel, channel, b"x", NOW + 60),
        )
    finally:
        conn.close()


@pytest.fixture
def force_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(*args: object, **kwargs: object) -> None:
        raise OSError(24, "Too many open files (simulated)")

    monkeypatch.setattr(notify, "InotifyWatcher", unavailable)


def event_listener() -> tuple[asyncio.Event, Callable[[], None], list[int]]:
    """An Event set by the listener, plus the thread ids it was called on."""
    fired = asyncio.Event()
    threads: list[int] = []

    def listener() -> None:
        threads.append(threading.get_ident())
        fired.set()

    return fired, listener, threads


@linux_only
async def test_inotify_fires_on_commit_by_another_connection(
    driver: SQLiteDriver, db_path: Path
) -> None:
    fired, listener, threads = event_listener()
    driver.add_change_listener(listener)
    assert isinstance(driver._watcher, notify.InotifyWatcher)
    commit_elsewhere(db_path)
    await asyncio.wait_for(fired.wait(), GUARD)
    assert set(threads) == {threading.get_ident()}, "listeners run on the driver's loop"
    driver.remove_change_listener(listener)


async def test_polling_fallback_fires_and_stops(
    db_path: Path, force_polling: None, caplog: pytest.LogCaptureFixture
) -> None:
    before = set(threading.enumerate())
    caplog.set_level(logging.DEBUG, logger="channels_lite.drivers.sqlite")
    instance = SQLiteDriver(path=db_path)
    await instance.open()
    fired, listener, threads = event_listener()
    instance.add_change_listener(listener)
    watcher = instance._watcher
    assert isinstance(watcher, notify.DataVersionPoller)
    assert "inotify limit reached" in caplog.text
    assert "max_user_instances" in caplog.text
    # The poller's first reading must be in place before the commit it should notice.
    await asyncio.wait_for(watcher.ready.wait(), GUARD)
    assert len(set(threading.enumerate()) - before) == 2  # driver's and poller's connections
    commit_elsewhere(db_path)
    await asyncio.wait_for(fired.wait(), GUARD)
    assert set(threads) == {threading.get_ident()}
    await instance.close()
    assert set(threading.enumerate()) == before


async def test_polling_sees_sibling_commits(
    driver: SQLiteDriver, db_path: Path, force_polling: None
) -> None:
    fired, listener, _ = event_listener()
    driver.add_change_listener(listener)
    other = driver.sibling()
    await other.open()
    try:
        for attempt in range(50):
            await other.push(
                [Envelope(channel="c", key="c", payload=b"x", expires_at=NOW + 60, capacity=99)],
                NOW,
            )
            try:
                await asyncio.wait_for(fired.wait(), 0.1)
                break
            except TimeoutError:
                assert attempt < 49, "no notification after 50 commits"
    finally:
        await other.close()


@linux_only
async def test_listener_added_before_open(db_path: Path) -> None:
    instance = SQLiteDriver(path=db_path)
    fired, listener, _ = event_listener()
    instance.add_change_listener(listener)
    assert instance._watcher is None
    await instance.open()
    try:
        assert instance._watcher is not None
        commit_elsewhere(db_path)
        await asyncio.wait_for(fired.wait(), GUARD)
    finally:
        await instance.close()
    assert instance._watcher is None


@linux_only
async def test_watcher_stops_with_last_listener(driver: SQLiteDriver) -> None:
    def open_fds() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    baseline = open_fds()
    first, second = (lambda: None), (lambda: None)
    driver.add_change_listener(first)
    driver.add_change_listener(second)
    assert len(open_fds() - baseline) == 1  # one inotify descriptor, however many listeners
    driver.remove_change_listener(first)
    assert driver._watcher is not None
    driver.remove_change_listener(second)
    driver.remove_change_listener(second)  # unknown listener: ignored
    assert driver._watcher is None
    await asyncio.sleep(0)  # the stop task runs on the loop
    assert open_fds() - baseline == set()


async def test_failing_listener_is_logged_and_others_still_run(
    driver: SQLiteDriver, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise RuntimeError("listener bug")

    fired, listener, _ = event_listener()
    driver.add_change_listener(broken)
    driver.add_change_listener(listener)
    commit_elsewhere(db_path)
    await asyncio.wait_for(fired.wait(), GUARD)
    assert "listener bug" in caplog.text


@linux_only
async def test_unrelated_files_do_not_wake(driver: SQLiteDriver, db_path: Path) -> None:
    fired, listener, _ = event_listener()
    driver.add_change_listener(listener)
    watcher = driver._watcher
    assert isinstance(watcher, notify.InotifyWatcher)
    for i in range(20):
        (db_path.parent / f"noise-{i}.txt").write_text("x")
    (db_path.parent / "notify.sqlite3-journal-not").write_text("x")
    # The kernel queued those events as the writes happened; drain them now, synchronously.
    watcher._readable()
    assert not fired.is_set()
    commit_elsewhere(db_path)
    await asyncio.wait_for(fired.wait(), GUARD)


@linux_only
async def test_burst_of_commits_is_coalesced(driver: SQLiteDriver, db_path: Path) -> None:
    calls: list[int] = []
    done = asyncio.Event()
    driver.add_change_listener(lambda: (calls.append(1), done.set()))
    # Many commits while the loop is busy: their events are drained in one reader callback.
    for _ in range(30):
        commit_elsewhere(db_path)
    await asyncio.wait_for(done.wait(), GUARD)
    await asyncio.sleep(0)
    assert len(calls) == 1


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(GUARD):
        while not condition():
            await asyncio.sleep(0.001)


@linux_only
async def test_own_inline_writes_do_not_wake(driver: SQLiteDriver, db_path: Path) -> None:
    """inotify reports this process's own commits too; data_version of the inline connection
    tells them apart, so they wake nobody (the core hears of its own pushes directly), while
    another connection's commit still does."""
    await driver.push([Envelope("c", "c", b"first", NOW + 60, 100)], NOW)  # inline conn open
    fired, listener, _ = event_listener()
    driver.add_change_listener(listener)
    watcher, visible = driver._watcher, driver._visible
    assert isinstance(watcher, notify.InotifyWatcher)
    assert visible is not None
    for n in range(5):
        await driver.push([Envelope("c", "c", b"%d" % n, NOW + 60, 100)], NOW)
    watcher._readable()  # drain the kernel's events for those writes now
    await _until(lambda: visible.suppressed >= 1)
    assert not fired.is_set()
    assert visible.passed == 0
    commit_elsewhere(db_path)
    await asyncio.wait_for(fired.wait(), GUARD)
    assert visible.passed == 1


async def test_visible_changes_waits_for_a_commit_to_become_visible() -> None:
    """A file event can precede the visibility of its commit: the filter looks again at
    growing intervals and passes the event on once data_version moves."""
    loop = asyncio.get_running_loop()
    readings = iter([7, 7, 7, 7, 8])
    fired = asyncio.Event()
    visible = notify.VisibleChanges(loop, lambda: next(readings), fired.set)  # reads 7
    visible()  # 7: unchanged, look again later
    assert not fired.is_set()
    await asyncio.wait_for(fired.wait(), GUARD)  # 7, 7, then 8
    assert (visible.passed, visible.suppressed) == (1, 0)


async def test_visible_changes_looks_soon_at_a_new_event_behind_a_late_look() -> None:
    """An event that comes while the looks of an earlier one have grown far apart gets its
    own first look within the first interval, not at the earlier event's next, late look."""
    loop = asyncio.get_running_loop()
    reads: list[int] = []

    def read() -> int:
        reads.append(1)
        return 3

    visible = notify.VisibleChanges(loop, read, lambda: None)
    visible()  # unchanged: looks at 1, 2, 4, ... ms
    await _until(lambda: len(reads) >= 4)  # construction, the event, two looks
    timer = visible._timer
    assert timer is not None
    assert timer.when() - loop.time() > notify._LOOK_AGAIN[0], "the next look is a late one"
    visible()  # another process's commit, not yet visible
    timer = visible._timer
    assert timer is not None
    assert timer.when() - loop.time() <= notify._LOOK_AGAIN[0]
    visible.stop()


async def test_visible_changes_gives_up_on_own_writes_and_passes_unknowns() -> None:
    loop = asyncio.get_running_loop()
    calls: list[int] = []
    visible = notify.VisibleChanges(loop, lambda: 3, lambda: calls.append(1))
    visible()
    await _until(lambda: visible.suppressed == 1)
    assert calls == []
    blind = notify.VisibleChanges(loop, lambda: None, lambda: calls.append(1))
    blind()
    blind()
    assert calls == [1, 1], "no inline connection: every event is passed on"


@linux_only
async def test_deferred_notifications_arrive_once_let_through(
    driver: SQLiteDriver, db_path: Path
) -> None:
    """While the core defers notifications the watcher does not read the kernel's events
    (no listener call, however many loop turns); they are queued, not lost, and the first
    turn after ``defer_changes(False)`` passes the commit on."""
    fired, listener, _ = event_listener()
    driver.add_change_listener(listener)
    watcher = driver._watcher
    assert isinstance(watcher, notify.InotifyWatcher)
    # Control: undeferred, a commit elsewhere reaches the listener within a few loop turns
    # (its event is queued before commit_elsewhere returns).
    commit_elsewhere(db_path)
    await asyncio.wait_for(fired.wait(), GUARD)
    fired.clear()
    driver.defer_changes(True)
    driver.defer_changes(True)  # idempotent
    commit_elsewhere(db_path)
    for _ in range(20):
        await asyncio.sleep(0)
    assert not fired.is_set(), "a deferred notification was delivered"
    driver.defer_changes(False)
    driver.defer_changes(False)
    await asyncio.wait_for(fired.wait(), GUARD)
    driver.remove_change_listener(listener)


@linux_only
async def test_a_watcher_started_while_deferred_starts_deferred(
    driver: SQLiteDriver, db_path: Path
) -> None:
    """Deferral set before any listener exists applies to the watcher started later, and
    closing a deferred watcher releases its descriptor cleanly."""
    driver.defer_changes(True)
    fired, listener, _ = event_listener()
    driver.add_change_listener(listener)
    watcher = driver._watcher
    assert isinstance(watcher, notify.InotifyWatcher)
    commit_elsewhere(db_path)
    for _ in range(20):
        await asyncio.sleep(0)
    assert not fired.is_set()
    driver.defer_changes(False)
    await asyncio.wait_for(fired.wait(), GUARD)
    driver.defer_changes(True)
    driver.remove_change_listener(listener)
    await driver._listeners.settle()
    assert watcher._fd is None


async def test_a_key_that_the_last_announced_commit_filled_skips_the_precheck(
    driver: SQLiteDriver, db_path: Path, prechecked: list[str]
) -> None:
    """Two processes talking: when a notification comes and the last one was followed by
    messages for a key, the claim goes straight to its write transaction. A claim with no
    notification since keeps the read-only check; a guess that finds nothing ends it."""
    from channels_lite.drivers.base import ClaimRequest

    checked = prechecked
    fired, listener, _ = event_listener()
    driver.add_change_listener(listener)
    request = [ClaimRequest("k", 8)]

    async def announced(channel: str) -> None:
        fired.clear()
        await asyncio.to_thread(commit_elsewhere, db_path, channel)
        await asyncio.wait_for(fired.wait(), GUARD)

    assert await driver.claim(request, NOW) == []  # opens the connection; nothing announced
    await announced("k")
    assert [m.channel for m in await driver.claim(request, NOW)] == ["k"]
    assert checked == ["k", "k"], "no hit yet: the first announced claim checks"
    await announced("k")
    assert [m.channel for m in await driver.claim(request, NOW)] == ["k"]
    assert checked == ["k", "k"], "the last announcement filled 'k': no check"
    assert await driver.claim(request, NOW) == []
    assert checked == ["k", "k", "k"], "nothing announced since: the check is back"
    await announced("elsewhere")
    assert await driver.claim(request, NOW) == []  # the guess, wrong: an empty write
    assert checked == ["k", "k", "k"]
    await announced("elsewhere")
    assert await driver.claim(request, NOW) == []
    assert checked == ["k", "k", "k", "k"], "a wrong guess did not end the guessing"
    driver.remove_change_listener(listener)
