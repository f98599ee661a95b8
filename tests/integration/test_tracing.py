"""Traces of sagas on real workers, exported over OTLP/HTTP to a receiver the test runs.

The workers export with the real OTLP/HTTP exporter (SAGALINE_TRACING=otlp, OTEL_*);
the test process is an application that set its own TracerProvider, exporting to
the same receiver, which decodes each ExportTraceServiceRequest (protobuf): otlp.py.
JSON logs and what a warm shutdown exports: test_json_logs.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from opentelemetry import trace

from sagaline import SagaCompensated
from tests.harness import WorkerProcess
from tests.integration import traced_app
from tests.integration.otlp import (
    WAIT,
    Receiver,
    Span,
    Traced,
    json_records,
    saga_fields,
    serve_otlp,
    traced_client,
)

APP = "tests.integration.traced_app"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with serve_otlp() as rec:
        yield rec


@pytest.fixture(scope="module")
def traced(receiver: Receiver, redis_url: str) -> Iterator[Traced]:
    with traced_client(receiver, redis_url) as client:
        yield client


def _assert_no_orphans(spans: list[Span]) -> None:
    ids = {s.span_id for s in spans}
    orphans = [s for s in spans if s.parent_id is not None and s.parent_id not in ids]
    assert not orphans, [(s.name, s.parent_id) for s in orphans]
    assert len(ids) == len(spans), "a span id was emitted twice"


def _only(spans: list[Span], name: str) -> Span:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def test_a_compensated_saga_is_one_trace_under_the_request_that_started_it(
    traced: Traced, worker_factory: Callable[..., WorkerProcess]
) -> None:
    worker_factory(APP, env=traced.env, concurrency=2)
    tracer = trace.get_tracer("web")
    with tracer.start_as_current_span("POST /orders") as request_span:
        handle = traced.runtime.start_saga(
            traced_app.compensated, {"order_id": "o-" + uuid.uuid4().hex[:6]}
        )
    with pytest.raises(SagaCompensated):
        handle.get(timeout=WAIT)
    traced.flush()
    request = request_span.get_span_context()
    trace_id = f"{request.trace_id:032x}"
    rx = traced.receiver
    rx.wait_for(lambda: any(s.name == "saga traced_compensated" for s in rx.of_trace(trace_id)))
    rx.wait_for(
        lambda: (
            len(rx.of_trace(trace_id)) >= 8
            and any(s.name == "POST /orders" for s in rx.of_trace(trace_id))
        )
    )
    time.sleep(0.5)  # anything extra (a duplicate) would arrive now
    spans = rx.of_trace(trace_id)
    # Every span of the saga is in the request's trace.
    assert {s.trace_id for s in rx.with_saga(handle.saga_id)} == {trace_id}
    root = _only(spans, "saga traced_compensated")
    assert root.parent_id == f"{request.span_id:016x}"
    assert root.attributes["saga.id"] == handle.saga_id
    assert root.attributes["saga.status"] == "COMPENSATED"
    assert root.attributes["saga.failed_step"] == "ship"
    assert root.status == 2
    assert root.service == "worker"  # emitted by the worker that ended it
    by_name = {s.name: s for s in spans}
    expected = {
        "step reserve",
        "step charge",
        "step ship",
        "compensate charge",
        "compensate reserve",
    }
    assert expected <= set(by_name)
    for name in expected:
        span = _only(spans, name)
        assert span.parent_id == root.span_id, name
        assert span.attributes["saga.id"] == handle.saga_id
        assert span.attributes["saga.name"] == "traced_compensated"
        assert span.attributes["saga.attempt"] == 1
        assert span.start >= root.start and span.end <= root.end, name
    assert by_name["step ship"].status == 2
    assert "exception" in by_name["step ship"].events
    assert by_name["step ship"].attributes["saga.phase"] == "forward"
    assert by_name["compensate charge"].attributes["saga.phase"] == "compensate"
    assert by_name["compensate charge"].attributes["saga.step"] == "charge"
    # The user's span inside a step nests under that step's span.
    assert _only(spans, "reserve stock").parent_id == by_name["step reserve"].span_id
    _assert_no_orphans(spans)  # the request span is exported by this process


def test_a_saga_started_outside_any_span_gets_a_trace_of_its_own(
    traced: Traced, worker_factory: Callable[..., WorkerProcess]
) -> None:
    worker_factory(APP, env=traced.env, concurrency=1)
    handle = traced.runtime.start_saga(traced_app.compensated, {"order_id": "o-lone"})
    with pytest.raises(SagaCompensated):
        handle.get(timeout=WAIT)
    rx = traced.receiver
    root = rx.root_of(handle.saga_id, "traced_compensated")
    assert root.parent_id is None
    rx.wait_for(lambda: len(rx.of_trace(root.trace_id)) >= 7)
    spans = rx.of_trace(root.trace_id)
    assert {s.trace_id for s in rx.with_saga(handle.saga_id)} == {root.trace_id}
    _assert_no_orphans(spans)


def test_a_step_killed_with_its_worker_leaves_no_orphan_span(
    traced: Traced, worker_factory: Callable[..., WorkerProcess]
) -> None:
    env = {**traced.env, "SLOW_FIRST_ATTEMPT": "120"}
    first = worker_factory(APP, env=env, concurrency=1, name="tracekill")
    handle = traced.runtime.start_saga(traced_app.survives_kill, {"order_id": "o-kill"})
    rx = traced.receiver
    # Attempt 1 of `slow` is running: its user span ended and was exported; the step's
    # own span is still open in the process about to be killed.
    rx.wait_for(
        lambda: (
            any(s.name == "slow work begins" for s in rx.with_saga(handle.saga_id))
            or any(s.name == "slow work begins" for s in rx.spans)
        )
    )
    first.kill()
    # Restarted under the same node name, the worker hands the dead claim back at once.
    second = worker_factory(
        APP,
        env={**env, "SLOW_FIRST_ATTEMPT": "0", "SAGALINE_LOG_FORMAT": "json"},
        concurrency=1,
        name="tracekill",
    )
    assert handle.get(timeout=WAIT)["slow"] == 2
    root = rx.root_of(handle.saga_id, "traced_survives_kill")
    rx.wait_for(lambda: len(rx.of_trace(root.trace_id)) >= 7)
    time.sleep(0.5)
    spans = rx.of_trace(root.trace_id)
    _assert_no_orphans(spans)
    assert {s.trace_id for s in rx.with_saga(handle.saga_id)} == {root.trace_id}
    slow_spans = sorted(
        (s for s in spans if s.name == "step slow"), key=lambda s: s.attributes["saga.attempt"]
    )
    assert [s.attributes["saga.attempt"] for s in slow_spans] == [1, 2]
    lost, retried = slow_spans
    # The killed attempt was emitted by the worker that handed it back, as an error.
    assert lost.attributes["saga.outcome"] == "lost"
    assert lost.status == 2
    assert retried.attributes["saga.outcome"] == "succeeded"
    begins = sorted((s for s in spans if s.name == "slow work begins"), key=lambda s: s.start)
    assert [s.parent_id for s in begins] == [lost.span_id, retried.span_id]
    assert {s.parent_id for s in spans if s.name.startswith("step ")} == {root.span_id}
    # The hand-back's warning, logged by the sweeper's thread, names the attempt (JSON log).
    handed_back = [r for r in json_records(second.log_text()) if "running it again" in r["message"]]
    assert [saga_fields(r) for r in handed_back] == [
        (handle.saga_id, "traced_survives_kill", "slow", 1, "forward")
    ]


def test_celery_instrumentation_spans_join_the_saga_trace_without_duplicates(
    traced: Traced, worker_factory: Callable[..., WorkerProcess]
) -> None:
    worker_factory(APP, env={**traced.env, "TRACED_APP_CELERY_INSTRUMENTATION": "1"}, concurrency=2)
    handle = traced.runtime.start_saga(traced_app.compensated, {"order_id": "o-celery"})
    with pytest.raises(SagaCompensated):
        handle.get(timeout=WAIT)
    rx = traced.receiver
    root = rx.root_of(handle.saga_id, "traced_compensated")
    # 5 attempts: each a sagaline span, and a Celery run/ span (the client process is
    # not instrumented: the first publish has no apply_async/ span, the others do).
    rx.wait_for(
        lambda: (
            sum(s.name.startswith("run/") for s in rx.of_trace(root.trace_id)) >= 5
            and sum(s.name.startswith("apply_async/") for s in rx.of_trace(root.trace_id)) >= 4
        )
    )
    time.sleep(0.5)
    spans = rx.of_trace(root.trace_id)
    _assert_no_orphans(spans)
    runs = [s for s in spans if s.name.startswith("run/")]
    publishes = [s for s in spans if s.name.startswith("apply_async/")]
    attempts = [s for s in spans if s.name.startswith(("step ", "compensate "))]
    assert len(runs) == 5 and len(attempts) == 5 and len(publishes) == 4
    # All children of the root: none depends on a span of another process but the root.
    for span in runs + publishes + attempts:
        assert span.parent_id == root.span_id, span.name
    assert sorted(s.name for s in runs) == sorted(
        f"run/traced.{t}" for t in ("reserve", "charge", "ship", "refund", "release")
    )


def test_a_child_saga_is_in_its_parent_trace_under_the_parent_root(
    traced: Traced, worker_factory: Callable[..., WorkerProcess]
) -> None:
    worker_factory(APP, env=traced.env, concurrency=2)
    handle = traced.runtime.start_saga(traced_app.parent, {"order_id": "o-child"})
    assert handle.get(timeout=WAIT)["finished"] is True
    rx = traced.receiver
    parent_root = rx.root_of(handle.saga_id, "traced_parent")
    rx.wait_for(
        lambda: any(s.name == "saga traced_child" for s in rx.of_trace(parent_root.trace_id))
    )
    spans = rx.of_trace(parent_root.trace_id)
    child_root = _only(spans, "saga traced_child")
    assert child_root.parent_id == parent_root.span_id
    assert child_root.attributes["saga.parent_id"] == handle.saga_id
    assert _only(spans, "step finish").parent_id == child_root.span_id
    assert _only(spans, "step charge").parent_id == parent_root.span_id
    _assert_no_orphans(spans)
