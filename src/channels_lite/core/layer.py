"""The ``CHANNEL_LAYERS`` backend: the Channels API, delegating every policy to its helpers."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from typing import Any, ClassVar

from channels.exceptions import ChannelFull, MessageTooLarge
from channels.layers import BaseChannelLayer

from ..drivers.base import (
    Claimed,
    Driver,
    DriverConfigError,
    DriverError,
    Envelope,
    Peeks,
    SupportsLiveness,
)
from ..drivers.registry import DriverLookupError, DuplicateDriverError, get_driver_class
from . import naming
from .cadence import Backoff
from .codec import Codec, DecodeError, make_serializer
from .config import LayerConfig, default_sqlite_path, parse_config
from .errors import ConfigurationError
from .held import Held
from .inbox import Inbox
from .loops import LoopDrivers
from .ratelimit import RateLimitedLog
from .receiver import ClaimLoop
from .upkeep import Upkeep, renew_lease

logger = logging.getLogger("channels_lite.core.layer")

#: Every live layer of this process, so flush() can reset the buffers of its peers.
_layers: weakref.WeakSet[ChannelLayer] = weakref.WeakSet()

_NOTIFIED_POLL_CEILING = 1.0  # safety net only: the driver tells us about changes
_POLLED_POLL_CEILING = 0.1  # no change notifications: this bounds idle latency
_POLL_FLOOR_NOTIFIED = 0.05
_POLL_FLOOR_POLLED = 0.002
#: How often a waiting receiver checks that a claim loop still serves it (its home loop may
#: have stopped, e.g. an ``async_to_sync`` loop that finished).
_CLAIMER_CHECK = 1.0
#: Capacity for a message going back to storage: it was accepted once already.
_UNBOUNDED = 2**62


def _reraise_if_cancelled(loop: asyncio.AbstractEventLoop | None = None) -> None:
    # Drivers may finish a call whose task was cancelled mid-flight, so that nothing is lost
    # (Driver.push, Driver.claim); the cancellation is honoured here, once the result is safe.
    task = asyncio.current_task(loop)
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class ChannelLayer(BaseChannelLayer):  # type: ignore[misc]
    """A Channels layer over any registered driver; SQLite on an embedded file by default.

    ``CONFIG`` keys are documented in :data:`channels_lite.core.config.CORE_KEYS`; keys the core
    does not own are the driver's options.
    """

    extensions: ClassVar[list[str]] = ["groups", "flush"]
    ChannelFull = ChannelFull
    MessageTooLarge = MessageTooLarge

    def __init__(self, **config: Any) -> None:
        settings, driver_options = parse_config(config)
        self.settings: LayerConfig = settings
        # BaseChannelLayer's attribute names, for code that reads them.
        self.expiry = settings.expiry
        self.capacity = settings.capacity.default
        self.channel_capacity = settings.capacity.rules
        self.group_expiry = settings.group_expiry

        try:
            driver_cls = get_driver_class(settings.driver)
        except (DriverLookupError, DuplicateDriverError) as exc:
            raise ConfigurationError("driver", str(exc)) from exc
        if driver_cls.name == "sqlite" and driver_options.get("path") is None:
            driver_options["path"] = default_sqlite_path()
        try:
            self._primary: Driver = driver_cls(**driver_options)
        except DriverConfigError as exc:
            raise ConfigurationError(exc.option, str(exc)) from exc

        self._codec = Codec(
            make_serializer(settings.serializer_format),
            settings.symmetric_encryption_keys,
            settings.max_message_size,
        )
        self._clock = settings.clock or time.time
        self.client_id = naming.new_client_id()
        self._process_key = f"{self.client_id}!"
        self._made_channels = False
        # This process's lease is in storage (taken by the first new_channel).
        self._leased = False
        self._inbox = Inbox(
            settings.capacity.for_channel,
            self._orphan,
            grace=settings.consumer_grace,
            idle_limit=settings.group_expiry,
        )
        # The loop whose timer closes channels once their grace is over (one at a time).
        self._closing_on: asyncio.AbstractEventLoop | None = None
        # Requeues of orphaned messages and claim-loop revivals, awaited on close.
        self._background: set[asyncio.Task[None]] = set()
        self._watched_loops: set[asyncio.AbstractEventLoop] = set()
        self._drivers = LoopDrivers(self._primary, self._on_loop_close)
        self._tasks_lock = threading.Lock()
        self._claimer: ClaimLoop | None = None
        # Messages of this process's channels handed on by a peek and not yet removed.
        self._held = Held()
        self._upkeep: Upkeep | None = None
        notified = hasattr(driver_cls, "add_change_listener")
        ceiling = settings.poll_interval or (
            _NOTIFIED_POLL_CEILING if notified else _POLLED_POLL_CEILING
        )
        self._poll = (_POLL_FLOOR_NOTIFIED if notified else _POLL_FLOOR_POLLED, ceiling)
        self._announced = False
        # Per layer: a flood of undecodable messages or of full group members logs one line a
        # minute per key, with the count of the lines held back.
        self._log = RateLimitedLog(logger, interval=60.0)
        _layers.add(self)

    def __repr__(self) -> str:
        primary = getattr(self, "_primary", None)  # None while __init__ is failing
        return f"<channels_lite.ChannelLayer {primary.describe() if primary else 'unconfigured'}>"

    # -- plumbing -------------------------------------------------------------------------

    async def _driver(self, loop: asyncio.AbstractEventLoop | None = None) -> Driver:
        # ``loop``: the running loop, when the caller has it already. On Python 3.11 every
        # asyncio.get_running_loop() is a getpid() system call; the hot paths ask once.
        if loop is None:
            loop = asyncio.get_running_loop()
        driver = await self._drivers.driver(loop)
        if not self._announced:
            self._announced = True
            logger.info(
                "channels-lite: layer %s started on driver %r: %s",
                self.client_id,
                driver.name,
                driver.describe(),
            )
        self._ensure_upkeep(loop, driver)
        return driver

    def _ensure_upkeep(self, loop: asyncio.AbstractEventLoop, driver: Driver) -> None:
        upkeep = self._upkeep
        if upkeep is not None and upkeep.alive():
            return
        with self._tasks_lock:
            if self._upkeep is None or not self._upkeep.alive():
                self._upkeep = Upkeep(
                    loop,
                    driver,
                    self._inbox,
                    self._clock,
                    self.settings.purge_interval,
                    self.settings.process_timeout,
                    lambda: self._process_key if self._made_channels else None,
                    lambda upkeep: self._upkeep is upkeep,
                )

    def _ensure_claimer(self, loop: asyncio.AbstractEventLoop, driver: Driver) -> ClaimLoop:
        claimer = self._claimer
        if claimer is not None and claimer.alive():
            return claimer
        with self._tasks_lock:
            if self._claimer is None or not self._claimer.alive():
                self._claimer = ClaimLoop(
                    loop,
                    driver,
                    self._inbox,
                    self._clock,
                    Backoff(*self._poll),
                    lambda claimer: self._claimer is claimer,
                    held=self._held,
                    own_key=self._process_key,
                    capacity=self.settings.capacity.for_channel,
                )
            return self._claimer

    def _wake_for(self, keys: set[str] | frozenset[str]) -> None:
        claimer = self._claimer
        if claimer is None:
            return
        claimer.stored(keys)
        if any(self._inbox.has_waiters(key) for key in keys):
            claimer.wake()

    async def _on_loop_close(self, loop: asyncio.AbstractEventLoop) -> None:
        self._watched_loops.discard(loop)
        await self._settle_background(loop)
        claimer_moved = self._claimer is not None and self._claimer.loop is loop
        for task_owner in (self._claimer, self._upkeep):
            if task_owner is not None and task_owner.loop is loop:
                task_owner.stop()
                if not task_owner.task.done():
                    task_owner.task.cancel()
                await asyncio.gather(task_owner.task, return_exceptions=True)
        if claimer_moved:
            # Receivers on other loops were served by the loop that is closing: hand the
            # claim loop to one of them now rather than at their next liveness check.
            for other in self._inbox.waiting_loops():
                if other is not loop and other.is_running():
                    other.call_soon_threadsafe(self._adopt_claimer, other)
                    break

    def _orphan(self, message: Claimed) -> None:
        task = asyncio.get_running_loop().create_task(self._requeue(message))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _requeue(self, message: Claimed) -> None:
        """Return a claimed normal-channel message to storage (its receiver was cancelled).

        It goes to the back of its channel's queue. Capacity does not apply: the message was
        accepted once. Drivers push cancellation-safely (a ``CancelledError`` means nothing was
        stored), so a loop shutting down cannot make us lose or duplicate it.
        """
        envelope = Envelope(
            message.channel, message.key, message.payload, message.expires_at, _UNBOUNDED
        )
        while True:
            try:
                driver = await self._drivers.state(asyncio.get_running_loop()).ready()
                await driver.push([envelope], self._clock())
            except asyncio.CancelledError:
                continue
            except DriverError:
                logger.exception(
                    "channels-lite: a message claimed for a cancelled receiver on %r could not "
                    "be returned to storage and is lost",
                    message.channel,
                )
                return
            self._wake_for({message.key})
            return

    async def _settle_background(self, loop: asyncio.AbstractEventLoop | None) -> None:
        pending = [t for t in self._background if loop is None or t.get_loop() is loop]
        current = asyncio.get_running_loop()
        for task in pending:
            if task.get_loop() is current:
                await asyncio.gather(task, return_exceptions=True)

    def _adopt_claimer(self, loop: asyncio.AbstractEventLoop) -> None:
        state = self._drivers.state(loop)
        if state.opened:
            self._ensure_claimer(loop, state.driver).wake()

    def _arm_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        # One timer per loop with waiting receivers, not one per receiver: a server with
        # thousands of idle consumers must stay idle.
        if loop not in self._watched_loops:
            self._watched_loops.add(loop)
            loop.call_later(_CLAIMER_CHECK, self._watchdog, loop)

    def _watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        """Safety net for waiting receivers: the claim loop serving them must be alive."""
        if loop not in self._inbox.waiting_loops():
            self._watched_loops.discard(loop)
            return
        claimer = self._claimer
        if claimer is None or not claimer.alive():
            # Through _driver(): the layer may have been closed (and its drivers with it)
            # while these receivers waited.
            task = loop.create_task(self._revive_claimer(loop))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        loop.call_later(_CLAIMER_CHECK, self._watchdog, loop)

    async def _revive_claimer(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            driver = await self._driver()
        except DriverError:
            logger.exception("channels-lite: cannot reopen storage for waiting receivers")
            return
        self._ensure_claimer(loop, driver).wake()

    def _encode(self, message: dict[str, Any]) -> bytes:
        payload = self._codec.encode(message)
        limit = self.settings.max_message_size
        if limit is not None and len(payload) > limit:
            raise MessageTooLarge(
                f"message is {len(payload)} bytes serialized; max_message_size is {limit}"
            )
        return payload

    # -- the Channels API -----------------------------------------------------------------

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Store ``message`` for ``channel``, or raise ``ChannelFull``/``MessageTooLarge``."""
        naming.check_channel(channel)
        payload = self._encode(message)
        key = naming.routing_key(channel)
        if key == self._process_key:
            self._send_local(channel, payload)
            return
        claimer = self._claimer
        if (
            key == channel
            and claimer is not None
            and (key in claimer.clean or self._inbox.has_waiters(key))
        ):
            if self._hand_to_local_receiver(channel, payload):
                return
            # One loop turn lets this process's receivers come back for more (each was just
            # handed a message), or the claim loop take what this writer stored before, which
            # is what stands between this message and a waiting receiver. Without it a
            # writer that once went through storage would never come back: it checks before
            # the claim loop has run.
            await asyncio.sleep(0)
            if self._hand_to_local_receiver(channel, payload):
                return
        loop = asyncio.get_running_loop()
        await self._driver(loop)
        now = self._clock()
        envelope = Envelope(
            channel,
            key,
            payload,
            now + self.settings.expiry,
            self.settings.capacity.for_channel(channel),
        )
        batcher = self._drivers.state(loop).batcher(self._clock)
        stored = await batcher.push(envelope)
        _reraise_if_cancelled(loop)
        if not stored:
            raise ChannelFull(f"channel {channel!r} is at capacity ({envelope.capacity})")
        self._wake_for({key})

    def _send_local(self, channel: str, payload: bytes) -> None:
        # Same-process fast path: one of this layer's own channels. Same rules as storage:
        # capacity bounds the channel's buffer, expiry is checked on receive, and one writer's
        # messages keep their order because all of them take this path.
        capacity = self.settings.capacity.for_channel(channel)
        now = self._clock()
        message = Claimed(channel, self._process_key, payload, now + self.settings.expiry)
        loop = asyncio.get_running_loop()
        if not self._inbox.offer_local(message, capacity, now, loop):
            raise ChannelFull(f"channel {channel!r} is at capacity ({capacity})")

    def _hand_to_local_receiver(self, channel: str, payload: bytes) -> bool:
        """Same-process fast path for a normal channel: straight to a receiver of this process
        that waits on it, when storage holds nothing for the channel (the claim loop found it
        empty and no change was notified since). Nothing queued there can be overtaken, so
        FIFO per writer holds; the message never occupies the channel, so capacity is moot;
        it is delivered at once, so it cannot expire. A receiver cancelled right after takes
        the usual way back: the message goes to storage for any reader."""
        claimer = self._claimer
        if claimer is None or channel not in claimer.clean or not claimer.alive():
            return False
        message = Claimed(channel, channel, payload, self._clock() + self.settings.expiry)
        return self._inbox.hand_to_waiter(message, asyncio.get_running_loop())

    async def receive(self, channel: str) -> dict[str, Any]:
        """Wait for the next message on ``channel``; cancelling it never loses one."""
        naming.check_channel(channel)
        key = naming.routing_key(channel)
        loop = asyncio.get_running_loop()
        try:
            driver = await self._driver(loop)
        except asyncio.CancelledError:
            if self._inbox.depart(channel, self._clock()):
                self._arm_closing(loop, self.settings.consumer_grace)
            raise
        while True:
            got, wake = self._inbox.take_or_wait(channel, key, self._clock(), loop)
            claimer = self._claimer
            if claimer is None or not claimer.alive():
                self._ensure_claimer(loop, driver).wake(loop)
            elif wake and (key not in claimer.clean or claimer.parked):
                # A parked claim loop claims nothing until woken: "clean" saves a claim only
                # to a loop that polls anyway.
                claimer.wake(loop)
            if isinstance(got, Claimed):
                claimed = got
            else:
                self._arm_watchdog(loop)
                try:
                    claimed = await got.future
                except asyncio.CancelledError:
                    if self._inbox.abandon(got, self._clock()):
                        self._arm_closing(loop, self.settings.consumer_grace)
                    raise
            try:
                return self._codec.decode(claimed.payload)
            except DecodeError as exc:
                # A peer with another key or serializer makes every message fail: rate-limited.
                self._log.error(
                    ("decode", channel),
                    "channels-lite: dropped a message on %r that could not be decoded: %s",
                    channel,
                    exc,
                )

    def _arm_closing(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        """Close departed consumers' channels on time, not only at the next sweep: their
        buffers are what a process with consumer churn would otherwise accumulate."""
        armed = self._closing_on
        if armed is not None and not armed.is_closed():
            return
        self._closing_on = loop
        loop.call_later(delay, self._close_departed, loop)

    def _close_departed(self, loop: asyncio.AbstractEventLoop) -> None:
        self._closing_on = None
        due = self._inbox.close_due(self._clock())
        if due is not None:
            # At least a millisecond: an injected clock that does not move must not spin.
            self._arm_closing(loop, max(due - self._clock(), 0.001))

    async def new_channel(self, prefix: str = "specific") -> str:
        """A new process-specific channel name, ``<prefix>.<client>!<unique>``.

        The first one also takes this process's lease in storage (when the driver keeps
        leases), before the name is handed out: a process killed right after putting its
        channel in a group must already hold the lease by whose lapse others remove that
        membership. So that first call may raise the driver's errors.
        """
        naming.check_prefix(prefix)
        name = naming.new_channel_name(prefix, self.client_id)
        if not self._leased:
            self._made_channels = True
            driver = await self._driver()
            if isinstance(driver, SupportsLiveness):
                await renew_lease(
                    driver, self._process_key, self._clock(), self.settings.process_timeout
                )
            self._leased = True
            # Its first round schedules the renewals (it skips them while there are no channels).
            upkeep = self._upkeep
            if upkeep is not None:
                upkeep.wake()
        self._inbox.open(name, self._clock())
        return name

    async def group_add(self, group: str, channel: str) -> None:
        naming.check_group(group)
        naming.check_channel(channel)
        driver = await self._driver()
        expires_at = self._clock() + self.settings.group_expiry
        await driver.group_add(group, channel, naming.routing_key(channel), expires_at)

    async def group_discard(self, group: str, channel: str) -> None:
        naming.check_group(group)
        naming.check_channel(channel)
        driver = await self._driver()
        await driver.group_discard(group, channel)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send to every current member; full members miss this message (never raises Full)."""
        naming.check_group(group)
        payload = self._encode(message)
        driver = await self._driver()
        now = self._clock()
        members = await driver.group_channels(group, now)
        if not members:
            return
        expires_at = now + self.settings.expiry
        capacity = self.settings.capacity.for_channel
        envelopes = []
        local: list[Claimed] = []
        for ch in members:
            key = naming.routing_key(ch)
            if key == self._process_key:
                local.append(Claimed(ch, key, payload, expires_at))
            else:
                envelopes.append(Envelope(ch, key, payload, expires_at, capacity(ch)))
        batch = max(1, driver.features.max_batch)
        stored = 0
        for start in range(0, len(envelopes), batch):
            flags = await driver.push(envelopes[start : start + batch], now)
            stored += sum(flags)
            _reraise_if_cancelled()
        # Own members only once storage took the others: a storage error then delivers to no
        # member at all, rather than to some.
        loop = asyncio.get_running_loop()
        local_full = sum(
            not self._inbox.offer_local(m, capacity(m.channel), now, loop) for m in local
        )
        skipped = len(envelopes) - stored + local_full
        if skipped:
            self._log.info(
                ("group_send", group),
                "channels-lite: group_send to %r skipped %d of %d member(s) at capacity",
                group,
                skipped,
                len(members),
            )
        self._wake_for({env.key for env in envelopes})
        if local:
            # Let the receivers just handed a message run: a burst of group_sends that never
            # suspends (members read inline, all of them local) would otherwise deliver
            # nothing until the whole burst is over.
            await asyncio.sleep(0)

    async def flush(self) -> None:
        """Empty every message and group in storage, and the buffers of every layer of this
        process on the same storage. (Another process's buffers cannot be reached: messages it
        already took for its own channels stay there, at most a capacity per channel.)"""
        driver = await self._driver()
        await driver.flush()
        storage = self._primary.describe()
        for layer in list(_layers):
            if layer is self or layer._primary.describe() == storage:
                layer._inbox.clear()
                layer._held.clear()
                # flush() removed the leases too: the next new_channel takes it again at once.
                layer._leased = False

    async def close(self) -> None:
        """Stop background work and close every driver instance. The layer can be reused."""
        await self._settle_background(asyncio.get_running_loop())
        for owner in (self._claimer, self._upkeep):
            if owner is not None:
                owner.stop()
        loop = asyncio.get_running_loop()
        for owner in (self._claimer, self._upkeep):
            if owner is not None and owner.loop is loop and not owner.task.done():
                owner.task.cancel()
                await asyncio.gather(owner.task, return_exceptions=True)
        self._claimer = None
        self._upkeep = None
        if len(self._held):
            await self._remove_held(loop)
        if self._made_channels:
            state = self._drivers.state(loop)
            driver = await state.ready()
            if isinstance(driver, SupportsLiveness):
                await driver.release(self._process_key)
            self._made_channels = False
            self._leased = False
        await self._drivers.close_all()

    async def _remove_held(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remove the messages peeked and handed on whose removal had not run yet."""
        try:
            driver = await self._drivers.state(loop).ready()
            if isinstance(driver, Peeks):
                await self._held.remove_from(driver)
        except DriverError as exc:
            # They stay held (this layer never delivers them again); the lease's release,
            # or its expiry, removes them with the rest of this process's messages.
            logger.warning(
                "channels-lite: could not remove %d delivered message(s) from storage on close: %s",
                len(self._held),
                exc,
            )

    async def close_pools(self) -> None:
        """channels_redis's name for :meth:`close`."""
        await self.close()

    # -- introspection (tests, stats) -------------------------------------------------------

    def local_state(self) -> dict[str, int]:
        """Sizes of in-process structures, to check nothing leaks per channel."""
        buffers, waiters, opened = self._inbox.sizes()
        return {
            "buffered_channels": buffers,
            "waiting_channels": waiters,
            "open_channels": opened,
            "loops": len(self._drivers.states()),
        }
