"""Timeouts, deadlines, cancel, failing compensations, resume and pivots on real workers."""

from __future__ import annotations

import time

import psycopg
import pytest

import sagaline
from sagaline import SagaCompensated, SagaFailed, SagaStatus
from tests.integration import sagas_app
from tests.integration.conftest import Stack


def set_switch(stack: Stack, name: str, remaining: int) -> None:
    with psycopg.connect(stack.ledger_dsn, autocommit=True) as conn:
        conn.execute(sagas_app.SWITCHES_DDL)
        conn.execute(
            "INSERT INTO switches VALUES (%s, %s) ON CONFLICT (name) "
            "DO UPDATE SET remaining = EXCLUDED.remaining",
            (name, remaining),
        )


def kinds(saga_id: str, stack: Stack) -> list[tuple[str, str | None]]:
    return [(e.kind, e.step) for e in sagaline.get_saga(saga_id, runtime=stack.runtime).history]


def wait_for(stack: Stack, saga_id: str, status: SagaStatus, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stack.runtime.store.get_saga(saga_id).status is status:  # type: ignore[union-attr]
            return
        time.sleep(0.1)
    raise AssertionError(f"saga {saga_id} not {status} after {timeout}s: {kinds(saga_id, stack)}")


def test_a_step_past_its_timeout_fails_is_retried_then_compensated(pg_stack: Stack) -> None:
    handle = pg_stack.run(sagas_app.timeout_saga, value=1, seconds=3)
    with pytest.raises(SagaCompensated, match="SoftTimeLimitExceeded"):
        handle.get(timeout=60)
    history = sagaline.get_saga(handle.saga_id, runtime=pg_stack.runtime).history
    failures = [
        e for e in history if e.step == "slow" and e.kind in ("step_attempt_failed", "step_failed")
    ]
    assert [(e.kind, e.attempt, e.detail["reason"]) for e in failures] == [
        ("step_attempt_failed", 1, "timeout"),
        ("step_failed", 2, "timeout"),
    ]
    assert [(s, a) for s, a, *_ in pg_stack.ledger(handle.saga_id)] == [
        ("s1", "do"),
        ("s1", "undo"),
    ]


def test_a_saga_past_its_deadline_is_compensated_including_the_late_step(pg_stack: Stack) -> None:
    handle = pg_stack.run(sagas_app.deadline_saga, value=1, seconds=4)
    with pytest.raises(SagaCompensated, match="deadline exceeded"):
        handle.get(timeout=60)
    events = kinds(handle.saga_id, pg_stack)
    assert ("saga_deadline_exceeded", None) in events
    # The slow step was running at the deadline: it finished, then it was undone too.
    assert (
        events.index(("saga_deadline_exceeded", None))
        < events.index(("step_succeeded", "slow"))
        < events.index(("compensation_succeeded", "slow"))
    )
    assert [(s, a) for s, a, *_ in pg_stack.ledger(handle.saga_id)] == [
        ("s1", "do"),
        ("slow", "do"),
        ("slow", "undo"),
        ("s1", "undo"),
    ]


def test_cancel_stops_new_steps_and_compensates_the_running_one_when_it_ends(
    pg_stack: Stack,
) -> None:
    handle = pg_stack.run(sagas_app.cancel_saga, value=1, seconds=2)
    deadline = time.monotonic() + 30
    while ("step_started", "slow") not in kinds(handle.saga_id, pg_stack):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    record = sagaline.cancel(handle.saga_id, runtime=pg_stack.runtime)
    assert record.status is SagaStatus.COMPENSATING
    with pytest.raises(SagaCompensated, match="cancelled by operator"):
        handle.get(timeout=60)
    assert [(s, a) for s, a, *_ in pg_stack.ledger(handle.saga_id)] == [
        ("s1", "do"),
        ("slow", "do"),
        ("slow", "undo"),
        ("s1", "undo"),
    ]
    view = sagaline.get_saga(handle.saga_id, runtime=pg_stack.runtime)
    assert view.step("s3").status.value == "CANCELLED"
    with pytest.raises(sagaline.InvalidTransition):
        sagaline.cancel(handle.saga_id, runtime=pg_stack.runtime)


def test_a_compensation_that_fails_three_times_then_succeeds_ends_compensated(
    pg_stack: Stack,
) -> None:
    switch = f"flaky-{time.time()}"
    set_switch(pg_stack, switch, 3)
    handle = pg_stack.run(sagas_app.flaky_compensation, value=1, fail_at="s4", switch=switch)
    with pytest.raises(SagaCompensated):
        handle.get(timeout=60)
    rows = pg_stack.ledger(handle.saga_id)
    assert [d["attempt"] for s, a, d, *_ in rows if a == "undo_attempt"] == [1, 2, 3, 4]
    assert [(s, a) for s, a, *_ in rows if a == "undo"] == [("s1", "undo")]
    failed = [
        e
        for e in sagaline.get_saga(handle.saga_id, runtime=pg_stack.runtime).history
        if e.kind == "compensation_attempt_failed"
    ]
    assert [e.attempt for e in failed] == [1, 2, 3]
    assert all(e.detail["retry_in"] > 0 for e in failed)


def test_a_failing_compensation_parks_the_saga_and_resume_finishes_only_what_is_left(
    pg_stack: Stack,
) -> None:
    broken = f"broken-{time.time()}"
    set_switch(pg_stack, broken, 0)
    handle = pg_stack.run(sagas_app.fragile, value=1, fail_at="s3", switch=broken)
    # s2's compensation succeeds; then make s1's fail forever.
    wait_for(pg_stack, handle.saga_id, SagaStatus.COMPENSATED, timeout=60)
    assert [(s, a) for s, a, *_ in pg_stack.ledger(handle.saga_id) if a == "undo"] == [
        ("s2", "undo"),
        ("s1", "undo"),
    ]

    forever = f"forever-{time.time()}"
    set_switch(pg_stack, forever, -1)
    parked = pg_stack.run(sagas_app.fragile, value=2, fail_at="s3", switch=forever)
    with pytest.raises(SagaFailed) as info:
        parked.get(timeout=60)
    view = sagaline.get_saga(parked.saga_id, runtime=pg_stack.runtime)
    assert view.step("s2").comp_status.value == "COMPENSATION_FAILED"  # type: ignore[union-attr]
    assert "ConnectionError" in (view.step("s2").comp_error or "")
    # s1 cannot be undone before s2: it is still applied, and the record says so.
    assert view.step("s1").comp_status is None
    failed_event = [e for e in view.history if e.kind == "saga_failed"][-1]
    assert failed_event.detail["compensation_failed"] == ["s2"]
    assert failed_event.detail["still_applied"] == ["s1", "s2"]
    assert info.value.record.status is SagaStatus.FAILED
    attempts_before = [
        d["attempt"] for s, a, d, *_ in pg_stack.ledger(parked.saga_id) if a == "undo_attempt"
    ]
    assert attempts_before == [1, 2]

    set_switch(pg_stack, forever, 0)  # the cause is fixed
    assert (
        sagaline.resume(parked.saga_id, runtime=pg_stack.runtime).status is SagaStatus.COMPENSATING
    )
    with pytest.raises(SagaCompensated):
        parked.get(timeout=60)
    rows = [(s, a) for s, a, *_ in pg_stack.ledger(parked.saga_id)]
    assert rows.count(("s2", "undo")) == 1 and rows.count(("s1", "undo")) == 1
    assert rows.index(("s2", "undo")) < rows.index(("s1", "undo"))


def test_after_a_pivot_failures_are_retried_forward_instead_of_compensated(pg_stack: Stack) -> None:
    switch = f"pivot-{time.time()}"
    set_switch(pg_stack, switch, 3)
    handle = pg_stack.run(sagas_app.pivoting, value=1, switch=switch)
    assert handle.get(timeout=60)["after_pivot"] == "done"
    rows = pg_stack.ledger(handle.saga_id)
    assert [d["attempt"] for s, a, d, *_ in rows if a == "attempt"] == [1, 2, 3, 4]
    assert not [r for r in rows if r[1] == "undo"]
    events = kinds(handle.saga_id, pg_stack)
    assert ("pivot_passed", "s2") in events


def test_pivot_exhausted_parks_the_saga_as_failed_without_compensating(pg_stack: Stack) -> None:
    switch = f"pivot-forever-{time.time()}"
    set_switch(pg_stack, switch, -1)
    handle = pg_stack.run(sagas_app.pivoting, value=1, switch=switch)
    with pytest.raises(SagaFailed, match="downstream unavailable"):
        handle.get(timeout=90)
    assert not [r for r in pg_stack.ledger(handle.saga_id) if r[1] == "undo"]
    failed = [
        e
        for e in sagaline.get_saga(handle.saga_id, runtime=pg_stack.runtime).history
        if e.kind == "saga_failed"
    ]
    assert failed[-1].detail["reason"] == "forward_retries_exhausted_after_pivot"


def test_a_child_saga_still_running_when_the_grace_period_ends_is_stopped_and_undone(
    pg_stack: Stack,
) -> None:
    handle = pg_stack.run(sagas_app.graceful_parent, value=1, seconds=4, fail_at="s4")
    with pytest.raises(SagaCompensated):
        handle.get(timeout=90)
    child = next(
        c
        for c in sagaline.list_sagas(runtime=pg_stack.runtime, name="slow_child", limit=500)
        if c.parent_saga_id == handle.saga_id
    )
    assert child.status is SagaStatus.COMPENSATED
    assert "rolling back" in (child.error or "")
    # Everything the child applied was undone, in reverse order: its slow step once it
    # had finished, then s2.
    assert [(s, a) for s, a, *_ in pg_stack.ledger(child.saga_id)] == [
        ("s2", "do"),
        ("slow", "do"),
        ("slow", "undo"),
        ("s2", "undo"),
    ]
    assert [(s, a) for s, a, *_ in pg_stack.ledger(handle.saga_id)] == [
        ("s1", "do"),
        ("s1", "undo"),
    ]
    events = kinds(handle.saga_id, pg_stack)
    assert ("step_abandoned", "child") in events
    assert events.index(("compensation_succeeded", "child")) < events.index(
        ("compensation_dispatched", "s1")
    )
