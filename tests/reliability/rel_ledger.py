"""The ledger: what every process sent and received, written so that ``kill -9`` keeps it.

Each process appends JSON lines to its own file with one ``os.write`` per record on an
``O_APPEND`` descriptor: no user-space buffer, so a record whose ``write`` returned survives the
process being killed a moment later. The parent reads every file at the end and checks:

- nothing was delivered twice (a direct message to any reader, a group message to one channel);
- every *accepted* message (``send``/``group_send`` returned) was delivered, unless a documented
  rule drops it: its receiving process died, or a process died holding it (claimed, not yet
  handed to the application), or it went to a group member that had left;
- order: per (sender, channel) wherever one reader reads without cancellations, and for
  process-specific channels and group members always, with no gaps inside a group member's
  stream;
- nothing arrived that nobody sent.

Kept free of pytest: children import it too.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any


class Ledger:
    """One process's append-only record file."""

    def __init__(self, directory: str, tag: str) -> None:
        self.path = os.path.join(directory, f"ledger-{tag}.jsonl")
        self.tag = tag
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, event: str, **fields: Any) -> None:
        fields["e"] = event
        fields["t"] = round(time.time(), 4)
        os.write(self._fd, (json.dumps(fields, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


def read_ledgers(directory: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Every process's records, by tag, in the order written."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(Path(directory).glob("ledger-*.jsonl")):
        tag = path.stem.removeprefix("ledger-")
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # pragma: no cover - a torn last line
                continue
        out[tag] = records
    return out


def peak_rss(records: Iterable[dict[str, Any]]) -> int:
    """Largest resident set (kB) a process reported (``mem`` records carry VmHWM)."""
    return max((r["hwm"] for r in records if r["e"] == "mem"), default=0)


def memory_kb() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in kB, from /proc (0, 0 where unavailable)."""
    rss = hwm = 0
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:  # pragma: no cover - not Linux
        pass
    return rss, hwm


@dataclass
class Verdict:
    """What the combined ledgers say. ``problems`` must be empty for a pass."""

    sent: int = 0
    group_sent: int = 0
    delivered: int = 0
    group_delivered: int = 0
    refused_full: int = 0
    ambiguous: int = 0
    duplicates: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    lost_by_rule: Counter[str] = field(default_factory=Counter)
    lost_claimed_by_dead: int = 0
    claim_allowance: int = 0
    reordered_normal: int = 0
    cancellations: int = 0
    connections: int = 0
    processes: int = 0
    killed: int = 0
    problems: list[str] = field(default_factory=list)
    peak_rss_kb: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "processes": self.processes,
            "killed": self.killed,
            "sent (direct, accepted)": self.sent,
            "group_send (accepted)": self.group_sent,
            "delivered (direct)": self.delivered,
            "delivered (group copies)": self.group_delivered,
            "refused (ChannelFull)": self.refused_full,
            "in flight at a kill (ambiguous)": self.ambiguous,
            "duplicates": len(self.duplicates),
            "lost by rule": dict(self.lost_by_rule),
            "lost: claimed by a killed process": self.lost_claimed_by_dead,
            "allowance for those": self.claim_allowance,
            "lost (unexplained)": len(self.lost),
            "normal-channel deliveries out of order (requeued after a cancel)": (
                self.reordered_normal
            ),
            "receive cancellations": self.cancellations,
            "group connections": self.connections,
            "peak RSS kB (max, per process)": max(self.peak_rss_kb.values(), default=0),
        }


def check(
    ledgers: dict[str, list[dict[str, Any]]],
    *,
    killed: set[str] = frozenset(),  # type: ignore[assignment]
    presumed_dead: set[str] = frozenset(),  # type: ignore[assignment]
    strict_fifo_channels: set[str] = frozenset(),  # type: ignore[assignment]
    claim_allowance_per_kill: int = 0,
) -> Verdict:
    """Combine every process's records and judge them (see the module docstring).

    ``killed``: tags of processes that were ``kill -9``-ed; ``presumed_dead``: processes that
    were suspended longer than ``process_timeout`` (the others reap them; messages queued for
    their channels meanwhile are dropped by that rule). ``claim_allowance_per_kill``: how
    many normal-channel messages one killed process may have held (claimed for one of its
    receivers, not yet recorded): one per receiving task, two when a cancelled receive's
    message may be on its way back to storage while the next one is claimed.
    """
    verdict = Verdict(processes=len(ledgers), killed=len(killed))
    tried: dict[str, dict[str, Any]] = {}
    accepted: dict[str, dict[str, Any]] = {}
    group_tried: dict[str, dict[str, Any]] = {}
    group_accepted: dict[str, dict[str, Any]] = {}
    refused: set[str] = set()
    owner_of: dict[str, str] = {}  # process-specific channel -> tag of the process owning it
    connection_channels: set[str] = set()
    received: defaultdict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    group_received: defaultdict[tuple[str, str], int] = defaultdict(int)
    streams: defaultdict[tuple[str, str, str], list[int]] = defaultdict(list)

    for tag, records in ledgers.items():
        verdict.peak_rss_kb[tag] = peak_rss(records)
        for r in records:
            e = r["e"]
            if e == "try":
                tried[r["id"]] = r | {"tag": tag}
            elif e == "sent":
                accepted[r["id"]] = r | {"tag": tag}
            elif e in ("full", "error"):
                refused.add(r["id"])
                verdict.refused_full += e == "full"
            elif e == "gtry":
                group_tried[r["id"]] = r | {"tag": tag}
            elif e == "gsent":
                group_accepted[r["id"]] = r | {"tag": tag}
            elif e == "channel":
                owner_of[r["ch"]] = tag
                if r.get("conn"):
                    connection_channels.add(r["ch"])
                    verdict.connections += 1
            elif e == "recv":
                received[r["id"]].append((tag, r))
                streams[(r["s"], r["ch"], tag)].append(r["q"])
            elif e == "grecv":
                group_received[(r["id"], r["ch"])] += 1
                streams[(r["s"], r["ch"], tag)].append(r["q"])
            elif e == "cancel":
                verdict.cancellations += r.get("n", 1)

    verdict.sent = len(accepted)
    verdict.group_sent = len(group_accepted)

    # -- direct messages: exactly once, or dropped by a rule --------------------------------
    for ident, receipts in received.items():
        if ident not in tried:
            verdict.problems.append(f"{ident} was received but never sent")
        elif ident in refused:
            verdict.problems.append(f"{ident} was received but its send() raised")
        if len(receipts) > 1:
            verdict.duplicates.append(f"{ident} x{len(receipts)} by {[t for t, _ in receipts]}")
    verdict.delivered = sum(len(v) for v in received.values())
    claimed_by_dead = 0
    for ident, record in tried.items():
        if ident in received:
            continue
        if ident not in accepted:
            if ident in refused:
                continue
            if record["tag"] in killed:
                verdict.ambiguous += 1  # the sender died inside send(): stored or not
                continue
            verdict.problems.append(f"{ident}: send() neither returned nor was refused")
            continue
        owner = owner_of.get(record["ch"])
        if owner is not None and owner in killed:
            verdict.lost_by_rule["receiving process killed"] += 1
        elif owner is not None and owner in presumed_dead:
            verdict.lost_by_rule["receiving process taken for dead (suspended)"] += 1
        elif record["ch"] in connection_channels:
            verdict.lost_by_rule["consumer disconnected"] += 1
        elif owner is None and killed:
            claimed_by_dead += 1  # a normal channel: a killed process may have claimed it
        else:
            verdict.lost.append(f"{ident} to {record['ch']} from {record['tag']}")
    verdict.lost_claimed_by_dead = claimed_by_dead
    verdict.claim_allowance = claim_allowance_per_kill * len(killed)
    if claimed_by_dead > verdict.claim_allowance:
        verdict.problems.append(
            f"{claimed_by_dead} normal-channel message(s) lost, more than the "
            f"{verdict.claim_allowance} that {len(killed)} killed process(es) could hold"
        )

    # -- group messages: at most once per member --------------------------------------------
    for (ident, channel), count in group_received.items():
        if ident not in group_tried and ident not in group_accepted:
            verdict.problems.append(f"group message {ident} received by {channel} but never sent")
        if count > 1:
            verdict.duplicates.append(f"group {ident} x{count} to {channel}")
    verdict.group_delivered = sum(group_received.values())

    # -- order ------------------------------------------------------------------------------
    for (sender, channel, reader), seqs in streams.items():
        in_order = all(a < b for a, b in pairwise(seqs))
        if in_order:
            pass
        elif "!" in channel or channel in strict_fifo_channels:
            verdict.problems.append(
                f"out of order: {sender} -> {channel} read by {reader}: {_first_inversion(seqs)}"
            )
        else:
            verdict.reordered_normal += sum(1 for a, b in pairwise(seqs) if b < a)
    # No gaps inside a group member's stream from one sender: every message the sender
    # group_sent between two that the member got reached the member too.
    sent_to_group: defaultdict[tuple[str, str], list[int]] = defaultdict(list)
    maybe_sent: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for ident, record in group_tried.items():
        key = (record["s"], record["g"])
        if ident in group_accepted:
            sent_to_group[key].append(record["q"])
        else:
            maybe_sent[key].add(record["q"])
    member_groups: dict[str, str] = {}
    for records in ledgers.values():
        for r in records:
            if r["e"] == "channel" and r.get("g"):
                member_groups[r["ch"]] = r["g"]
    for (sender, channel, reader), seqs in streams.items():
        group = member_groups.get(channel)
        if group is None or not seqs or (sender, group) not in sent_to_group:
            continue
        low, high = min(seqs), max(seqs)
        got = set(seqs)
        missing = [q for q in sent_to_group[(sender, group)] if low < q < high and q not in got]
        if missing:
            verdict.problems.append(
                f"gap: {channel} (group {group}, read by {reader}) missed {len(missing)} "
                f"message(s) from {sender} between #{low} and #{high}: {missing[:5]}"
            )

    if verdict.duplicates:
        verdict.problems.append(f"{len(verdict.duplicates)} duplicate(s): {verdict.duplicates[:5]}")
    if verdict.lost:
        verdict.problems.append(f"{len(verdict.lost)} lost: {verdict.lost[:5]}")
    return verdict


def _first_inversion(seqs: list[int]) -> str:
    for index, (a, b) in enumerate(pairwise(seqs)):
        if b <= a:
            return f"#{b} after #{a} at position {index + 1} of {len(seqs)}"
    return "?"  # pragma: no cover
