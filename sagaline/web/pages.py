"""The dashboard: server-rendered pages over `ops`, live through the API's event stream."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from .. import ops
from ..exceptions import InvalidTransition, SagaError, SagaNotFound
from ..records import SagaFilter
from ..states import EventKind, SagaStatus
from . import render
from .api import decode_token, encode_token
from .app import HERE, context, session_principal
from .security import ANONYMOUS, SESSION_COOKIE, Principal

PAGE_SIZE = 50
# The saga page reads at most PAGE_EVENTS of the newest events (the timeline and the
# "why" box come from them) and shows the newest HISTORY_ROWS in its history table;
# older rows load on demand from GET /api/v1/sagas/{id}/events?before_seq=.
PAGE_EVENTS = 2000
HISTORY_ROWS = 200
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["pretty"] = lambda v: json.dumps(v, indent=2, default=str, ensure_ascii=False)
_env.filters["compact"] = lambda v: json.dumps(v, default=str, ensure_ascii=False)
_env.filters["when"] = render.when
_env.filters["duration"] = render.duration


class SecurityHeaders(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        if response.headers.get("content-type", "").startswith("text/html"):
            response.headers["Content-Security-Policy"] = CSP
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Referrer-Policy"] = "same-origin"
        return response


def base_of(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def page(
    request: Request, template: str, principal: Principal, status: int = 200, **values: Any
) -> HTMLResponse:
    ctx = context(request)
    html = _env.get_template(template).render(
        base=base_of(request),
        principal=principal,
        csrf=ctx.access.csrf_token(principal),
        can_operate=ctx.runtime is not None and principal.may_operate,
        read_only=ctx.runtime is None,
        open=ctx.access.open,
        **values,
    )
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


def who(request: Request) -> Principal | None:
    if context(request).access.open:
        return ANONYMOUS
    return session_principal(request)


def to_login(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"{base_of(request)}/login?next={quote(target)}", status_code=303)


def install_pages(app: FastAPI) -> None:
    app.add_middleware(SecurityHeaders)
    app.add_api_route("/login", login_form, methods=["GET"], include_in_schema=False)
    app.add_api_route("/login", login, methods=["POST"], include_in_schema=False)
    app.add_api_route("/logout", logout, methods=["POST"], include_in_schema=False)
    app.add_api_route("/", saga_list, methods=["GET"], include_in_schema=False)
    app.add_api_route("/healthz", _health, methods=["GET"], include_in_schema=False)
    app.add_api_route("/sagas/{saga_id}", saga_page, methods=["GET"], include_in_schema=False)
    app.add_api_route(
        "/sagas/{saga_id}/{action}", saga_action, methods=["POST"], include_in_schema=False
    )


def _health() -> dict[str, str]:
    return {"status": "ok"}


# -- login ----------------------------------------------------------------------------------


def _safe_next(target: str) -> str:
    # Only a path of this site: never `//evil.example` or a full URL.
    return target if target.startswith("/") and not target.startswith("//") else "/"


def login_form(request: Request, next: str = "/") -> Response:
    return page(request, "login.html", ANONYMOUS, next=_safe_next(next), error=None)


def login(request: Request, token: str = Form(""), next: str = Form("/")) -> Response:
    ctx = context(request)
    principal = ctx.access.by_token(token.strip()) if token.strip() else None
    if principal is None:
        return page(
            request,
            "login.html",
            ANONYMOUS,
            status=401,
            next=_safe_next(next),
            error="That token is not one this server accepts.",
        )
    target = _safe_next(next)
    base = base_of(request)
    response = RedirectResponse(
        target if target.startswith(base + "/") else base + "/", status_code=303
    )
    response.set_cookie(
        SESSION_COOKIE,
        ctx.access.session_value(principal),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path=base + "/",
        max_age=12 * 3600,
    )
    return response


def logout(request: Request) -> Response:
    response = RedirectResponse(f"{base_of(request)}/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=base_of(request) + "/")
    return response


# -- the list -------------------------------------------------------------------------------


def saga_list(request: Request) -> Response:
    principal = who(request)
    if principal is None:
        return to_login(request)
    q = request.query_params
    form = {
        k: q.get(k, "").strip()
        for k in (
            "name",
            "since",
            "until",
            "idempotency_key",
            "failed_step",
            "parent",
            "page_token",
        )
    }
    statuses = [s for s in SagaStatus if s.value in q.getlist("status")]
    error, views, next_token, counts, stream = None, [], None, {}, None
    try:
        flt = SagaFilter(
            status=statuses or None,
            name=form["name"] or None,
            created_after=ops.parse_when(form["since"]) if form["since"] else None,
            created_before=ops.parse_when(form["until"]) if form["until"] else None,
            idempotency_key=form["idempotency_key"] or None,
            failed_step=form["failed_step"] or None,
            parent_saga_id=form["parent"] or None,
            limit=PAGE_SIZE,
            before=decode_token(form["page_token"]) if form["page_token"] else None,
        )
        store = context(request).store
        views = ops.find_sagas(store, flt)
        counts = context(request).counts(flt.name)
        stream = urlencode(_stream_query(flt))
        if len(views) == PAGE_SIZE:
            last = views[-1].saga
            keep = [(k, v) for k, v in q.multi_items() if k != "page_token"]
            next_token = urlencode(
                [*keep, ("page_token", encode_token(last.created_at, last.saga_id))]
            )
    except SagaError as exc:
        error = ops.first_line(str(exc))
    except Exception as exc:  # a bad time or page token in the form
        error = ops.first_line(str(getattr(exc, "message", None) or exc))
    rows = [
        {
            "saga": v.saga,
            "summary": ops.failure_summary(v.saga, v.steps),
            "duration": render.duration((v.saga.finished_at or time.time()) - v.saga.created_at),
        }
        for v in views
    ]
    template = "list_body.html" if q.get("fragment") else "list.html"
    return page(
        request,
        template,
        principal,
        rows=rows,
        counts=counts,
        form=form,
        statuses=[s.value for s in statuses],
        all_statuses=[s.value for s in SagaStatus],
        next_query=next_token,
        error=error,
        query=str(request.url.query),
        stream_query=stream,
    )


def _stream_query(flt: SagaFilter) -> list[tuple[str, str]]:
    """The list's filters as GET /api/v1/sagas/stream takes them (RFC 3339 times)."""

    def iso(ts: float) -> str:
        return datetime.fromtimestamp(ts, timezone.utc).isoformat()

    query = [("status", s.value) for s in flt.status or ()]
    for key, value in (
        ("name", flt.name),
        ("since", None if flt.created_after is None else iso(flt.created_after)),
        ("until", None if flt.created_before is None else iso(flt.created_before)),
        ("idempotency_key", flt.idempotency_key),
        ("failed_step", flt.failed_step),
        ("parent", flt.parent_saga_id),
        ("page_token", None if flt.before is None else encode_token(*flt.before)),
    ):
        if value is not None:
            query.append((key, value))
    return [*query, ("limit", str(flt.limit))]


# -- one saga -------------------------------------------------------------------------------


def saga_page(request: Request, saga_id: str) -> Response:
    principal = who(request)
    if principal is None:
        return to_login(request)
    ctx = context(request)
    try:
        view = ops.read_saga(ctx.store, saga_id, history_limit=PAGE_EVENTS)
    except SagaNotFound:
        return page(request, "missing.html", principal, status=404, saga_id=saga_id)
    now = time.time()
    shapes = ops.step_shapes(ctx.runtime, view.saga)
    shown = view.history[-HISTORY_ROWS:]
    history = [
        render.Drawn(
            event=e,
            failure=e.kind in render.FAILED_KINDS or bool(e.detail.get("error")),
            error=e.detail.get("error"),
        )
        for e in shown
    ]
    # The oldest event read is the saga's start unless its history is longer.
    partial = bool(view.history) and view.history[0].kind != EventKind.SAGA_STARTED
    earlier = shown[0].seq if shown and (partial or len(view.history) > len(shown)) else None
    template = "saga_body.html" if request.query_params.get("fragment") else "saga.html"
    return page(
        request,
        template,
        principal,
        view=view,
        saga=view.saga,
        now=now,
        why=render.why(view, shapes, now),
        dag=render.dag(view, shapes),
        timeline=render.timeline(view, now),
        history=history,
        earlier_before=earlier,
        partial=partial,
        failed_kinds=" ".join(sorted(render.FAILED_KINDS)),
        shapes=shapes,
        last_seq=max((e.seq or 0 for e in view.history), default=0),
        terminal=view.saga.status
        in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED),
        notice=request.query_params.get("notice"),
    )


def saga_action(
    request: Request,
    saga_id: str,
    action: str,
    csrf: str = Form(""),
    reason: str = Form("cancelled by operator"),
) -> Response:
    principal = who(request)
    ctx = context(request)
    if principal is None:
        return to_login(request)
    if not ctx.access.csrf_ok(principal, csrf):
        return HTMLResponse("invalid or missing CSRF token: reload the page", status_code=403)
    if action not in ("cancel", "resume"):
        return HTMLResponse("unknown action", status_code=404)
    if not principal.may_operate or ctx.runtime is None:
        return HTMLResponse(
            "this session may not operate (a read token, or a server started without -A)",
            status_code=403,
        )
    try:
        if action == "cancel":
            ops.cancel(
                saga_id,
                reason=reason[:2000] or "cancelled by operator",
                runtime=ctx.runtime,
                actor=principal.name,
            )
            # Still true once the compensations are done: the notice stays on the page
            # while the timeline below follows them live.
            notice = "Cancelled: its applied steps are compensated, the last first (below)."
        else:
            ops.resume(saga_id, runtime=ctx.runtime, actor=principal.name)
            notice = "Resumed."
    except InvalidTransition as exc:
        notice = str(exc)
    except SagaNotFound:
        return page(request, "missing.html", principal, status=404, saga_id=saga_id)
    return RedirectResponse(
        f"{base_of(request)}/sagas/{quote(saga_id)}?{urlencode({'notice': notice})}",
        status_code=303,
    )
