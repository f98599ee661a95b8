"""Claims and lease renewals on the Redis store: one compare-and-set script on a step.

cas_step.lua moves the step to RUNNING only if its status and attempt are those
expected, and a claim's script then reads the saga as it is after the claim
(snapshot.lua), which the store keeps for the claim's completion
(kept_claims.py): a step then costs the claim and the completion's write, two
round trips, instead of a third to read the saga again.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import TYPE_CHECKING

from ..records import PHASE_COLUMNS, Event, Owner
from ..states import Phase
from .json_text import json_value
from .redis_cache import held_arg
from .redis_layout import due_member, event_json, score

if TYPE_CHECKING:
    from .redis import RedisStore


def claim(
    store: RedisStore,
    saga_id: str,
    step: str,
    phase: Phase,
    attempt: int,
    lease_until: float,
    now: float,
    owner: Owner | None,
) -> bool:
    """Store.claim_step."""
    cols = PHASE_COLUMNS[phase]
    # A compensation keeps the step's start time.
    extra = ["started_at", json_value(now)] if phase is Phase.FORWARD else []
    event = event_json(Event(saga_id, cols.started, now, step, attempt, phase.value))
    extra += [
        "owner_node",
        json_value(None if owner is None else owner.node),
        "owner_boot",
        json_value(None if owner is None else owner.boot),
        "owner_pid",
        json_value(None if owner is None else owner.pid),
    ]
    return _cas(
        store, saga_id, step, phase, attempt, cols.dispatched, lease_until, event, extra, owner
    )


def renew(
    store: RedisStore, saga_id: str, step: str, phase: Phase, attempt: int, lease_until: float
) -> bool:
    """Store.renew_lease."""
    running = PHASE_COLUMNS[phase].running
    return _cas(store, saga_id, step, phase, attempt, running, lease_until, "", [], None)


def _cas(
    store: RedisStore,
    saga_id: str,
    step: str,
    phase: Phase,
    attempt: int,
    expected: Enum,
    lease_until: float,
    event: str,
    extra: list[str],
    owner: Owner | None,
) -> bool:
    """Move the step from `expected`(attempt) to RUNNING on the phase's fields; a claim
    (an `event` to append) keeps the saga as the script read it after the move."""
    cols = PHASE_COLUMNS[phase]
    layout = store.layout
    b = layout.bucket_of(saga_id)
    keys = [
        layout.step_key(saga_id, step),
        layout.due_key(b),
        layout.events_key(saga_id),
        layout.saga_key(saga_id),
        layout.steps_key(saga_id),
    ]
    if owner is not None:
        keys.append(layout.claims_key(b, owner.node))
    read = bool(event)
    sent = store._steps_held.known_versions(saga_id) if read else {}
    args = [
        cols.status,
        json_value(expected.value),
        cols.attempt,
        json_value(attempt),
        json_value(cols.running.value),
        json_value(lease_until),
        score(lease_until),
        due_member(saga_id, step),
        event,
        json.dumps(extra),
        layout.step_key_prefix(saga_id) if read else "",
        *([held_arg(sent)] if read else []),
    ]
    # A lost reply to a claim that did commit reads as a refused claim: the step
    # then stays RUNNING until its lease expires and the sweeper retries it.
    reply = store._retrying(lambda: store.scripts.cas_step(keys=keys, args=args))
    if isinstance(reply, int):
        return reply == 1
    if reply:
        store._claimed.keep(saga_id, (reply, sent))
    return True
