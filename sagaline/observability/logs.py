"""JSON logs: one object per line, carrying the saga, step and trace of each record.

`SAGALINE_LOG_FORMAT=json` (or `sagaline worker --log-format json`) makes a
worker's handlers write records as JSON: Celery's own, sagaline's, and the user's
records logged inside a step, whose saga fields come from the step being run (a
contextvar set around every step and compensation) and whose trace ids come from
the current OpenTelemetry span, when tracing is on. sagaline's records about a saga
outside a step body (a refused claim, a hand-back, the sweeper's repairs) carry
the saga too (`context.about_saga`, `context.saga_log_extra`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from ..context import log_fields

# Fields every line has (null when the record is about no saga, or logged outside a span).
FIELDS = (
    "time",
    "level",
    "logger",
    "message",
    "saga_id",
    "saga",
    "step",
    "attempt",
    "phase",
    "trace_id",
    "span_id",
)


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (FIELDS, then `process`, `task_id` inside a
    Celery task, and `exception` with the traceback when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        info = log_fields(record)
        trace_id, span_id = current_trace_ids()
        doc: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "saga_id": info.saga_id if info else None,
            "saga": info.saga_name if info else None,
            "step": info.step if info else None,
            "attempt": info.attempt if info else None,
            "phase": info.phase if info else None,
            "trace_id": trace_id,
            "span_id": span_id,
            "process": record.process,
        }
        task_id = _celery_task_id()
        if task_id is not None:
            doc["task_id"] = task_id
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        # default=str: a message argument that JSON cannot hold never loses the line.
        return json.dumps(doc, ensure_ascii=False, default=str)


def current_trace_ids() -> tuple[str | None, str | None]:
    """The ids of the current OpenTelemetry span, if tracing is on in this process.

    Looks only at an OpenTelemetry that is already imported: logging never imports it.
    """
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None, None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def _celery_task_id() -> str | None:
    task_module = sys.modules.get("celery._state")
    task = task_module.get_current_task() if task_module is not None else None
    request = getattr(task, "request", None)
    task_id = getattr(request, "id", None)
    return str(task_id) if task_id else None


def _iso(created: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z"
    )


def use_json(logger: logging.Logger) -> None:
    """Make every handler of `logger` (or of the root logger, if it has none) write JSON."""
    formatter = JsonFormatter()
    for handler in logger.handlers or logging.getLogger().handlers:
        handler.setFormatter(formatter)
