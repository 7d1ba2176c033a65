"""The transports alone, between idle processes: PostgreSQL NOTIFY against redis LPUSH/BLPOP.

    uv run --with 'channels-redis>=4.2' python bench/probe_transport_idle.py [--gap 0.6]
        [--blocks 10]

No channel layer: a sender process sends one small message every ``--gap`` seconds, either
``SELECT pg_notify(...)`` (its server backend commits and signals the listening backend, which
writes to the listening process) or ``LPUSH`` (redis-server hands it to a ``BLPOP`` waiter).
Blocks of 15 messages alternate between the two. Prints p50 / p90 / p99 / max of the delay from
the call to the receiving process reading it, in ms.

It bounds what any layer on either transport can reach when messages come far apart (the
bench's ``sporadic`` scenario): the NOTIFY path has one process wake-up more than redis's, and
on a small VM its tail is where the PostgreSQL layers' sporadic p99 comes from.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/, not the repo, on sys.path
    sys.path.insert(0, str(ROOT))

from bench.postgres_server import PostgresServer  # noqa: E402
from bench.redis_server import RedisServer  # noqa: E402
from bench.stats import percentile  # noqa: E402

logger = logging.getLogger("bench.probe_transport_idle")
BLOCK = 15
CHANNEL = "probe_idle"


def _pg_listener(dsn: str, out: Any, stop: Any) -> None:
    import psycopg

    async def main() -> None:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        await conn.execute(f"LISTEN {CHANNEL}")

        def readable() -> None:
            now = time.monotonic()
            conn.pgconn.consume_input()
            while (note := conn.pgconn.notifies()) is not None:
                out.put(("notify", now - float(note.extra)))

        asyncio.get_running_loop().add_reader(conn.pgconn.socket, readable)
        out.put("ready")
        await asyncio.to_thread(stop.wait)
        await conn.close()

    asyncio.run(main())


def _redis_receiver(url: str, out: Any, stop: Any) -> None:
    import redis.asyncio as redis

    async def main() -> None:
        client = redis.Redis.from_url(url)
        out.put("ready")
        while not stop.is_set():
            got = await client.blpop([CHANNEL], timeout=1)
            if got:
                out.put(("redis", time.monotonic() - float(got[1])))
        await client.aclose()

    asyncio.run(main())


async def _send_block(kind: str, dsn: str, url: str, gap: float) -> None:
    import psycopg
    import redis.asyncio as redis

    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    client = redis.Redis.from_url(url)
    await client.ping()
    due = time.monotonic() + gap
    for _ in range(BLOCK):
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        if kind == "notify":
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, repr(time.monotonic())))
        else:
            await client.lpush(CHANNEL, repr(time.monotonic()))
        due += gap
    await conn.close()
    await client.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gap", type=float, default=0.6, help="seconds between messages")
    parser.add_argument("--blocks", type=int, default=10, help="blocks of 15 per transport")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pg, server = PostgresServer(), RedisServer()
    pg.start()
    server.start()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    stop = ctx.Event()
    children = [
        ctx.Process(target=_pg_listener, args=(pg.dsn(), out, stop)),
        ctx.Process(target=_redis_receiver, args=(server.url, out, stop)),
    ]
    delays: dict[str, list[float]] = {"notify": [], "redis": []}
    try:
        for child in children:
            child.start()
        for _ in children:
            if out.get(timeout=30) != "ready":
                raise RuntimeError("a receiver failed to start")
        for block in range(args.blocks):
            order = ("notify", "redis") if block % 2 == 0 else ("redis", "notify")
            for kind in order:
                asyncio.run(_send_block(kind, pg.dsn(), server.url, args.gap))
                time.sleep(0.3)  # the last message's receipt
                while not out.empty():
                    got, delay = out.get()
                    delays[got].append(delay * 1e3)
    finally:
        stop.set()
        for child in children:
            child.join(5)
        pg.stop()
        server.stop()
    for kind, values in delays.items():
        logger.info(
            "%-6s %d messages %.2f s apart: p50 %.3f  p90 %.3f  p99 %.3f  max %.3f ms",
            kind,
            len(values),
            args.gap,
            *(percentile(values, p) for p in (50, 90, 99)),
            max(values),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
