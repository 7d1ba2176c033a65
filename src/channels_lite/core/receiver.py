"""The claim loop: one per layer, claiming for every receiver of the process.

It runs on one event loop at a time (its *home*). Receivers on other loops register in the
shared :class:`~.inbox.Inbox` and get their messages handed over thread-safely. When the home
loop stops running (an ``async_to_sync`` loop that finished), the next receiver starts a new
claim loop on its own loop; the old one notices it was superseded and ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from ..drivers.base import (
    ChangeNotifier,
    Claimed,
    ClaimRequest,
    ClaimsReady,
    DefersChanges,
    Driver,
    DriverError,
    Peeks,
)
from .cadence import Backoff, Wakeup
from .held import Held
from .inbox import Inbox
from .ratelimit import RateLimitedLog

logger = logging.getLogger("channels_lite.core.receiver")
#: DEBUG traces of every claim and wake-up would flood a busy process: one line a second.
_trace = RateLimitedLog(logger, interval=1.0)
#: A storage outage fails every claim round: one ERROR with traceback a minute.
_failures = RateLimitedLog(logger, interval=60.0)

#: Further looks after a change notification whose claim found nothing (see ``_rechecks``):
#: 62 ms in all, for a writer descheduled between writing the WAL and publishing the commit.
_RECHECKS = (0.002, 0.004, 0.008, 0.016, 0.032)
_RECHECK_WINDOW = sum(_RECHECKS)
#: Messages claimed per process key in one round.
CLAIM_BATCH = 100
#: Consecutive claim rounds that found messages before change notifications are deferred
#: (deferring at every such round cost the single-process scenarios their speed).
_DEFER_AFTER = 8
#: Wait after a failed claim, doubling up to the ceiling while storage keeps failing.
_RETRY_FIRST = 0.1
_RETRY_CEILING = 5.0
#: How long peeked messages stay in storage after they were handed on. Removing them at once
#: would put the removal's write transaction between the receiver and the code awaiting it
#: (a receive() wrapped in wait_for() or in a consumer's dispatch task is a few loop turns
#: away); meanwhile they still count against their channel's capacity.
REMOVE_AFTER = 0.001
#: Rounds in a row that handed every message straight to a waiting receiver before the claim
#: loop peeks (see ClaimLoop._may_peek).
_DIRECT_BEFORE_PEEK = 2
#: Channels with a smaller capacity have their peeked messages removed before the receiver
#: runs. A held message fills a channel only together with ``capacity - 1`` unread ones, and a
#: channel whose receiver takes messages one at a time has next to none; but on a channel of
#: capacity 1 the reply to a message (ping-pong between processes) can bring the next message
#: back before the removal ran, and the send would find the channel full.
PEEK_MIN_CAPACITY = 10


def _per_key(claimed: list[Claimed]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for message in claimed:
        counts[message.key] = counts.get(message.key, 0) + 1
    return counts


class ClaimLoop:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        driver: Driver,
        inbox: Inbox,
        clock: Callable[[], float],
        backoff: Backoff,
        is_current: Callable[[ClaimLoop], bool],
        *,
        held: Held | None = None,
        own_key: str | None = None,
        capacity: Callable[[str], int] | None = None,
    ) -> None:
        """``own_key``: the routing key only this process claims from (its process key);
        with a driver that :class:`~channels_lite.drivers.base.Peeks`, rounds that claim
        for it alone may peek, holding receipts in ``held``; ``capacity`` gives a channel's
        capacity (see :data:`PEEK_MIN_CAPACITY`)."""
        self.loop = loop
        self.driver = driver
        self.inbox = inbox
        self.clock = clock
        self.backoff = backoff
        self.wakeup = Wakeup(loop)
        self._is_current = is_current
        self._stopping = False
        # Keys storage held nothing more for at the last claim, with no change notified since.
        # A receiver on such a key need not wake us: only a notification or a local push can
        # put messages there, and both clear the key. Trusted only with a ChangeNotifier.
        self.clean: set[str] = set()
        self._generation = 0
        # A change notification can arrive a moment before the commit it announces is visible
        # to readers (SQLite: the WAL is written, then its index; on a loaded machine the
        # writer can be descheduled in between for milliseconds). If the claims it triggers
        # find nothing, look again at growing intervals; and mark no key clean from claims
        # that began less than the whole recheck window after the notification: a key
        # wrongly marked clean would leave its message to the safety-net poll, or to nobody
        # if every receiver came after the claim loop parked. A deadline, not "until the
        # rechecks ran": claims that keep finding messages never run them, and a process
        # that kept receiving would then never trust any key again.
        self._rechecks: tuple[float, ...] = ()
        self._distrust_until = 0.0
        #: Parked: nobody waits, and only a wake() starts the next claim.
        self.parked = False
        self._deferrer: DefersChanges | None = None
        self._deferring = False
        self._hot_rounds = 0
        self._peeker = driver if isinstance(driver, Peeks) and held is not None else None
        self._held = held if held is not None else Held()
        self._own_key = own_key
        self._capacity = capacity
        self._removal: asyncio.TimerHandle | None = None
        self._removing: asyncio.Task[None] | None = None
        self._remove_retry = _RETRY_FIRST
        # Consecutive rounds whose messages all went straight to waiting receivers.
        self._direct_rounds = 0
        # Set while this loop awaits a claim or peek (claim_ready must not overtake it).
        self._claiming = False
        self._ready: ClaimsReady | None = None
        self.task: asyncio.Task[None] = loop.create_task(self._run(), name="channels-lite claim")

    def alive(self) -> bool:
        return not self.task.done() and not self._stopping and self.loop.is_running()

    def wake(self, running: asyncio.AbstractEventLoop | None = None) -> None:
        """Wake the loop from any thread; ``running``: the caller's running loop, if known."""
        self.wakeup.set_threadsafe(running)

    def _on_change(self) -> None:
        self._generation += 1
        self._rechecks = _RECHECKS
        self._distrust_until = self.loop.time() + _RECHECK_WINDOW
        self.clean.clear()
        if self.parked:
            # Nobody waits, so there is nothing to claim; the next receiver wakes us itself
            # (a parked loop is always woken by receive()). Waking here would only cost a
            # round of the loop per commit of every other process.
            return
        if self._ready is not None and not self._claiming and not self._stopping:
            # Before the wake-up: the receivers' turns then come before the claim loop's.
            self._deliver_ready(self._ready)
        _trace.debug("wake", "woken by a storage change notification")
        self.wakeup.set()

    def _deliver_ready(self, ready: ClaimsReady) -> None:
        """Hand on what the notification brought (see ClaimsReady), in this same turn."""
        requests = self.inbox.requests(CLAIM_BATCH)
        if not requests:
            return
        now = self.clock()
        try:
            messages = ready.claim_ready(requests, now)
        except Exception:
            # Breaks the contract; the claim loop still claims (the wake-up follows).
            logger.exception("channels-lite: %r failed in claim_ready; not asked again", ready)
            self._ready = None
            return
        if messages:
            _trace.debug("ready", "%d message(s) came with a notification", len(messages))
            self.inbox.deliver(messages, now, self.loop)
            self.backoff.reset()

    def stored(self, keys: Iterable[str]) -> None:
        """This process just stored messages under ``keys`` (from any loop's thread).

        A claim already in flight may have looked at storage before that push; bumping the
        generation stops it from marking these keys clean when it returns empty-handed.
        """
        self._generation += 1
        for key in keys:
            self.clean.discard(key)

    def stop(self) -> None:
        self._stopping = True
        self.wakeup.set_threadsafe()

    async def _run(self) -> None:
        notifier = self.driver if isinstance(self.driver, ChangeNotifier) else None
        if notifier is not None:
            notifier.add_change_listener(self._on_change)
            if isinstance(notifier, DefersChanges):
                self._deferrer = notifier
            if isinstance(notifier, ClaimsReady):
                self._ready = notifier
        try:
            await self._claim_forever(trust_clean=notifier is not None)
        finally:
            self._cancel_removal()
            self.clean.clear()
            self._defer(False)
            self._deferrer = None
            if notifier is not None:
                notifier.remove_change_listener(self._on_change)
            removing = self._removing
            if removing is not None and not removing.done():
                # Let a removal in flight finish (the layer's close removes what is left).
                # Last: a second cancellation may end this wait, and must not skip the rest.
                await asyncio.wait({removing})

    def _defer(self, defer: bool) -> None:
        """Hold change notifications back while claims keep finding messages (the next round
        claims anyway); let them through before any wait. Deferred notifications arrive when
        let through, so a key wrongly marked clean meanwhile is cleared then, before the loop
        relies on it (it only does so while waiting or parked)."""
        if not defer:
            self._hot_rounds = 0
        deferrer = self._deferrer
        if deferrer is not None and defer != self._deferring:
            self._deferring = defer
            try:
                deferrer.defer_changes(defer)
            except Exception:
                # Only an optimisation: a driver failing at it is not asked again (so this
                # logs once per claim loop) and keeps calling its listeners.
                logger.exception("channels-lite: %r failed to defer notifications", deferrer)
                self._deferrer = None

    async def _claim_forever(self, *, trust_clean: bool) -> None:
        retry = _RETRY_FIRST
        while not self._stopping and self._is_current(self):
            self.wakeup.consume()
            requests = self.inbox.requests(CLAIM_BATCH)
            if not requests:
                # Nobody waits: park until a receiver arrives (it wakes us).
                self._defer(False)
                self.parked = True
                try:
                    await self.wakeup.wait(None)
                finally:
                    self.parked = False
                self.backoff.reset()
                continue
            now = self.clock()
            generation = self._generation
            began = self.loop.time()
            # A driver absorbs a cancellation that arrives mid-claim and returns what it took
            # (see Driver.claim); it is re-raised here once those messages are in the inbox.
            peeked = False
            self._claiming = True
            try:
                if self._may_peek(requests):
                    taken = await self._peek(requests, now)
                    if taken is None:
                        # Receipts left while it read: what it saw may be gone already.
                        await asyncio.sleep(0)
                        continue
                    claimed, peeked = taken, True
                else:
                    if len(self._held):
                        # A claim would take held messages (delivered already) again.
                        await self._remove_held()
                    claimed = await self.driver.claim(requests, now)
            except DriverError:
                self._claiming = False
                # Receivers keep waiting; the claim loop must outlive a storage outage.
                _failures.exception("claim", "channels-lite: claiming messages failed; retrying")
                self._defer(False)
                await self.wakeup.wait(retry)
                retry = min(retry * 2, _RETRY_CEILING)
                continue
            finally:
                self._claiming = False
            retry = _RETRY_FIRST
            if claimed:
                _trace.debug(
                    "claim", "claimed %d message(s) for %d key(s)", len(claimed), len(requests)
                )
                handed = self.inbox.deliver(claimed, now, self.loop)
                self.backoff.reset()
                direct = handed == len(claimed) and (self._peeker is None or self._roomy(claimed))
                self._direct_rounds = self._direct_rounds + 1 if direct else 0
                if peeked and not direct:
                    # Some went to a buffer (or nowhere), or to a channel too small to count a
                    # delivered message for long: they must stop counting against their
                    # channel's capacity now, as a claim's would have.
                    try:
                        await self._remove_held()
                    except DriverError:
                        _failures.exception(
                            "remove", "channels-lite: removing delivered messages failed"
                        )
            if len(self._held):
                self._schedule_removal(REMOVE_AFTER)
            counts = _per_key(claimed)
            # Not right after a notification: what it announced may not be visible yet.
            if trust_clean and generation == self._generation and began >= self._distrust_until:
                self._mark_clean(requests, counts)
            task = asyncio.current_task(self.loop)
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            # Some key gave as many messages as asked for: it may hold more.
            filled = any(counts.get(r.key, 0) >= r.limit for r in requests)
            if not claimed or not filled:
                # Storage held less than was asked for every key. Another round right away
                # would find nothing new, and (after a claim that found messages) run before
                # the receivers just handed them: the trip from their receive() to the code
                # awaiting it takes more than one loop turn. What could arrive meanwhile wakes
                # us (a change notification, a local push, a receiver coming back for a key not
                # marked clean), and the rechecks still look for a commit announced before it
                # was visible.
                self._defer(False)
                if self._rechecks and self.loop.time() < self._distrust_until:
                    delay, self._rechecks = self._rechecks[0], self._rechecks[1:]
                    await self.wakeup.wait(delay)
                else:
                    await self.wakeup.wait(self.backoff.next())
            else:
                self._hot_rounds += 1
                if self._hot_rounds >= _DEFER_AFTER:
                    self._defer(True)
                # A driver may claim without suspending (SQLite inline): let the receivers
                # just handed messages run before the next round.
                await asyncio.sleep(0)

    # -- peeking -------------------------------------------------------------------------

    def _may_peek(self, requests: list[ClaimRequest]) -> bool:
        # Only while messages come one at a time to receivers that wait for them (the last
        # rounds handed everything straight on): there a peek takes the write transaction
        # off the message's path. Once messages pile up (some go to buffers, claims fill
        # their limit), one write transaction per round beats a read plus a removal:
        # measured across processes, one sender flat out to one receiver, 11.1k msgs/s
        # peeking every round against 13.3k claiming. Only for the key no other process
        # claims: two processes peeking one key would both deliver its messages.
        return (
            self._peeker is not None
            and self._hot_rounds == 0
            and self._direct_rounds >= _DIRECT_BEFORE_PEEK
            and len(self._held) < CLAIM_BATCH
            and all(request.key == self._own_key for request in requests)
        )

    def _roomy(self, messages: list[Claimed]) -> bool:
        capacity = self._capacity
        return capacity is None or all(capacity(m.channel) >= PEEK_MIN_CAPACITY for m in messages)

    async def _peek(self, requests: list[ClaimRequest], now: float) -> list[Claimed] | None:
        assert self._peeker is not None
        held, generation = self._held.snapshot()
        found = await self._peeker.peek(requests, now, held)
        return self._held.take(found, generation)

    async def _remove_held(self) -> None:
        """Remove every held message from storage (DriverError if that fails: they stay held)."""
        if not len(self._held):
            return
        assert self._peeker is not None  # only a peeking claim loop's Held fills up
        await self._held.remove_from(self._peeker)

    def _schedule_removal(self, delay: float) -> None:
        if self._removal is not None or (self._removing is not None and not self._removing.done()):
            return
        self._removal = self.loop.call_later(delay, self._start_removal)

    def _start_removal(self) -> None:
        self._removal = None
        self._removing = self.loop.create_task(
            self._remove_in_background(), name="channels-lite removal of delivered messages"
        )

    async def _remove_in_background(self) -> None:
        try:
            await self._remove_held()
        except DriverError:
            _failures.exception(
                "remove", "channels-lite: removing delivered messages failed; retrying"
            )
            self._removing = None
            self._schedule_removal(self._remove_retry)
            self._remove_retry = min(self._remove_retry * 2, _RETRY_CEILING)
            return
        self._remove_retry = _RETRY_FIRST

    def _cancel_removal(self) -> None:
        timer, self._removal = self._removal, None
        if timer is not None:
            timer.cancel()

    def _mark_clean(self, requests: list[ClaimRequest], counts: dict[str, int]) -> None:
        """``counts``: messages the claim gave per key."""
        for request in requests:
            if counts.get(request.key, 0) < request.limit and not request.exclude:
                self.clean.add(request.key)
            else:
                self.clean.discard(request.key)
