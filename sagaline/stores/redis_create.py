"""Creating a saga on the Redis store, with its idempotency key.

A saga lives in the bucket of its id, its idempotency key in the bucket of (name,
key) (redis_layout.py): on Redis Cluster those are two hash slots, so no one script
can check the key and create the saga. The key is settled first, then the saga is
created, and an `aborted` mark fences out a creator that lost its key:

1. reserve: the key is set to our id unless it names a saga already (SET NX).
2. If it names our id, create the saga; the create script writes nothing when the id
   is marked aborted, and we read the key again.
3. If it names another id whose saga exists, that saga is the answer. If that saga
   does not exist (its creator is between steps 1 and 2, died there, or the saga was
   deleted), wait up to `OWNER_GRACE` seconds for it; then mark its id aborted
   (only if the saga still does not exist: one script in the saga's bucket), which
   makes its creation impossible, and move the key from that id to ours (a
   compare-and-set), and go to 2.

Every saga that is created held the key when it was created, and no one takes the
key from a saga that exists: one key, one saga, as with the single-script create.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from ..exceptions import StoreError
from ..records import Event, SagaRecord, SagaState
from .redis_payloads import create_payload

if TYPE_CHECKING:
    from .redis import RedisStore

# How long the saga named by a key may take to appear before its creation is aborted.
OWNER_GRACE = 2.0
_POLL = 0.02
_ROUNDS = 20


def insert_saga(
    store: RedisStore, state: SagaState, events: list[Event]
) -> tuple[SagaRecord, bool]:
    saga = state.saga
    sid = saga.saga_id
    layout = store.layout
    body = json.dumps(create_payload(layout, state, events))

    def create() -> bool:
        return int(store.scripts.create(keys=[layout.saga_key(sid)], args=[body])) == 1

    if saga.idempotency_key is None:
        if store._retrying(create):
            return saga, True
        raise StoreError(f"saga id {sid!r} was given up (it lost an idempotency key): use another")
    idem = layout.idem_key(saga.name, saga.idempotency_key)

    def idem_call(*args: str) -> str:
        return str(store._retrying(lambda: store.scripts.idem(keys=[idem], args=list(args))))

    owner = idem_call("reserve", sid)
    for _ in range(_ROUNDS):
        if owner == sid:
            if store._retrying(create):
                return saga, True
            # Aborted: another creator took the key; it names that one's saga now.
            owner = idem_call("reserve", sid)
            if owner == sid:
                break
            continue
        existing = _wait_for(store, owner)
        if existing is not None:
            return existing, False
        if _abort(store, owner):
            owner = idem_call("take", owner, sid)
        # else: the owner's saga was created just now; the next round returns it
    raise StoreError(
        f"idempotency key {saga.idempotency_key!r} of {saga.name!r}: no saga could be "
        f"created or found for it (last owner {owner!r})"
    )


def _wait_for(store: RedisStore, saga_id: str) -> SagaRecord | None:
    """The saga, once it exists, waiting up to OWNER_GRACE seconds; None if it never did."""
    deadline = time.monotonic() + OWNER_GRACE
    while True:
        found = store._get_saga(saga_id)
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(_POLL)


def _abort(store: RedisStore, saga_id: str) -> bool:
    """Make saga `saga_id` impossible to create; False when it exists."""
    keys = [store.layout.saga_key(saga_id), store.layout.aborted_key(saga_id)]
    return bool(store._retrying(lambda: int(store.scripts.abort(keys=keys)) == 1))
