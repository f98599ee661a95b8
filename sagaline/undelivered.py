"""Pure decisions for a step's message that no worker could take.

A worker with other code for the saga refused it (`refused_message`), no worker
has its task (`unregistered_task`), or it can never be delivered at all
(`undeliverable`: the step fails without retries). Like recovery.py, every
function reads a saga's state and returns a Decision, with no I/O.
"""

from __future__ import annotations

from dataclasses import replace

from .attempts import fail_attempt
from .definition import Saga
from .engine import advance
from .records import Decision, Event, SagaState
from .states import CompensationStatus, EventKind, FailureReason, Phase
from .work import Timing, Work


def refused_message(state: SagaState, event: Event, phase: Phase, *, timing: Timing) -> Decision:
    """A worker with other code for this saga dropped one of its messages.

    It records why and offers the message again soon, to another worker: a refusal
    says nothing of a backlog, so the re-publish backoff starts over. Only the
    step's due time changes; no decision of the saga's graph is made without it.
    """
    rec = state.steps.get(event.step or "")
    decision = Decision(events=[event])
    if rec is not None and event.attempt is not None and rec.is_dispatched(phase, event.attempt):
        decision.steps = [replace(rec, due_at=event.ts + timing.redispatch_after, redispatches=0)]
        decision.step_versions = {rec.name: rec.version}
    return decision


def undeliverable(
    defn: Saga,
    state: SagaState,
    step: str,
    phase: Phase,
    attempt: int,
    *,
    reason: FailureReason,
    error: str,
    now: float,
    timing: Timing,
    claimed: bool = False,
) -> Decision | None:
    """A step's message can never be delivered: fail it now, without retries.

    Its message could not be encoded, reached a worker undecodable, or no worker
    has its task. Sending it again would fail the same way, so the step fails
    for good (the saga compensates) or, for a compensation, it is marked failed
    (the saga parks FAILED for an operator). `claimed`: the caller claimed the
    step itself (a child-saga step that could not start its child).
    """
    w = Work(defn, state, now, timing)
    rec = w.steps[step]
    if not (rec.is_dispatched(phase, attempt) or (claimed and rec.is_running(phase, attempt))):
        return None  # settled meanwhile, or a message of an earlier attempt
    if phase is Phase.FORWARD:
        fail_attempt(w, step, error=error, permanent=True, reason=reason)
    else:
        w.update_step(
            step,
            comp_status=CompensationStatus.COMPENSATION_FAILED,
            comp_error=error,
            lease_until=None,
            due_at=None,
        )
        w.event(
            EventKind.COMPENSATION_FAILED,
            step,
            attempt,
            Phase.COMPENSATE,
            reason=reason,
            error=error,
            permanent=True,
        )
    advance(w)
    return w.decision()


def unregistered_task(
    defn: Saga,
    state: SagaState,
    event: Event,
    phase: Phase,
    *,
    max_redispatches: int,
    now: float,
    timing: Timing,
) -> Decision:
    """A worker received a step's message but has no such task, and dropped it.

    Records it (`event`), then has the sweeper publish the message again soon:
    another worker may know the task. Once the message was published again
    `max_redispatches` times and still refused, the step fails (`undeliverable`).
    """
    rec = state.steps.get(event.step or "")
    if rec is None or event.attempt is None or not rec.is_dispatched(phase, event.attempt):
        return Decision(events=[event])  # a stale copy: only say so
    if rec.redispatches >= max_redispatches:
        task = event.detail.get("task")
        error = (
            f"TaskNotRegistered: no worker has task {task!r} registered (last refused "
            f"by {event.detail.get('worker')}, after {rec.redispatches} redispatches)"
        )
        decision = undeliverable(
            defn,
            state,
            rec.name,
            phase,
            rec.attempt_for(phase),
            reason=FailureReason.TASK_UNREGISTERED,
            error=error,
            now=now,
            timing=timing,
        )
        if decision is not None:
            decision.events.insert(0, event)
            return decision
        return Decision(events=[event])
    return Decision(
        events=[event],
        steps=[replace(rec, due_at=now + timing.redispatch_after)],
        step_versions={rec.name: rec.version},
    )
