"""What each claim of this process read, kept for the claim's completion.

A step's claim (PostgreSQL, Redis) reads the saga and its steps as they are after
the claim, in the same round trip; the completion that follows in this process
decides on that read instead of reading the saga again, so that a step costs two
round trips, the claim and the completion's write, instead of three.

Deciding on it is deciding on an older read, without the saga's lock: the write
checks the saga's version (Redis: its `txn` counter) and the versions of the
records it changes, and loses (the caller reads again, under the lock) if another
decision, or a renewal of the claim, wrote meanwhile. Every write of a decision
moves the saga's version on for that reason. A read is taken once; the oldest are
dropped beyond `limit` (claims whose body never completes in this process).
"""

from __future__ import annotations

from typing import Generic, TypeVar

from ..forking import child_safe_lock

T = TypeVar("T")

# Claims whose read is kept for their completion.
CLAIMS_KEPT = 256


class KeptClaims(Generic[T]):
    def __init__(self, limit: int = CLAIMS_KEPT):
        self.limit = limit
        self._lock = child_safe_lock()
        self._by_saga: dict[str, T] = {}

    def keep(self, saga_id: str, read: T) -> None:
        with self._lock:
            self._by_saga.pop(saga_id, None)  # the newest last
            self._by_saga[saga_id] = read
            while len(self._by_saga) > self.limit:
                del self._by_saga[next(iter(self._by_saga))]

    def take(self, saga_id: str) -> T | None:
        with self._lock:
            return self._by_saga.pop(saga_id, None)

    def clear(self) -> None:
        with self._lock:
            self._by_saga.clear()
