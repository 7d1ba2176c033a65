"""channels-lite: a Django Channels channel layer that needs no Redis.

``CHANNEL_LAYERS = {"default": {"BACKEND": "channels_lite.ChannelLayer"}}`` is a complete
configuration: it uses the SQLite driver on an embedded file next to the project.
"""

from .core.codec import register_serializer
from .core.errors import ConfigurationError
from .core.layer import ChannelLayer
from .drivers.base import DriverError

__all__ = ["ChannelLayer", "ConfigurationError", "DriverError", "register_serializer"]
__version__ = "0.5.0"
