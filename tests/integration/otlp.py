"""An OTLP/HTTP trace receiver that a test runs, and a traced client beside it.

The receiver decodes each ExportTraceServiceRequest (protobuf) into spans. The client
process is an application that set its own TracerProvider, exporting to the receiver;
its workers export with the real OTLP/HTTP exporter (SAGALINE_TRACING=otlp, OTEL_*)
and may log JSON (`json_records` reads such a log).
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

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
from sagaline.runtime import Runtime

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


@dataclass
class Traced:
    runtime: Runtime
    receiver: Receiver
    env: dict[str, str]
    provider: TracerProvider

    def flush(self) -> None:
        self.provider.force_flush(5000)


@contextlib.contextmanager
def traced_client(receiver: Receiver, redis_url: str) -> Iterator[Traced]:
    """A client runtime that traces, and the environment of workers exporting to `receiver`."""
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
    processor = BatchSpanProcessor(
        OTLPSpanExporter(endpoint=receiver.url), schedule_delay_millis=100
    )
    provider.add_span_processor(processor)
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
        # The next module's receiver is another: this one's exporter stops here.
        processor.shutdown()


def json_records(text: str) -> list[dict[str, Any]]:
    """The JSON lines of a worker's log (Celery's banner, on stdout, is not a record)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def saga_fields(record: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(record[k] for k in ("saga_id", "saga", "step", "attempt", "phase"))
