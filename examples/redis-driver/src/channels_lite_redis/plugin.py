"""The entry point module: channels-lite calls this hook to learn about the driver.

``pyproject.toml`` names this module in the ``channels_lite`` entry-point group. Importing it
must stay cheap: the driver class (and redis-py) is imported only when the hook runs.
"""

from __future__ import annotations

from collections.abc import Callable

from channels_lite.drivers.base import Driver
from channels_lite.drivers.hookspecs import hookimpl


@hookimpl
def channels_lite_register_drivers(register: Callable[[type[Driver]], None]) -> None:
    from .driver import RedisDriver

    register(RedisDriver)
