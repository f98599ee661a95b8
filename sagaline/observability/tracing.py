"""OpenTelemetry traces: one trace per saga, whose spans survive any crash of a process.

A saga outlives the processes that run it, so its root span cannot be an object
held open from `run()` to the end: like DBOS and Temporal, sagaline decides the
root span's ids when the saga starts and stores them with it (`trace_context`:
the root's W3C traceparent, and the id of its parent, the caller's span). Then:

- each step attempt and compensation attempt is a span whose parent is the root,
  opened in the worker around the claim, the body and the completion; its span id
  is derived from (saga, step, phase, attempt), so the sweeper can emit, with
  status ERROR, an attempt whose worker died (user spans exported from it before
  the crash keep their parent) and a duplicate message never makes a second one;
- the root span is emitted once, by the process that makes the saga terminal, with
  the saga's start time and the stored ids.

So a step that runs after a kill -9 or a restart joins the same trace. The crash
window that remains is the SDK's: spans a process had ended but not yet exported
(the batch delay) when it was killed are lost. The spans of other processes never
refer to an attempt span (all refer to the root); the root itself is lost if the
process that ended the saga is killed within that delay.

With `opentelemetry-instrumentation-celery`: sagaline publishes a step's message
with the saga's root span as the current span, so the instrumentation's
`apply_async/<task>` span is a child of the root; the message carries the root as
its `traceparent` (set again after the instrumentation wrote its publish span
there), so its `run/<task>` span is a child of the root too, never of a publish
span that a killed publisher may not have exported. sagaline's attempt span is a
child of the root and the current span while the step runs, so spans made in the
step nest under it. The Celery spans describe the message, sagaline's the attempt:
one each, none orphaned.
"""

from __future__ import annotations

import contextlib
import logging
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from celery.exceptions import Ignore
from celery.signals import before_task_publish

from ..exceptions import ConfigurationError
from ..records import HEADER
from ..states import CRASH_REASONS, SAGA_TERMINAL, Phase, SagaStatus

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.sdk.trace import Tracer as SdkTracer
except ImportError as exc:  # pragma: no cover - exercised by the wheel install test
    raise ConfigurationError(
        f"tracing needs OpenTelemetry ({exc.name or exc} is not installed): "
        f"pip install 'sagaline[otel]'"
    ) from None

# After the check above: this module imports OpenTelemetry too.
from .trace_context import SAGA_ATTEMPT as SAGA_ATTEMPT
from .trace_context import SAGA_ID as SAGA_ID
from .trace_context import SAGA_NAME as SAGA_NAME
from .trace_context import SAGA_OUTCOME as SAGA_OUTCOME
from .trace_context import SAGA_PHASE as SAGA_PHASE
from .trace_context import SAGA_STATUS as SAGA_STATUS
from .trace_context import SAGA_STEP as SAGA_STEP
from .trace_context import PresetIds, attempt_attributes
from .trace_context import SagaTrace as SagaTrace
from .trace_context import attempt_span_id as attempt_span_id
from .trace_context import attempt_span_name as attempt_span_name
from .trace_context import saga_span_name as saga_span_name

if TYPE_CHECKING:
    from ..records import Decision, Dispatch, Event, SagaRecord

log = logging.getLogger("sagaline")

INSTRUMENTATION = "sagaline"

_EVENTS_OF_LOST_ATTEMPTS = frozenset(
    {"step_attempt_failed", "step_failed", "compensation_attempt_failed", "compensation_failed"}
)


class Tracing:
    """sagaline's spans, made through the process's TracerProvider."""

    def __init__(self, provider: trace.TracerProvider | None = None) -> None:
        tracer = trace.get_tracer(INSTRUMENTATION, tracer_provider=provider)
        if not isinstance(tracer, SdkTracer):
            raise ConfigurationError(
                "sagaline's tracing needs the OpenTelemetry SDK's TracerProvider (it fixes "
                "the ids of spans that outlive a process); the one set here is "
                f"{type(trace.get_tracer_provider()).__name__}"
            )
        # A tracer of sagaline's own (get_tracer makes a new one per call): replacing
        # its id generator changes nothing for the application's spans.
        self._ids = PresetIds(tracer.id_generator)
        tracer.id_generator = self._ids
        self.tracer = tracer
        # After the Celery instrumentation's receiver (it connects in worker_process_init,
        # this runs at the first task or saga of the process): the last word is ours.
        before_task_publish.connect(
            _root_as_traceparent, weak=False, dispatch_uid="sagaline.root_as_traceparent"
        )
        # Sagas the current attempt ended (their root spans wait for its span to end).
        self._ended_in_attempt: ContextVar[list[SagaRecord] | None] = ContextVar(
            "sagaline_sagas_ended_in_attempt", default=None
        )

    # -- starting a saga ---------------------------------------------------------------

    def new_saga(self, name: str, saga_id: str, parent: str | None = None) -> str | None:
        """The trace context of a new saga: in the trace of the current span (or of the
        parent saga's root, for a child saga), else in a new trace."""
        if parent is not None:
            parent_trace = SagaTrace.decode(parent)
            ctx = parent_trace.root_context() if parent_trace else otel_context.Context()
        else:
            ctx = otel_context.get_current()
        span_context = trace.get_current_span(ctx).get_span_context()
        parent_span: int | None = None
        if span_context.is_valid:
            trace_id, parent_span = span_context.trace_id, span_context.span_id
        else:
            ctx, trace_id = otel_context.Context(), self._ids.generate_trace_id()
        # The sampler decides now, as it would for the root span: its decision travels
        # in the flags, and every later span follows it (parent-based sampling).
        result = self.tracer.sampler.should_sample(
            ctx,
            trace_id,
            saga_span_name(name),
            trace.SpanKind.INTERNAL,
            {SAGA_ID: saga_id, SAGA_NAME: name},
        )
        sampled: bool = result.decision.is_sampled()  # type: ignore[no-untyped-call]
        flags = trace.TraceFlags.SAMPLED if sampled else trace.TraceFlags.DEFAULT
        return SagaTrace(trace_id, self._ids.generate_span_id(), flags, parent_span).encode()

    def publishing(self, d: Dispatch) -> contextlib.AbstractContextManager[None]:
        """The saga's root span is current while its message is published (a Celery
        instrumentation then makes its publish span a child of it)."""
        saga_trace = SagaTrace.decode(d.trace_context)
        if saga_trace is None:
            return contextlib.nullcontext()
        return _Current(saga_trace.root_context())

    # -- attempts ----------------------------------------------------------------------

    def attempt(self, meta: dict[str, Any], task: Any) -> contextlib.AbstractContextManager[None]:
        """The span of one claimed attempt, current while it runs and completes."""
        saga_trace = SagaTrace.decode(meta.get("trace"))
        if saga_trace is None:
            return contextlib.nullcontext()
        saga_id, step = str(meta["saga_id"]), str(meta["step"])
        phase, attempt = Phase(meta["phase"]), int(meta["attempt"])
        # The step's task is the saga definition's (saga.name and saga.step name it); the
        # message id ties the span to Celery's logs and events. Every attribute costs
        # each span its validation and its encoding.
        attributes = attempt_attributes(saga_id, str(meta["saga"]), step, phase, attempt)
        task_id = getattr(getattr(task, "request", None), "id", None)
        if task_id:
            attributes["messaging.message.id"] = str(task_id)
        span = self._start(
            attempt_span_name(step, phase),
            saga_trace.root_context(),
            (saga_trace.trace_id, attempt_span_id(saga_trace, saga_id, step, phase, attempt)),
            attributes=attributes,
            kind=trace.SpanKind.CONSUMER,
        )
        return _AttemptSpan(self, span)

    def lost_attempt(self, saga: SagaRecord | None, event: Event, started_at: float | None) -> None:
        """Emit, with status ERROR, the span of an attempt whose process died."""
        saga_trace = SagaTrace.decode(saga.trace_context if saga else None)
        if saga is None or saga_trace is None or event.step is None or event.attempt is None:
            return
        phase = Phase(event.phase or Phase.FORWARD.value)
        error = str(event.detail.get("error") or event.detail.get("reason"))
        span = self._start(
            attempt_span_name(event.step, phase),
            saga_trace.root_context(),
            (
                saga_trace.trace_id,
                attempt_span_id(saga_trace, saga.saga_id, event.step, phase, event.attempt),
            ),
            attributes={
                **attempt_attributes(saga.saga_id, saga.name, event.step, phase, event.attempt),
                SAGA_OUTCOME: "lost",
            },
            kind=trace.SpanKind.CONSUMER,
            start=started_at or event.ts,
        )
        span.set_status(trace.Status(trace.StatusCode.ERROR, error.split("\n", 1)[0]))
        span.end(end_time=_ns(event.ts))

    # -- the end of a saga -------------------------------------------------------------

    def saga_finished(self, saga: SagaRecord, end: float | None = None) -> None:
        """Emit the saga's root span: from its start to its end, with the stored ids.

        Inside the attempt that ended the saga, it waits for that attempt's span to end,
        so that the root span encloses all of its children."""
        saga_trace = SagaTrace.decode(saga.trace_context)
        if saga_trace is None:
            return
        waiting = self._ended_in_attempt.get()
        if waiting is not None and end is None:
            waiting.append(saga)
            return
        attributes: dict[str, Any] = {
            SAGA_ID: saga.saga_id,
            SAGA_NAME: saga.name,
            SAGA_STATUS: saga.status.value,
        }
        if saga.failed_step:
            attributes["saga.failed_step"] = saga.failed_step
        if saga.parent_saga_id:
            attributes["saga.parent_id"] = saga.parent_saga_id
        span = self._start(
            saga_span_name(saga.name),
            saga_trace.parent_context(),
            (saga_trace.trace_id, saga_trace.span_id),
            attributes=attributes,
            kind=trace.SpanKind.INTERNAL,
            start=saga.created_at,
        )
        if saga.status is SagaStatus.COMPLETED:
            span.set_status(trace.Status(trace.StatusCode.OK))
        else:
            span.set_status(
                trace.Status(
                    trace.StatusCode.ERROR, f"{saga.status.value}: {saga.error or ''}".strip()
                )
            )
        span.end(end_time=_ns(max(end or 0.0, saga.finished_at or time.time())))

    def after_commit(self, decision: Decision, store: Any) -> None:
        """Emit what a committed decision ended: attempts lost with their worker, and
        the saga itself. Never raises: tracing must not break the engine."""
        try:
            lost = [
                e
                for e in decision.events
                if e.kind in _EVENTS_OF_LOST_ATTEMPTS and e.detail.get("reason") in CRASH_REASONS
            ]
            saga = decision.saga
            if lost:
                if saga is None:
                    saga = store.get_saga(lost[0].saga_id)
                steps = {s.name: s for s in decision.steps}
                for event in lost:
                    rec = steps.get(event.step or "")
                    self.lost_attempt(saga, event, rec.started_at if rec else None)
            if (
                any(e.kind in _TERMINAL_EVENTS for e in decision.events)
                and decision.saga is not None
                and decision.saga.status in SAGA_TERMINAL
                and not _ended_before(decision.saga, store)
            ):
                self.saga_finished(decision.saga)
        except Exception:
            log.warning("could not emit the spans of a saga transition", exc_info=True)

    def _start(
        self,
        name: str,
        parent: Any,
        ids: tuple[int, int],
        *,
        attributes: dict[str, Any],
        kind: trace.SpanKind,
        start: float | None = None,
    ) -> trace.Span:
        token = self._ids.preset.set(ids)
        try:
            return self.tracer.start_span(
                name,
                context=parent,
                kind=kind,
                attributes=attributes,
                start_time=None if start is None else _ns(start),
            )
        finally:
            self._ids.preset.reset(token)

    def flush(self, timeout: float = 5.0) -> None:
        provider = trace.get_tracer_provider()
        flush = getattr(provider, "force_flush", None)
        if flush is not None:
            flush(int(timeout * 1000))


class _Current:
    """`context` is the current OpenTelemetry context inside the block."""

    __slots__ = ("_context", "_token")

    def __init__(self, context: Any) -> None:
        self._context = context

    def __enter__(self) -> None:
        self._token = otel_context.attach(self._context)

    def __exit__(self, *exc: object) -> None:
        otel_context.detach(self._token)


class _AttemptSpan:
    """An attempt's span, current while the attempt runs (what trace.use_span does,
    without a generator: this runs for every attempt)."""

    __slots__ = ("_current", "_deferred", "_ended", "_span", "_tracing")

    def __init__(self, tracing: Tracing, span: trace.Span) -> None:
        self._tracing = tracing
        self._span = span
        # Sagas this attempt ends: their root spans wait for its span to end.
        self._ended: list[SagaRecord] = []

    def __enter__(self) -> None:
        self._deferred = self._tracing._ended_in_attempt.set(self._ended)
        self._current = otel_context.attach(trace.set_span_in_context(self._span))

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        span = self._span
        try:
            try:
                if exc is None:
                    span.set_attribute(SAGA_OUTCOME, "succeeded")
                elif not isinstance(exc, Ignore):
                    span.record_exception(exc)
                    span.set_status(
                        trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
                    )
                    span.set_attribute(SAGA_OUTCOME, "failed")
            finally:
                otel_context.detach(self._current)
                span.end()
        finally:
            self._tracing._ended_in_attempt.reset(self._deferred)
            # The attempt that ended the saga has ended: the root span can close after it.
            for saga in self._ended:
                self._tracing.saga_finished(saga, end=time.time())


def _root_as_traceparent(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """A step message's `traceparent` is its saga's root span, whoever wrote it before."""
    meta = headers.get(HEADER) if headers else None
    if headers is not None and isinstance(meta, dict) and isinstance(meta.get("trace"), str):
        headers["traceparent"] = meta["trace"].partition(":")[0]
        headers.pop("tracestate", None)


_TERMINAL_EVENTS = frozenset({"saga_completed", "saga_compensated", "saga_failed"})


def _ended_before(saga: SagaRecord, store: Any) -> bool:
    """Whether the saga had ended before this end: a child saga rolled back after it
    completed, a FAILED saga an operator resumed. Its root span was emitted then (one
    span per id); what ran since joins the trace under it. A saga ends COMPLETED only
    once, so the common case reads nothing."""
    if saga.status is SagaStatus.COMPLETED:
        return False
    ends = [e for e in store.history(saga.saga_id) if e.kind in _TERMINAL_EVENTS]
    return len(ends) > 1


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
