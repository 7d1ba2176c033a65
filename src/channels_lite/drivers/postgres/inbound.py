"""Messages handed on straight from their NOTIFY, without a claim round trip.

A ``send`` to a process-specific channel (``key != channel``: only the process holding that
key ever claims it) carries the message in its notification (``schema.Tables.push_one_ddl``).
The receiving process hands it to the core at once and deletes the row in the background,
which takes the claim's round trip (two process wake-ups, most of the cross-process latency)
off the path of every message.

How that stays exactly once and in order while the row is still in the table for a moment:

- **Order.** An instance serves a key from its notifications only while it *trusts* the key:
  since a claim of that key came back drained (fewer rows than asked, nothing excluded), with
  the key's LISTEN in place before the claim was sent, and nothing broke the chain since (a
  notification without the message: a batch push, a large payload; a lost LISTEN connection or
  an UNLISTEN; this instance's own push to the key, which its listener does not hear; more
  messages held than :data:`MAX_HELD`; a flush), and for :data:`TRUST_TTL` after the
  drained claim or the last ping the listening connection answered (see :meth:`Inbound.alive`),
  whichever came later.
  Everything committed before the drained claim's snapshot was claimed by it; everything
  committed after is announced, in commit order, which within a channel is id order (a push
  holds its channel's capacity lock until it commits).
- **Never twice.** A process-wide record (:class:`Delivered`, shared by the driver instances
  of every event loop) keeps, per (key, channel), the highest row id handed on by either path:
  a notification at or below it is stale, and so is a claimed row (a claim answered after
  the background DELETE of a row it had locked first still carries that row). Rows handed
  on but not yet deleted are *taken*: a claim that meets one drops it (its DELETE was the
  row's deletion).
- **Crash.** A row handed on but not yet deleted stays in the table under the dead process's
  key and goes when that key is reaped, as every message of a dead process does.
- **Capacity** still counts a handed-on row until its deletion, a millisecond or so later:
  the channel looks fuller than it is for that long, never emptier.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from channels_lite.core.ratelimit import RateLimitedLog
from channels_lite.drivers.base import Claimed, ClaimRequest

__all__ = ["MAX_HELD", "Delivered", "Inbound", "delivered_for"]

logger = logging.getLogger("channels_lite.drivers.postgres")
#: A peer that writes malformed notifications writes one per message: one WARNING a minute.
_malformed = RateLimitedLog(logger, interval=60.0)

#: Messages held per key from notifications, waiting for a claim. Past it the key's chain
#: breaks: the messages are in the table, and the next claim reads them there.
MAX_HELD = 512
#: Seconds a key's trust lasts after its drained claim, or after the last ping the listening
#: connection answered (the listener pings every TRUST_TTL / 2 while keys are trusted): then
#: the key is claimed from the table once more. It bounds how long a LISTEN connection that
#: died without anyone noticing (a peer gone silent) can hide messages. Renewing trust by a
#: ping rather than by a claim keeps the claim round trip off the message that arrives when
#: trust lapses (once a second per key under steady traffic, 4-5 messages in 1,000 at 200
#: msg/s, each delayed by 1-3 ms: the p99 region).
TRUST_TTL = 1.0
#: (key, channel) pairs whose highest delivered id is remembered; the oldest are forgotten
#: first, raising their key's floor (below it nothing can be told apart: the chain breaks).
MAX_REMEMBERED = 16384


class Delivered:
    """Process-wide: what this process handed on, for one set of tables in one database.

    Thread-safe: driver instances on different event loops (threads) share it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._high: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._floor: dict[str, int] = {}
        self._taken: set[int] = set()

    def seen(self, key: str, channel: str, row_id: int) -> bool | None:
        """Was row ``row_id`` of ``channel`` (under ``key``) handed on already?

        None when that cannot be told any more (its channel's record was forgotten).
        """
        with self._lock:
            return self._seen(key, channel, row_id)

    def _seen(self, key: str, channel: str, row_id: int) -> bool | None:
        high = self._high.get((key, channel))
        if high is not None:
            return row_id <= high
        return None if row_id <= self._floor.get(key, 0) else False

    def _record(self, key: str, channel: str, row_id: int) -> None:
        pair = (key, channel)
        high = self._high.get(pair)
        if high is None or row_id > high:
            self._high[pair] = row_id
        self._high.move_to_end(pair)
        while len(self._high) > MAX_REMEMBERED:
            (old_key, _), old_high = self._high.popitem(last=False)
            if old_high > self._floor.get(old_key, 0):
                self._floor[old_key] = old_high

    def take(self, key: str, channel: str, row_id: int) -> bool | None:
        """Hand row ``row_id`` on from its notification, unless it was handed on already.

        True: it is this caller's to deliver (its deletion is now pending); False: handed on
        already; None: cannot tell (see :meth:`seen`). Check and record are one step, so two
        instances hearing the same notification never both get it.
        """
        with self._lock:
            seen = self._seen(key, channel, row_id)
            if seen is not False:
                return None if seen is None else False
            self._record(key, channel, row_id)
            self._taken.add(row_id)
            return True

    def claimed(self, key: str, channel: str, row_id: int) -> bool:
        """A claim removed row ``row_id``: False when it was handed on already (drop it);
        otherwise it is recorded as delivered.

        Being *taken* is not enough to tell: a claim and the background DELETE of a row
        handed on can meet on the server (the claim locks the row first, the DELETE waits
        for it and then finds nothing), and the DELETE's answer may be read first, which
        ends the row's *taken* state before the claim's answer comes in. The channel's
        record still says it: a row at or below its highest delivered id was delivered
        (a channel's rows are handed on in id order, see the module docstring).
        """
        with self._lock:
            if row_id in self._taken:
                self._taken.discard(row_id)
                return False
            if self._seen(key, channel, row_id):
                return False
            self._record(key, channel, row_id)
            return True

    def deleted(self, ids: Sequence[int]) -> None:
        with self._lock:
            self._taken.difference_update(ids)

    @property
    def pending(self) -> int:
        """Rows handed on whose deletion has not happened yet."""
        with self._lock:
            return len(self._taken)


_registry_lock = threading.Lock()
_registry: dict[tuple[str, str], Delivered] = {}


def delivered_for(conninfo: str, namespace: str) -> Delivered:
    """The process-wide record for one set of tables (``namespace``) in one database."""
    with _registry_lock:
        return _registry.setdefault((conninfo, namespace), Delivered())


#: A message handed on from a notification still counts against its channel's capacity until
#: its row is deleted (in the background, a moment later). Below this capacity the delete runs
#: before the message is handed on: at capacity 1 the reply to a message (ping-pong between
#: processes) can bring the next one back before a background delete, and that send would
#: find the channel full (conformance: test_capacity_one_ping_pong_between_instances).
DELETE_FIRST_BELOW = 10


@dataclass(slots=True)
class _Held:
    row_id: int
    message: Claimed
    capacity: int


def parse_note(key: str, text: str) -> tuple[int, Claimed, int] | None:
    """``token id base64 expires_at capacity channel`` -> the message and its channel's
    capacity; None for a bare token."""
    parts = text.split(" ", 5)
    if len(parts) != 6:
        return None
    _, row_id, encoded, expires_at, capacity, channel = parts
    try:
        payload = base64.b64decode(encoded)
        return int(row_id), Claimed(channel, key, payload, float(expires_at)), int(capacity)
    except (ValueError, binascii.Error):
        _malformed.warning(
            "malformed", "channels-lite: ignoring a malformed message notification for %r", key
        )
        return None


#: What a claim ticket remembers of a key: its chain-break count and the listener's
#: connection, both of which must be unchanged when the claim returns.
_Ticket = dict[str, tuple[int, int]]


class Inbound:
    """One driver instance's messages from notifications, and which keys it trusts."""

    def __init__(self, delivered: Delivered) -> None:
        self.delivered = delivered
        self._held: dict[str, deque[_Held]] = {}
        #: Trusted keys -> time.monotonic() when their trust lapses.
        self._trusted: dict[str, float] = {}
        #: Chain breaks per key this instance claims (present for every such key).
        self._breaks: dict[str, int] = {}
        #: Keys known to be process keys (a process-specific row or notification was seen).
        self._process_keys: set[str] = set()
        #: Row ids handed on, whose rows the driver deletes in the background.
        self.doomed: list[int] = []
        #: Something handed on belongs to a channel below DELETE_FIRST_BELOW: the driver
        #: deletes before it returns (and clears this).
        self.delete_first = False
        #: For tests and stats: messages handed on from notifications.
        self.handed_on = 0

    # -- from the listener ---------------------------------------------------------------------

    def note(self, key: str, text: str) -> None:
        """A notification on ``key``'s channel (never one of this instance's own)."""
        self._process_keys.add(key)
        parsed = parse_note(key, text)
        if parsed is None:
            self.break_chain(key)
            return
        row_id, message, capacity = parsed
        state = self.delivered.seen(key, message.channel, row_id)
        if state:
            return
        if state is None:
            self.break_chain(key)
            return
        held = self._held.setdefault(key, deque())
        if len(held) >= MAX_HELD:
            self.break_chain(key)
            return
        held.append(_Held(row_id, message, capacity))

    def break_chain(self, key: str) -> None:
        """Stop serving ``key`` from notifications until a drained claim re-establishes it.

        What is held goes: it was committed before now, so the next claim, sent after now,
        finds it in the table (or it was delivered already).
        """
        self._trusted.pop(key, None)
        self._held.pop(key, None)
        self._breaks[key] = self._breaks.get(key, 0) + 1

    def own_push(self, key: str) -> None:
        """This instance pushed a message routed under ``key``.

        Its listener never hears its own notifications, so a key it claims must go back to
        the table, including one whose trust a claim in flight is about to establish.
        """
        if key in self._breaks:
            self.break_chain(key)

    def reset(self) -> None:
        """Every chain breaks (a lost LISTEN connection, a flush)."""
        for key in set(self._trusted) | set(self._held):
            self.break_chain(key)

    def forget(self, keys: set[str]) -> None:
        """No longer listened on (idle keys)."""
        for key in keys:
            self.break_chain(key)
            self._breaks.pop(key, None)
            self._process_keys.discard(key)

    # -- claims --------------------------------------------------------------------------------

    def serve(
        self, request: ClaimRequest, now: float, *, at_once: bool = False
    ) -> list[Claimed] | None:
        """Hand on what notifications brought for a trusted key; None: claim it instead.

        ``at_once``: the caller cannot wait for a deletion (``claim_ready``): stop before a
        message of a channel below :data:`DELETE_FIRST_BELOW`; it and the rest stay held.
        """
        key = request.key
        lapses = self._trusted.get(key)
        if lapses is None:
            return None
        if time.monotonic() >= lapses:
            # What is held stays: the claim about to be sent finds those rows in the table
            # (and drops them from what is held once seen), or they came after its snapshot.
            del self._trusted[key]
            return None
        held = self._held.get(key)
        out: list[Claimed] = []
        if not held:
            return out
        kept: deque[_Held] = deque()
        while held and len(out) < request.limit:
            item = held.popleft()
            message = item.message
            if message.channel in request.exclude:
                kept.append(item)
                continue
            if message.expires_at <= now:
                continue  # never handed on; purge removes the row
            if at_once and item.capacity < DELETE_FIRST_BELOW:
                held.appendleft(item)
                break
            state = self.delivered.take(key, message.channel, item.row_id)
            if state is False:
                continue
            if state is None:
                # Cannot tell: stop here; the rest comes from the table, after these.
                self.break_chain(key)
                held = None
                break
            self.doomed.append(item.row_id)
            if item.capacity < DELETE_FIRST_BELOW:
                self.delete_first = True
            out.append(message)
        if held is not None:
            kept.extend(held)
            if kept:
                self._held[key] = kept
            else:
                self._held.pop(key, None)
        self.handed_on += len(out)
        return out

    def ticket(self, keys: Sequence[str], listening: Callable[[str], int | None]) -> _Ticket:
        """Before a claim is sent: the keys it may establish trust for."""
        ticket: _Ticket = {}
        for key in keys:
            breaks = self._breaks.setdefault(key, 0)
            connection = listening(key)
            if connection is not None:
                ticket[key] = (breaks, connection)
        return ticket

    def claimed(
        self,
        ticket: _Ticket,
        requests: Sequence[ClaimRequest],
        rows: Sequence[tuple[int, Claimed]],
        listening: Callable[[str], int | None],
    ) -> list[Claimed]:
        """After a claim: drop rows already handed on, remember the rest, trust drained keys."""
        out: list[Claimed] = []
        counts: dict[str, int] = {}
        for row_id, message in rows:
            counts[message.key] = counts.get(message.key, 0) + 1
            if message.channel != message.key:
                self._process_keys.add(message.key)
                if not self.delivered.claimed(message.key, message.channel, row_id):
                    continue
            out.append(message)
        for request in requests:
            key = request.key
            before = ticket.get(key)
            if (
                before is not None
                and key in self._process_keys
                and not request.exclude
                and counts.get(key, 0) < request.limit
                and before == (self._breaks.get(key, 0), listening(key))
            ):
                self._trusted[key] = time.monotonic() + TRUST_TTL
        return out

    def alive(self, since: float) -> None:
        """The listening connection answered a ping sent at ``since`` (time.monotonic()).

        The connection was alive then, which is all that trust's lifetime stands guard for
        (a live connection delivers every notification, in commit order; what breaks a
        chain breaks it at once): a key trusted now stays trusted until ``since +
        TRUST_TTL``. Keys whose trust lapsed and was dropped by :meth:`serve` are not
        revived: a claim re-establishes them.
        """
        until = since + TRUST_TTL
        trusted = self._trusted
        for key, lapses in trusted.items():
            if lapses < until:
                trusted[key] = until

    @property
    def trusting(self) -> bool:
        """Some key is served from notifications (the listener then pings often)."""
        return bool(self._trusted)

    def trusts(self, key: str) -> bool:
        return key in self._trusted

    def take_doomed(self) -> list[int]:
        doomed, self.doomed = self.doomed, []
        return doomed
