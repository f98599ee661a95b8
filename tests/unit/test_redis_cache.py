"""The Redis store's held step records stay bounded, and a saga's end drops its own."""

from __future__ import annotations

from dataclasses import replace

from sagaline.records import Decision, SagaRecord, StepRecord
from sagaline.states import SagaStatus
from sagaline.stores.redis_cache import StepCache
from sagaline.stores.rows import to_row


def rows(saga_id: str, n: int) -> list[dict[str, object]]:
    return [to_row(StepRecord(saga_id, f"s{i}", i)) for i in range(n)]


def test_the_cache_holds_at_most_its_limit_dropping_the_sagas_read_longest_ago() -> None:
    cache = StepCache(limit=10)
    for sid in ("a", "b", "c"):
        cache.steps(sid, 1.0, rows(sid, 4), {})
    assert cache.known_versions("a") == {}
    assert cache.known_versions("b") == {f"s{i}": "0" for i in range(4)}
    cache.steps("b", 1.0, rows("b", 4), {})  # read again: now the newest
    cache.steps("d", 1.0, rows("d", 4), {})
    assert cache.known_versions("c") == {}
    assert (
        set(cache.known_versions("b"))
        == set(cache.known_versions("d"))
        == {f"s{i}" for i in range(4)}
    )


def test_a_decision_that_ends_the_saga_drops_its_records_and_others_update_them() -> None:
    cache = StepCache()
    cache.steps("a", 1.0, rows("a", 2), {})
    step = StepRecord("a", "s0", 0, output={"x": 1})
    cache.written("a", 1.0, Decision(steps=[step], step_versions={"s0": 0}))
    assert cache.known_versions("a") == {"s0": "1", "s1": "0"}
    assert cache.steps("a", 1.0, ["s0", "s1"], {"s0": "1", "s1": "0"})["s0"].output == {"x": 1}
    saga = SagaRecord("a", "n", SagaStatus.COMPLETED, {}, "f", 1.0, 1.0)
    cache.written("a", 1.0, Decision(saga=saga, steps=[replace(step, version=1)]))
    assert cache.known_versions("a") == {}
