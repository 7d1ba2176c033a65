"""Exceptions the layer raises on top of the ones Channels defines."""

from __future__ import annotations

from channels.exceptions import InvalidChannelLayerError


class ConfigurationError(InvalidChannelLayerError):  # type: ignore[misc]
    """A CONFIG value is unknown, of the wrong type, or impossible.

    ``key`` names the offending CONFIG key (``None`` when the problem is not one key).
    """

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(message)
        self.key = key
