"""One conformance suite for every state store, on real servers.

Each test runs against memory://, SQLite (a temporary file), PostgreSQL (the
shared server), MariaDB (the local server) and, when its module exists, Redis: a
single server and a private Redis Cluster of three masters.
To add a store: add its id to STORES and a branch to `store_url`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sagaline.config import Settings
from sagaline.definition import Saga
from sagaline.exceptions import IdempotencyConflict, InputError, SagaNotFound
from sagaline.records import (
    Decision,
    Event,
    Owner,
    SagaFilter,
    SagaRecord,
    SagaState,
    StepRecord,
)
from sagaline.runtime import Runtime
from sagaline.states import CompensationStatus, Phase, SagaStatus, StepStatus
from sagaline.stores import Store, pg_hot, schema, store_from_url
from sagaline.stores.base import DueItem
from sagaline.stores.sanitize import CUT_MARKER, MAX_TEXT, storable_text
from sagaline.stores.schema import VERSION_TABLE
from sagaline.stores.sql import SQLStore
from sagaline.stores.sql_statements import LOCK_SAGA, write_decision
from tests.harness import drop_database, shared_postgres_url
from tests.stores import (
    T0,
    THREADS,
    Read,
    counted_reads,
    create_mariadb_database,
    delete_prefix,
    drop_mariadb_database,
    make_state,
    run_threads,
)

pytestmark = pytest.mark.timeout(120)

SQL_TABLES = ("sagaline_events", "sagaline_steps", "sagaline_sagas")

# postgresql-pipelined: PostgreSQL with every decision written as a pipeline of
# statements, as it is when one is too large for one statement (pg_hot.py).
STORES = ["memory", "sqlite", "postgresql", "postgresql-pipelined", "mariadb"]
if importlib.util.find_spec("sagaline.stores.redis") is not None:
    STORES += ["redis", "redis-cluster"]

# Stores whose transact holds a lock that claims also wait for (no claim can slip in).
DECIDES_UNDER_A_GLOBAL_LOCK = ("memory:", "sqlite:")
LEASE = 60.0


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mariadb_url() -> Iterator[str]:
    url = create_mariadb_database()
    try:
        yield url
    finally:
        drop_mariadb_database(url)


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A store of each kind, empty at the start of the test."""
    kind: str = request.param
    options: dict[str, Any] = {}
    if kind == "memory":
        url = "memory://"
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path}/state.db"
    elif kind in ("postgresql", "postgresql-pipelined"):
        url = request.getfixturevalue("pg_url")
        if kind == "postgresql-pipelined":
            request.getfixturevalue("monkeypatch").setattr(pg_hot, "ONE_STATEMENT_PARAMS", 0)
    elif kind == "mariadb":
        url = request.getfixturevalue("mariadb_url")
    elif kind in ("redis", "redis-cluster"):
        # A private key prefix keeps tests apart on the test server.
        prefix = f"sagaline-contract-{uuid.uuid4().hex[:10]}"
        server = "redis_url" if kind == "redis" else "redis_cluster_url"
        url, options["prefix"] = request.getfixturevalue(server), prefix
    else:  # pragma: no cover - a new entry of STORES without its branch here
        raise AssertionError(kind)
    st = store_from_url(url, **options)
    # Another client of the same data, as another worker has (memory: the same store).
    request.node.stash[TWIN] = (
        (lambda: st) if kind == "memory" else (lambda: store_from_url(url, **options))
    )
    if isinstance(st, SQLStore) and kind in ("postgresql", "postgresql-pipelined", "mariadb"):
        st.migrate()
        with st.engine.begin() as conn:
            for table in SQL_TABLES:
                conn.execute(sa.text(f"DELETE FROM {table}"))
    try:
        yield st
    finally:
        if kind in ("redis", "redis-cluster"):
            delete_prefix(st._client, options["prefix"])  # type: ignore[attr-defined]
        st.close()


TWIN = pytest.StashKey[Callable[[], Store]]()


@pytest.fixture
def twin(store: Store, request: pytest.FixtureRequest) -> Iterator[Store]:
    """A second client of `store`'s data (the same store for memory://)."""
    other = request.node.stash[TWIN]()
    try:
        yield other
    finally:
        if other is not store:
            other.close()


# -- records -------------------------------------------------------------------------


def started(st: Store, **kwargs: Any) -> SagaState:
    state = make_state(**kwargs)
    events = [
        Event(state.saga.saga_id, "saga_started", state.saga.created_at),
        Event(state.saga.saga_id, "step_dispatched", state.saga.created_at, "a", 1, "forward"),
    ]
    _, created = st.create_saga(state, events)
    assert created
    return state


def step_of(st: Store, saga_id: str, name: str) -> StepRecord:
    (rec,) = [s for s in st.get_steps(saga_id) if s.name == name]
    return rec


def change_step(state: SagaState, name: str, **fields: Any) -> Decision:
    """A decision that changes one step, compare-and-set on the version it read."""
    rec = state.steps[name]
    return Decision(
        steps=[replace(rec, **fields)],
        step_versions={name: rec.version},
        events=[Event(state.saga.saga_id, "changed", T0, name)],
    )


def defaulted_fields(rec: Any) -> list[str]:
    """The fields of a record that still hold their default value."""
    found = []
    for f in fields(rec):
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            continue  # a required field: always set by the caller
        if getattr(rec, f.name) == default:
            found.append(f.name)
    return found


# -- create and read -------------------------------------------------------------------


def test_create_saga_round_trips_every_field(store: Store) -> None:
    sid = str(uuid.uuid4())
    nested = {
        "order": {"id": "ördér-✓", "lines": [1, 2.5, None, True, {"sku": "ü"}]},
        "empty": {},
        "list": [],
        "emoji": "🚀",
    }
    saga = SagaRecord(
        saga_id=sid,
        name="round_trip",
        status=SagaStatus.COMPENSATING,
        input=nested,
        fingerprint="0123456789abcdef",
        created_at=T0,
        updated_at=T0 + 1.5,
        idempotency_key="key-ñ-1",
        output={"done": [1, {"x": None}]},
        error="Boom: ✗ failed",
        failed_step="b",
        finished_at=T0 + 2.25,
        deadline=T0 + 60,
        due_at=T0 + 61.5,
        parent_saga_id=str(uuid.uuid4()),
        parent_step="child",
        version=7,
        input_fingerprint="0123456789abcdef" * 2,
        trace_context="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01:00f067aa0ba902b7",
    )
    steps = {
        "a": StepRecord(
            sid,
            "a",
            0,
            status=StepStatus.SUCCEEDED,
            attempt=2,
            comp_status=CompensationStatus.COMPENSATION_FAILED,
            comp_attempt=3,
            output={"txn": "t-1", "nested": {"k": [1, 2]}},
            compensation_data={"refund": 9.99},
            has_compensation_data=True,
            error="Timeout: first try",
            comp_error="Refused: ✗",
            lease_until=T0 + 90.5,
            due_at=T0 + 90.5,
            started_at=T0 + 0.5,
            finished_at=T0 + 1.0,
            redispatches=4,
            version=9,
            owner_node="celery@host-ü",
            owner_boot="b" * 32,
            owner_pid=4321,
            depends_on=["root", "other ✓"],
        ),
        "b": StepRecord(
            sid,
            "b",
            1,
            status=StepStatus.FAILED,
            attempt=1,
            output="plain ✓",
            compensation_data=None,
            has_compensation_data=True,
            depends_on=[],
        ),
        "c": StepRecord(sid, "c", 2, status=StepStatus.CANCELLED, output=[1, "two"]),
    }
    events = [
        Event(sid, "saga_started", T0, detail={"name": "round_trip", "deep": {"k": "✓"}}),
        Event(sid, "step_dispatched", T0 + 0.25, "a", 1, "forward"),
        Event(
            sid,
            "compensation_failed",
            T0 + 0.5,
            "a",
            3,
            "compensate",
            detail={"error": "Refused: ✗", "permanent": True},
        ),
    ]
    # Every field differs from its default, so a field that a store forgets to keep
    # fails below. The one exception: an event's seq is the store's to assign.
    assert defaulted_fields(saga) == []
    assert defaulted_fields(steps["a"]) == []
    assert defaulted_fields(events[2]) == ["seq"]
    record, created = store.create_saga(
        SagaState(copy.deepcopy(saga), copy.deepcopy(steps)), events
    )
    assert created
    assert record.saga_id == sid
    assert store.get_saga(sid) == saga
    assert store.get_steps(sid) == [steps["a"], steps["b"], steps["c"]]
    history = store.history(sid)
    assert [(e.kind, e.ts, e.step, e.attempt, e.phase, e.detail) for e in history] == [
        ("saga_started", T0, None, None, None, {"name": "round_trip", "deep": {"k": "✓"}}),
        ("step_dispatched", T0 + 0.25, "a", 1, "forward", {}),
        (
            "compensation_failed",
            T0 + 0.5,
            "a",
            3,
            "compensate",
            {"error": "Refused: ✗", "permanent": True},
        ),
    ]
    assert all(e.saga_id == sid and e.seq is not None for e in history)
    assert history[2] == replace(events[2], seq=history[2].seq)


def test_none_output_and_empty_dict_output_stay_distinct(store: Store) -> None:
    state = make_state()
    state.steps["a"].output = None
    state.steps["b"].output = {}
    state.steps["c"].output = 0
    state.saga.output = {}
    store.create_saga(state, [])
    outputs = {s.name: s.output for s in store.get_steps(state.saga.saga_id)}
    assert outputs == {"a": None, "b": {}, "c": 0}
    assert outputs["b"] is not None
    saga = store.get_saga(state.saga.saga_id)
    assert saga is not None and saga.output == {}


# Failure text that drivers refuse as such: NUL (PostgreSQL), a lone surrogate (SQLite,
# PostgreSQL, MySQL: not encodable as UTF-8), and a traceback bigger than a TEXT column.
HOSTILE_TEXT = {
    "nul": ("RuntimeError: bad\x00byte", "RuntimeError: bad\\x00byte"),
    "lone_surrogate": ("ValueError: \ud800 alone", "ValueError: \\ud800 alone"),
    "emoji_and_accents": ("Boom: ördér ✗ 🚀", "Boom: ördér ✗ 🚀"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TEXT))
def test_failure_text_that_drivers_refuse_is_stored_escaped(store: Store, case: str) -> None:
    raw, stored = HOSTILE_TEXT[case]
    state = make_state()
    sid = state.saga.saga_id
    state.saga.error = raw
    state.steps["a"].error = raw
    store.create_saga(state, [Event(sid, "saga_started", T0, detail={"error": raw})])
    saga = store.get_saga(sid)
    assert saga is not None and saga.error == stored
    assert step_of(store, sid, "a").error == stored

    store.transact(
        sid,
        lambda st: Decision(
            steps=[replace(st.steps["b"], comp_error=raw)],
            step_versions={"b": st.steps["b"].version},
            events=[
                Event(
                    sid,
                    "compensation_failed",
                    T0,
                    "b",
                    1,
                    "compensate",
                    {"error": raw, "nested": [{raw: raw}]},
                )
            ],
        ),
    )
    assert step_of(store, sid, "b").comp_error == stored
    last = store.history(sid)[-1]
    assert last.detail == {"error": stored, "nested": [{stored: stored}]}


def test_huge_failure_text_is_cut_with_a_visible_marker(store: Store) -> None:
    head, tail = "Traceback (most recent call last):\n", "\nRuntimeError: the real cause"
    raw = head + "x" * 200_000 + tail
    state = make_state()
    sid = state.saga.saga_id
    state.steps["a"].error = raw
    store.create_saga(state, [Event(sid, "step_failed", T0, "a", 1, "forward", {"error": raw})])
    stored = step_of(store, sid, "a").error
    assert stored is not None and stored == storable_text(raw)
    assert len(stored) <= MAX_TEXT
    assert stored.startswith(head) and stored.endswith(tail)
    match = re.search(r"\[\.\.\. (\d+) characters cut by sagaline \.\.\.\]", stored)
    assert match is not None
    cut = int(match.group(1))
    assert len(stored) - len(CUT_MARKER.format(n=cut)) + cut == len(raw)
    assert store.history(sid)[0].detail["error"] == stored


def test_reading_an_unknown_saga_finds_nothing(store: Store) -> None:
    missing = str(uuid.uuid4())
    assert store.get_saga(missing) is None
    assert store.get_steps(missing) == []
    assert store.history(missing) == []


# -- idempotency -------------------------------------------------------------------------


def test_second_create_with_the_same_key_returns_the_existing_saga(store: Store) -> None:
    first = started(store, name="orders", key="order-1")
    again = make_state(name="orders", key="order-1", input={"n": 2})
    record, created = store.create_saga(again, [Event(again.saga.saga_id, "saga_started", T0)])
    assert not created
    assert record.saga_id == first.saga.saga_id
    assert record.input == {"n": 1}
    assert store.get_saga(again.saga.saga_id) is None
    assert store.get_steps(again.saga.saga_id) == []
    assert store.history(again.saga.saga_id) == []
    assert len(store.history(first.saga.saga_id)) == 2


def test_idempotency_key_is_unique_per_saga_name_only(store: Store) -> None:
    started(store, name="orders", key="k-1")
    other_name = make_state(name="refunds", key="k-1")
    _, created = store.create_saga(other_name, [])
    assert created
    assert store.get_saga(other_name.saga.saga_id) is not None


def test_idempotency_keys_are_case_sensitive(store: Store) -> None:
    started(store, name="orders", key="Order-1")
    _, created = store.create_saga(make_state(name="orders", key="order-1"), [])
    assert created


def test_sagas_without_a_key_never_conflict(store: Store) -> None:
    started(store, name="orders")
    started(store, name="orders")
    assert store.count_by_status("orders")[SagaStatus.RUNNING] == 2


def test_concurrent_creates_with_one_key_create_exactly_one_saga(store: Store) -> None:
    barrier = threading.Barrier(20)
    results: list[tuple[str, str, bool]] = []

    def create(_: int) -> None:
        state = make_state(name="orders", key="race")
        barrier.wait(timeout=30)
        record, created = store.create_saga(state, [Event(state.saga.saga_id, "x", T0)])
        results.append((state.saga.saga_id, record.saga_id, created))

    run_threads(20, create)
    winners = [mine for mine, _, created in results if created]
    assert len(winners) == 1
    assert {got for _, got, _ in results} == set(winners)
    flt = SagaFilter(name="orders", limit=100)
    assert [s.saga_id for s in store.list_sagas(flt)] == winners
    assert len(store.history(winners[0])) == 1


# -- claims and leases -------------------------------------------------------------------


def test_claim_moves_a_dispatched_attempt_to_running_exactly_once(store: Store) -> None:
    state = started(store)
    sid = state.saga.saga_id
    assert store.claim_step(sid, "a", Phase.FORWARD, 1, lease_until=T0 + LEASE, now=T0 + 1)
    rec = step_of(store, sid, "a")
    assert rec.status is StepStatus.RUNNING
    assert (rec.attempt, rec.lease_until, rec.due_at, rec.started_at) == (
        1,
        T0 + LEASE,
        T0 + LEASE,
        T0 + 1,
    )
    assert rec.version > state.steps["a"].version
    last = store.history(sid)[-1]
    assert (last.kind, last.step, last.attempt, last.phase, last.ts) == (
        "step_started",
        "a",
        1,
        "forward",
        T0 + 1,
    )
    # A duplicate delivery of the same message is refused, and logs nothing.
    assert not store.claim_step(sid, "a", Phase.FORWARD, 1, lease_until=T0 + 99, now=T0 + 2)
    assert step_of(store, sid, "a").lease_until == T0 + LEASE
    assert len(store.history(sid)) == 3


def test_only_one_of_twenty_concurrent_claims_wins(store: Store) -> None:
    sid = started(store).saga.saga_id
    barrier = threading.Barrier(THREADS)
    won: list[bool | None] = [None] * THREADS

    def claim(i: int) -> None:
        barrier.wait(timeout=30)
        won[i] = store.claim_step(
            sid, "a", Phase.FORWARD, 1, lease_until=T0 + 1000 + i, now=T0 + 500
        )

    run_threads(THREADS, claim)
    assert won.count(True) == 1
    winner = won.index(True)
    step = step_of(store, sid, "a")
    assert (step.status, step.version, step.lease_until) == (
        StepStatus.RUNNING,
        1,
        T0 + 1000 + winner,
    )
    assert store.find_due(T0 + 2000) == [DueItem(sid, "a", T0 + 1000 + winner)]
    assert [e.kind for e in store.history(sid)] == [
        "saga_started",
        "step_dispatched",
        "step_started",
    ]
    # A stale attempt and a duplicate of the winning one are refused as well.
    assert not store.claim_step(sid, "a", Phase.FORWARD, 1, lease_until=T0 + 3000, now=T0 + 600)
    assert not store.claim_step(sid, "a", Phase.FORWARD, 0, lease_until=T0 + 3000, now=T0 + 600)


def test_claim_is_refused_for_a_stale_attempt_a_pending_step_or_the_wrong_phase(
    store: Store,
) -> None:
    sid = started(store).saga.saga_id
    kw: dict[str, float] = {"lease_until": T0 + LEASE, "now": T0}
    assert not store.claim_step(sid, "a", Phase.FORWARD, 2, **kw)
    assert not store.claim_step(sid, "a", Phase.FORWARD, 0, **kw)
    assert not store.claim_step(sid, "b", Phase.FORWARD, 0, **kw)  # PENDING, never dispatched
    assert not store.claim_step(sid, "a", Phase.COMPENSATE, 1, **kw)
    assert not store.claim_step(sid, "nope", Phase.FORWARD, 1, **kw)
    assert not store.claim_step(str(uuid.uuid4()), "a", Phase.FORWARD, 1, **kw)
    assert step_of(store, sid, "a").status is StepStatus.DISPATCHED
    assert [e.kind for e in store.history(sid)] == ["saga_started", "step_dispatched"]


def test_claim_of_a_compensation_moves_only_the_compensation_to_running(store: Store) -> None:
    state = make_state(status=SagaStatus.COMPENSATING)
    state.steps["a"] = replace(
        state.steps["a"],
        status=StepStatus.SUCCEEDED,
        comp_status=CompensationStatus.DISPATCHED,
        comp_attempt=2,
    )
    store.create_saga(state, [])
    sid = state.saga.saga_id
    assert not store.claim_step(sid, "a", Phase.COMPENSATE, 1, lease_until=T0 + LEASE, now=T0)
    assert not store.claim_step(sid, "a", Phase.FORWARD, 1, lease_until=T0 + LEASE, now=T0)
    assert store.claim_step(sid, "a", Phase.COMPENSATE, 2, lease_until=T0 + LEASE, now=T0 + 3)
    rec = step_of(store, sid, "a")
    assert rec.comp_status is CompensationStatus.RUNNING
    assert rec.status is StepStatus.SUCCEEDED
    assert (rec.lease_until, rec.due_at) == (T0 + LEASE, T0 + LEASE)
    (event,) = store.history(sid)
    assert (event.kind, event.step, event.attempt, event.phase) == (
        "compensation_started",
        "a",
        2,
        "compensate",
    )
    assert not store.claim_step(sid, "a", Phase.COMPENSATE, 2, lease_until=T0 + LEASE, now=T0)


def test_renew_lease_extends_only_the_running_claim(store: Store) -> None:
    sid = started(store).saga.saga_id
    assert not store.renew_lease(sid, "a", Phase.FORWARD, 1, T0 + 100)  # not claimed yet
    store.claim_step(sid, "a", Phase.FORWARD, 1, lease_until=T0 + LEASE, now=T0)
    assert not store.renew_lease(sid, "a", Phase.FORWARD, 2, T0 + 100)
    assert not store.renew_lease(sid, "a", Phase.COMPENSATE, 1, T0 + 100)
    assert not store.renew_lease(sid, "b", Phase.FORWARD, 0, T0 + 100)
    assert store.renew_lease(sid, "a", Phase.FORWARD, 1, T0 + 120)
    rec = step_of(store, sid, "a")
    assert (rec.status, rec.lease_until, rec.due_at) == (StepStatus.RUNNING, T0 + 120, T0 + 120)
    assert rec.version == 2  # the claim, then the renewal: a racing decision must re-read
    # Once the step is settled the old claim cannot renew anything.
    store.transact(
        sid,
        lambda s: change_step(s, "a", status=StepStatus.SUCCEEDED, lease_until=None, due_at=None),
    )
    assert not store.renew_lease(sid, "a", Phase.FORWARD, 1, T0 + 200)
    assert step_of(store, sid, "a").lease_until is None


def test_a_claim_records_its_owner_and_the_next_claim_replaces_it(store: Store) -> None:
    sid = started(store).saga.saga_id
    owner = Owner("w1@host", "boot-1", 4242)
    assert step_of(store, sid, "a").owner is None
    assert store.claim_step(sid, "a", Phase.FORWARD, 1, lease_until=T0 + LEASE, now=T0, owner=owner)
    rec = step_of(store, sid, "a")
    assert rec.owner == owner
    assert (rec.owner_node, rec.owner_boot, rec.owner_pid) == ("w1@host", "boot-1", 4242)
    # A refused claim leaves the owner alone; renewals keep it.
    assert not store.claim_step(
        sid,
        "a",
        Phase.FORWARD,
        1,
        lease_until=T0 + LEASE,
        now=T0,
        owner=Owner("w2@host", "boot-2", 1),
    )
    assert store.renew_lease(sid, "a", Phase.FORWARD, 1, T0 + 120)
    assert step_of(store, sid, "a").owner == owner
    # The next attempt, claimed outside any worker, has no owner.
    store.transact(
        sid,
        lambda s: change_step(
            s, "a", status=StepStatus.DISPATCHED, attempt=2, lease_until=None, due_at=T0 + 30
        ),
    )
    assert store.claim_step(sid, "a", Phase.FORWARD, 2, lease_until=T0 + LEASE, now=T0)
    assert step_of(store, sid, "a").owner is None


def test_find_claimed_returns_the_running_claims_of_one_node_only(store: Store) -> None:
    mine, other = Owner("w1@host", "boot-1", 11), Owner("w2@host", "boot-9", 11)
    kw: dict[str, float] = {"lease_until": T0 + LEASE, "now": T0}
    forward = started(store).saga.saga_id
    store.claim_step(forward, "a", Phase.FORWARD, 1, owner=mine, **kw)
    elsewhere = started(store).saga.saga_id
    store.claim_step(elsewhere, "a", Phase.FORWARD, 1, owner=other, **kw)
    unowned = started(store).saga.saga_id
    store.claim_step(unowned, "a", Phase.FORWARD, 1, **kw)
    comp = make_state(status=SagaStatus.COMPENSATING)
    comp.steps["a"] = replace(
        comp.steps["a"],
        status=StepStatus.SUCCEEDED,
        comp_status=CompensationStatus.DISPATCHED,
        comp_attempt=1,
    )
    store.create_saga(comp, [])
    store.claim_step(
        comp.saga.saga_id, "a", Phase.COMPENSATE, 1, owner=Owner("w1@host", "boot-0", 12), **kw
    )
    only_dispatched = started(store).saga.saga_id  # never claimed

    found = store.find_claimed("w1@host")
    assert sorted((r.saga_id, r.running_phase, r.owner) for r in found) == sorted(
        [
            (forward, Phase.FORWARD, mine),
            (comp.saga.saga_id, Phase.COMPENSATE, Owner("w1@host", "boot-0", 12)),
        ]
    )
    assert {r.saga_id for r in store.find_claimed("w2@host")} == {elsewhere}
    assert store.find_claimed("w3@host") == []
    assert len(store.find_claimed("w1@host", limit=1)) == 1
    assert only_dispatched not in {r.saga_id for r in found}
    # Once the claim ends (the step settled, or handed back for a retry), it is not found,
    # though the step keeps the owner of its last claim.
    store.transact(
        forward,
        lambda s: change_step(s, "a", status=StepStatus.SUCCEEDED, lease_until=None, due_at=None),
    )
    store.transact(
        comp.saga.saga_id,
        lambda s: change_step(
            s,
            "a",
            comp_status=CompensationStatus.DISPATCHED,
            comp_attempt=2,
            lease_until=None,
            due_at=T0 + 30,
        ),
    )
    assert store.find_claimed("w1@host") == []
    assert step_of(store, forward, "a").owner == mine
    assert {r.saga_id for r in store.find_claimed("w2@host")} == {elsewhere}


# -- transact ------------------------------------------------------------------------------


def test_transact_decides_on_the_stored_state_and_writes_the_decision(store: Store) -> None:
    state = started(store)
    sid = state.saga.saga_id
    store.claim_step(sid, "a", Phase.FORWARD, 1, lease_until=T0 + LEASE, now=T0)
    claimed_a = step_of(store, sid, "a")
    seen: list[SagaState] = []

    def decide(current: SagaState) -> Decision:
        seen.append(copy.deepcopy(current))
        saga = replace(
            current.saga,
            status=SagaStatus.COMPLETED,
            output={"r": [1, "✓"]},
            finished_at=T0 + 5,
            due_at=None,
        )
        a = replace(
            current.steps["a"],
            status=StepStatus.SUCCEEDED,
            output={"x": 1},
            lease_until=None,
            due_at=None,
        )
        b = replace(current.steps["b"], status=StepStatus.SKIPPED)
        return Decision(
            saga=saga,
            steps=[a, b],
            events=[
                Event(sid, "step_succeeded", T0 + 5, "a", 1, "forward"),
                Event(sid, "saga_completed", T0 + 5),
            ],
            saga_version=current.saga.version,
            step_versions={"a": current.steps["a"].version, "b": current.steps["b"].version},
        )

    written = store.transact(sid, decide)
    assert written is not None
    (snapshot,) = seen
    # decide saw exactly what the store held, claim included.
    assert snapshot.saga == state.saga
    assert snapshot.steps["a"] == claimed_a
    assert snapshot.steps["b"] == state.steps["b"]
    assert set(snapshot.steps) == {"a", "b", "c"}

    saga = store.get_saga(sid)
    assert saga is not None
    assert (saga.status, saga.output, saga.finished_at, saga.due_at) == (
        SagaStatus.COMPLETED,
        {"r": [1, "✓"]},
        T0 + 5,
        None,
    )
    assert saga.version == snapshot.saga.version + 1
    steps = {s.name: s for s in store.get_steps(sid)}
    assert (steps["a"].status, steps["a"].output) == (StepStatus.SUCCEEDED, {"x": 1})
    assert steps["a"].version == snapshot.steps["a"].version + 1
    assert steps["b"].status is StepStatus.SKIPPED
    assert steps["c"] == state.steps["c"]  # untouched
    assert [e.kind for e in store.history(sid)][-2:] == ["step_succeeded", "saga_completed"]


def test_transact_without_a_decision_writes_nothing(store: Store) -> None:
    state = started(store)
    sid = state.saga.saga_id
    assert store.transact(sid, lambda s: None) is None
    empty = Decision()
    assert store.transact(sid, lambda s: empty) is empty
    assert store.get_saga(sid) == state.saga
    assert len(store.history(sid)) == 2
    called: list[SagaState] = []
    assert store.transact(str(uuid.uuid4()), lambda s: called.append(s)) is None  # type: ignore[func-returns-value]
    assert called == []


def test_transact_never_overwrites_a_claim_that_raced_it(store: Store) -> None:
    """A claim that commits while `decide` runs forces a fresh read and a new decision."""
    state = started(store)
    sid = state.saga.saga_id
    seen: list[StepRecord] = []
    claimed: list[bool] = []
    claimers: list[threading.Thread] = []

    def claim() -> None:
        claimed.append(store.claim_step(sid, "a", Phase.FORWARD, 1, lease_until=T0 + LEASE, now=T0))

    def decide(current: SagaState) -> Decision | None:
        seen.append(copy.deepcopy(current.steps["a"]))
        if len(seen) == 1:
            # Another worker claims the step on another connection. A store that holds
            # a write lock across decide (SQLite) makes it wait until we commit.
            t = threading.Thread(target=claim)
            claimers.append(t)
            t.start()
            t.join(timeout=1.0)
        if current.steps["a"].status is not StepStatus.DISPATCHED:
            return None  # the step is running: nothing to cancel any more
        return change_step(current, "a", status=StepStatus.CANCELLED, due_at=None)

    written = store.transact(sid, decide)
    claimers[0].join(timeout=60)
    assert not claimers[0].is_alive()
    a = step_of(store, sid, "a")
    if claimed == [True]:
        # The claim won: the cancellation was decided again on the fresh state.
        assert len(seen) == 2
        assert seen[1].status is StepStatus.RUNNING
        assert written is None
        assert a.status is StepStatus.RUNNING
        assert "changed" not in [e.kind for e in store.history(sid)]
    else:
        assert claimed == [False]
        assert a.status is StepStatus.CANCELLED
        assert written is not None
        assert "step_started" not in [e.kind for e in store.history(sid)]
    if not store.url.startswith(DECIDES_UNDER_A_GLOBAL_LOCK):
        # Claims do not take the saga's lock: the race really happens, and the claim wins.
        assert claimed == [True]


def test_transacts_of_one_saga_are_serialized(store: Store) -> None:
    """Two branches finishing together: the later decision sees the earlier one's write.

    Each decision changes only its own step, so versions alone cannot catch the
    conflict; without serialization neither would see the other succeed and the
    step joining them would never start.
    """
    sid = started(store).saga.saga_id
    seen: dict[str, list[StepStatus]] = {"b": [], "c": []}
    others: list[threading.Thread] = []

    def finish(mine: str, other: str) -> Callable[[SagaState], Decision]:
        def decide(current: SagaState) -> Decision:
            seen[mine].append(current.steps[other].status)
            if mine == "c" and len(seen["c"]) == 1:
                t = threading.Thread(target=store.transact, args=(sid, finish("b", "c")))
                others.append(t)
                t.start()
                t.join(timeout=1.0)  # it commits now, or waits for us to commit
            return change_step(current, mine, status=StepStatus.SUCCEEDED)

        return decide

    store.transact(sid, finish("c", "b"))
    others[0].join(timeout=60)
    assert not others[0].is_alive()
    steps = {s.name: s.status for s in store.get_steps(sid)}
    assert (steps["b"], steps["c"]) == (StepStatus.SUCCEEDED, StepStatus.SUCCEEDED)
    # Whichever committed last decided on a state holding the other's success.
    assert StepStatus.SUCCEEDED in (seen["b"][-1], seen["c"][-1])


# Stores that decide without the saga's lock: on what a step's claim read (PostgreSQL,
# Redis), and on any read (Redis: its write checks the saga's `txn` instead).
DECIDES_WITHOUT_A_LOCK = {True: ("postgresql", "redis"), False: ("redis",)}


@pytest.mark.parametrize("claimed", [True, False], ids=["on-claims-reads", "on-fresh-reads"])
def test_branches_finishing_together_start_the_join_once(
    store: Store, twin: Store, claimed: bool
) -> None:
    """Two workers each finish a branch, both deciding before either writes: each on
    what its own claim read (`claimed`), or on a read of its own. Each changes only
    its own step: the saga's version (Redis: its `txn`), moved on by every written
    decision, or the saga's lock, is what makes the later decision see the other's
    success; without either, neither would start the step joining them."""
    state = make_state(steps=("b", "c", "d"))
    sid = state.saga.saga_id
    branch = StepStatus.DISPATCHED if claimed else StepStatus.RUNNING
    for name in "bc":
        state.steps[name] = replace(state.steps[name], status=branch, attempt=1)
    store.create_saga(state, [])
    if claimed:
        assert store.claim_step(sid, "b", Phase.FORWARD, 1, lease_until=T0 + LEASE, now=T0)
        assert twin.claim_step(sid, "c", Phase.FORWARD, 1, lease_until=T0 + LEASE, now=T0)
    both_read = threading.Barrier(2)
    calls: list[str] = []

    def finish(mine: str, other: str) -> Callable[[SagaState], Decision]:
        def decide(current: SagaState) -> Decision:
            calls.append(mine)
            if calls.count(mine) == 1:
                # Both decide on their first read. A store that holds the saga's lock
                # while deciding makes the other wait: the barrier then breaks.
                with contextlib.suppress(threading.BrokenBarrierError):
                    both_read.wait(timeout=1)
            changed = [replace(current.steps[mine], status=StepStatus.SUCCEEDED)]
            events = [Event(sid, "step_succeeded", T0 + 1, mine, 1, "forward")]
            if current.steps[other].status is StepStatus.SUCCEEDED:
                changed.append(replace(current.steps["d"], status=StepStatus.DISPATCHED, attempt=1))
                events.append(Event(sid, "step_dispatched", T0 + 1, "d", 1, "forward"))
            return Decision(
                steps=changed,
                events=events,
                step_versions={r.name: current.steps[r.name].version for r in changed},
            )

        return decide

    clients = [store, twin]
    run_threads(2, lambda i: clients[i].transact(sid, finish(*("bc" if i == 0 else "cb"))))
    steps = {s.name: s for s in store.get_steps(sid)}
    assert [steps[n].status for n in "bcd"] == [
        StepStatus.SUCCEEDED,
        StepStatus.SUCCEEDED,
        StepStatus.DISPATCHED,
    ]
    assert [(e.kind, e.step) for e in store.history(sid)].count(("step_dispatched", "d")) == 1
    if store.url.startswith(DECIDES_WITHOUT_A_LOCK[claimed]):
        # Both decided on their first read, and the one that wrote second lost once.
        assert not both_read.broken
        assert sorted(calls) in (["b", "b", "c"], ["b", "c", "c"])
    else:
        assert sorted(calls) == ["b", "c"]


@pytest.mark.parametrize("fresh_sql_url", ["sqlite", "postgresql", "mariadb"], indirect=True)
def test_a_step_transactions_decision_makes_an_earlier_claims_read_lose(
    fresh_sql_url: str,
) -> None:
    """A step run in `sagaline.step_transaction()` writes its completion with
    `write_decision`, in the step's own transaction, under the saga's lock (outbox/
    step.py). A branch claimed before that commit keeps its claim's read for its own
    completion (PostgreSQL): the commit must move the saga's version on, so that the
    completion decided on that older read loses and decides again; else neither branch
    sees the other finished, and the step joining them never starts."""
    store, other = SQLStore(fresh_sql_url), SQLStore(fresh_sql_url)
    try:
        state = make_state(steps=("b", "c", "d"))
        sid = state.saga.saga_id
        for name in "bc":
            state.steps[name] = replace(state.steps[name], status=StepStatus.DISPATCHED, attempt=1)
        store.create_saga(state, [])
        assert store.claim_step(sid, "b", Phase.FORWARD, 1, lease_until=T0 + LEASE, now=T0)
        assert other.claim_step(sid, "c", Phase.FORWARD, 1, lease_until=T0 + LEASE, now=T0)
        # c finishes in a step transaction while b still runs: no join yet.
        c = {s.name: s for s in other.get_steps(sid)}["c"]
        with other.engine.begin() as conn:
            if other.dialect != "sqlite":
                conn.execute(LOCK_SAGA, {"k_saga_id": sid})
            assert write_decision(
                conn,
                sid,
                Decision(
                    steps=[replace(c, status=StepStatus.SUCCEEDED)],
                    events=[Event(sid, "step_succeeded", T0 + 1, "c", 1, "forward")],
                    step_versions={"c": c.version},
                ),
            )

        def finish_b(current: SagaState) -> Decision:
            changed = [replace(current.steps["b"], status=StepStatus.SUCCEEDED)]
            if current.steps["c"].status is StepStatus.SUCCEEDED:
                changed.append(replace(current.steps["d"], status=StepStatus.DISPATCHED, attempt=1))
            return Decision(
                steps=changed,
                step_versions={r.name: current.steps[r.name].version for r in changed},
            )

        store.transact(sid, finish_b)
        steps = {s.name: s for s in store.get_steps(sid)}
        assert [steps[n].status for n in "bcd"] == [
            StepStatus.SUCCEEDED,
            StepStatus.SUCCEEDED,
            StepStatus.DISPATCHED,
        ]
    finally:
        store.close()
        other.close()


def test_transact_rejects_a_decision_on_a_stale_saga_version(store: Store) -> None:
    """Concurrent read-modify-writes of one saga lose no update."""
    sid = started(store, input={"n": 0}).saga.saga_id

    def increment(current: SagaState) -> Decision:
        time.sleep(0.002)  # widen the window between read and write
        saga = replace(current.saga, output={"n": (current.saga.output or {"n": 0})["n"] + 1})
        return Decision(
            saga=saga, saga_version=current.saga.version, events=[Event(sid, "incremented", T0)]
        )

    def worker(_: int) -> None:
        for _ in range(10):
            store.transact(sid, increment)

    run_threads(4, worker)
    saga = store.get_saga(sid)
    assert saga is not None and saga.output == {"n": 40}
    assert [e.kind for e in store.history(sid)].count("incremented") == 40


def test_concurrent_transacts_on_one_saga_never_lose_an_update(store: Store) -> None:
    sid = started(store).saga.saga_id
    barrier = threading.Barrier(10)

    def bump(state: SagaState) -> Decision:
        saga = state.saga
        count = (saga.output or {}).get("count", 0) + 1
        return Decision(
            saga=replace(saga, output={"count": count}),
            saga_version=saga.version,
            events=[Event(sid, "bumped", time.time(), detail={"count": count})],
        )

    def worker(_: int) -> None:
        barrier.wait(timeout=30)
        store.transact(sid, bump)

    run_threads(10, worker)
    saga = store.get_saga(sid)
    assert saga is not None
    assert (saga.output, saga.version) == ({"count": 10}, 10)
    counts = [e.detail["count"] for e in store.history(sid) if e.kind == "bumped"]
    assert counts == list(range(1, 11))


def test_append_event_adds_history_without_changing_state(store: Store) -> None:
    state = started(store)
    sid = state.saga.saga_id
    store.append_event(Event(sid, "claim_refused", T0 + 1, "a", 3, "forward", {"why": "stale"}))
    last = store.history(sid)[-1]
    assert (last.kind, last.attempt, last.detail) == ("claim_refused", 3, {"why": "stale"})
    assert store.get_saga(sid) == state.saga
    assert step_of(store, sid, "a") == state.steps["a"]


# -- history ------------------------------------------------------------------------------


def test_events_are_appended_in_order_with_increasing_seq(store: Store) -> None:
    one = started(store).saga.saga_id
    two = started(store).saga.saga_id
    store.claim_step(one, "a", Phase.FORWARD, 1, lease_until=T0 + LEASE, now=T0)
    store.append_event(Event(two, "note", T0, detail={"i": 0}))
    for i in range(1, 4):
        store.append_event(Event(one, "note", T0 + i, detail={"i": i}))
    history = store.history(one)
    assert [e.kind for e in history] == [
        "saga_started",
        "step_dispatched",
        "step_started",
        "note",
        "note",
        "note",
    ]
    assert [e.detail.get("i") for e in history[3:]] == [1, 2, 3]
    seqs = [e.seq or 0 for e in history]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [e.kind for e in store.history(two)] == ["saga_started", "step_dispatched", "note"]

    later = store.history(one, after_seq=seqs[2])
    assert [e.seq for e in later] == seqs[3:]
    assert store.history(one, after_seq=seqs[-1]) == []


def with_notes(st: Store, n: int) -> str:
    """A started saga with `n` notes after its two events; another saga's note among them."""
    sid = started(st).saga.saga_id
    other = started(st).saga.saga_id
    for i in range(n):
        st.append_event(Event(sid, "note", T0 + i, detail={"i": i}))
    st.append_event(Event(other, "note", T0, detail={"i": -1}))
    return sid


def test_a_history_read_with_a_limit_is_the_oldest_events_after_the_seq(store: Store) -> None:
    sid = with_notes(store, 6)
    whole = store.history(sid)
    seqs = [e.seq for e in whole]
    assert len(seqs) == 8
    assert store.history(sid, limit=3) == whole[:3]
    assert store.history(sid, after_seq=seqs[2] or 0, limit=2) == whole[3:5]
    assert store.history(sid, after_seq=seqs[-3] or 0, limit=10) == whole[-2:]
    assert store.history(sid, limit=len(seqs)) == whole
    assert store.history(sid, after_seq=seqs[-1] or 0, limit=5) == []
    assert store.history(sid, limit=0) == []
    assert store.history("no-such-saga", limit=5) == []


def test_the_tail_of_a_history_is_its_newest_events_and_pages_back_by_seq(store: Store) -> None:
    sid = with_notes(store, 10)
    seqs = [e.seq for e in store.history(sid)]
    assert len(seqs) == 12
    newest = store.history_tail(sid, limit=5)
    assert [e.seq for e in newest] == seqs[-5:]
    assert [e.detail.get("i") for e in newest] == [5, 6, 7, 8, 9]
    earlier = store.history_tail(sid, limit=5, before_seq=newest[0].seq)
    assert [e.seq for e in earlier] == seqs[-10:-5]
    first = store.history_tail(sid, limit=5, before_seq=earlier[0].seq)
    assert [e.seq for e in first] == seqs[:2]
    assert first[0].kind == "saga_started"
    assert store.history_tail(sid, limit=5, before_seq=first[0].seq) == []
    assert [e.seq for e in store.history_tail(sid, limit=3, before_seq=2**62)] == seqs[-3:]
    assert [e.seq for e in store.history_tail(sid, limit=100)] == seqs
    assert store.history_tail("no-such-saga", limit=5) == []


# -- listing ------------------------------------------------------------------------------


def _catalog(st: Store) -> list[str]:
    """Six sagas, created one second apart: ids[i] was created at T0 + i."""
    statuses = [
        SagaStatus.RUNNING,
        SagaStatus.COMPLETED,
        SagaStatus.COMPENSATED,
        SagaStatus.FAILED,
        SagaStatus.RUNNING,
        SagaStatus.COMPLETED,
    ]
    ids = []
    for i, status in enumerate(statuses):
        state = make_state(
            name="alpha" if i % 2 == 0 else "beta",
            created_at=T0 + i,
            status=status,
            parent="parent-1" if i == 3 else None,
        )
        st.create_saga(state, [])
        ids.append(state.saga.saga_id)
    return ids


def test_list_sagas_filters_by_status_name_and_creation_time(store: Store) -> None:
    ids = _catalog(store)

    def listed(**kwargs: Any) -> list[str]:
        return [s.saga_id for s in store.list_sagas(SagaFilter(**kwargs))]

    assert listed() == ids[::-1]  # newest first
    assert listed(status=[SagaStatus.COMPLETED, SagaStatus.FAILED]) == [ids[5], ids[3], ids[1]]
    assert listed(status=[SagaStatus.PENDING]) == []
    assert listed(status=[]) == []
    assert listed(name="alpha") == [ids[4], ids[2], ids[0]]
    assert listed(name="gamma") == []
    assert listed(name="beta", status=[SagaStatus.COMPLETED]) == [ids[5], ids[1]]
    assert listed(created_after=T0 + 2) == [ids[5], ids[4], ids[3], ids[2]]  # inclusive
    assert listed(created_before=T0 + 2) == [ids[1], ids[0]]  # exclusive
    assert listed(created_after=T0 + 1, created_before=T0 + 4) == [ids[3], ids[2], ids[1]]
    assert listed(parent_saga_id="parent-1") == [ids[3]]
    full = store.list_sagas(SagaFilter(name="alpha", limit=1))
    assert full[0] == store.get_saga(ids[4])


def test_list_sagas_pages_with_limit_and_offset(store: Store) -> None:
    ids = _catalog(store)

    def listed(**kwargs: Any) -> list[str]:
        return [s.saga_id for s in store.list_sagas(SagaFilter(**kwargs))]

    assert listed(limit=2) == [ids[5], ids[4]]
    assert listed(limit=2, offset=2) == [ids[3], ids[2]]
    assert listed(limit=2, offset=4) == [ids[1], ids[0]]
    assert listed(limit=10, offset=6) == []
    assert listed(status=[SagaStatus.RUNNING, SagaStatus.COMPLETED], limit=2, offset=1) == [
        ids[4],
        ids[1],
    ]


def test_list_sagas_filters_by_idempotency_key_and_failed_step(store: Store) -> None:
    keyed = make_state(name="alpha", key="order-1", created_at=T0)
    store.create_saga(keyed, [])
    other = make_state(name="beta", key="order-1", created_at=T0 + 1)
    store.create_saga(other, [])
    failed = make_state(name="alpha", created_at=T0 + 2, status=SagaStatus.COMPENSATED)
    failed.saga.failed_step = "b"
    store.create_saga(failed, [])

    def listed(**kwargs: Any) -> list[str]:
        return [s.saga_id for s in store.list_sagas(SagaFilter(**kwargs))]

    assert listed(idempotency_key="order-1") == [other.saga.saga_id, keyed.saga.saga_id]
    assert listed(idempotency_key="order-1", name="alpha") == [keyed.saga.saga_id]
    assert listed(idempotency_key="ORDER-1") == []
    assert listed(failed_step="b") == [failed.saga.saga_id]
    assert listed(failed_step="a") == []
    assert listed(failed_step="b", status=[SagaStatus.RUNNING]) == []


def test_keyset_pages_follow_the_cursor_and_ignore_sagas_inserted_meanwhile(store: Store) -> None:
    # Two sagas share a creation time: the cursor's saga id orders the tie.
    times = [T0, T0 + 1, T0 + 1, T0 + 2, T0 + 3]
    states = [make_state(created_at=t) for t in times]
    for state in states:
        store.create_saga(state, [])
    order = [
        s.saga.saga_id
        for s in sorted(states, key=lambda s: (s.saga.created_at, s.saga.saga_id), reverse=True)
    ]
    first = store.list_sagas(SagaFilter(limit=2))
    assert [s.saga_id for s in first] == order[:2]
    store.create_saga(make_state(created_at=T0 + 10), [])  # newer: never on a later page
    cursor = (first[-1].created_at, first[-1].saga_id)
    second = store.list_sagas(SagaFilter(limit=2, before=cursor))
    assert [s.saga_id for s in second] == order[2:4]
    third = store.list_sagas(
        SagaFilter(limit=2, before=(second[-1].created_at, second[-1].saga_id))
    )
    assert [s.saga_id for s in third] == order[4:]
    running = store.list_sagas(SagaFilter(status=[SagaStatus.RUNNING], limit=10, before=cursor))
    assert [s.saga_id for s in running] == order[2:]


def test_steps_of_reads_the_steps_of_several_sagas_in_order(store: Store) -> None:
    first, second = started(store), started(store)
    found = store.steps_of([second.saga.saga_id, "no-such-saga", first.saga.saga_id, "bad\x00id"])
    assert set(found) == {first.saga.saga_id, second.saga.saga_id}
    for state in (first, second):
        rows = found[state.saga.saga_id]
        assert [r.name for r in rows] == ["a", "b", "c"]
        assert rows == store.get_steps(state.saga.saga_id)
    assert store.steps_of([]) == {}


def test_count_by_status_counts_every_status(store: Store) -> None:
    assert store.count_by_status() == dict.fromkeys(SagaStatus, 0)
    _catalog(store)
    expected = dict.fromkeys(SagaStatus, 0)
    expected.update(
        {
            SagaStatus.RUNNING: 2,
            SagaStatus.COMPLETED: 2,
            SagaStatus.COMPENSATED: 1,
            SagaStatus.FAILED: 1,
        }
    )
    assert store.count_by_status() == expected
    alpha = dict.fromkeys(SagaStatus, 0)
    alpha.update({SagaStatus.RUNNING: 2, SagaStatus.COMPENSATED: 1})
    assert store.count_by_status("alpha") == alpha


def test_count_by_status_follows_status_changes(store: Store) -> None:
    sid = started(store, name="moving").saga.saga_id
    store.transact(
        sid,
        lambda s: Decision(
            saga=replace(s.saga, status=SagaStatus.COMPENSATING), saga_version=s.saga.version
        ),
    )
    counts = store.count_by_status("moving")
    assert (counts[SagaStatus.RUNNING], counts[SagaStatus.COMPENSATING]) == (0, 1)
    listed = store.list_sagas(SagaFilter(status=[SagaStatus.RUNNING], name="moving"))
    assert listed == []


def test_lists_and_counts_follow_every_status_transition(store: Store) -> None:
    ids = [
        started(store, name="order" if i % 2 else "ship", created_at=T0 + i).saga.saga_id
        for i in range(4)
    ]
    done = ids[1]
    store.transact(
        done,
        lambda s: Decision(
            saga=replace(s.saga, status=SagaStatus.COMPLETED), saga_version=s.saga.version
        ),
    )

    assert store.count_by_status()[SagaStatus.RUNNING] == 3
    assert store.count_by_status("order")[SagaStatus.COMPLETED] == 1
    assert store.count_by_status("ship")[SagaStatus.COMPLETED] == 0

    def listed(**flt: Any) -> list[str]:
        return [s.saga_id for s in store.list_sagas(SagaFilter(**flt))]

    assert listed() == ids[::-1]
    assert listed(status=[SagaStatus.RUNNING]) == [ids[3], ids[2], ids[0]]
    assert listed(status=[SagaStatus.RUNNING, SagaStatus.COMPLETED], name="order") == [
        ids[3],
        ids[1],
    ]
    assert listed(limit=2, offset=1) == [ids[2], ids[1]]
    assert listed(created_after=T0 + 1, created_before=T0 + 3) == [ids[2], ids[1]]


# -- the sweeper's index ---------------------------------------------------------------------


def test_find_due_returns_only_due_work_in_due_order(store: Store) -> None:
    late_saga = make_state(due_at=T0 + 10)
    late_saga.steps["a"].due_at = None
    store.create_saga(late_saga, [])
    mixed = make_state()
    mixed.steps["a"].due_at = T0 + 5
    mixed.steps["b"].due_at = T0 + 20  # not due yet
    mixed.steps["c"].due_at = T0 + 15  # due exactly now
    store.create_saga(mixed, [])
    idle = make_state(due_at=T0 + 100)
    idle.steps["a"].due_at = None
    store.create_saga(idle, [])

    now = T0 + 15
    due = store.find_due(now)
    assert due == [
        DueItem(mixed.saga.saga_id, "a", T0 + 5),
        DueItem(late_saga.saga.saga_id, None, T0 + 10),
        DueItem(mixed.saga.saga_id, "c", T0 + 15),
    ]
    assert store.find_due(now, limit=2) == due[:2]
    assert store.find_due(T0) == []


def test_find_due_follows_claims_and_decisions(store: Store) -> None:
    sid = started(store).saga.saga_id  # a is due at T0 + 30 (a lost message)
    assert store.find_due(T0 + 30) == [DueItem(sid, "a", T0 + 30)]
    store.claim_step(sid, "a", Phase.FORWARD, 1, lease_until=T0 + 60, now=T0)
    assert store.find_due(T0 + 30) == []
    assert store.find_due(T0 + 60) == [DueItem(sid, "a", T0 + 60)]
    store.transact(
        sid,
        lambda s: change_step(s, "a", status=StepStatus.SUCCEEDED, lease_until=None, due_at=None),
    )
    assert store.find_due(T0 + 1000) == []


# -- SQL schema and migrations -----------------------------------------------------------------

MIGRATIONS = Path(schema.__file__).parent / "migrations"


def test_find_due_returns_the_earliest_due_work_first_up_to_the_limit(store: Store) -> None:
    def due(step_due: float, saga_due: float | None = None) -> str:
        state = make_state(due_at=saga_due)
        state.steps["a"].due_at = step_due
        store.create_saga(state, [])
        return state.saga.saga_id

    late = due(T0 + 300)
    early = due(T0 + 100, saga_due=T0 + 250)
    due(T0 + 5000)  # not due yet

    found = store.find_due(T0 + 1000)
    assert [(d.saga_id, d.step, d.due_at) for d in found] == [
        (early, "a", T0 + 100),
        (early, None, T0 + 250),
        (late, "a", T0 + 300),
    ]
    assert [d.due_at for d in store.find_due(T0 + 1000, limit=2)] == [T0 + 100, T0 + 250]
    assert store.find_due(T0 + 50) == []

    # Settling a step takes it out of the index.
    store.transact(
        early,
        lambda s: Decision(
            steps=[replace(s.steps["a"], status=StepStatus.CANCELLED, due_at=None)],
            step_versions={"a": s.steps["a"].version},
        ),
    )
    assert [(d.saga_id, d.step) for d in store.find_due(T0 + 1000)] == [(early, None), (late, "a")]


@pytest.fixture
def fresh_sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of the kind named by the test's `dialect` parameter."""
    dialect: str = request.param
    if dialect == "sqlite":
        yield f"sqlite:///{tmp_path}/fresh.db"
    elif dialect == "postgresql":
        url = shared_postgres_url(f"sagaline_mig_{uuid.uuid4().hex[:10]}")
        try:
            yield url
        finally:
            drop_database(url)
    else:
        url = create_mariadb_database()
        try:
            yield url
        finally:
            drop_mariadb_database(url)


def revisions(st: SQLStore) -> list[str]:
    with st.engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}"))]


def test_schema_revision_is_the_head_of_the_migrations() -> None:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(MIGRATIONS))
    assert scripts.get_heads() == [schema.SCHEMA_REVISION]


@pytest.mark.parametrize("fresh_sql_url", ["sqlite", "postgresql", "mariadb"], indirect=True)
def test_migrate_is_idempotent(fresh_sql_url: str) -> None:
    st = SQLStore(fresh_sql_url, auto_migrate=False)
    try:
        st.migrate()
        st.migrate()
        assert revisions(st) == [schema.SCHEMA_REVISION]
        # A second store on a migrated database finds nothing to do and works at once.
        other = SQLStore(fresh_sql_url)
        try:
            started(other)
            other.migrate()
        finally:
            other.close()
        assert revisions(st) == [schema.SCHEMA_REVISION]
    finally:
        st.close()


@pytest.mark.parametrize("fresh_sql_url", ["postgresql", "mariadb"], indirect=True)
def test_concurrent_migrations_of_a_fresh_database_all_succeed(fresh_sql_url: str) -> None:
    stores = [SQLStore(fresh_sql_url, auto_migrate=False) for _ in range(3)]
    barrier = threading.Barrier(3)

    def migrate(i: int) -> None:
        barrier.wait(timeout=30)
        stores[i].migrate()

    try:
        run_threads(3, migrate)
        assert revisions(stores[0]) == [schema.SCHEMA_REVISION]
        for st in stores:
            started(st)
    finally:
        for st in stores:
            st.close()


@pytest.mark.parametrize("fresh_sql_url", ["sqlite", "postgresql"], indirect=True)
def test_migrated_schema_matches_the_metadata(fresh_sql_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from sagaline.stores.pg_partitions import is_layout_object

    st = SQLStore(fresh_sql_url, auto_migrate=False)
    try:
        st.migrate()
        with st.engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn,
                opts={
                    "version_table": VERSION_TABLE,
                    "compare_type": True,
                    "compare_server_default": True,
                    # PostgreSQL's event partitions and the index their primary key replaces.
                    "include_object": lambda _o, name, kind, *_: (
                        not (st.dialect == "postgresql" and is_layout_object(name, kind))
                    ),
                },
            )
            diff = compare_metadata(ctx, schema.metadata)
            primary_key = sa.inspect(conn).get_pk_constraint("sagaline_events")
        assert diff == []
        expected = ["saga_id", "seq", "ts"] if st.dialect == "postgresql" else ["seq"]
        assert primary_key["constrained_columns"] == expected
    finally:
        st.close()


def test_migrate_is_a_public_function_that_creates_the_schema(tmp_path: Path) -> None:
    import sagaline
    from sagaline.stores.schema import SCHEMA_REVISION, VERSION_TABLE

    url = f"sqlite:///{tmp_path}/fresh.db"
    sagaline.migrate(url)
    sagaline.migrate(url)  # idempotent
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        revision = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    engine.dispose()
    assert {"sagaline_sagas", "sagaline_steps", "sagaline_events"} <= tables
    assert revision == SCHEMA_REVISION


# -- hostile input: every store refuses and accepts the same things ----------------------


def deep(depth: int, leaf: Any = "bottom ✓") -> Any:
    """`depth` objects and arrays inside each other around `leaf`."""
    value = leaf
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


@pytest.mark.parametrize("bad_id", ["a\x00b", "\x00", "\ud800", "x" * 300])
def test_ids_no_store_can_hold_find_nothing(store: Store, bad_id: str) -> None:
    started(store, name="orders")
    assert store.get_saga(bad_id) is None
    assert store.get_steps(bad_id) == []
    assert store.history(bad_id) == []
    assert store.transact(bad_id, lambda state: Decision(events=[])) is None
    assert store.list_sagas(SagaFilter(name=bad_id)) == []
    assert store.list_sagas(SagaFilter(parent_saga_id=bad_id)) == []
    assert set(store.count_by_status(bad_id).values()) == {0}


@pytest.mark.parametrize("bad_id", [123, None, b"bytes", 1.5])
def test_ids_that_are_not_strings_raise_type_error(store: Store, bad_id: Any) -> None:
    for lookup in (store.get_saga, store.get_steps, store.history):
        with pytest.raises(TypeError, match="a saga id is a string"):
            lookup(bad_id)
    with pytest.raises(TypeError, match="a saga id is a string"):
        store.transact(bad_id, lambda state: None)


def test_names_and_keys_at_the_documented_limits_are_stored(store: Store) -> None:
    from sagaline.payload import MAX_KEY_LENGTH, MAX_NAME_LENGTH

    name = "ñ" * MAX_NAME_LENGTH  # characters, not bytes, on every store
    step = "s" * (MAX_NAME_LENGTH - 1) + "😀"
    key = "k" * (MAX_KEY_LENGTH - 1) + "✓"
    state = make_state(name=name, key=key)
    sid = state.saga.saga_id
    state.steps = {step: StepRecord(sid, step, 0, status=StepStatus.DISPATCHED, attempt=1)}
    state.saga.failed_step = state.saga.parent_step = step
    _, created = store.create_saga(state, [Event(sid, "saga_started", T0, step, 1, "forward")])
    assert created
    assert store.get_saga(sid) == state.saga
    assert [s.name for s in store.get_steps(sid)] == [step]
    assert [e.step for e in store.history(sid)] == [step]
    again = make_state(name=name, key=key)
    record, created = store.create_saga(again, [])
    assert (record.saga_id, created) == (sid, False)


def test_payloads_at_the_documented_limits_round_trip(store: Store) -> None:
    from sagaline.payload import MAX_DEPTH

    # The deepest input (MAX_DEPTH levels counting the input object), the deepest
    # non-dict output, and a saga result one level deeper (a functional saga's
    # result object around a step's output): the tightest store (MariaDB's JSON
    # check) must take them all.
    values = {
        "deep": deep(MAX_DEPTH - 1),
        "big": 2**70,
        "neg": -0.5,
        "e": 1e300,
        "text": "emoji 😀 cjk 漢字 rtl עברית",
        "": "empty key",
        "__type__": "alone",
    }
    state = make_state(input=values)
    state.steps["a"].output = deep(MAX_DEPTH - 1)
    state.steps["a"].compensation_data = deep(MAX_DEPTH - 1)
    state.saga.output = {"result": {"of_step": deep(MAX_DEPTH - 1)}}
    store.create_saga(state, [])
    saga = store.get_saga(state.saga.saga_id)
    assert saga is not None
    assert saga.input == values
    assert saga.output == {"result": {"of_step": deep(MAX_DEPTH - 1)}}
    a = step_of(store, state.saga.saga_id, "a")
    assert a.output == a.compensation_data == deep(MAX_DEPTH - 1)


def test_idempotency_keys_of_names_with_colons_never_collide(store: Store) -> None:
    # "a:b" + "c" and "a" + "b:c" concatenate alike: they are still two keys.
    first = started(store, name="a:b", key="c")
    second = make_state(name="a", key="b:c")
    record, created = store.create_saga(second, [])
    assert created and record.saga_id == second.saga.saga_id
    percent = make_state(name="a%3Ab", key="c")
    assert store.create_saga(percent, [])[1]
    assert store.get_saga(first.saga.saga_id) is not None


# -- the same through run(): refused before anything is stored, on every store ------------


RUNNABLE = Saga("contract_runnable").add_step("contract.never_runs", no_compensation=True)


@pytest.fixture
def runtime(store: Store) -> Iterator[Runtime]:
    """A client runtime on the store, publishing to kombu's in-memory broker."""
    from celery import Celery

    app = Celery(f"contract-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    yield Runtime(app, Settings.from_env(store_url=store.url, max_payload_bytes=4096), store=store)


def nothing_stored(store: Store) -> bool:
    return store.list_sagas(SagaFilter(limit=5)) == []


@pytest.mark.parametrize(
    ("input", "key", "message"),
    [
        (
            {"n": 1},
            "k" * 256,
            r"idempotency_key 'k+\.\.\.' is 256 characters long, over the "
            r"limit of 255",
        ),
        ({"n": 1}, "a\x00b", r"idempotency_key 'a\\x00b' contains a NUL"),
        ({"n": 1}, "", "must not be empty"),
        ({"n": 1}, 5, "idempotency_key must be a string"),
        ({"saga_id": "mine"}, None, r"input\['saga_id'\]: 'saga_id' is a reserved"),
        ({"x": deep(480)}, None, r"input\['x'\](\[.+\])+: nesting deeper than 30 levels"),
        ({"x": {"__type__": "datetime", "__value__": "2024-01-01"}}, None, "kombu's envelope"),
        ({"x": "y" * 5000}, None, r"input: is 50\d\d bytes of JSON, over the limit of 4096"),
        ({"x": "a\x00b"}, None, r"input\['x'\]: the string contains a NUL"),
    ],
)
def test_run_refuses_what_a_store_or_a_message_cannot_carry(
    store: Store, runtime: Runtime, input: dict[str, Any], key: Any, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        runtime.start_saga(RUNNABLE, input, idempotency_key=key)
    assert nothing_stored(store)


def test_a_reused_idempotency_key_with_other_input_is_a_conflict(
    store: Store, runtime: Runtime
) -> None:
    first = runtime.start_saga(RUNNABLE, {"x": 1, "l": [1, 2]}, idempotency_key="k-1")
    # The same input (as JSON: key order and tuples do not matter) is a replay.
    again = runtime.start_saga(RUNNABLE, {"l": (1, 2), "x": 1}, idempotency_key="k-1")
    assert again.saga_id == first.saga_id
    with pytest.raises(IdempotencyConflict) as info:
        runtime.start_saga(RUNNABLE, {"x": 2, "l": [1, 2]}, idempotency_key="k-1")
    assert (info.value.saga_name, info.value.idempotency_key, info.value.saga_id) == (
        "contract_runnable",
        "k-1",
        first.saga_id,
    )
    assert isinstance(info.value, InputError)
    assert len(store.list_sagas(SagaFilter(limit=5))) == 1


def test_a_saga_from_before_input_fingerprints_is_returned_for_its_key(
    store: Store, runtime: Runtime
) -> None:
    # Sagas stored before migration 0004 have no fingerprint: their key replays them.
    old = make_state(name="contract_runnable", key="old-key", input={"x": 1})
    store.create_saga(old, [])
    handle = runtime.start_saga(RUNNABLE, {"x": 2}, idempotency_key="old-key")
    assert handle.saga_id == old.saga.saga_id


def test_operations_on_impossible_ids_are_not_found_or_type_errors(
    store: Store, runtime: Runtime
) -> None:
    import sagaline

    with pytest.raises(SagaNotFound):
        sagaline.get_saga("a\x00b", runtime=runtime)
    with pytest.raises(SagaNotFound):
        sagaline.cancel("\ud800", runtime=runtime)
    with pytest.raises(TypeError):
        sagaline.get_saga(123, runtime=runtime)  # type: ignore[arg-type]


# -- waiting for the end of a saga ----------------------------------------------------

# Stores that wake get() when a saga ends (PostgreSQL and Redis announce it, a SQLite
# file is peeked at); the others leave get() to poll. PostgreSQL's and Redis's
# notifications also carry the ended saga, when it fits: get() does not read it again.
WATCHES_ENDED_SAGAS = ("postgresql", "redis", "sqlite")
CARRIES_THE_ENDED_SAGA = ("postgresql", "redis")


def scheme_of(st: Store) -> str:
    return st.url.split(":", 1)[0].split("+", 1)[0]


def get_while_it_ends(st: Store, **ended: Any) -> tuple[str, Any, list[Read]]:
    """`get()` on a running saga that another thread ends (its record changed by
    `ended`) once the caller has read it: the saga's id, what get() returned or
    raised, and the reads it made."""
    from types import SimpleNamespace

    from sagaline.exceptions import SagaError
    from sagaline.handle import SagaHandle

    sid = started(st).saga.saga_id

    def end_after_the_first_read(reads: list[Read]) -> None:
        for _ in range(3000):  # bounded: 30 s at most
            if reads:
                break
            time.sleep(0.01)
        time.sleep(0.05)  # the caller is waiting by now (or polling)
        st.transact(
            sid,
            lambda s: Decision(saga=replace(s.saga, **ended), saga_version=s.saga.version),
        )

    outcome: Any
    with counted_reads(st) as reads:
        finisher = threading.Thread(target=end_after_the_first_read, args=(reads,))
        finisher.start()
        try:
            handle = SagaHandle(SimpleNamespace(store=st), sid, "contract")  # type: ignore[arg-type]
            try:
                outcome = handle.get(timeout=30)
            except SagaError as exc:
                outcome = exc
        finally:
            finisher.join(30)
    return sid, outcome, reads


def test_get_wakes_on_the_commit_that_ends_the_saga_after_at_most_two_reads(
    store: Store,
) -> None:
    sid, outcome, reads = get_while_it_ends(
        store, status=SagaStatus.COMPLETED, output={"done": True}
    )
    assert outcome == {"done": True}
    assert reads[0].status is SagaStatus.RUNNING
    if scheme_of(store) in CARRIES_THE_ENDED_SAGA:
        assert len(reads) == 1, reads  # the notification brought the saga itself
    elif scheme_of(store) in WATCHES_ENDED_SAGAS:
        assert len(reads) == 2, reads  # woken by the commit (or a peek), not by a poll
        assert reads[-1].status is SagaStatus.COMPLETED
    else:
        assert store.watch_finished(sid) is None
        assert len(reads) > 2, reads


@pytest.mark.parametrize("padding", [10, 9000], ids=["fits-a-notification", "does-not"])
def test_get_returns_the_ended_saga_exactly_as_a_read_returns_it(
    store: Store, padding: int
) -> None:
    """To the order of a JSON object's keys and the type of a number: an int written
    to a float column is a float once read."""
    from sagaline.exceptions import SagaCompensated

    sid, outcome, reads = get_while_it_ends(
        store,
        status=SagaStatus.COMPENSATED,
        output={"z": 1, "a": [1.5, "é ✓", None, 0.1], "m": {"y": 2, "b": "x" * padding}},
        error="boom ✓\nsecond line",
        failed_step="b",
        finished_at=1_700_000_002,
    )
    assert isinstance(outcome, SagaCompensated)
    assert repr(outcome.record) == repr(store.get_saga(sid))
    if scheme_of(store) in CARRIES_THE_ENDED_SAGA:
        assert len(reads) == (1 if padding < 1000 else 2), reads


def test_get_on_an_announcing_store_still_times_out(store: Store) -> None:
    from types import SimpleNamespace

    from sagaline.exceptions import SagaTimeout
    from sagaline.handle import SagaHandle

    state = started(store)
    handle = SagaHandle(
        SimpleNamespace(store=store),
        state.saga.saga_id,  # type: ignore[arg-type]
        "contract",
    )
    with pytest.raises(SagaTimeout):
        handle.get(timeout=0.3)
