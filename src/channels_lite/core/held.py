"""Messages handed to receivers by a peek and still in storage, until they are removed.

A peek (:class:`~channels_lite.drivers.base.Peeks`) delivers before it deletes. From the moment
a peeked message is handed on until its removal is committed, nothing may deliver it again:
every peek skips the receipts held here, and a peek's result is taken (checked against the
receipts and added to them) in one step under a lock, so two peeks that saw the same message
deliver it once.

One per layer, shared by its claim loops: a layer's claim loop can move to another event loop
(see :mod:`.receiver`), and the old one may still be finishing a peek in another thread.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable

from ..drivers.base import Claimed, Peeks

__all__ = ["Held"]


class Held:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._receipts: dict[Hashable, None] = {}
        # Bumped whenever receipts leave (removed from storage, or storage flushed). A peek
        # that read storage before that may have seen a message whose receipt has just left
        # while the message is gone or going: its result is thrown away, never taken.
        self._generation = 0

    def __len__(self) -> int:
        return len(self._receipts)

    def snapshot(self) -> tuple[frozenset[Hashable], int]:
        """The receipts a peek must skip, and the generation to hand back to :meth:`take`."""
        with self._lock:
            return frozenset(self._receipts), self._generation

    def take(self, found: list[tuple[Hashable, Claimed]], generation: int) -> list[Claimed] | None:
        """Hold the receipts of a peek's messages; return the messages to deliver.

        ``None`` when receipts left since the peek's :meth:`snapshot` (its result may include
        a message already delivered and removed): the caller delivers nothing and peeks again.
        """
        with self._lock:
            if generation != self._generation:
                return None
            taken: list[Claimed] = []
            for receipt, message in found:
                if receipt not in self._receipts:
                    self._receipts[receipt] = None
                    taken.append(message)
            return taken

    def pending(self) -> tuple[Hashable, ...]:
        """The receipts to remove from storage, oldest first."""
        with self._lock:
            return tuple(self._receipts)

    def removed(self, receipts: tuple[Hashable, ...]) -> None:
        """Storage no longer holds these: forget them."""
        with self._lock:
            for receipt in receipts:
                self._receipts.pop(receipt, None)
            self._generation += 1

    async def remove_from(self, storage: Peeks) -> None:
        """Remove every held message from ``storage``, then forget them. If the removal
        fails (DriverError, or a cancellation), they stay held."""
        receipts = self.pending()
        if receipts:
            await storage.remove(receipts)
            self.removed(receipts)

    def clear(self) -> None:
        """Storage was flushed: every held message is gone with the rest."""
        with self._lock:
            self._receipts.clear()
            self._generation += 1
