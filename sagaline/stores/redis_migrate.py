"""The Redis store's layout record, and the migration from layout 1.

`{p}:layout` says which layout and how many buckets a store has (redis_layout.py).
The first user of an empty store writes it. A store that still has keys of layout 1
(sagaline before Redis Cluster support: global indexes, no buckets) is refused
until `sagaline db upgrade` (`sagaline.migrate(url)`, `RedisStore.migrate()`) has
rewritten it, saga by saga:

1. read the saga, its steps and its events under the old names;
2. write them, with their index entries, into the saga's bucket with the create
   script (atomic; a saga written already is left alone), and its idempotency key;
3. delete the saga's old keys;

then delete the old indexes, the old `idx:created` last: until then the store is
refused, and the migration can be run again after an interruption. Run it with
every worker and client of the old version stopped: what they write meanwhile
under the old names is not carried over.
"""

from __future__ import annotations

import json
from typing import Any

from ..exceptions import ConfigurationError, StoreError
from ..records import SagaState
from .redis_layout import (
    DEFAULT_BUCKETS,
    LAYOUT_VERSION,
    Layout,
    LegacyLayout,
    due_member,
    event_record,
    saga_record,
    score,
    step_record,
)
from .redis_payloads import create_payload
from .redis_scripts import CREATE


def read_layout(
    client: Any, prefix: str, asked: int | None, set_up: bool = True
) -> tuple[Layout, bool]:
    """The layout of the store under `prefix`, and whether it is recorded. An empty
    store gets one (`asked` buckets, else DEFAULT_BUCKETS), recorded only if `set_up`.
    StoreError for a store of layout 1."""
    old = LegacyLayout(prefix)
    if client.exists(old.marker()):
        raise StoreError(
            f"the Redis store under prefix {prefix!r} has the key layout of sagaline "
            "before Redis Cluster support (layout 1, without buckets): stop every worker "
            "and run `sagaline db upgrade --store URL` (sagaline.migrate(URL)) to rewrite it"
        )
    return _layout_record(client, prefix, asked, set_up)


def _layout_record(
    client: Any, prefix: str, asked: int | None, set_up: bool = True
) -> tuple[Layout, bool]:
    key = Layout(prefix).layout_key()
    buckets = asked or DEFAULT_BUCKETS
    if set_up:
        client.set(key, json.dumps({"version": LAYOUT_VERSION, "buckets": buckets}), nx=True)
    raw = client.get(key)
    if raw is None:  # an empty store, read only: nothing of any layout to find
        return Layout(prefix, buckets), False
    try:
        meta = json.loads(raw)
        version, buckets = int(meta["version"]), int(meta["buckets"])
    except (TypeError, ValueError, KeyError) as exc:
        raise StoreError(f"Redis key {key!r} is not a sagaline layout record: {raw!r}") from exc
    if version != LAYOUT_VERSION:
        raise StoreError(
            f"the Redis store under prefix {prefix!r} has key layout {version}; this "
            f"sagaline knows layout {LAYOUT_VERSION} only"
        )
    if asked is not None and asked != buckets:
        raise ConfigurationError(
            f"the Redis store under prefix {prefix!r} has {buckets} buckets, not the "
            f"{asked} asked for: the number is fixed when a store is created"
        )
    return Layout(prefix, buckets), True


def migrate_layout(client: Any, prefix: str, asked: int | None) -> Layout:
    """Rewrite every saga of layout 1 under `prefix` into the current layout."""
    old = LegacyLayout(prefix)
    layout, _ = _layout_record(client, prefix, asked)
    create = client.register_script(CREATE)
    for key in list(client.scan_iter(match=_glob(old.saga_pattern()), count=500)):
        _move_saga(client, create, old, layout, old.saga_id_of(str(key)))
    for pattern in old.shared_patterns():
        for key in list(client.scan_iter(match=_glob(pattern), count=500)):
            if key != old.marker():
                client.delete(key)
    client.delete(old.due_key())
    client.delete(old.marker())
    return layout


def _move_saga(client: Any, create: Any, old: LegacyLayout, layout: Layout, sid: str) -> None:
    raw_saga = client.hgetall(old.key("saga", sid))
    if not raw_saga:  # deleted since the scan
        return
    saga = saga_record(raw_saga)
    names = [str(n) for n in client.zrange(old.key("steps", sid), 0, -1)]
    steps = [step_record(h) for h in (client.hgetall(old.key("step", sid, n)) for n in names) if h]
    events = [
        event_record(sid, i, raw)
        for i, raw in enumerate(client.lrange(old.key("events", sid), 0, -1), 1)
    ]
    payload = create_payload(layout, SagaState(saga, {s.name: s for s in steps}), events)
    saga_fields = payload["hset"][0][1]
    saga_fields[saga_fields.index("txn") + 1] = raw_saga.get("txn", "0")
    b = layout.bucket_of(sid)
    for s in steps:
        if s.owner_node is not None and s.running_phase is not None:
            member = due_member(sid, s.name)
            claimed = client.zscore(old.key("claims", s.owner_node), member)
            lease = claimed if claimed is not None else (s.lease_until or 0.0)
            payload["zadd"].append([layout.claims_key(b, s.owner_node), score(lease), member])
    create(keys=[layout.saga_key(sid)], args=[json.dumps(payload)])
    if saga.idempotency_key is not None:
        client.set(layout.idem_key(saga.name, saga.idempotency_key), sid)
    client.delete(*old.saga_keys(sid, names))


def _glob(pattern: str) -> str:
    """`pattern` (a key ending in '*') with the glob characters of its fixed part escaped."""
    head = pattern[:-1]
    for ch in "\\*?[]":
        head = head.replace(ch, "\\" + ch)
    return head + "*"
