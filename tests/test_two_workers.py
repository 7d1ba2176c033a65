"""Two real server worker processes sharing the zero-configuration layer.

``uvicorn --workers 2`` serves tests/twoworkers_app (Django + Channels, CHANNEL_LAYERS without
CONFIG, BASE_DIR in a temporary directory). Websocket clients connect until two of them are
served by different worker processes; a message sent through one reaches the other through
the SQLite file both workers share. The server runs in its own process group, killed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from channels_lite.drivers.sqlite import SQLiteDriver
from twoworkers_app.protocol import BLOCK

TESTS_DIR = Path(__file__).resolve().parent
#: Failure guard only.
GUARD = 30.0
#: Connections tried before giving up on reaching both workers (two suffice, see the pairing).
MAX_CONNECTIONS = 6
#: How long a worker stalls so that the other one accepts the next connection.
STALL = 1.0
_STARTED = re.compile(rb"Started server process \[(\d+)\]")


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    workers: set[int]
    database: Path
    log: Path


@dataclass
class Client:
    ws: ClientConnection
    pid: int
    channel: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _live_members(pgid: int) -> list[int]:
    """Pids of non-zombie processes in process group ``pgid`` (Linux /proc; else best effort)."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # After "(comm)": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != b"Z":
            found.append(int(entry))
    return found


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole group, then SIGKILL whatever is left; never leave a worker behind."""
    pgid = process.pid  # start_new_session=True: the server leads its own group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)
    deadline = time.monotonic() + 10
    while _live_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(10)


def _wait_until_ready(process: subprocess.Popen[bytes], port: int, log: Path) -> set[int]:
    """Poll until the port accepts connections and both workers have loaded the app."""
    deadline = time.monotonic() + GUARD
    listening = False
    workers: set[int] = set()
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"uvicorn exited with {process.returncode}:\n{log.read_text(errors='replace')}"
            )
        if not listening:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                listening = True
            except OSError:
                pass
        workers = {int(pid) for pid in _STARTED.findall(log.read_bytes())}
        if listening and len(workers) >= 2:
            return workers
        time.sleep(0.05)
    pytest.fail(
        f"uvicorn not ready within {GUARD}s (listening={listening}, workers={workers}):\n"
        f"{log.read_text(errors='replace')}"
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    base = tmp_path / "project"
    base.mkdir()
    log = tmp_path / "uvicorn.log"
    port = _free_port()
    env = dict(os.environ)
    env["CHANNELS_LITE_TEST_BASE_DIR"] = str(base)
    env["DJANGO_SETTINGS_MODULE"] = "twoworkers_app.settings"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH")) if p)
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "twoworkers_app.asgi:application",
        "--app-dir",
        str(TESTS_DIR),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "2",
        "--lifespan",
        "off",
        "--log-level",
        "info",
        "--no-access-log",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
    try:
        workers = _wait_until_ready(process, port, log)
        yield Server(
            f"ws://127.0.0.1:{port}/ws/room/",
            process,
            workers,
            base / "channels-lite.sqlite3",
            log,
        )
    finally:
        _stop(process)
    assert _live_members(process.pid) == [], "a server process outlived the test"


async def _recv_json(ws: ClientConnection) -> dict[str, Any]:
    data = await asyncio.wait_for(ws.recv(), GUARD)
    result: dict[str, Any] = json.loads(data)
    return result


async def _pair_on_two_workers(
    server: Server, stack: contextlib.AsyncExitStack
) -> tuple[Client, Client, int]:
    """Connect until two clients are served by different workers.

    Every connection stays open (closed by ``stack``); returns the pair and how many are open.
    """
    by_pid: dict[int, Client] = {}
    for opened in range(1, MAX_CONNECTIONS + 1):
        ws = await stack.enter_async_context(connect(server.url, open_timeout=GUARD))
        hello = await _recv_json(ws)
        assert hello["pid"] in server.workers, hello
        by_pid.setdefault(hello["pid"], Client(ws, hello["pid"], hello["channel"]))
        if len(by_pid) == 2:
            first, second = by_pid.values()
            return first, second, opened
        # Which idle worker accepts is the kernel's choice, and on a loaded machine the same
        # one can win every time. Stall the one that just accepted: while its event loop is
        # blocked, only the other worker can take the next connection.
        await ws.send(f"{BLOCK}{STALL}")
        await asyncio.sleep(0.05)  # the stall has begun
    pytest.fail(
        f"{MAX_CONNECTIONS} connections all landed on worker {sorted(by_pid)} of "
        f"{sorted(server.workers)}:\n{server.log.read_text(errors='replace')}"
    )


async def _members(database: Path) -> int:
    driver = SQLiteDriver(path=database)
    await driver.open()
    try:
        stats = await driver.stats(time.time(), 100)
    finally:
        await driver.close()
    return stats.groups.get("room", 0)


async def _wait_for_members(database: Path, expected: int) -> None:
    """Disconnect handlers run after the client's close returns: poll until they did."""
    deadline = time.monotonic() + GUARD
    count = await _members(database)
    while count != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        count = await _members(database)
    assert count == expected, f"group 'room' has {count} member(s), expected {expected}"


async def _exchange(sender: Client, receiver: Client, text: str) -> None:
    await sender.ws.send(text)
    assert await _recv_json(receiver.ws) == {
        "text": text,
        "from_pid": sender.pid,
        "pid": receiver.pid,
    }
    # The sender is a member too: it gets its own message back.
    assert await _recv_json(sender.ws) == {"text": text, "from_pid": sender.pid, "pid": sender.pid}


async def test_group_messages_cross_two_uvicorn_workers(server: Server) -> None:
    async with contextlib.AsyncExitStack() as stack:
        a, b, opened = await _pair_on_two_workers(server, stack)
        assert a.pid != b.pid
        await _exchange(a, b, "hello from the first worker")
        await _exchange(b, a, "and back from the second")
        await _wait_for_members(server.database, opened)

    # Every client is gone: their consumers left the group, in both workers.
    await _wait_for_members(server.database, 0)

    # Reconnecting works, in both directions, and only the new clients are members.
    async with contextlib.AsyncExitStack() as stack:
        c, d, opened = await _pair_on_two_workers(server, stack)
        await _exchange(d, c, "after reconnecting")
        await _exchange(c, d, "still working")
        await _wait_for_members(server.database, opened)
    await _wait_for_members(server.database, 0)

    assert stat.S_IMODE(server.database.stat().st_mode) == 0o600
