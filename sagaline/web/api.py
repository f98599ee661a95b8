"""REST API `/api/v1`: thin routes over `ops` (OpenAPI 3.1 at `/api/v1/openapi.json`)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Header, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse

from .. import ops
from ..exceptions import ConfigurationError, SagaNotFound
from ..records import SagaFilter
from ..states import SAGA_TERMINAL, SagaStatus
from . import schemas
from .app import (
    DocResponse,
    Problem,
    acting_runtime,
    context,
    install_problem_handlers,
    operator,
    reader,
)
from .security import Principal

MAX_PAGE = 500
MAX_EVENTS = 1000
# How often an event stream looks for new events, and sends a comment to keep it open.
STREAM_POLL = 0.25
STREAM_KEEPALIVE = 15.0

_PROBLEM = {
    "content": {"application/problem+json": {"schema": schemas.Problem.model_json_schema()}}
}


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    titles = {
        400: "Bad request",
        401: "No or invalid token",
        403: "The token may only read",
        404: "No such saga",
        409: "Not allowed now",
        422: "Invalid request",
        501: "Not installed",
        503: "Store unavailable, or a read-only server",
    }
    return {s: {"description": titles[s], **_PROBLEM} for s in (401, 422, 503, *statuses)}


SagaId = Annotated[str, Path(description="The saga's id", max_length=200)]
_SAGA_LINKS = {
    "GetSaga": {"operationId": "get_saga", "parameters": {"saga_id": "$response.body#/saga_id"}},
    "GetEvents": {
        "operationId": "get_events",
        "parameters": {"saga_id": "$response.body#/saga_id"},
    },
    "CancelSaga": {
        "operationId": "cancel_saga",
        "parameters": {"saga_id": "$response.body#/saga_id"},
    },
    "ResumeSaga": {
        "operationId": "resume_saga",
        "parameters": {"saga_id": "$response.body#/saga_id"},
    },
}


def api_app(saga_names: list[str]) -> FastAPI:
    api = FastAPI(
        title="sagaline",
        version="1",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        default_response_class=DocResponse,
        description="Sagas on Celery: list, inspect, start, cancel and resume "
        "sagas. Errors are RFC 9457 problem details.",
    )
    install_problem_handlers(api)
    api.add_api_route(
        "/healthz",
        healthz,
        methods=["GET"],
        response_model=schemas.Health,
        operation_id="healthz",
        responses=_problems(),
    )
    api.add_api_route(
        "/readyz",
        readyz,
        methods=["GET"],
        response_model=schemas.Health,
        operation_id="readyz",
        responses=_problems(),
    )
    api.add_api_route(
        "/metrics",
        metrics,
        methods=["GET"],
        operation_id="metrics",
        response_class=PlainTextResponse,
        responses={
            200: {
                "description": "Prometheus text exposition",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **_problems(501),
        },
    )
    api.add_api_route(
        "/sagas",
        list_sagas,
        methods=["GET"],
        response_model=schemas.SagaPage,
        operation_id="list_sagas",
        responses=_problems(400),
    )
    api.add_api_route(
        "/sagas/counts",
        count_sagas,
        methods=["GET"],
        response_model=schemas.StatusCounts,
        operation_id="count_sagas",
        responses=_problems(),
    )
    # Before POST /sagas/{name}: a saga named "cancel" cannot be started over HTTP.
    api.add_api_route(
        "/sagas/cancel",
        bulk_cancel,
        methods=["POST"],
        response_model=schemas.BulkCancelResult,
        operation_id="bulk_cancel",
        responses=_problems(400, 403),
    )
    api.add_api_route(
        "/sagas/{saga_id}",
        get_saga,
        methods=["GET"],
        response_model=schemas.SagaDetail,
        operation_id="get_saga",
        responses=_problems(404),
    )
    api.add_api_route(
        "/sagas/{saga_id}/events",
        get_events,
        methods=["GET"],
        response_model=schemas.EventPage,
        operation_id="get_events",
        responses=_problems(404),
    )
    api.add_api_route(
        "/sagas/{saga_id}/events/stream",
        stream_events,
        methods=["GET"],
        operation_id="stream_events",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "Server-sent events: one `saga_event` "
                "per history event (id = seq), `end` when the saga "
                "is over",
                "content": {"text/event-stream": {}},
            },
            **_problems(404),
        },
    )
    api.add_api_route(
        "/sagas/{name}",
        start_saga,
        methods=["POST"],
        status_code=201,
        response_model=schemas.SagaSummary,
        operation_id="start_saga",
        responses={
            200: {
                "description": "The saga this Idempotency-Key started already, with the same input",
                "model": schemas.SagaSummary,
                "links": _SAGA_LINKS,
            },
            201: {"description": "Started", "links": _SAGA_LINKS},
            **_problems(400, 403, 404, 409),
        },
    )
    api.add_api_route(
        "/sagas/{saga_id}/cancel",
        cancel_saga,
        methods=["POST"],
        response_model=schemas.SagaSummary,
        operation_id="cancel_saga",
        responses=_problems(400, 403, 404, 409),
    )
    api.add_api_route(
        "/sagas/{saga_id}/resume",
        resume_saga,
        methods=["POST"],
        response_model=schemas.SagaSummary,
        operation_id="resume_saga",
        responses=_problems(403, 404, 409),
    )
    _document_saga_names(api, saga_names)
    return api


def _document_saga_names(api: FastAPI, names: list[str]) -> None:
    """The schema names the sagas this server can start (those of its Celery app)."""
    build = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            doc = build()
            for param in doc["paths"]["/sagas/{name}"]["post"]["parameters"]:
                if param["name"] == "name" and names:
                    param["schema"]["enum"] = names
        return api.openapi_schema or doc

    api.openapi = openapi  # type: ignore[method-assign]


# -- health -------------------------------------------------------------------------------


def healthz() -> dict[str, str]:
    """The process serves requests."""
    return {"status": "ok"}


def readyz(request: Request) -> dict[str, str]:
    """The store answers (503 otherwise)."""
    if not context(request).store.exists():
        raise Problem(503, "state store unavailable", "the store has no sagaline schema")
    return {"status": "ready"}


def metrics(request: Request, _who: Annotated[Principal, Depends(reader)]) -> Any:
    """Prometheus metrics of this server: the sagas it started, and the sagas in progress
    (read from the store) of the sagas its app defines (`-A`)."""
    try:
        exposition = context(request).metrics()
    except ConfigurationError as exc:
        raise Problem(501, "metrics need the prometheus extra", str(exc)) from None
    return PlainTextResponse(exposition.render(), media_type=exposition.content_type)


# -- reading ------------------------------------------------------------------------------


def _timestamp(value: str | None, name: str) -> float | None:
    """An RFC 3339 time (a leap second reads as :59) as Unix time; 422 otherwise."""
    if value is None:
        return None
    text = value.strip().upper().replace("Z", "+00:00").replace(":60", ":59")
    try:
        return datetime.fromisoformat(text).timestamp()
    except (OverflowError, OSError, ValueError):
        raise Problem(
            422, "invalid request", f"{name}: {value!r} is not an RFC 3339 date-time"
        ) from None


TimeParam = Annotated[str | None, Query(max_length=64, json_schema_extra={"format": "date-time"})]
SeqParam = Annotated[int, Query(ge=0, le=2**62)]


# A page token is the (created_at, saga_id) of the last saga of the previous page; any
# string of this form is a valid position, so the schema says exactly what is accepted.
PAGE_TOKEN = r"^[0-9]{1,12}(\.[0-9]{1,17})?~[A-Za-z0-9_.:-]{1,200}$"


def encode_token(created_at: float, saga_id: str) -> str:
    # repr: every digit, so that the cursor sits exactly on the last saga (a rounded
    # time would repeat it, or skip sagas created within the rounding).
    return f"{created_at!r}~{saga_id}"


def decode_token(token: str) -> tuple[float, str]:
    if not re.match(PAGE_TOKEN, token):
        raise Problem(400, "invalid page_token", "pass the next_page_token of a previous page")
    created_at, _, saga_id = token.partition("~")
    return float(created_at), saga_id


def list_sagas(
    request: Request,
    _who: Annotated[Principal, Depends(reader)],
    status: Annotated[list[SagaStatus] | None, Query(description="Repeatable")] = None,
    name: Annotated[str | None, Query(max_length=200)] = None,
    since: TimeParam = None,
    until: TimeParam = None,
    idempotency_key: Annotated[str | None, Query(max_length=500)] = None,
    failed_step: Annotated[str | None, Query(max_length=200)] = None,
    parent: Annotated[str | None, Query(max_length=200, description="Parent saga id")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    page_token: Annotated[str | None, Query(pattern=PAGE_TOKEN)] = None,
) -> Any:
    """Sagas matching every filter given, newest first, a page at a time (keyset)."""
    flt = SagaFilter(
        status=status,
        name=name,
        created_after=_timestamp(since, "since"),
        created_before=_timestamp(until, "until"),
        idempotency_key=idempotency_key,
        failed_step=failed_step,
        parent_saga_id=parent,
        limit=limit,
        before=None if page_token is None else decode_token(page_token),
    )
    views = ops.find_sagas(context(request).store, flt)
    last = views[-1].saga if len(views) == limit else None
    return {
        "sagas": [ops.summary_as_dict(v) for v in views],
        "next_page_token": None if last is None else encode_token(last.created_at, last.saga_id),
    }


def count_sagas(
    request: Request,
    _who: Annotated[Principal, Depends(reader)],
    name: Annotated[str | None, Query(max_length=200)] = None,
) -> Any:
    """How many sagas are in each status (computed at most every 10 s)."""
    return {"counts": context(request).counts(name)}


def get_saga(request: Request, saga_id: SagaId, _who: Annotated[Principal, Depends(reader)]) -> Any:
    """A saga with its steps, attempts, history and children (as `sagaline show --json`)."""
    return ops.view_as_dict(ops.read_saga(context(request).store, saga_id))


def get_events(
    request: Request,
    saga_id: SagaId,
    _who: Annotated[Principal, Depends(reader)],
    after_seq: SeqParam = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = MAX_EVENTS,
) -> Any:
    """The saga's history after `after_seq`, oldest first."""
    store = context(request).store
    if store.get_saga(saga_id) is None:
        raise SagaNotFound(saga_id)
    events = store.history(saga_id, after_seq=after_seq)[:limit]
    last = events[-1].seq if events and events[-1].seq is not None else after_seq
    return {"events": [ops.event_as_dict(e) for e in events], "next_after_seq": last}


async def stream_events(
    request: Request,
    saga_id: SagaId,
    _who: Annotated[Principal, Depends(reader)],
    after_seq: SeqParam = 0,
    last_event_id: Annotated[str | None, Header(max_length=30)] = None,
) -> Any:
    """Every history event after `after_seq` (or Last-Event-ID), then each new one as it
    commits. One saga's events commit in order under its lock, so none is skipped."""
    store = context(request).store
    if last_event_id and last_event_id.isdigit():
        after_seq = max(after_seq, int(last_event_id))
    if await run_in_threadpool(store.get_saga, saga_id) is None:
        raise SagaNotFound(saga_id)

    async def events() -> AsyncIterator[str]:
        seq, quiet_since = after_seq, time.monotonic()
        yield "retry: 2000\n\n"
        while not await request.is_disconnected():
            batch = await run_in_threadpool(store.history, saga_id, after_seq=seq)
            for event in batch:
                seq = event.seq or seq
                data = json.dumps(ops.event_as_dict(event), default=str)
                yield f"id: {seq}\nevent: saga_event\ndata: {data}\n\n"
            if batch:
                quiet_since = time.monotonic()
            saga = await run_in_threadpool(store.get_saga, saga_id)
            if saga is None or (saga.status in SAGA_TERMINAL and not batch):
                yield "event: end\ndata: {}\n\n"
                return
            if time.monotonic() - quiet_since > STREAM_KEEPALIVE:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
            await asyncio.sleep(STREAM_POLL)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# -- acting ---------------------------------------------------------------------------------


def start_saga(
    request: Request,
    name: Annotated[str, Path(max_length=200, description="The saga's name")],
    who: Annotated[Principal, Depends(operator)],
    input: Annotated[
        dict[str, Any] | None, Body(description="The saga's input: a JSON object")
    ] = None,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", min_length=1, max_length=500)
    ] = None,
) -> Any:
    """Start saga `name`: 201 when new; 200 when this Idempotency-Key started it already
    with the same input; 409 when it did with other input."""
    runtime = acting_runtime(request)
    if name not in ops.saga_names():
        raise Problem(
            404,
            "no such saga definition",
            f"no saga named {name!r} is defined in the app; defined: "
            f"{', '.join(ops.saga_names()) or 'none'}",
        )
    saga, created = ops.start(
        name, input or {}, idempotency_key=idempotency_key, runtime=runtime, actor=who.name
    )
    body = ops.summary_as_dict(ops.SagaView(saga, []))
    return DocResponse(
        body,
        status_code=201 if created else 200,
        headers={"Location": f"{request.scope.get('root_path', '')}/sagas/{saga.saga_id}"},
    )


def cancel_saga(
    request: Request,
    saga_id: SagaId,
    who: Annotated[Principal, Depends(operator)],
    body: Annotated[schemas.CancelRequest | None, Body()] = None,
) -> Any:
    """Stop a RUNNING saga and compensate what it applied (409 in any other state)."""
    reason = body.reason if body is not None else "cancelled by operator"
    saga = ops.cancel(saga_id, reason=reason, runtime=acting_runtime(request), actor=who.name)
    return ops.summary_as_dict(ops.SagaView(saga, []))


def resume_saga(
    request: Request, saga_id: SagaId, who: Annotated[Principal, Depends(operator)]
) -> Any:
    """Retry the unfinished compensations (or forward steps) of a FAILED saga."""
    saga = ops.resume(saga_id, runtime=acting_runtime(request), actor=who.name)
    return ops.summary_as_dict(ops.SagaView(saga, []))


def bulk_cancel(
    request: Request,
    who: Annotated[Principal, Depends(operator)],
    body: Annotated[schemas.BulkCancelRequest, Body()],
) -> Any:
    """Cancel every RUNNING saga that matches the filter; `dry_run` only counts them."""
    runtime = acting_runtime(request)
    flt = SagaFilter(
        status=body.status,
        name=body.name,
        created_after=body.since,
        created_before=body.until,
        idempotency_key=body.idempotency_key,
        failed_step=body.failed_step,
        parent_saga_id=body.parent,
    )
    matched, cancelled = ops.cancel_matching(
        flt, dry_run=body.dry_run, reason=body.reason, runtime=runtime, actor=who.name
    )
    return {
        "matched": len(matched),
        "cancelled": len(cancelled),
        "saga_ids": matched if body.dry_run else cancelled,
        "dry_run": body.dry_run,
    }
