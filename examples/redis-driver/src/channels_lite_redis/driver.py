"""RedisDriver: channels-lite storage in a Redis server, over redis-py's asyncio client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from channels_lite.drivers.base import (
    Claimed,
    ClaimRequest,
    Driver,
    DriverConfigError,
    DriverError,
    DriverFeatures,
    Envelope,
    StorageStats,
)

from . import scripts

__all__ = ["RedisDriver"]

logger = logging.getLogger("channels_lite_redis")

T = TypeVar("T")

DEFAULT_URL = "redis://localhost:6379/0"
DEFAULT_PREFIX = "channels_lite:"
#: Rows one purge script call may remove before handing the server back to other clients.
_PURGE_BUDGET = 5000
_SCAN_COUNT = 500
_RESUBSCRIBE_FIRST = 0.05
_RESUBSCRIBE_MAX = 5.0
#: A listener's failure to (re)subscribe is logged at most this often.
_WARN_EVERY = 60.0
#: Receipts acknowledged per script call (the rest wait for the next call or their TTL).
_ACKS_PER_CALL = 256
#: Tries to learn a receipt's outcome when the recovery itself is cancelled again.
_RECOVER_TRIES = 3


def _redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _check_url(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise DriverConfigError("url", f"'url' must be a redis:// URL string, not {value!r}")
    scheme = urlsplit(value).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise DriverConfigError(
            "url",
            f"'url' must start with redis://, rediss:// or unix://, not {_redact(value)!r}",
        )
    return value


def _check_prefix(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise DriverConfigError("prefix", f"'prefix' must be a non-empty str, not {value!r}")
    return value


def _glob_escape(text: str) -> str:
    """Escape ``text`` for a SCAN MATCH pattern."""
    return "".join(f"\\{ch}" if ch in "*?[]\\" else ch for ch in text)


def _float(value: float) -> str:
    # repr() of a float round-trips exactly; Redis and Lua parse it back to the same double.
    return repr(float(value))


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


class RedisDriver(Driver):
    """Messages and groups in Redis; every atomic step is one Lua script.

    Cross-process and shared by every host that reaches the server; persistence is whatever the
    server is configured for (RDB/AOF), so ``features.persistent`` is declared ``False``.
    """

    name: ClassVar[str] = "redis"
    features: ClassVar[DriverFeatures] = DriverFeatures(
        cross_process=True, persistent=False, max_batch=1000
    )
    option_docs: ClassVar[Mapping[str, str]] = {
        "url": f"Redis server URL (redis://, rediss:// or unix://); default {DEFAULT_URL}",
        "prefix": f"prefix of every key this driver writes; default {DEFAULT_PREFIX!r}",
    }

    def __init__(
        self, *, url: str = DEFAULT_URL, prefix: str = DEFAULT_PREFIX, **options: Any
    ) -> None:
        checked_url = _check_url(url)
        checked_prefix = _check_prefix(prefix)
        # The base class refuses unknown options with a DriverConfigError naming them.
        super().__init__(url=checked_url, prefix=checked_prefix, **options)
        self.url = checked_url
        self.prefix = checked_prefix
        # Told apart from other instances' pushes in notifications.
        self._token = uuid.uuid4().hex.encode()
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open_lock: asyncio.Lock | None = None
        self._listeners: list[Callable[[], None]] = []
        self._listener_task: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self._last_warning = 0.0
        # Receipts whose replies arrived: deleted by the next push or claim (scripts.py).
        self._acks: list[str] = []

    def describe(self) -> str:
        return f"redis at {_redact(self.url)} (prefix {self.prefix!r})"

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._client is not None:
            return
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._client is not None:
                return
            # No automatic retries: re-sending a push or a claim whose reply was lost could
            # store a message twice or lose one. Failures surface as DriverError instead.
            client = aioredis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0))
            try:
                await client.ping()
            except (RedisError, OSError) as exc:
                await client.aclose()
                raise DriverError(
                    f"cannot reach Redis at {_redact(self.url)}: {exc}; check that the server "
                    "runs and that CONFIG['url'] is right"
                ) from exc
            self._scripts = {
                "push": client.register_script(scripts.PUSH),
                "claim": client.register_script(scripts.CLAIM),
                "group_add": client.register_script(scripts.GROUP_ADD),
                "group_discard": client.register_script(scripts.GROUP_DISCARD),
                "purge": client.register_script(scripts.PURGE),
                "heartbeat": client.register_script(scripts.HEARTBEAT),
                "release": client.register_script(scripts.RELEASE),
                "recover": client.register_script(scripts.RECOVER),
            }
            self._client = client
            self._loop = asyncio.get_running_loop()
            logger.debug("opened %s", self.describe())
            if self._listeners:
                self._start_listener()

    async def close(self) -> None:
        client, self._client = self._client, None
        task, self._listener_task = self._listener_task, None
        loop, self._loop = self._loop, None
        self._open_lock = None
        if client is None:
            return
        running = asyncio.get_running_loop()
        if loop is not None and loop is not running:
            if loop.is_closed() or not loop.is_running():
                # Its connections belong to a dead loop: nothing of them can be awaited here.
                # Dropping the references lets the transports be collected.
                logger.debug("dropped %s whose event loop is gone", self.describe())
                return
            future = asyncio.run_coroutine_threadsafe(self._shutdown(client, task), loop)
            await asyncio.wrap_future(future)
            return
        await self._shutdown(client, task)

    async def _shutdown(self, client: aioredis.Redis, task: asyncio.Task[None] | None) -> None:
        if task is not None:
            task.cancel()
            self._stopping.add(task)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
            self._stopping.clear()
        try:
            await client.aclose()
        except (RedisError, OSError) as exc:
            logger.debug("closing %s: %s", self.describe(), exc)
        logger.debug("closed %s", self.describe())

    def _ready(self) -> aioredis.Redis:
        if self._client is None:
            raise DriverError(f"the driver for {self.describe()} is not open; call open() first")
        return self._client

    async def _call(self, doing: str, operation: Awaitable[T]) -> T:
        try:
            return await operation
        except (RedisError, OSError) as exc:
            raise DriverError(f"Redis at {_redact(self.url)} failed while {doing}: {exc}") from exc

    async def _script(self, name: str, args: Sequence[Any], doing: str) -> Any:
        self._ready()
        return await self._call(doing, self._scripts[name](keys=[], args=[self.prefix, *args]))

    # -- the contract ------------------------------------------------------------------------

    async def push(self, envelopes: Sequence[Envelope], now: float) -> list[bool]:
        if not envelopes:
            return []
        args: list[Any] = [_float(now), self._token, len(envelopes)]
        for env in envelopes:
            args += [env.channel, env.key, env.payload, _float(env.expires_at), env.capacity]
        flags = await self._with_receipt("push", args, "storing messages")
        return [bool(int(flag)) for flag in flags]

    async def claim(self, requests: Sequence[ClaimRequest], now: float) -> list[Claimed]:
        if not requests:
            return []
        args: list[Any] = [_float(now), len(requests)]
        for request in requests:
            excluded = sorted(request.exclude)
            args += [request.key, max(0, request.limit), len(excluded), *excluded]
        flat = await self._with_receipt("claim", args, "claiming messages")
        return [
            Claimed(_text(flat[i]), _text(flat[i + 1]), bytes(flat[i + 2]), float(flat[i + 3]))
            for i in range(0, len(flat), 4)
        ]

    async def _with_receipt(self, name: str, args: Sequence[Any], doing: str) -> list[Any]:
        """Run a push or claim script so that its outcome is never lost (scripts.py, Receipts).

        If the reply does not arrive (this task cancelled, as ``asyncio.run`` does to every task
        of a loop it tears down, or the connection lost), ask the receipt: either the script
        ran and we return its reply (absorbing the cancellation, which the core re-raises), or
        it never will and the cancellation or error goes on, with nothing done.
        """
        self._ready()
        receipt = f"{self.prefix}r:{uuid.uuid4().hex}"
        acks = self._acks[:_ACKS_PER_CALL]
        del self._acks[:_ACKS_PER_CALL]
        call = self._scripts[name](keys=[receipt, *acks], args=[self.prefix, *args])
        try:
            reply: list[Any] = await self._call(doing, call)
        except asyncio.CancelledError:
            recovered = await self._recover(receipt, doing)
            if recovered is None:
                raise
            logger.debug("%s completed as it was cancelled; returning its reply", doing)
            return recovered
        except DriverError:
            recovered = await self._recover(receipt, doing)
            if recovered is None:
                raise
            return recovered
        if reply:
            self._acks.append(receipt)
        return reply

    async def _recover(self, receipt: str, doing: str) -> list[Any] | None:
        """The reply kept under ``receipt``, or None if its script did not and will not run."""
        for _ in range(_RECOVER_TRIES):
            try:
                kept = await self._call(
                    f"recovering the outcome of {doing}",
                    self._scripts["recover"](keys=[receipt], args=[self.prefix]),
                )
            except asyncio.CancelledError:
                continue
            except DriverError as exc:
                logger.warning(
                    "could not learn whether %s completed on %s (%s); if it did, its messages "
                    "are lost (claim) or stored (push)",
                    doing,
                    self.describe(),
                    exc,
                )
                return None
            if kept and kept[0] == b"done":
                return list(kept[1:])
            return None
        logger.warning(
            "gave up learning whether %s completed on %s after %d cancellations",
            doing,
            self.describe(),
            _RECOVER_TRIES,
        )
        return None

    async def group_add(self, group: str, channel: str, key: str, expires_at: float) -> None:
        await self._script(
            "group_add", [group, channel, key, _float(expires_at)], "adding a group member"
        )

    async def group_discard(self, group: str, channel: str) -> None:
        await self._script("group_discard", [group, channel], "removing a group member")

    async def group_channels(self, group: str, now: float) -> list[str]:
        client = self._ready()
        members = await self._call(
            "reading group members",
            client.zrangebyscore(f"{self.prefix}g:{group}", f"({_float(now)}", "+inf"),
        )
        return [_text(member) for member in members]

    async def purge(self, now: float) -> int:
        total = 0
        while True:
            removed = int(
                await self._script("purge", [_float(now), _PURGE_BUDGET], "purging expired data")
            )
            total += removed
            if removed < _PURGE_BUDGET:
                return total

    async def flush(self) -> None:
        client = self._ready()
        keep = f"{self.prefix}seq".encode()  # ids must keep growing: they order messages
        pattern = _glob_escape(self.prefix) + "*"

        async def run() -> None:
            batch: list[bytes] = []
            async for name in client.scan_iter(match=pattern, count=_SCAN_COUNT):
                if name != keep:
                    batch.append(name)
                if len(batch) >= _SCAN_COUNT:
                    await client.unlink(*batch)
                    batch = []
            if batch:
                await client.unlink(*batch)

        await self._call("flushing", run())

    # -- SupportsLiveness --------------------------------------------------------------------

    async def heartbeat(self, process_key: str, expires_at: float, now: float) -> list[str]:
        reaped = await self._script(
            "heartbeat",
            [process_key, _float(expires_at), _float(now)],
            "renewing the process lease",
        )
        return [_text(key) for key in reaped]

    async def release(self, process_key: str) -> None:
        await self._script("release", [process_key], "releasing the process lease")

    # -- SupportsStats -----------------------------------------------------------------------

    async def stats(self, now: float, top: int) -> StorageStats:
        client = self._ready()
        return await self._call("reading stats", self._stats(client, now, top))

    async def _stats(self, client: aioredis.Redis, now: float, top: int) -> StorageStats:
        p = self.prefix
        live = f"({_float(now)}"
        pipe = client.pipeline(transaction=False)
        pipe.zcount(f"{p}e", live, "+inf")
        pipe.zcount(f"{p}e", "-inf", _float(now))
        pipe.zcount(f"{p}l", live, "+inf")
        pipe.zcount(f"{p}ge", live, "+inf")
        pipe.zcount(f"{p}ge", "-inf", _float(now))
        messages, expired, processes, memberships, expired_memberships = await pipe.execute()

        async def counts(tag: str) -> dict[str, int]:
            names = [
                name
                async for name in client.scan_iter(
                    match=_glob_escape(f"{p}{tag}:") + "*", count=_SCAN_COUNT
                )
            ]
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.zcount(name, live, "+inf")
            skip = len(f"{p}{tag}:".encode())
            found = {
                _text(name[skip:]): int(n)
                for name, n in zip(names, await pipe.execute(), strict=True)
                if n
            }
            ranked = sorted(found.items(), key=lambda item: (-item[1], item[0]))
            return dict(ranked[: max(0, top)])

        info = await client.info("server")
        memory = await client.info("memory")
        return StorageStats(
            messages=int(messages),
            expired_messages=int(expired),
            channels=await counts("c"),
            groups=await counts("g"),
            processes=int(processes),
            storage_bytes=None,
            extra={
                "url": _redact(self.url),
                "prefix": p,
                "redis_version": info.get("redis_version"),
                "server_used_memory_bytes": memory.get("used_memory"),
                "memberships": int(memberships),
                "expired_memberships": int(expired_memberships),
            },
        )

    # -- ChangeNotifier ----------------------------------------------------------------------

    def add_change_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)
        if self._client is not None and self._listener_task is None:
            self._start_listener()

    def remove_change_listener(self, callback: Callable[[], None]) -> None:
        try:
            self._listeners.remove(callback)
        except ValueError:
            return
        if not self._listeners and self._listener_task is not None:
            task, self._listener_task = self._listener_task, None
            task.cancel()
            # Listeners are removed from synchronous code; close() awaits what is left.
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    def _start_listener(self) -> None:
        if self._loop is None:
            return
        self._listener_task = self._loop.create_task(
            self._listen(), name=f"channels-lite-redis listener {self.prefix}"
        )

    def _changed(self) -> None:
        for callback in tuple(self._listeners):
            try:
                callback()
            except Exception:
                logger.exception("change listener %r failed", callback)

    async def _listen(self) -> None:
        """Subscribe to ``<prefix>n`` and call the listeners on other instances' pushes."""
        client = self._client
        if client is None:
            return
        channel = f"{self.prefix}n"
        delay = _RESUBSCRIBE_FIRST
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                # A push may have happened before the subscription took effect: say so once.
                self._changed()
                delay = _RESUBSCRIBE_FIRST
                async for message in pubsub.listen():
                    if message["type"] == "message" and message["data"] != self._token:
                        self._changed()
            except (RedisError, OSError) as exc:
                now = time.monotonic()
                if now - self._last_warning >= _WARN_EVERY:
                    self._last_warning = now
                    logger.warning(
                        "lost the change subscription to %s (%s); retrying, falling back to "
                        "polling meanwhile",
                        self.describe(),
                        exc,
                    )
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESUBSCRIBE_MAX)
