"""Retention (`Store.gc`) on every store: the conformance suite's stores and fixture.

Old finished sagas go with everything they own; running, recent and unchosen ones
stay; a child saga stays while its parent exists and goes with it.
"""

from __future__ import annotations

import re
import threading
from dataclasses import replace
from typing import Any

import pytest

from sagaline.exceptions import InputError
from sagaline.records import Decision, Event, Owner, SagaFilter, SagaState
from sagaline.states import SAGA_TERMINAL, Phase, SagaStatus, StepStatus
from sagaline.stores import Store, redis_gc, sql_gc
from sagaline.stores.retention import GcRule, GcTree, gather_trees
from tests.integration.test_store_contract import mariadb_url, started, store
from tests.stores import T0, run_threads

__all__ = ["mariadb_url", "store"]  # the contract suite's fixtures, used here by name

pytestmark = pytest.mark.timeout(120)

OLD = T0 - 40 * 86400  # ended 40 days before T0
RECENT = T0 - 3600
CUTOFF = T0 - 30 * 86400


def ended(
    st: Store,
    status: SagaStatus = SagaStatus.COMPLETED,
    at: float = OLD,
    owner: Owner | None = None,
    **kwargs: object,
) -> str:
    """A saga that ran its three steps and ended in `status` at time `at`; its first
    step claimed by a worker process of `owner` first, if given."""
    sid = started(st, created_at=at - 60, **kwargs).saga.saga_id
    if owner is not None:
        assert st.claim_step(sid, "a", Phase.FORWARD, 1, lease_until=at, now=at - 50, owner=owner)

    def finish(state: SagaState) -> Decision:
        done = status in SAGA_TERMINAL
        saga = replace(
            state.saga, status=status, updated_at=at, finished_at=at if done else None, due_at=None
        )
        steps = [
            replace(r, status=StepStatus.SUCCEEDED, due_at=None, finished_at=at)
            for r in state.steps.values()
        ]
        return Decision(
            saga=saga,
            saga_version=state.saga.version,
            steps=steps,
            step_versions={r.name: r.version for r in state.steps.values()},
            events=[Event(sid, "step_succeeded", at, r.name) for r in steps],
        )

    assert st.transact(sid, finish) is not None
    return sid


def exists(st: Store, sid: str) -> bool:
    return st.get_saga(sid) is not None


def test_gc_deletes_old_finished_sagas_with_everything_they_own(store: Store) -> None:
    old = ended(store, key="order-1")
    compensated = ended(store, SagaStatus.COMPENSATED)
    before = len(store.history(old))
    report = store.gc(CUTOFF)
    assert report.sagas == {SagaStatus.COMPLETED: 1, SagaStatus.COMPENSATED: 1}
    assert (report.steps, report.events) == (6, 2 * before)
    assert report.kept == 0 and not report.dry_run
    for sid in (old, compensated):
        assert store.get_saga(sid) is None
        assert store.get_steps(sid) == [] and store.history(sid) == []
        assert store.read_state(sid) is None
    assert store.list_sagas(SagaFilter(limit=100)) == []
    assert store.list_sagas(SagaFilter(name="contract", status=[SagaStatus.COMPLETED])) == []
    assert set(store.count_by_status().values()) == {0}
    assert set(store.count_by_status("contract").values()) == {0}
    assert store.find_due(T0 + 10**9) == []
    # The idempotency key is free again: a new saga takes it.
    again = started(store, key="order-1")
    assert store.get_saga(again.saga.saga_id) is not None


def test_gc_keeps_running_recent_and_unchosen_sagas(store: Store) -> None:
    running = started(store, created_at=OLD).saga.saga_id
    compensating = ended(store, SagaStatus.COMPENSATING)
    recent = ended(store, at=RECENT)
    failed = ended(store, SagaStatus.FAILED)
    old = ended(store)
    report = store.gc(CUTOFF)
    assert report.sagas == {SagaStatus.COMPLETED: 1}
    assert not exists(store, old)
    assert all(exists(store, sid) for sid in (running, compensating, recent, failed))
    assert len(store.history(recent)) > 0 and len(store.get_steps(failed)) == 3
    # FAILED sagas wait for an operator: deleted only when asked for.
    asked = store.gc(CUTOFF, statuses=["failed"])
    assert asked.sagas == {SagaStatus.FAILED: 1} and not exists(store, failed)
    assert all(exists(store, sid) for sid in (running, compensating, recent))


def test_gc_refuses_a_non_terminal_status_or_a_bad_batch_size(store: Store) -> None:
    with pytest.raises(InputError, match=r"finished sagas only \(.*\), not RUNNING$"):
        store.gc(CUTOFF, statuses=[SagaStatus.RUNNING])
    with pytest.raises(InputError, match=re.escape("batch size must be 1..10000, got 0")):
        store.gc(CUTOFF, batch_size=0)
    with pytest.raises(InputError, match=re.escape("unknown status 'done' (one of compensated")):
        store.gc(CUTOFF, statuses=["done"])


def test_gc_filters_by_status_and_name(store: Store) -> None:
    a = ended(store, name="alpha")
    b = ended(store, name="beta")
    c = ended(store, SagaStatus.COMPENSATED, name="alpha")
    report = store.gc(CUTOFF, statuses=[SagaStatus.COMPENSATED], name="alpha")
    assert report.sagas == {SagaStatus.COMPENSATED: 1}
    assert not exists(store, c) and exists(store, a) and exists(store, b)
    assert store.gc(CUTOFF, name="beta").total == 1 and not exists(store, b)
    assert store.gc(CUTOFF, name="nobody").total == 0 and exists(store, a)


def test_a_child_saga_stays_while_its_parent_runs_and_goes_with_its_parent(store: Store) -> None:
    parent = started(store, created_at=OLD).saga.saga_id  # still running
    child = ended(store, parent=parent)
    grandchild = ended(store, SagaStatus.COMPENSATED, parent=child)
    assert store.gc(CUTOFF).total == 0
    assert exists(store, child) and exists(store, grandchild)

    done = ended(store, at=RECENT)  # a finished parent whose child is still running
    running_child = started(store, created_at=OLD, parent=done).saga.saga_id
    kept = store.gc(RECENT + 1)
    assert kept.total == 0 and kept.kept == 1
    assert exists(store, done) and exists(store, running_child)

    root = ended(store)  # a finished tree: it goes as a whole
    kid = ended(store, SagaStatus.COMPENSATED, parent=root)
    kid_of_kid = ended(store, parent=kid)
    report = store.gc(CUTOFF)
    assert report.sagas == {SagaStatus.COMPLETED: 2, SagaStatus.COMPENSATED: 1}
    assert not any(exists(store, s) for s in (root, kid, kid_of_kid))
    assert store.list_sagas(SagaFilter(parent_saga_id=root)) == []
    assert exists(store, parent) and exists(store, child) and exists(store, grandchild)


def test_a_child_whose_parent_is_gone_is_collected_on_its_own(store: Store) -> None:
    orphan = ended(store, parent="00000000-0000-4000-8000-000000000000")
    assert store.gc(CUTOFF).sagas == {SagaStatus.COMPLETED: 1}
    assert not exists(store, orphan)


def test_dry_run_counts_what_a_real_run_deletes_and_deletes_nothing(store: Store) -> None:
    ids = [ended(store, s) for s in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED) * 3]
    root = ended(store)
    ended(store, parent=root)
    kept = ended(store, at=RECENT)
    dry = store.gc(CUTOFF, dry_run=True, batch_size=2)
    assert dry.dry_run and dry.total == 8
    assert all(exists(store, sid) for sid in [*ids, root, kept])
    assert len(store.history(ids[0])) > 0
    real = store.gc(CUTOFF, batch_size=2)
    assert (real.sagas, real.steps, real.events) == (dry.sagas, dry.steps, dry.events)
    assert real.sagas == {SagaStatus.COMPLETED: 5, SagaStatus.COMPENSATED: 3}
    assert [s.saga_id for s in store.list_sagas(SagaFilter(limit=100))] == [kept]


def test_gc_works_in_batches_and_stops_after_max_batches(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis deletes a batch in several scripts: here, of two sagas each.
    monkeypatch.setattr(redis_gc, "SCRIPT_SAGAS", 2)
    ids = {ended(store) for _ in range(7)}
    first = store.gc(CUTOFF, batch_size=3, max_batches=1)
    assert first.total == 3 and first.batches == 1 and first.more
    left = {s.saga_id for s in store.list_sagas(SagaFilter(limit=100))}
    assert len(left) == 4 and left < ids
    second = store.gc(CUTOFF, batch_size=3, max_batches=1, after=first.cursor)
    assert second.total == 3 and second.more
    rest = store.gc(CUTOFF, batch_size=3)
    assert rest.total == 1 and rest.batches == 1 and not rest.more and rest.cursor is None
    assert store.list_sagas(SagaFilter(limit=100)) == []


def test_a_run_continued_from_its_cursor_passes_over_the_trees_it_kept(store: Store) -> None:
    # Two finished parents with a running child each come first (in every store's
    # order: older, and lower ids), then one saga that can go.
    for n in (1, 2):
        parent = ended(store, at=OLD - 1000, saga_id=f"00000000-0000-4000-8000-00000000000{n}")
        started(store, created_at=OLD, parent=parent)
    free = ended(store, saga_id="ffffffff-0000-4000-8000-000000000000")
    first = store.gc(CUTOFF, batch_size=2, max_batches=1)
    assert (first.total, first.kept, first.more) == (0, 2, True)
    assert store.gc(CUTOFF, batch_size=2, max_batches=1).total == 0  # the same two again
    second = store.gc(CUTOFF, batch_size=2, max_batches=1, after=first.cursor)
    assert second.total == 1 and not exists(store, free)


def test_gc_passes_over_sagas_it_keeps_to_reach_older_ones(store: Store) -> None:
    # Created long ago but still running, or ended recently: more of them than a
    # batch holds, each passed over without stopping the run.
    keep = [started(store, created_at=OLD - 100).saga.saga_id for _ in range(4)]
    keep += [ended(store, at=RECENT) for _ in range(2)]
    old = [ended(store) for _ in range(3)]
    report = store.gc(CUTOFF, batch_size=2)
    assert report.total == 3
    assert not any(exists(store, s) for s in old) and all(exists(store, s) for s in keep)


def test_a_saga_without_finished_at_falls_back_to_updated_at(store: Store) -> None:
    sid = ended(store)

    def forget(state: SagaState) -> Decision:  # as stored before finished_at existed
        saga = replace(state.saga, finished_at=None, updated_at=OLD)
        return Decision(saga=saga, saga_version=state.saga.version)

    store.transact(sid, forget)
    stored = store.get_saga(sid)
    assert stored is not None and stored.finished_at is None
    assert store.gc(OLD).total == 0 and exists(store, sid)
    assert store.gc(CUTOFF).total == 1 and not exists(store, sid)


def reopen(st: Store, sid: str) -> None:
    """What `resume` or a parent's rollback does: the finished saga compensates again."""

    def decide(state: SagaState) -> Decision:
        saga = replace(state.saga, status=SagaStatus.COMPENSATING, finished_at=None)
        return Decision(saga=saga, saga_version=state.saga.version)

    assert st.transact(sid, decide) is not None


def test_a_tree_that_changed_since_it_was_read_is_kept(store: Store) -> None:
    resumed = ended(store, SagaStatus.FAILED)
    root = ended(store, SagaStatus.FAILED)
    child = ended(store, parent=root)
    rule = GcRule.of(CUTOFF, ["failed"], 10)
    roots, cursor = store._gc_candidates(rule, None, 10, None)
    assert sorted(roots) == sorted([(resumed, SagaStatus.FAILED), (root, SagaStatus.FAILED)])
    assert cursor is None
    trees = gather_trees(roots, store._gc_children)
    assert {t.root: set(t.sagas) for t in trees} == {resumed: {resumed}, root: {root, child}}
    reopen(store, resumed)  # between the read and the delete
    reopen(store, child)
    removed = store._gc_delete(trees, rule)
    assert removed.trees == 0 and removed.sagas == {}
    assert all(exists(store, s) for s in (resumed, root, child))
    assert len(store.get_steps(child)) == 3 and len(store.history(child)) > 0


def test_concurrent_gc_runs_delete_each_saga_exactly_once(store: Store) -> None:
    ids = [ended(store) for _ in range(24)]
    reports = run_threads(3, lambda i: store.gc(CUTOFF, batch_size=4))
    assert sum(r.total for r in reports) == 24
    assert sum(r.steps for r in reports) == 24 * 3
    assert not any(exists(store, s) for s in ids)


@pytest.mark.parametrize("store", ["postgresql", "mariadb"], indirect=True)
def test_a_batch_found_gone_does_not_hide_the_next_batch_from_another_run(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run A deletes a batch that run B read too. B's delete of it, its transaction
    still open, must not keep run C from deleting the next batch. (On MariaDB, REPEATABLE
    READ gave B next-key locks past the ids it looked up, on the next batch's rows, and
    C's SKIP LOCKED passed the batch by: three concurrent runs left a batch of 4 behind
    once in 40 to 281 repetitions.)"""
    ids = sorted(ended(store) for _ in range(8))
    rule = GcRule.of(CUTOFF, ["completed"], 4)

    def trees(sids: list[str]) -> list[GcTree]:
        return gather_trees([(s, SagaStatus.COMPLETED) for s in sids], store._gc_children)

    gone, following = trees(ids[:4]), trees(ids[4:])
    assert store._gc_delete(gone, rule).trees == 4  # run A
    inside, release = threading.Event(), threading.Event()
    children = sql_gc.children

    def held_open(conn: Any, sids: list[str]) -> Any:
        if threading.current_thread().name == "run B":
            inside.set()
            assert release.wait(30)
        return children(conn, sids)

    monkeypatch.setattr(sql_gc, "children", held_open)
    found: list[int] = []
    b = threading.Thread(
        target=lambda: found.append(store._gc_delete(gone, rule).trees), name="run B"
    )
    b.start()
    try:
        assert inside.wait(30)
        assert store._gc_delete(following, rule).trees == 4  # run C
    finally:
        release.set()
        b.join(30)
    assert found == [0]
    assert not any(exists(store, s) for s in ids)
