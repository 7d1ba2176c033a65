"""The parent's side: start spawned children, talk to them, kill them, never leave one behind."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from typing import Any

import pytest
import rel_workers as workers

CTX = multiprocessing.get_context("spawn")
#: Seconds of soak requested through CHANNELS_LITE_SOAK (0: the short mode of the suite).
SOAK = float(os.environ.get("CHANNELS_LITE_SOAK", "0") or 0)
#: Hang guard for one wait of the parent: generous, the machine may be busy.
GUARD = 90.0


class Children:
    """Spawned children with an event queue up and a command queue down each.

    One event queue per child, not one shared: a child killed while writing to a
    multiprocessing queue leaves its lock held, and every other writer would hang on it.
    """

    def __init__(self) -> None:
        self.queues: dict[str, Queue[Any]] = {}
        self.processes: dict[str, SpawnProcess] = {}
        self.commands: dict[str, Queue[Any]] = {}
        self.killed: set[str] = set()
        self.reports: dict[str, Any] = {}
        self._pending: list[tuple[str, str, Any]] = []
        #: The latest "progress" value each child reported (not queued as events).
        self.progress: dict[str, Any] = {}

    def start(self, tag: str, fn: workers.ChildFn, *args: Any) -> SpawnProcess:
        commands: Queue[Any] = CTX.Queue()
        events: Queue[Any] = CTX.Queue()
        self.queues[tag] = events
        process = CTX.Process(
            target=workers.child_main,
            args=(fn, events, commands, tag, args),
            name=tag,
            daemon=True,
        )
        process.start()
        self.processes[tag] = process
        self.commands[tag] = commands
        return process

    def send(self, tag: str, command: Any) -> None:
        self.commands[tag].put(command)

    def broadcast(self, command: Any, tags: Iterable[str] | None = None) -> None:
        for tag in self.live() if tags is None else tags:
            self.send(tag, command)

    def live(self) -> list[str]:
        return [t for t, p in self.processes.items() if t not in self.killed and p.is_alive()]

    def kill(self, tag: str) -> None:
        """``kill -9``: no cleanup of any kind runs in the child."""
        process = self.processes[tag]
        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
        self.killed.add(tag)

    def expect(self, kind: str, tags: Iterable[str], timeout: float = GUARD) -> dict[str, Any]:
        """Wait for one ``kind`` event from each of ``tags``; fail on a child's error."""
        wanted = set(tags)
        got: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        exited_at: dict[str, float] = {}
        while True:
            for event in list(self._pending):
                if event[0] == "error":
                    pytest.fail(f"child {event[1]} failed:\n{event[2]}")
                if event[0] == kind and event[1] in wanted:
                    self._pending.remove(event)
                    got[event[1]] = event[2]
                    wanted.discard(event[1])
            if not wanted:
                return got
            event = self._next_event(0.25)
            if event is None:
                now = time.monotonic()
                for tag in wanted:
                    exited = self.processes[tag].exitcode is not None and tag not in self.killed
                    # A child reports before it exits: give the report time to arrive.
                    if exited and now - exited_at.setdefault(tag, now) > 3.0:
                        pytest.fail(
                            f"child {tag} exited ({self.processes[tag].exitcode}) without {kind!r}"
                        )
                if now > deadline:
                    pytest.fail(f"no {kind!r} from {sorted(wanted)} within {timeout}s")
                continue
            self._file(event)

    def _next_event(self, timeout: float) -> tuple[str, str, Any] | None:
        """The next event from any child that was not killed, or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for tag, events in self.queues.items():
                if tag in self.killed:
                    continue  # its queue may be broken: it was killed mid-write perhaps
                try:
                    return events.get_nowait()  # type: ignore[no-any-return]
                except queue.Empty:
                    continue
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)

    def _file(self, event: tuple[str, str, Any]) -> None:
        if event[0] == "progress":
            self.progress[event[1]] = event[2]
            return
        if event[0] == "done":
            self.reports[event[1]] = event[2]
        self._pending.append(event)

    def wait_progress(self, tag: str, at_least: int, timeout: float = GUARD) -> None:
        """Wait until ``tag`` reported progress of at least ``at_least``."""
        deadline = time.monotonic() + timeout
        while self.progress.get(tag, 0) < at_least:
            event = self._next_event(0.1)
            if event is not None:
                self._file(event)
            for event in self._pending:
                if event[0] == "error":
                    pytest.fail(f"child {event[1]} failed:\n{event[2]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{tag} made no progress to {at_least} within {timeout}s")

    def finish(self, tags: Iterable[str], timeout: float = GUARD) -> dict[str, Any]:
        done = self.expect("done", tags, timeout)
        for tag in done:
            self.processes[tag].join(GUARD)
        return done

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.is_alive():
                process.kill()
            process.join(5)
        for tag, channel in [*self.commands.items(), *self.queues.items()]:
            channel.close()
            if tag not in self.killed:
                channel.join_thread()
            else:
                channel.cancel_join_thread()


# ------------------------------------------------------------------- another process's lock

_LOCK_SCRIPT = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
print("released", flush=True)
"""


@contextlib.contextmanager
def write_lock_held(path: str, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """Another OS process (plain ``sqlite3``) holds the write lock for ``seconds``, from the
    moment this returns. Leaving the block waits for it to let go."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_SCRIPT, path, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        yield holder
        holder.wait(timeout=seconds + GUARD)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


# ------------------------------------------------------------ permissions, as a non-root user

NOBODY = 65534


def as_unprivileged(fn: Callable[[], str]) -> str:
    """Run ``fn`` as a user that permission bits apply to (as tests/drivers does).

    Root ignores permission bits, so as root ``fn`` runs in a forked child that drops to
    "nobody"; as any other user it runs in place. ``fn`` returns a string (e.g. JSON).
    """
    if os.geteuid() != 0:
        return fn()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_fd)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = fn()
        except BaseException as exc:
            result = f"child failed: {type(exc).__name__}: {exc}"
        os.write(write_fd, result.encode())
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()
