"""The process's side of receiving: waiting receivers and per-channel buffers.

Shared by every event loop that uses one layer, hence a ``threading.Lock`` (held only for
dictionary work, never across an await). A message handed to a receiver on another loop travels
with ``call_soon_threadsafe``; if that receiver was cancelled in between, the message goes back
to the front of its channel's buffer, so nothing taken from storage is lost or reordered.

A process-specific channel is *open* from ``new_channel()`` (or its first receive) until its
consumer leaves: its last receive is cancelled (how Channels stops a consumer) and no other
starts within the grace period. Then its buffer is dropped, and so is every message that
reaches it later: nobody here can read them, and keeping them until they expire is what made a
process's memory follow its consumer churn. Channels that a receive returned from but that
never receive again are closed after ``idle_limit`` (group_expiry): a consumer that stopped
from a channel message leaves no cancellation behind.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..drivers.base import Claimed, ClaimRequest


@dataclass(slots=True, eq=False)
class Waiter:
    channel: str
    key: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Claimed]


class Inbox:
    """Waiters and bounded buffers, per channel.

    ``bound(channel)`` caps a channel's buffer: once it holds that many messages the channel is
    excluded from claims and its messages wait in storage (where capacity is enforced) until
    its consumer reads again. One full channel therefore never stops the others' claims.
    """

    def __init__(
        self,
        bound: Callable[[str], int],
        orphan: Callable[[Claimed], None],
        grace: float,
        idle_limit: float,
    ) -> None:
        self._bound = bound
        # Called (under the lock, on an event loop thread) with a normal-channel message whose
        # receiver was cancelled and that no other receiver here waits for: it must go back to
        # storage, where another process's reader can take it.
        self._orphan = orphan
        self._lock = threading.Lock()
        self._buffers: dict[str, deque[Claimed]] = {}
        self._waiters: dict[str, deque[Waiter]] = {}
        self._waiting_per_key: dict[str, int] = {}
        self._full: dict[str, set[str]] = {}
        self._grace = grace
        self._idle_limit = idle_limit
        # Open process-specific channels -> when a receive last started or was cancelled.
        self._open: dict[str, float] = {}
        # Channels whose last receive was cancelled -> when they close. Insertion order is
        # deadline order (one grace for all; a channel that re-enters moves to the end).
        self._closing: dict[str, float] = {}
        self.dropped_expired = 0
        self.dropped_departed = 0

    # -- receivers ------------------------------------------------------------------------

    def take_or_wait(
        self, channel: str, key: str, now: float, loop: asyncio.AbstractEventLoop
    ) -> tuple[Claimed | Waiter, bool]:
        """A buffered unexpired message for ``channel``, or a registered :class:`Waiter`.

        The flag says whether the claim loop must be woken: a key gained its first waiter, a
        normal channel gained one more (it claims one per waiter), or a full channel got room.
        """
        with self._lock:
            if key.endswith("!"):
                self._open[channel] = now
                self._closing.pop(channel, None)
            buffer = self._buffers.get(channel)
            room = False
            while buffer:
                message = buffer.popleft()
                room = self._after_pop(channel, key, buffer) or room
                if message.expires_at > now:
                    return message, room
                self.dropped_expired += 1
            waiter = Waiter(channel, key, loop, loop.create_future())
            self._waiters.setdefault(channel, deque()).append(waiter)
            count = self._waiting_per_key.get(key, 0)
            self._waiting_per_key[key] = count + 1
            return waiter, room or count == 0 or not key.endswith("!")

    def _after_pop(self, channel: str, key: str, buffer: deque[Claimed]) -> bool:
        if not buffer:
            del self._buffers[channel]
        full = self._full.get(key)
        if full and channel in full and len(buffer) < self._bound(channel):
            full.discard(channel)
            if not full:
                del self._full[key]
            return True
        return False

    def abandon(self, waiter: Waiter, now: float) -> bool:
        """The receiver was cancelled: forget it, keeping a message it already got.

        ``True`` when channels are closing: the caller arranges for :meth:`close_due` to run
        once the grace period is over."""
        with self._lock:
            future = waiter.future
            if future.done() and not future.cancelled():
                self._push_front(future.result())
            else:
                future.cancel()
                waiters = self._waiters.get(waiter.channel)
                if waiters is not None and waiter in waiters:
                    waiters.remove(waiter)
                    self._forget_waiter(waiter, waiters)
            return self._depart(waiter.channel, now)

    def depart(self, channel: str, now: float) -> bool:
        """A receive on ``channel`` was cancelled before it waited: as :meth:`abandon`."""
        with self._lock:
            return self._depart(channel, now)

    def _depart(self, channel: str, now: float) -> bool:
        if channel not in self._open or channel in self._waiters:
            return False  # not process-specific, closed already, or another receive waits
        self._open[channel] = now
        self._closing.pop(channel, None)
        self._closing[channel] = now + self._grace
        self._close_due(now)
        return bool(self._closing)

    def open(self, channel: str, now: float) -> None:
        """``channel`` was just made by ``new_channel()``: its messages are kept for it."""
        with self._lock:
            self._open[channel] = now

    def close_due(self, now: float) -> float | None:
        """Close the channels whose grace period is over; when the next one is due."""
        with self._lock:
            self._close_due(now)
            return next(iter(self._closing.values()), None)

    def _close_due(self, now: float) -> None:
        closing = self._closing
        while closing:
            channel, deadline = next(iter(closing.items()))
            if deadline > now:
                return
            del closing[channel]
            self._close(channel)

    def _close(self, channel: str) -> None:
        # Only called for channels with no waiter: take_or_wait takes them off _closing.
        self._open.pop(channel, None)
        buffer = self._buffers.pop(channel, None)
        if buffer:
            self.dropped_departed += len(buffer)
            full = self._full.get(buffer[0].key)
            if full is not None:
                full.discard(channel)
                if not full:
                    del self._full[buffer[0].key]

    def _keeps(self, message: Claimed) -> bool:
        # A process-specific message without a waiter is kept only for an open channel.
        if message.channel in self._open:
            return True
        self.dropped_departed += 1
        return False

    def _forget_waiter(self, waiter: Waiter, waiters: deque[Waiter]) -> None:
        if not waiters:
            self._waiters.pop(waiter.channel, None)
        left = self._waiting_per_key[waiter.key] - 1
        if left:
            self._waiting_per_key[waiter.key] = left
        else:
            del self._waiting_per_key[waiter.key]

    # -- the claim loop -------------------------------------------------------------------

    def waiting_loops(self) -> list[asyncio.AbstractEventLoop]:
        with self._lock:
            loops = {w.loop for waiters in self._waiters.values() for w in waiters}
        return list(loops)

    def has_waiters(self, key: str) -> bool:
        return key in self._waiting_per_key

    def requests(self, batch: int) -> list[ClaimRequest]:
        """What to claim now: only for keys somebody is waiting on.

        A normal channel gets exactly as many messages as it has waiters, so that no message
        idles in this process while another process's reader could take it. A process key gets
        a batch, minus the channels whose buffer is full.
        """
        with self._lock:
            out = []
            for key, count in self._waiting_per_key.items():
                if key.endswith("!"):
                    out.append(ClaimRequest(key, batch, frozenset(self._full.get(key, ()))))
                else:
                    out.append(ClaimRequest(key, count))
            return out

    def deliver(self, messages: list[Claimed], now: float, loop: asyncio.AbstractEventLoop) -> int:
        """Hand claimed messages to waiters (oldest waiter first) or buffer them; return how
        many went straight to a waiter."""
        handed = 0
        with self._lock:
            if self._closing:
                self._close_due(now)
            for message in messages:
                if message.expires_at <= now:
                    self.dropped_expired += 1
                    continue
                if self._hand_to_waiter(message, loop):
                    handed += 1
                    continue
                if message.key.endswith("!"):
                    if self._keeps(message):
                        self._append(message)
                else:
                    # Its receiver left between the claim and now (a normal channel is claimed
                    # one message per waiter): back to storage, for any process to take.
                    self._orphan(message)
        return handed

    def offer_local(
        self, message: Claimed, capacity: int, now: float, loop: asyncio.AbstractEventLoop
    ) -> bool:
        """Deliver a message sent by this process to one of its own channels, bypassing
        storage (or drop it, its consumer gone). ``False`` when the channel's buffer already
        holds ``capacity`` messages."""
        with self._lock:
            if self._hand_to_waiter(message, loop):
                return True
            if self._closing:
                self._close_due(now)
            if not self._keeps(message):
                return True
            buffer = self._buffers.get(message.channel)
            if buffer is not None and len(buffer) >= capacity:
                return False
            self._append(message)
            return True

    def hand_to_waiter(self, message: Claimed, loop: asyncio.AbstractEventLoop) -> bool:
        """Give ``message`` to a receiver waiting on its channel, if there is one; never
        buffers it. ``loop`` is the caller's."""
        with self._lock:
            return self._hand_to_waiter(message, loop)

    def _hand_to_waiter(self, message: Claimed, loop: asyncio.AbstractEventLoop) -> bool:
        waiters = self._waiters.get(message.channel)
        while waiters:
            waiter = waiters.popleft()
            self._forget_waiter(waiter, waiters)
            if waiter.future.done():
                continue
            if waiter.loop is loop:
                waiter.future.set_result(message)
                return True
            try:
                waiter.loop.call_soon_threadsafe(self._hand_over, waiter, message)
            except RuntimeError:
                # That loop is closed: its receiver is gone; try the next one.
                continue
            return True
        return False

    def _hand_over(self, waiter: Waiter, message: Claimed) -> None:
        if waiter.future.done():
            with self._lock:
                self._push_front(message)
        else:
            waiter.future.set_result(message)

    def _append(self, message: Claimed) -> None:
        buffer = self._buffers.setdefault(message.channel, deque())
        buffer.append(message)
        if len(buffer) >= self._bound(message.channel):
            self._full.setdefault(message.key, set()).add(message.channel)

    def _push_front(self, message: Claimed) -> None:
        # A message goes back to the front only if nobody waits: otherwise hand it on.
        waiters = self._waiters.get(message.channel)
        while waiters:
            waiter = waiters.popleft()
            self._forget_waiter(waiter, waiters)
            if not waiter.future.done():
                if waiter.loop.is_closed():
                    continue
                waiter.loop.call_soon_threadsafe(self._hand_over, waiter, message)
                return
        if not message.key.endswith("!"):
            self._orphan(message)
            return
        if not self._keeps(message):
            return
        buffer = self._buffers.setdefault(message.channel, deque())
        buffer.appendleft(message)
        if len(buffer) >= self._bound(message.channel):
            self._full.setdefault(message.key, set()).add(message.channel)

    # -- housekeeping ---------------------------------------------------------------------

    def sweep(self, now: float) -> int:
        """Drop expired buffered messages, and so the buffers of channels nobody reads; close
        channels whose grace is over or that nobody received on for ``idle_limit``."""
        dropped = 0
        with self._lock:
            self._close_due(now)
            opened = self._open
            for channel in self._waiters:
                if channel in opened:
                    opened[channel] = now  # waiting is activity, however long it lasts
            idle_since = now - self._idle_limit
            for channel in [c for c, t in opened.items() if t < idle_since]:
                self._closing.pop(channel, None)
                self._close(channel)
            for channel in list(self._buffers):
                buffer = self._buffers[channel]
                kept = deque(m for m in buffer if m.expires_at > now)
                dropped += len(buffer) - len(kept)
                if kept:
                    self._buffers[channel] = kept
                else:
                    del self._buffers[channel]
            self._full.clear()
            for channel, buffer in self._buffers.items():
                if len(buffer) >= self._bound(channel):
                    self._full.setdefault(buffer[0].key, set()).add(channel)
            self.dropped_expired += dropped
        return dropped

    def clear(self) -> None:
        """Forget every buffered message (flush); waiting receivers keep waiting."""
        with self._lock:
            self._buffers.clear()
            self._full.clear()

    def buffered(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._buffers.values())

    def sizes(self) -> tuple[int, int, int]:
        """(channels with a buffer, channels with a waiter, open process-specific channels):
        for leak checks."""
        with self._lock:
            return len(self._buffers), len(self._waiters), len(self._open)
