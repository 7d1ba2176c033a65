"""Django app config: ``"channels_lite"`` in ``INSTALLED_APPS`` adds the management commands.

The app has no models and no migrations (the layer's drivers create their own tables). A project
upgraded from channels-lite 0.4 keeps the old ``channels_lite_event`` and
``channels_lite_groupmembership`` tables, unused; see docs/migrating.md to drop them.
"""

from __future__ import annotations

from django.apps import AppConfig


class ChannelsLiteConfig(AppConfig):  # type: ignore[misc]
    name = "channels_lite"
    label = "channels_lite"
    verbose_name = "channels-lite"
