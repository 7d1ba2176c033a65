"""The channels-lite 0.4 backend names, kept so that 0.4 settings work unchanged.

``channels_lite.layers.core.SQLiteChannelLayer`` and
``channels_lite.layers.aio.AIOSQLiteChannelLayer`` are both :class:`channels_lite.ChannelLayer`
with their 0.4 CONFIG translated by :func:`channels_lite.compat.translate_04` (one deprecation
warning per obsolete key). New projects use ``channels_lite.ChannelLayer`` directly.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..compat import translate_04
from ..core.layer import ChannelLayer

__all__ = ["BaseSQLiteChannelLayer"]


class BaseSQLiteChannelLayer(ChannelLayer):
    """A :class:`~channels_lite.ChannelLayer` configured with channels-lite 0.4 CONFIG keys."""

    #: The dotted name users wrote in BACKEND, for the deprecation message.
    backend_path: ClassVar[str] = "channels_lite.layers.BaseSQLiteChannelLayer"

    def __init__(self, **config: Any) -> None:
        self.database: str | None = config.get("database")
        super().__init__(**translate_04(config, backend=self.backend_path))

    async def clean_expired(self) -> int:
        """0.4's manual cleanup: purge expired messages and memberships now.

        Returns how many rows went away (0.4 returned None).
        """
        from ..maintenance import purge_layer

        return await purge_layer(self)
