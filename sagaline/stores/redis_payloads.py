"""The payloads of the Redis store's write scripts (redis_scripts.py): which hashes to
set, which index entries to add and remove, and which versions to check, for a new
saga or for a decision. Every key named is in the saga's bucket (redis_layout.py),
so each script touches one hash slot of a Redis Cluster."""

from __future__ import annotations

from typing import Any

from ..records import Decision, Event, SagaRecord, SagaState
from ..states import SAGA_TERMINAL
from .redis_layout import Layout
from .redis_layout import due_member as _due_member
from .redis_layout import ended_message as _ended_message
from .redis_layout import event_json as _event_json
from .redis_layout import fields as _fields
from .redis_layout import score as _score


def create_payload(layout: Layout, state: SagaState, events: list[Event]) -> dict[str, Any]:
    """What the create script writes for a new saga: its hashes, events and index entries.
    (Its idempotency key, in another bucket, is reserved first: redis_create.py.)"""
    saga = state.saga
    sid = saga.saga_id
    b = layout.bucket_of(sid)
    payload: dict[str, Any] = {
        "saga_key": layout.saga_key(sid),
        "saga_id": sid,
        "aborted_key": layout.aborted_key(sid),
        "events_key": layout.events_key(sid),
        "events": [_event_json(e) for e in events],
        "hset": [[layout.saga_key(sid), [*_fields(saga), "txn", "0"]]],
        "zrem": [],
        "zadd": [],
    }
    created = _score(saga.created_at)
    zadd = payload["zadd"]
    zadd += [
        [layout.created_index(b), created, sid],
        [layout.name_index(b, saga.name), created, sid],
        *status_entries(layout, saga, created),
    ]
    if saga.parent_saga_id is not None:
        zadd.append([layout.parent_index(b, saga.parent_saga_id), created, sid])
    if saga.due_at is not None:
        zadd.append([layout.due_key(b), _score(saga.due_at), sid])
    for s in state.steps.values():
        payload["hset"].append([layout.step_key(sid, s.name), _fields(s)])
        zadd.append([layout.steps_key(sid), str(s.position), s.name])
        if s.due_at is not None:
            zadd.append([layout.due_key(b), _score(s.due_at), _due_member(sid, s.name)])
    return payload


def decision_payload(layout: Layout, state: SagaState, txn: str, d: Decision) -> dict[str, Any]:
    """What the write script checks and writes for a decision made on `state`."""
    sid = state.saga.saga_id
    b = layout.bucket_of(sid)
    expect: list[list[str]] = []
    hset: list[Any] = []
    zrem: list[list[str]] = []
    zadd: list[list[str]] = []
    saga_fields: list[str] = []
    if d.saga is not None:
        key = layout.saga_key(sid)
        expect.append([key, str(d.saga_version)])
        saga_fields = _fields(d.saga, version=d.saga_version + 1)
        hset.append([key, saga_fields])
        # The version check proves the stored status is the one read here.
        old = state.saga
        if old.status is not d.saga.status:
            zrem += [[k, sid] for k, _, _ in status_entries(layout, old, "")]
            zadd += status_entries(layout, d.saga, _score(d.saga.created_at))
        if d.saga.due_at is None:
            zrem.append([layout.due_key(b), sid])
        else:
            zadd.append([layout.due_key(b), _score(d.saga.due_at), sid])
    for s in d.steps:
        key = layout.step_key(sid, s.name)
        version = d.expected_version(s)
        expect.append([key, str(version)])
        hset.append([key, _fields(s, version=version + 1)])
        member = _due_member(sid, s.name)
        was = state.steps.get(s.name)
        if (
            was is not None
            and was.owner_node is not None
            and was.running_phase is not None
            and s.running_phase is None
        ):
            # The claim ends here (the version check proves `was` is current).
            zrem.append([layout.claims_key(b, was.owner_node), member])
        if s.due_at is None:
            zrem.append([layout.due_key(b), member])
        else:
            zadd.append([layout.due_key(b), _score(s.due_at), member])
    # Versions of steps the decision read but does not change are checked too.
    changed = {s.name for s in d.steps}
    expect += [
        [layout.step_key(sid, n), str(v)] for n, v in d.step_versions.items() if n not in changed
    ]
    payload = {
        "saga_key": layout.saga_key(sid),
        "expect": expect,
        "hset": hset,
        "zrem": zrem,
        "zadd": zadd,
        "events_key": layout.events_key(sid),
        "events": [_event_json(e) for e in d.events],
    }
    if hset:
        payload["txn"] = txn
    if d.saga is not None and d.saga.status in SAGA_TERMINAL:
        # Wake the callers waiting in get() (finished.py) when the script runs: with
        # the saga's hash as the script writes it, when it fits, and by its id.
        ended = _ended_message(sid, saga_fields)
        if ended is not None:
            payload["ended"] = [layout.ended_channel(), ended]
        payload["finished"] = [layout.finished_channel(), sid]
    return payload


def status_entries(layout: Layout, saga: SagaRecord, score: str) -> list[list[str]]:
    status = saga.status.value
    b = layout.bucket_of(saga.saga_id)
    return [
        [layout.status_index(b, status), score, saga.saga_id],
        [layout.name_status_index(b, status, saga.name), score, saga.saga_id],
    ]
