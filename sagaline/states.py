"""Saga and step statuses as data: enums, the transition tables and terminal sets.

Also the kinds of history events and the reasons they give: the history is a
persisted format, so these values never change once released.
"""

from __future__ import annotations

from enum import Enum


class _StrEnum(str, Enum):
    """A str enum that prints as its value (as stored, and in messages)."""

    def __str__(self) -> str:
        return str(self.value)


class SagaStatus(_StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    FAILED = "FAILED"


class StepStatus(_StrEnum):
    """Forward status of a step."""

    PENDING = "PENDING"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    CANCELLED = "CANCELLED"


class CompensationStatus(_StrEnum):
    """Status of the compensation of a step that was applied."""

    PENDING = "PENDING"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    COMPENSATED = "COMPENSATED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"


class Phase(_StrEnum):
    """Which body a step message runs: the step itself or its compensation."""

    FORWARD = "forward"
    COMPENSATE = "compensate"


class FailureStrategy(_StrEnum):
    """What a failure does to parallel branches still in flight."""

    FAIL_FAST = "FAIL_FAST"
    WAIT_ALL = "WAIT_ALL"
    FAIL_FAST_WITH_GRACE = "FAIL_FAST_WITH_GRACE"


class EventKind(_StrEnum):
    """The kind of one history event (`Event.kind`)."""

    SAGA_STARTED = "saga_started"
    SAGA_COMPLETED = "saga_completed"
    SAGA_COMPENSATING = "saga_compensating"
    SAGA_COMPENSATED = "saga_compensated"
    SAGA_FAILED = "saga_failed"
    SAGA_DEADLINE_EXCEEDED = "saga_deadline_exceeded"
    SAGA_RESUMED = "saga_resumed"
    PIVOT_PASSED = "pivot_passed"
    STEP_DISPATCHED = "step_dispatched"
    STEP_REDISPATCHED = "step_redispatched"
    STEP_STARTED = "step_started"
    STEP_SUCCEEDED = "step_succeeded"
    STEP_ATTEMPT_FAILED = "step_attempt_failed"
    STEP_FAILED = "step_failed"
    STEP_ABANDONED = "step_abandoned"
    STEP_SKIPPED = "step_skipped"
    STEP_CANCELLED = "step_cancelled"
    TRANSFORM_APPLIED = "transform_applied"
    COMPENSATION_DISPATCHED = "compensation_dispatched"
    COMPENSATION_REDISPATCHED = "compensation_redispatched"
    COMPENSATION_STARTED = "compensation_started"
    COMPENSATION_SUCCEEDED = "compensation_succeeded"
    COMPENSATION_ATTEMPT_FAILED = "compensation_attempt_failed"
    COMPENSATION_FAILED = "compensation_failed"
    # A worker refused a step's message: it runs other code for the saga, or has no
    # such task.
    DEFINITION_MISMATCH = "definition_mismatch"
    TASK_UNREGISTERED = "task_unregistered"
    # An operator cancelled or resumed the saga (CLI or web); detail names the actor.
    OPERATOR_ACTION = "operator_action"


class FailureReason(_StrEnum):
    """Why an attempt, a step or a saga ended without success (`reason` in an event's detail)."""

    ERROR = "error"  # the body raised
    TIMEOUT = "timeout"  # the body ran past its soft time limit
    LEASE_EXPIRED = "lease_expired"  # its process died mid-run, found by the sweeper
    WORKER_LOST = "worker_lost"  # its process died mid-run, seen by its worker
    PAYLOAD_REFUSED = "payload_refused"  # the message it needs breaks a payload rule
    DEFINITION_CALLABLE_FAILED = "definition_callable_failed"  # a when=/input=/transform raised
    MESSAGE_UNSENDABLE = "message_unsendable"  # its message could not be published
    MESSAGE_UNDELIVERABLE = "message_undeliverable"  # a worker could not decode it
    TASK_UNREGISTERED = "task_unregistered"  # no worker has its task
    CHILD_SAGA_COMPENSATED = "child_saga_compensated"  # the child saga it ran rolled back
    CHILD_SAGA_FAILED = "child_saga_failed"  # the child saga it ran failed
    GRACE_PERIOD_ENDED = "grace_period_ended"  # abandoned: still running when grace ran out
    CONDITION_FALSE = "condition_false"  # skipped: its when= condition was false
    # Why a saga failed (`saga_failed`).
    FORWARD_RETRIES_EXHAUSTED_AFTER_PIVOT = "forward_retries_exhausted_after_pivot"
    COMPENSATION_FAILED = "compensation_failed"


# Why an attempt ended with its outcome unknown (its process died mid-run): its lease
# expired, or the worker that ran it saw the process die (a pool process exited, the
# worker restarted). Such an attempt may have applied its effect and does not count
# as a business failure (crash_retries).
CRASH_REASONS = frozenset({FailureReason.LEASE_EXPIRED, FailureReason.WORKER_LOST})


SAGA_TERMINAL = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED})

STEP_IN_FLIGHT = frozenset({StepStatus.DISPATCHED, StepStatus.RUNNING})
COMPENSATION_IN_FLIGHT = frozenset({CompensationStatus.DISPATCHED, CompensationStatus.RUNNING})

SAGA_TRANSITIONS: dict[SagaStatus, frozenset[SagaStatus]] = {
    SagaStatus.PENDING: frozenset({SagaStatus.RUNNING}),
    SagaStatus.RUNNING: frozenset(
        {SagaStatus.COMPLETED, SagaStatus.COMPENSATING, SagaStatus.FAILED}
    ),
    SagaStatus.COMPENSATING: frozenset({SagaStatus.COMPENSATED, SagaStatus.FAILED}),
    # An operator resumes a FAILED saga: its unfinished compensations run again,
    # or (after a pivot) its unfinished forward steps.
    SagaStatus.FAILED: frozenset({SagaStatus.COMPENSATING, SagaStatus.RUNNING}),
    # A completed child saga is compensated as a whole when its parent rolls back.
    SagaStatus.COMPLETED: frozenset({SagaStatus.COMPENSATING}),
    SagaStatus.COMPENSATED: frozenset(),
}

STEP_TRANSITIONS: dict[StepStatus, frozenset[StepStatus]] = {
    # PENDING -> SUCCEEDED: a transform, applied by the engine itself; PENDING -> FAILED:
    # a condition, transform or input mapper of the definition raised.
    StepStatus.PENDING: frozenset(
        {
            StepStatus.DISPATCHED,
            StepStatus.SKIPPED,
            StepStatus.CANCELLED,
            StepStatus.SUCCEEDED,
            StepStatus.FAILED,
        }
    ),
    # DISPATCHED -> FAILED: its message can never be delivered (it cannot be encoded or
    # decoded, or no worker has its task): it fails without running.
    StepStatus.DISPATCHED: frozenset(
        {StepStatus.RUNNING, StepStatus.CANCELLED, StepStatus.DISPATCHED, StepStatus.FAILED}
    ),
    # RUNNING -> DISPATCHED is a failed attempt with attempts left (retry with backoff).
    StepStatus.RUNNING: frozenset({StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.DISPATCHED}),
    # FAILED -> DISPATCHED: a resumed saga past its pivot retries forward.
    StepStatus.FAILED: frozenset({StepStatus.DISPATCHED}),
    StepStatus.SUCCEEDED: frozenset(),
    StepStatus.SKIPPED: frozenset(),
    StepStatus.CANCELLED: frozenset(),
}

COMPENSATION_TRANSITIONS: dict[CompensationStatus | None, frozenset[CompensationStatus | None]] = {
    None: frozenset({CompensationStatus.PENDING, CompensationStatus.DISPATCHED}),
    CompensationStatus.PENDING: frozenset({CompensationStatus.DISPATCHED}),
    # DISPATCHED -> COMPENSATION_FAILED: an undeliverable message, as for steps.
    CompensationStatus.DISPATCHED: frozenset(
        {
            CompensationStatus.RUNNING,
            CompensationStatus.DISPATCHED,
            CompensationStatus.COMPENSATION_FAILED,
        }
    ),
    CompensationStatus.RUNNING: frozenset(
        {
            CompensationStatus.COMPENSATED,
            CompensationStatus.COMPENSATION_FAILED,
            CompensationStatus.DISPATCHED,
        }
    ),
    # -> None: `resume` puts a failed compensation back in line, to run in order again.
    CompensationStatus.COMPENSATION_FAILED: frozenset({CompensationStatus.DISPATCHED, None}),
    CompensationStatus.COMPENSATED: frozenset(),
}
