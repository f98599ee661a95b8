"""Traces of sagas on real workers, exported over OTLP/HTTP to a receiver the test runs.

The workers export with the real OTLP/HTTP exporter (SAGALINE_TRACING=otlp, OTEL_*);
the test process is an application that set its own TracerProvider, exporting to
the same receiver, which decodes each ExportTraceServiceRequest (protobuf).
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import sagaline
from sagaline import SagaCompensated
from sagaline.observability.logs import FIELDS
from sagaline.runtime import Runtime
from tests.harness import WorkerProcess
from tests.integration import traced_app

APP = "tests.integration.traced_app"
WAIT = 60.0


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    service: str
    attributes: dict[str, Any]
    status: int  # 0 unset, 1 ok, 2 error
    kind: int
    events: list[str]
    start: int
    end: int


@dataclass
class Receiver:
    """An OTLP/HTTP trace receiver: every span of every request it was sent."""

    url: str = ""
    spans: list[Span] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for rs in request.resource_spans:
            service = next(
                (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"),
                "",
            )
            for ss in rs.scope_spans:
                for s in ss.spans:
                    found.append(
                        Span(
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex() or None,
                            s.name,
                            service,
                            {a.key: _value(a.value) for a in s.attributes},
                            s.status.code,
                            s.kind,
                            [e.name for e in s.events],
                            s.start_time_unix_nano,
                            s.end_time_unix_nano,
                        )
                    )
        with self.lock:
            self.spans.extend(found)

    def of_trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def with_saga(self, saga_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.attributes.get("saga.id") == saga_id]

    def root_of(self, saga_id: str, name: str) -> Span:
        """The root span of saga `saga_id` (named `saga <name>`), once it has arrived."""
        self.wait_for(lambda: any(s.name == f"saga {name}" for s in self.with_saga(saga_id)))
        found = [s for s in self.with_saga(saga_id) if s.name == f"saga {name}"]
        assert len(found) == 1, "the root span was emitted more than once"
        return found[0]

    def wait_for(self, what: Callable[[], bool], timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if what():
                return
            time.sleep(0.1)
        raise AssertionError(
            "the spans expected never arrived; received:\n"
            + "\n".join(f"{s.name} {s.span_id} <- {s.parent_id} {s.attributes}" for s in self.spans)
        )


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@contextlib.contextmanager
def serve_otlp() -> Iterator[Receiver]:
    """An OTLP/HTTP trace receiver on a free port of 127.0.0.1, for the block's duration."""
    rec = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            rec.add(ExportTraceServiceRequest.FromString(body))
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with serve_otlp() as rec:
        yield rec


@dataclass
class Traced:
    runtime: Runtime
    receiver: Receiver
    env: dict[str, str]
    provider: TracerProvider

    def flush(self) -> None:
        self.provider.force_flush(5000)


@pytest.fixture(scope="module")
def traced(receiver: Receiver, redis_url: str) -> Iterator[Traced]:
    base = redis_url.rsplit("/", 1)[0]
    broker, store = f"{base}/11", f"{base}/12"
    for url in (broker, store):
        redis.Redis.from_url(url).flushdb()
    # The test process is an application with a TracerProvider of its own: sagaline's
    # client spans go there (set once per process, so once per module run).
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        provider = current
    else:
        provider = TracerProvider(resource=Resource.create({"service.name": "client"}))
        trace.set_tracer_provider(provider)
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=receiver.url), schedule_delay_millis=100)
    )
    client = Celery("traced-client", broker=broker)
    runtime = sagaline.init_app(client, store=store, sweeper=False, tracing=True)
    env = {
        "CELERY_BROKER_URL": broker,
        "SAGALINE_STORE_URL": store,
        "SAGALINE_TRACING": "otlp",
        "SAGALINE_SWEEP_INTERVAL": "1",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "worker",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    try:
        yield Traced(runtime, receiver, env, provider)
    finally:
        runtime.store.close()


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
    worker_factory(APP, env={**env, "SLOW_FIRST_ATTEMPT": "0"}, concurrency=1, name="tracekill")
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


# -- JSON logs --------------------------------------------------------------------------


def test_json_logs_carry_the_saga_step_and_trace_of_a_user_record_inside_a_step(
    traced: Traced, worker_factory: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    logfile = tmp_path / "worker-json.log"
    worker = worker_factory(
        APP,
        env={**traced.env, "SAGALINE_LOG_FORMAT": "json"},
        concurrency=2,
        extra_args=["--logfile", str(logfile)],
    )
    order = "o-json-" + uuid.uuid4().hex[:6]
    handle = traced.runtime.start_saga(traced_app.compensated, {"order_id": order})
    with pytest.raises(SagaCompensated):
        handle.get(timeout=WAIT)
    rx = traced.receiver
    root = rx.root_of(handle.saga_id, "traced_compensated")
    rx.wait_for(lambda: any(s.name == "reserve stock" for s in rx.of_trace(root.trace_id)))
    worker.stop()  # every process has written its last line
    lines = logfile.read_text().splitlines()
    assert len(lines) > 5
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for r in records:
        assert set(FIELDS) <= set(r), r
    mine = [r for r in records if r["message"] == f"reserving stock for {order}"]
    assert len(mine) == 1, [r["message"] for r in records]
    line = mine[0]
    assert (line["logger"], line["level"]) == ("shop.steps", "INFO")
    assert (line["saga_id"], line["saga"], line["step"], line["attempt"], line["phase"]) == (
        handle.saga_id,
        "traced_compensated",
        "reserve",
        1,
        "forward",
    )
    # Logged inside the user's span "reserve stock", in the saga's trace.
    user_span = _only(rx.of_trace(root.trace_id), "reserve stock")
    assert (line["trace_id"], line["span_id"]) == (user_span.trace_id, user_span.span_id)
    # A compensation's record carries its phase; Celery's own records are JSON too.
    refund = [r for r in records if r["message"].startswith("refunding")]
    assert [(r["step"], r["phase"]) for r in refund] == [("charge", "compensate")]
    assert any(r["logger"].startswith("celery") for r in records)
    outside = [r for r in records if r["logger"].startswith("celery.worker")]
    assert outside and all(r["saga_id"] is None for r in outside)
