"""Targeted wake-ups with LISTEN/NOTIFY, on one dedicated connection per listening instance.

Which NOTIFY channel a push signals:

- a process-specific message (``key != channel``: the key is one process's ``"client!"``) signals
  that key's own channel, which only the process claiming that key listens on: a group_send to
  a thousand browser connections wakes the few processes holding them, not every process;
- a normal-channel message (``key == channel``) signals one shared channel per namespace,
  which every listening instance hears: any process may be reading a normal channel, and the
  driver is not told which ones are (see the report of issue 6 for a ``watch_keys`` extension
  that would target those as well).

The driver learns which keys to LISTEN on from the keys its claims ask for. A key first seen in
a claim is LISTENed on right away and the listeners are called once the LISTEN is in place, so
that a message committed between that claim and the LISTEN is not left waiting for the
safety-net poll. Keys not claimed for :data:`KEY_IDLE` seconds are dropped again.

NOTIFY channel names are identifiers of at most 63 bytes: every name is a hash of the table
namespace and the key (``cl_`` + 24 hex digits), so any key fits and two channel layers in one
database never wake each other.

The listening connection is not from the pool (a pooled connection would carry LISTENs to
other users). It reconnects with backoff after a drop or a server restart and then calls the
listeners once: whatever was committed while it was away is claimed at once, and the core's
safety-net poll covers the outage itself. No committed message is lost either way: a
notification is only a hint.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

from channels_lite.drivers.postgres import inbound as inbound_module
from channels_lite.drivers.postgres.inbound import Inbound
from channels_lite.drivers.postgres.options import Target

__all__ = ["FLUSH_NOTE", "KEY_IDLE", "Listener", "key_channel", "shared_channel"]

logger = logging.getLogger("channels_lite.drivers.postgres")

#: Seconds after the last claim of a key before its LISTEN is dropped.
KEY_IDLE = 120.0
#: Seconds of silence after which the listening connection is pinged (finds dead peers).
PING_INTERVAL = 15.0
_FIRST_BACKOFF = 0.05
#: Sent on the shared channel by a flush: every listening instance drops what it holds from
#: notifications (no token is ever this: tokens are hex digits).
FLUSH_NOTE = "flush!"
_MAX_BACKOFF = 2.0


def _name(namespace: str, kind: bytes, key: bytes) -> str:
    digest = hashlib.blake2b(
        namespace.encode() + b"\0" + kind + b"\0" + key, digest_size=12
    ).hexdigest()
    return f"cl_{digest}"


@functools.lru_cache(maxsize=4096)
def key_channel(namespace: str, key: str) -> str:
    """The NOTIFY channel for process-specific messages routed under ``key``."""
    return _name(namespace, b"key", key.encode("utf-8", "surrogatepass"))


@functools.lru_cache(maxsize=64)
def shared_channel(namespace: str) -> str:
    """The NOTIFY channel for every normal-channel message of ``namespace``."""
    return _name(namespace, b"shared", b"")


def wake_channel(namespace: str, channel: str, key: str) -> str:
    """Where a push of a message for ``channel`` under ``key`` signals."""
    return shared_channel(namespace) if key == channel else key_channel(namespace, key)


class _ConnectionLost(Exception):
    """The listening connection's socket reported EOF or an error."""


class Listener:
    """LISTENs for one driver instance and calls ``on_change`` on its loop."""

    def __init__(
        self,
        target: Target,
        namespace: str,
        on_change: Callable[[], None],
        *,
        timeout: float,
        own_token: str = "",
        inbound: Inbound | None = None,
    ) -> None:
        self._target = target
        # NOTIFYs carrying it come from our own driver instance: not a change for us.
        self._own = own_token
        self._own_prefix = own_token + " "
        #: Gets the messages that notifications carry (and hears when their chain breaks).
        self._inbound = inbound
        self._shared = shared_channel(namespace)
        self._namespace = namespace
        self._on_change = on_change
        self._timeout = timeout
        #: key -> time.monotonic() of its last claim.
        self._wanted: dict[str, float] = {}
        self._listening: set[str] = set()
        #: NOTIFY channel name -> the key it belongs to, for every key channel wanted.
        self._key_of: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._reader_fd: int | None = None
        self._lost = False
        #: For tests and stats: connections made, notifications seen, pings answered.
        self.connects = 0
        self.notifications = 0
        self.pings = 0

    # -- control, from the driver (on its loop) --------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is not None:
            return
        self._loop = loop
        self._changed = asyncio.Event()
        self._task = loop.create_task(
            self._run(), name=f"channels-lite LISTEN on {self._target.where()}"
        )

    def watch(self, keys: Iterable[str]) -> None:
        """Record that these keys are being claimed; LISTEN on new ones at once."""
        now = time.monotonic()
        wanted = self._wanted
        fresh = False
        for key in keys:
            if key not in wanted:
                fresh = True
            wanted[key] = now
        if fresh and self._changed is not None:
            self._changed.set()

    @property
    def channels(self) -> frozenset[str]:
        """The NOTIFY channels currently listened on."""
        return frozenset(self._listening)

    def desired(self) -> set[str]:
        names = {self._shared}
        for key in self._wanted:
            name = key_channel(self._namespace, key)
            self._key_of[name] = key
            names.add(name)
        return names

    def listening(self, key: str) -> int | None:
        """The connection's serial number if ``key``'s LISTEN is in place, else None."""
        if self._conn is None or self._lost:
            return None
        if key_channel(self._namespace, key) not in self._listening:
            return None
        return self.connects

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait() rather than awaiting the task: our own caller's cancellation must still
            # propagate, while the task's expected CancelledError must not.
            await asyncio.wait({task})
        self._close_now()

    def close_now(self) -> None:
        """Release the connection without the loop (the loop it lived on is closed)."""
        self._task = None
        self._close_now()

    def _close_now(self) -> None:
        conn, self._conn = self._conn, None
        self._detach_reader()
        if conn is not None and not conn.closed:
            # pgconn.finish() is libpq's synchronous close; nothing to await.
            conn.pgconn.finish()

    # -- the task ----------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = _FIRST_BACKOFF
        failing_since: float | None = None
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._target.conninfo, autocommit=True)
            except psycopg.Error as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    logger.warning(
                        "channels-lite: cannot LISTEN on PostgreSQL at %s (%s); retrying, "
                        "and polling meanwhile",
                        self._target.where(),
                        " ".join(str(exc).split()),
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
                continue
            self.connects += 1
            if failing_since is not None:
                logger.info(
                    "channels-lite: LISTEN connection to %s is back after %.1f s",
                    self._target.where(),
                    time.monotonic() - failing_since,
                )
                failing_since = None
            delay = _FIRST_BACKOFF
            self._conn = conn
            try:
                await self._serve(conn)
            except (psycopg.Error, OSError, _ConnectionLost, TimeoutError) as exc:
                failing_since = time.monotonic()
                logger.warning(
                    "channels-lite: lost the LISTEN connection to %s (%s); reconnecting",
                    self._target.where(),
                    " ".join(str(exc).split()) or type(exc).__name__,
                )
            finally:
                self._detach_reader()
                self._conn = None
                self._listening.clear()
                if self._inbound is not None:
                    # Notifications sent while we are away are lost: no chain survives.
                    self._inbound.reset()
                with contextlib.suppress(psycopg.Error, OSError):
                    await conn.close()
            await asyncio.sleep(delay)

    async def _serve(self, conn: psycopg.AsyncConnection[Any]) -> None:
        assert self._changed is not None
        self._lost = False
        conn.add_notify_handler(self._notified_in_command)
        await self._apply(conn)
        # Anything committed while we were not listening (first start, or a reconnect after a
        # drop or a server restart) gets claimed now instead of at the next safety-net poll.
        self._fire()
        last_ping = time.monotonic()
        inbound = self._inbound
        while True:
            self._changed.clear()
            self._attach_reader(conn)
            try:
                # With keys wanted, trust may be established at any moment: look often enough
                # to renew it before it lapses.
                await _wait_event(self._changed, _trust_ping() if self._wanted else PING_INTERVAL)
            finally:
                self._detach_reader()
            if self._lost:
                raise _ConnectionLost("the server closed the connection")
            sent = time.monotonic()
            trusting = inbound is not None and inbound.trusting
            if sent - last_ping >= (_trust_ping() if trusting else PING_INTERVAL):
                # A quiet connection may be dead without anyone telling us (no FIN from a
                # vanished host): a round trip, bounded, proves it alive, and renews the trust
                # of the keys served from notifications (see .inbound).
                await asyncio.wait_for(conn.execute("SELECT 1"), self._timeout)
                last_ping = time.monotonic()
                self.pings += 1
                if trusting and inbound is not None:
                    inbound.alive(sent)
                self._forget_idle_keys()
            # New LISTENs: a message committed between the claim that revealed the key and
            # now was not announced. Dropped ones: the core may believe those keys empty and
            # not look again before its safety-net poll.
            if await self._apply(conn):
                self._fire()

    async def _apply(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """LISTEN/UNLISTEN to match the wanted keys; return whether anything changed."""
        desired = self.desired()
        add = sorted(desired - self._listening)
        drop = sorted(self._listening - desired)
        if not add and not drop:
            return False
        # Names are cl_ + hex digits: valid unquoted identifiers, nothing to escape.
        commands = [f"LISTEN {name}" for name in add] + [f"UNLISTEN {name}" for name in drop]
        await conn.execute("; ".join(commands))
        self._listening.update(add)
        self._listening.difference_update(drop)
        dropped = {self._key_of.pop(name) for name in drop if name in self._key_of}
        if dropped and self._inbound is not None:
            self._inbound.forget(dropped)
        return True

    def _forget_idle_keys(self) -> None:
        horizon = time.monotonic() - KEY_IDLE
        for key in [key for key, seen in self._wanted.items() if seen < horizon]:
            del self._wanted[key]

    # -- notifications -------------------------------------------------------------------------

    def _attach_reader(self, conn: psycopg.AsyncConnection[Any]) -> None:
        assert self._loop is not None
        fd = conn.pgconn.socket
        self._loop.add_reader(fd, self._readable, conn)
        self._reader_fd = fd

    def _detach_reader(self) -> None:
        fd, self._reader_fd = self._reader_fd, None
        loop = self._loop
        if fd is not None and loop is not None and not loop.is_closed():
            loop.remove_reader(fd)

    def _readable(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # Runs only while no command is in flight on this connection (the reader is detached
        # around every execute), so reading here never steals a command's result.
        pgconn = conn.pgconn
        try:
            pgconn.consume_input()
        except psycopg.OperationalError:
            self._lost = True
            self._detach_reader()
            if self._changed is not None:
                self._changed.set()
            return
        count = 0
        while (notify := pgconn.notifies()) is not None:
            # Our payloads are ASCII; "replace" keeps a stray byte from ending this batch.
            channel = notify.relname.decode("utf-8", "replace")
            if self._take(channel, notify.extra.decode("utf-8", "replace")):
                count += 1
        if count:
            self.notifications += count
            self._fire()

    def _notified_in_command(self, notify: psycopg.Notify) -> None:
        # psycopg hands over notifications that arrive while LISTEN/SELECT 1 run.
        if self._take(notify.channel, notify.payload):
            self.notifications += 1
            # Now, not once the command is done: a ping renewing trust runs while messages
            # arrive, and the message this notification carries is ready to hand on.
            self._fire()

    def _take(self, channel: str, text: str) -> bool:
        """Route one notification; False for this instance's own (not a change for us)."""
        if self._own and (text == self._own or text.startswith(self._own_prefix)):
            return False
        inbound = self._inbound
        if inbound is not None:
            if channel == self._shared:
                if text == FLUSH_NOTE:
                    inbound.reset()
            else:
                key = self._key_of.get(channel)
                if key is not None:
                    inbound.note(key, text)
        return True

    def _fire(self) -> None:
        try:
            self._on_change()
        except Exception:
            logger.exception("channels-lite: a change listener failed")


def _trust_ping() -> float:
    """Seconds between pings while keys are trusted: two chances to renew before a lapse."""
    return min(PING_INTERVAL, inbound_module.TRUST_TTL / 2)


async def _wait_event(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True
