"""Pure saga decisions: (definition, state, event) -> Decision. No I/O happens here.

Every function takes the saga's current state (read under its lock by the store),
works on a copy (work.py), and returns the records to write, the history events to
append and the Celery messages to publish after commit. Stale events (a completion
for an attempt that is no longer the running one) decide nothing. This module holds
the entry points and the forward path; a forward attempt's message and its
failure are in attempts.py, rolling back is in compensation.py.
"""

from __future__ import annotations

from typing import Any

from . import payload
from .attempts import dispatch_forward as dispatch_forward
from .attempts import fail_attempt as fail_attempt
from .attempts import mapped_input as mapped_input
from .attempts import step_kwargs as step_kwargs
from .compensation import compensation_progress, fail_compensation_attempt
from .definition import Saga
from .exceptions import InputError
from .exceptions import describe_error as describe_error
from .exceptions import first_line as first_line
from .records import Decision, SagaRecord, SagaState, StepRecord
from .states import (
    CompensationStatus,
    EventKind,
    FailureReason,
    Phase,
    SagaStatus,
    StepStatus,
)
from .steps import StepKind
from .work import Timing as Timing
from .work import Work as Work
from .work import changed_keys as changed_keys
from .work import saga_result

# A step that waits on another may start once that one is in one of these statuses.
_DONE = (StepStatus.SUCCEEDED, StepStatus.SKIPPED)

# -- starting ----------------------------------------------------------------------


def start(
    defn: Saga,
    saga_id: str,
    input: dict[str, Any],
    *,
    now: float,
    timing: Timing,
    idempotency_key: str | None = None,
    parent_saga_id: str | None = None,
    parent_step: str | None = None,
    input_fingerprint: str | None = None,
    trace_context: str | None = None,
) -> tuple[SagaState, Decision]:
    """The new saga, its steps, and the root steps dispatched: written in one transaction."""
    graph = defn.graph
    deadline = now + defn.timeout if defn.timeout else None
    saga = SagaRecord(
        saga_id=saga_id,
        name=defn.name,
        status=SagaStatus.RUNNING,
        input=input,
        fingerprint=defn.fingerprint,
        created_at=now,
        updated_at=now,
        idempotency_key=idempotency_key,
        deadline=deadline,
        due_at=deadline,
        parent_saga_id=parent_saga_id,
        parent_step=parent_step,
        input_fingerprint=input_fingerprint,
        trace_context=trace_context,
    )
    steps = {
        n: StepRecord(saga_id, n, i, depends_on=list(graph.steps[n].depends_on))
        for i, n in enumerate(graph.order)
    }
    state = SagaState(saga, steps)
    w = Work(defn, state, now, timing)
    w.event(
        EventKind.SAGA_STARTED,
        name=defn.name,
        idempotency_key=idempotency_key,
        fingerprint=defn.fingerprint,
        deadline=deadline,
    )
    advance(w)
    initial = SagaState(w.saga, w.steps)
    return initial, Decision(
        saga=w.saga, steps=list(w.steps.values()), events=w.events, dispatches=w.dispatches
    )


# -- forward events ----------------------------------------------------------------


def step_succeeded(
    defn: Saga,
    state: SagaState,
    step: str,
    attempt: int,
    *,
    output: Any,
    compensation_data: Any,
    has_compensation_data: bool,
    now: float,
    timing: Timing,
) -> Decision | None:
    w = Work(defn, state, now, timing)
    rec = w.steps[step]
    if not rec.is_running(Phase.FORWARD, attempt):
        return None
    w.update_step(
        step,
        status=StepStatus.SUCCEEDED,
        output=output,
        compensation_data=compensation_data if has_compensation_data else None,
        has_compensation_data=has_compensation_data,
        finished_at=now,
        lease_until=None,
        due_at=None,
    )
    late = w.saga.status is not SagaStatus.RUNNING
    w.event(
        EventKind.STEP_SUCCEEDED,
        step,
        attempt,
        Phase.FORWARD,
        **({"after_rollback_began": True} if late else {}),
    )
    if defn.graph.steps[step].pivot and not late:
        w.event(EventKind.PIVOT_PASSED, step)
    advance(w)
    return w.decision()


def step_failed(
    defn: Saga,
    state: SagaState,
    step: str,
    attempt: int,
    *,
    error: str,
    permanent: bool = False,
    reason: FailureReason = FailureReason.ERROR,
    compensation_data: Any = None,
    has_compensation_data: bool = False,
    now: float,
    timing: Timing,
) -> Decision | None:
    """A failed attempt: retry with backoff, or fail the step and roll back."""
    w = Work(defn, state, now, timing)
    rec = w.steps[step]
    if not rec.is_running(Phase.FORWARD, attempt):
        return None
    fail_attempt(
        w,
        step,
        error=error,
        permanent=permanent,
        reason=reason,
        compensation_data=compensation_data,
        has_compensation_data=has_compensation_data,
    )
    advance(w)
    return w.decision()


def advance(w: Work) -> None:
    """Carry the saga forward as far as it can go without running a task."""
    for _ in range(len(w.graph.order) + 2):
        if w.saga.status is SagaStatus.RUNNING:
            if not forward_progress(w):
                break
        else:
            break
    # Latest steps first: in a saga still running, a step late in the order is the one
    # likeliest not done yet, so this does not look at every step of each decision.
    if w.saga.status is SagaStatus.RUNNING and all(
        w.steps[n].status in _DONE for n in reversed(w.graph.order)
    ):
        w.update_saga(
            status=SagaStatus.COMPLETED, output=saga_result(w), finished_at=w.now, due_at=None
        )
        w.event(EventKind.SAGA_COMPLETED)
    if w.saga.status is SagaStatus.COMPENSATING:
        compensation_progress(w)


def forward_progress(w: Work) -> bool:
    """Start every step whose dependencies are done. Returns True if a step settled inline."""
    settled_inline = False
    steps = w.steps
    for name in w.graph.order:
        # Each decision looks at every step here: what follows `continue` stays cheap.
        if steps[name].status is not StepStatus.PENDING:
            continue
        spec = w.graph.steps[name]
        if _waiting(steps, spec.depends_on):
            continue
        ctx = w.context_for(name)
        try:
            if spec.when is not None and not spec.when(ctx):
                w.update_step(name, status=StepStatus.SKIPPED, finished_at=w.now)
                w.event(EventKind.STEP_SKIPPED, name, reason=FailureReason.CONDITION_FALSE)
                settled_inline = True
                continue
            if spec.kind == StepKind.TRANSFORM:
                assert spec.transform is not None
                out = spec.transform(ctx)
                if not isinstance(out, dict):
                    raise TypeError(
                        f"transform {name!r} must return a dict, got {type(out).__name__}"
                    )
                diff = changed_keys(ctx, out)
                payload.check_object(
                    diff, f"result of transform {name!r}", max_bytes=w.timing.max_payload_bytes
                )
                w.update_step(
                    name,
                    status=StepStatus.SUCCEEDED,
                    output=diff,
                    attempt=1,
                    started_at=w.now,
                    finished_at=w.now,
                )
                w.event(EventKind.TRANSFORM_APPLIED, name, keys=sorted(diff))
                settled_inline = True
                continue
            kwargs = step_kwargs(w, spec, ctx)
            # Each part of the context was checked when it entered; together they
            # may still be more than a message may carry (saga_id aside, so that an
            # input just under the limit still starts).
            payload.check_size(
                {k: v for k, v in kwargs.items() if k != "saga_id"},
                f"context of step {name!r}",
                max_bytes=w.timing.max_payload_bytes,
            )
            dispatch_forward(w, name, attempt=1, ctx=ctx, kwargs=kwargs)
        except InputError as exc:  # the message it would send breaks a payload rule
            w.update_step(name, attempt=1)
            fail_attempt(
                w,
                name,
                error=f"InputError: {exc}",
                permanent=True,
                reason=FailureReason.PAYLOAD_REFUSED,
            )
            return False
        except Exception as exc:  # a user predicate, transform or input mapper raised
            w.update_step(name, attempt=1)  # settled as one attempt, failed
            fail_attempt(
                w,
                name,
                error=describe_error(exc),
                permanent=True,
                reason=FailureReason.DEFINITION_CALLABLE_FAILED,
            )
            return False
    return settled_inline


def _waiting(steps: dict[str, StepRecord], depends_on: tuple[str, ...]) -> bool:
    """Whether one of the steps `depends_on` names is not done yet."""
    # A loop, not any() over a generator: at a third of its cost, as every pending
    # step of the saga is looked at for each decision.
    for d in depends_on:  # noqa: SIM110
        if steps[d].status not in _DONE:
            return True
    return False


# -- rolling back: events of compensations -----------------------------------------


def compensation_succeeded(
    defn: Saga, state: SagaState, step: str, attempt: int, *, now: float, timing: Timing
) -> Decision | None:
    w = Work(defn, state, now, timing)
    rec = w.steps[step]
    if not rec.is_running(Phase.COMPENSATE, attempt):
        return None
    w.update_step(
        step,
        comp_status=CompensationStatus.COMPENSATED,
        lease_until=None,
        due_at=None,
        comp_error=None,
    )
    w.event(EventKind.COMPENSATION_SUCCEEDED, step, attempt, Phase.COMPENSATE)
    advance(w)
    return w.decision()


def compensation_failed(
    defn: Saga,
    state: SagaState,
    step: str,
    attempt: int,
    *,
    error: str,
    reason: FailureReason = FailureReason.ERROR,
    now: float,
    timing: Timing,
) -> Decision | None:
    w = Work(defn, state, now, timing)
    rec = w.steps[step]
    if not rec.is_running(Phase.COMPENSATE, attempt):
        return None
    fail_compensation_attempt(w, step, error=error, reason=reason)
    advance(w)
    return w.decision()
