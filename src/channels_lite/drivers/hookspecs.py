"""The one pluggy hook through which every driver, built-in or third-party, is registered.

A plugin module (named by an entry point in the ``channels_lite`` group) implements::

    from channels_lite.drivers.hookspecs import hookimpl

    @hookimpl
    def channels_lite_register_drivers(register):
        register(MyDriver)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .base import Driver

PROJECT = "channels_lite"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def channels_lite_register_drivers(register: Callable[[type[Driver]], None]) -> None:
    """Call ``register(DriverClass)`` for each driver this plugin provides."""
