"""How big each scenario is, for a full run, ``--quick`` and the test suite's smoke run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    name: str
    pingpong: int = 2_000  # round trips (after 20 untimed)
    ps_messages: int = 2_000  # process-specific throughput: messages ...
    ps_channels: int = 50  # ... spread over this many channels
    normal_messages: int = 1_000
    normal_receivers: int = 4
    group_members: int = 100
    group_sends: int = 30
    latency_messages: int = 1_000  # at latency_rate msg/s, after 20 untimed
    latency_rate: float = 200.0
    sporadic_messages: int = 15  # one every sporadic_gap seconds, after 3 untimed
    sporadic_gap: float = 1.2
    xput_messages: int = 10_000  # one sender process -> one receiver process
    sender_tasks: int = 8  # concurrent send tasks in a sending process
    drain_messages: int = 10_000
    drain_processes: int = 3
    idle_seconds: float = 10.0
    idle_settle: float = 2.0
    idle_channels: int = 10
    growth_channels: tuple[int, ...] = (10, 100, 1_000, 10_000)
    growth_messages: int = 2_000
    growth_members: tuple[int, ...] = (1, 10, 100, 1_000)
    growth_deliveries: int = 2_000
    soak_seconds: float = 600.0  # only with --soak
    timeout: float = 180.0  # per scenario run, before it counts as "timeout"


FULL = Sizes("full")
QUICK = Sizes(
    "quick",
    pingpong=300,
    ps_messages=500,
    normal_messages=300,
    group_sends=10,
    latency_messages=200,
    sporadic_messages=6,
    xput_messages=2_000,
    drain_messages=2_000,
    idle_seconds=1.0,
    idle_settle=0.5,
    growth_channels=(10, 100, 1_000),
    growth_messages=500,
    growth_members=(1, 10, 100),
    growth_deliveries=300,
    timeout=60.0,
)
SMOKE = Sizes(
    "smoke",
    pingpong=20,
    ps_messages=100,
    ps_channels=10,
    normal_messages=40,
    group_members=10,
    group_sends=3,
    latency_messages=20,
    latency_rate=400.0,
    sporadic_messages=3,
    sporadic_gap=0.05,
    xput_messages=100,
    sender_tasks=4,
    drain_messages=90,
    idle_seconds=0.3,
    idle_settle=0.1,
    idle_channels=3,
    growth_channels=(10, 50),
    growth_messages=50,
    growth_members=(1, 10),
    growth_deliveries=30,
    timeout=30.0,
)
SIZES = {s.name: s for s in (FULL, QUICK, SMOKE)}
