"""The in-process driver: the executable specification of the contract, and a fast store for
tests and single-process servers.

Instances made with :meth:`MemoryDriver.sibling` (one per event loop) share one store; so do
instances created with the same ``store`` name in one process. Each operation runs under one
lock and never awaits, so it is atomic, including against cancellation.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from .base import (
    Claimed,
    ClaimRequest,
    Driver,
    DriverConfigError,
    DriverFeatures,
    Envelope,
    StorageStats,
)


@dataclass(slots=True)
class _Row:
    seq: int
    channel: str
    key: str
    payload: bytes
    expires_at: float


@dataclass
class _Store:
    lock: threading.Lock = field(default_factory=threading.Lock)
    seq: itertools.count[int] = field(default_factory=itertools.count)
    by_key: dict[str, deque[_Row]] = field(default_factory=dict)
    # channel -> number of rows held (expired rows included until removed)
    depth: dict[str, int] = field(default_factory=dict)
    # group -> channel -> (key, expires_at)
    groups: dict[str, dict[str, tuple[str, float]]] = field(default_factory=dict)
    leases: dict[str, float] = field(default_factory=dict)
    # (owner driver id, loop, callback)
    listeners: list[tuple[int, asyncio.AbstractEventLoop, Callable[[], None]]] = field(
        default_factory=list
    )


_named_stores: weakref.WeakValueDictionary[str, _Store] = weakref.WeakValueDictionary()
_named_lock = threading.Lock()


class MemoryDriver(Driver):
    name: ClassVar[str] = "memory"
    features: ClassVar[DriverFeatures] = DriverFeatures(cross_process=False, persistent=False)
    option_docs: ClassVar[dict[str, str]] = {
        "store": "name of a process-wide store to share between layers (default: private)",
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        store_name = options.get("store")
        if store_name is not None and not isinstance(store_name, str):
            raise DriverConfigError(
                "store", f"option 'store' must be a str, not {type(store_name).__name__}"
            )
        if store_name is None:
            self._store = _Store()
        else:
            with _named_lock:
                store = _named_stores.get(store_name)
                if store is None:
                    store = _Store()
                    _named_stores[store_name] = store
                self._store = store

    def sibling(self) -> Self:
        twin = super().sibling()
        twin._store = self._store
        return twin

    def describe(self) -> str:
        return f"memory store {self.options.get('store') or hex(id(self._store))}"

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        with self._store.lock:
            self._store.listeners = [e for e in self._store.listeners if e[0] != id(self)]

    # -- messages -------------------------------------------------------------------------

    def _live_depth(self, channel: str, key: str, capacity: int, now: float) -> int:
        depth = self._store.depth.get(channel, 0)
        if depth >= capacity:
            # Expired rows must not count towards capacity: drop them, then count again.
            self._drop_expired(key, now)
            depth = self._store.depth.get(channel, 0)
        return depth

    def _drop_expired(self, key: str, now: float) -> int:
        store = self._store
        rows = store.by_key.get(key)
        if not rows:
            return 0
        kept = deque(row for row in rows if row.expires_at > now)
        dropped = len(rows) - len(kept)
        if dropped:
            for row in rows:
                if row.expires_at <= now:
                    self._decrement(row.channel)
            if kept:
                store.by_key[key] = kept
            else:
                del store.by_key[key]
        return dropped

    def _decrement(self, channel: str) -> None:
        depth = self._store.depth[channel] - 1
        if depth:
            self._store.depth[channel] = depth
        else:
            del self._store.depth[channel]

    async def push(self, envelopes: Sequence[Envelope], now: float) -> list[bool]:
        store = self._store
        flags = []
        with store.lock:
            for env in envelopes:
                if self._live_depth(env.channel, env.key, env.capacity, now) >= env.capacity:
                    flags.append(False)
                    continue
                row = _Row(next(store.seq), env.channel, env.key, env.payload, env.expires_at)
                store.by_key.setdefault(env.key, deque()).append(row)
                store.depth[env.channel] = store.depth.get(env.channel, 0) + 1
                flags.append(True)
            if any(flags):
                self._notify_others()
        return flags

    def _notify_others(self) -> None:
        for owner, loop, callback in self._store.listeners:
            if owner == id(self):
                continue
            try:
                loop.call_soon_threadsafe(callback)
            except RuntimeError:
                # The listener's loop is closed; its driver will be closed and unregister.
                continue

    async def claim(self, requests: Sequence[ClaimRequest], now: float) -> list[Claimed]:
        store = self._store
        out: list[Claimed] = []
        with store.lock:
            for request in requests:
                rows = store.by_key.get(request.key)
                if not rows or request.limit <= 0:
                    continue
                taken = 0
                # Walk only as far as the claim needs: rows past it stay where they are (a
                # walk to the end made draining a deep queue quadratic).
                skipped: list[_Row] = []
                while rows and taken < request.limit:
                    row = rows.popleft()
                    if row.expires_at <= now:
                        self._decrement(row.channel)
                        continue
                    if row.channel in request.exclude:
                        skipped.append(row)
                        continue
                    out.append(Claimed(row.channel, row.key, row.payload, row.expires_at))
                    self._decrement(row.channel)
                    taken += 1
                rows.extendleft(reversed(skipped))
                if not rows:
                    store.by_key.pop(request.key, None)
        return out

    # -- groups ---------------------------------------------------------------------------

    async def group_add(self, group: str, channel: str, key: str, expires_at: float) -> None:
        with self._store.lock:
            self._store.groups.setdefault(group, {})[channel] = (key, expires_at)

    async def group_discard(self, group: str, channel: str) -> None:
        with self._store.lock:
            members = self._store.groups.get(group)
            if members is not None:
                members.pop(channel, None)
                if not members:
                    del self._store.groups[group]

    async def group_channels(self, group: str, now: float) -> list[str]:
        with self._store.lock:
            members = self._store.groups.get(group, {})
            return [ch for ch, (_, expires_at) in members.items() if expires_at > now]

    # -- housekeeping ---------------------------------------------------------------------

    async def purge(self, now: float) -> int:
        store = self._store
        removed = 0
        with store.lock:
            for key in list(store.by_key):
                removed += self._drop_expired(key, now)
            for group in list(store.groups):
                members = store.groups[group]
                for channel in [c for c, (_, exp) in members.items() if exp <= now]:
                    del members[channel]
                    removed += 1
                if not members:
                    del store.groups[group]
        return removed

    async def flush(self) -> None:
        store = self._store
        with store.lock:
            store.by_key.clear()
            store.depth.clear()
            store.groups.clear()
            store.leases.clear()

    # -- optional capabilities ------------------------------------------------------------

    def add_change_listener(self, callback: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        with self._store.lock:
            self._store.listeners.append((id(self), loop, callback))

    def remove_change_listener(self, callback: Callable[[], None]) -> None:
        with self._store.lock:
            self._store.listeners = [
                e for e in self._store.listeners if not (e[0] == id(self) and e[2] == callback)
            ]

    async def heartbeat(self, process_key: str, expires_at: float, now: float) -> list[str]:
        store = self._store
        with store.lock:
            store.leases[process_key] = expires_at
            dead = [k for k, exp in store.leases.items() if exp <= now and k != process_key]
            for key in dead:
                self._forget(key)
        return dead

    async def release(self, process_key: str) -> None:
        with self._store.lock:
            self._forget(process_key)

    def _forget(self, key: str) -> None:
        store = self._store
        store.leases.pop(key, None)
        for row in store.by_key.pop(key, ()):
            self._decrement(row.channel)
        for group in list(store.groups):
            members = store.groups[group]
            for channel in [c for c, (k, _) in members.items() if k == key]:
                del members[channel]
            if not members:
                del store.groups[group]

    async def stats(self, now: float, top: int) -> StorageStats:
        store = self._store
        with store.lock:
            live: dict[str, int] = {}
            expired = 0
            for rows in store.by_key.values():
                for row in rows:
                    if row.expires_at > now:
                        live[row.channel] = live.get(row.channel, 0) + 1
                    else:
                        expired += 1
            channels = dict(sorted(live.items(), key=lambda kv: -kv[1])[:top])
            groups = {
                g: sum(1 for _, exp in m.values() if exp > now) for g, m in store.groups.items()
            }
            processes = sum(1 for exp in store.leases.values() if exp > now)
        return StorageStats(
            messages=sum(live.values()),
            expired_messages=expired,
            channels=channels,
            groups=groups,
            processes=processes,
        )
