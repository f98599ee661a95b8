"""The Redis store's held step records (stores/redis_cache.py): a decision reads whole
only the steps written since this process last read them, and decides on exactly
what a whole read would give, whoever wrote in between.

On a single server and on the private Redis Cluster (`server`, test_redis_store.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sagaline.records import Decision, SagaState
from sagaline.states import Phase, StepStatus
from sagaline.stores.redis import RedisStore
from tests.integration.test_redis_store import create, make_store, store
from tests.stores import make_state

# test_redis_store.py's fixtures, used here by name (server, raw and prefix are in
# conftest.py)
__all__ = ["make_store", "store"]

STEPS = tuple(f"s{i}" for i in range(1, 17))


def whole_rows(store: RedisStore) -> list[list[str]]:
    """Record the names of the steps each read_state reply of `store` carries whole."""
    seen: list[list[str]] = []
    script = store.scripts.read_state

    def reading(*args: Any, **kwargs: Any) -> Any:
        reply = script(*args, **kwargs)
        if reply:
            seen.append([r["name"] for r in json.loads(reply)[1:] if isinstance(r, dict)])
        return reply

    store.scripts.read_state = reading
    return seen


def succeed(name: str) -> Callable[[SagaState], Decision]:
    def decide(state: SagaState) -> Decision:
        done = replace(state.steps[name], status=StepStatus.SUCCEEDED, due_at=None)
        return Decision(steps=[done], step_versions={name: state.steps[name].version})

    return decide


def looking(into: list[SagaState]) -> Callable[[SagaState], None]:
    """A decision that only keeps the state it was given."""

    def decide(state: SagaState) -> None:
        into.append(state)

    return decide


def test_a_decision_reads_whole_only_the_steps_written_since_its_process_read_them(
    make_store: Callable[..., RedisStore],
) -> None:
    store, worker = make_store(), make_store()
    sid = create(store, make_state(name="long", steps=STEPS))
    read = whole_rows(store)
    store.transact(sid, lambda s: None)
    assert read == [list(STEPS)]
    # Another process claims s1; this one writes s1's success (and holds it as written).
    assert worker.claim_step(sid, "s1", Phase.FORWARD, 1, lease_until=9e9, now=1.0)
    store.transact(sid, lambda s: None)
    assert read[-1] == ["s1"]
    store.transact(sid, succeed("s1"))
    assert read[-1] == []
    store.transact(sid, lambda s: None)
    assert read[-1] == []
    # Another process writes s2 and s3: only those come whole.
    worker.transact(sid, succeed("s2"))
    worker.transact(sid, succeed("s3"))
    seen: list[SagaState] = []
    store.transact(sid, looking(seen))
    assert read[-1] == ["s2", "s3"]
    assert seen[0].steps == {r.name: r for r in store.get_steps(sid)}
    assert [seen[0].steps[n].status for n in ("s1", "s2", "s3", "s4")] == [
        StepStatus.SUCCEEDED,
        StepStatus.SUCCEEDED,
        StepStatus.SUCCEEDED,
        StepStatus.PENDING,
    ]


def test_a_saga_deleted_and_created_again_under_its_id_is_read_whole(
    store: RedisStore, raw: Any
) -> None:
    state = make_state(name="again", steps=("a", "b"))
    sid = create(store, state)
    store.transact(sid, lambda s: None)  # holds a and b at version 0
    layout = store.layout
    raw.delete(*layout.saga_keys(sid, ["a", "b"]))
    again = make_state(
        saga_id=sid, name="again", steps=("a", "b"), created_at=state.saga.created_at + 1
    )
    again.steps["b"] = replace(again.steps["b"], error="another saga's b")  # same version 0
    create(store, again)
    seen: list[SagaState] = []
    store.transact(sid, looking(seen))
    assert seen[0].steps["b"].error == "another saga's b"


def test_a_completion_decides_on_its_claims_read_unless_the_saga_was_written_since(
    make_store: Callable[..., RedisStore],
) -> None:
    store, other = make_store(), make_store()
    sid = create(store, make_state(name="claimed", steps=("a", "b", "c")))
    read = whole_rows(store)
    assert store.claim_step(sid, "a", Phase.FORWARD, 1, lease_until=9e9, now=1.0)
    store.transact(sid, succeed("a"))
    assert read == []  # decided on the claim's read
    # Between the claim of b and its completion, another process renews b's lease
    # and writes c: the completion's write loses, and it decides again on a new read.
    store.transact(
        sid,
        lambda s: Decision(
            steps=[replace(s.steps["b"], status=StepStatus.DISPATCHED, attempt=1)],
            step_versions={"b": s.steps["b"].version},
        ),
    )
    assert store.claim_step(sid, "b", Phase.FORWARD, 1, lease_until=9e9, now=2.0)
    assert other.renew_lease(sid, "b", Phase.FORWARD, 1, lease_until=9e9 + 1)
    other.transact(sid, succeed("c"))
    decided_on: list[SagaState] = []

    def complete_b(state: SagaState) -> Decision:
        decided_on.append(state)
        return succeed("b")(state)

    store.transact(sid, complete_b)
    assert [s.steps["b"].lease_until for s in decided_on] == [9e9, 9e9 + 1]
    assert decided_on[-1].steps["c"].status is StepStatus.SUCCEEDED
    assert [s.status for s in store.get_steps(sid)] == [StepStatus.SUCCEEDED] * 3
