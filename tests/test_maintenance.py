"""``channels-lite stats|purge``, ``manage.py channels_lite stats|purge``, ``clean_channels``."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from channels_lite import ChannelLayer, cli, maintenance
from channels_lite.drivers.base import (
    SupportsStats,
)
from support import PlainMemoryDriver, run_conformance

PAST = time.time() - 10_000  # messages sent "then" with a short expiry are expired now


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def config(path: Path, **extra: Any) -> str:
    return json.dumps({"path": str(path), **extra})


async def fill(path: Path) -> None:
    """5 live messages on 'busy', 2 on 'quiet', 3 expired on 'old'; groups g (2) and h (1)."""
    live = ChannelLayer(path=str(path), expiry=3600)
    stale = ChannelLayer(path=str(path), expiry=1, group_expiry=1, clock=lambda: PAST)
    try:
        for n in range(5):
            await live.send("busy", {"n": n})
        for n in range(2):
            await live.send("quiet", {"n": n})
        for n in range(3):
            await stale.send("old", {"n": n})
        await live.group_add("g", "busy")
        await live.group_add("g", "quiet")
        await live.group_add("h", "busy")
        await stale.group_add("gone", "old")
    finally:
        await live.close()
        await stale.close()


@pytest.fixture
async def db(tmp_path: Path) -> Path:
    path = tmp_path / "layer.sqlite3"
    await fill(path)
    return path


# -- stats -------------------------------------------------------------------------------------


def test_stats_json(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "stats", "--config", config(db), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["alias"] == "default"
    assert report["driver"] == "sqlite"
    assert report["supports_stats"] is True
    assert report["messages"] == 7
    assert report["expired_messages"] == 3
    assert report["channels"] == {"busy": 5, "quiet": 2}
    assert report["groups"] == {"g": 2, "h": 1}
    assert report["processes"] == 0
    assert report["storage_bytes"] > 0


def test_stats_text_and_top(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "stats", "--config", config(db), "--top", "1")
    assert code == 0
    assert "messages pending:          7" in out
    assert "expired, awaiting purge:   3" in out
    assert "live processes:            0" in out
    assert "storage size:" in out
    assert "busy" in out
    assert "quiet" not in out  # --top 1
    assert "top 1" in out


async def test_stats_counts_live_processes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "procs.sqlite3"
    layer = ChannelLayer(path=str(path))
    try:
        name = await layer.new_channel()
        await layer.group_add("room", name)  # starts housekeeping, which takes the lease
        argv = ["stats", "--config", config(path), "--json"]
        for _ in range(100):
            # The CLI runs its own event loop: give it a thread, as a separate process would.
            code = await asyncio.to_thread(cli.main, argv)
            report = json.loads(capsys.readouterr().out)
            if report["processes"]:
                break
            await asyncio.sleep(0.05)
        assert code == 0
        assert report["processes"] == 1
        assert report["groups"] == {"room": 1}
    finally:
        await layer.close()


def test_stats_driver_without_capability(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(maintenance, "open_driver", lambda entry: NoStatsDriver())
    code, out, _ = run_cli(capsys, "stats", "--config", "{}")
    assert code == maintenance.EXIT_UNSUPPORTED
    assert "does not implement the optional SupportsStats" in out
    code, out, _ = run_cli(capsys, "stats", "--config", "{}", "--json")
    assert code == maintenance.EXIT_UNSUPPORTED
    assert json.loads(out)["supports_stats"] is False


def test_stats_memory_driver_notes_process_local(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "stats", "--config", '{"driver": "memory"}')
    assert code == 0
    assert "inside each server process" in out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--config", "{not json"], "not valid JSON"),
        (["--config", "[1, 2]"], "must be an object"),
        (["--config", '{"driver": "no-such-driver"}'], "no channels-lite driver named"),
        (["--config", '{"expiry": "soon"}'], "expiry"),
        (
            ["--config", '{"BACKEND": "channels.layers.InMemoryChannelLayer"}'],
            "not a channels-lite layer",
        ),
        (["--config", '{"BACKEND": "no.such.Backend"}'], "cannot import BACKEND"),
    ],
)
def test_stats_config_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    code, out, err = run_cli(capsys, "stats", *argv)
    assert code == 2
    assert fragment in err
    assert out == ""


def test_stats_whole_entry_json(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entry = json.dumps({"BACKEND": "channels_lite.ChannelLayer", "CONFIG": {"path": str(db)}})
    code, out, _ = run_cli(capsys, "stats", "--config", entry, "--json")
    assert code == 0
    assert json.loads(out)["messages"] == 7


def test_top_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["stats", "--top", "0"])


# -- purge -------------------------------------------------------------------------------------


def test_purge_removes_only_expired(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "purge", "--config", config(db))
    assert code == 0
    assert "purged 4 expired row(s)" in out  # 3 messages + 1 membership
    assert "VACUUM" not in err
    code, out, _ = run_cli(capsys, "stats", "--config", config(db), "--json")
    report = json.loads(out)
    assert (report["messages"], report["expired_messages"]) == (7, 0)
    code, out, _ = run_cli(capsys, "purge", "--config", config(db), "--json")
    assert json.loads(out)["removed"] == 0


def test_purge_vacuum_warns_and_shrinks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "big.sqlite3"

    async def bloat() -> None:
        layer = ChannelLayer(path=str(path), expiry=1, capacity=10_000, clock=lambda: PAST)
        try:
            for n in range(400):
                await layer.send(f"c{n % 7}", {"blob": os.urandom(2048)})
        finally:
            await layer.close()

    maintenance.run(bloat())
    code, out, err = run_cli(capsys, "purge", "--config", config(path), "--vacuum", "--json")
    assert code == 0
    assert "warning: VACUUM" in err
    assert "lock" in err
    report = json.loads(out)
    assert report["removed"] == 400
    assert report["vacuum"]["after_bytes"] < report["vacuum"]["before_bytes"]
    # Still a healthy channels-lite database afterwards.
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0


def test_purge_vacuum_other_driver(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "purge", "--config", '{"driver": "memory"}', "--vacuum")
    assert code == 0
    assert "sqlite driver only" in err


# -- a settings module, and the Django management commands (own processes: Django's settings
#    and app registry are process-wide) ---------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path, db: Path) -> Path:
    (tmp_path / "proj_settings.py").write_text(
        textwrap.dedent(
            f"""
            SECRET_KEY = "x"
            USE_TZ = True
            INSTALLED_APPS = ["channels_lite"]
            DATABASES = {{
                "default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": {str(db)!r}}},
            }}
            CHANNEL_LAYERS = {{
                "default": {{
                    "BACKEND": "channels_lite.layers.aio.AIOSQLiteChannelLayer",
                    "CONFIG": {{"database": "default", "pool_size": 4}},
                }},
                "second": {{
                    "BACKEND": "channels_lite.ChannelLayer",
                    "CONFIG": {{"path": {str(db)!r}}},
                }},
            }}
            """
        )
    )
    return tmp_path


def run_in(project: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(project), "DJANGO_SETTINGS_MODULE": "proj_settings"}
    return subprocess.run(
        [sys.executable, *argv],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_with_settings_module(project: Path) -> None:
    env_free = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [sys.executable, "-m", "channels_lite", "stats", "--config", "proj_settings", "--json"],
        cwd=project,
        env=env_free,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["backend"] == "channels_lite.layers.aio.AIOSQLiteChannelLayer"
    assert report["messages"] == 7
    # The 0.4 deprecations are visible to the operator.
    assert "pool_size" in result.stderr


def test_manage_stats_and_purge(project: Path) -> None:
    stats = run_in(project, "-m", "django", "channels_lite", "stats", "--alias", "second")
    assert stats.returncode == 0, stats.stderr
    assert "messages pending:          7" in stats.stdout
    purge = run_in(project, "-m", "django", "channels_lite", "purge", "--json")
    assert purge.returncode == 0, purge.stderr
    assert json.loads(purge.stdout)["removed"] == 4
    missing = run_in(project, "-m", "django", "channels_lite", "stats", "--alias", "nope")
    assert missing.returncode != 0
    assert "no CHANNEL_LAYERS['nope']" in missing.stderr


def test_manage_clean_channels_is_purge(project: Path, db: Path) -> None:
    result = run_in(project, "-m", "django", "clean_channels", "--no-vacuum")
    assert result.returncode == 0, result.stderr
    assert "purged 4 expired row(s)" in result.stdout
    assert "VACUUM" not in result.stderr
    again = run_in(project, "-m", "django", "clean_channels")
    assert again.returncode == 0, again.stderr
    assert "purged 0 expired row(s)" in again.stdout
    assert "warning: VACUUM" in again.stderr  # 0.4 vacuumed by default; so does the alias


# -- the conformance command isolates every test's storage -------------------------------------


def test_conformance_cli_isolates_prefixes(tmp_path: Path) -> None:
    result = run_conformance(
        "--driver",
        "sqlite",
        "--option",
        f"path={tmp_path}/shared-{{unique}}.sqlite3",
        "--",
        "-q",
        "-k",
        "test_driver_fifo_single_pushes or test_driver_flush_empties_everything",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed, 0 failed" in result.stdout
    # {unique} was replaced, once per test.
    assert len(list(tmp_path.glob("shared-clc_*.sqlite3"))) == 2


# -- a driver without the optional SupportsStats capability ------------------------------------


class NoStatsDriver(PlainMemoryDriver):
    """Delegates to the memory driver, minus ``stats``."""

    name = "nostats"


def test_no_stats_driver_really_lacks_it() -> None:
    assert not isinstance(NoStatsDriver(), SupportsStats)
