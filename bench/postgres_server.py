"""A throwaway PostgreSQL server on 127.0.0.1 and a free port, in its own temporary directory.

Started by the harness only when a PostgreSQL layer is selected (``lite-postgres``,
``channels-postgres``) and stopped at the end, also on errors and Ctrl-C/SIGTERM. Like
``.ci/start-postgres.sh``: ``initdb`` as a non-root user (``postgres`` when run as root, else
the current user), fsync off (it holds benchmark data only), trust authentication on
127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.redis_server import free_port

logger = logging.getLogger("bench.postgres")

INSTALL_HINT = (
    "install it with: apt-get install postgresql-15 (Debian/Ubuntu), "
    "or set CHANNELS_LITE_PG_BIN to the directory holding initdb and pg_ctl"
)
USER = "bench"
DATABASE = "bench"
#: channels_postgres has fixed table names: each run gets a database copied from this one,
#: which holds its migrated tables and triggers.
CP_TEMPLATE = "cp_template"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL is not installed or would not start."""


def postgres_bin() -> Path | None:
    candidates = [os.environ.get("CHANNELS_LITE_PG_BIN"), "/usr/lib/postgresql/15/bin"]
    for candidate in candidates:
        if (
            candidate
            and Path(candidate, "initdb").is_file()
            and Path(candidate, "pg_ctl").is_file()
        ):
            return Path(candidate)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and shutil.which("initdb") else None


def postgres_version() -> str | None:
    binary = postgres_bin()
    if binary is None:
        return None
    out = subprocess.run(
        [str(binary / "postgres"), "--version"], capture_output=True, text=True, check=False
    )
    parts = out.stdout.split()
    return parts[2] if len(parts) > 2 else out.stdout.strip() or None


class PostgresServer:
    """Start with :meth:`start`, stop with :meth:`stop` (idempotent); also a context manager."""

    def __init__(self) -> None:
        self.port: int | None = None
        self._dir: Path | None = None
        self._runner: list[str] = []
        self._bin: Path | None = None
        self._template_ready = False

    def dsn(self, database: str = DATABASE) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._runner, *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> PostgresServer:
        binary = postgres_bin()
        if binary is None:
            raise PostgresUnavailable(f"PostgreSQL binaries not found; {INSTALL_HINT}")
        self._bin = binary
        owner = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            owner = os.environ.get("CHANNELS_LITE_PG_OWNER", "postgres")
            try:
                pw = pwd.getpwnam(owner)
            except KeyError as exc:
                raise PostgresUnavailable(
                    f"running as root and there is no '{owner}' user to own the cluster "
                    "(set CHANNELS_LITE_PG_OWNER)"
                ) from exc
            self._runner = ["runuser", "-u", owner, "--"]
        self._dir = Path(tempfile.mkdtemp(prefix="bench-pg-"))
        os.chmod(self._dir, 0o700)
        if owner is not None:
            os.chown(self._dir, pw.pw_uid, pw.pw_gid)
        data = self._dir / "data"
        out = self._run(
            str(binary / "initdb"), "-D", str(data), "-U", USER, "--auth=trust",
            "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
        )  # fmt: skip
        if out.returncode != 0:
            self.stop()
            raise PostgresUnavailable(f"initdb failed: {(out.stdout + out.stderr).strip()[-500:]}")
        options = (
            f"-c listen_addresses=127.0.0.1 -k {self._dir} -c max_connections=500 "
            "-c fsync=off -c full_page_writes=off -c synchronous_commit=off "
            "-c shared_buffers=128MB"
        )
        for _attempt in range(5):
            self.port = free_port()
            out = self._run(
                str(binary / "pg_ctl"), "-D", str(data), "-l", str(self._dir / "server.log"),
                "-w", "-t", "60", "-o", f"-p {self.port} {options}", "start",
            )  # fmt: skip
            if out.returncode == 0:
                break
            logger.warning("postgres did not start on port %d, retrying", self.port)
        else:
            log = self.log_tail()
            self.stop()
            raise PostgresUnavailable(f"the server did not start; log: {log}")
        self.execute(f"CREATE DATABASE {DATABASE}", database="postgres")
        logger.info("PostgreSQL %s on 127.0.0.1:%d", postgres_version(), self.port)
        return self

    def log_tail(self) -> str:
        with contextlib.suppress(OSError, TypeError):
            lines = (self._dir / "server.log").read_text(errors="replace").strip().splitlines()
            return " / ".join(line.strip() for line in lines[-3:])[-500:]
        return "(empty)"

    def execute(self, statement: str, database: str = DATABASE) -> None:
        import psycopg

        with psycopg.connect(self.dsn(database), autocommit=True) as conn:
            conn.execute(statement)

    def alive(self) -> bool:
        if self._dir is None or self._bin is None:
            return False
        out = self._run(str(self._bin / "pg_ctl"), "-D", str(self._dir / "data"), "status")
        return out.returncode == 0

    def channels_postgres_template(self) -> str:
        """A database with channels_postgres's tables, made once with its Django migrations."""
        if not self._template_ready:
            self.execute(f"CREATE DATABASE {CP_TEMPLATE}", database="postgres")
            code = (
                "import django, sys; from django.conf import settings; "
                "settings.configure(INSTALLED_APPS=['channels_postgres'], USE_TZ=True, "
                "DATABASES={'default': {'ENGINE': 'django.db.backends.postgresql', "
                f"'NAME': {CP_TEMPLATE!r}, 'USER': {USER!r}, 'HOST': '127.0.0.1', "
                f"'PORT': {self.port}}}}}); django.setup(); "
                "from django.core.management import call_command; "
                "call_command('migrate', 'channels_postgres', verbosity=0)"
            )
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=False
            )
            if out.returncode != 0:
                raise RuntimeError(
                    "migrating channels_postgres failed: " + out.stderr.strip()[-800:]
                )
            self._template_ready = True
        return CP_TEMPLATE

    def stop(self) -> None:
        directory, self._dir = self._dir, None
        if directory is None:
            return
        if self._bin is not None and (directory / "data" / "postmaster.pid").exists():
            data = str(directory / "data")
            pg_ctl = str(self._bin / "pg_ctl")
            try:
                out = self._run(
                    pg_ctl, "-D", data, "-m", "fast", "-w", "-t", "30", "stop", timeout=40
                )
                ok = out.returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
            if not ok:
                self._run(pg_ctl, "-D", data, "-m", "immediate", "stop", timeout=40)
            logger.info("PostgreSQL stopped")
        shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:  # a manual check: start, print the DSN, stop
    logging.basicConfig(level=logging.INFO)
    with PostgresServer() as server:
        print(server.dsn())
        time.sleep(0.5)


if __name__ == "__main__":
    main()
