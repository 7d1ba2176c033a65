"""Operator tasks behind ``channels-lite stats|purge`` and ``manage.py channels_lite``.

Both entry points resolve a ``CHANNEL_LAYERS`` entry the same way, build the layer exactly as
Channels would (so every CONFIG error and every 0.4 translation is the same), then work on a
fresh, unopened instance of that layer's driver: no claim loop, no housekeeping task, nothing
that could take a message from a running server.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .core.errors import ConfigurationError
from .drivers.base import Driver, SupportsStats

if TYPE_CHECKING:
    from .core.layer import ChannelLayer

__all__ = [
    "DEFAULT_BACKEND",
    "LayerEntry",
    "MaintenanceError",
    "format_stats",
    "load_entry",
    "open_driver",
    "purge",
    "purge_layer",
    "stats",
    "vacuum_sqlite",
]

T = TypeVar("T")

DEFAULT_BACKEND = "channels_lite.ChannelLayer"
#: Exit status when the driver lacks an optional capability the command needs.
EXIT_UNSUPPORTED = 3


class MaintenanceError(Exception):
    """The layer could not be resolved or built; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class LayerEntry:
    """One ``CHANNEL_LAYERS`` entry: where it came from, its BACKEND and CONFIG."""

    alias: str
    backend: str
    config: dict[str, Any]
    source: str


def _from_layers(layers: object, alias: str, source: str) -> LayerEntry:
    if not isinstance(layers, Mapping) or not layers:
        raise MaintenanceError(f"{source} has no CHANNEL_LAYERS")
    entry = layers.get(alias)
    if not isinstance(entry, Mapping):
        known = ", ".join(sorted(map(str, layers))) or "none"
        raise MaintenanceError(f"{source} has no CHANNEL_LAYERS[{alias!r}] (aliases: {known})")
    backend = entry.get("BACKEND", DEFAULT_BACKEND)
    config = entry.get("CONFIG") or {}
    if not isinstance(backend, str) or not isinstance(config, Mapping):
        raise MaintenanceError(f"CHANNEL_LAYERS[{alias!r}] in {source} is malformed")
    return LayerEntry(alias, backend, dict(config), source)


def _django_layers(alias: str) -> LayerEntry:
    from django.conf import settings

    module = os.environ.get("DJANGO_SETTINGS_MODULE", "configured settings")
    try:
        layers = getattr(settings, "CHANNEL_LAYERS", None)
    except ImportError as exc:
        raise MaintenanceError(
            f"cannot import the Django settings module {module!r}: {exc}; run from the project "
            "directory or set PYTHONPATH"
        ) from exc
    return _from_layers(layers, alias, f"Django settings {module!r}")


def load_entry(config: str | None, alias: str = "default") -> LayerEntry:
    """Resolve ``--config``: a JSON object, a Django settings module, or the environment.

    - ``'{"path": "x.sqlite3"}'``: CONFIG for ``channels_lite.ChannelLayer``; an object with a
      ``"BACKEND"`` key is a whole CHANNEL_LAYERS entry instead.
    - ``"mysite.settings"``: that module's ``CHANNEL_LAYERS[alias]`` (the current directory is
      put on ``sys.path``, as ``manage.py`` does).
    - ``None``: ``DJANGO_SETTINGS_MODULE``'s CHANNEL_LAYERS if set, else the zero-configuration
      layer (SQLite at ``./channels-lite.sqlite3``).
    """
    from django.conf import settings

    if config is not None and config.lstrip()[:1] in ("{", "["):
        try:
            data = json.loads(config)
        except json.JSONDecodeError as exc:
            raise MaintenanceError(f"--config is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise MaintenanceError("--config JSON must be an object of CONFIG keys")
        if "BACKEND" in data:
            return _from_layers({alias: data}, alias, "--config")
        return LayerEntry(alias, DEFAULT_BACKEND, data, "--config")
    if config is not None:
        current = os.environ.get("DJANGO_SETTINGS_MODULE")
        if settings.configured and current != config:
            raise MaintenanceError(
                f"Django settings are already configured ({current!r}); cannot switch to {config!r}"
            )
        os.environ["DJANGO_SETTINGS_MODULE"] = config
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        return _django_layers(alias)
    if settings.configured or os.environ.get("DJANGO_SETTINGS_MODULE"):
        return _django_layers(alias)
    return LayerEntry(alias, DEFAULT_BACKEND, {}, "default configuration")


def build_layer(entry: LayerEntry) -> ChannelLayer:
    """Instantiate the entry's BACKEND with its CONFIG, as ``get_channel_layer`` would."""
    from .core.layer import ChannelLayer

    module_name, _, attr = entry.backend.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise MaintenanceError(f"cannot import BACKEND {entry.backend!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, ChannelLayer)):
        raise MaintenanceError(
            f"CHANNEL_LAYERS[{entry.alias!r}] uses {entry.backend!r}, which is not a "
            "channels-lite layer; these commands only work with channels-lite"
        )
    try:
        layer: ChannelLayer = cls(**entry.config)
    except ConfigurationError as exc:
        raise MaintenanceError(f"CHANNEL_LAYERS[{entry.alias!r}] ({entry.source}): {exc}") from exc
    return layer


def open_driver(entry: LayerEntry) -> Driver:
    """A fresh, unopened driver on the entry's storage."""
    layer = build_layer(entry)
    # The layer built its driver from CONFIG exactly as a server would (defaults, 0.4
    # translation); a sibling shares that storage without sharing the layer's instance.
    return layer._primary.sibling()


# -- stats ------------------------------------------------------------------------------------


async def stats(driver: Driver, *, top: int, now: float | None = None) -> dict[str, Any]:
    """A JSON-ready snapshot of ``driver``'s storage (opened and closed here)."""
    report: dict[str, Any] = {
        "driver": driver.name,
        "storage": driver.describe(),
        "cross_process": driver.features.cross_process,
        "supports_stats": isinstance(driver, SupportsStats),
    }
    if not isinstance(driver, SupportsStats):
        report["error"] = (
            f"driver {driver.name!r} does not implement the optional SupportsStats capability "
            "(a stats(now, top) method): no statistics available"
        )
        return report
    await driver.open()
    try:
        snapshot = await driver.stats(time.time() if now is None else now, top)
    finally:
        await driver.close()
    ranked = sorted(snapshot.groups.items(), key=lambda item: (-item[1], item[0]))
    report.update(
        messages=snapshot.messages,
        expired_messages=snapshot.expired_messages,
        channels=dict(
            sorted(snapshot.channels.items(), key=lambda item: (-item[1], item[0]))[:top]
        ),
        groups=dict(ranked[:top]),
        processes=snapshot.processes,
        storage_bytes=snapshot.storage_bytes,
        extra=dict(snapshot.extra),
    )
    return report


def _size(count: int | None) -> str:
    if count is None:
        return "unknown"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_stats(report: Mapping[str, Any], *, alias: str, top: int) -> str:
    """The human rendering of :func:`stats`."""
    lines = [f"layer {alias!r}: driver {report['driver']} ({report['storage']})"]
    if not report["cross_process"]:
        lines.append(
            "  note: this driver keeps data inside each server process; this command runs in "
            "its own process and only sees its own (empty) storage"
        )
    if not report["supports_stats"]:
        lines.append(f"  {report['error']}")
        return "\n".join(lines)
    lines += [
        f"  messages pending:          {report['messages']}",
        f"  expired, awaiting purge:   {report['expired_messages']}",
        f"  live processes:            {report['processes']}",
        f"  storage size:              {_size(report['storage_bytes'])}",
    ]
    channels = report["channels"]
    lines.append(f"  channels by pending messages (top {top}):" if channels else "  no channels")
    lines += [f"    {count:>8}  {name}" for name, count in channels.items()]
    groups = report["groups"]
    lines.append(f"  groups by members (top {top}):" if groups else "  no groups")
    lines += [f"    {count:>8}  {name}" for name, count in groups.items()]
    for key, value in report["extra"].items():
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


# -- purge ------------------------------------------------------------------------------------


async def purge(driver: Driver, *, now: float | None = None) -> int:
    """Delete expired messages and memberships; return how many rows went away."""
    await driver.open()
    try:
        return await driver.purge(time.time() if now is None else now)
    finally:
        await driver.close()


async def purge_layer(layer: ChannelLayer) -> int:
    """Purge through a live layer's own driver (0.4's ``clean_expired``)."""
    driver = await layer._driver()
    return await driver.purge(layer._clock())


def sqlite_path(driver: Driver) -> str | None:
    """The database file of a SQLite driver, or None for any other driver."""
    path = getattr(driver, "path", None)
    return path if driver.name == "sqlite" and isinstance(path, str) else None


VACUUM_WARNING = (
    "warning: VACUUM rewrites {path} while holding its write lock: other processes' sends and "
    "receives wait until it finishes (seconds on a large file) and fail with DriverError if "
    "it outlasts their 'timeout'. Run it when traffic is low."
)


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def vacuum_sqlite(path: str, *, timeout: float = 30.0) -> tuple[int, int, bool]:
    """Checkpoint the WAL, VACUUM, checkpoint again.

    Returns (bytes before, bytes after, whether the last checkpoint completed); a checkpoint
    stays incomplete while another connection reads an older snapshot.
    """

    def total() -> int:
        return _file_size(path) + _file_size(f"{path}-wal")

    before = total()
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        conn.execute("VACUUM")
        # In WAL mode VACUUM writes the new pages to the WAL: fold them back and truncate it.
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    finally:
        conn.close()
    return before, total(), not busy


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from synchronous code (the CLI, a management command)."""
    return asyncio.run(coro)
