"""H1's Redis history: the loader writes sagas the Redis store reads as its own."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields

import pytest
import redis

from bench.history import HISTORY_NAME, REDIS_BATCH, load_redis
from sagaline.records import SagaFilter, SagaRecord, StepRecord
from sagaline.states import CompensationStatus, SagaStatus, StepStatus
from sagaline.stores.redis import RedisStore
from tests.harness import PrivateRedis

# More than one script call, and a last call that is not full.
N = REDIS_BATCH + 37


def saga_id(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-{i:012x}"


def expected_status(i: int) -> SagaStatus:
    if i % 100 == 1:
        return SagaStatus.FAILED
    return SagaStatus.COMPENSATED if i % 11 == 0 else SagaStatus.COMPLETED


@pytest.fixture(scope="module")
def loaded() -> Iterator[tuple[RedisStore, dict[str, float]]]:
    with PrivateRedis() as server:
        url = f"redis://127.0.0.1:{server.port}/3"
        result = load_redis(url, N)
        store = RedisStore(url)
        try:
            yield store, result
        finally:
            store.close()


def test_every_saga_is_loaded_with_its_status_in_the_indexes(
    loaded: tuple[RedisStore, dict[str, float]],
) -> None:
    store, result = loaded
    counts = store.count_by_status()
    expected = {s: 0 for s in SagaStatus}
    for i in range(1, N + 1):
        expected[expected_status(i)] += 1
    assert counts == expected
    assert store.count_by_status(HISTORY_NAME) == expected
    assert result["load_seconds"] > 0 and result["memory_bytes"] > 0


def test_a_compensated_saga_reads_back_with_its_steps_and_history(
    loaded: tuple[RedisStore, dict[str, float]],
) -> None:
    store, _ = loaded
    saga = store.get_saga(saga_id(22))
    assert saga is not None
    assert (saga.status, saga.name, saga.input, saga.failed_step, saga.output) == (
        SagaStatus.COMPENSATED,
        HISTORY_NAME,
        {"order": 22},
        "s4",
        None,
    )
    assert saga.finished_at is not None and saga.created_at < saga.finished_at
    steps = store.get_steps(saga.saga_id)
    assert [(s.name, s.position, s.status, s.comp_status) for s in steps] == [
        ("s1", 0, StepStatus.SUCCEEDED, CompensationStatus.COMPENSATED),
        ("s2", 1, StepStatus.SUCCEEDED, CompensationStatus.COMPENSATED),
        ("s3", 2, StepStatus.SUCCEEDED, CompensationStatus.COMPENSATED),
        ("s4", 3, StepStatus.FAILED, None),
    ]
    events = store.history(saga.saga_id)
    assert len(events) == 14
    assert [e.seq for e in events] == list(range(1, 15))
    assert events[0].kind == "saga_started" and events[1].step == "s1"
    assert [e.ts for e in events] == sorted(e.ts for e in events)


def test_a_completed_saga_has_its_output(loaded: tuple[RedisStore, dict[str, float]]) -> None:
    store, _ = loaded
    saga = store.get_saga(saga_id(N))
    assert saga is not None and saga.status is SagaStatus.COMPLETED
    assert saga.output == {"order": N, "ok": True} and saga.error is None


def test_hashes_hold_exactly_the_fields_the_store_writes(
    loaded: tuple[RedisStore, dict[str, float]],
) -> None:
    store, _ = loaded
    client = redis.Redis.from_url(store.url, decode_responses=True)
    try:
        saga_fields = set(client.hkeys(store.layout.saga_key(saga_id(5))))
        step_fields = set(client.hkeys(store.layout.step_key(saga_id(5), "s2")))
    finally:
        client.close()
    assert saga_fields == {f.name for f in fields(SagaRecord)} | {"txn"}
    assert step_fields == {f.name for f in fields(StepRecord)}


def test_listing_returns_the_newest_compensated_sagas_first(
    loaded: tuple[RedisStore, dict[str, float]],
) -> None:
    store, _ = loaded
    rows = store.list_sagas(SagaFilter(status=[SagaStatus.COMPENSATED], limit=3))
    newest = [i for i in range(N, 0, -1) if expected_status(i) is SagaStatus.COMPENSATED][:3]
    assert [r.saga_id for r in rows] == [saga_id(i) for i in newest]
