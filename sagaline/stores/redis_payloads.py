"""The payloads of the Redis store's write scripts (redis_scripts.py): which hashes to
set, which index entries to add and remove, and which versions to check, for a new
saga or for a decision. Keys follow redis_layout.py; `key_of` joins the store's prefix
and a key's parts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..records import Decision, Event, SagaRecord, SagaState
from ..states import SAGA_TERMINAL
from .redis_layout import due_member as _due_member
from .redis_layout import event_json as _event_json
from .redis_layout import fields as _fields
from .redis_layout import key_part as _key_part
from .redis_layout import score as _score

Key = Callable[..., str]


def create_payload(key_of: Key, state: SagaState, events: list[Event]) -> dict[str, Any]:
    """What the create script writes for a new saga: its hashes, events and index entries."""
    saga = state.saga
    sid = saga.saga_id
    payload: dict[str, Any] = {
        "saga_key": key_of("saga", sid),
        "saga_id": sid,
        "events_key": key_of("events", sid),
        "events": [_event_json(e) for e in events],
        "hset": [[key_of("saga", sid), [*_fields(saga), "txn", "0"]]],
        "zrem": [],
        "zadd": [],
    }
    if saga.idempotency_key is not None:
        payload["idem_key"] = key_of("idem", _key_part(saga.name), saga.idempotency_key)
    created = _score(saga.created_at)
    zadd = payload["zadd"]
    zadd += [
        [key_of("idx", "created"), created, sid],
        [key_of("idx", "name", saga.name), created, sid],
        *status_entries(key_of, saga, created),
    ]
    if saga.parent_saga_id is not None:
        zadd.append([key_of("idx", "parent", saga.parent_saga_id), created, sid])
    if saga.due_at is not None:
        zadd.append([key_of("due"), _score(saga.due_at), sid])
    for s in state.steps.values():
        payload["hset"].append([key_of("step", sid, s.name), _fields(s)])
        zadd.append([key_of("steps", sid), str(s.position), s.name])
        if s.due_at is not None:
            zadd.append([key_of("due"), _score(s.due_at), _due_member(sid, s.name)])
    return payload


def decision_payload(key_of: Key, state: SagaState, txn: str, d: Decision) -> dict[str, Any]:
    """What the write script checks and writes for a decision made on `state`."""
    sid = state.saga.saga_id
    expect: list[list[str]] = []
    hset: list[Any] = []
    zrem: list[list[str]] = []
    zadd: list[list[str]] = []
    if d.saga is not None:
        key = key_of("saga", sid)
        expect.append([key, str(d.saga_version)])
        hset.append([key, _fields(d.saga, version=d.saga_version + 1)])
        # The version check proves the stored status is the one read here.
        old = state.saga
        if old.status is not d.saga.status:
            zrem += [[k, sid] for k, _, _ in status_entries(key_of, old, "")]
            zadd += status_entries(key_of, d.saga, _score(d.saga.created_at))
        if d.saga.due_at is None:
            zrem.append([key_of("due"), sid])
        else:
            zadd.append([key_of("due"), _score(d.saga.due_at), sid])
    for s in d.steps:
        key = key_of("step", sid, s.name)
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
            zrem.append([key_of("claims", was.owner_node), member])
        if s.due_at is None:
            zrem.append([key_of("due"), member])
        else:
            zadd.append([key_of("due"), _score(s.due_at), member])
    # Versions of steps the decision read but does not change are checked too.
    changed = {s.name for s in d.steps}
    expect += [
        [key_of("step", sid, n), str(v)] for n, v in d.step_versions.items() if n not in changed
    ]
    payload = {
        "saga_key": key_of("saga", sid),
        "expect": expect,
        "hset": hset,
        "zrem": zrem,
        "zadd": zadd,
        "events_key": key_of("events", sid),
        "events": [_event_json(e) for e in d.events],
    }
    if hset:
        payload["txn"] = txn
    if d.saga is not None and d.saga.status in SAGA_TERMINAL:
        # Wakes the callers waiting in get() (finished.py) when the script runs.
        payload["finished"] = [key_of("finished"), sid]
    return payload


def status_entries(key_of: Key, saga: SagaRecord, score: str) -> list[list[str]]:
    status = saga.status.value
    return [
        [key_of("idx", "status", status), score, saga.saga_id],
        [key_of("idx", "ns", status, saga.name), score, saga.saga_id],
    ]
