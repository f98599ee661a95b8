"""Hostile input on real workers: a clear error at once, or a clean terminal saga.

Each row is an input that once stopped a worker, stalled a saga or reached the
user as a driver error (issue 10). On every stack, a row either raises a clear
error before anything runs, or ends its saga COMPENSATED with the failed step
naming the rule it broke; the worker survives and nothing is left for the
sweeper. A property-based test then throws generated JSON-like values (and
non-JSON ones) at the same saga.
"""

from __future__ import annotations

import base64
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sagaline
from sagaline import (
    DefinitionError,
    IdempotencyConflict,
    InputError,
    Saga,
    SagaCompensated,
    SagaNotFound,
    SagaStatus,
    StepStatus,
)
from sagaline.payload import MAX_DEPTH
from tests.harness import REPO_ROOT, WorkerProcess, wait_until
from tests.integration import sagas_app
from tests.integration.conftest import Stack

pytestmark = pytest.mark.timeout(240)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"n": value}
    return value


def finish(stack: Stack, handle: sagaline.SagaHandle, timeout: float = 60.0) -> Any:
    """handle.get(), but failing at once with the worker's log if the worker died."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout) + 1):
        assert stack.worker.is_running(), f"the worker died:\n{stack.worker.log_tail()}"
        try:
            return handle.get(timeout=1.0)
        except sagaline.SagaTimeout:
            if time.monotonic() >= deadline:
                raise
    return handle.get(timeout=0)


def blob(value: Any) -> str:
    """A step output of any kind, carried to the worker as text the input checks accept."""
    return base64.b64encode(pickle.dumps(value)).decode()


# -- what a row expects ----------------------------------------------------------------


@dataclass
class Refused:
    """Raised in the client, before anything is stored."""

    error: type[BaseException]
    match: str


@dataclass
class StepRefused:
    """The saga runs; step `returns` fails permanently naming the rule; s1 is undone."""

    match: str


@dataclass
class Accepted:
    """The saga completes and `key` of its result is `value`: the limits are not too tight."""

    key: str
    value: Any


Row = Callable[[Stack], Any]


def run_output(value: Any = None, *, deep: int = 0) -> Row:
    def row(stack: Stack) -> Any:
        return stack.run(
            sagas_app.hostile, value=1, blob=blob(value) if not deep else "", deep=deep
        )

    return row


def run_input(**input: Any) -> Row:
    return lambda stack: stack.run(sagas_app.hostile, value=1, blob=blob({}), **input)


def run_keyed(key: Any) -> Row:
    return lambda stack: stack.runtime.start_saga(
        sagas_app.hostile, {"value": 1, "blob": blob({})}, idempotency_key=key
    )


def reuse_key_with_other_input(stack: Stack) -> Any:
    key = f"k-{time.monotonic_ns()}"
    first = stack.runtime.start_saga(
        sagas_app.hostile, {"value": 1, "blob": blob({})}, idempotency_key=key
    )
    again = stack.runtime.start_saga(
        sagas_app.hostile, {"value": 1, "blob": blob({})}, idempotency_key=key
    )
    assert again.saga_id == first.saga_id  # the same input replays
    finish(stack, first)
    # A finished saga's key keeps returning it...
    assert (
        stack.runtime.start_saga(
            sagas_app.hostile, {"value": 1, "blob": blob({})}, idempotency_key=key
        ).saga_id
        == first.saga_id
    )
    # ...and other input is a conflict, not a silent replay.
    return stack.runtime.start_saga(
        sagas_app.hostile, {"value": 2, "blob": blob({})}, idempotency_key=key
    )


def import_clashing_definitions(stack: Stack) -> Any:
    proc = subprocess.run(
        [sys.executable, "-c", "import tests.integration.clashing_definitions"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**stack.worker.env, "SAGALINE_READY_FILE": ""},
    )
    assert proc.returncode != 0
    raise DefinitionError(proc.stderr.strip().splitlines()[-1])


def run_empty_saga(stack: Stack) -> Any:
    return stack.runtime.start_saga(Saga(f"hostile_empty_{stack.name}"), {})


def worker_with_an_empty_saga(stack: Stack) -> Any:
    worker = WorkerProcess(
        "tests.integration.empty_definition_app", env=stack.env, concurrency=1, ready_timeout=30
    )
    try:
        with pytest.raises(Exception, match="exited with"):
            worker.start()
        assert not worker.is_running()
        raise DefinitionError(worker.log_text())
    finally:
        worker.cleanup()


ROWS: list[tuple[str, Row, Refused | StepRefused | Accepted]] = [
    # 1: depth
    (
        "input 480 deep",
        run_input(x=nested(480)),
        Refused(InputError, rf"input\['x'\](\['n'\])+: nesting deeper than {MAX_DEPTH} levels"),
    ),
    ("input 2000 deep", run_input(x=nested(2000)), Refused(InputError, "nesting deeper")),
    (
        "output 990 deep",
        run_output(deep=990),
        StepRefused(rf"output of step 'returns'(\['d'\])+: nesting deeper than {MAX_DEPTH}"),
    ),
    # 4: kombu's envelope
    (
        "input envelope",
        run_input(x={"__type__": "nosuch", "__value__": 1}),
        Refused(InputError, r"input\['x'\]: .*kombu's envelope"),
    ),
    (
        "output envelope",
        run_output({"when": {"__type__": "datetime", "__value__": "2024-01-01T00:00:00"}}),
        StepRefused(r"output of step 'returns'\['when'\]: .*kombu's envelope"),
    ),
    # 5: keys
    (
        "output int key",
        run_output({7: "seven"}),
        StepRefused(r"output of step 'returns': key 7 \(int\) is not a string"),
    ),
    (
        "output colliding keys",
        run_output({1: "a", "1": "b"}),
        StepRefused(r"key 1 \(int\) is not a string"),
    ),
    # 6: names and keys over the store limits, NUL
    (
        "saga name 300",
        lambda stack: Saga("n" * 300),
        Refused(DefinitionError, "is 300 characters long, over the limit of 200"),
    ),
    (
        "step name 300",
        lambda stack: Saga(f"hostile_{stack.name}_step").add_step(sagas_app.s1, name="s" * 300),
        Refused(DefinitionError, "step name .* over the limit of 200"),
    ),
    (
        "idempotency key 300",
        run_keyed("k" * 300),
        Refused(InputError, "is 300 characters long, over the limit of 255"),
    ),
    ("idempotency key NUL", run_keyed("k\x00"), Refused(InputError, "NUL")),
    ("output NUL", run_output({"t": "a\x00b"}), StepRefused("contains a NUL")),
    # 7: ids
    (
        "get_saga(123)",
        lambda stack: sagaline.get_saga(123, runtime=stack.runtime),  # type: ignore[arg-type]
        Refused(TypeError, "a saga id is a string"),
    ),
    (
        "get_saga NUL",
        lambda stack: sagaline.get_saga("a\x00b", runtime=stack.runtime),
        Refused(SagaNotFound, "no saga with id"),
    ),
    # 9: idempotency
    (
        "key reused with other input",
        reuse_key_with_other_input,
        Refused(IdempotencyConflict, "already started saga .* with other input"),
    ),
    # 11: definitions
    (
        "two sagas, one name",
        import_clashing_definitions,
        Refused(
            DefinitionError,
            r"another saga with this name, defined at .*"
            r"clashing_definitions.py:\d+, has other steps",
        ),
    ),
    ("empty saga run", run_empty_saga, Refused(DefinitionError, "a saga needs at least one step")),
    (
        "empty saga in a worker",
        worker_with_an_empty_saga,
        Refused(
            DefinitionError,
            r"DefinitionError: saga 'hostile_empty': a saga needs at least "
            r"one step",
        ),
    ),
    # 12: reserved context keys
    (
        "input saga_id",
        run_input(saga_id="mine"),
        Refused(InputError, r"input\['saga_id'\]: 'saga_id' is a reserved context key"),
    ),
    (
        "output saga_id",
        run_output({"saga_id": "x"}),
        StepRefused(r"output of step 'returns'\['saga_id'\]: 'saga_id' is a reserved"),
    ),
    # and what passes: the deepest accepted output reaches the next step and the store
    (
        "output at the depth limit",
        run_output({"deepest": nested(MAX_DEPTH - 1)}),
        Accepted("deepest", nested(MAX_DEPTH - 1)),
    ),
]


def test_hostile_input_is_refused_clearly_and_never_stops_a_worker(stack: Stack) -> None:
    worker_pid = stack.worker.pid
    started: list[str] = []
    for label, row, expected in ROWS:
        counts = stack.runtime.store.count_by_status()
        if isinstance(expected, Refused):
            with pytest.raises(expected.error, match=expected.match):
                row(stack)
            if expected.error is not IdempotencyConflict:
                assert stack.runtime.store.count_by_status() == counts, label
            continue
        handle = row(stack)
        started.append(handle.saga_id)
        if isinstance(expected, Accepted):
            assert finish(stack, handle)[expected.key] == expected.value, label
            continue
        with pytest.raises(SagaCompensated, match=expected.match):
            finish(stack, handle)
        view = sagaline.get_saga(handle.saga_id, runtime=stack.runtime)
        failed = view.step("returns")
        assert failed.status is StepStatus.FAILED and failed.attempt == 1, label
        assert failed.error is not None and failed.error.startswith("InputError: "), label
        (event,) = [e for e in view.history if e.kind == "step_failed"]
        assert event.detail["reason"] == "payload_refused" and event.detail["permanent"]
        assert [(s, a) for s, a, *_ in stack.ledger(handle.saga_id)] == [
            ("s1", "do"),
            ("s1", "undo"),
        ]
    assert_nothing_left(stack, started, worker_pid)


def assert_nothing_left(stack: Stack, saga_ids: list[str], worker_pid: int) -> None:
    """Every saga terminal with nothing due, after the sweeper had time to act, and the
    same worker process still serving."""
    time.sleep(2.5)  # more than two sweeps (SAGALINE_SWEEP_INTERVAL=1)
    for saga_id in saga_ids:
        view = sagaline.get_saga(saga_id, runtime=stack.runtime)
        assert view.status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED), saga_id
        assert view.saga.due_at is None
        assert all(s.due_at is None for s in view.steps), saga_id
    assert stack.worker.is_running() and stack.worker.pid == worker_pid
    log = stack.worker.log_text()
    assert "RecursionError" not in log
    assert "Can't decode message body" not in log
    # And it still runs sagas.
    handle = stack.run(sagas_app.hostile, value=1, blob=blob({"fine": True}))
    assert finish(stack, handle)["fine"] is True


# -- generated values ---------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(["\x00", "\ud800", "a\x00", "é😀"])
)
_keys = (
    st.text(max_size=4)
    | st.integers(-2, 2)
    | st.sampled_from(["saga_id", "compensation_data", "__type__", "__value__"])
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(_keys, inner, max_size=3)
        | st.fixed_dictionaries(
            {"__type__": st.sampled_from(["datetime", "x"]), "__value__": inner}
        )
    ),
    max_leaves=8,
) | st.integers(MAX_DEPTH - 2, MAX_DEPTH + 2).map(nested)


@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(input=st.dictionaries(_keys, _values, max_size=3), output=_values)
def test_generated_inputs_and_outputs_end_cleanly(
    stack: Stack, input: dict[Any, Any], output: Any
) -> None:
    assert stack.worker.is_running(), f"the worker died:\n{stack.worker.log_tail()}"
    extra = {k: v for k, v in input.items() if k not in ("value", "blob", "deep")}
    try:
        handle = stack.runtime.start_saga(
            sagas_app.hostile, {**extra, "value": 1, "blob": blob(output)}
        )
    except InputError as exc:
        assert exc.rule is not None and str(exc).startswith("input")
        return
    try:
        finish(stack, handle, timeout=30)
    except SagaCompensated:
        failed = sagaline.get_saga(handle.saga_id, runtime=stack.runtime).step("returns")
        assert failed.error is not None
        assert failed.error.startswith("InputError: output of step 'returns'")
    view = sagaline.get_saga(handle.saga_id, runtime=stack.runtime)
    assert view.status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)
    assert all(s.due_at is None for s in view.steps)
    assert stack.worker.is_running()


def test_the_worker_survives_the_generated_values(stack: Stack) -> None:
    # Runs after the property test of the same module-scoped stack.
    wait_until(stack.worker.is_running, timeout=5, interval=0.1, what="worker alive")
    assert "RecursionError" not in stack.worker.log_text()
