"""A smoke run of the benchmark harness (bench/run.py): tiny N, channels-lite layers only.

Benchmarks are not pass/fail; this only checks that every scenario runs to completion for the
layers this repository ships and that the report has the expected rows. No redis needed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ROWS = [
    "ping-pong between 2 process-specific channels",
    "messages over 10 process-specific channels",
    "on one normal channel",
    "group_sends: delivered",
    "delay group_send → receipt, p99",
    "cross-process latency",
    "cross-process msgs 0.05 s apart",
    "cross-process throughput",
    "receiver processes",
    "idle process with",
]
LAYERS = ["channels-lite sqlite", "channels-lite memory"]


def test_bench_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    command = [
        sys.executable,
        str(ROOT / "bench" / "run.py"),
        "--smoke",
        "--repeat",
        "1",
        "--layers",
        "lite-sqlite,lite-memory",
        "--growth-layers",
        "lite-sqlite,lite-memory",
        "--out",
        str(out),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=100, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = out.read_text()
    assert done.stdout.strip() == report.strip()

    table = [line for line in report.splitlines() if line.startswith("| ")]
    header = table[0]
    for label in LAYERS:
        assert label in header
    assert "channels_redis" not in header.split("÷")[0]  # redis layers were not asked for
    for row in ROWS:
        matches = [line for line in table if row in line]
        assert len(matches) == 1, f"expected one row containing {row!r} in:\n{report}"
        cells = [c.strip() for c in matches[0].strip("|").split("|")]
        for cell in cells:
            assert not cell.startswith(("error", "not run")), f"{row}: {matches[0]}"
    latency = next(line for line in table if "cross-process latency" in line)
    assert "n/a" in latency  # the memory driver is process-local

    for curve in ("cost per message vs channels", "cost per delivered message vs group members"):
        assert curve in report
    growth = report.split("**", 1)[1].split("## ", 1)[0]  # from the first curve's title
    growth_rows = [
        line for line in growth.splitlines() if line.startswith(tuple(f"| {x} |" for x in LAYERS))
    ]
    assert len(growth_rows) == 4  # two curves x two layers
    assert not any("error" in line for line in growth_rows)
    # Every latency sample of every repetition, pooled: one row per cross-process layer.
    for scenario in ("latency", "sporadic"):
        section = report.split(f"## {scenario}: every repetition pooled (ms)", 1)[1]
        rows = [line for line in section.split("\n\n")[1].splitlines() if line.startswith("| ")]
        assert rows[0].startswith("| layer | messages | p50 | p90 | p99 | p99.9 |")
        assert [row.split("|")[1].strip() for row in rows[1:]] == ["channels-lite sqlite"]
    assert "## Goals of issue 3" in report
    assert "## Machine" in report
