"""The functional API: `@saga` traces `step(...)` calls into the builder's DAG, at definition."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from sagaline import DefinitionError, Saga, parallelize, saga, step, transform
from sagaline.definition import Parallel
from sagaline.steps import StepKind

app = Celery("functional_test", broker="memory://")


@app.task(name="functional_test.validate", shared=False)
def validate(**_: Any) -> None: ...


@app.task(name="functional_test.charge", shared=False)
def charge(**_: Any) -> None: ...


@app.task(name="functional_test.reserve", shared=False)
def reserve(**_: Any) -> None: ...


@app.task(name="functional_test.confirm", shared=False)
def confirm(**_: Any) -> None: ...


@app.task(name="functional_test.refund", shared=False)
def refund(**_: Any) -> None: ...


def deps(s: Saga) -> dict[str, tuple[str, ...]]:
    return {st.name: st.depends_on for st in s.steps}


def test_a_step_depends_exactly_on_the_steps_whose_results_it_is_given() -> None:
    @saga("fn_deps")
    def fn(input: Any) -> Any:
        order = step(validate, input)
        payment = step(charge, order, compensate=refund)
        stock = step(reserve, order)  # independent of the payment: runs beside it
        step(confirm, payment, stock)
        return payment

    assert isinstance(fn, Saga) and fn.name == "fn_deps"
    assert deps(fn) == {
        "validate": (),
        "charge": ("validate",),
        "reserve": ("validate",),
        "confirm": ("charge", "reserve"),
    }
    assert fn.graph.steps["charge"].compensation_name == "functional_test.refund"
    assert fn.result_spec == ["charge", None]


def test_results_used_as_python_values_are_refused_with_the_rule_and_the_alternative() -> None:
    attempts = {
        "if": lambda r: bool(r),
        "for": lambda r: [x for x in r],
        "arithmetic": lambda r: r + 1,
        "comparison": lambda r: r > 3,
        "formatting": lambda r: f"{r:>5}",
        "len": lambda r: len(r),
    }
    for label, misuse in attempts.items():
        with pytest.raises(DefinitionError) as info:

            @saga(f"fn_misuse_{label}")
            def fn(input: Any, misuse: Any = misuse) -> None:
                misuse(step(validate, input))

        message = str(info.value)
        assert info.value.saga == f"fn_misuse_{label}" and info.value.step == "validate"
        assert "definition time" in message and "when=" in message, message


def test_projections_keywords_transforms_and_repeated_tasks() -> None:
    @saga("fn_more")
    def fn(input: Any) -> Any:
        order = step(validate, input)
        amounts = transform(lambda ctx: {**ctx, "cents": int(ctx["total"] * 100)}, order)
        first = step(charge, amounts, amount=order["total"], currency="EUR")
        second = step(charge, first)  # the same task again gets a unique step name
        return {"txn": first["transaction_id"], "again": second}

    assert [s.name for s in fn.steps] == ["validate", "transform_2", "charge", "charge_2"]
    assert fn.graph.steps["transform_2"].kind == StepKind.TRANSFORM
    mapper = fn.graph.steps["charge"].input
    assert mapper is not None
    assert mapper({"total": 9.5, "saga_id": "s"}) == {
        "total": 9.5,
        "saga_id": "s",
        "amount": 9.5,
        "currency": "EUR",
    }
    assert fn.result_spec == {"txn": ["charge", "transaction_id"], "again": ["charge_2", None]}


def test_step_outside_a_saga_function_and_bad_returns_are_definition_errors() -> None:
    with pytest.raises(DefinitionError, match="only allowed inside a function decorated"):
        step(validate)
    with pytest.raises(DefinitionError, match="returns a step result"):

        @saga("fn_bad_return")
        def fn(input: Any) -> Any:
            step(validate, input)
            return 42


def test_parallelize_is_add_parallel_in_the_builder() -> None:
    group = parallelize(charge, reserve)
    assert isinstance(group, Parallel)
    built = Saga("fn_parallel").add_step(validate).add_step(group).add_step(confirm)
    assert deps(built) == {
        "validate": (),
        "charge": ("validate",),
        "reserve": ("validate",),
        "confirm": ("charge", "reserve"),
    }


def test_a_traced_saga_is_complete_at_definition() -> None:
    with pytest.raises(DefinitionError, match="at least one step"):

        @saga("fn_empty")
        def fn_empty(input: Any) -> None:
            return None

    @saga("fn_twice")
    def fn_twice(input: Any) -> Any:
        return step(charge, step(validate, input))

    @saga("fn_twice")  # the same again (a module imported twice): one saga
    def fn_twice_again(input: Any) -> Any:
        return step(charge, step(validate, input))

    assert fn_twice_again.fingerprint == fn_twice.fingerprint
    with pytest.raises(DefinitionError, match="has other steps"):

        @saga("fn_twice")
        def fn_other(input: Any) -> Any:
            return step(reserve, input)

    with pytest.raises(DefinitionError, match="two different sagas have this name"):

        @saga("fn_twice")  # a prefix of the first, with another result
        def fn_shorter(input: Any) -> Any:
            return step(validate, input)


def test_a_failed_trace_leaves_the_name_free() -> None:
    with pytest.raises(DefinitionError):

        @saga("fn_fixed")
        def broken(input: Any) -> Any:
            return step(reserve, 5)

    @saga("fn_fixed")
    def fixed(input: Any) -> Any:
        return step(reserve, input)

    fixed.check_complete()
