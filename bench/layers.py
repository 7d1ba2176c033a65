"""The layers under test: how to configure, build and close each one, in any process.

A layer is named by a short key; its configuration is a plain dict so that a ``spawn`` child
can rebuild the same layer (same SQLite file, same redis-server) from ``(key, config)``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: High enough that no scenario hits ChannelFull; the same for every layer that has one.
CAPACITY = 200_000
EXPIRY = 60


@dataclass(frozen=True)
class LayerSpec:
    key: str
    label: str
    #: Processes can talk through it (False for in-process layers: cross-process is n/a).
    cross_process: bool
    #: A normal channel queues messages until one receiver takes each one. channels_redis
    #: pubsub does not: a message reaches every subscribed process, or nobody.
    queues_normal: bool
    needs_redis: bool = False
    #: Needs the harness's throwaway PostgreSQL server.
    needs_postgres: bool = False
    #: Runs in another virtualenv (channels-lite 0.4 shares our import name).
    external: bool = False


LAYERS: dict[str, LayerSpec] = {
    spec.key: spec
    for spec in (
        LayerSpec("inmemory", "InMemory", cross_process=False, queues_normal=True),
        LayerSpec("redis-core", "channels_redis core", True, queues_normal=True, needs_redis=True),
        LayerSpec(
            "redis-pubsub", "channels_redis pubsub", True, queues_normal=False, needs_redis=True
        ),
        LayerSpec("lite-sqlite", "channels-lite sqlite", True, queues_normal=True),
        LayerSpec("lite-memory", "channels-lite memory", False, queues_normal=True),
        LayerSpec(
            "lite-postgres",
            "channels-lite postgres",
            True,
            queues_normal=True,
            needs_postgres=True,
        ),
        LayerSpec(
            "channels-postgres",
            "channels_postgres 1.1",
            True,
            queues_normal=True,
            needs_postgres=True,
        ),
        LayerSpec("lite-0.4", "channels-lite 0.4 (PyPI)", True, queues_normal=True, external=True),
    )
}

#: The layers the goals are stated against.
SUBJECT = "lite-sqlite"
BASELINE = "redis-core"
CEILING = "inmemory"

_counter = itertools.count(1)


@dataclass
class BenchEnv:
    """What a layer configuration may point at: a scratch directory, maybe servers."""

    tmpdir: Path
    redis_url: str | None = None
    #: The throwaway PostgreSQL server (bench.postgres_server.PostgresServer), if started.
    postgres: Any = None


def layer_config(key: str, env: BenchEnv, tag: str) -> dict[str, Any]:
    """A fresh configuration for one layer instance; ``tag`` names its storage."""
    if key == "inmemory":
        return {"capacity": CAPACITY, "expiry": EXPIRY}
    if key == "redis-core":
        return {"hosts": [env.redis_url], "capacity": CAPACITY, "expiry": EXPIRY}
    if key == "redis-pubsub":
        return {"hosts": [env.redis_url]}
    if key in ("lite-sqlite", "lite-0.4"):
        path = env.tmpdir / f"{tag}-{next(_counter)}.sqlite3"
        if key == "lite-0.4":
            return {"path": str(path), "capacity": CAPACITY, "expiry": EXPIRY}
        return {"driver": "sqlite", "path": str(path), "capacity": CAPACITY, "expiry": EXPIRY}
    if key == "lite-memory":
        return {"driver": "memory", "capacity": CAPACITY, "expiry": EXPIRY}
    if key == "lite-postgres":
        # A fresh schema per instance (the driver creates it): runs never see each other.
        return {
            "driver": "postgres",
            "dsn": env.postgres.dsn(),
            "schema": f"bench_{tag.replace('-', '_')}_{next(_counter)}",
            "capacity": CAPACITY,
            "expiry": EXPIRY,
        }
    if key == "channels-postgres":
        # channels_postgres has fixed table names and no prefix option: a fresh database per
        # instance, copied from a template that holds its migrated tables. Its CONFIG is a
        # Django DATABASES entry plus the layer's own keys; it has no capacity.
        server = env.postgres
        name = f"cp_{tag.replace('-', '_')}_{next(_counter)}"
        server.execute(f"CREATE DATABASE {name} TEMPLATE {server.channels_postgres_template()}")
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": "bench",
            "PASSWORD": "",
            "HOST": "127.0.0.1",
            "PORT": server.port,
            "expiry": EXPIRY,
        }
    raise KeyError(key)


def drop_storage(key: str, config: dict[str, Any], env: BenchEnv) -> None:
    """Remove what :func:`layer_config` created on the PostgreSQL server (best effort)."""
    if env.postgres is None:
        return
    with contextlib.suppress(Exception):
        if key == "lite-postgres":
            env.postgres.execute(f'DROP SCHEMA IF EXISTS "{config["schema"]}" CASCADE')
        elif key == "channels-postgres":
            env.postgres.execute(
                f'DROP DATABASE IF EXISTS "{config["NAME"]}" WITH (FORCE)', database="postgres"
            )


def _django_for_channels_postgres() -> None:
    # channels_postgres defines Django models at import: it needs configured settings.
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(INSTALLED_APPS=["channels_postgres"], USE_TZ=True, DATABASES={})
        django.setup()


def build_layer(key: str, config: dict[str, Any]) -> Any:
    """The layer object for ``key``; imports happen here, so a child imports only its layer."""
    if key == "inmemory":
        from channels.layers import InMemoryChannelLayer

        return InMemoryChannelLayer(**config)
    if key == "redis-core":
        from channels_redis.core import RedisChannelLayer

        return RedisChannelLayer(**config)
    if key == "redis-pubsub":
        from channels_redis.pubsub import RedisPubSubChannelLayer

        return RedisPubSubChannelLayer(**config)
    if key in ("lite-sqlite", "lite-memory", "lite-postgres"):
        from channels_lite import ChannelLayer

        return ChannelLayer(**config)
    if key == "channels-postgres":
        _django_for_channels_postgres()
        from channels_postgres.core import PostgresChannelLayer

        # The defaults Django's ConnectionHandler fills in for a DATABASES entry.
        django_defaults = {
            "OPTIONS": {}, "TIME_ZONE": None, "CONN_MAX_AGE": 0, "CONN_HEALTH_CHECKS": False,
            "AUTOCOMMIT": True, "ATOMIC_REQUESTS": False, "TEST": {},
        }  # fmt: skip
        return PostgresChannelLayer(**{**django_defaults, **config})
    if key == "lite-0.4":
        return _build_legacy(config)
    raise KeyError(key)


def _build_legacy(config: dict[str, Any]) -> Any:
    # channels-lite 0.4 configures a Django database alias rather than a file path.
    from bench import legacy

    return legacy.build(config)


async def close_layer(key: str, layer: Any) -> None:
    """Release connections so nothing outlives the event loop that made them."""
    if key == "redis-core":
        await layer.close_pools()
    elif key == "redis-pubsub":
        await layer.flush()  # also closes its connections
    elif key in ("lite-sqlite", "lite-memory", "lite-postgres"):
        await layer.close()
    elif key == "channels-postgres":
        await _close_channels_postgres()
    elif key == "lite-0.4":
        from bench import legacy

        await legacy.close(layer)
    elif key == "inmemory":
        await layer.flush()


def storage_bytes(config: dict[str, Any]) -> int | None:
    """Bytes on disk for a SQLite-backed configuration (database plus WAL), else None."""
    path = config.get("path")
    if not path:
        return None
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += os.path.getsize(path + suffix)
    return total


async def _close_channels_postgres() -> None:
    """channels_postgres has no close(): its pool, listener and queues are module globals.

    Close them so the next instance (a new event loop, another database) starts clean.
    """
    import asyncio

    from channels_postgres import core, db

    listeners = [
        t
        for t in asyncio.all_tasks()
        if "listen_to_all_channels" in getattr(t.get_coro(), "__qualname__", "")
    ]
    for task in listeners:
        task.cancel()
    await asyncio.gather(*listeners, return_exceptions=True)
    pool, db.connection_pool = db.connection_pool, None
    if pool is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.close(timeout=2), 5)
    db.is_creating_connection_pool = asyncio.Lock()
    core.ASYNCIO_EVENT_CHANNEL_MAPPING.clear()
