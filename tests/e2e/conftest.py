"""A real example-chat server for the end-to-end tests: ``examples/chat/run.py``, two workers.

The server runs in its own process group on a free port of 127.0.0.1, with the layer's SQLite file
in a temporary directory; the fixture stops the whole group and checks nothing is left behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHAT = REPO / "examples" / "chat"
WORKERS = 2
URL_LINE = re.compile(rb"Open (http://127\.0\.0\.1:(\d+)/)")


@dataclass
class ChatServer:
    proc: subprocess.Popen[bytes]
    url: str  # http://127.0.0.1:<port>/
    port: int
    data_dir: Path
    log_path: Path

    @property
    def origin(self) -> str:
        return self.url.rstrip("/")

    def ws_url(self, room: str, name: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/chat/{room}/?name={name}"

    def env(self) -> dict[str, str]:
        return chat_env(self.data_dir)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def manage(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``examples/chat/manage.py`` against this server's layer file."""
        return subprocess.run(
            [sys.executable, str(CHAT / "manage.py"), *args],
            cwd=REPO,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stop(self) -> list[str]:
        """Stop the process group; return descriptions of processes that would not go."""
        pgid = self.proc.pid
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                continue
            if wait_group_gone(pgid, grace):
                break
        self.proc.wait(5)
        leftovers = group_members(pgid)
        if leftovers:
            os.killpg(pgid, signal.SIGKILL)
        return leftovers


def chat_env(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env["CHAT_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def group_members(pgid: int) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # /proc/<pid>/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


def wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return True
        time.sleep(0.05)
    return not group_members(pgid)


def start_chat_server(data_dir: Path, log_path: Path, timeout: float = 60) -> ChatServer:
    data_dir.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(CHAT / "run.py"), "--port", "0", "--workers", str(WORKERS)],
            cwd=REPO,
            env=chat_env(data_dir),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends the workers too
        )
    server = None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"run.py exited with {proc.returncode}")
            text = log_path.read_bytes()
            match = URL_LINE.search(text)
            if match and server is None:
                server = ChatServer(proc, match[1].decode(), int(match[2]), data_dir, log_path)
            if server and text.count(b"Application startup complete.") >= WORKERS:
                with urllib.request.urlopen(server.url, timeout=5) as response:
                    assert response.status == 200
                return server
            time.sleep(0.05)
        raise RuntimeError(f"the chat server did not start within {timeout}s")
    except Exception as exc:
        ChatServer(proc, "", 0, data_dir, log_path).stop()
        raise RuntimeError(f"{exc}\n--- server log ---\n{log_path.read_text()}") from exc


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatServer]:
    base = tmp_path_factory.mktemp("chat")
    server = start_chat_server(base / "data", base / "server.log")
    try:
        yield server
    finally:
        leftovers = server.stop()
    assert not leftovers, f"processes left after stopping the server: {leftovers}"
    assert (base / "data" / "channels-lite.sqlite3").exists(), "the layer used another file"


#: Lines of the server's log attached to a failed test's report.
LOG_TAIL = 200


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test shows the end of the server's log: what the workers said (a consumer's
    traceback, a layer warning) is what explains a lost or late message."""
    report: pytest.TestReport = yield
    server = getattr(item, "funcargs", {}).get("chat_server")
    if report.when == "call" and report.failed and isinstance(server, ChatServer):
        tail = "\n".join(server.log().splitlines()[-LOG_TAIL:])
        report.sections.append((f"chat server log, last {LOG_TAIL} lines", tail))
    return report
