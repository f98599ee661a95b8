"""Retention on the Redis store (retention.py): `Store.gc`'s steps for the layout of
redis_layout.py. Reads go through pipelines; each batch is deleted by one script
(redis_lua/gc.lua) that re-checks every saga's `txn` counter first.

Candidates come from the status indexes, scored by created_at: a saga that ended
before the cutoff was created before it, so the scan stops at the cutoff; a saga
created earlier but still running or ended later is read and passed over. The
cursor is (index, score, saga id) of the last saga looked at.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..states import SagaStatus
from . import redis_scripts as scripts
from .redis_layout import due_member, key_part, score
from .retention import GcRemoved, GcRule, GcTree, removed_of

if TYPE_CHECKING:
    from .redis import RedisStore

# Trees per script call: Redis runs nothing else while a script runs, so a batch is
# deleted by several short scripts (each tree stays atomic) rather than one long one.
SCRIPT_TREES = 100
_READ = ("status", "finished_at", "updated_at", "parent_saga_id")
_OWNED = ("status", "name", "idempotency_key", "parent_saga_id", "txn")


def candidates(
    store: RedisStore, rule: GcRule, name: str | None, limit: int, after: str | None
) -> tuple[list[tuple[str, SagaStatus]], str | None]:
    statuses = sorted(s.value for s in rule.statuses)
    indexes = [
        store._key("idx", "status", s) if name is None else store._key("idx", "ns", s, name)
        for s in statuses
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
    pipe = store._client.pipeline(transaction=False)
    for sid, _ in rows:
        pipe.hmget(store._key("saga", sid), *_READ)
    read: list[list[Any]] = [[v if v is None else json.loads(v) for v in r] for r in pipe.execute()]
    for status, _, _, parent in read:
        if status is not None and parent is not None:
            pipe.exists(store._key("saga", parent))
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
    pipe = store._client.pipeline(transaction=False)
    for sid in ids:
        pipe.zrange(store._key("idx", "parent", sid), 0, -1)
    pairs = [(p, str(c)) for p, kids in zip(ids, pipe.execute(), strict=True) for c in kids]
    for _, child in pairs:
        pipe.hget(store._key("saga", child), "status")
    return [
        (parent, child, SagaStatus(json.loads(status)))
        for (parent, child), status in zip(pairs, pipe.execute(), strict=True)
        if status is not None
    ]


def count(store: RedisStore, trees: list[GcTree]) -> GcRemoved:
    pipe = store._client.pipeline(transaction=False)
    for sid in (sid for t in trees for sid in t.sagas):
        pipe.zcard(store._key("steps", sid))
        pipe.llen(store._key("events", sid))
    counts = pipe.execute()
    return removed_of(trees, sum(counts[0::2]), sum(counts[1::2]))


def delete(store: RedisStore, trees: list[GcTree], rule: GcRule) -> GcRemoved:
    ids = [sid for t in trees for sid in t.sagas]
    pipe = store._client.pipeline(transaction=False)
    for sid in ids:
        pipe.hmget(store._key("saga", sid), *_OWNED, "finished_at", "updated_at")
        pipe.zrange(store._key("steps", sid), 0, -1)
    replies = pipe.execute()
    read = {sid: (replies[2 * n], replies[2 * n + 1]) for n, sid in enumerate(ids)}
    planned = [(t, _plan(store, t, rule, read)) for t in trees]
    planned = [(t, plan) for t, plan in planned if plan is not None]
    if not planned:
        return GcRemoved()
    script = store._client.register_script(scripts.GC)
    result: list[list[int]] = []
    for n in range(0, len(planned), SCRIPT_TREES):
        body = json.dumps({"trees": [plan for _, plan in planned[n : n + SCRIPT_TREES]]})
        result += json.loads(script(args=[body]))
    gone = [t for (t, _), (deleted, _, _) in zip(planned, result, strict=True) if deleted]
    return removed_of(gone, sum(r[1] for r in result), sum(r[2] for r in result))


def _plan(
    store: RedisStore, tree: GcTree, rule: GcRule, read: dict[str, Any]
) -> list[dict[str, Any]] | None:
    """What the script checks and deletes for one tree; None when the tree is no longer
    as it was read, or `rule` no longer accepts its root."""
    plan = []
    for sid, expected in tree.sagas.items():
        fields, step_names = read[sid]
        if fields[0] is None or SagaStatus(json.loads(fields[0])) is not expected:
            return None
        values = [None if v is None else json.loads(v) for v in fields[1:4]]
        name, key, parent = str(values[0]), values[1], values[2]
        if sid == tree.root:
            finished_at, updated_at = json.loads(fields[5]), float(json.loads(fields[6]))
            if not rule.qualifies(expected, finished_at, updated_at):
                return None
        plan.append(owned_keys(store, sid, expected, name, key, parent, step_names))
        plan[-1]["txn"] = fields[4] or "0"
    return plan


def owned_keys(
    store: RedisStore,
    sid: str,
    status: SagaStatus,
    name: str,
    idempotency_key: str | None,
    parent: str | None,
    step_names: list[str],
) -> dict[str, Any]:
    """Every key and index entry a saga owns in the layout (redis_layout.py)."""
    k = store._key
    zrem = [
        [k("idx", "created"), sid],
        [k("idx", "status", status.value), sid],
        [k("idx", "name", name), sid],
        [k("idx", "ns", status.value, name), sid],
        [k("due"), sid],
        *([k("due"), due_member(sid, step)] for step in step_names),
    ]
    if parent is not None:
        zrem.append([k("idx", "parent", parent), sid])
    owned: dict[str, Any] = {
        "id": sid,
        "key": k("saga", sid),
        "steps_key": k("steps", sid),
        "events_key": k("events", sid),
        "zrem": zrem,
        "unlink": [
            k("saga", sid),
            k("steps", sid),
            k("events", sid),
            k("idx", "parent", sid),
            *(k("step", sid, step) for step in step_names),
        ],
    }
    if idempotency_key is not None:  # absent, not null: cjson's null is true in Lua
        owned["idem"] = k("idem", key_part(name), idempotency_key)
    return owned
