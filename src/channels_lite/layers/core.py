"""``channels_lite.layers.core.SQLiteChannelLayer``: the 0.4 Django-ORM backend's name.

It now runs on the 0.5 core and the ``sqlite`` driver (no Django ORM, no migrations); its CONFIG
is translated, see :mod:`channels_lite.compat`.
"""

from __future__ import annotations

from typing import ClassVar

from . import BaseSQLiteChannelLayer

__all__ = ["SQLiteChannelLayer"]


class SQLiteChannelLayer(BaseSQLiteChannelLayer):
    backend_path: ClassVar[str] = "channels_lite.layers.core.SQLiteChannelLayer"
