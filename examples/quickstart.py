"""Two processes talking through the zero-configuration layer (SQLite on an embedded file).

    uv run python examples/quickstart.py

A "worker" process joins a group with a process-specific channel; the main process sends to
the group and waits for the worker's replies. Nothing but this script runs: no server.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import statistics
import time

from channels_lite import ChannelLayer

log = logging.getLogger("channels_lite.examples.quickstart")
ROUNDS = 200


def worker(ready: multiprocessing.synchronize.Event) -> None:
    async def run() -> None:
        layer = ChannelLayer()  # no CONFIG: SQLite at ./channels-lite.sqlite3
        inbox = await layer.new_channel()
        await layer.group_add("quickstart", inbox)
        ready.set()
        for _ in range(ROUNDS):
            message = await layer.receive(inbox)
            await layer.send(message["reply_to"], {"n": message["n"], "pid": os.getpid()})
        await layer.group_discard("quickstart", inbox)
        await layer.close()

    asyncio.run(run())


async def main() -> None:
    layer = ChannelLayer()
    await layer.flush()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=worker, args=(ready,))
    child.start()
    await asyncio.to_thread(ready.wait, 30)
    me = await layer.new_channel()
    latencies = []
    pid = None
    for n in range(ROUNDS):
        started = time.perf_counter()
        await layer.group_send("quickstart", {"type": "ping", "n": n, "reply_to": me})
        reply = await layer.receive(me)
        latencies.append((time.perf_counter() - started) * 1000)
        assert reply["n"] == n
        pid = reply["pid"]
    await layer.close()
    child.join(30)
    latencies.sort()
    log.info(
        "%d round trips between process %d and process %d through %s: median %.2f ms, p99 %.2f ms",
        ROUNDS,
        os.getpid(),
        pid,
        layer,
        statistics.median(latencies),
        latencies[int(len(latencies) * 0.99) - 1],
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    asyncio.run(main())
