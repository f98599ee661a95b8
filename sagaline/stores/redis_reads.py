"""The Redis store's reads across sagas: lists, counts, due work and a node's claims.

Each index is split into the store's buckets (redis_layout.py): a read asks every
bucket, in one pipeline (on Redis Cluster, one request per node), and merges the
answers in the order one index would have given them: scores, then members.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any

from ..records import SagaFilter, SagaRecord, StepRecord
from ..states import SagaStatus
from .base import DueItem, matches_filter
from .redis_layout import Layout
from .redis_layout import chunks as _chunks
from .redis_layout import saga_record as _saga_record
from .redis_layout import score as _score
from .redis_layout import step_record as _step_record

Rows = list[tuple[str, float]]


def get_sagas(client: Any, layout: Layout, ids: list[str]) -> list[SagaRecord]:
    pipe = client.pipeline(transaction=False)
    for sid in ids:
        pipe.hgetall(layout.saga_key(sid))
    return [_saga_record(h) for h in pipe.execute() if h]  # skip deleted sagas


def list_sagas(client: Any, layout: Layout, flt: SagaFilter) -> list[SagaRecord]:
    if flt.limit <= 0:
        return []
    lo = "-inf" if flt.created_after is None else _score(flt.created_after)
    hi = "+inf" if flt.created_before is None else "(" + _score(flt.created_before)
    if flt.before is not None and (
        flt.created_before is None or flt.before[0] < flt.created_before
    ):
        hi = _score(flt.before[0])  # inclusive: ties are cut by saga id in matches_filter
    sources = list_sources(layout, flt)
    page = max(50, min(flt.offset + flt.limit, 500))

    def rows(key: str, offset: int) -> Any:
        return client.zrange(
            key, hi, lo, desc=True, byscore=True, withscores=True, offset=offset, num=page
        )

    # A short first page of every index (a bucket holds about 1/N of the matches) in
    # one pipeline; further pages when the merge needs them.
    first = min(page, (flt.offset + flt.limit) // layout.buckets + 10)
    pipe = client.pipeline(transaction=False)
    for key in sources:
        pipe.zrange(key, hi, lo, desc=True, byscore=True, withscores=True, offset=0, num=first)
    firsts = pipe.execute()

    def index_desc(key: str, batch: Rows) -> Iterator[tuple[float, str]]:
        start, asked = 0, first
        while True:
            yield from ((float(score), str(member)) for member, score in batch)
            if len(batch) < asked:
                return
            start, asked = start + asked, page
            batch = rows(key, start)

    # Each index yields newest first (ties by id, descending, like the SQL store);
    # merging them keeps that order. Records are re-checked against the filter
    # because a saga may change status between the two reads.
    merged = heapq.merge(
        *(index_desc(k, f) for k, f in zip(sources, firsts, strict=True)), reverse=True
    )
    out: list[SagaRecord] = []
    seen: set[str] = set()
    skip = flt.offset
    for batch in _chunks((sid for _, sid in merged), page):
        fresh = [s for s in dict.fromkeys(batch) if s not in seen]
        for saga in get_sagas(client, layout, fresh):
            seen.add(saga.saga_id)
            if not matches_filter(saga, flt):
                continue
            if skip:
                skip -= 1
                continue
            out.append(saga)
            if len(out) == flt.limit:
                return out
    return out


def list_sources(layout: Layout, flt: SagaFilter) -> list[str]:
    """The smallest set of indexes whose union holds every match, in every bucket."""
    buckets = layout.all_buckets()
    if flt.parent_saga_id is not None:  # children of one saga: few, filter the rest
        parent = flt.parent_saga_id
        return [layout.parent_index(b, parent) for b in buckets]
    if flt.status is not None:
        statuses = sorted({s.value for s in flt.status})
        if flt.name is not None:
            name = flt.name
            return [layout.name_status_index(b, s, name) for s in statuses for b in buckets]
        return [layout.status_index(b, s) for s in statuses for b in buckets]
    if flt.name is not None:
        name = flt.name
        return [layout.name_index(b, name) for b in buckets]
    return [layout.created_index(b) for b in buckets]


def count_by_status(client: Any, layout: Layout, name: str | None) -> dict[SagaStatus, int]:
    pipe = client.pipeline(transaction=False)
    for s in SagaStatus:
        for b in layout.all_buckets():
            if name is None:
                pipe.zcard(layout.status_index(b, s.value))
            else:
                pipe.zcard(layout.name_status_index(b, s.value, name))
    counts = iter(pipe.execute())
    return {s: sum(int(next(counts)) for _ in layout.all_buckets()) for s in SagaStatus}


def _merged_firsts(client: Any, keys: list[str], lo: str, hi: str, *, limit: int) -> Rows:
    """The first `limit` members scored lo..hi of the union of sorted sets `keys`
    (disjoint), in (score, member) order: each set's first `limit`, merged."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.zrange(key, lo, hi, byscore=True, withscores=True, offset=0, num=limit)
    per_key = [[(float(score), str(member)) for member, score in rows] for rows in pipe.execute()]
    return [(member, score) for score, member in heapq.merge(*per_key)][:limit]


def find_due(client: Any, layout: Layout, now: float, limit: int) -> list[DueItem]:
    keys = [layout.due_key(b) for b in layout.all_buckets()]
    items = []
    for member, score in _merged_firsts(client, keys, "-inf", _score(now), limit=limit):
        saga_id, _, step = member.partition("\0")
        items.append(DueItem(saga_id, step or None, score))
    return items


def find_claimed(client: Any, layout: Layout, node: str, limit: int) -> list[StepRecord]:
    keys = [layout.claims_key(b, node) for b in layout.all_buckets()]
    members = _merged_firsts(client, keys, "-inf", "+inf", limit=limit)
    pipe = client.pipeline(transaction=False)
    for member, _ in members:
        saga_id, _, step = member.partition("\0")
        pipe.hgetall(layout.step_key(saga_id, step))
    found = [_step_record(h) for h in pipe.execute() if h]
    # Re-checked: a claim may have ended between the two reads.
    return [r for r in found if r.owner_node == node and r.running_phase is not None]
