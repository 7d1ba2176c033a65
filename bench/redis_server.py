"""A throwaway ``redis-server`` on 127.0.0.1 and a free port, in its own temporary directory."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("bench.redis")

INSTALL_HINT = "install it with: apt-get install redis-server (Debian/Ubuntu)"


class RedisUnavailable(RuntimeError):
    """``redis-server`` is not installed or would not start."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def redis_server_version(binary: str | None = None) -> str | None:
    binary = binary or redis_server_binary()
    if binary is None:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    for part in out.stdout.split():
        if part.startswith("v="):
            return part[2:]
    return out.stdout.strip() or None


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """Start with :meth:`start`, stop with :meth:`stop` (idempotent); also a context manager."""

    def __init__(self) -> None:
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = redis_server_binary()
        if binary is None:
            raise RedisUnavailable(f"redis-server is not on PATH; {INSTALL_HINT}")
        self._dir = tempfile.TemporaryDirectory(prefix="bench-redis-")
        self.port = free_port()
        args = [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--daemonize", "no",
            "--databases", "16",
            "--loglevel", "warning",
        ]  # fmt: skip
        log = Path(self._dir.name, "redis.log").open("wb")  # noqa: SIM115 - closed by the child
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = Path(self._dir.name, "redis.log").read_text(errors="replace")
                self.stop()
                raise RedisUnavailable(f"redis-server exited at start: {output.strip()[-500:]}")
            if _ping(self.port):
                logger.info("redis-server %s on 127.0.0.1:%d", redis_server_version(), self.port)
                return self
            time.sleep(0.05)
        self.stop()
        raise RedisUnavailable(f"redis-server did not answer PING within {timeout:.0f} s")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def death(self) -> str:
        """Why the server is gone: exit status and the tail of its log."""
        code = self.process.poll() if self.process is not None else None
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
        log = ""
        if self._dir is not None:
            with contextlib.suppress(OSError):
                log = Path(self._dir.name, "redis.log").read_text(errors="replace").strip()
        tail = " / ".join(line.strip() for line in log.splitlines()[-2:])
        return f"{how}; log: {tail[-300:] or '(empty)'}"

    def restart(self) -> None:
        self.stop()
        self.start()

    def flushall(self) -> None:
        import redis  # channels_redis depends on redis-py

        client = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            client.flushall()
        finally:
            client.close()

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the server has used so far, from /proc."""
        if self.pid is None:
            return None
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
            logger.info("redis-server stopped")
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
