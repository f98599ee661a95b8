"""The Redis store's bucketed key layout: one hash slot per saga and its index entries,
a fixed number of buckets, idempotency keys kept in a bucket of their own, and the
migration of a store written in layout 1 (no buckets, global indexes)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis
from redis.crc import key_slot
from typer.testing import CliRunner

from sagaline.cli import cli
from sagaline.exceptions import ConfigurationError, StoreError
from sagaline.records import Decision, Event, Owner, SagaFilter, SagaState
from sagaline.states import Phase, SagaStatus, StepStatus
from sagaline.stores import redis_create
from sagaline.stores.redis import RedisStore
from sagaline.stores.redis_layout import bucket_of, event_json, fields
from tests.stores import make_state, redis_test_url

REDIS_URL = redis_test_url()


@pytest.fixture
def make_store(prefix: str, server: str) -> Iterator[Callable[..., RedisStore]]:
    stores: list[RedisStore] = []

    def make(query: str = "", **options: Any) -> RedisStore:
        store = RedisStore(server + query, prefix=prefix, **options)
        stores.append(store)
        return store

    yield make
    for s in stores:
        s.close()


def test_a_saga_and_its_index_entries_live_in_the_hash_slot_of_its_bucket(
    make_store: Callable[..., RedisStore], raw: Any, prefix: str
) -> None:
    store = make_store()
    parent = make_state(name="order", key="k1")
    store.create_saga(parent, [Event(parent.saga.saga_id, "saga_started", 1.0)])
    child = make_state(name="ship", parent=parent.saga.saga_id, due_at=5.0)
    sid = child.saga.saga_id
    store.create_saga(child, [Event(sid, "saga_started", 1.0)])
    assert store.claim_step(sid, "a", Phase.FORWARD, 1, lease_until=9e9, now=1.0, owner=OWNER)

    layout = store.layout
    slot = key_slot(layout.saga_key(sid).encode())
    b = layout.bucket_of(sid)
    mine = [k for k in raw.scan_iter(match=f"{prefix}:*") if sid in k]
    mine += [
        k
        for k in raw.scan_iter(match=f"{prefix}:*")
        if k.startswith(layout.tag(b)) and raw.type(k) == "zset" and raw.zscore(k, sid)
    ]
    assert len(set(mine)) >= 10  # saga, 3 steps, steps, events, 5 indexes, due, claims
    assert {key_slot(k.encode()) for k in mine} == {slot}
    # What deleting the saga would remove: its own keys, and its index entries.
    steps = store.get_steps(sid)
    own = layout.saga_keys(sid, [s.name for s in steps])
    assert raw.exists(*own) == len(own) == 6
    saga = store.get_saga(sid)
    assert saga is not None
    entries = layout.index_entries(saga, steps)
    present = {(k, m) for k, m in entries if raw.zscore(k, m) is not None}
    not_due = {(layout.due_key(b), f"{sid}\0{n}") for n in ("b", "c")}  # PENDING steps
    assert present == set(entries) - not_due and len(present) == 8
    assert {key_slot(k.encode()) for k, _ in entries} == {slot}
    assert raw.zscore(layout.claims_key(b, "node-1"), f"{sid}\0a") == 9e9
    assert raw.zscore(layout.parent_index(b, parent.saga.saga_id), sid) is not None
    # Listing a saga's children reads every bucket's parent index.
    listed = store.list_sagas(SagaFilter(parent_saga_id=parent.saga.saga_id))
    assert [s.saga_id for s in listed] == [sid]


OWNER = Owner("node-1", "boot-1", 1)


def test_the_number_of_buckets_is_fixed_when_the_store_is_created(
    make_store: Callable[..., RedisStore], raw: Any, prefix: str
) -> None:
    # A tool that only reads (`sagaline ls`) sets nothing up on an empty store.
    reader = make_store(auto_migrate=False)
    assert reader.list_sagas(SagaFilter()) == [] and reader.count_by_status() == {
        s: 0 for s in SagaStatus
    }
    assert raw.get(f"{prefix}:layout") is None
    state = make_state()
    assert make_store("?buckets=4").create_saga(state, [])[1]  # the URL's query, or buckets=4
    assert reader.get_saga(state.saga.saga_id) == state.saga and reader.layout.buckets == 4
    assert json.loads(raw.get(f"{prefix}:layout")) == {"version": 2, "buckets": 4}
    with pytest.raises(ConfigurationError, match="has 4 buckets, not the 64 asked for"):
        make_store(buckets=64).get_saga(state.saga.saga_id)
    with pytest.raises(ConfigurationError, match="buckets=8 and the URL's buckets=4 differ"):
        make_store("?buckets=4", buckets=8)
    with pytest.raises(ConfigurationError, match=r"'many' .* is not a whole number"):
        make_store("?buckets=many")
    with pytest.raises(ConfigurationError, match="between 1 and 256, got 0"):
        make_store(buckets=0)
    reopened = make_store()  # no number asked: the store's own
    assert reopened.layout.buckets == 4
    assert reopened.get_saga(state.saga.saga_id) == state.saga
    with pytest.raises(ConfigurationError, match="hash tags"):
        RedisStore(REDIS_URL, prefix="sagas{x}")


def test_a_key_whose_owner_never_created_its_saga_is_taken_over_and_the_owner_fenced(
    make_store: Callable[..., RedisStore], raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a creator that died between reserving the key and creating its saga leaves.
    monkeypatch.setattr(redis_create, "OWNER_GRACE", 0.2)
    store = make_store()
    ghost = str(uuid.uuid4())
    raw.set(store.layout.idem_key("order", "k"), ghost)

    state = make_state(name="order", key="k")
    saga, created = store.create_saga(state, [])
    assert created and saga.saga_id == state.saga.saga_id
    assert raw.get(store.layout.idem_key("order", "k")) == state.saga.saga_id
    assert raw.get(store.layout.aborted_key(ghost)) == "1"
    # The ghost's creator comes back: it gets the saga that holds the key now.
    late = make_state(saga_id=ghost, name="order", key="k")
    assert store.create_saga(late, []) == (store.get_saga(state.saga.saga_id), False)
    assert store.get_saga(ghost) is None
    with pytest.raises(StoreError, match="was given up"):
        store.create_saga(make_state(saga_id=ghost), [])


# -- layout 1 and its migration ------------------------------------------------------


def write_layout1(client: Any, p: str, state: SagaState, events: list[Event]) -> None:
    """A saga as sagaline wrote it before buckets: global indexes, no hash tags."""
    saga, sid = state.saga, state.saga.saga_id
    created = saga.created_at
    client.hset(f"{p}:saga:{sid}", mapping=dict(_pairs([*fields(saga), "txn", "3"])))
    for s in state.steps.values():
        client.hset(f"{p}:step:{sid}:{s.name}", mapping=dict(_pairs(fields(s))))
        client.zadd(f"{p}:steps:{sid}", {s.name: s.position})
        if s.due_at is not None:
            client.zadd(f"{p}:due", {f"{sid}\0{s.name}": s.due_at})
        if s.owner_node is not None:
            client.zadd(f"{p}:claims:{s.owner_node}", {f"{sid}\0{s.name}": 7.0})
    for e in events:
        client.rpush(f"{p}:events:{sid}", event_json(e))
    status = saga.status.value
    for key in ("idx:created", f"idx:name:{saga.name}", f"idx:status:{status}"):
        client.zadd(f"{p}:{key}", {sid: created})
    client.zadd(f"{p}:idx:ns:{status}:{saga.name}", {sid: created})
    if saga.parent_saga_id is not None:
        client.zadd(f"{p}:idx:parent:{saga.parent_saga_id}", {sid: created})
    if saga.idempotency_key is not None:
        client.set(f"{p}:idem:{saga.name}:{saga.idempotency_key}", sid)


def _pairs(flat: list[str]) -> Iterator[tuple[str, str]]:
    it = iter(flat)
    return zip(it, it, strict=True)


def test_a_store_of_layout_1_is_refused_until_db_upgrade_rewrites_it() -> None:
    # A database of its own on the test server: the store's default prefix, as users have it.
    url = REDIS_URL.rsplit("/", 1)[0] + "/13"
    prefix = "sagaline"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    try:
        parent = make_state(name="order", key="o-1", created_at=100.0)
        child = make_state(name="ship", parent=parent.saga.saga_id, created_at=200.0)
        child.saga = replace(child.saga, status=SagaStatus.COMPLETED)
        parent.steps["a"] = replace(
            parent.steps["a"],
            status=StepStatus.RUNNING,
            owner_node="node-1",
            owner_boot="b",
            owner_pid=1,
            lease_until=999.0,
            due_at=999.0,
            version=4,
        )
        events = [Event(parent.saga.saga_id, "saga_started", 100.0)]
        write_layout1(client, prefix, parent, events)
        write_layout1(client, prefix, child, [Event(child.saga.saga_id, "saga_started", 200.0)])

        store = RedisStore(url, prefix=prefix)
        with pytest.raises(StoreError, match=r"layout 1.*`sagaline db upgrade --store URL`"):
            store.get_saga(parent.saga.saga_id)
        for _ in range(2):  # again: nothing left to move, nothing lost
            result = CliRunner().invoke(cli, ["db", "upgrade", "--store", url])
            assert result.exit_code == 0, result.output

        reopened = RedisStore(url, prefix=prefix)
        try:
            sid = parent.saga.saga_id
            assert reopened.get_saga(sid) == parent.saga
            assert reopened.get_steps(sid) == list(parent.steps.values())
            assert [(e.kind, e.seq) for e in reopened.history(sid)] == [("saga_started", 1)]
            names = [s.name for s in reopened.list_sagas(SagaFilter(limit=10))]
            assert names == ["ship", "order"]
            done = reopened.list_sagas(SagaFilter(status=[SagaStatus.COMPLETED], name="ship"))
            assert [s.saga_id for s in done] == [child.saga.saga_id]
            assert [s.saga_id for s in reopened.list_sagas(SagaFilter(parent_saga_id=sid))] == [
                child.saga.saga_id
            ]
            due = {(d.saga_id, d.step, d.due_at) for d in reopened.find_due(1000.0)}
            assert (sid, "a", 999.0) in due
            assert [(s.saga_id, s.name) for s in reopened.find_claimed("node-1")] == [(sid, "a")]
            again = make_state(name="order", key="o-1")
            assert reopened.create_saga(again, []) == (parent.saga, False)
            # The transact counter came along, and decisions write on the new layout.
            assert client.hget(reopened.layout.saga_key(sid), "txn") == "3"
            reopened.transact(
                sid,
                lambda s: Decision(
                    saga=replace(s.saga, output={"x": 1}), saga_version=s.saga.version
                ),
            )
            saga = reopened.get_saga(sid)
            assert saga is not None and saga.output == {"x": 1}
            left = sorted(k for k in client.scan_iter(match=f"{prefix}:*") if "{" not in k)
            assert left == [f"{prefix}:layout"]
        finally:
            reopened.close()
            store.close()
    finally:
        client.flushdb()
        client.close()


def test_lists_merge_the_buckets_in_the_order_of_one_index(
    make_store: Callable[..., RedisStore],
) -> None:
    # Most sagas in one bucket, so that its index is read past its first page, and
    # timestamps shared by several sagas (ties are ordered by id, descending).
    store = make_store(buckets=4)
    crowded = (str(uuid.uuid4()) for _ in range(10_000))
    ids_in_0 = [sid for sid in crowded if bucket_of(sid, 4) == 0][:180]
    states = [
        make_state(
            saga_id=ids_in_0[i] if i < 180 else None,
            name="order" if i % 3 else "ship",
            created_at=1000.0 + i // 4,
        )
        for i in range(240)
    ]
    done = {s.saga.saga_id for s in states[::5]}
    for s in states:
        if s.saga.saga_id in done:
            s.saga = replace(s.saga, status=SagaStatus.COMPLETED)
        assert store.create_saga(s, [])[1]
    newest = sorted(states, key=lambda s: (s.saga.created_at, s.saga.saga_id), reverse=True)

    def ids(flt: SagaFilter) -> list[str]:
        return [s.saga_id for s in store.list_sagas(flt)]

    assert ids(SagaFilter(limit=200)) == [s.saga.saga_id for s in newest[:200]]
    assert ids(SagaFilter(limit=30, offset=100)) == [s.saga.saga_id for s in newest[100:130]]
    running_orders = [
        s.saga.saga_id
        for s in newest
        if s.saga.name == "order" and s.saga.status is SagaStatus.RUNNING
    ]
    assert ids(SagaFilter(limit=500, name="order", status=[SagaStatus.RUNNING])) == running_orders
    # Keyset paging: each page starts after the last one's (created_at, saga_id).
    pages: list[str] = []
    flt = SagaFilter(limit=70)
    for _ in range(10):
        page = store.list_sagas(flt)
        pages += [s.saga_id for s in page]
        if len(page) < 70:
            break
        flt = SagaFilter(limit=70, before=(page[-1].created_at, page[-1].saga_id))
    assert pages == [s.saga.saga_id for s in newest]
    assert store.count_by_status()[SagaStatus.COMPLETED] == len(done)
