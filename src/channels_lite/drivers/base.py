"""The driver contract: what the core asks of storage, and nothing more.

A driver persists opaque bytes. It never reads a clock, a setting, a glob pattern or a channel
name's structure: the core passes ``now``, ``expires_at``, ``capacity`` and the routing ``key``
into every call. That keeps drivers small and lets the conformance suite test expiry and capacity
deterministically, with a controlled clock.

Vocabulary
----------
channel
    The full channel name a message is addressed to (already validated by the core).
key
    The routing key the message is claimed under. For a normal channel it is the channel name
    itself; for a process-specific channel ``"remote!local"`` it is the process part
    ``"remote!"``, so that one claim serves every consumer of one process. A driver treats keys
    as opaque strings and only compares them for equality.
payload
    Opaque bytes (serialized, possibly encrypted, by the core). Returned byte for byte.
expires_at / now
    Seconds since the epoch, as ``float``. A message or membership with ``expires_at <= now`` is
    *expired*: it must never be returned, counted or delivered, whether or not it was purged.

Instances and event loops
-------------------------
The core creates one driver instance per event loop that uses the layer (the server's loop and
each loop that ``async_to_sync`` creates) with :meth:`Driver.sibling`, and closes it when that loop
closes. An instance is only ever used from the loop it was opened on. Siblings share storage:
what one instance stores, another (in the same or, if ``features.cross_process``, another OS
process) can claim.

Errors
------
Every failure of the storage itself is raised as :class:`DriverError` (original as
``__cause__``), with a message naming the storage (path, DSN without password) and what to do.
Transient contention (locks held by another process) is retried inside the driver and is never
surfaced while it clears within the driver's own timeout.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

__all__ = [
    "ChangeNotifier",
    "ClaimRequest",
    "Claimed",
    "ClaimsReady",
    "DefersChanges",
    "Driver",
    "DriverConfigError",
    "DriverError",
    "DriverFeatures",
    "Envelope",
    "Peeks",
    "StorageStats",
    "SupportsLiveness",
    "SupportsStats",
]


class DriverError(Exception):
    """Storage failed. ``__cause__`` holds the backend's own exception."""


class DriverConfigError(ValueError):
    """A driver option is unknown, of the wrong type, or impossible.

    ``option`` names the offending CONFIG key so the core can report it.
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message to store, with everything the driver needs to decide."""

    channel: str
    key: str
    payload: bytes
    expires_at: float
    #: Store only while fewer than this many unexpired messages are held for ``channel``.
    capacity: int


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """Ask for up to ``limit`` messages routed under ``key``, skipping channels in ``exclude``."""

    key: str
    limit: int
    #: Channels whose messages must stay in storage this time (their local buffer is full).
    exclude: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Claimed:
    """A message removed from storage by :meth:`Driver.claim`, now owned by the caller."""

    channel: str
    key: str
    payload: bytes
    expires_at: float


@dataclass(frozen=True, slots=True)
class DriverFeatures:
    """What a driver can do; the conformance suite skips honestly on what it cannot."""

    #: Several OS processes may share the storage (SQLite file, database server).
    cross_process: bool
    #: Stored data survives a restart of every process.
    persistent: bool
    #: Largest number of envelopes the core hands to one :meth:`Driver.push` call.
    max_batch: int = 1000


class Driver(abc.ABC):
    """Base class of every storage driver.

    Subclasses set :attr:`name` and :attr:`features` and implement the abstract methods. The
    constructor takes the driver's options as keyword arguments (the CONFIG keys the core does
    not own) and must validate them eagerly, raising :class:`DriverConfigError` naming the key.
    It must not touch storage: that is :meth:`open`'s job.
    """

    #: The name users put in ``CONFIG["driver"]``.
    name: ClassVar[str]
    features: ClassVar[DriverFeatures]
    #: Option name -> one-line description, for error messages and ``channels-lite drivers``.
    option_docs: ClassVar[Mapping[str, str]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_docs))
        if unknown:
            known = ", ".join(sorted(self.option_docs)) or "none"
            raise DriverConfigError(
                unknown[0],
                f"unknown option {unknown[0]!r} for driver {self.name!r} (its options: {known})",
            )
        self.options: dict[str, Any] = dict(options)

    def sibling(self) -> Self:
        """Return a new, unopened instance on the *same storage*, for another event loop.

        The default re-creates the driver from :attr:`options`; a driver whose storage lives in
        the instance (the in-memory one) overrides this to share it.
        """
        return type(self)(**self.options)

    def describe(self) -> str:
        """A short human description of where data lives, for logs (no secrets)."""
        return self.name

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and prepare storage (create or upgrade the schema).

        Idempotent: a second call on an open instance does nothing. Failure raises
        :class:`DriverError` naming the storage and the cause.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every resource of this instance (connections, threads, file descriptors).

        Idempotent, and safe on an instance that was never opened. Stored data is kept.
        It may be awaited from another event loop than the one the instance was opened on, once
        that loop is closed (the core cleans up after loops it could not hook): release what can
        be released without awaiting objects bound to the dead loop.
        """

    @abc.abstractmethod
    async def push(self, envelopes: Sequence[Envelope], now: float) -> list[bool]:
        """Store each envelope unless its channel is full; return one flag per envelope.

        Invariants:

        - For each envelope, counting the unexpired messages of ``envelope.channel`` and storing
          the envelope is one atomic step, also against other instances and processes: a channel
          never holds more than ``capacity`` unexpired messages because of concurrent pushes.
        - Envelopes are considered in order, so two envelopes for the same channel in one batch
          see each other in the count.
        - Stored messages are ordered: for one ``key`` a later push is claimed after an earlier
          one (strict FIFO per channel).
        - ``False`` means "channel full, nothing stored for this envelope"; it is not an error.
        - On :class:`DriverError` nothing of the batch may be half-stored in a way that delivers
          a message twice; storing none of it is the simple way to keep that.
        - Cancellation-safe, like :meth:`claim`: if the awaiting task is cancelled while the
          push is in flight, the driver either stored nothing and lets ``CancelledError``
          through, or finishes and *returns* its flags (the core then re-raises the
          cancellation). ``CancelledError`` therefore always means "nothing stored", so the core
          can retry without duplicating.
        """

    @abc.abstractmethod
    async def claim(self, requests: Sequence[ClaimRequest], now: float) -> list[Claimed]:
        """Atomically remove and return unexpired messages, oldest first within each key.

        Invariants:

        - A message is returned by at most one ``claim`` call, across every instance and process
          sharing the storage: never the same message twice.
        - At most ``request.limit`` messages per request; messages of channels in
          ``request.exclude`` are left in storage untouched.
        - Expired messages (``expires_at <= now``) are never returned; the driver may delete them.
        - Within one key, messages come back in the order they were pushed.
        - An empty list means nothing is available right now; it never blocks waiting.
        - Cancellation-safe: if the awaiting task is cancelled while the claim is in flight, the
          driver either removed nothing, or it finishes the claim and *returns* its messages
          (absorbing that cancellation; the core re-raises it after handing the messages on).
          A claim must never remove messages that nobody receives.
        """

    @abc.abstractmethod
    async def group_add(self, group: str, channel: str, key: str, expires_at: float) -> None:
        """Add ``channel`` (routed under ``key``) to ``group``, or refresh its ``expires_at``.

        Idempotent: adding twice leaves one membership, with the ``expires_at`` of the last
        call.
        """

    @abc.abstractmethod
    async def group_discard(self, group: str, channel: str) -> None:
        """Remove ``channel`` from ``group``; a no-op when it is not a member."""

    @abc.abstractmethod
    async def group_channels(self, group: str, now: float) -> list[str]:
        """Return the channels whose membership of ``group`` has not expired, each once."""

    @abc.abstractmethod
    async def purge(self, now: float) -> int:
        """Delete expired messages and memberships; return how many rows went away.

        Purging is housekeeping only: correctness never depends on it, because every read
        already ignores expired rows. It must not delete process leases
        (:class:`SupportsLiveness`): an expired lease is how ``heartbeat`` finds a dead process
        whose messages and memberships it must remove.
        """

    @abc.abstractmethod
    async def flush(self) -> None:
        """Delete every message and membership (and liveness record) in this storage."""


@runtime_checkable
class ChangeNotifier(Protocol):
    """Optional: tell the core when storage *may* have new messages, so it can claim at once.

    ``callback`` is called on the event loop this instance was opened on, without arguments,
    after another instance or process committed a change. Spurious calls are fine (the core just
    claims and finds nothing); missed calls only cost latency, because the core always keeps a
    safety-net poll.
    """

    def add_change_listener(self, callback: Callable[[], None]) -> None: ...

    def remove_change_listener(self, callback: Callable[[], None]) -> None: ...


@runtime_checkable
class ClaimsReady(Protocol):
    """Optional, beside :class:`ChangeNotifier`: messages that came with their notification.

    Some storage can tell a listener the message itself along with the change (PostgreSQL's
    NOTIFY payload). The core then asks for them from its change listener, on the spot, and
    hands them to the waiting receivers in that same turn of the loop, rather than waking its
    claim loop for a round that would find them: one loop turn fewer on every message, and
    the code a round runs, on a process that has just woken up and runs it slowly.

    Invariants:

    - ``claim_ready(requests, now)`` is :meth:`Driver.claim` restricted to what the instance
      holds at hand, with every guarantee of ``claim``: a message comes from ``claim`` or from
      ``claim_ready`` at most once across every instance and process; limits, ``exclude``
      and expiry are respected; within one key messages come in the order they were pushed,
      also across ``claim_ready`` and ``claim`` calls.
    - It does no I/O and never suspends or raises: ``[]`` when nothing is at hand. Work that
      must follow (deleting what was handed on) is the driver's to schedule.
    - The core calls it on the loop the instance was opened on, from inside a change
      listener's call or anywhere else, and never while one of its ``claim`` calls is in
      flight (messages that claim took must reach receivers before later ones). It still
      wakes its claim loop after each notification: what ``claim_ready`` left is claimed as
      usual.
    """

    def claim_ready(self, requests: Sequence[ClaimRequest], now: float) -> list[Claimed]: ...


@runtime_checkable
class DefersChanges(Protocol):
    """Optional, beside :class:`ChangeNotifier`: the core says when notifications are useless.

    While its claims keep returning messages, the core claims again at once anyway, and a
    notification per commit of every other process is pure cost (with three processes
    draining one SQLite channel, reading and checking them cost about a sixth of the rate).
    ``defer_changes(True)`` allows the driver to hold its listeners' calls back;
    ``defer_changes(False)`` ends that. Invariants:

    - Deferred, never dropped: a change committed while deferred that would have been
      notified is still notified, after ``defer_changes(False)`` (at once, or as soon as the
      change is visible), on the instance's loop as usual.
    - Cheap and idempotent: the core may call it twice per claim round, with the same value
      many times in a row. Called on the loop the instance was opened on.
    - Deferring is permission, not obligation: a driver may keep calling listeners.
    """

    def defer_changes(self, defer: bool) -> None: ...


@runtime_checkable
class Peeks(Protocol):
    """Optional: read messages without removing them, and remove them afterwards.

    A claim's write transaction stands between a message and its receiver; a read does not.
    The core uses this only for its own process key, which no other process claims from: it
    hands peeked messages to their receivers at once and removes them a moment later, and it
    never peeks a message again once it holds its receipt. Receipts are opaque, hashable
    values that the driver chooses.

    Invariants:

    - ``peek`` changes nothing in storage. It returns, oldest first, up to ``request.limit``
      unexpired messages per request routed under ``request.key``, skipping channels in
      ``request.exclude`` and every message whose receipt is in ``held``; each with its
      receipt. Held messages do not count against the limit.
    - A peeked message stays claimable, countable and purgeable exactly as before, until
      ``remove`` (or ``claim``, ``purge``, ``flush``, a reaping ``heartbeat``) deletes it.
    - ``remove(receipts)`` deletes, in one atomic step, the messages those receipts were
      issued for that are still stored, and nothing else: never a message stored later, even
      where the storage reuses row ids (make the receipt carry what tells them apart).
      Receipts of messages already gone are ignored; removing twice is harmless.
    - ``remove`` is cancellation-safe in the sense of :meth:`Driver.push`: if it raises
      ``CancelledError`` it may or may not have removed them, and the core calls it again.
    """

    async def peek(
        self, requests: Sequence[ClaimRequest], now: float, held: Collection[Hashable]
    ) -> list[tuple[Hashable, Claimed]]: ...

    async def remove(self, receipts: Collection[Hashable]) -> None: ...


@runtime_checkable
class SupportsLiveness(Protocol):
    """Optional: leases for processes, so members and messages of dead processes go away.

    Without it, a dead process's memberships last until ``group_expiry`` and its messages until
    ``expiry``.
    """

    async def heartbeat(self, process_key: str, expires_at: float, now: float) -> list[str]:
        """Renew ``process_key``'s lease until ``expires_at`` and reap dead processes.

        In one step: record the lease; find every *other* process key whose lease expired at or
        before ``now``; delete their lease, every message routed under that key and every
        membership routed under that key; return the reaped keys. A key whose lease is
        current is never reaped.
        """
        ...

    async def release(self, process_key: str) -> None:
        """Drop ``process_key``'s lease, its messages and memberships (orderly shutdown)."""
        ...


@dataclass(frozen=True, slots=True)
class StorageStats:
    """A snapshot for operators. Counts include only unexpired rows unless named ``expired``."""

    messages: int
    expired_messages: int
    channels: Mapping[str, int]
    groups: Mapping[str, int]
    processes: int
    storage_bytes: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class SupportsStats(Protocol):
    """Optional: describe what storage holds, for ``channels-lite stats``."""

    async def stats(self, now: float, top: int) -> StorageStats: ...
