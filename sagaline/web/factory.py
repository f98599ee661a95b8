"""Putting the app together: the API mounted at /api/v1, the pages, the static files."""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .. import ops
from ..exceptions import ConfigurationError
from .api import api_app
from .app import HERE, WebContext, install_problem_handlers
from .pages import install_pages
from .security import Access


def build_app(
    store: ops.Store | str | None, celery_app: Any, *, token: str | None, read_token: str | None
) -> FastAPI:
    runtime = None if celery_app is None else ops.current_runtime(celery_app)
    if isinstance(store, str):
        store = ops.open_store(store, read_only=True)
    if store is None:
        store = runtime.store if runtime is not None else ops.read_store()
    ctx = WebContext(store, runtime, Access.from_env(token, read_token))
    # Count from the start the sagas this server starts (/api/v1/metrics answers 501
    # without the prometheus extra).
    with contextlib.suppress(ConfigurationError):
        ctx.metrics()
    api = api_app(ops.saga_names() if runtime is not None else [])
    api.state.sagaline = ctx
    root = FastAPI(title="sagaline", openapi_url=None, docs_url=None, redoc_url=None)
    root.state.sagaline = ctx
    install_problem_handlers(root)
    root.mount("/api/v1", api)
    root.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    install_pages(root)
    return root
