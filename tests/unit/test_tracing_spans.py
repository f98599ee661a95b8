"""The spans sagaline makes from committed decisions, through a provider of the test's own
(the SDK's in-memory exporter): root span ids and times, lost attempts, one root per saga."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sagaline.observability.tracing import SagaTrace, Tracing, attempt_span_id
from sagaline.records import Decision, Event, SagaRecord, SagaState, StepRecord
from sagaline.states import Phase, SagaStatus
from sagaline.stores.memory import MemoryStore

T0 = 1_800_000_000.0


@pytest.fixture
def spans() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Tracing(provider), exporter
    provider.shutdown()


def _saga(tracing: Tracing, store: MemoryStore, status: SagaStatus, ends: list[str]) -> SagaRecord:
    sid = str(uuid.uuid4())
    saga = SagaRecord(
        sid,
        "order",
        status,
        {},
        "fp",
        created_at=T0,
        updated_at=T0 + 5,
        finished_at=T0 + 5,
        trace_context=tracing.new_saga("order", sid),
    )
    store.create_saga(
        SagaState(saga, {}),
        [Event(sid, "saga_started", T0), *(Event(sid, kind, T0 + 5) for kind in ends)],
    )
    return saga


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_the_root_span_has_the_stored_ids_and_the_saga_start_time(
    spans: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = spans
    store = MemoryStore()
    saga = _saga(tracing, store, SagaStatus.COMPLETED, ["saga_completed"])
    tracing.after_commit(
        Decision(saga=saga, events=[Event(saga.saga_id, "saga_completed", T0 + 5)]), store
    )
    [root] = _named(exporter, "saga order")
    stored = SagaTrace.decode(saga.trace_context)
    assert stored is not None and stored.parent_span_id is None
    assert (root.context.trace_id, root.context.span_id) == (stored.trace_id, stored.span_id)
    assert root.parent is None
    assert (root.start_time, root.end_time) == (int(T0 * 1e9), int((T0 + 5) * 1e9))
    assert root.status.status_code is trace.StatusCode.OK
    assert root.attributes is not None and root.attributes["saga.id"] == saga.saga_id


def test_a_saga_that_ends_again_after_a_resume_keeps_its_one_root_span(
    spans: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = spans
    store = MemoryStore()
    saga = _saga(tracing, store, SagaStatus.FAILED, ["saga_failed"])
    tracing.after_commit(
        Decision(saga=saga, events=[Event(saga.saga_id, "saga_failed", T0 + 5)]), store
    )
    # An operator resumed it; it is compensated this time.
    again = Event(saga.saga_id, "saga_compensated", T0 + 9)
    store.append_event(again)
    tracing.after_commit(
        Decision(
            saga=replace(saga, status=SagaStatus.COMPENSATED, finished_at=T0 + 9), events=[again]
        ),
        store,
    )
    [root] = _named(exporter, "saga order")
    assert root.status.status_code is trace.StatusCode.ERROR
    assert root.attributes is not None and root.attributes["saga.status"] == "FAILED"


def test_an_attempt_lost_with_its_worker_is_emitted_with_its_own_span_id(
    spans: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = spans
    store = MemoryStore()
    saga = _saga(tracing, store, SagaStatus.RUNNING, [])
    lost = Event(
        saga.saga_id,
        "step_attempt_failed",
        T0 + 3,
        "charge",
        1,
        "forward",
        {"reason": "lease_expired", "error": "LeaseExpired: the worker died\nmore"},
    )
    failed = Event(
        saga.saga_id,
        "step_attempt_failed",
        T0 + 4,
        "ship",
        1,
        "forward",
        {"reason": "error", "error": "ValueError"},
    )
    step = StepRecord(saga.saga_id, "charge", 0, started_at=T0 + 1)
    # The decision does not change the saga: its trace context is read from the store.
    tracing.after_commit(Decision(steps=[step], events=[lost, failed]), store)
    [span] = exporter.get_finished_spans()  # a business failure had its span already
    stored = SagaTrace.decode(saga.trace_context)
    assert stored is not None
    assert span.name == "step charge"
    assert span.context.span_id == attempt_span_id(stored, saga.saga_id, "charge", Phase.FORWARD, 1)
    assert span.parent is not None and span.parent.span_id == stored.span_id
    assert (span.start_time, span.end_time) == (int((T0 + 1) * 1e9), int((T0 + 3) * 1e9))
    assert span.status.status_code is trace.StatusCode.ERROR
    assert span.status.description == "LeaseExpired: the worker died"
    assert span.attributes is not None and span.attributes["saga.outcome"] == "lost"


def test_the_root_span_of_a_saga_ended_by_an_attempt_closes_after_that_attempt(
    spans: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = spans
    store = MemoryStore()
    saga = _saga(tracing, store, SagaStatus.COMPENSATED, ["saga_compensated"])
    meta = {
        "saga_id": saga.saga_id,
        "saga": "order",
        "step": "refund",
        "phase": "compensate",
        "attempt": 2,
        "trace": saga.trace_context,
    }
    with pytest.raises(ValueError), tracing.attempt(meta, task=None):
        current = trace.get_current_span().get_span_context()
        tracing.saga_finished(replace(saga, finished_at=None))
        assert _named(exporter, "saga order") == []  # waits for the attempt's span
        raise ValueError("refund refused")
    [attempt] = _named(exporter, "compensate refund")
    [root] = _named(exporter, "saga order")
    stored = SagaTrace.decode(saga.trace_context)
    assert stored is not None
    assert (
        current.span_id
        == attempt.context.span_id
        == attempt_span_id(stored, saga.saga_id, "refund", Phase.COMPENSATE, 2)
    )
    assert attempt.status.status_code is trace.StatusCode.ERROR
    assert [e.name for e in attempt.events] == ["exception"]
    assert attempt.end_time is not None and root.end_time is not None
    assert root.end_time >= attempt.end_time


def test_a_saga_started_inside_a_span_continues_its_trace(
    spans: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, _ = spans
    request_tracer = TracerProvider().get_tracer("web")
    with request_tracer.start_as_current_span("POST /orders") as request:
        text = tracing.new_saga("order", "s-1")
    stored = SagaTrace.decode(text)
    assert stored is not None
    assert stored.trace_id == request.get_span_context().trace_id
    assert stored.parent_span_id == request.get_span_context().span_id
    assert stored.span_id != request.get_span_context().span_id
    assert stored.flags & trace.TraceFlags.SAMPLED
