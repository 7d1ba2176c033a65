"""The ``channels-lite`` command itself: ``drivers`` output, ``--help``, a closed stdout, and
the conformance summary's skip reasons. (``stats`` and ``purge`` are in test_maintenance.py.)"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from channels_lite.cli import build_parser, main
from channels_lite.drivers import base
from channels_lite.drivers.memory import MemoryDriver
from channels_lite.drivers.sqlite import SQLiteDriver
from support import run_conformance

ALL_CAPABILITIES = [
    "ChangeNotifier",
    "ClaimsReady",
    "DefersChanges",
    "Peeks",
    "SupportsLiveness",
    "SupportsStats",
]
#: What the SQLite driver implements: all but ClaimsReady (its notifications carry no message).
SQLITE_CAPABILITIES = [c for c in ALL_CAPABILITIES if c != "ClaimsReady"]
#: Keys of ``drivers --json`` before capabilities and packages were added: scripts read them.
STABLE_KEYS = {"name", "class", "plugin", "version", "cross_process", "persistent", "options"}


def drivers_json(capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, Any]]:
    assert main(["drivers", "--json"]) == 0
    return {row["name"]: row for row in json.loads(capsys.readouterr().out)}


def test_drivers_json_builtin_sqlite(capsys: pytest.CaptureFixture[str]) -> None:
    row = drivers_json(capsys)["sqlite"]
    assert set(row) >= STABLE_KEYS
    assert row["class"] == "channels_lite.drivers.sqlite.driver.SQLiteDriver"
    assert row["plugin"] == "builtin"
    assert row["distribution"] == "channels-lite"
    assert row["version"] == metadata.version("channels-lite")
    assert row["cross_process"] is True and row["persistent"] is True
    # Every field DriverFeatures declares, whatever fields later releases add.
    assert row["features"] == dataclasses.asdict(SQLiteDriver.features)
    assert row["features"]["max_batch"] == SQLiteDriver.features.max_batch
    assert row["capabilities"] == SQLITE_CAPABILITIES
    assert set(row["options"]) == set(SQLiteDriver.option_docs)


def test_drivers_json_builtin_memory(capsys: pytest.CaptureFixture[str]) -> None:
    row = drivers_json(capsys)["memory"]
    assert set(row) >= STABLE_KEYS
    assert (row["plugin"], row["distribution"]) == ("builtin", "channels-lite")
    assert row["features"] == dataclasses.asdict(MemoryDriver.features)
    assert row["features"]["cross_process"] is False
    # The memory driver neither peeks nor defers wake-ups (its conformance run skips those).
    assert row["capabilities"] == ["ChangeNotifier", "SupportsLiveness", "SupportsStats"]


def test_drivers_json_builtin_postgres_capabilities(capsys: pytest.CaptureFixture[str]) -> None:
    """Its notifications carry messages (ClaimsReady); it neither peeks nor defers wake-ups."""
    pytest.importorskip("psycopg")
    from channels_lite.drivers.postgres import PostgresDriver

    row = drivers_json(capsys)["postgres"]
    expected = ["ChangeNotifier", "ClaimsReady", "SupportsLiveness", "SupportsStats"]
    assert row["capabilities"] == expected
    instance = PostgresDriver(dsn="postgresql://nobody@127.0.0.1:1/nothing")
    protocols = [getattr(base, name) for name in ALL_CAPABILITIES]
    assert [p.__name__ for p in protocols if isinstance(instance, p)] == expected


def test_drivers_capabilities_match_isinstance(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Checked on the class, the capabilities are what the core finds on an instance."""
    rows = drivers_json(capsys)
    instances = {"memory": MemoryDriver(), "sqlite": SQLiteDriver(path=tmp_path / "x.sqlite3")}
    protocols = [getattr(base, name) for name in ALL_CAPABILITIES]
    for name, instance in instances.items():
        found = [p.__name__ for p in protocols if isinstance(instance, p)]
        assert rows[name]["capabilities"] == found, name


def test_drivers_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["drivers"]) == 0
    out = capsys.readouterr().out
    version = metadata.version("channels-lite")
    blocks = {block.split()[0]: block for block in re.split(r"\n(?=\S)", out.strip())}
    sqlite = blocks["sqlite"].splitlines()
    assert sqlite[0] == (
        "sqlite  (channels_lite.drivers.sqlite.driver.SQLiteDriver, plugin builtin, "
        f"package channels-lite, version {version})"
    )
    assert sqlite[1].split() == [
        f"{key}={value}" for key, value in dataclasses.asdict(SQLiteDriver.features).items()
    ]
    assert sqlite[1].split()[:3] == ["cross_process=True", "persistent=True", "max_batch=1000"]
    assert sqlite[2] == f"    capabilities: {', '.join(SQLITE_CAPABILITIES)}"
    assert any(line.startswith("    option path: ") for line in sqlite)
    memory = blocks["memory"].splitlines()
    assert "package channels-lite" in memory[0]
    assert memory[1].split()[:3] == ["cross_process=False", "persistent=False", "max_batch=1000"]
    assert memory[2] == "    capabilities: ChangeNotifier, SupportsLiveness, SupportsStats"


def test_help_names_every_command_on_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    subparsers = next(
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    commands = list(subparsers.choices)
    assert {"drivers", "conformance", "stats", "purge"} <= set(commands)
    helps = {choice.dest: choice.help for choice in subparsers._choices_actions}
    for command in commands:
        assert helps.get(command), f"{command} has no help line"
        matching = [i for i, line in enumerate(lines) if line.split()[:1] == [command]]
        assert len(matching) == 1, (command, lines)
        index = matching[0]
        assert lines[index].split(None, 1)[1] == helps[command], lines[index]
        # No continuation line (indented to the help column) follows it.
        following = lines[index + 1] if index + 1 < len(lines) else ""
        assert not following.startswith(" " * 10), following


def test_drivers_into_a_closed_pipe_exits_quietly() -> None:
    """``channels-lite drivers | head -1``: the reader leaving is no error worth a traceback.

    The read end is closed before the command starts, so its very first write fails: the
    worst case of ``head`` exiting early, every time.
    """
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "channels_lite", "drivers"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 1


def test_conformance_summary_lists_skip_reasons() -> None:
    """The memory driver lacks Peeks and DefersChanges and is not persistent: the summary
    counts each reason, and the counts add up to the skipped total."""
    result = run_conformance(
        "--driver",
        "memory",
        "--",
        "-q",
        "-k",
        "peek or defer or persistent or test_driver_fifo_single_pushes",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = re.search(
        r"^conformance of driver 'memory': (\d+) passed, 0 failed, (\d+) skipped$",
        result.stdout,
        re.MULTILINE,
    )
    assert summary is not None, result.stdout
    assert int(summary.group(1)) >= 1
    reasons = {
        reason: int(count)
        for count, reason in re.findall(r"^  skipped (\d+): (.+)$", result.stdout, re.MULTILINE)
    }
    assert sum(reasons.values()) == int(summary.group(2))
    by_capability = {
        capability: next((r for r in reasons if f"optional {capability} protocol" in r), None)
        for capability in ("Peeks", "DefersChanges")
    }
    assert all(by_capability.values()), reasons
    assert reasons["driver does not declare features.persistent"] >= 1
    peeks = by_capability["Peeks"]
    assert peeks is not None
    assert peeks.startswith("driver 'memory' does not implement the optional Peeks protocol")
    assert reasons[peeks] >= 5
