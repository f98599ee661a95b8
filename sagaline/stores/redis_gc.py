"""Retention on the Redis store (retention.py): `Store.gc`'s steps for the bucketed
layout of redis_layout.py, on a single Redis and on Redis Cluster alike.

Candidates come from the status indexes (name and status with a name) of every
bucket, scored by created_at: a saga that ended before the cutoff was created
before it, so the scan of an index stops at the cutoff; a saga created earlier but
still running or ended later is read and passed over. The indexes are scanned one
after the other (statuses in order, buckets in order), and the cursor is (index
position, score, saga id) of the last saga looked at. A saga's children are the
members of `parent_index(b, saga)` of every bucket b (a child is indexed in its own
bucket), read with their statuses by one script per bucket for many parents at once,
all in one pipeline.

Deleting: a tree spans buckets, and a script may touch one bucket only (one hash
slot), so a tree cannot be deleted by one atomic script. Every saga of the
batch is read first (hash, steps), and a tree goes on only if each of its sagas
still has the status it was gathered with and the rule still accepts its root.
Then, level by level:

1. the roots, by one script per bucket (redis_lua/gc.lua) that deletes a saga
   only if it still exists and its `txn` counter is the one read (no transact
   wrote it since);
2. the children of the roots that were deleted, the same way; then their
   children, and so on: a saga is deleted only after its parent was.

The root goes first because a kept root may be resumed or rolled back, and must
then find every child it compensates: deleting children first could leave a root
(which changed meanwhile and is kept) without them. A child that changed between
the read and its own script is kept instead, with its subtree: its parent is gone,
so it is a root now, and a later gc looks at it as such. It is harmless, and
nothing is ever deleted under a saga that is kept.

Each saga's script removes its own keys (saga_keys, its `aborted` mark) and every
index entry naming it or its steps (Layout.entries_of, computed from the fields
read: name, status, parent, each step's owner node; the txn check makes sure they
are still those). Its idempotency key is in the bucket of (name, key), another
slot: once the saga is gone, a compare-and-delete script per bucket
(redis_lua/release_idem.lua) deletes each key that still names its deleted saga.
In that order, a saga that was kept never loses its key; a creator that finds the
key naming the deleted saga in between takes it over as from a saga that was never
created (redis_create.py). The counts reported are those of the sagas the scripts
deleted.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..states import SagaStatus
from . import redis_scripts as scripts
from .redis_layout import Layout, score
from .retention import MAX_TREE_DEPTH, GcRemoved, GcRule, GcTree, removed_of

if TYPE_CHECKING:
    from .redis import RedisStore

# Sagas per script call: Redis runs nothing else while a script runs, so a bucket's
# share of a batch is deleted by several short scripts rather than one long one.
SCRIPT_SAGAS = 100
_READ = ("status", "finished_at", "updated_at", "parent_saga_id")
_FIELDS = (
    "status", "name", "parent_saga_id", "idempotency_key", "finished_at", "updated_at", "txn"
)  # fmt: skip


# -- candidates and trees ---------------------------------------------------------------


def candidates(
    store: RedisStore, rule: GcRule, name: str | None, limit: int, after: str | None
) -> tuple[list[tuple[str, SagaStatus]], str | None]:
    layout = store.layout
    indexes = [
        layout.status_index(b, s) if name is None else layout.name_status_index(b, s, name)
        for s in sorted(s.value for s in rule.statuses)
        for b in layout.all_buckets()
    ]
    i, lo, last = json.loads(after) if after else (0, None, None)
    hi, page, found = "(" + score(rule.cutoff), max(limit, 100), []
    while i < len(indexes):
        rows, exhausted = _page_after(store, indexes[i], lo, last, hi, page)
        for (sid, created), status in zip(rows, _roots(store, rule, rows), strict=True):
            lo, last = created, sid
            if status is not None:
                found.append((sid, status))
                if len(found) == limit:
                    return found, json.dumps([i, lo, last])
        if exhausted:
            i, lo, last = i + 1, None, None
    return found, None


def _page_after(
    store: RedisStore, key: str, lo: str | None, last: str | None, hi: str, page: int
) -> tuple[list[tuple[str, str]], bool]:
    """Up to `page` (member, score) of index `key` after (lo, last), by score then
    member, and whether that is the end of the index below `hi`."""
    offset = 0
    while True:
        rows = store._client.zrange(
            key, "-inf" if lo is None else lo, hi, byscore=True, withscores=True,
            offset=offset, num=page,
        )  # fmt: skip
        out = [(str(m), score(s)) for m, s in rows]
        # Members tied on the cursor's score come in member order: skip those seen.
        fresh = [r for r in out if lo is None or r[1] != lo or r[0] > str(last)]
        if fresh or len(out) < page:
            return fresh, len(out) < page
        offset += page


def _roots(store: RedisStore, rule: GcRule, rows: list[tuple[str, str]]) -> list[SagaStatus | None]:
    """For each saga of `rows`, its status if it is a root that `rule` accepts, else None."""
    layout = store.layout
    pipe = store._client.pipeline(transaction=False)
    for sid, _ in rows:
        pipe.hmget(layout.saga_key(sid), *_READ)
    read: list[list[Any]] = [[v if v is None else json.loads(v) for v in r] for r in pipe.execute()]
    for status, _, _, parent in read:
        if status is not None and parent is not None:
            pipe.exists(layout.saga_key(parent))
    parents = iter(pipe.execute())
    out: list[SagaStatus | None] = []
    for status, finished_at, updated_at, parent in read:
        if status is None:
            out.append(None)  # deleted meanwhile
            continue
        orphan = parent is None or not next(parents)
        ok = orphan and rule.qualifies(SagaStatus(status), finished_at, float(updated_at))
        out.append(SagaStatus(status) if ok else None)
    return out


def children(store: RedisStore, ids: list[str]) -> list[tuple[str, str, SagaStatus]]:
    """One script per bucket (and per SCRIPT_SAGAS parents) reads the bucket's children
    of `ids` with their statuses (redis_lua/children.lua); all in one pipeline. EVAL,
    not a registered script: redis-py's cluster pipeline refuses EVALSHA."""
    layout = store.layout
    pipe = store._client.pipeline(transaction=False)
    parts = []
    for b in layout.all_buckets():
        for n in range(0, len(ids), SCRIPT_SAGAS):
            part = ids[n : n + SCRIPT_SAGAS]
            keys = [layout.parent_index(b, sid) for sid in part]
            pipe.execute_command(
                "EVAL", scripts.CHILDREN, len(keys), *keys, layout.saga_key_prefix(b)
            )
            parts.append(part)
    return [
        (part[int(i) - 1], str(child), SagaStatus(json.loads(status)))
        for part, flat in zip(parts, pipe.execute(), strict=True)
        for i, child, status in zip(flat[0::3], flat[1::3], flat[2::3], strict=True)
    ]


def count(store: RedisStore, trees: list[GcTree]) -> GcRemoved:
    layout = store.layout
    pipe = store._client.pipeline(transaction=False)
    for sid in (sid for t in trees for sid in t.sagas):
        pipe.zcard(layout.steps_key(sid))
        pipe.llen(layout.events_key(sid))
    counts = pipe.execute()
    return removed_of(trees, sum(counts[0::2]), sum(counts[1::2]))


# -- deleting ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Saga:
    """What deleting a saga needs of it, as read just before."""

    saga_id: str
    status: SagaStatus
    name: str
    parent_saga_id: str | None
    idempotency_key: str | None
    finished_at: float | None
    updated_at: float
    txn: str
    steps: list[tuple[str, str | None]]  # (name, owner_node) of each step


@dataclass(frozen=True)
class _Plan:
    """One saga to delete: as read, and what its script checks and removes."""

    saga: _Saga
    payload: dict[str, Any]


def delete(store: RedisStore, trees: list[GcTree], rule: GcRule) -> GcRemoved:
    layout = store.layout
    read = _read(store, [sid for t in trees for sid in t.sagas])
    plans: dict[str, _Plan] = {}
    roots: list[str] = []
    for tree in trees:
        planned = _plan_tree(layout, tree, rule, read)
        if planned is not None:
            plans.update(planned)
            roots.append(tree.root)
    removed = GcRemoved()
    done: list[_Plan] = []
    level, seen = roots, set(roots)
    for depth in range(MAX_TREE_DEPTH + 1):
        if not level:
            break
        gone = _delete_level(store, [plans[sid] for sid in level], removed)
        if depth == 0:
            removed.trees = len(gone)
        done += [plans[sid] for sid in level if sid in gone]
        level = [
            sid
            for sid, plan in plans.items()
            if sid not in seen and plan.saga.parent_saga_id in gone
        ]
        seen.update(level)
    _release_idempotency_keys(store, [p.saga for p in done])
    return removed


def _read(store: RedisStore, ids: list[str]) -> dict[str, _Saga]:
    """Each saga of `ids` that exists, as it is now: the fields its index entries
    depend on (redis_layout.Layout.entries_of), its key and its `txn` counter."""
    layout = store.layout
    pipe = store._client.pipeline(transaction=False)
    for sid in ids:
        pipe.hmget(layout.saga_key(sid), *_FIELDS)
        pipe.zrange(layout.steps_key(sid), 0, -1)
    replies = pipe.execute()
    names: list[list[str]] = [[str(n) for n in r] for r in replies[1::2]]
    for sid, steps in zip(ids, names, strict=True):
        for step in steps:
            pipe.hget(layout.step_key(sid, step), "owner_node")
    owners = iter(pipe.execute())
    out = {}
    for sid, values, steps in zip(ids, replies[0::2], names, strict=True):
        nodes = [None if n is None else json.loads(n) for n in (next(owners) for _ in steps)]
        if values[0] is None:
            continue  # deleted meanwhile
        status, name, parent, key, finished_at, updated_at = (json.loads(v) for v in values[:6])
        txn = "0" if values[6] is None else str(values[6])
        out[sid] = _Saga(
            sid, SagaStatus(status), name, parent, key, finished_at, float(updated_at), txn,
            list(zip(steps, nodes, strict=True)),
        )  # fmt: skip
    return out


def _plan_tree(
    layout: Layout,
    tree: GcTree,
    rule: GcRule,
    read: dict[str, _Saga],
) -> dict[str, _Plan] | None:
    """The plans of a tree's sagas; None when one of them is gone or no longer in the
    status it was gathered with, or `rule` no longer accepts the root."""
    plans = {}
    for sid, expected in tree.sagas.items():
        saga = read.get(sid)
        if saga is None or saga.status is not expected:
            return None
        if sid == tree.root and not rule.qualifies(expected, saga.finished_at, saga.updated_at):
            return None
        entries = layout.entries_of(sid, saga.name, expected.value, saga.parent_saga_id, saga.steps)
        payload = {
            "txn": saga.txn,
            "steps_key": layout.steps_key(sid),
            "events_key": layout.events_key(sid),
            "zrem": [list(e) for e in entries],
            "unlink": [
                *layout.saga_keys(sid, (step for step, _ in saga.steps)),
                layout.aborted_key(sid),
            ],
        }
        plans[sid] = _Plan(saga, payload)
    return plans


def _delete_level(store: RedisStore, plans: list[_Plan], removed: GcRemoved) -> set[str]:
    """Delete `plans` by one script per bucket (and per SCRIPT_SAGAS sagas); count
    what went in `removed`; the ids that went."""
    layout = store.layout
    by_bucket: dict[int, list[_Plan]] = defaultdict(list)
    for plan in plans:
        by_bucket[layout.bucket_of(plan.saga.saga_id)].append(plan)
    gone: set[str] = set()
    for group in by_bucket.values():
        for n in range(0, len(group), SCRIPT_SAGAS):
            part = group[n : n + SCRIPT_SAGAS]
            keys = [layout.saga_key(p.saga.saga_id) for p in part]
            body = json.dumps([p.payload for p in part])
            reply = json.loads(store.scripts.gc(keys=keys, args=[body]))
            for plan, (deleted, steps, events) in zip(part, reply, strict=True):
                if deleted:
                    gone.add(plan.saga.saga_id)
                    removed.add_saga(plan.saga.status)
                    removed.steps += steps
                    removed.events += events
    return gone


def _release_idempotency_keys(store: RedisStore, sagas: list[_Saga]) -> None:
    """Delete the idempotency key of each deleted saga that still names it."""
    layout = store.layout
    by_bucket: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for saga in sagas:
        if saga.idempotency_key is not None:
            key = layout.idem_key(saga.name, saga.idempotency_key)
            by_bucket[layout.idem_bucket(saga.name, saga.idempotency_key)].append(
                (key, saga.saga_id)
            )
    for group in by_bucket.values():
        for n in range(0, len(group), SCRIPT_SAGAS):
            part = group[n : n + SCRIPT_SAGAS]
            store.scripts.release_idem(keys=[k for k, _ in part], args=[s for _, s in part])
