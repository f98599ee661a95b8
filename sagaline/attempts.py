"""A forward attempt: dispatching a step's message, and settling an attempt that failed.

`dispatch_forward` builds the message of a step's attempt (its context, or what its
`input=` mapper made of it); `fail_attempt` decides what a failed attempt leads to:
a retry with backoff, or the step failed and the saga rolled back (or, after the
pivot, failed). Pure, like engine.py: it changes a Work and performs no I/O.
"""

from __future__ import annotations

from typing import Any

from . import payload
from .compensation import begin_compensation
from .exceptions import first_line
from .states import CRASH_REASONS, EventKind, FailureReason, Phase, SagaStatus, StepStatus
from .steps import Step
from .work import Work


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
    w.send(name, Phase.FORWARD, attempt, spec.task_name or "", kwargs, countdown)


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
