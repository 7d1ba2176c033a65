"""Registers the drivers shipped with channels-lite, through the same hook as any plugin."""

from __future__ import annotations

from collections.abc import Callable

from .base import Driver
from .hookspecs import hookimpl


@hookimpl
def channels_lite_register_drivers(register: Callable[[type[Driver]], None]) -> None:
    from .memory import MemoryDriver
    from .postgres import PostgresDriver  # psycopg is imported only when it is constructed
    from .sqlite import SQLiteDriver

    register(MemoryDriver)
    register(SQLiteDriver)
    register(PostgresDriver)
