"""What only the Redis store must prove: Lua compare-and-set under real concurrency,
re-decision on a lost race, atomic idempotent create, no TTL, its indexes, and
surviving a Redis restart. The shared contract (concurrent claims, creates and
transacts, lists, counts and due order) lives in test_store_contract.py.

The tests on the store's behaviour run on a single server and on a private Redis
Cluster of three masters (`server`); those that stop a server run on a private one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis

from sagaline.exceptions import StoreError
from sagaline.records import Decision, Event, SagaState
from sagaline.states import Phase, SagaStatus, StepStatus
from sagaline.stores import store_from_url
from sagaline.stores.redis import RedisStore
from tests.harness import PrivateRedis, free_port
from tests.stores import THREADS, make_state, redis_test_url, run_threads

# Database 15 of the test Redis, like the contract suite, but never flushed here:
# every test writes under its own prefix and deletes only that prefix.
REDIS_URL = redis_test_url()


@pytest.fixture
def make_store(prefix: str, server: str) -> Iterator[Callable[..., RedisStore]]:
    stores: list[RedisStore] = []

    def make(url: str = server, **options: Any) -> RedisStore:
        store = RedisStore(url, prefix=prefix, **options)
        stores.append(store)
        return store

    yield make
    for s in stores:
        s.close()


@pytest.fixture
def store(make_store: Callable[..., RedisStore]) -> RedisStore:
    return make_store()


def new_state(name: str = "order", **options: Any) -> SagaState:
    """A running saga whose first step `a` is DISPATCHED(1) and `b` waits for it."""
    return make_state(name=name, steps=("a", "b"), **options)


def create(store: RedisStore, state: SagaState) -> str:
    saga, created = store.create_saga(
        state, [Event(state.saga.saga_id, "saga_started", state.saga.created_at)]
    )
    assert created
    return saga.saga_id


def test_redis_urls_select_the_redis_store(prefix: str, server: str) -> None:
    store = store_from_url(server, prefix=prefix, echo=False, auto_migrate=True)
    try:
        assert isinstance(store, RedisStore)
        assert store.cluster is server.startswith("redis+cluster://")
        assert isinstance(store._client, redis.RedisCluster if store.cluster else redis.Redis)
    finally:
        store.close()


def test_transact_decides_again_when_a_claim_races_it_and_keeps_the_claim(
    make_store: Callable[..., RedisStore], raw: Any, prefix: str
) -> None:
    store, worker = make_store(), make_store()
    sid = create(store, new_state())
    seen: list[StepStatus] = []

    def decide(state: SagaState) -> Decision | None:
        a = state.steps["a"]
        seen.append(a.status)
        if a.status is not StepStatus.DISPATCHED:
            return None  # what the engine does once the step is running
        # A worker claims the step between our read and our write.
        assert worker.claim_step(sid, "a", Phase.FORWARD, 1, lease_until=9000.0, now=1.0)
        return Decision(
            steps=[replace(a, status=StepStatus.CANCELLED, due_at=None)],
            step_versions={"a": a.version},
            events=[Event(sid, "step_cancelled", 2.0, "a")],
        )

    assert store.transact(sid, decide) is None
    assert seen == [StepStatus.DISPATCHED, StepStatus.RUNNING]
    step = store.get_steps(sid)[0]
    assert (step.status, step.lease_until, step.version) == (StepStatus.RUNNING, 9000.0, 1)
    due = store.layout.due_key(store.layout.bucket_of(sid))
    assert raw.zscore(due, f"{sid}\0a") == 9000.0
    assert "step_cancelled" not in [e.kind for e in store.history(sid)]


def test_twenty_concurrent_creates_with_one_idempotency_key_make_one_saga(
    make_store: Callable[..., RedisStore], raw: Any, prefix: str
) -> None:
    clients = [make_store() for _ in range(THREADS)]
    states = [new_state(key="order-42") for _ in range(THREADS)]
    results = run_threads(
        THREADS,
        lambda i: clients[i].create_saga(
            states[i], [Event(states[i].saga.saga_id, "saga_started", 1.0)]
        ),
    )

    assert [created for _, created in results].count(True) == 1
    winner = next(saga.saga_id for saga, created in results if created)
    assert {saga.saga_id for saga, _ in results} == {winner}
    layout = clients[0].layout
    assert [
        s for b in layout.all_buckets() for s in raw.zrange(layout.created_index(b), 0, -1)
    ] == [winner]
    assert raw.get(layout.idem_key("order", "order-42")) == winner
    assert len(list(raw.scan_iter(match=f"{prefix}:*:saga:*"))) == 1
    assert len(list(raw.scan_iter(match=f"{prefix}:*:events:*"))) == 1
    # The same key under another saga name is another saga.
    assert clients[0].create_saga(new_state("refund", key="order-42"), [])[1]


def test_a_retried_create_that_had_committed_reports_its_saga_as_created(store: RedisStore) -> None:
    # What a retry after a lost reply sees: its own saga already written.
    state = new_state(key="k")
    assert store.create_saga(state, [])[1]
    assert store.create_saga(state, [])[1]
    assert store.create_saga(new_state(key="k"), []) == (store.get_saga(state.saga.saga_id), False)


def test_no_key_is_ever_given_a_ttl(store: RedisStore, raw: Any, prefix: str) -> None:
    parent = create(store, new_state(key="p", due_at=time.time() + 60, deadline=time.time() + 60))
    sid = create(store, new_state(key="c", parent=parent))
    assert store.claim_step(sid, "a", Phase.FORWARD, 1, lease_until=time.time() + 30, now=1.0)
    a = store.get_steps(sid)[0]
    store.transact(
        sid,
        lambda s: Decision(
            saga=replace(s.saga, status=SagaStatus.COMPLETED, output={"ok": True}),
            saga_version=s.saga.version,
            steps=[replace(a, status=StepStatus.SUCCEEDED, due_at=None, lease_until=None)],
            step_versions={"a": s.steps["a"].version},
            events=[Event(sid, "saga_completed", 2.0)],
        ),
    )

    keys = sorted(raw.scan_iter(match=f"{prefix}:*"))
    assert {k.split(":")[2] if ":{" in k else k.split(":")[1] for k in keys} == {
        "layout",
        "saga",
        "step",
        "steps",
        "events",
        "idem",
        "idx",
        "due",
    }
    assert {k: raw.ttl(k) for k in keys} == dict.fromkeys(keys, -1)


def test_status_indexes_follow_every_transition(store: RedisStore, raw: Any, prefix: str) -> None:
    # What lists and counts read (test_store_contract proves those on every store).
    now = time.time()
    ids = [
        create(store, new_state("order" if i % 2 else "ship", created_at=now + i)) for i in range(4)
    ]
    done = ids[1]
    store.transact(
        done,
        lambda s: Decision(
            saga=replace(s.saga, status=SagaStatus.COMPLETED), saga_version=s.saga.version
        ),
    )

    layout, b = store.layout, store.layout.bucket_of(done)
    assert raw.zscore(layout.status_index(b, "RUNNING"), done) is None
    assert raw.zscore(layout.name_status_index(b, "COMPLETED", "order"), done) == now + 1


def test_a_claim_costs_one_round_trip_its_completion_one_and_a_transact_two(
    store: RedisStore,
) -> None:
    sid = create(store, new_state())
    store.transact(sid, lambda s: None)  # load the scripts into the server's cache
    sent: list[str] = []
    original = store._client.execute_command

    def counting(*args: Any, **kwargs: Any) -> Any:
        sent.append(str(args[0]))
        return original(*args, **kwargs)

    def dispatch_b(s: SagaState) -> Decision:
        b = replace(s.steps["b"], status=StepStatus.DISPATCHED, attempt=1)
        return Decision(steps=[b], step_versions={"b": s.steps["b"].version})

    store._client.execute_command = counting
    assert store.claim_step(sid, "a", Phase.FORWARD, 1, lease_until=9e9, now=1.0)
    assert sent == ["EVALSHA"]
    sent.clear()
    store.transact(sid, dispatch_b)  # decides on what the claim read
    assert sent == ["EVALSHA"]
    sent.clear()
    assert store.renew_lease(sid, "a", Phase.FORWARD, 1, lease_until=9e9)
    store.transact(sid, lambda s: Decision(events=[Event(sid, "noted", 2.0)]))
    assert sent == ["EVALSHA", "EVALSHA", "EVALSHA"]


@pytest.mark.chaos
@pytest.mark.parametrize("server", ["single"], indirect=True)  # a private server of its own
def test_state_survives_a_redis_restart_and_calls_wait_for_redis_to_return(
    make_store: Callable[..., RedisStore],
) -> None:
    with PrivateRedis(appendonly=True) as server:
        store = make_store(server.url)
        sid = create(store, new_state(key="survivor"))
        assert store.claim_step(sid, "a", Phase.FORWARD, 1, lease_until=9e9, now=1.0)
        server.restart()

        saga = store.get_saga(sid)
        assert saga is not None and saga.status is SagaStatus.RUNNING
        assert [s.status for s in store.get_steps(sid)] == [StepStatus.RUNNING, StepStatus.PENDING]
        assert [e.kind for e in store.history(sid)] == ["saga_started", "step_started"]
        assert store.create_saga(new_state(key="survivor"), [])[0].saga_id == sid

        # Redis is down for about a second while a transact is issued.
        server.kill()
        outcome: list[Any] = []
        started = time.monotonic()
        caller = threading.Thread(
            target=lambda: outcome.append(
                store.transact(
                    sid,
                    lambda s: Decision(
                        saga=replace(s.saga, status=SagaStatus.COMPENSATING),
                        saga_version=s.saga.version,
                    ),
                )
            )
        )
        caller.start()
        time.sleep(1.0)
        assert caller.is_alive()
        server.start()
        caller.join(timeout=30)
        assert not caller.is_alive() and outcome and outcome[0] is not None
        assert time.monotonic() - started >= 1.0
        saga = store.get_saga(sid)
        assert saga is not None and saga.status is SagaStatus.COMPENSATING


@pytest.mark.parametrize("server", ["single"], indirect=True)
def test_an_unreachable_redis_fails_with_store_error_after_retry_for(
    make_store: Callable[..., RedisStore],
) -> None:
    store = make_store(f"redis://127.0.0.1:{free_port()}/0", retry_for=0.5)
    started = time.monotonic()
    with pytest.raises(StoreError, match="failed"):
        store.get_saga("nope")
    assert time.monotonic() - started < 10
