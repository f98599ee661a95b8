"""The API's documented shapes (OpenAPI): the JSON that `ops` builds, as pydantic models.

Routes return `ops`' dictionaries as they are, so that the API, `sagaline ls --json`
and `sagaline show --json` say the same thing; these models document them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, StrictBool, StrictStr

from ..states import CompensationStatus, SagaStatus, StepStatus


class Saga(BaseModel):
    saga_id: str
    name: str
    status: SagaStatus
    input: dict[str, Any]
    fingerprint: str
    created_at: float
    updated_at: float
    idempotency_key: str | None
    output: Any
    error: str | None = Field(description="The cause, with its traceback when one was raised")
    failed_step: str | None
    finished_at: float | None
    deadline: float | None
    due_at: float | None
    parent_saga_id: str | None
    parent_step: str | None
    version: int
    input_fingerprint: str | None
    trace_context: str | None = Field(
        description="The saga's root span (W3C traceparent) when tracing is on"
    )


class SagaSummary(Saga):
    summary: str | None = Field(description="One line: why the saga did not complete")
    compensation_failures: dict[str, str]


class SagaPage(BaseModel):
    sagas: list[SagaSummary]
    next_page_token: str | None = Field(
        description="Pass as page_token for the next (older) page; null on the last page"
    )


class Step(BaseModel):
    saga_id: str
    name: str
    position: int
    status: StepStatus
    attempt: int
    comp_status: CompensationStatus | None
    comp_attempt: int
    output: Any
    compensation_data: Any
    has_compensation_data: bool
    error: str | None
    comp_error: str | None
    lease_until: float | None
    due_at: float | None
    started_at: float | None
    finished_at: float | None
    redispatches: int
    version: int
    owner_node: str | None
    owner_boot: str | None
    owner_pid: int | None
    depends_on: list[str] | None = Field(
        description="The steps this one waits on (null: a saga from before this was kept)"
    )


class Attempt(BaseModel):
    step: str
    phase: str
    attempt: int
    started_at: float | None
    finished_at: float | None
    outcome: str
    error: str | None
    duration: float | None


class Event(BaseModel):
    saga_id: str
    kind: str
    ts: float
    step: str | None
    attempt: int | None
    phase: str | None
    detail: dict[str, Any]
    seq: int | None


class SagaDetail(BaseModel):
    saga: Saga
    summary: str | None
    compensation_failures: dict[str, str]
    steps: list[Step]
    attempts: list[Attempt]
    history: list[Event]
    children: list[Saga]


class EventPage(BaseModel):
    events: list[Event]
    next_after_seq: int = Field(description="Pass as after_seq to read the events after these")
    next_before_seq: int | None = Field(
        None,
        description="With before_seq: pass as before_seq to read the events before these "
        "(null: there are none)",
    )


class StatusCounts(BaseModel):
    counts: dict[str, int]


class CancelRequest(BaseModel):
    reason: StrictStr = Field("cancelled by operator", max_length=2000)


class BulkCancelRequest(BaseModel):
    status: list[SagaStatus] | None = None
    name: StrictStr | None = None
    since: float | None = Field(None, strict=True, description="Created at or after (Unix time)")
    until: float | None = Field(None, strict=True, description="Created before (Unix time)")
    idempotency_key: StrictStr | None = None
    failed_step: StrictStr | None = None
    parent: StrictStr | None = None
    dry_run: StrictBool = Field(False, description="Only count the sagas it would cancel")
    reason: StrictStr = Field("cancelled by operator", max_length=2000)


class BulkCancelResult(BaseModel):
    matched: int = Field(description="RUNNING sagas matching the filter")
    cancelled: int
    saga_ids: list[str]
    dry_run: bool


class Health(BaseModel):
    status: str


class Problem(BaseModel):
    """An error, as RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
