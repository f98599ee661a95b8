"""Rolling a saga back: which steps to undo, in what order, and when the rollback is done.

A step is compensated only once nothing after it in the graph is still applied;
the functions here work on the engine's working copy (work.py) and decide nothing
on their own: engine.py and recovery.py call them.
"""

from __future__ import annotations

from .states import (
    COMPENSATION_IN_FLIGHT,
    STEP_IN_FLIGHT,
    CompensationStatus,
    EventKind,
    FailureReason,
    FailureStrategy,
    Phase,
    SagaStatus,
    StepStatus,
)
from .steps import StepKind
from .work import Work


def begin_compensation(
    w: Work, *, cause: str, failed_step: str | None, strategy: FailureStrategy
) -> None:
    w.update_saga(status=SagaStatus.COMPENSATING, error=cause, failed_step=failed_step)
    due = None
    if strategy is FailureStrategy.FAIL_FAST_WITH_GRACE and any(
        w.steps[n].status in STEP_IN_FLIGHT for n in w.graph.order
    ):
        due = w.now + w.defn.grace
    w.update_saga(due_at=due)
    w.event(
        EventKind.SAGA_COMPENSATING,
        failed_step,
        cause=cause,
        strategy=strategy.value,
        grace_until=due,
    )
    for name in w.graph.order:
        rec = w.steps[name]
        if rec.status is StepStatus.PENDING or (
            rec.status is StepStatus.DISPATCHED and strategy is not FailureStrategy.WAIT_ALL
        ):
            # A DISPATCHED message may still arrive: its claim fails, so it never runs.
            w.update_step(name, status=StepStatus.CANCELLED, finished_at=w.now, due_at=None)
            w.event(EventKind.STEP_CANCELLED, name, rec.attempt or None)


def needs_compensation(w: Work, name: str) -> bool:
    spec = w.graph.steps[name]
    rec = w.steps[name]
    if spec.kind == StepKind.TRANSFORM or not spec.compensable:
        return False
    # FAILED or CANCELLED with compensation data: a permanent failure that reported
    # partial work, or a step whose worker died in an attempt (outcome unknown).
    return rec.status is StepStatus.SUCCEEDED or (
        rec.status in (StepStatus.FAILED, StepStatus.CANCELLED) and rec.has_compensation_data
    )


def rolled_back(w: Work, name: str, memo: dict[str, bool]) -> bool:
    """True when nothing of `name`, nor of any step after it, is applied any more."""
    if name in memo:
        return memo[name]
    rec = w.steps[name]
    if rec.status in STEP_IN_FLIGHT:
        result = False
    elif needs_compensation(w, name):
        result = rec.comp_status is CompensationStatus.COMPENSATED
    elif rec.status is StepStatus.SUCCEEDED:
        # Nothing to undo here, but what follows it must be undone first.
        result = all(rolled_back(w, d, memo) for d in w.graph.dependents[name])
    else:
        result = True
    memo[name] = result
    return result


def compensation_progress(w: Work) -> None:
    forward_in_flight = [n for n in w.graph.order if w.steps[n].status in STEP_IN_FLIGHT]
    if w.defn.failure_strategy is FailureStrategy.WAIT_ALL and forward_in_flight:
        return
    memo: dict[str, bool] = {}
    for name in reversed(w.graph.order):
        rec = w.steps[name]
        if not needs_compensation(w, name) or rec.comp_status is not None:
            continue
        if all(rolled_back(w, d, memo) for d in w.graph.dependents[name]):
            dispatch_compensation(w, name, attempt=1)
    if forward_in_flight or any(
        w.steps[n].comp_status in COMPENSATION_IN_FLIGHT for n in w.graph.order
    ):
        return
    pending = [
        n
        for n in w.graph.order
        if needs_compensation(w, n) and w.steps[n].comp_status is not CompensationStatus.COMPENSATED
    ]
    if not pending:
        w.update_saga(status=SagaStatus.COMPENSATED, finished_at=w.now, due_at=None)
        w.event(EventKind.SAGA_COMPENSATED, cause=w.saga.error)
        return
    failed = [
        n for n in pending if w.steps[n].comp_status is CompensationStatus.COMPENSATION_FAILED
    ]
    w.update_saga(status=SagaStatus.FAILED, finished_at=w.now, due_at=None)
    w.event(
        EventKind.SAGA_FAILED,
        reason=FailureReason.COMPENSATION_FAILED,
        compensation_failed=failed,
        still_applied=pending,
        cause=w.saga.error,
    )


def dispatch_compensation(
    w: Work, name: str, *, attempt: int, countdown: float = 0.0, announce: bool = True
) -> None:
    spec = w.graph.steps[name]
    rec = w.steps[name]
    ctx = w.context_for(name)
    data = rec.compensation_data if rec.has_compensation_data else rec.output
    kwargs = {**ctx, "compensation_data": data}
    w.update_step(
        name,
        comp_status=CompensationStatus.DISPATCHED,
        comp_attempt=attempt,
        lease_until=None,
        due_at=w.now + countdown + w.timing.redispatch_after,
        redispatches=0,
    )
    if announce and attempt == 1:
        w.event(EventKind.COMPENSATION_DISPATCHED, name, attempt, Phase.COMPENSATE)
    w.send(name, Phase.COMPENSATE, attempt, spec.compensation_name or "", kwargs, countdown)


def fail_compensation_attempt(w: Work, name: str, *, error: str, reason: FailureReason) -> None:
    rec = w.steps[name]
    policy = w.graph.steps[name].compensation_retry
    if rec.comp_attempt < policy.max_attempts:
        delay = policy.delay(rec.comp_attempt)
        w.event(
            EventKind.COMPENSATION_ATTEMPT_FAILED,
            name,
            rec.comp_attempt,
            Phase.COMPENSATE,
            reason=reason,
            error=error,
            retry_in=round(delay, 3),
        )
        dispatch_compensation(w, name, attempt=rec.comp_attempt + 1, countdown=delay)
        return
    w.update_step(
        name,
        comp_status=CompensationStatus.COMPENSATION_FAILED,
        comp_error=error,
        lease_until=None,
        due_at=None,
    )
    w.event(
        EventKind.COMPENSATION_FAILED,
        name,
        rec.comp_attempt,
        Phase.COMPENSATE,
        reason=reason,
        error=error,
    )
