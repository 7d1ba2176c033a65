"""A Redis storage driver for channels-lite: ``CONFIG = {"driver": "redis", "url": ...}``.

The driver class is imported lazily, so that loading the plugin (which channels-lite does for
every entry point when it first looks a driver up) does not import redis-py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .driver import RedisDriver

__all__ = ["RedisDriver"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "RedisDriver":
        from .driver import RedisDriver

        return RedisDriver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
