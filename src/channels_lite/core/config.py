"""CONFIG parsing: done once, into a frozen typed object; every error names its key."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .capacity import CapacityPolicy
from .codec import serializer_names
from .errors import ConfigurationError

DEFAULT_DRIVER = "sqlite"
DEFAULT_FILENAME = "channels-lite.sqlite3"


@dataclass(frozen=True, slots=True)
class LayerConfig:
    """The core's settings. Driver options travel separately, untouched."""

    driver: str
    expiry: float
    group_expiry: float
    capacity: CapacityPolicy
    serializer_format: str
    symmetric_encryption_keys: tuple[str, ...]
    max_message_size: int | None
    poll_interval: float | None
    purge_interval: float
    process_timeout: float
    consumer_grace: float
    clock: Callable[[], float] | None


#: key -> (default, one-line meaning). The README's configuration table mirrors this.
CORE_KEYS: dict[str, tuple[object, str]] = {
    "driver": (DEFAULT_DRIVER, "registered driver name or 'package.module:Class'"),
    "expiry": (60.0, "seconds an unread message lives"),
    "group_expiry": (86400.0, "seconds a membership lives after its last group_add"),
    "capacity": (100, "messages a channel holds before send raises ChannelFull"),
    "channel_capacity": ({}, "glob or compiled regex -> capacity; first match wins"),
    "serializer_format": ("msgpack", "msgpack, json, or a registered serializer"),
    "symmetric_encryption_keys": ((), "keys for Fernet encryption; the first encrypts"),
    "max_message_size": (None, "largest serialized message in bytes; None for no limit"),
    "poll_interval": (None, "longest idle safety-net poll in seconds; None picks per driver"),
    "purge_interval": (30.0, "seconds between purges of expired data"),
    "process_timeout": (30.0, "seconds without a heartbeat before a process counts as dead"),
    "consumer_grace": (
        5.0,
        "seconds a process-specific channel waits for its consumer to receive again after a "
        "cancelled receive; then its messages are dropped",
    ),
    "clock": (None, "zero-argument callable returning epoch seconds (tests)"),
}


def _number(key: str, value: object, *, minimum: float, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(
            key, f"CONFIG[{key!r}] must be a number of seconds, not {type(value).__name__}"
        )
    try:
        number = float(value)
    except OverflowError:
        raise ConfigurationError(key, f"CONFIG[{key!r}] is too large: {value!r}") from None
    if (
        math.isnan(number)
        or math.isinf(number)
        or number < minimum
        or (number == minimum and not allow_zero)
    ):
        raise ConfigurationError(key, f"CONFIG[{key!r}] must be > {minimum:g}, got {value!r}")
    return number


def _count(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(
            key, f"CONFIG[{key!r}] must be an int, not {type(value).__name__} ({value!r})"
        )
    if value < 1:
        raise ConfigurationError(key, f"CONFIG[{key!r}] must be at least 1, got {value!r}")
    return value


def _capacity_rules(value: object) -> list[tuple[re.Pattern[str], int]]:
    key = "channel_capacity"
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            key, f"CONFIG[{key!r}] must be a dict of pattern -> int, not {type(value).__name__}"
        )
    rules = []
    for pattern, limit in value.items():
        if not isinstance(pattern, str | re.Pattern):
            raise ConfigurationError(
                key, f"CONFIG[{key!r}] pattern {pattern!r} must be a glob str or compiled regex"
            )
        rules.append((CapacityPolicy.compile(pattern), _count(f"{key}[{pattern!r}]", limit)))
    return rules


def parse_config(config: Mapping[str, Any]) -> tuple[LayerConfig, dict[str, Any]]:
    """Split ``config`` into the core's :class:`LayerConfig` and the driver's options."""
    core = {k: config.get(k, default) for k, (default, _) in CORE_KEYS.items()}
    driver_options = {k: v for k, v in config.items() if k not in CORE_KEYS}

    driver = core["driver"]
    if not isinstance(driver, str) or not driver:
        raise ConfigurationError(
            "driver", f"CONFIG['driver'] must be a driver name (str), got {driver!r}"
        )

    serializer_format = core["serializer_format"]
    if not isinstance(serializer_format, str) or serializer_format not in serializer_names():
        raise ConfigurationError(
            "serializer_format",
            f"CONFIG['serializer_format'] is {serializer_format!r}; "
            f"choose one of {', '.join(serializer_names())} or register your own",
        )

    keys = core["symmetric_encryption_keys"]
    if isinstance(keys, str | bytes) or not isinstance(keys, list | tuple):
        raise ConfigurationError(
            "symmetric_encryption_keys",
            "CONFIG['symmetric_encryption_keys'] must be a list of str keys "
            "(a single str would be read character by character)",
        )
    for item in keys:
        if not isinstance(item, str) or not item:
            raise ConfigurationError(
                "symmetric_encryption_keys",
                "CONFIG['symmetric_encryption_keys'] must hold non-empty str keys",
            )
    if keys:
        try:
            import cryptography  # noqa: F401
        except ImportError as exc:
            raise ConfigurationError(
                "symmetric_encryption_keys",
                "symmetric_encryption_keys needs the 'cryptography' package: "
                "pip install 'channels-lite[cryptography]'",
            ) from exc

    max_size = core["max_message_size"]
    if max_size is not None:
        max_size = _count("max_message_size", max_size)

    poll = core["poll_interval"]
    if poll is not None:
        poll = _number("poll_interval", poll, minimum=0.0)

    clock = core["clock"]
    if clock is not None and not callable(clock):
        raise ConfigurationError("clock", "CONFIG['clock'] must be a callable returning seconds")

    process_timeout = _number("process_timeout", core["process_timeout"], minimum=0.0)
    parsed = LayerConfig(
        driver=driver,
        expiry=_number("expiry", core["expiry"], minimum=0.0),
        group_expiry=_number("group_expiry", core["group_expiry"], minimum=0.0),
        capacity=CapacityPolicy(
            _count("capacity", core["capacity"]), _capacity_rules(core["channel_capacity"])
        ),
        serializer_format=serializer_format,
        symmetric_encryption_keys=tuple(keys),
        max_message_size=max_size,
        poll_interval=poll,
        purge_interval=_number("purge_interval", core["purge_interval"], minimum=0.0),
        process_timeout=process_timeout,
        consumer_grace=_number(
            "consumer_grace", core["consumer_grace"], minimum=0.0, allow_zero=True
        ),
        clock=clock,
    )
    if isinstance(driver_options.get("path"), os.PathLike):
        driver_options["path"] = os.fspath(driver_options["path"])
    return parsed, driver_options


def default_sqlite_path() -> str:
    """Where the zero-configuration SQLite file lives.

    Next to the Django project (``settings.BASE_DIR``) when there is one, so every worker
    process of that project finds the same file whatever its working directory; otherwise the
    current working directory.
    """
    base: object = None
    try:
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured

        if settings.configured or os.environ.get("DJANGO_SETTINGS_MODULE"):
            base = getattr(settings, "BASE_DIR", None)
    except (ImportError, ImproperlyConfigured):
        base = None
    directory = os.fspath(base) if isinstance(base, str | os.PathLike) else os.getcwd()
    return os.path.join(directory, DEFAULT_FILENAME)
