"""The scenarios of issue 3, in table order, with how to run each one for a layer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import inproc, xproc
from bench.layers import LayerSpec
from bench.sizes import Sizes

Metrics = dict[str, Any]


@dataclass(frozen=True)
class RunContext:
    """What a scenario may need beyond the layer: the redis-server's CPU counter, a fresh config."""

    sizes: Sizes
    server_cpu: Callable[[], float | None]
    #: A fresh configuration (fresh SQLite file, flushed redis) for one more layer instance.
    fresh_config: Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    unit: str
    run: Callable[[LayerSpec, dict[str, Any], RunContext], Metrics]
    cross_process: bool = False
    growth: bool = False
    #: Not in the default list (the soak runs for minutes): opt in with --soak.
    optional: bool = False

    def describe(self, sizes: Sizes) -> str:
        return self.title.format(s=sizes)

    def applies(self, spec: LayerSpec) -> bool:
        return spec.cross_process or not self.cross_process


def _inproc(fn: inproc.Scenario) -> Callable[[LayerSpec, dict[str, Any], RunContext], Metrics]:
    def run(spec: LayerSpec, config: dict[str, Any], ctx: RunContext) -> Metrics:
        coro = fn(spec.key, config, ctx.sizes)
        return asyncio.run(asyncio.wait_for(coro, ctx.sizes.timeout))

    return run


def _growth(kind: str) -> Callable[[LayerSpec, dict[str, Any], RunContext], Metrics]:
    fn = inproc.growth_channels if kind == "channels" else inproc.growth_members

    def run(spec: LayerSpec, config: dict[str, Any], ctx: RunContext) -> Metrics:
        points = ctx.sizes.growth_channels if kind == "channels" else ctx.sizes.growth_members
        curve: Metrics = {}
        for i, count in enumerate(points):
            cfg = config if i == 0 else ctx.fresh_config()
            coro = fn(spec.key, cfg, ctx.sizes, count)
            curve[str(count)] = asyncio.run(asyncio.wait_for(coro, ctx.sizes.timeout))
        return curve

    return run


SCENARIOS: list[Scenario] = [
    Scenario(
        "pingpong",
        "ping-pong between 2 process-specific channels, one process ({s.pingpong:,} round trips)",
        "round trips/s",
        _inproc(inproc.pingpong),
    ),
    Scenario(
        "specific",
        "{s.ps_messages:,} messages over {s.ps_channels} process-specific channels, one process",
        "msgs/s",
        _inproc(inproc.specific_throughput),
    ),
    Scenario(
        "normal",
        "{s.normal_messages:,} messages on one normal channel, "
        "{s.normal_receivers} receivers, one process",
        "msgs/s (duplicates)",
        _inproc(inproc.normal_receivers),
    ),
    Scenario(
        "group",
        "group of {s.group_members}, {s.group_sends} group_sends: delivered",
        "msgs/s",
        _inproc(inproc.group_fanout),
    ),
    Scenario(
        "latency",
        "cross-process latency, {s.latency_messages:,} msgs at {s.latency_rate:g} msg/s",
        "p50 / p99 ms",
        lambda spec, config, ctx: xproc.latency(spec.key, config, ctx.sizes),
        cross_process=True,
    ),
    Scenario(
        "sporadic",
        "latency of {s.sporadic_messages} cross-process msgs {s.sporadic_gap:g} s apart",
        "p50 / p99 ms",
        lambda spec, config, ctx: xproc.sporadic(spec.key, config, ctx.sizes),
        cross_process=True,
    ),
    Scenario(
        "xput",
        "cross-process throughput, 1 sender process ({s.sender_tasks} tasks) -> "
        "1 receiver process, {s.xput_messages:,} msgs",
        "msgs/s",
        lambda spec, config, ctx: xproc.throughput(spec.key, config, ctx.sizes),
        cross_process=True,
    ),
    Scenario(
        "drain",
        "normal channel of {s.drain_messages:,} msgs drained by "
        "{s.drain_processes} receiver processes",
        "msgs/s (duplicates)",
        lambda spec, config, ctx: xproc.drain(spec.key, config, ctx.sizes, spec.queues_normal),
        cross_process=True,
    ),
    Scenario(
        "idle",
        "idle process with {s.idle_channels}+1 waiting receivers for {s.idle_seconds:g} s: "
        "CPU of one core",
        "%",
        lambda spec, config, ctx: xproc.idle(spec.key, config, ctx.sizes, ctx.server_cpu),
    ),
    Scenario(
        "growth-channels",
        "growth: cost per message vs channels",
        "us/msg",
        _growth("channels"),
        growth=True,
    ),
    Scenario(
        "growth-members",
        "growth: cost per delivered message vs group members",
        "us/msg",
        _growth("members"),
        growth=True,
    ),
]
SCENARIOS.append(
    Scenario(
        "soak",
        "soak, {s.soak_seconds:g} s of consumers joining a group, receiving, disconnecting",
        "RSS MB start → end",
        lambda spec, config, ctx: xproc.soak(spec.key, config, ctx.sizes),
        optional=True,
    )
)
BY_KEY = {s.key: s for s in SCENARIOS}
