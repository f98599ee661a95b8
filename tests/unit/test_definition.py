"""The definition API: validation at definition time, graphs, default compensations."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from celery.local import PromiseProxy

from sagaline.definition import Saga, forget
from sagaline.exceptions import DefinitionError
from sagaline.execution import accepted_kwargs, filter_kwargs
from sagaline.states import FailureStrategy
from sagaline.steps import FAIL_FAST_WITH_GRACE, Retry, Step, StepKind, build_graph, saga_step

app = Celery("t_definition", broker="memory://", set_as_current=False)


@app.task(name="definition_test.reserve", shared=False)
def reserve(**ctx: Any) -> None: ...


@app.task(name="definition_test.release", shared=False)
def release(compensation_data: Any) -> None: ...


@app.task(name="definition_test.charge", shared=False)
def charge(**ctx: Any) -> None: ...


@app.task(name="definition_test.refund", shared=False)
def refund(compensation_data: Any) -> None: ...


def task_step(name: str, *deps: str) -> Step:
    return Step(name=name, kind=StepKind.TASK, task=f"t.{name}", depends_on=deps)


# -- builder validation ------------------------------------------------------------


def test_duplicate_step_name_is_refused_naming_the_step() -> None:
    s = Saga("def_dup").add_step(reserve)
    with pytest.raises(DefinitionError, match="duplicate") as info:
        s.add_step(charge, name="reserve")
    assert info.value.step == "reserve"
    assert "'reserve'" in str(info.value)
    assert [st.name for st in s.steps] == ["reserve"]  # the saga is unchanged


def test_unknown_dependency_is_refused_naming_the_step() -> None:
    s = Saga("def_unknown").add_step(reserve)
    with pytest.raises(DefinitionError, match="unknown dependency 'nope'") as info:
        s.add_step(charge, depends_on=["nope"])
    assert info.value.step == "charge"


def test_self_dependency_is_refused() -> None:
    with pytest.raises(DefinitionError, match="itself") as info:
        build_graph("g", [task_step("a"), task_step("b", "b")])
    assert info.value.step == "b"
    # Through the builder a step cannot name itself either (it does not exist yet).
    with pytest.raises(DefinitionError) as info:
        Saga("def_self").add_step(reserve, depends_on=["reserve"])
    assert info.value.step == "reserve"


def test_compensation_that_is_a_plain_function_is_refused() -> None:
    def undo(compensation_data: Any) -> None: ...

    with pytest.raises(DefinitionError, match=r"@app\.task") as info:
        Saga("def_plain_comp").add_step(reserve, compensate=undo)  # type: ignore[arg-type]
    assert info.value.step == "reserve"
    assert "undo" in str(info.value)
    with pytest.raises(DefinitionError, match="compensation"):
        saga_step(compensate=undo)  # type: ignore[arg-type]


def test_step_that_is_a_plain_function_is_refused() -> None:
    def not_a_task() -> None: ...

    with pytest.raises(DefinitionError, match="Celery task"):
        Saga("def_plain_step").add_step(not_a_task)  # type: ignore[arg-type]


def test_task_name_with_spaces_is_not_a_task_name() -> None:
    with pytest.raises(DefinitionError, match="not a task name"):
        Saga("def_bad_name").add_step("t.a", compensate="t. undo")


def test_compensate_and_no_compensation_exclude_each_other() -> None:
    with pytest.raises(DefinitionError, match="exclude each other") as info:
        Saga("def_both").add_step(reserve, compensate=release, no_compensation=True)
    assert info.value.step == "reserve"


@pytest.mark.parametrize("option", ["input", "when"])
def test_non_callable_input_or_when_is_refused(option: str) -> None:
    with pytest.raises(DefinitionError, match=f"{option}= must be callable") as info:
        Saga(f"def_noncallable_{option}").add_step(reserve, **{option: {"a": 1}})
    assert info.value.step == "reserve"


def test_depends_on_must_be_a_list_not_a_string() -> None:
    s = Saga("def_dep_str").add_step(reserve)
    with pytest.raises(DefinitionError, match="list of step names"):
        s.add_step(charge, depends_on="reserve")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"backoff": -1.0},
        {"factor": 0.5},
        {"max_delay": -1.0},
        {"backoff": float("nan")},
        {"factor": float("inf")},
        {"max_delay": float("inf")},
        {"max_delay": 31 * 24 * 3600.0},
    ],
)
def test_retry_validates_its_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(DefinitionError):
        Retry(**kwargs)  # type: ignore[arg-type]


def test_retry_delay_grows_geometrically_and_is_capped() -> None:
    r = Retry(max_attempts=10, backoff=2.0, factor=3.0, max_delay=20.0, jitter=0.0)
    assert [r.delay(n) for n in (1, 2, 3, 4)] == [2.0, 6.0, 18.0, 20.0]
    jittered = Retry(max_attempts=3, backoff=10.0, jitter=0.1)
    assert all(9.0 <= jittered.delay(1) <= 11.0 for _ in range(50))


def test_saga_options_are_validated() -> None:
    with pytest.raises(DefinitionError):
        Saga("")
    with pytest.raises(DefinitionError, match="timeout"):
        Saga("def_timeout", timeout=0)
    with pytest.raises(DefinitionError, match="grace"):
        Saga("def_grace", failure_strategy=FailureStrategy.FAIL_FAST_WITH_GRACE)
    graceful = Saga("def_grace_ok", failure_strategy=FAIL_FAST_WITH_GRACE(grace=5))
    assert graceful.failure_strategy is FailureStrategy.FAIL_FAST_WITH_GRACE
    assert graceful.grace == 5
    with pytest.raises(DefinitionError, match="at least one step"):
        _ = Saga("def_empty").graph


def test_non_positive_step_timeout_is_refused() -> None:
    with pytest.raises(DefinitionError, match="timeout") as info:
        Saga("def_step_timeout").add_step(reserve, timeout=-1)
    assert info.value.step == "reserve"


# -- graph -------------------------------------------------------------------------


def test_build_graph_detects_a_cycle_and_names_a_step_in_it() -> None:
    cycle = [task_step("a"), task_step("b", "a", "d"), task_step("c", "b"), task_step("d", "c")]
    with pytest.raises(DefinitionError, match="cycle") as info:
        build_graph("cyclic", cycle)
    assert info.value.saga == "cyclic"
    assert info.value.step in {"b", "c", "d"}
    assert "'b'" in str(info.value) and "'d'" in str(info.value)


def test_build_graph_orders_topologically_with_transitive_ancestors() -> None:
    g = build_graph(
        "diamond",
        [task_step("a"), task_step("b", "a"), task_step("c", "a"), task_step("d", "b", "c")],
    )
    assert g.order == ["a", "b", "c", "d"]
    assert g.roots() == ["a"]
    assert g.dependents == {"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": []}
    assert g.ancestors["d"] == ["a", "b", "c"]
    assert g.ancestors["b"] == ["a"]


def test_steps_without_depends_on_follow_the_previous_stage() -> None:
    s = (
        Saga("def_stages")
        .add_step(reserve)
        .add_parallel(charge, "t.ship")
        .add_transform(lambda ctx: ctx)
        .add_step("t.notify")
    )
    deps = {st.name: st.depends_on for st in s.steps}
    assert deps == {
        "reserve": (),
        "charge": ("reserve",),
        "ship": ("reserve",),
        "transform_4": ("charge", "ship"),
        "notify": ("transform_4",),
    }


def test_add_parallel_refuses_name_and_depends_on() -> None:
    with pytest.raises(DefinitionError, match="add_parallel"):
        Saga("def_par").add_parallel(reserve, charge, name="x")
    with pytest.raises(DefinitionError, match="at least one task"):
        Saga("def_par_empty").add_parallel()


# -- default compensations -----------------------------------------------------------


def test_saga_step_sets_the_default_compensation_of_an_evaluated_task() -> None:
    local = Celery("t_eager", broker="memory://", set_as_current=False)
    local.finalize()

    @saga_step(compensate=refund)
    @local.task(name="definition_test.eager_charge", shared=False)
    def eager_charge() -> None: ...

    assert eager_charge.sagaline_compensate is refund
    s = Saga("def_default_comp").add_step(eager_charge)
    assert s.steps[0].compensation_name == "definition_test.refund"
    # no_compensation=True overrides the default.
    s2 = Saga("def_default_comp_off").add_step(eager_charge, no_compensation=True)
    assert s2.steps[0].compensate is None
    # An explicit compensate= overrides it too.
    s3 = Saga("def_default_comp_explicit").add_step(eager_charge, compensate="t.other")
    assert s3.steps[0].compensation_name == "t.other"


def test_saga_step_on_a_lazy_task_does_not_evaluate_it_and_applies_on_finalize() -> None:
    lazy = Celery("t_lazy", broker="memory://", set_as_current=False)

    @saga_step(compensate="t.lazy_refund")
    @lazy.task(name="definition_test.lazy_charge", shared=False)
    def lazy_charge() -> None: ...

    assert isinstance(lazy_charge, PromiseProxy)
    assert not lazy_charge.__evaluated__()
    lazy.finalize()
    assert lazy_charge.sagaline_compensate == "t.lazy_refund"
    s = Saga("def_lazy_comp").add_step(lazy_charge)
    assert s.steps[0].name == "lazy_charge"
    assert s.steps[0].compensation_name == "t.lazy_refund"


def test_saga_step_must_decorate_a_task() -> None:
    with pytest.raises(DefinitionError, match=r"above @app\.task"):
        saga_step(compensate="t.x")(lambda: None)


# -- fingerprint ---------------------------------------------------------------------


def _shop(
    name: str, *, comp: str = "t.refund", dep_on_reserve: bool = True, when_value: bool = True
) -> Saga:
    s = Saga(name).add_step(reserve, compensate=release)
    s.add_step(
        charge,
        compensate=comp,
        depends_on=["reserve"] if dep_on_reserve else [],
        when=(lambda ctx: True) if when_value else (lambda ctx: False),
    )
    return s


def test_fingerprint_is_stable_for_the_same_graph() -> None:
    a, b = _shop("fp"), _shop("fp")
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint == a.fingerprint  # cached and stable
    assert len(a.fingerprint) == 16


def _variant(name: str, **options: Any) -> Saga:
    """One variant of a saga, built and then forgotten: a process keeps one definition
    per name, and these are compared side by side."""
    s = _shop(name, **options)
    forget(s)
    return s


def test_fingerprint_changes_when_the_graph_changes() -> None:
    base = _variant("fp2").fingerprint
    assert _variant("fp2", comp="t.other_refund").fingerprint != base
    assert _variant("fp2", dep_on_reserve=False).fingerprint != base
    assert _variant("fp2", when_value=False).fingerprint != base
    assert _variant("fp2_renamed").fingerprint != base
    grown = _shop("fp2")
    grown.add_step("t.notify", no_compensation=True)
    assert grown.fingerprint != base


# -- keyword filtering ---------------------------------------------------------------


def test_accepted_kwargs_lists_keyword_parameters_or_none_for_var_keyword() -> None:
    def explicit(a: int, b: int = 0, *args: Any, c: int) -> None: ...

    def open_ended(a: int, **kwargs: Any) -> None: ...

    def positional_only(a: int, /, b: int) -> None: ...

    assert accepted_kwargs(explicit) == frozenset({"a", "b", "c"})
    assert accepted_kwargs(open_ended) is None
    assert accepted_kwargs(positional_only) == frozenset({"b"})


def test_filter_kwargs_passes_only_what_the_signature_accepts() -> None:
    def step_fn(order_id: str, amount: float) -> None: ...

    def greedy(**kwargs: Any) -> None: ...

    ctx = {"order_id": "o1", "amount": 9.5, "saga_id": "s", "other": 1}
    assert filter_kwargs(step_fn, ctx) == {"order_id": "o1", "amount": 9.5}
    assert filter_kwargs(greedy, ctx) == ctx
    assert filter_kwargs(greedy, ctx) is not ctx


# -- names, and one definition per name ----------------------------------------------


def test_names_over_the_store_limits_are_refused_at_definition() -> None:
    Saga("n" * 200).add_step(reserve, name="s" * 200)
    with pytest.raises(
        DefinitionError,
        match=r"saga name 'nnn.*' is 201 characters long, "
        r"over the limit of 200",
    ):
        Saga("n" * 201)
    with pytest.raises(DefinitionError, match=r"step name .* over the limit of 200") as info:
        Saga("def_long_step").add_step(reserve, name="s" * 201)
    assert info.value.saga == "def_long_step"
    with pytest.raises(DefinitionError, match="NUL"):
        Saga("def_\x00")
    with pytest.raises(DefinitionError, match="NUL"):
        Saga("def_nul_step").add_step(reserve, name="a\x00b")
    with pytest.raises(DefinitionError, match="string"):
        Saga(123)  # type: ignore[arg-type]


@pytest.mark.parametrize("reserved", ["saga_id", "compensation_data"])
def test_a_step_cannot_be_named_like_a_reserved_context_key(reserved: str) -> None:
    # A non-dict output is stored in the context under the step's name.
    with pytest.raises(DefinitionError, match="reserved context key") as info:
        Saga(f"def_reserved_{reserved}").add_step(reserve, name=reserved)
    assert info.value.step == reserved


def test_a_second_saga_with_one_name_and_other_steps_fails_where_it_differs() -> None:
    first = Saga("def_twice").add_step(reserve).add_step(charge)
    second = Saga("def_twice").add_step(reserve)  # the same so far
    with pytest.raises(
        DefinitionError,
        match=r"another saga with this name, defined at "
        r".*test_definition.py:\d+, has other steps "
        r"\(they differ at step #2\)",
    ) as info:
        second.add_step(refund)
    assert (info.value.saga, info.value.step) == ("def_twice", "refund")
    # One more step than the first definition differs too.
    third = Saga("def_twice").add_step(reserve).add_step(charge)
    with pytest.raises(DefinitionError, match="step #3"):
        third.add_step(refund)
    first.check_complete()


def test_the_same_definition_twice_is_one_saga_as_when_a_module_is_imported_again() -> None:
    first = _shop("def_reimported")
    again = _shop("def_reimported")
    again.check_complete()
    assert again.fingerprint == first.fingerprint


def test_a_second_definition_that_stops_short_fails_when_complete() -> None:
    Saga("def_short").add_step(reserve).add_step(charge)
    short = Saga("def_short").add_step(reserve)
    with pytest.raises(
        DefinitionError,
        match=r"two different sagas have this name: at "
        r".*test_definition.py:\d+ and at ",
    ):
        short.check_complete()


def test_an_empty_saga_fails_when_complete() -> None:
    empty = Saga("def_empty_builder")
    with pytest.raises(
        DefinitionError,
        match=r"saga 'def_empty_builder': a saga needs at "
        r"least one step \(defined at "
        r".*test_definition.py:\d+\)",
    ):
        empty.check_complete()
    empty.add_step(reserve)
    empty.check_complete()


def test_a_child_saga_is_checked_with_its_parent() -> None:
    child = Saga("def_empty_child")
    parent = Saga("def_parent_of_empty").add_step(reserve).add_saga(child, name="child")
    with pytest.raises(DefinitionError, match="def_empty_child"):
        parent.check_complete()


def test_importing_a_module_again_is_not_an_error_but_changed_code_is(tmp_path: Any) -> None:
    import importlib.util
    import sys

    source = (
        "from sagaline import Saga\n"
        'saga = (Saga("def_module_twice").add_step("t.a", no_compensation=True)\n'
        '        .add_step("t.b", no_compensation=True, when=lambda ctx: ctx.get("x")))\n'
    )

    def load(name: str, text: str) -> Any:
        path = tmp_path / f"{name}.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        finally:
            sys.modules.pop(name, None)
        return module

    first = load("def_module_a", source)
    again = load("def_module_b", source)  # the same code under another module name
    again.saga.check_complete()
    assert again.saga.fingerprint == first.saga.fingerprint
    with pytest.raises(DefinitionError, match=r"def_module_a.py:2, has other steps"):
        load("def_module_c", source.replace('ctx.get("x")', 'ctx.get("y")'))
