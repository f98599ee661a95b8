"""Child sagas: a step that runs a saga of its own, completed by the child's end."""

# A child-saga step has no message of its own: dispatching it creates the child
# (idempotently: its id and key derive from the parent step and attempt) and
# claims the parent step; the child's final transition completes the parent
# step. Should the process die in between, the parent step's due time brings
# the sweeper to `drive_child`, which finishes the job.

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from . import engine, recovery
from .definition import Saga
from .exceptions import InputError
from .records import Decision, Dispatch, SagaRecord, SagaState, StepRecord
from .states import (
    SAGA_TERMINAL,
    CompensationStatus,
    FailureReason,
    Phase,
    SagaStatus,
    StepStatus,
)

if TYPE_CHECKING:
    from .runtime import Runtime


def run_child(runtime: Runtime, d: Dispatch) -> None:
    """Claim a child-saga step (or its compensation), start its child, and drive it."""
    now = runtime.now()
    # Claim first: the child may end before this function returns, and its
    # notification must find the parent step RUNNING.
    if not runtime.store.claim_step(
        d.saga_id,
        d.step,
        d.phase,
        d.attempt,
        lease_until=now + runtime.settings.redispatch_after,
        now=now,
    ):
        return
    if d.phase is Phase.FORWARD:
        input = {k: v for k, v in d.kwargs.items() if k != "saga_id"}
        try:
            runtime.start_saga(
                runtime.definition(str(d.child_saga)),
                input,
                idempotency_key=f"{d.saga_id}:{d.step}:{d.attempt}",
                parent_saga_id=d.saga_id,
                parent_step=d.step,
                saga_id=child_saga_id(d.saga_id, d.step, d.attempt),
                trace_parent=d.trace_context,
            )
        except InputError as exc:
            # The same input would be refused on every try: fail the step for good
            # (raising would leave it to the sweeper, which would try for ever).
            runtime.apply(
                d.saga_id,
                engine.step_failed,
                d.step,
                d.attempt,
                error=f"InputError: {exc}",
                permanent=True,
                reason=FailureReason.PAYLOAD_REFUSED,
            )
            return
    drive_child(runtime, d.saga_id, d.step)


def drive_child(runtime: Runtime, parent_id: str, step: str) -> None:
    """Move a claimed child-saga step (or its compensation) as far as it can go.

    Called right after the claim and by the sweeper whenever the step is due, so
    that a process dying anywhere in between leaves nothing stuck.
    """
    store = runtime.store
    parent = store.read_state(parent_id)
    rec = None if parent is None else parent.steps.get(step)
    if rec is None:
        return
    compensating = rec.comp_status is CompensationStatus.RUNNING
    if not compensating and rec.status is not StepStatus.RUNNING:
        return
    phase = Phase.COMPENSATE if compensating else Phase.FORWARD
    child_id = child_of(parent_id, rec)
    child = store.get_saga(child_id)
    if child is None:
        if compensating:  # no child was ever created: nothing to undo
            runtime.apply(parent_id, engine.compensation_succeeded, step, rec.comp_attempt)
        else:  # claimed, then the process died before creating it: a crashed attempt
            runtime.apply(parent_id, recovery.lease_expired, step)
        return
    if compensating:
        cause = f"parent saga {parent_id} is rolling back"
        if child.status is SagaStatus.COMPLETED:
            runtime.apply(child_id, recovery.rollback_completed, cause=cause)
        elif child.status is SagaStatus.FAILED:
            runtime.apply(child_id, recovery.resume)
        elif child.status is SagaStatus.RUNNING:
            # Its outcome was given up on (a grace period ended): stop it; it then
            # compensates itself and its end completes this compensation.
            runtime.apply(child_id, recovery.cancel, reason=cause)
        child = store.get_saga(child_id) or child
        done = child.status in (SagaStatus.COMPENSATED, SagaStatus.FAILED)
    else:
        done = child.status in SAGA_TERMINAL
    if done:
        notify_parent(runtime, child)
    else:
        store.renew_lease(
            parent_id,
            step,
            phase,
            rec.attempt_for(phase),
            runtime.now() + runtime.settings.redispatch_after,
        )


def notify_parent(runtime: Runtime, child: SagaRecord) -> None:
    """Settle the parent step (or its compensation) that a child saga's end decides."""
    parent_id, step = str(child.parent_saga_id), str(child.parent_step)

    def decide(defn: Saga, st: SagaState) -> Decision | None:
        rec = st.steps[step]
        now = runtime.now()
        if rec.comp_status is not None:
            if child.saga_id != child_of(parent_id, rec):
                return None
            if child.status is SagaStatus.COMPENSATED:
                return engine.compensation_succeeded(
                    defn, st, step, rec.comp_attempt, now=now, timing=runtime.timing
                )
            if child.status is SagaStatus.FAILED:
                return engine.compensation_failed(
                    defn,
                    st,
                    step,
                    rec.comp_attempt,
                    now=now,
                    timing=runtime.timing,
                    error=f"child saga {child.saga_id} failed: {child.error}",
                )
            return None
        if child.saga_id != child_saga_id(parent_id, step, rec.attempt):
            return None  # a child of an earlier attempt
        if child.status is SagaStatus.COMPLETED:
            added = (
                engine.changed_keys(child.input, child.output)
                if isinstance(child.output, dict)
                else child.output
            )
            return engine.step_succeeded(
                defn,
                st,
                step,
                rec.attempt,
                output=added,
                compensation_data={"child_saga_id": child.saga_id},
                has_compensation_data=True,
                now=now,
                timing=runtime.timing,
            )
        return engine.step_failed(
            defn,
            st,
            step,
            rec.attempt,
            now=now,
            timing=runtime.timing,
            reason=_CHILD_ENDED.get(child.status, FailureReason.CHILD_SAGA_FAILED),
            error=f"child saga {child.name} {child.saga_id} ended {child.status.value}: "
            f"{child.error}",
        )

    runtime.transact(parent_id, decide)


# Why a step run by a child saga failed, by how the child ended.
_CHILD_ENDED = {
    SagaStatus.COMPENSATED: FailureReason.CHILD_SAGA_COMPENSATED,
    SagaStatus.FAILED: FailureReason.CHILD_SAGA_FAILED,
}


def child_saga_id(parent_id: str, step: str, attempt: int) -> str:
    """The id of the child saga that a parent step's attempt runs: derived, so idempotent."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sagaline:{parent_id}:{step}:{attempt}"))


def child_of(parent_id: str, rec: StepRecord) -> str:
    """The child saga a parent step ran: recorded when it completed, else derived."""
    data = rec.compensation_data if isinstance(rec.compensation_data, dict) else {}
    return str(data.get("child_saga_id") or child_saga_id(parent_id, rec.name, rec.attempt))
