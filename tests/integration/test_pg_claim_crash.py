"""A claim on PostgreSQL commits without waiting for its WAL flush; a database crash
between the claim and the completion may lose it, and then the step only runs again.

A private PostgreSQL with `synchronous_commit = on` (the default a user has) and a
lazy WAL writer is stopped with `pg_ctl stop -m immediate` (its processes quit
without writing what is still in their buffers) right after a claim. Whether the
claim survived depends on whether the WAL writer wrote it in time; both outcomes
must leave the saga consistent: a claim that survived is completed, a lost one
refuses the completion of the attempt it no longer knows about, and the step's
message is claimed and run again (at-least-once). A completion, committed
synchronously, flushes the claim's WAL with its own: it survives the same crash.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery

import sagaline
from sagaline import engine
from sagaline.config import Settings
from sagaline.runtime import Runtime
from sagaline.states import Phase, SagaStatus, StepStatus
from sagaline.stores.sql import SQLStore
from tests.private_postgres import PrivatePostgres

pytestmark = pytest.mark.timeout(180)

LEASE = 60.0


@pytest.fixture(scope="module")
def server() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres(settings={"synchronous_commit": "on", "wal_writer_delay": "10s"})
    try:
        yield pg
    finally:
        pg.destroy()


@pytest.fixture
def runtime(server: PrivatePostgres) -> Iterator[Runtime]:
    app = Celery(f"crash-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    rt = Runtime(app, Settings.from_env(store_url=server.url, lease=LEASE))
    rt.publish = lambda dispatches: None  # type: ignore[method-assign]
    try:
        yield rt
    finally:
        rt.store.close()


TWO_STEPS = (
    sagaline.Saga("crash_two_steps")
    .add_step("crash.first", name="first", no_compensation=True)
    .add_step("crash.second", name="second", no_compensation=True)
)


def claim(rt: Runtime, saga_id: str, step: str) -> bool:
    now = time.time()
    return rt.store.claim_step(saga_id, step, Phase.FORWARD, 1, lease_until=now + LEASE, now=now)


def complete(rt: Runtime, saga_id: str, step: str) -> bool:
    decision = rt.apply(
        saga_id,
        engine.step_succeeded,
        step,
        1,
        output={f"{step}_ran": True},
        compensation_data=None,
        has_compensation_data=False,
    )
    return decision is not None


def step_status(rt: Runtime, saga_id: str, step: str) -> StepStatus:
    (rec,) = [s for s in rt.store.get_steps(saga_id) if s.name == step]
    return rec.status


def crash(server: PrivatePostgres, rt: Runtime) -> None:
    server.stop("immediate")
    server.start()
    assert isinstance(rt.store, SQLStore)
    rt.store.engine.dispose()  # the pool's connections died with the server


def test_a_claim_lost_in_a_crash_only_lets_the_step_run_again(
    server: PrivatePostgres, runtime: Runtime
) -> None:
    saga_id = runtime.start_saga(TWO_STEPS, {"n": 1}).saga_id
    assert claim(runtime, saga_id, "first")
    runs = 1  # the body ran, then the database crashed before the completion
    crash(server, runtime)

    after_crash = step_status(runtime, saga_id, "first")
    assert after_crash in (StepStatus.RUNNING, StepStatus.DISPATCHED)
    completed = complete(runtime, saga_id, "first")
    if after_crash is StepStatus.DISPATCHED:
        # The claim was lost: the completion of an attempt the store does not know
        # as running is refused, and the message (redelivered, or published again
        # by the sweeper) claims and runs the step again.
        assert not completed
        assert step_status(runtime, saga_id, "first") is StepStatus.DISPATCHED
        assert claim(runtime, saga_id, "first")
        runs += 1
        assert complete(runtime, saga_id, "first")
    else:
        assert completed
    assert step_status(runtime, saga_id, "first") is StepStatus.SUCCEEDED

    kinds = [(e.kind, e.step) for e in runtime.store.history(saga_id)]
    # A lost claim took its `step_started` event with it; the second claim wrote one.
    assert kinds.count(("step_started", "first")) == 1
    print(f"claim {'lost' if runs == 2 else 'kept'} in the crash; the step ran {runs} time(s)")
    assert kinds.count(("step_succeeded", "first")) == 1
    assert kinds.count(("step_dispatched", "second")) == 1

    assert claim(runtime, saga_id, "second")
    assert complete(runtime, saga_id, "second")
    saga = runtime.store.get_saga(saga_id)
    assert saga is not None and saga.status is SagaStatus.COMPLETED
    assert saga.output == {"n": 1, "first_ran": True, "second_ran": True}


def test_a_completion_survives_a_crash_with_the_claim_before_it(
    server: PrivatePostgres, runtime: Runtime
) -> None:
    saga_id = runtime.start_saga(TWO_STEPS, {"n": 2}).saga_id
    assert claim(runtime, saga_id, "first")
    assert complete(runtime, saga_id, "first")
    crash(server, runtime)

    assert step_status(runtime, saga_id, "first") is StepStatus.SUCCEEDED
    assert step_status(runtime, saga_id, "second") is StepStatus.DISPATCHED
    kinds = [(e.kind, e.step) for e in runtime.store.history(saga_id)]
    assert ("step_started", "first") in kinds and ("step_succeeded", "first") in kinds
