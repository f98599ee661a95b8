"""REST API `/api/v1`: thin routes over `ops` (OpenAPI 3.1 at `/api/v1/openapi.json`).

This module builds the app, with the health routes and those that act; the routes that
read are in api_read.py."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Header, Path, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from .. import ops
from ..exceptions import ConfigurationError
from ..records import SagaFilter
from . import schemas
from .api_read import PAGE_TOKEN as PAGE_TOKEN
from .api_read import (
    SagaId,
    count_sagas,
    get_events,
    get_saga,
    list_sagas,
    stream_events,
)
from .api_read import decode_token as decode_token
from .api_read import encode_token as encode_token
from .api_stream import stream_sagas
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
    # Before GET /sagas/{saga_id}, which never serves a saga with id "counts" or "stream":
    # no saga may have one (names.RESERVED_SAGA_IDS, checked where a caller chooses an id).
    api.add_api_route(
        "/sagas/counts",
        count_sagas,
        methods=["GET"],
        response_model=schemas.StatusCounts,
        operation_id="count_sagas",
        responses=_problems(),
    )
    api.add_api_route(
        "/sagas/stream",
        stream_sagas,
        methods=["GET"],
        operation_id="stream_sagas",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "Server-sent events: `sagas` at once, then whenever sagas "
                "enter the list's page or change; its data is JSON "
                '`{"sagas": [{saga_id, name, status, created_at, updated_at, '
                "failed_step}]}` naming those sagas. The stream ends after 10 minutes "
                "(EventSource connects again).",
                "content": {"text/event-stream": {}},
            },
            **_problems(400),
        },
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
