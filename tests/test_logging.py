"""The INFO lines operators rely on: which driver and storage a layer started on, dead
processes reaped, group members skipped at capacity. (Giving up on a locked SQLite file is in
tests/reliability/test_faults.py; PostgreSQL's in tests/drivers/test_postgres_logging.py.)"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from channels_lite import ChannelLayer
from channels_lite.conformance._support import opened
from channels_lite.drivers.sqlite import SQLiteDriver

GUARD = 20.0


def info_lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.INFO
    ]


class _Seen(logging.Handler):
    """Sets an asyncio event, from whichever thread logs, when a line containing ``text``
    arrives: a test waits for the line itself instead of sleeping."""

    def __init__(self, text: str, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.INFO)
        self.text = text
        self.loop = loop
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.loop.call_soon_threadsafe(self.event.set)


@pytest.fixture
def seen() -> Iterator[list[_Seen]]:
    handlers: list[_Seen] = []
    yield handlers
    for handler in handlers:
        logging.getLogger("channels_lite").removeHandler(handler)


def watch(seen: list[_Seen], text: str) -> asyncio.Event:
    handler = _Seen(text, asyncio.get_running_loop())
    logging.getLogger("channels_lite").addHandler(handler)
    seen.append(handler)
    return handler.event


async def test_start_names_the_driver_and_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="channels_lite")
    path = tmp_path / "start.sqlite3"
    layer = ChannelLayer(driver="sqlite", path=str(path))
    try:
        await layer.send("log.start", {"n": 1})
        await layer.send("log.start", {"n": 2})
    finally:
        await layer.close()
    started = [line for line in info_lines(caplog, "channels_lite.core.layer") if "started" in line]
    assert started == [
        f"channels-lite: layer {layer.client_id} started on driver 'sqlite': sqlite at {path}"
    ]


async def test_start_names_the_memory_driver(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="channels_lite")
    layer = ChannelLayer(driver="memory")
    try:
        await layer.send("log.start", {"n": 1})
    finally:
        await layer.close()
    started = [line for line in info_lines(caplog, "channels_lite.core.layer") if "started" in line]
    assert len(started) == 1
    assert "started on driver 'memory'" in started[0]


async def test_reaping_a_dead_process_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, seen: list[_Seen]
) -> None:
    """A process that took a lease and died (it never renewed it): the next live process with
    channels removes it, and says so at INFO."""
    caplog.set_level(logging.INFO, logger="channels_lite")
    path = str(tmp_path / "reap.sqlite3")
    long_ago = time.time() - 3600
    async with opened(SQLiteDriver(path=path)) as dead:
        # Its lease ran out an hour ago, far beyond any process_timeout.
        assert await dead.heartbeat("log.dead!", long_ago, long_ago) == []
    reaped = watch(seen, "reaped")
    layer = ChannelLayer(driver="sqlite", path=path, process_timeout=5.0)
    try:
        await layer.new_channel("log")  # the first channel takes a lease, reaping on the way
        await asyncio.wait_for(reaped.wait(), GUARD)
    finally:
        await layer.close()
    assert info_lines(caplog, "channels_lite.core.upkeep") == [
        "channels-lite: reaped 1 dead process(es): ['log.dead!']"
    ]


async def test_group_send_skipping_full_members_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="channels_lite")
    layer = ChannelLayer(driver="memory", capacity=1)
    try:
        await layer.group_add("log.room", "log.full")
        await layer.group_add("log.room", "log.free")
        await layer.send("log.full", {"n": 0})
        await layer.group_send("log.room", {"n": 1})
    finally:
        await layer.close()
    assert info_lines(caplog, "channels_lite.core.layer")[-1] == (
        "channels-lite: group_send to 'log.room' skipped 1 of 2 member(s) at capacity"
    )
