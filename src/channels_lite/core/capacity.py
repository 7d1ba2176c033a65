"""Per-channel capacity: resolved here, enforced atomically by the driver."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

# Bounded so a server that makes millions of channel names does not grow this cache forever.
_CACHE_LIMIT = 4096


class CapacityPolicy:
    """``capacity`` plus ``channel_capacity`` rules; the first matching rule wins.

    Rules are globs (matched with :mod:`fnmatch`, against the full channel name, so ``*``
    also spans ``!``) or compiled regular expressions (``pattern.match``). Compiled once here:
    Channels' base class leaves them raw, which crashes its in-memory layer.
    """

    def __init__(self, default: int, rules: Iterable[tuple[re.Pattern[str], int]]) -> None:
        self.default = default
        self.rules = tuple(rules)
        self._cache: dict[str, int] = {}

    @staticmethod
    def compile(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
        if isinstance(pattern, re.Pattern):
            return pattern
        return re.compile(fnmatch.translate(pattern))

    def for_channel(self, channel: str) -> int:
        found = self._cache.get(channel)
        if found is not None:
            return found
        result = self.default
        for pattern, limit in self.rules:
            if pattern.match(channel):
                result = limit
                break
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[channel] = result
        return result
