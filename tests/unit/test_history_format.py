"""The history is a persisted format: event kinds and failure reasons keep their stored values.

Rows written before the kinds and reasons became enums hold plain strings; they
must still read back, render in the timeline and print as plain JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sagaline import ops
from sagaline.cli import _json
from sagaline.records import Event, SagaRecord, StepRecord
from sagaline.states import EventKind, FailureReason, SagaStatus, StepStatus
from sagaline.stores import schema
from sagaline.stores.redis_layout import event_json, event_record
from sagaline.stores.rows import from_row
from sagaline.stores.sql import SQLStore
from sagaline.timeline import describe, render_timeline

# Written out by hand, as stored before the enums: never edit a value here.
STORED_KINDS = [
    (EventKind.SAGA_STARTED, "saga_started"),
    (EventKind.SAGA_COMPLETED, "saga_completed"),
    (EventKind.SAGA_COMPENSATING, "saga_compensating"),
    (EventKind.SAGA_COMPENSATED, "saga_compensated"),
    (EventKind.SAGA_FAILED, "saga_failed"),
    (EventKind.SAGA_DEADLINE_EXCEEDED, "saga_deadline_exceeded"),
    (EventKind.SAGA_RESUMED, "saga_resumed"),
    (EventKind.PIVOT_PASSED, "pivot_passed"),
    (EventKind.STEP_DISPATCHED, "step_dispatched"),
    (EventKind.STEP_REDISPATCHED, "step_redispatched"),
    (EventKind.STEP_STARTED, "step_started"),
    (EventKind.STEP_SUCCEEDED, "step_succeeded"),
    (EventKind.STEP_ATTEMPT_FAILED, "step_attempt_failed"),
    (EventKind.STEP_FAILED, "step_failed"),
    (EventKind.STEP_ABANDONED, "step_abandoned"),
    (EventKind.STEP_SKIPPED, "step_skipped"),
    (EventKind.STEP_CANCELLED, "step_cancelled"),
    (EventKind.TRANSFORM_APPLIED, "transform_applied"),
    (EventKind.COMPENSATION_DISPATCHED, "compensation_dispatched"),
    (EventKind.COMPENSATION_REDISPATCHED, "compensation_redispatched"),
    (EventKind.COMPENSATION_STARTED, "compensation_started"),
    (EventKind.COMPENSATION_SUCCEEDED, "compensation_succeeded"),
    (EventKind.COMPENSATION_ATTEMPT_FAILED, "compensation_attempt_failed"),
    (EventKind.COMPENSATION_FAILED, "compensation_failed"),
    (EventKind.DEFINITION_MISMATCH, "definition_mismatch"),
    (EventKind.TASK_UNREGISTERED, "task_unregistered"),
    (EventKind.OPERATOR_ACTION, "operator_action"),
]
STORED_REASONS = [
    (FailureReason.ERROR, "error"),
    (FailureReason.TIMEOUT, "timeout"),
    (FailureReason.LEASE_EXPIRED, "lease_expired"),
    (FailureReason.WORKER_LOST, "worker_lost"),
    (FailureReason.PAYLOAD_REFUSED, "payload_refused"),
    (FailureReason.DEFINITION_CALLABLE_FAILED, "definition_callable_failed"),
    (FailureReason.MESSAGE_UNSENDABLE, "message_unsendable"),
    (FailureReason.MESSAGE_UNDELIVERABLE, "message_undeliverable"),
    (FailureReason.TASK_UNREGISTERED, "task_unregistered"),
    (FailureReason.CHILD_SAGA_COMPENSATED, "child_saga_compensated"),
    (FailureReason.CHILD_SAGA_FAILED, "child_saga_failed"),
    (FailureReason.GRACE_PERIOD_ENDED, "grace_period_ended"),
    (FailureReason.CONDITION_FALSE, "condition_false"),
    (FailureReason.FORWARD_RETRIES_EXHAUSTED_AFTER_PIVOT, "forward_retries_exhausted_after_pivot"),
    (FailureReason.COMPENSATION_FAILED, "compensation_failed"),
]


@pytest.mark.parametrize(("member", "stored"), STORED_KINDS + STORED_REASONS, ids=lambda v: str(v))
def test_each_kind_and_reason_has_the_value_stored_before(member: Any, stored: str) -> None:
    assert member.value == stored
    assert member == stored and str(member) == stored and f"{member}" == stored
    assert json.dumps(member) == json.dumps(stored)


def test_every_kind_and_reason_is_listed_with_its_stored_value() -> None:
    assert {m for m, _ in STORED_KINDS} == set(EventKind)
    assert {m for m, _ in STORED_REASONS} == set(FailureReason)


def _old_history() -> list[dict[str, Any]]:
    """History rows as an earlier sagaline wrote them: kinds and reasons plain strings."""
    return [
        {"kind": "saga_started", "ts": 1.0, "detail": {"name": "old"}},
        {
            "kind": "step_started",
            "ts": 2.0,
            "step": "a",
            "attempt": 1,
            "phase": "forward",
            "detail": {},
        },
        {
            "kind": "step_attempt_failed",
            "ts": 3.0,
            "step": "a",
            "attempt": 1,
            "phase": "forward",
            "detail": {"reason": "lease_expired", "error": "E: x", "retry_in": 1.0},
        },
        {
            "kind": "saga_failed",
            "ts": 4.0,
            "detail": {"reason": "compensation_failed", "error": "E: x"},
        },
        # A kind this version does not know (a newer sagaline wrote it): kept as text.
        {"kind": "some_future_kind", "ts": 5.0, "detail": {}},
    ]


def test_plain_string_rows_read_back_as_enums_and_unknown_kinds_as_text() -> None:
    events = [
        from_row(Event, {**row, "saga_id": "s", "seq": i})
        for i, row in enumerate(_old_history(), 1)
    ]
    assert [e.kind for e in events[:4]] == [
        EventKind.SAGA_STARTED,
        EventKind.STEP_STARTED,
        EventKind.STEP_ATTEMPT_FAILED,
        EventKind.SAGA_FAILED,
    ]
    assert all(isinstance(e.kind, EventKind) for e in events[:4])
    assert events[4].kind == "some_future_kind" and not isinstance(events[4].kind, EventKind)
    assert events[2].detail["reason"] == FailureReason.LEASE_EXPIRED


def test_a_redis_history_entry_written_before_reads_back() -> None:
    raw = json.dumps(_old_history()[2])
    event = event_record("s", 3, raw)
    assert event.kind is EventKind.STEP_ATTEMPT_FAILED and event.seq == 3
    assert json.loads(event_json(event)) == _old_history()[2]


def _view() -> ops.SagaView:
    saga = SagaRecord("s", "old", SagaStatus.FAILED, {}, "fp", 1.0, 4.0, error="E: x")
    step = StepRecord("s", "a", 0, status=StepStatus.FAILED, attempt=1)
    history = [
        from_row(Event, {**row, "saga_id": "s", "seq": i})
        for i, row in enumerate(_old_history(), 1)
    ]
    return ops.SagaView(saga, [step], history)


def test_old_rows_render_in_the_timeline_and_the_attempts() -> None:
    view = _view()
    texts = [describe(e)[1] for e in view.history]
    assert texts == [
        "saga started",
        "attempt 1 started",
        "attempt 1 failed: E: x; retry in 1s",
        "saga FAILED: compensation_failed",
        "some future kind",
    ]
    assert render_timeline(view).row_count == 5
    [attempt] = ops.step_attempts(view.history)
    assert (attempt.step, attempt.outcome, attempt.error) == ("a", "failed", "E: x")


def test_json_output_prints_kinds_and_reasons_as_plain_strings() -> None:
    view = _view()
    # Events decided by this version carry enums, in the kind and in the detail.
    view.history.append(
        Event(
            "s",
            EventKind.STEP_FAILED,
            6.0,
            "a",
            1,
            "forward",
            {"reason": FailureReason.WORKER_LOST},
        )
    )
    doc = json.loads(_json(ops.view_as_dict(view)))
    kinds = [e["kind"] for e in doc["history"]]
    assert kinds == [
        "saga_started",
        "step_started",
        "step_attempt_failed",
        "saga_failed",
        "some_future_kind",
        "step_failed",
    ]
    assert doc["history"][-1]["detail"] == {"reason": "worker_lost"}
    assert all(type(k) is str for k in kinds)


def test_sql_rows_written_before_read_back(tmp_path: Path) -> None:
    store = SQLStore(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        store.migrate()
        with store.engine.begin() as conn:
            for row in _old_history():
                conn.execute(sa.insert(schema.events).values(saga_id="s", **row))
        history = store.history("s")
    finally:
        store.close()
    assert [e.kind for e in history] == [
        EventKind.SAGA_STARTED,
        EventKind.STEP_STARTED,
        EventKind.STEP_ATTEMPT_FAILED,
        EventKind.SAGA_FAILED,
        "some_future_kind",
    ]
    assert history[2].detail["reason"] == "lease_expired"
    assert [describe(e)[1] for e in history][-1] == "some future kind"
