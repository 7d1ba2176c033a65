"""channels-lite 0.4 settings, translated to the 0.5 core's.

channels-lite 0.4 had two backends, ``channels_lite.layers.core.SQLiteChannelLayer`` (Django ORM)
and ``channels_lite.layers.aio.AIOSQLiteChannelLayer`` (aiosqlite pool), both storing into the
SQLite file of a Django ``DATABASES`` alias. Their CONFIG keys were exactly: ``database``
(required), ``expiry``, ``group_expiry``, ``capacity``, ``channel_capacity``, ``polling_interval``,
``polling_idle_timeout``, ``auto_trim``, ``enforce_capacity``, ``serializer_format``,
``symmetric_encryption_keys``, and for the aio backend ``pool_size``.

:func:`translate_04` maps them onto the 0.5 keys. Keys that carry over unchanged stay silent;
every key that changed or lost its meaning gets one :class:`DeprecationWarning` (and one log
WARNING) per process saying what replaced it.

The file of ``DATABASES[alias]`` is reused as the SQLite driver's ``path``: the driver keeps its
own tables in it (``channels_lite_messages``, ``channels_lite_groups``, ...), next to 0.4's
``channels_lite_event`` and ``channels_lite_groupmembership``, which it never reads: messages and
memberships stored by 0.4 are **not migrated** (they were short-lived: ``expiry`` defaults to 60
seconds, and consumers re-join their groups when they reconnect).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Mapping
from typing import Any

from .core.errors import ConfigurationError

__all__ = ["OPTIONS_04", "UNLIMITED_CAPACITY", "reset_warnings", "translate_04", "warn_once"]

logger = logging.getLogger("channels_lite.compat")

#: What ``enforce_capacity=False`` becomes: no practical limit (expiry still bounds storage).
UNLIMITED_CAPACITY = 2**31 - 1

#: Every CONFIG key channels-lite 0.4 accepted -> what became of it (for docs and tests).
OPTIONS_04: dict[str, str] = {
    "database": "translated: the file of DATABASES[alias] becomes the sqlite driver's 'path'",
    "expiry": "unchanged",
    "group_expiry": "unchanged",
    "capacity": "unchanged",
    "channel_capacity": "unchanged (None means {})",
    "polling_interval": "translated to 'poll_interval'",
    "polling_idle_timeout": "ignored: no idle polling task any more",
    "auto_trim": "ignored: expired data is always purged every 'purge_interval' seconds",
    "enforce_capacity": "True ignored (always enforced); False becomes an unlimited 'capacity'",
    "serializer_format": "unchanged",
    "symmetric_encryption_keys": "unchanged (None means no encryption)",
    "pool_size": "ignored: one connection per event loop",
}

_MESSAGES: dict[str, str] = {
    "database": (
        "CONFIG['database'] (channels-lite 0.4) is deprecated: the SQLite file of "
        "DATABASES[{alias!r}] ({path}) is now used as CONFIG['path'] of the 'sqlite' driver, "
        "which keeps its own tables there (messages stored by 0.4 are not migrated). Use "
        "BACKEND 'channels_lite.ChannelLayer' with CONFIG['path'] instead."
    ),
    "polling_interval": (
        "CONFIG['polling_interval'] (channels-lite 0.4) is replaced by CONFIG['poll_interval']: "
        "messages now wake receivers at once and poll_interval only bounds the idle "
        "safety-net poll; using poll_interval={value!r}."
    ),
    "polling_idle_timeout": (
        "CONFIG['polling_idle_timeout'] (channels-lite 0.4) no longer does anything and is "
        "ignored: one claim loop per process sleeps while nobody receives, so there is no "
        "idle polling task to time out. Remove it."
    ),
    "auto_trim": (
        "CONFIG['auto_trim'] (channels-lite 0.4) no longer does anything and is ignored: "
        "expired messages and memberships are never delivered, and are purged in the "
        "background every CONFIG['purge_interval'] seconds (default 30); "
        "'channels-lite purge' (or manage.py channels_lite purge) purges on demand. Remove it."
    ),
    "enforce_capacity": (
        "CONFIG['enforce_capacity'] (channels-lite 0.4) is deprecated: capacity is always "
        "enforced now, exactly. {detail} Remove it, and set CONFIG['capacity'] instead."
    ),
    "pool_size": (
        "CONFIG['pool_size'] (channels-lite 0.4) no longer does anything and is ignored: each "
        "event loop uses one connection that runs whole transactions per call, and concurrent "
        "sends are batched. Remove it."
    ),
    "backend": (
        "BACKEND {backend!r} is the channels-lite 0.4 name; it still works (CONFIG is "
        "translated) but is deprecated: use 'channels_lite.ChannelLayer'. See docs/migrating.md."
    ),
}

_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_once(topic: str, message: str, *, stacklevel: int = 2) -> bool:
    """Emit ``message`` as a DeprecationWarning and a log WARNING, once per process per topic.

    Returns whether it was emitted now.
    """
    with _warned_lock:
        if topic in _warned:
            return False
        _warned.add(topic)
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel + 1)
    logger.warning("%s", message)
    return True


def reset_warnings() -> None:
    """Forget which warnings were emitted (tests)."""
    with _warned_lock:
        _warned.clear()


def _is_memory_name(name: str) -> bool:
    # ":memory:", and the shared in-memory database Django's test runner creates for SQLite
    # ("file:memorydb_default?mode=memory&cache=shared").
    return name == ":memory:" or "mode=memory" in name


def _database_target(alias: object) -> tuple[str, str | None]:
    """``("path", file)`` or ``("memory", store name)`` for a Django DATABASES alias."""
    if not isinstance(alias, str) or not alias:
        raise ConfigurationError(
            "database", f"CONFIG['database'] must be a DATABASES alias (str), not {alias!r}"
        )
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        databases: Mapping[str, Mapping[str, Any]] = settings.DATABASES
    except ImproperlyConfigured as exc:
        raise ConfigurationError(
            "database",
            f"CONFIG['database'] = {alias!r} needs Django settings, which are not configured "
            f"({exc}); set DJANGO_SETTINGS_MODULE, or give CONFIG['path'] instead",
        ) from exc
    entry = databases.get(alias)
    if entry is None:
        known = ", ".join(sorted(databases)) or "none"
        raise ConfigurationError(
            "database",
            f"CONFIG['database'] = {alias!r} is not in DATABASES (aliases: {known})",
        )
    engine = str(entry.get("ENGINE", ""))
    if "sqlite3" not in engine:
        raise ConfigurationError(
            "database",
            f"DATABASES[{alias!r}] uses ENGINE {engine!r}; the channels-lite 0.4 backends need "
            "SQLite. For PostgreSQL use BACKEND 'channels_lite.ChannelLayer' with "
            f"CONFIG {{'driver': 'postgres', 'database': {alias!r}}}",
        )
    name = entry.get("NAME")
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name:
        raise ConfigurationError(
            "database", f"DATABASES[{alias!r}] has no NAME; give CONFIG['path'] instead"
        )
    if _is_memory_name(name):
        return "memory", f"django-{alias}"
    return "path", name


def _encryption_keys(value: object) -> object:
    # 0.4 accepted bytes keys too (it encoded str keys as UTF-8 before hashing): decoding them
    # as UTF-8 gives the core the same key material.
    if isinstance(value, list | tuple):
        keys: list[object] = []
        for item in value:
            if not isinstance(item, bytes):
                keys.append(item)
                continue
            try:
                keys.append(item.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise ConfigurationError(
                    "symmetric_encryption_keys",
                    "CONFIG['symmetric_encryption_keys'] holds a bytes key that is not UTF-8; "
                    "give str keys",
                ) from exc
        return keys
    return value


def translate_04(config: Mapping[str, Any], *, backend: str) -> dict[str, Any]:
    """The 0.5 CONFIG equivalent to a channels-lite 0.4 ``config`` for ``backend``.

    Keys 0.4 did not know pass through untouched, so new keys (``path``, ``purge_interval``...)
    can be added to an old configuration.
    """
    warn_once(f"backend:{backend}", _MESSAGES["backend"].format(backend=backend), stacklevel=3)
    out = dict(config)
    stacklevel = 3  # whoever instantiated the layer (usually channels.layers)

    if "database" in out:
        alias = out.pop("database")
        kind, target = _database_target(alias)
        driver = out.get("driver", "sqlite")
        if driver != "sqlite" and not (kind == "memory" and driver == "memory"):
            raise ConfigurationError(
                "database",
                f"CONFIG['database'] names a SQLite database, but CONFIG['driver'] is {driver!r}; "
                "remove one of them",
            )
        if "path" in out:
            logger.info(
                "channels-lite: CONFIG['path'] given; CONFIG['database'] = %r is not used", alias
            )
        elif kind == "memory":
            # Django's test runner swapped in an in-memory database: keep the layer in-process
            # as that database was, shared by every layer of the process.
            out["driver"] = "memory"
            out.setdefault("store", target)
            logger.info(
                "channels-lite: DATABASES[%r] is an in-memory SQLite database; using the "
                "'memory' driver (process-local)",
                alias,
            )
        else:
            out["driver"] = "sqlite"
            out["path"] = target
            warn_once(
                "database",
                _MESSAGES["database"].format(alias=alias, path=target),
                stacklevel=stacklevel,
            )

    if "polling_interval" in out:
        value = out.pop("polling_interval")
        if "poll_interval" in out:
            value = out["poll_interval"]
        else:
            out["poll_interval"] = value
        warn_once(
            "polling_interval",
            _MESSAGES["polling_interval"].format(value=value),
            stacklevel=stacklevel,
        )

    for key in ("polling_idle_timeout", "auto_trim", "pool_size"):
        if key in out:
            out.pop(key)
            warn_once(key, _MESSAGES[key], stacklevel=stacklevel)

    if "enforce_capacity" in out:
        enforce = out.pop("enforce_capacity")
        if enforce:
            detail = "enforce_capacity=True is the only behaviour now."
        else:
            out["capacity"] = UNLIMITED_CAPACITY
            dropped = out.pop("channel_capacity", None)
            detail = (
                f"enforce_capacity=False is translated to capacity={UNLIMITED_CAPACITY} "
                "(no practical limit; expiry still bounds storage)"
                + (", and channel_capacity is ignored." if dropped else ".")
            )
        warn_once(
            "enforce_capacity",
            _MESSAGES["enforce_capacity"].format(detail=detail),
            stacklevel=stacklevel,
        )

    # 0.4 accepted None for these two, meaning "none".
    if out.get("channel_capacity", {}) is None:
        out.pop("channel_capacity")
    if "symmetric_encryption_keys" in out:
        keys = out["symmetric_encryption_keys"]
        if keys is None:
            out.pop("symmetric_encryption_keys")
        else:
            out["symmetric_encryption_keys"] = _encryption_keys(keys)
    return out
