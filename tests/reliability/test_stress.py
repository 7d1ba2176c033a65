"""Several OS processes on one SQLite file, a ledger of every message, and (soak) faults.

Four spawned processes each run a ``ChannelLayer`` on the same file and, all at once:

- send to two normal channels, a FIFO channel, the other processes' process-specific channels
  and two groups (two sender tasks each; every message carries a unique id, its sender and a
  sequence number, and 1 in 200 is 256 kB);
- read both normal channels and their own process-specific channels with receives that time
  out (are cancelled) after 2 to 250 ms, as consumers do when they disconnect;
- run group "connections" that join a group, read for 0.3 to 2 s, then leave;
- one process reads the FIFO channel with plain receives (the only place where the spec
  promises order for one writer and one reader).

Every process records what it sent and got in a ledger that survives ``kill -9``; the parent
combines them (``rel_ledger.check``): nothing twice, nothing lost except by a documented rule,
order kept per (sender, channel) on process-specific channels, group members and the FIFO
channel, no gaps inside a group member's stream.

``CHANNELS_LITE_SOAK=SECONDS`` turns the same test into a soak: it runs that long and injects
faults throughout (``kill -9`` of a process and a restart under a new identity, another process
holding the write lock for up to a second), then prints its figures (and writes them as JSON to
``CHANNELS_LITE_SOAK_REPORT`` when set).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import rel_workers as workers  # noqa: E402
from rel_ledger import Ledger, Verdict, check, read_ledgers  # noqa: E402
from rel_parent import SOAK, Children  # noqa: E402

from channels_lite import ChannelLayer  # noqa: E402

PROCESSES = 4
SHORT_SECONDS = 5.0


def _plan(tmp_path: Path, *, soak: bool) -> workers.StressPlan:
    return workers.StressPlan(
        path=str(tmp_path / "stress.sqlite3"),
        ledger_dir=str(tmp_path),
        config={
            "capacity": 10_000,  # ChannelFull is tested elsewhere; here it would only blur
            "expiry": 900,  # nothing expires during a run
            # Killed (soak) processes must be reaped quickly.
            "process_timeout": 3.0 if soak else 30.0,
        },
        send_pause=0.004 if soak else 0.002,
        seed=int(os.environ.get("CHANNELS_LITE_SOAK_SEED", "0")),
    )


class _Faults:
    """Fault injection during a soak: each action returns a line for the report."""

    def __init__(self, children: Children, plan: workers.StressPlan, rng: random.Random) -> None:
        self.children = children
        self.plan = plan
        self.rng = rng
        self.directory: dict[str, list[str]] = {}
        self.incarnation: dict[str, int] = {}
        self.counts = {"kill -9 + restart": 0, "write lock held": 0}
        self.started = 0

    def start(self, tag: str) -> None:
        base = tag.split(".", maxsplit=1)[0]
        self.children.start(tag, workers.stress_worker, self.plan, base == "w0")
        self.started += 1

    def broadcast_targets(self) -> None:
        names = [n for tag, ns in self.directory.items() for n in ns]
        self.children.broadcast(("targets", names))

    def kill_and_restart(self) -> str:
        victim = self.rng.choice(self.children.live())
        self.children.kill(victim)
        self.directory.pop(victim, None)
        base = victim.split(".")[0]
        self.incarnation[base] = self.incarnation.get(base, 0) + 1
        new = f"{base}.{self.incarnation[base]}"
        self.start(new)
        self.directory[new] = self.children.expect("hello", [new])[new]
        self.broadcast_targets()
        self.counts["kill -9 + restart"] += 1
        return f"killed {victim}, started {new}"

    def hold_write_lock(self) -> str:
        seconds = self.rng.uniform(0.2, 1.0)  # below the driver's 5 s timeout: transparent
        conn = sqlite3.connect(self.plan.path, isolation_level=None, timeout=10)
        try:
            conn.execute("BEGIN IMMEDIATE")
            time.sleep(seconds)
            conn.execute("COMMIT")
        finally:
            conn.close()
        self.counts["write lock held"] += 1
        return f"held the write lock {seconds:.2f}s"


def run_stress(children: Children, tmp_path: Path, seconds: float, *, soak: bool) -> Verdict:
    plan = _plan(tmp_path, soak=soak)
    rng = random.Random(plan.seed)
    faults = _Faults(children, plan, rng)
    tags = [f"w{i}" for i in range(PROCESSES)]
    for tag in tags:
        faults.start(tag)
    faults.directory = children.expect("hello", tags, timeout=120)
    faults.broadcast_targets()
    started = time.monotonic()
    end = started + seconds
    log: list[str] = []
    if soak:
        next_fault = started + rng.uniform(5, 15)
        while (now := time.monotonic()) < end:
            if now >= next_fault:
                action = rng.choice([faults.kill_and_restart, faults.hold_write_lock])
                log.append(f"{now - started:7.1f}s {action()}")
                next_fault = time.monotonic() + rng.uniform(8, 20)
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
    else:
        time.sleep(seconds)
    live = children.live()
    children.broadcast(("stop_sending",), live)
    children.expect("sent", live)
    # Every sender stopped: the parent's end marker is the FIFO channel's last message.
    asyncio.run(_send(plan, plan.fifo, {"type": "stress.end"}))
    children.broadcast(("drain",), live)
    reports = children.finish(live, timeout=180)
    asyncio.run(_collect_leftovers(plan, tmp_path))

    verdict = check(
        read_ledgers(tmp_path),
        killed=children.killed,
        strict_fifo_channels={plan.fifo},
        # Per killed process: its receivers of the two normal channels and the FIFO channel,
        # each with a message claimed, and one more on its way back to storage after a cancel.
        claim_allowance_per_kill=2 * (len(plan.normal) + 1),
    )
    figures = verdict.summary() | {
        "seconds": round(time.monotonic() - started, 1),
        "processes started": faults.started,
        "faults injected": dict(faults.counts),
        "per-process reports": reports,
    }
    if soak:
        text = json.dumps(figures, indent=2, default=str)
        print("\nSOAK FIGURES\n" + text + "\nFAULT LOG\n" + "\n".join(log))
        if target := os.environ.get("CHANNELS_LITE_SOAK_REPORT"):
            Path(target).write_text(json.dumps({"figures": figures, "faults": log}, indent=2))
    assert not verdict.problems, "\n".join(verdict.problems[:20]) + f"\n{figures}"
    return verdict


async def _send(plan: workers.StressPlan, channel: str, message: dict[str, Any]) -> None:
    layer = ChannelLayer(driver="sqlite", path=plan.path, **plan.config)
    try:
        await layer.send(channel, message)
    finally:
        await layer.close()


async def _collect_leftovers(plan: workers.StressPlan, tmp_path: Path) -> None:
    """Whatever is still in storage on the shared channels is delivered here, once.

    Processes stop reading after a second without messages; a normal-channel message whose
    receiver was cancelled goes back to storage, and may land there after everyone stopped.
    """
    ledger = Ledger(str(tmp_path), "parent")
    layer = ChannelLayer(driver="sqlite", path=plan.path, **plan.config)
    try:
        for channel in (*plan.normal, plan.fifo):
            while True:
                try:
                    message = await asyncio.wait_for(layer.receive(channel), 0.3)
                except TimeoutError:
                    break
                if message.get("type") == "stress.end":
                    continue
                ledger.write("recv", id=message["id"], ch=channel, s=message["s"], q=message["q"])
    finally:
        await layer.close()
        ledger.close()


@pytest.mark.timeout(SOAK + 600 if SOAK else 240)  # the suite's 120 s would cut a soak short
def test_processes_share_one_file_without_loss_or_duplicates(
    children: Children, tmp_path: Path
) -> None:
    verdict = run_stress(children, tmp_path, SOAK or SHORT_SECONDS, soak=bool(SOAK))
    # The run exercised what it claims to.
    assert verdict.sent > 200, verdict.summary()
    assert verdict.group_sent > 20, verdict.summary()
    assert verdict.group_delivered > 0, verdict.summary()
    assert verdict.cancellations > 100, verdict.summary()
    assert verdict.connections >= PROCESSES, verdict.summary()
