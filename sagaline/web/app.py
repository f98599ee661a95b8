"""The ASGI app: the dashboard at `/`, the API at `/api/v1`, shared state and errors."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from .. import ops
from ..exceptions import (
    ConfigurationError,
    IdempotencyConflict,
    InputError,
    InvalidTransition,
    SagaError,
    SagaNotFound,
    StoreError,
)
from .security import SESSION_COOKIE, Access, Principal

HERE = Path(__file__).parent
# Levels of nesting a response shows of a stored value too deep to encode whole.
DEEPEST_JSON = 200


# Counts per status scan every saga of a status (a million rows: hundreds of ms): each
# is computed at most once per this many seconds, and never while a request waits,
# except the first time.
COUNTS_MAX_AGE = 10.0


@dataclass
class WebContext:
    """What every route needs: where to read, how to act (None: read only), who may."""

    store: ops.Store
    runtime: ops.Runtime | None
    access: Access
    _counts: dict[str | None, tuple[float, dict[str, int]]] = field(default_factory=dict)
    _refreshing: set[str | None] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _metrics: ops.MetricsExposition | None = None

    def metrics(self) -> ops.MetricsExposition:
        with self._lock:
            if self._metrics is None:
                self._metrics = ops.MetricsExposition(self.store)
            return self._metrics

    def counts(self, name: str | None) -> dict[str, int]:
        """Sagas per status (of one name), at most COUNTS_MAX_AGE seconds old: a stale
        value is answered at once while one thread computes the next."""
        with self._lock:
            cached = self._counts.get(name)
            stale = cached is None or time.monotonic() - cached[0] > COUNTS_MAX_AGE
            refresh = stale and cached is not None and name not in self._refreshing
            if refresh:
                self._refreshing.add(name)
        if cached is None:
            return self._count(name)
        if refresh:
            threading.Thread(
                target=self._count, args=(name,), daemon=True, name="sagaline-web-counts"
            ).start()
        return cached[1]

    def _count(self, name: str | None) -> dict[str, int]:
        try:
            counts = {s.value: n for s, n in self.store.count_by_status(name).items()}
            with self._lock:
                if len(self._counts) > 1000:  # one entry per name asked for: bounded
                    self._counts.clear()
                self._counts[name] = (time.monotonic(), counts)
            return counts
        finally:
            with self._lock:
                self._refreshing.discard(name)


def context(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.sagaline
    return ctx


class Problem(Exception):
    """An HTTP error answered as RFC 9457 problem details."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        self.status, self.title, self.detail, self.headers = status, title, detail, headers
        super().__init__(detail or title)


class DocResponse(JSONResponse):
    """JSON of whatever the store holds; a value nested too deeply is shown cut."""

    def render(self, content: Any) -> bytes:
        try:
            return json.dumps(content, default=str).encode()
        except RecursionError:
            return json.dumps(ops.cut_deep(content, DEEPEST_JSON), default=str).encode()


def problem_response(
    request: Request,
    status: int,
    title: str,
    detail: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        **extra,
    }
    return JSONResponse(
        body, status_code=status, headers=headers, media_type="application/problem+json"
    )


# sagaline's errors as HTTP statuses: the first match wins (subclasses first).
_STATUS_OF: list[tuple[type[SagaError], int, str]] = [
    (SagaNotFound, 404, "saga not found"),
    (InvalidTransition, 409, "not allowed in the saga's state"),
    (IdempotencyConflict, 409, "idempotency key already used with other input"),
    (InputError, 422, "invalid saga input"),
    (StoreError, 503, "state store unavailable"),
    (ConfigurationError, 503, "not configured"),
    (SagaError, 500, "saga error"),
]


def install_problem_handlers(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return problem_response(request, exc.status, exc.title, exc.detail, exc.headers)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Every method some route offers at this path, not just the first route's.
            allowed = {
                m
                for route in request.app.router.routes
                if getattr(route, "path_regex", None) is not None
                and route.path_regex.match(
                    request.scope["path"].removeprefix(request.scope.get("root_path", ""))
                )
                for m in getattr(route, "methods", None) or ()
            }
            headers["Allow"] = ", ".join(sorted(allowed))
        return problem_response(request, exc.status_code, str(exc.detail), None, headers)

    async def on_invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:5])
        return problem_response(request, 422, "invalid request", detail, errors=errors)

    async def on_saga_error(request: Request, exc: Exception) -> Response:
        for cls, status, title in _STATUS_OF:
            if isinstance(exc, cls):
                return problem_response(request, status, title, ops.first_line(str(exc)))
        raise exc  # pragma: no cover - SagaError is the last entry

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(SagaError, on_saga_error)


# -- who is asking ----------------------------------------------------------------------


def bearer_principal(request: Request) -> Principal | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    principal = context(request).access.by_token(token.strip())
    if principal is None:
        raise Problem(
            401,
            "invalid token",
            "the bearer token is not one this server accepts",
            {"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return principal


def session_principal(request: Request) -> Principal | None:
    value = request.cookies.get(SESSION_COOKIE)
    return None if not value else context(request).access.by_session(value)


def reader(request: Request) -> Principal:
    """Anyone with a token (or the dashboard's session cookie) may read."""
    access = context(request).access
    principal = bearer_principal(request) or session_principal(request)
    if principal is None:
        if access.open:
            return Principal("anonymous", "operate")
        raise Problem(
            401,
            "authentication required",
            "send Authorization: Bearer <token>",
            {"WWW-Authenticate": "Bearer"},
        )
    return principal


def operator(request: Request) -> Principal:
    """Actions over the API need an operate token in the header: a cookie alone would
    let another site's page act in the user's name (the dashboard's forms carry CSRF
    tokens instead)."""
    access = context(request).access
    principal = bearer_principal(request)
    if principal is None:
        if access.open:
            return Principal("anonymous", "operate")
        raise Problem(
            401,
            "authentication required",
            "actions need Authorization: Bearer <operate token>",
            {"WWW-Authenticate": "Bearer"},
        )
    if not principal.may_operate:
        raise Problem(403, "forbidden", f"token {principal.name!r} may only read")
    return principal


def acting_runtime(request: Request) -> ops.Runtime:
    runtime = context(request).runtime
    if runtime is None:
        raise Problem(
            503,
            "read-only server",
            "starting, cancelling and resuming need the Celery app: sagaline web -A <module>",
        )
    return runtime
