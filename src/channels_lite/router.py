"""channels-lite 0.4's database router, kept so that ``DATABASE_ROUTERS`` settings still load.

0.4 stored messages through Django models and routed them to ``CONFIG['database']``. channels-lite
has no models any more (its drivers own their storage), so this router expresses no opinion: every
method returns ``None`` and Django's other routers or defaults decide. Remove it from
``DATABASE_ROUTERS`` at your convenience.
"""

from __future__ import annotations

from typing import Any


class ChannelsRouter:
    """A no-op router (see the module docstring)."""

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return None

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return None

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        return None

    def allow_migrate(
        self, db: str, app_label: str, model_name: str | None = None, **hints: Any
    ) -> bool | None:
        return None
