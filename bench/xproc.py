"""Scenarios across OS processes: ``multiprocessing`` spawn children share the layer's storage.

Cross-process times use ``time.monotonic()``, which on Linux is one system-wide clock
(CLOCK_MONOTONIC), so a timestamp taken in the sender is comparable in the receiver.
Children report over a queue as ``(kind, index, payload)``; kind is ready/start/result/error.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench.common import cancel, warm_receive
from bench.layers import build_layer, close_layer, storage_bytes
from bench.sizes import Sizes
from bench.stats import percentile

logger = logging.getLogger("bench.xproc")

WARMUP = 20
#: A child gives up when nothing arrived for this long (messages were lost).
STALL = 10.0
DRAIN_CHANNEL = "bench.drain"

_ctx = multiprocessing.get_context("spawn")
#: Children alive right now, so that an interrupted run can stop them.
LIVE: set[multiprocessing.process.BaseProcess] = set()


def terminate_all() -> None:
    for proc in list(LIVE):
        if proc.is_alive():
            proc.terminate()
        proc.join(2)
        LIVE.discard(proc)


class ChildFailed(RuntimeError):
    pass


# -- child side ---------------------------------------------------------------------------


def _child_main(fn: Callable[..., Any], out: Any, index: int, *args: Any) -> None:
    try:
        asyncio.run(fn(out, index, *args))
    except BaseException:
        out.put(("error", index, traceback.format_exc()))
        raise


async def _latency_child(out: Any, index: int, key: str, config: dict[str, Any]) -> None:
    layer = build_layer(key, config)
    try:
        channel = await layer.new_channel()
        out.put(("ready", index, channel))
        delays: list[float] = []
        received = 0
        seen: set[int] = set()
        with contextlib.suppress(TimeoutError):  # messages were lost: report what arrived
            while True:
                message = await asyncio.wait_for(layer.receive(channel), STALL)
                now = time.monotonic()
                if message["type"] == "bench.stop":
                    break
                received += 1
                seen.add(message["i"])
                if message["i"] >= 0:
                    delays.append(now - message["t"])
        result = {"delays": delays, "received": received, "unique": len(seen)}
        out.put(("result", index, result))
    finally:
        await close_layer(key, layer)


async def _throughput_child(out: Any, index: int, key: str, config: dict[str, Any], n: int) -> None:
    layer = build_layer(key, config)
    try:
        channel = await layer.new_channel()
        out.put(("ready", index, channel))
        seen: set[int] = set()
        received = 0
        last = 0.0
        with contextlib.suppress(TimeoutError):
            while len(seen) < n:
                message = await asyncio.wait_for(layer.receive(channel), STALL)
                last = time.monotonic()
                if message["type"] != "bench.msg":
                    continue
                received += 1
                seen.add(message["i"])
        out.put(("result", index, {"unique": len(seen), "received": received, "last": last}))
    finally:
        await close_layer(key, layer)


async def _drain_child(
    out: Any,
    index: int,
    key: str,
    config: dict[str, Any],
    n: int,
    prefill: bool,
    go: Any,
    seen: Any,
    unique: Any,
) -> None:
    layer = build_layer(key, config)
    try:
        await warm_receive(layer, f"bench.warm{index}")
        ids: list[int] = []
        last = time.monotonic()

        async def receive_loop() -> None:
            nonlocal last
            while True:
                message = await layer.receive(DRAIN_CHANNEL)
                now = time.monotonic()
                if message["type"] == "bench.stop":
                    return
                i = message["i"]
                ids.append(i)
                last = now
                with unique.get_lock():  # several processes: check-and-set under the lock
                    if not seen[i]:
                        seen[i] = 1
                        unique.value += 1

        if prefill:
            out.put(("ready", index, None))
            await asyncio.get_running_loop().run_in_executor(None, go.wait)
            task = asyncio.create_task(receive_loop())
        else:
            task = asyncio.create_task(receive_loop())
            await asyncio.sleep(0.3)  # pubsub: be subscribed before anything is published
            out.put(("ready", index, None))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.01)
                if prefill and unique.value >= n:
                    break
                if time.monotonic() - last > STALL:
                    break
        finally:
            await cancel([task])
        out.put(("result", index, {"ids": ids, "last": last}))
    finally:
        await close_layer(key, layer)


async def _idle_child(out: Any, index: int, key: str, config: dict[str, Any], sizes: Sizes) -> None:
    layer = build_layer(key, config)
    try:
        channels = [await layer.new_channel() for _ in range(sizes.idle_channels)]
        channels.append("bench.idle")
        for ch in channels:  # every receiver path used once before going idle
            await warm_receive(layer, ch)
        tasks = [asyncio.create_task(layer.receive(ch)) for ch in channels]
        await asyncio.sleep(sizes.idle_settle)
        out.put(("start", index, None))
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(sizes.idle_seconds)
        cpu1, wall1 = time.process_time(), time.monotonic()
        await cancel(tasks)
        out.put(
            (
                "result",
                index,
                {"cpu_pct": (cpu1 - cpu0) / (wall1 - wall0) * 100},
            )
        )
    finally:
        await close_layer(key, layer)


#: Longest wait after the soak for departed consumers' channels to close (consumer_grace is 5).
SOAK_SETTLE = 10.0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _footprint(layer: Any) -> dict[str, int]:
    gc.collect()
    state = layer.local_state() if hasattr(layer, "local_state") else {}
    return {
        "rss": _rss_bytes(),
        "objects": len(gc.get_objects()),
        "tasks": len(asyncio.all_tasks()),
        "layer_state": sum(state.values()),
    }


async def _soak_child(
    out: Any, index: int, key: str, config: dict[str, Any], seconds: float, batch: int
) -> None:
    """Consumers come and go for ``seconds``: each round ``batch`` consumers join a group,
    get a group message, wait again and are cancelled (a disconnect), leave the group, and
    one more message goes to each departed channel. Footprint sampled at 1/3 and at the end."""
    layer = build_layer(key, config)
    group = "bench-soak"
    try:
        start = time.monotonic()
        first: dict[str, int] | None = None
        consumers = 0
        curve: list[tuple[float, float]] = []  # (seconds, RSS MB), every tenth of the run
        while time.monotonic() - start < seconds:
            elapsed = time.monotonic() - start
            if elapsed >= len(curve) * seconds / 10:
                curve.append((round(elapsed), round(_rss_bytes() / 2**20, 1)))
            if first is None and elapsed >= seconds / 3:
                first, consumers = _footprint(layer), 0
            channels = [await layer.new_channel() for _ in range(batch)]
            for ch in channels:
                await layer.group_add(group, ch)
            tasks = [asyncio.create_task(layer.receive(ch)) for ch in channels]
            await asyncio.sleep(0)
            await layer.group_send(group, {"type": "bench.soak"})
            await asyncio.wait_for(asyncio.gather(*tasks), STALL)
            tasks = [asyncio.create_task(layer.receive(ch)) for ch in channels]
            await asyncio.sleep(0.001)
            await cancel(tasks)
            for ch in channels:
                await layer.group_discard(group, ch)
                await layer.send(ch, {"type": "bench.late"})  # nobody will read it
            consumers += batch
        # The last consumers' channels close when their grace runs out (consumer_grace, 5 s):
        # after that nothing may be left of any consumer.
        settle = time.monotonic()
        local_state = getattr(layer, "local_state", None)
        for _ in range(int(SOAK_SETTLE / 0.1)):
            state = local_state() if local_state is not None else {}
            if not (state.get("open_channels", 0) or state.get("buffered_channels", 0)):
                break
            await asyncio.sleep(0.1)
        settled_in = time.monotonic() - settle
        last = _footprint(layer)
        left = local_state() if local_state is not None else {}
        first = first or last
        out.put(
            (
                "result",
                index,
                {
                    "rss_start_mb": first["rss"] / 2**20,
                    "rss_end_mb": last["rss"] / 2**20,
                    "objects_growth": last["objects"] - first["objects"],
                    "tasks_growth": last["tasks"] - first["tasks"],
                    "layer_state_growth": last["layer_state"] - first["layer_state"],
                    "left_buffers": left.get("buffered_channels", 0),
                    "left_open": left.get("open_channels", 0),
                    "left_waiting": left.get("waiting_channels", 0),
                    "settled_s": round(settled_in, 1),
                    "consumers": consumers,
                    "seconds": seconds,
                    "rss_curve": [*curve, (round(seconds), round(last["rss"] / 2**20, 1))],
                    "db_mb": (storage_bytes(config) or 0) / 2**20,
                },
            )
        )
    finally:
        await close_layer(key, layer)


# -- parent side --------------------------------------------------------------------------


class Children:
    """A set of spawn children running one child function; the parent reads their reports."""

    def __init__(self, fn: Callable[..., Any], args: list[tuple[Any, ...]], timeout: float):
        self.timeout = timeout
        self.out = _ctx.Queue()
        self.procs = [
            _ctx.Process(target=_child_main, args=(fn, self.out, i, *a), daemon=True)
            for i, a in enumerate(args)
        ]
        for proc in self.procs:
            proc.start()
            LIVE.add(proc)

    def expect(self, kind: str, timeout: float | None = None) -> list[Any]:
        """One ``kind`` report from every child, ordered by child index."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(got) < len(self.procs):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"children did not report {kind!r} in time")
            try:
                what, index, payload = self.out.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [p.exitcode for p in self.procs if p.exitcode not in (None, 0)]
                if dead:
                    raise ChildFailed(
                        f"child exited with {dead} before reporting {kind!r}"
                    ) from None
                continue
            if what == "error":
                raise ChildFailed(f"child {index} failed:\n{payload}")
            if what != kind:
                raise ChildFailed(f"child {index} reported {what!r}, expected {kind!r}")
            got[index] = payload
        return [got[i] for i in range(len(self.procs))]

    def close(self, force: bool = False) -> None:
        """Join the children; on an error (or Ctrl-C) stop them at once instead."""
        for proc in self.procs:
            proc.join(0 if force else 5)
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
            LIVE.discard(proc)
        self.out.close()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(force=exc_type is not None)


async def _send_many(layer: Any, channel: str, n: int, tasks: int) -> None:
    indices = iter(range(n))

    async def worker() -> None:
        for i in indices:
            await layer.send(channel, {"type": "bench.msg", "i": i})

    await asyncio.gather(*(worker() for _ in range(tasks)))


def latency(key: str, config: dict[str, Any], sizes: Sizes) -> dict[str, float]:
    """A paced stream to another process's process-specific channel: delay send -> receipt."""
    return _paced(key, config, sizes.latency_messages, 1 / sizes.latency_rate, WARMUP, sizes)


def sporadic(key: str, config: dict[str, Any], sizes: Sizes) -> dict[str, float]:
    """The same, one message every ``sporadic_gap`` seconds: a chat's traffic, where each
    message finds both processes idle."""
    return _paced(key, config, sizes.sporadic_messages, sizes.sporadic_gap, 3, sizes)


def _paced(
    key: str, config: dict[str, Any], n: int, interval: float, warmup: int, sizes: Sizes
) -> dict[str, float]:
    with Children(_latency_child, [(key, config)], sizes.timeout) as kids:
        (channel,) = kids.expect("ready")

        async def send() -> None:
            layer = build_layer(key, config)
            try:
                due = time.monotonic()
                for i in range(-warmup, n):
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await layer.send(channel, {"type": "bench.lat", "i": i, "t": time.monotonic()})
                    # The warm-up goes at the latency scenario's pace; every timed message
                    # comes a whole interval after the one before it.
                    due += interval if i + 1 >= 0 else min(interval, 1 / sizes.latency_rate)
                await layer.send(channel, {"type": "bench.stop"})
            finally:
                await close_layer(key, layer)

        asyncio.run(send())
        (result,) = kids.expect("result")
    delays = result["delays"]
    return {
        "p50_ms": percentile(delays, 50) * 1e3,
        "p99_ms": percentile(delays, 99) * 1e3,
        # Every delay, for the report's percentiles over all repetitions pooled: one
        # repetition's p99 is its tenth-slowest message, one scheduling hiccup away.
        "delays_ms": [round(d * 1e3, 4) for d in delays],
        # A message received twice must not hide a lost one (nor show as "-1 lost").
        "duplicates": result["received"] - result["unique"],
        "lost": n + warmup - result["unique"],
    }


def throughput(key: str, config: dict[str, Any], sizes: Sizes) -> dict[str, float]:
    """One sender process (``sender_tasks`` concurrent sends) -> one receiver process."""
    n = sizes.xput_messages
    with Children(_throughput_child, [(key, config, n)], sizes.timeout) as kids:
        (channel,) = kids.expect("ready")

        async def send() -> tuple[float, float]:
            layer = build_layer(key, config)
            try:
                # Warm the sender's connections on a channel nobody reads.
                await layer.send("bench.sender-warm", {"type": "bench.warm"})
                start = time.monotonic()
                await _send_many(layer, channel, n, sizes.sender_tasks)
                return start, time.monotonic()
            finally:
                await close_layer(key, layer)

        start, sent = asyncio.run(send())
        (result,) = kids.expect("result")
    if not result["unique"]:
        raise RuntimeError(f"none of {n} messages arrived")
    return {
        "rate": result["unique"] / (result["last"] - start),
        "send_rate": n / (sent - start),
        "duplicates": result["received"] - result["unique"],
        "lost": n - result["unique"],
    }


def drain(key: str, config: dict[str, Any], sizes: Sizes, queues: bool) -> dict[str, float]:
    """A normal channel drained by ``drain_processes`` receiver processes: rate, exactly once.

    Layers that queue normal channels are pre-filled, then the receivers start together and
    the time to empty the channel is measured. A layer that does not queue (pubsub) drops what
    is sent before anyone subscribes, so there the receivers subscribe first and the time runs
    from the first send.
    """
    n, procs = sizes.drain_messages, sizes.drain_processes
    go = _ctx.Event()
    seen = _ctx.Array("b", n, lock=False)  # message i arrived somewhere
    unique = _ctx.Value("q", 0)  # how many distinct messages arrived
    args = [(key, config, n, queues, go, seen, unique) for _ in range(procs)]
    with Children(_drain_child, args, sizes.timeout) as kids:
        kids.expect("ready")

        async def send() -> float:
            layer = build_layer(key, config)
            try:
                if queues:
                    await _send_many(layer, DRAIN_CHANNEL, n, sizes.sender_tasks)
                    start = time.monotonic()
                    go.set()
                else:
                    start = time.monotonic()
                    await _send_many(layer, DRAIN_CHANNEL, n, sizes.sender_tasks)
                    for _ in range(procs):
                        await layer.send(DRAIN_CHANNEL, {"type": "bench.stop"})
                return start
            finally:
                await close_layer(key, layer)

        try:
            start = asyncio.run(send())
        finally:
            go.set()
        results = kids.expect("result")
    ids = [i for r in results for i in r["ids"]]
    unique = len(set(ids))
    end = max(r["last"] for r in results if r["ids"]) if ids else start
    return {
        "rate": unique / (end - start) if end > start else 0.0,
        "duplicates": len(ids) - unique,
        "lost": n - unique,
        "per_process": [len(r["ids"]) for r in results],  # type: ignore[dict-item]
    }


def idle(
    key: str, config: dict[str, Any], sizes: Sizes, server_cpu: Callable[[], float | None]
) -> dict[str, float]:
    """CPU of a process whose receivers wait for ``idle_seconds`` with no traffic."""
    with Children(_idle_child, [(key, config, sizes)], sizes.timeout) as kids:
        kids.expect("start")
        wall0, srv0, size0 = time.monotonic(), server_cpu(), storage_bytes(config)
        (result,) = kids.expect("result", sizes.idle_seconds + sizes.timeout)
        wall1, srv1, size1 = time.monotonic(), server_cpu(), storage_bytes(config)
    metrics: dict[str, float] = {"cpu_pct": result["cpu_pct"]}
    if srv0 is not None and srv1 is not None:
        metrics["server_cpu_pct"] = (srv1 - srv0) / (wall1 - wall0) * 100
    if size0 is not None and size1 is not None:
        metrics["growth_bytes"] = size1 - size0
    return metrics


def soak(key: str, config: dict[str, Any], sizes: Sizes) -> dict[str, float]:
    """Memory and task footprint while consumers connect and disconnect (see _soak_child)."""
    seconds = sizes.soak_seconds
    with Children(_soak_child, [(key, config, seconds, 20)], seconds + sizes.timeout) as kids:
        (result,) = kids.expect("result")
    result["rss_growth_pct"] = (result["rss_end_mb"] / result["rss_start_mb"] - 1) * 100
    return result
