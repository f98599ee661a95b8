"""Saga and step statuses as data: enums, the transition tables and terminal sets."""

from __future__ import annotations

from enum import Enum


class SagaStatus(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value


class StepStatus(str, Enum):
    """Forward status of a step."""

    PENDING = "PENDING"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    CANCELLED = "CANCELLED"

    def __str__(self) -> str:
        return self.value


class CompensationStatus(str, Enum):
    """Status of the compensation of a step that was applied."""

    PENDING = "PENDING"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    COMPENSATED = "COMPENSATED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"

    def __str__(self) -> str:
        return self.value


class Phase(str, Enum):
    """Which body a step message runs: the step itself or its compensation."""

    FORWARD = "forward"
    COMPENSATE = "compensate"

    def __str__(self) -> str:
        return self.value


class FailureStrategy(str, Enum):
    """What a failure does to parallel branches still in flight."""

    FAIL_FAST = "FAIL_FAST"
    WAIT_ALL = "WAIT_ALL"
    FAIL_FAST_WITH_GRACE = "FAIL_FAST_WITH_GRACE"

    def __str__(self) -> str:
        return self.value


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
        {StepStatus.DISPATCHED, StepStatus.SKIPPED, StepStatus.CANCELLED, StepStatus.SUCCEEDED,
         StepStatus.FAILED}
    ),
    # DISPATCHED -> FAILED: its message can never be delivered (it cannot be encoded or
    # decoded, or no worker has its task): it fails without running.
    StepStatus.DISPATCHED: frozenset(
        {StepStatus.RUNNING, StepStatus.CANCELLED, StepStatus.DISPATCHED, StepStatus.FAILED}
    ),
    # RUNNING -> DISPATCHED is a failed attempt with attempts left (retry with backoff).
    StepStatus.RUNNING: frozenset(
        {StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.DISPATCHED}
    ),
    # FAILED -> DISPATCHED: a resumed saga past its pivot retries forward.
    StepStatus.FAILED: frozenset({StepStatus.DISPATCHED}),
    StepStatus.SUCCEEDED: frozenset(),
    StepStatus.SKIPPED: frozenset(),
    StepStatus.CANCELLED: frozenset(),
}

COMPENSATION_TRANSITIONS: dict[CompensationStatus | None,
                               frozenset[CompensationStatus | None]] = {
    None: frozenset({CompensationStatus.PENDING, CompensationStatus.DISPATCHED}),
    CompensationStatus.PENDING: frozenset({CompensationStatus.DISPATCHED}),
    # DISPATCHED -> COMPENSATION_FAILED: an undeliverable message, as for steps.
    CompensationStatus.DISPATCHED: frozenset(
        {CompensationStatus.RUNNING, CompensationStatus.DISPATCHED,
         CompensationStatus.COMPENSATION_FAILED}
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
