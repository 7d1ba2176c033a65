"""The SQLite reference driver (aiosqlite, WAL mode, one file per host)."""

from channels_lite.drivers.sqlite.driver import SQLiteDriver
from channels_lite.drivers.sqlite.files import default_path

__all__ = ["SQLiteDriver", "default_path"]
