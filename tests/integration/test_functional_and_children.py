"""The functional API, conditional steps and child sagas, on real workers."""

from __future__ import annotations

import pytest

import sagaline
from sagaline import SagaCompensated, SagaStatus
from tests.integration import sagas_app
from tests.integration.conftest import Stack


def actions(stack: Stack, saga_id: str) -> list[tuple[str, str]]:
    return [(s, a) for s, a, *_ in stack.ledger(saga_id)]


def test_the_celery_saga_readme_functional_example_runs_and_compensates(stack: Stack) -> None:
    ok = stack.run(sagas_app.order_saga_fn, order_id="abc-123", amount=99.99)
    payment = ok.get(timeout=60)
    assert payment == {"transaction_id": f"txn-{ok.saga_id}:charge_payment"}
    assert actions(stack, ok.saga_id) == [
        ("validate_order", "do"),
        ("charge_payment", "do"),
        ("send_confirmation", "do"),
    ]

    failed = stack.run(
        sagas_app.order_saga_fn, order_id="abc-124", amount=5.0, fail_confirmation=True
    )
    with pytest.raises(SagaCompensated, match="mail server down"):
        failed.get(timeout=60)
    rows = stack.ledger(failed.saga_id)
    assert [(s, a) for s, a, *_ in rows] == [
        ("validate_order", "do"),
        ("charge_payment", "do"),
        ("charge_payment", "undo"),
    ]
    assert rows[-1][2] == {"transaction_id": f"txn-{failed.saga_id}:charge_payment", "amount": 5.0}


def test_independent_functional_steps_run_concurrently(stack: Stack) -> None:
    handle = stack.run(sagas_app.independent_fn, sleep=1.0)
    assert handle.get(timeout=60) == {"left": "b", "right": "c"}
    windows = {s: (st, fin) for s, a, _, st, fin in stack.ledger(handle.saga_id)}
    (b0, b1), (c0, c1) = windows["b"], windows["c"]
    assert b0 < c1 and c0 < b1, windows


def test_a_false_condition_skips_the_step_and_it_is_never_compensated(stack: Stack) -> None:
    done = stack.run(sagas_app.conditional, value=1)
    result = done.get(timeout=60)
    assert "s2_done" not in result and result["s4_done"] is True
    view = sagaline.get_saga(done.saga_id, runtime=stack.runtime)
    assert view.step("s2").status.value == "SKIPPED"
    assert ("step_skipped", "s2") in [(e.kind, e.step) for e in view.history]

    failed = stack.run(sagas_app.conditional, value=1, fail_at="s4")
    with pytest.raises(SagaCompensated):
        failed.get(timeout=60)
    assert actions(stack, failed.saga_id) == [
        ("s1", "do"),
        ("s3", "do"),
        ("s3", "undo"),
        ("s1", "undo"),
    ]


def test_a_parent_that_rolls_back_compensates_its_completed_child_entirely(stack: Stack) -> None:
    handle = stack.run(sagas_app.parent_saga, value=1, fail_at="s4")
    with pytest.raises(SagaCompensated):
        handle.get(timeout=60)
    parent_rows = actions(stack, handle.saga_id)
    assert parent_rows == [("s1", "do"), ("s1", "undo")]
    children = sagaline.list_sagas(runtime=stack.runtime, name="child_saga", limit=500)
    child = next(c for c in children if c.parent_saga_id == handle.saga_id)
    assert child.parent_step == "child" and child.status is SagaStatus.COMPENSATED
    assert actions(stack, child.saga_id) == [
        ("s2", "do"),
        ("s3", "do"),
        ("s3", "undo"),
        ("s2", "undo"),
    ]
    # The parent's s1 was undone only after the whole child was.
    parent_history = sagaline.get_saga(handle.saga_id, runtime=stack.runtime).history
    kinds = [(e.kind, e.step) for e in parent_history]
    assert kinds.index(("compensation_succeeded", "child")) < kinds.index(
        ("compensation_dispatched", "s1")
    )


def test_a_child_that_compensates_fails_its_parent_step(stack: Stack) -> None:
    handle = stack.run(sagas_app.parent_saga, value=1, fail_at="s3")
    with pytest.raises(SagaCompensated, match="child saga child_saga") as info:
        handle.get(timeout=60)
    assert info.value.step == "child"
    assert actions(stack, handle.saga_id) == [("s1", "do"), ("s1", "undo")]
    child = next(
        c
        for c in sagaline.list_sagas(runtime=stack.runtime, name="child_saga", limit=500)
        if c.parent_saga_id == handle.saga_id
    )
    assert actions(stack, child.saga_id) == [("s2", "do"), ("s2", "undo")]


def test_a_completed_parent_links_its_child(stack: Stack) -> None:
    handle = stack.run(sagas_app.parent_saga, value=1)
    result = handle.get(timeout=60)
    assert result["s2_done"] and result["s3_done"] and result["s4_done"]
    child = next(
        c
        for c in sagaline.list_sagas(runtime=stack.runtime, name="child_saga", limit=500)
        if c.parent_saga_id == handle.saga_id
    )
    assert child.status is SagaStatus.COMPLETED
    view = sagaline.get_saga(handle.saga_id, runtime=stack.runtime)
    assert view.step("child").compensation_data == {"child_saga_id": child.saga_id}
