"""A clock that only moves when told, for the layer's ``clock`` option and driver ``now`` values."""

from __future__ import annotations

import threading
import time

__all__ = ["ManualClock"]


class ManualClock:
    """A zero-argument callable returning epoch seconds that advance only on request.

    Pass it as ``ChannelLayer(clock=ManualClock())`` to test expiry without sleeping: the core
    reads every ``now`` and ``expires_at`` from it. It starts at the real time (so anything that
    still looks at the wall clock sees a plausible value) unless ``start`` is given. Thread safe:
    layers call it from every event loop that uses them.
    """

    def __init__(self, start: float | None = None) -> None:
        self._lock = threading.Lock()
        self._now = time.time() if start is None else float(start)

    def __call__(self) -> float:
        with self._lock:
            return self._now

    @property
    def now(self) -> float:
        return self()

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds`` (never backwards) and return the new time."""
        if seconds < 0:
            raise ValueError(f"a ManualClock never goes back (asked to advance by {seconds})")
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, when: float) -> None:
        """Jump to ``when``, which may not be earlier than the current time."""
        with self._lock:
            if when < self._now:
                raise ValueError(f"a ManualClock never goes back ({when} < {self._now})")
            self._now = float(when)

    def __repr__(self) -> str:
        return f"ManualClock({self():.6f})"
