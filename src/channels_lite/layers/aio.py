"""``channels_lite.layers.aio.AIOSQLiteChannelLayer``: the 0.4 aiosqlite backend's name.

It now runs on the 0.5 core and the ``sqlite`` driver (``pool_size`` is accepted and ignored);
its CONFIG is translated, see :mod:`channels_lite.compat`.
"""

from __future__ import annotations

from typing import ClassVar

from . import BaseSQLiteChannelLayer

__all__ = ["AIOSQLiteChannelLayer"]


class AIOSQLiteChannelLayer(BaseSQLiteChannelLayer):
    backend_path: ClassVar[str] = "channels_lite.layers.aio.AIOSQLiteChannelLayer"
