"""The Redis store's key layout, and how records are encoded in it.

Layout (every key starts with `prefix`, default "sagaline"; every hash field holds JSON)::

    {p}:saga:<id>            hash    one field per SagaRecord attribute (`version` included),
                                     and `txn`, the count of `transact` writes to the saga
    {p}:step:<id>:<step>     hash    one field per StepRecord attribute (`version` included)
    {p}:steps:<id>           zset    the saga's step names scored by position
    {p}:events:<id>          list    the history, JSON per event; an event's seq is its
                                     1-based index (RPUSH returns it inside the same script)
    {p}:idem:<name>:<key>    string  id of the saga that owns an idempotency key (':' and
                                     '%' in the name percent-encoded)
    {p}:idx:created          zset    every saga id, scored by created_at
    {p}:idx:status:<S>       zset    ids of sagas in status S, by created_at
    {p}:idx:name:<name>      zset    ids of sagas of one name, by created_at
    {p}:idx:ns:<S>:<name>    zset    both filters at once (filtered lists, counts per name)
    {p}:idx:parent:<id>      zset    child sagas of a saga, by created_at
    {p}:due                  zset    `<id>` (a saga) and `<id>\\0<step>` scored by due_at:
                                     what the sweeper must look at, read in O(due work)
    {p}:claims:<node>        zset    `<id>\\0<step>` of the RUNNING claims made by processes of
                                     Celery node <node>, scored by the claim's first lease:
                                     added by the claim, removed by the transition that
                                     ends it (in the same script)

No key is ever given a TTL: a saga stays until someone deletes it (an expiring
record silently loses long-running or stuck sagas).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from ..records import Event, SagaRecord, StepRecord
from .rows import from_row, to_row


def score(x: float) -> str:
    # repr keeps every digit of a timestamp; Redis parses it (and 'inf') as a score.
    return repr(float(x))


def key_part(name: str) -> str:
    """A saga name inside a key that has more after it: ':' (and '%', the escape) are
    percent-encoded, so that name "a:b" with key "c" and name "a" with key "b:c" do not
    share one key. Names without either character are unchanged."""
    return name.replace("%", "%25").replace(":", "%3A")


def due_member(saga_id: str, step: str) -> str:
    return f"{saga_id}\0{step}"


def fields(rec: SagaRecord | StepRecord, *, version: int | None = None) -> list[str]:
    """The record as flat hash field/value pairs, each value JSON."""
    row = to_row(rec)
    if version is not None:
        row["version"] = version
    return [part for name, value in row.items() for part in (name, json.dumps(value))]


def saga_record(h: dict[str, str]) -> SagaRecord:
    return from_row(SagaRecord, decoded(h))


def step_record(h: dict[str, str]) -> StepRecord:
    return from_row(StepRecord, decoded(h))


def decoded(h: dict[str, str]) -> dict[str, Any]:
    # `txn` is no record field, and fields written by a newer sagaline are unknown
    # here: from_row ignores both rather than failing on them.
    return {k: json.loads(v) for k, v in h.items() if k != "txn"}


def event_json(e: Event) -> str:
    # saga_id is the list's key and seq its index: neither is stored in the event.
    row = to_row(e)
    del row["saga_id"], row["seq"]
    row["detail"] = e.detail or {}
    return json.dumps(row)


def event_record(saga_id: str, seq: int, raw: str) -> Event:
    event = from_row(Event, {**json.loads(raw), "saga_id": saga_id, "seq": seq})
    event.detail = event.detail or {}
    return event


def chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
