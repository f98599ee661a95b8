"""Retention on the Redis store, on a single server and on the private Redis Cluster:
a tree spread over buckets goes without leaving a key behind, its root goes before
its children, and an idempotency key goes only while it names the deleted saga.
The behaviour every store shares is in test_store_gc.py."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import pytest
import redis

from sagaline.records import Decision, Owner, SagaState
from sagaline.states import SagaStatus
from sagaline.stores import redis_gc
from sagaline.stores.redis import RedisStore
from tests.integration.test_redis_store import make_store, store
from tests.integration.test_store_gc import CUTOFF, OLD, ended, exists
from tests.stores import delete_prefix, redis_test_url

__all__ = ["make_store", "store"]  # fixtures, used by name

pytestmark = pytest.mark.timeout(120)

REDIS_URL = redis_test_url()


def touch(st: RedisStore, sid: str) -> None:
    """A transact that rewrites the saga as it is: its `txn` counter moves on."""

    def decide(state: SagaState) -> Decision:
        return Decision(saga=replace(state.saga), saga_version=state.saga.version)

    assert st.transact(sid, decide) is not None


def test_a_tree_over_several_buckets_goes_without_leaving_a_key_behind(
    store: RedisStore, raw: Any, prefix: str
) -> None:
    root = ended(store, key="order-1")
    kids = [ended(store, SagaStatus.COMPENSATED, parent=root, key=f"kid-{n}") for n in range(6)]
    grandchild = ended(store, parent=kids[0], owner=Owner("node-1", "boot-1", 1))
    layout = store.layout
    # A stale claim entry of the claimed step: gc removes it with the other index entries.
    claims = layout.claims_key(layout.bucket_of(grandchild), "node-1")
    assert raw.zscore(claims, f"{grandchild}\0a") is None  # the finish ended the claim
    raw.zadd(claims, {f"{grandchild}\0a": OLD})
    buckets = {layout.bucket_of(s) for s in [root, *kids, grandchild]}
    assert len(buckets) > 1  # 8 random ids in one of 16 buckets: 1 in 16**7
    assert len(list(raw.scan_iter(match=f"{prefix}:*", count=1000))) > 8 * 6

    report = store.gc(CUTOFF)
    assert report.sagas == {SagaStatus.COMPLETED: 2, SagaStatus.COMPENSATED: 6}
    assert (report.steps, report.kept) == (8 * 3, 0)
    assert not any(exists(store, s) for s in [root, *kids, grandchild])
    # Saga keys, index entries (every bucket's), idempotency keys (other buckets'): gone.
    left = sorted(raw.scan_iter(match=f"{prefix}:*", count=1000))
    assert left == [layout.layout_key()]


def test_a_child_that_changed_after_its_root_went_is_kept_and_collected_later(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = ended(store)
    child = ended(store, parent=root)
    grandchild = ended(store, SagaStatus.COMPENSATED, parent=child)
    sibling = ended(store, parent=root)
    levels: list[set[str]] = []
    touched: list[str] = []
    delete_level = redis_gc._delete_level

    def racing(st: RedisStore, plans: list[Any], removed: Any) -> set[str]:
        gone = delete_level(st, plans, removed)
        if not touched:  # after the roots' scripts, before their children's
            touch(store, child)
            touched.append(child)
        levels.append({p.saga.saga_id for p in plans})
        return gone

    monkeypatch.setattr(redis_gc, "_delete_level", racing)
    first = store.gc(CUTOFF)
    # Level by level: the root, then its children; nothing below the kept child.
    assert levels == [{root}, {child, sibling}]
    assert first.sagas == {SagaStatus.COMPLETED: 2} and first.kept == 0
    assert first.steps == 2 * 3 and not exists(store, root) and not exists(store, sibling)
    assert exists(store, child) and exists(store, grandchild)
    assert len(store.get_steps(grandchild)) == 3 and len(store.history(child)) > 0

    # Its parent gone, the child is a root now: the next run takes it, with its child.
    levels.clear()
    later = store.gc(CUTOFF)
    assert later.sagas == {SagaStatus.COMPLETED: 1, SagaStatus.COMPENSATED: 1}
    assert levels == [{child}, {grandchild}]
    assert not exists(store, child) and not exists(store, grandchild)


def test_an_idempotency_key_another_saga_took_meanwhile_stays(store: RedisStore, raw: Any) -> None:
    old = ended(store, key="order-7")
    mine = ended(store, key="order-8")
    key = store.layout.idem_key("contract", "order-7")
    assert raw.get(key) == old
    raw.set(key, "a-newer-saga")  # what a creator that took the key over leaves
    assert store.gc(CUTOFF).total == 2
    assert raw.get(key) == "a-newer-saga"
    assert raw.get(store.layout.idem_key("contract", "order-8")) is None
    assert not exists(store, mine)


def test_the_children_of_a_batch_are_read_with_their_statuses_in_every_bucket(
    store: RedisStore, raw: Any
) -> None:
    roots = [ended(store) for _ in range(3)]
    kids = {
        (root, ended(store, status, parent=root))
        for root in roots[:2]
        for status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)
    }
    # A child whose saga went while its entry stayed in the parent's index is not one.
    layout = store.layout
    raw.zadd(layout.parent_index(layout.bucket_of("gone"), roots[2]), {"gone": OLD})
    found = redis_gc.children(store, [*roots, "no-such-saga"])
    assert len(found) == len(kids) == 6
    assert {(parent, child) for parent, child, _ in found} == kids
    for _, child, status in found:
        assert status is store.read_state(child).saga.status  # type: ignore[union-attr]
    # Six random ids in one of 16 buckets: 1 in 16**5.
    assert len({layout.bucket_of(child) for _, child, _ in found}) > 1


def test_the_children_of_many_parents_take_one_script_per_bucket_not_a_read_each() -> None:
    prefix = f"sagaline-gc-children-{uuid.uuid4().hex[:12]}"
    st = RedisStore(REDIS_URL, prefix=prefix)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        roots = [ended(st) for _ in range(3)]
        kids = {ended(st, parent=root) for root in roots}
        ids = [*roots, *(f"childless-{n}" for n in range(150))]

        def calls(command: str) -> int:
            stats = client.info("commandstats").get(f"cmdstat_{command}", {})
            return int(stats.get("calls", 0))

        evals = calls("eval")
        found = redis_gc.children(st, ids)
        assert {child for _, child, _ in found} == kids
        # 153 parents in chunks of SCRIPT_SAGAS: two scripts per bucket, in one pipeline.
        assert calls("eval") - evals == 2 * st.layout.buckets
    finally:
        delete_prefix(client, prefix)
        client.close()
        st.close()
