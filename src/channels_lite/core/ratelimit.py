"""Rate-limited logging, for log calls inside loops that could otherwise flood.

A claim loop that fails every round, a receiver that cannot decrypt every message of a
misconfigured peer, a ``group_send`` to a group whose members are all full: each would write
one line per iteration, thousands a second. :class:`RateLimitedLog` writes the first occurrence
at once, then at most one line per ``interval`` seconds per *key*, carrying the number of
occurrences it held back::

    _decode_log = RateLimitedLog(logger, interval=60.0)
    ...
    _decode_log.warning(
        ("decode", channel), "dropped a message on %r that could not be decoded", channel
    )
    # -> "dropped a message on 'chat' that could not be decoded"
    # ...one minute later, if it kept happening:
    # -> "dropped a message on 'chat' that could not be decoded (and 4211 more in the last 60s)"

Held-back occurrences are reported with the next line for their key; when the problem stops,
the count of the last interval is not written on its own (call :meth:`flush` at shutdown to
write what is pending). Thread-safe: the layer logs from several event loops' threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

__all__ = ["RateLimitedLog"]


@dataclass(slots=True)
class _Window:
    last: float
    suppressed: int = 0
    level: int = logging.INFO
    msg: str = ""
    args: tuple[object, ...] = ()


class RateLimitedLog:
    """Log through ``logger`` at most once per ``interval`` seconds per key.

    ``max_keys`` bounds memory when keys carry names (channels, groups): the least recently
    logged key is forgotten first, which at worst lets one extra line through.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 60.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0, not {interval!r}")
        self.logger = logger
        self.interval = interval
        self.max_keys = max(1, max_keys)
        self._clock = clock
        self._windows: OrderedDict[Hashable, _Window] = OrderedDict()
        self._lock = threading.Lock()

    def log(
        self,
        level: int,
        key: Hashable,
        msg: str,
        *args: object,
        exc_info: bool | BaseException | None = None,
    ) -> bool:
        """Log ``msg % args`` now unless ``key`` was logged less than ``interval`` ago.

        Returns whether a line was written. ``exc_info`` as in :meth:`logging.Logger.log`.
        """
        return self._log(level, key, msg, args, exc_info)

    def _log(
        self,
        level: int,
        key: Hashable,
        msg: str,
        args: tuple[object, ...],
        exc_info: bool | BaseException | None = None,
    ) -> bool:
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            if window is not None and now - window.last < self.interval:
                window.suppressed += 1
                window.level, window.msg, window.args = level, msg, args
                return False
            suppressed = window.suppressed if window is not None else 0
            elapsed = now - window.last if window is not None else 0.0
            self._windows[key] = _Window(last=now)
            self._windows.move_to_end(key)
            while len(self._windows) > self.max_keys:
                self._windows.popitem(last=False)
        if suppressed:
            msg += " (and %d more in the last %.0fs)"
            args = (*args, suppressed, elapsed)
        # stacklevel=3: the record names the caller's line, not this helper's.
        self.logger.log(level, msg, *args, exc_info=exc_info, stacklevel=3)
        return True

    def debug(self, key: Hashable, msg: str, *args: object) -> bool:
        return self._log(logging.DEBUG, key, msg, args)

    def info(self, key: Hashable, msg: str, *args: object) -> bool:
        return self._log(logging.INFO, key, msg, args)

    def warning(self, key: Hashable, msg: str, *args: object) -> bool:
        return self._log(logging.WARNING, key, msg, args)

    def error(self, key: Hashable, msg: str, *args: object) -> bool:
        return self._log(logging.ERROR, key, msg, args)

    def exception(self, key: Hashable, msg: str, *args: object) -> bool:
        """ERROR with the current exception's traceback (only on the lines actually written)."""
        return self._log(logging.ERROR, key, msg, args, exc_info=True)

    def flush(self) -> int:
        """Write one summary line per key with held-back occurrences; return how many."""
        with self._lock:
            pending = [
                (w.level, w.msg, w.args, w.suppressed, w.last)
                for w in self._windows.values()
                if w.suppressed
            ]
            for window in self._windows.values():
                window.suppressed = 0
        now = self._clock()
        for level, msg, args, count, since in pending:
            summary = msg + " (%d times in the last %.0fs)"
            self.logger.log(level, summary, *args, count, now - since)
        return len(pending)
