"""Pure saga decisions: (definition, state, event) -> Decision. No I/O happens here.

Every function takes the saga's current state (read under its lock by the store),
works on a copy (work.py), and returns the records to write, the history events to
append and the Celery messages to publish after commit. Stale events (a completion
for an attempt that is no longer the running one) decide nothing. This module holds
the entry points and the forward path; rolling back is in compensation.py.
"""

from __future__ import annotations

from typing import Any

from . import payload
from .compensation import (
    begin_compensation,
    compensation_progress,
    fail_compensation_attempt,
)
from .definition import Saga
from .exceptions import InputError
from .exceptions import describe_error as describe_error
from .exceptions import first_line as first_line
from .records import Decision, Dispatch, SagaRecord, SagaState, StepRecord
from .states import (
    CRASH_REASONS,
    CompensationStatus,
    EventKind,
    FailureReason,
    Phase,
    SagaStatus,
    StepStatus,
)
from .steps import Step, StepKind
from .work import Timing as Timing
from .work import Work as Work
from .work import changed_keys as changed_keys
from .work import saga_result

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
    steps = {n: StepRecord(saga_id, n, i) for i, n in enumerate(graph.order)}
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


def fail_attempt(
    w: Work,
    name: str,
    *,
    error: str,
    permanent: bool,
    reason: FailureReason,
    compensation_data: Any = None,
    has_compensation_data: bool = False,
) -> None:
    spec = w.graph.steps[name]
    rec = w.steps[name]
    policy = spec.retry
    after_pivot = w.pivot_passed()
    if after_pivot and w.defn.pivot_retry.max_attempts > policy.max_attempts:
        policy = w.defn.pivot_retry
    crashed = reason in CRASH_REASONS
    allowed = policy.max_attempts + (w.timing.crash_retries if crashed else 0)
    if crashed or rec.has_compensation_data:
        # A worker died mid-run (now or in an earlier attempt): its effect may be applied.
        # The step stays "possibly applied" through retries, so that it is undone even
        # if its retry never runs; the compensation then gets compensation_data None.
        if not has_compensation_data:
            compensation_data = rec.compensation_data
        has_compensation_data = True
    if w.saga.status is SagaStatus.RUNNING and not permanent and rec.attempt < allowed:
        if crashed:
            w.update_step(name, has_compensation_data=True)
        delay = policy.delay(min(rec.attempt, policy.max_attempts))
        w.event(
            EventKind.STEP_ATTEMPT_FAILED,
            name,
            rec.attempt,
            Phase.FORWARD,
            reason=reason,
            error=error,
            retry_in=round(delay, 3),
            retry_forward=after_pivot,
        )
        dispatch_forward(w, name, attempt=rec.attempt + 1, countdown=delay)
        return
    w.update_step(
        name,
        status=StepStatus.FAILED,
        error=error,
        finished_at=w.now,
        lease_until=None,
        due_at=None,
        compensation_data=compensation_data if has_compensation_data else None,
        has_compensation_data=has_compensation_data,
    )
    w.event(
        EventKind.STEP_FAILED,
        name,
        rec.attempt,
        Phase.FORWARD,
        reason=reason,
        error=error,
        permanent=permanent,
    )
    if w.saga.status is not SagaStatus.RUNNING:
        return  # already rolling back: compensation_progress takes this step into account
    if after_pivot:
        w.update_saga(
            status=SagaStatus.FAILED,
            error=first_line(error),
            failed_step=name,
            finished_at=w.now,
            due_at=None,
        )
        w.event(
            EventKind.SAGA_FAILED,
            name,
            reason=FailureReason.FORWARD_RETRIES_EXHAUSTED_AFTER_PIVOT,
            error=first_line(error),
        )
        return
    begin_compensation(
        w, cause=first_line(error), failed_step=name, strategy=w.defn.failure_strategy
    )


def dispatch_forward(
    w: Work,
    name: str,
    *,
    attempt: int,
    countdown: float = 0.0,
    announce: bool = True,
    ctx: dict[str, Any] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> None:
    spec = w.graph.steps[name]
    if kwargs is None:
        kwargs = step_kwargs(w, spec, w.context_for(name) if ctx is None else ctx)
    w.update_step(
        name,
        status=StepStatus.DISPATCHED,
        attempt=attempt,
        lease_until=None,
        due_at=w.now + countdown + w.timing.redispatch_after,
        redispatches=0,
    )
    if announce and attempt == 1:
        w.event(EventKind.STEP_DISPATCHED, name, attempt, Phase.FORWARD)
    w.dispatches.append(
        Dispatch(
            w.saga.saga_id,
            w.saga.name,
            w.saga.fingerprint,
            name,
            Phase.FORWARD,
            attempt,
            spec.task_name or "",
            kwargs,
            countdown=countdown,
            queue=spec.queue,
            timeout=spec.timeout,
            child_saga=spec.child.name if spec.child else None,
            trace_context=w.saga.trace_context,
        )
    )


def step_kwargs(w: Work, spec: Step, ctx: dict[str, Any]) -> dict[str, Any]:
    """What a step's message carries: its context, or what its input= mapper made of it."""
    return ctx if spec.input is None else mapped_input(spec, ctx, w.timing.max_payload_bytes)


def mapped_input(spec: Step, ctx: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    assert spec.input is not None
    mapped = spec.input(ctx)
    if not isinstance(mapped, dict):
        raise TypeError(
            f"input= of step {spec.name!r} must return a dict, got {type(mapped).__name__}"
        )
    # saga_id is set below whatever the mapper returned (mappers often copy ctx).
    mapped = {k: v for k, v in mapped.items() if k != "saga_id"}
    payload.check_object(mapped, f"input= of step {spec.name!r}", max_bytes=max_bytes)
    return {**mapped, "saga_id": ctx["saga_id"]}


def advance(w: Work) -> None:
    """Carry the saga forward as far as it can go without running a task."""
    for _ in range(len(w.graph.order) + 2):
        if w.saga.status is SagaStatus.RUNNING:
            if not forward_progress(w):
                break
        else:
            break
    if w.saga.status is SagaStatus.RUNNING and all(
        w.steps[n].status in (StepStatus.SUCCEEDED, StepStatus.SKIPPED) for n in w.graph.order
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
    for name in w.graph.order:
        rec = w.steps[name]
        spec = w.graph.steps[name]
        if rec.status is not StepStatus.PENDING:
            continue
        if any(
            w.steps[d].status not in (StepStatus.SUCCEEDED, StepStatus.SKIPPED)
            for d in spec.depends_on
        ):
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
