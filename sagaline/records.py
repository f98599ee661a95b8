"""Plain records that the engine decides on and the stores persist."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .states import CompensationStatus, EventKind, Phase, SagaStatus, StepStatus


@dataclass(slots=True)
class SagaRecord:
    saga_id: str
    name: str
    status: SagaStatus
    input: dict[str, Any]
    fingerprint: str
    created_at: float
    updated_at: float
    idempotency_key: str | None = None
    output: Any = None
    error: str | None = None
    failed_step: str | None = None
    finished_at: float | None = None
    deadline: float | None = None
    # When the sweeper must look at this saga (its deadline, or the end of a grace period).
    due_at: float | None = None
    parent_saga_id: str | None = None
    parent_step: str | None = None
    version: int = 0
    # A hash of the input, kept with an idempotency key: the same key with other
    # input is a conflict, not a replay (None: no key, or a saga from before 0.1).
    input_fingerprint: str | None = None
    # The saga's trace (observability/tracing.py): the W3C traceparent of its root span,
    # then `:` and the span id of that span's parent (the caller's span) if it has one.
    # Kept so that every process, after any crash, puts its spans in the same trace.
    trace_context: str | None = None


@dataclass(frozen=True, slots=True)
class PhaseColumns:
    """Where a step keeps the state of one phase, and the values that fence its claims."""

    status: str  # the status field (and column): `status` or `comp_status`
    attempt: str  # the attempt field (and column): `attempt` or `comp_attempt`
    dispatched: StepStatus | CompensationStatus
    running: StepStatus | CompensationStatus
    started: EventKind  # the kind of the event a claim appends


# The one place that says which fields a phase uses: records, engine and every store
# (their SQL and Lua included) go through it.
PHASE_COLUMNS = {
    Phase.FORWARD: PhaseColumns(
        "status", "attempt", StepStatus.DISPATCHED, StepStatus.RUNNING, EventKind.STEP_STARTED
    ),
    Phase.COMPENSATE: PhaseColumns(
        "comp_status",
        "comp_attempt",
        CompensationStatus.DISPATCHED,
        CompensationStatus.RUNNING,
        EventKind.COMPENSATION_STARTED,
    ),
}


@dataclass(slots=True)
class StepRecord:
    saga_id: str
    name: str
    position: int
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    comp_status: CompensationStatus | None = None
    comp_attempt: int = 0
    output: Any = None
    compensation_data: Any = None
    has_compensation_data: bool = False
    error: str | None = None
    comp_error: str | None = None
    lease_until: float | None = None
    # When the sweeper must look at this step: a DISPATCHED message that may be lost,
    # or a RUNNING lease that may have expired. NULL once the step is settled.
    due_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    # How often the current message was published again by the sweeper (for backoff).
    redispatches: int = 0
    version: int = 0
    # The process that made the latest claim (see Owner); kept after the claim ends.
    owner_node: str | None = None
    owner_boot: str | None = None
    owner_pid: int | None = None
    # The names of the steps this one waits on, as its definition had them when the
    # saga started: the step graph can be drawn without the definition. None: a saga
    # started before this field existed.
    depends_on: list[str] | None = None

    def status_for(self, phase: Phase) -> StepStatus | CompensationStatus | None:
        """The status of the step's run in `phase` (None: never compensated)."""
        status: StepStatus | CompensationStatus | None
        status = getattr(self, PHASE_COLUMNS[phase].status)
        return status

    def attempt_for(self, phase: Phase) -> int:
        attempt: int = getattr(self, PHASE_COLUMNS[phase].attempt)
        return attempt

    def is_dispatched(self, phase: Phase, attempt: int | None = None) -> bool:
        """Whether a message of `phase` is out, waiting to be claimed (by `attempt`, if given)."""
        return self.status_for(phase) is PHASE_COLUMNS[phase].dispatched and (
            attempt is None or self.attempt_for(phase) == attempt
        )

    def is_running(self, phase: Phase, attempt: int) -> bool:
        """Whether `attempt` of `phase` holds the claim: the fence against stale messages."""
        return (
            self.status_for(phase) is PHASE_COLUMNS[phase].running
            and self.attempt_for(phase) == attempt
        )

    @property
    def owner(self) -> Owner | None:
        if self.owner_node is None or self.owner_boot is None or self.owner_pid is None:
            return None
        return Owner(self.owner_node, self.owner_boot, self.owner_pid)

    @property
    def running_phase(self) -> Phase | None:
        """The phase whose claim is RUNNING, if any."""
        for phase, cols in PHASE_COLUMNS.items():
            if getattr(self, cols.status) is cols.running:
                return phase
        return None


@dataclass(frozen=True, slots=True)
class Owner:
    """Who holds a claim: a process of one start (boot) of one Celery worker node.

    The worker's main process learns at once when one of its pool processes dies,
    and a worker restarted under the same node name knows that every claim of an
    earlier boot is dead: both hand such claims back without waiting for the lease.
    """

    node: str  # the Celery node name (`-n`), e.g. celery@host
    boot: str  # random, chosen when the worker's main process starts
    pid: int  # the process that runs the step (a pool child, or the main process)


@dataclass(slots=True)
class Event:
    """One entry of a saga's append-only history."""

    saga_id: str
    # An EventKind; a kind this version does not know (written by a newer one) is
    # read back as a plain str.
    kind: EventKind | str
    ts: float
    step: str | None = None
    attempt: int | None = None
    phase: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    seq: int | None = None


@dataclass(slots=True)
class SagaState:
    """A saga with all its steps, as read under the saga's lock."""

    saga: SagaRecord
    steps: dict[str, StepRecord]


@dataclass(slots=True)
class Dispatch:
    """A Celery message to publish once the decision is committed."""

    saga_id: str
    saga_name: str
    fingerprint: str
    step: str
    phase: Phase
    attempt: int
    task_name: str
    kwargs: dict[str, Any]
    countdown: float = 0.0
    queue: str | None = None
    timeout: float | None = None
    # Set for a child-saga step: the runtime starts (or rolls back) that saga instead.
    child_saga: str | None = None
    # The saga's trace_context, sent in the message header so the worker needs no read.
    trace_context: str | None = None
    # When the step was first dispatched (after its backoff), for a message the sweeper
    # publishes again; None: when it is published (the queue wait starts there).
    ready_at: float | None = None


# The header of a step's Celery message that carries its Dispatch identity (saga,
# fingerprint, step, phase, attempt): written when publishing, read by the worker.
HEADER = "sagaline"


@dataclass(slots=True)
class Decision:
    """What the engine decided: the records to write (compare-and-set) and what to publish."""

    saga: SagaRecord | None = None
    steps: list[StepRecord] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    dispatches: list[Dispatch] = field(default_factory=list)
    # Versions the changed records had when read; a store writes only if they still do.
    saga_version: int = 0
    step_versions: dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.saga is not None or self.steps or self.events)

    def expected_version(self, step: StepRecord) -> int:
        """The version `step` must still have for this decision to be written."""
        return self.step_versions.get(step.name, step.version)


@dataclass(slots=True)
class SagaFilter:
    status: list[SagaStatus] | None = None
    name: str | None = None
    created_after: float | None = None
    created_before: float | None = None
    parent_saga_id: str | None = None
    idempotency_key: str | None = None
    failed_step: str | None = None
    # Keyset pagination: only sagas strictly after this (created_at, saga_id) in the
    # newest-first order, so a page is stable while new sagas are inserted.
    before: tuple[float, str] | None = None
    limit: int = 50
    offset: int = 0
