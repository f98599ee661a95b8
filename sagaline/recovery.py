"""Pure decisions for operators and the sweeper: cancel, resume, deadlines, leases, re-publishes.

Like engine.py, every function reads a saga's state and returns a Decision, with
no I/O; they reuse the engine's forward and rollback machinery. Decisions for a
message no worker could take are in undelivered.py.
"""

from __future__ import annotations

from dataclasses import replace

from .attempts import dispatch_forward, fail_attempt
from .compensation import (
    begin_compensation,
    dispatch_compensation,
    fail_compensation_attempt,
    needs_compensation,
)
from .definition import Saga
from .engine import advance
from .records import Decision, Owner, SagaState
from .states import (
    STEP_IN_FLIGHT,
    CompensationStatus,
    EventKind,
    FailureReason,
    FailureStrategy,
    Phase,
    SagaStatus,
    StepStatus,
)
from .undelivered import refused_message as refused_message
from .undelivered import undeliverable as undeliverable
from .undelivered import unregistered_task as unregistered_task
from .work import Timing, Work


def cancel(
    defn: Saga, state: SagaState, *, reason: str, now: float, timing: Timing
) -> Decision | None:
    w = Work(defn, state, now, timing)
    if w.saga.status is not SagaStatus.RUNNING:
        return None
    begin_compensation(w, cause=reason, failed_step=None, strategy=FailureStrategy.FAIL_FAST)
    advance(w)
    return w.decision()


def deadline_or_grace_due(
    defn: Saga, state: SagaState, *, now: float, timing: Timing
) -> Decision | None:
    """The saga's due time passed: its deadline (RUNNING) or its grace period (COMPENSATING)."""
    w = Work(defn, state, now, timing)
    if w.saga.due_at is None or w.saga.due_at > now:
        return None
    if w.saga.status is SagaStatus.RUNNING:
        w.event(EventKind.SAGA_DEADLINE_EXCEEDED, deadline=w.saga.deadline)
        begin_compensation(
            w,
            cause=f"deadline exceeded (timeout={defn.timeout}s)",
            failed_step=None,
            strategy=FailureStrategy.FAIL_FAST,
        )
    elif w.saga.status is SagaStatus.COMPENSATING:
        w.update_saga(due_at=None)
        for name in w.graph.order:
            rec = w.steps[name]
            if rec.status in STEP_IN_FLIGHT:
                # Its outcome is unknown: count it as applied so that it is undone too.
                w.update_step(
                    name,
                    status=StepStatus.FAILED,
                    finished_at=now,
                    lease_until=None,
                    due_at=None,
                    has_compensation_data=True,
                    compensation_data=rec.compensation_data,
                    error="outcome unknown: still running when the grace period ended",
                )
                w.event(
                    EventKind.STEP_ABANDONED,
                    name,
                    rec.attempt,
                    Phase.FORWARD,
                    reason=FailureReason.GRACE_PERIOD_ENDED,
                )
    else:
        w.update_saga(due_at=None)
    advance(w)
    return w.decision()


def rollback_completed(
    defn: Saga, state: SagaState, *, cause: str, now: float, timing: Timing
) -> Decision | None:
    """Compensate a COMPLETED saga as a whole: a child whose parent is rolling back."""
    w = Work(defn, state, now, timing)
    if w.saga.status is not SagaStatus.COMPLETED:
        return None
    begin_compensation(w, cause=cause, failed_step=None, strategy=FailureStrategy.FAIL_FAST)
    advance(w)
    return w.decision()


def lease_expired(
    defn: Saga, state: SagaState, step: str, *, now: float, timing: Timing
) -> Decision | None:
    """The sweeper found a RUNNING step (or compensation) whose worker stopped renewing it."""
    w = Work(defn, state, now, timing)
    rec = w.steps[step]
    if rec.lease_until is None or rec.lease_until > now:
        return None
    error = "LeaseExpired: the worker running it died or stopped responding"
    phase = rec.running_phase
    if phase is Phase.FORWARD:
        fail_attempt(w, step, error=error, permanent=False, reason=FailureReason.LEASE_EXPIRED)
    elif phase is Phase.COMPENSATE:
        fail_compensation_attempt(w, step, error=error, reason=FailureReason.LEASE_EXPIRED)
    else:
        return None
    advance(w)
    return w.decision()


def claim_lost(
    defn: Saga,
    state: SagaState,
    step: str,
    phase: Phase,
    attempt: int,
    owner: Owner,
    *,
    cause: str,
    now: float,
    timing: Timing,
) -> Decision | None:
    """The process that held this claim is known to be dead: a crashed attempt, at once.

    Like `lease_expired` (the attempt may have applied its effect; it counts against
    crash_retries), but without waiting for the lease. Fenced: it acts only while the
    step is still RUNNING under this attempt and this owner, so a claim made since
    by another process, or a completion that committed, is never touched.
    """
    w = Work(defn, state, now, timing)
    rec = w.steps[step]
    if rec.running_phase is not phase or rec.attempt_for(phase) != attempt or rec.owner != owner:
        return None
    error = f"WorkerLost: {cause}"
    if phase is Phase.FORWARD:
        fail_attempt(w, step, error=error, permanent=False, reason=FailureReason.WORKER_LOST)
    else:
        fail_compensation_attempt(w, step, error=error, reason=FailureReason.WORKER_LOST)
    advance(w)
    return w.decision()


def message_lost(
    defn: Saga,
    state: SagaState,
    step: str,
    phase: Phase,
    attempt: int,
    owner: Owner | None,
    *,
    cause: str,
    now: float,
    timing: Timing,
    reason: str = "message_lost",
) -> Decision | None:
    """A process that took this step's message may have died before finishing with it.

    Either the pool process that took it died (its worker's main process saw it, and
    the message goes with it: `owner` is that process), or the broker delivered the
    message again after its consumer was lost (`owner` None: who had it is unknown).
    Whatever that process left unfinished is put right at once, fenced like every
    decision: a claim it never committed (the step is still DISPATCHED under this
    attempt) is published again; a claim `owner` held is a crashed attempt
    (`claim_lost`); a step that has moved on may have been settled by a process that
    died before publishing what the completion dispatched, so those messages are
    published again (`republish_pending`). A claim held by another process is left
    alone: as far as anyone here knows, it is alive.
    """
    rec = state.steps.get(step)
    if rec is None:
        return None
    if rec.is_dispatched(phase, attempt):
        return republish_pending(defn, state, now=now, timing=timing, reason=reason, only=step)
    if rec.is_running(phase, attempt):
        if owner is None or rec.owner != owner:
            return None
        return claim_lost(
            defn, state, step, phase, attempt, owner, cause=cause, now=now, timing=timing
        )
    return republish_pending(defn, state, now=now, timing=timing, reason=reason)


def republish_pending(
    defn: Saga,
    state: SagaState,
    *,
    now: float,
    timing: Timing,
    reason: str,
    only: str | None = None,
) -> Decision | None:
    """Publish again, at once, the messages of this saga that should be in the broker now.

    Called when a process may have died between a commit that dispatched steps and
    the publish of their messages (a redelivered message of a step already settled
    shows it): every step or compensation DISPATCHED whose backoff has passed gets
    its message again, under the same attempt, so a copy that was not lost is
    refused by the claim. A retry still waiting for its backoff is left to the
    process that keeps it, or to the sweeper.
    """
    w = Work(defn, state, now, timing)
    for name in w.graph.order:
        if only is not None and name != only:
            continue
        rec = w.steps[name]
        if rec.due_at is None or rec.due_at - timing.redispatch_after > now:
            continue  # not dispatched, or a backoff not over yet
        if rec.is_dispatched(Phase.FORWARD) and w.saga.status in (
            SagaStatus.RUNNING,
            SagaStatus.COMPENSATING,
        ):
            dispatch_forward(w, name, attempt=rec.attempt, announce=False)
            w.event(EventKind.STEP_REDISPATCHED, name, rec.attempt, Phase.FORWARD, reason=reason)
        elif rec.is_dispatched(Phase.COMPENSATE):
            dispatch_compensation(w, name, attempt=rec.comp_attempt, announce=False)
            w.event(
                EventKind.COMPENSATION_REDISPATCHED,
                name,
                rec.comp_attempt,
                Phase.COMPENSATE,
                reason=reason,
            )
    decision = w.decision()
    return decision if decision.dispatches else None


def redispatch(
    defn: Saga, state: SagaState, step: str, *, now: float, timing: Timing
) -> Decision | None:
    """Publish again a DISPATCHED message that may have been lost (same attempt: fenced)."""
    w = Work(defn, state, now, timing)
    rec = w.steps[step]
    if rec.due_at is None or rec.due_at > now:
        return None
    # A message that merely waits behind a backlog looks lost too: back off, so that a
    # busy queue is not flooded with copies (each copy is fenced, but costs a delivery).
    times = rec.redispatches + 1
    # The queue wait of the step counts from when its previous copy was published
    # (the first time: its dispatch), read back from the due time that publish set.
    previous = rec.due_at - w.timing.redispatch_after * (
        min(2**rec.redispatches, 32) if rec.redispatches else 1
    )
    if rec.is_dispatched(Phase.FORWARD) and w.saga.status in (
        SagaStatus.RUNNING,
        SagaStatus.COMPENSATING,
    ):
        dispatch_forward(w, step, attempt=rec.attempt, announce=False)
        w.event(EventKind.STEP_REDISPATCHED, step, rec.attempt, Phase.FORWARD, times=times)
    elif rec.is_dispatched(Phase.COMPENSATE):
        dispatch_compensation(w, step, attempt=rec.comp_attempt, announce=False)
        w.event(
            EventKind.COMPENSATION_REDISPATCHED,
            step,
            rec.comp_attempt,
            Phase.COMPENSATE,
            times=times,
        )
    else:
        return None
    w.update_step(
        step, redispatches=times, due_at=now + w.timing.redispatch_after * min(2**times, 32)
    )
    w.dispatches[-1] = replace(w.dispatches[-1], ready_at=previous)
    return w.decision()


def resume(defn: Saga, state: SagaState, *, now: float, timing: Timing) -> Decision | None:
    """Retry exactly what is unfinished in a FAILED saga (compensations, or forward steps)."""
    w = Work(defn, state, now, timing)
    if w.saga.status is not SagaStatus.FAILED:
        return None
    failed_comps = [
        n for n in w.graph.order if w.steps[n].comp_status is CompensationStatus.COMPENSATION_FAILED
    ]
    # After a pivot nothing is compensated: the saga can only go forward.
    if failed_comps or (
        not w.pivot_passed()
        and any(needs_compensation(w, n) and w.steps[n].comp_status is None for n in w.graph.order)
    ):
        w.update_saga(status=SagaStatus.COMPENSATING, finished_at=None)
        w.event(EventKind.SAGA_RESUMED, mode="compensation", steps=failed_comps)
        for n in failed_comps:
            w.update_step(n, comp_status=None, comp_error=None)
        advance(w)
        return w.decision()
    failed_forward = [n for n in w.graph.order if w.steps[n].status is StepStatus.FAILED]
    w.update_saga(status=SagaStatus.RUNNING, finished_at=None, error=None, failed_step=None)
    w.event(EventKind.SAGA_RESUMED, mode="forward", steps=failed_forward)
    for n in failed_forward:
        dispatch_forward(w, n, attempt=w.steps[n].attempt + 1)
    advance(w)
    return w.decision()


def snooze(state: SagaState, step: str | None, *, now: float, timing: Timing) -> Decision | None:
    """Push back an item the sweeper found due but could not act on.

    Such an item (no process here has the saga's code; a message of a saga parked
    FAILED) would otherwise stay first among the due items and, in numbers, keep
    the sweeper from ever reaching the others.
    """
    later = now + timing.redispatch_after
    if step is None:
        if state.saga.due_at is None or state.saga.due_at > now:
            return None
        return Decision(saga=replace(state.saga, due_at=later), saga_version=state.saga.version)
    rec = state.steps.get(step)
    if rec is None or rec.due_at is None or rec.due_at > now:
        return None
    return Decision(steps=[replace(rec, due_at=later)], step_versions={step: rec.version})
